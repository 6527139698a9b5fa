"""Per-batch steps of the data pipeline over pyarrow tables (numpy + pyarrow, no Ray).

:mod:`mendis_ray.distributed.data` maps these over Ray Data blocks; the benchmark runs the
same functions in plain numpy to measure what Ray adds.  A batch is a table with the
shard columns ``id``, ``flux``, ``ivar`` (fixed-size lists), ``teff``, ``logg``, ``feh``,
``snr`` and, when read through Ray Data with ``include_paths``, ``path``.
"""

from __future__ import annotations

import secrets
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mendis_ray.spectra import plain
from mendis_ray.spectra.degrade import LABEL_SCATTER, degrade_to_snr
from mendis_ray.spectra.schema import LABEL_COLUMNS, ShardError, list_matrix, matrix_column

__all__ = [
    "DegradeConfig",
    "degrade_batch",
    "spectra_of",
    "standardize_batch",
    "validate_batch",
]


def _where(batch: pa.Table, row: int) -> str:
    rid = batch.column("id")[row].as_py()
    if "path" in batch.column_names:
        return f"{batch.column('path')[row].as_py()}: spectrum id {rid!r}"
    return f"spectrum id {rid!r}"


def _files(batch: pa.Table) -> str:
    """The shard file(s) a batch's rows come from (its ``path`` column), or "batch"."""
    if "path" not in batch.column_names or not batch.num_rows:
        return "batch"
    paths = pc.unique(batch.column("path")).to_pylist()
    more = f" (and {len(paths) - 3} more)" if len(paths) > 3 else ""
    return ", ".join(map(str, paths[:3])) + more


def validate_batch(
    batch: pa.Table, n_pix: int, require_labels: bool = False, strict: bool = True
) -> pa.Table:
    """Check every row of ``batch``; return it in the shard schema
    (:func:`~mendis_ray.spectra.plain.normalize_columns`, masked pixels marked with NaN
    made ivar 0 and flux 1: :func:`~mendis_ray.spectra.plain.clean_masked`) or raise
    :class:`ShardError` naming the file (``path`` column), the spectrum id, the pixel and
    what was expected.

    ``strict=False`` (scoring) lets non-finite flux or infinite ivar at good pixels
    through: the scorers flag such spectra ``nonfinite`` instead of one bad pixel stopping
    a catalog.  A negative ivar or a null id stops it either way."""
    where = _files(batch)
    batch = plain.normalize_columns(batch, where, warn=False)  # the driver warned
    for name in ("id", "flux", "ivar"):
        if name not in batch.column_names:
            raise ShardError(f"{where} is missing column {name!r} (columns: {batch.column_names})")
    for name in ("flux", "ivar"):
        t = batch.schema.field(name).type
        fixed = pa.types.is_fixed_size_list(t)
        if not (fixed or pa.types.is_list(t) or pa.types.is_large_list(t)) or (
            fixed and t.list_size != n_pix
        ):
            raise ShardError(f"{where}: column {name!r} is {t}, expected {n_pix} values per row")
    if n_null := batch.column("id").null_count:
        raise ShardError(f"{where}: {n_null} spectra without an id (null); give every row one")
    # a variable-length list is read as the shard reader reads it: each row's length checked
    batch, flux, ivar = plain.matrices(batch, n_pix, where)
    checks = [(ivar < 0, "negative ivar")]
    if strict:
        checks += [
            (~np.isfinite(ivar), "infinite ivar"),
            (~np.isfinite(flux), "non-finite flux at a good pixel (mark bad pixels with ivar 0)"),
        ]
    for bad, what in checks:
        rows = np.flatnonzero(bad.any(axis=1))
        if rows.size:
            r = int(rows[0])
            raise ShardError(
                f"{_where(batch, r)} has {what} at pixel {int(np.flatnonzero(bad[r])[0])} "
                f"({rows.size} bad row(s) in this batch)"
            )
    if require_labels:
        lab = np.stack([batch.column(c).to_numpy(zero_copy_only=False) for c in LABEL_COLUMNS], 1)
        rows = np.flatnonzero(~np.isfinite(lab.astype(np.float64)).all(axis=1))
        if rows.size:
            raise ShardError(
                f"{_where(batch, int(rows[0]))} has no finite Teff/log g/[Fe/H]; training "
                "needs labels on every row"
            )
    return batch


def spectra_of(batch: pa.Table, n_pix: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flux (n, n_pix), ivar (n, n_pix), labels (n, 3) float64, NaN where null)."""
    labels = np.stack(
        [
            batch.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
            for c in LABEL_COLUMNS
        ],
        axis=1,
    ) if batch.num_rows else np.zeros((0, len(LABEL_COLUMNS)))  # fmt: skip
    return (
        list_matrix(batch.column("flux"), n_pix),
        list_matrix(batch.column("ivar"), n_pix),
        labels,
    )


@dataclass(frozen=True)
class DegradeConfig:
    """How observations are made from the spectra in the shards.

    Attributes:
        snr: target S/N at the continuum (noise is added up to it; None: no noise added).
        label_scatter: Gaussian scatter of (Teff, log g, [Fe/H]) added to the labels (None:
            labels unchanged).  Use it on noise-free simulated shards, whose labels are the
            true ones; shards of observed spectra already carry observed labels.
        noise_model: ``photon`` or ``flat`` (see :func:`~mendis_ray.spectra.degrade.add_noise`).
        fresh_noise: new noise and scatter every time a batch is produced (every epoch: data
            augmentation); otherwise the draw is a fixed function of ``seed`` and the
            batch's ids, identical every epoch.
        seed: base seed of the fixed draw.
    """

    snr: float | None = 300.0
    label_scatter: tuple[float, float, float] | None = LABEL_SCATTER
    noise_model: str = "photon"
    fresh_noise: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.snr is not None and not (np.isfinite(self.snr) and self.snr > 0):
            raise ValueError(f"DegradeConfig.snr must be finite and > 0 or None, got {self.snr}")
        if self.noise_model not in ("photon", "flat"):
            raise ValueError(f"DegradeConfig.noise_model: photon or flat, got {self.noise_model!r}")


def _normals(batch: pa.Table, n: int, cfg: DegradeConfig) -> np.ndarray:
    """(rows, n) standard normals.  Fixed draws are a function of (seed, spectrum id)
    alone, so they do not depend on how the data are split into blocks or workers."""
    rows = batch.num_rows
    if cfg.fresh_noise:
        rng = np.random.default_rng(secrets.randbits(63))
        return rng.standard_normal((rows, n), dtype=np.float32)
    z = np.empty((rows, n), np.float32)
    for i, rid in enumerate(batch.column("id").to_pylist()):
        key = [cfg.seed & 0xFFFFFFFFFFFFFFFF, zlib.crc32(str(rid).encode())]
        np.random.Generator(np.random.Philox(key=key)).standard_normal(
            n, dtype=np.float32, out=z[i]
        )
    return z


def degrade_batch(batch: pa.Table, n_pix: int, cfg: DegradeConfig) -> pa.Table:
    """Noise up to ``cfg.snr`` and label scatter on one batch; other columns unchanged
    (``snr`` becomes the target S/N where noise was added)."""
    if batch.num_rows == 0 or (cfg.snr is None and cfg.label_scatter is None):
        return batch
    flux, ivar, labels = spectra_of(batch, n_pix)
    z = _normals(batch, n_pix + labels.shape[1], cfg)  # (n, n_pix + 3)
    if cfg.snr is not None:
        snr_in = batch.column("snr").to_numpy(zero_copy_only=False).astype(np.float32)
        flux, ivar = degrade_to_snr(
            flux, ivar, cfg.snr, None, cfg.noise_model, z=z[:, :n_pix], snr_in=snr_in
        )
        batch = batch.set_column(batch.column_names.index("flux"), "flux", matrix_column(flux))
        batch = batch.set_column(batch.column_names.index("ivar"), "ivar", matrix_column(ivar))
        old = batch.column("snr").to_numpy(zero_copy_only=False).astype(np.float32)
        snr = np.minimum(np.nan_to_num(old, nan=np.inf), np.float32(cfg.snr))
        batch = batch.set_column(batch.column_names.index("snr"), "snr", pa.array(snr))
    if cfg.label_scatter is not None:
        s = np.asarray(cfg.label_scatter, np.float64)
        labels = labels + z[:, n_pix:].astype(np.float64) * s
        for j, c in enumerate(LABEL_COLUMNS):
            batch = batch.set_column(
                batch.column_names.index(c), c, pa.array(labels[:, j].astype(np.float32))
            )
    return batch


def standardize_batch(
    batch: pa.Table, n_pix: int, mean: np.ndarray, std: np.ndarray
) -> dict[str, np.ndarray]:
    """``{"x": (n, n_pix + 3) float32}`` standardized features; masked pixels (ivar <= 0)
    are set to the training mean (0 after standardization)."""
    flux, ivar, labels = spectra_of(batch, n_pix)
    v = np.concatenate([np.where(ivar > 0, flux, mean[:n_pix]), labels], axis=1)  # (n, d)
    return {"x": ((v - mean) / std).astype(np.float32)}
