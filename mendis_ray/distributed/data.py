"""Ray Data pipelines: Parquet shards -> validate -> degrade -> standardize -> workers.

Every per-batch step is a plain function of :mod:`mendis_ray.spectra.batches` mapped over
Ray Data blocks, so the pipeline streams: blocks are read, degraded and consumed while
later files are still on disk, and memory stays bounded by the object store, not the
catalog size.

Typical use (what :mod:`mendis_ray.distributed.train` does)::

    files = list_shards("mendis_out/demo/train")
    meta = check_shards(files, grid)                      # fails fast, naming the shard
    train_files, val_files = split_files(files, 0.1)
    train = check_shards(train_files, meta.grid)
    stats = compute_moments(degrade(read_spectra(train), train.n_pix, cfg), train.n_pix)
    ds = standardize(degrade(read_spectra(train), train.n_pix, cfg_fresh), train.n_pix,
                     stats.standardizer)
    # -> TorchTrainer(datasets={"train": ds, ...}); in the worker:
    #    ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=...)["x"]
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mendis_ray.flow.density import Standardizer
from mendis_ray.spectra.batches import (
    DegradeConfig,
    degrade_batch,
    spectra_of,
    standardize_batch,
    validate_batch,
)
from mendis_ray.spectra.grid import Grid, grid_text, same_grid
from mendis_ray.spectra.plain import column_map, is_empty_plain, warn_renames
from mendis_ray.spectra.shards import (
    CRC_FAILED,
    REQUIRED_COLUMNS,
    SHARD_COLUMNS,
    ShardError,
    damaged_error,
    dataset_files,
    file_metadata,
)

__all__ = [
    "DegradeConfig",
    "Moments",
    "ShardSet",
    "check_shards",
    "compute_moments",
    "degrade",
    "list_shards",
    "named_errors",
    "read_spectra",
    "split_files",
    "standardize",
    "to_numpy",
]

log = logging.getLogger(__name__)

#: CPUs per map task: fractional so read/map tasks always find a CPU beside train workers
#: (a task needing a whole CPU can wait forever on a 2-CPU node; see ray-notes.md).
MAP_NUM_CPUS = 0.5


_KNOWN_ERRORS = ("ShardError", "CheckpointError", "FitsInputError")


@contextlib.contextmanager
def named_errors(files: Sequence[Path]) -> Iterator[None]:
    """Run a Ray Data pipeline over ``files`` so that a bad input stops it with one clear
    error naming the file: a ShardError (or CheckpointError) raised in a task or actor is
    raised again as itself (Ray wraps it and keeps only its text); a read task's CRC
    failure, which does not know its file, is traced to it (:func:`damaged_error`); Ray
    Data's own report of the failed task (~300 lines) goes to its log file."""
    from mendis_ray.distributed.session import ray_data_errors_to_log_file

    try:
        with ray_data_errors_to_log_file():
            yield
    except Exception as err:
        _raise_named(err)
        if CRC_FAILED in str(err):
            raise damaged_error(files, err) from None
        raise


def _raise_named(err: BaseException) -> None:
    """Re-raise the last ShardError/CheckpointError named in ``err``'s text as itself."""
    from mendis_ray.flow.checkpoint import CheckpointError

    pattern = r"^(?:[\w.]+\.)?(" + "|".join(_KNOWN_ERRORS) + r"): (.+)$"
    named = list(re.finditer(pattern, str(err), flags=re.M))
    if not named:
        return
    found = named[-1]  # the innermost
    cls = {"ShardError": ShardError, "CheckpointError": CheckpointError}.get(found[1], ShardError)
    raise cls(found[2].strip()) from err


def list_shards(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The Parquet shards of one or more dataset folders or files, in a stable order; a
    file reached twice (a folder given twice, or with one of its own files) once, with a
    warning."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    files: list[Path] = []
    for p in paths:  # absolute: Ray tasks and workers may run in another directory
        files += [f.resolve() for f in dataset_files(p)]
    if not files:
        raise ShardError(f"no Parquet shards under {[str(p) for p in paths]}")
    unique = list(dict.fromkeys(files))
    if len(unique) < len(files):
        twice = [f for f in unique if files.count(f) > 1]
        log.warning("%d shard file(s) given more than once (first: %s): each is read once",
                    len(twice), twice[0])  # fmt: skip
    return unique


@dataclass(frozen=True)
class ShardSet:
    """Shards checked against one grid: ``files``, rows per file, the grid description,
    and per file its names of the shard columns it holds (``TEFF`` for ``teff`` in a plain
    file, :func:`~mendis_ray.spectra.plain.column_map`; absent labels/``snr`` read as null)."""

    files: tuple[Path, ...]
    rows: tuple[int, ...]
    grid: dict = field(hash=False)
    columns: tuple[tuple[str, ...], ...] = field(hash=False)

    @property
    def n_pix(self) -> int:
        return int(self.grid["n_pix"])

    @property
    def n_rows(self) -> int:
        return int(sum(self.rows))

    @property
    def n_bytes(self) -> int:
        return int(sum(f.stat().st_size for f in self.files))


def check_shards(files: Sequence[str | os.PathLike], grid: Grid | dict | None = None) -> ShardSet:
    """Check every shard's schema and metadata before any data is read (cheap: footers
    only): readable Parquet, schema version, the required columns, one grid for all (and
    ``grid`` if given).  Raises :class:`ShardError` naming the bad shard."""
    want = grid.describe() if isinstance(grid, Grid) else grid
    rows, first, columns, kept = [], None, [], []
    for f in map(Path, files):
        try:
            pf = pq.ParquetFile(f)
        except Exception as err:  # pyarrow raises several types for broken files
            raise ShardError(f"{f}: not a readable Parquet file ({err})") from err
        if is_empty_plain(pf):  # no rows, and none to tell its grid from
            log.warning("%s: a plain Parquet file without rows; left out", f)
            continue
        kept.append(f)
        have = column_map(pf.schema_arrow.names)  # shard column -> the file's name for it
        warn_renames(pf.schema_arrow.names, str(f))
        missing = [c for c in REQUIRED_COLUMNS if c not in have]
        if missing:
            raise ShardError(f"{f}: missing required column(s) {missing}")
        meta = file_metadata(pf, str(f))
        columns.append(tuple(have[c] for c in SHARD_COLUMNS if c in have))
        g = meta.get("grid", {})
        ref = want or first
        if ref is not None and not same_grid(g, ref):
            raise ShardError(
                f"{f}: shard grid {grid_text(g)} does not match "
                f"{'the model' if want else 'the first shard'}'s grid {grid_text(ref)}"
            )
        first = first or g
        rows.append(pf.metadata.num_rows)
    if first is None:
        named = ", ".join(map(str, files[:3]))
        raise ShardError(
            f"no spectra: the {len(files)} input file(s) hold no rows ({named})"
            if files else "check_shards: no files given"
        )  # fmt: skip
    return ShardSet(tuple(kept), tuple(rows), want or first, tuple(columns))


def split_files(files: Sequence[Path], val_fraction: float) -> tuple[list[Path], list[Path]]:
    """Training and validation shards: the last ``max(1, round(f * n))`` files validate.
    Simulated sets are in random order, so a file split is a random split."""
    files = list(files)
    if len(files) < 2:
        raise ShardError(
            f"a validation split needs at least 2 shards, got {len(files)}; write the training "
            "set with more shards (mendis simulate --shards N)"
        )
    n_val = min(len(files) - 1, max(1, round(val_fraction * len(files))))
    return files[:-n_val], files[-n_val:]


def read_spectra(
    shards: ShardSet,
    *,
    require_labels: bool = False,
    override_num_blocks: int | None = None,
    extra_columns: Sequence[str] = (),
    strict: bool = True,
):
    """A Ray Dataset of the spectra in ``shards`` (already checked by :func:`check_shards`),
    every row validated as it streams (a bad row stops the pipeline with a
    :class:`ShardError` naming the file, the id and the pixel; ``strict=False``, for
    scoring, lets non-finite flux or ivar at good pixels through to the scorer's
    ``nonfinite`` flag).

    Columns: the shard columns, ``extra_columns`` and ``path``."""

    groups: dict[tuple[str, ...], list[Path]] = {}  # files by their shard columns' names
    for f, names in zip(shards.files, shards.columns, strict=True):
        groups.setdefault(names, []).append(f)
    parts = []
    for names, files in groups.items():
        blocks = len(files)
        if override_num_blocks:
            blocks = max(1, round(override_num_blocks * len(files) / len(shards.files)))
        cols = [*names, *extra_columns, "path"]
        parts.append(_read_parquet(files, cols, blocks).map_batches(
            validate_batch,
            batch_format="pyarrow",
            batch_size=None,
            fn_kwargs={"n_pix": shards.n_pix, "require_labels": require_labels, "strict": strict},
            num_cpus=MAP_NUM_CPUS,
        ))  # fmt: skip
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def _read_parquet(files: Sequence[Path], cols: list[str], blocks: int):
    """``ray.data.read_parquet`` of ``files``, one read task per file, ``cols`` only."""
    import pyarrow.dataset as pds
    import ray

    # Ray 2.60's default Parquet reader (DataSource V2) packs files into ~128 MB read
    # tasks, ignoring override_num_blocks, behind a ListFiles task: measured on 4,000
    # spectra in 8 shards, one read task and 4.9 s per pass (818 spectra/s) against 0.9 s
    # (4,600 spectra/s) with the V1 reader, one task per shard (bench/bench_data.py).
    # Shards are already sized for one task each, so read them with V1.
    ctx = ray.data.DataContext.get_current()
    v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    # pages' CRC checksums verified (shards.read_shard's reading); the buffered stream and
    # its 8 MiB buffer are what Ray 2.60 sets when it is not given scan options
    scan = pds.ParquetFragmentScanOptions(
        page_checksum_verification=True, use_buffered_stream=True, buffer_size=8 << 20
    )
    try:
        return ray.data.read_parquet(
            [str(f) for f in files],
            include_paths=True,
            override_num_blocks=blocks,
            num_cpus=MAP_NUM_CPUS,
            fragment_scan_options=scan,
        ).select_columns(cols)
    finally:
        ctx.use_datasource_v2 = v2


def degrade(ds, n_pix: int, cfg: DegradeConfig):
    """Noise to ``cfg.snr`` and label scatter on every batch (see :class:`DegradeConfig`)."""
    return ds.map_batches(
        degrade_batch,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"n_pix": n_pix, "cfg": cfg},
        num_cpus=MAP_NUM_CPUS,
    )


def standardize(ds, n_pix: int, standardizer: Standardizer):
    """Rows -> ``{"x": (n_pix + 3,) float32}`` standardized with the stored statistics."""
    return ds.map_batches(
        standardize_batch,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"n_pix": n_pix, "mean": standardizer.mean, "std": standardizer.std},
        num_cpus=MAP_NUM_CPUS,
    )


@dataclass
class Moments:
    """Streamed statistics of a training set.

    Attributes:
        standardizer: per-feature mean and std of (flux, labels).
        n: rows.  cov: (d, d) 1/n covariance of the standardized features.  mean: (d,) mean
        of the standardized features (0 up to masked pixels).  norm4: sum over rows of
        |x - mean|^4 (Ledoit-Wolf shrinkage).
    """

    standardizer: Standardizer
    n: int
    mean: np.ndarray
    cov: np.ndarray
    norm4: float


def compute_moments(ds, n_pix: int, *, batch_size: int = 1024, min_std: float = 1e-6) -> Moments:
    """Two streaming passes on the driver: per-feature mean/std (masked pixels excluded),
    then the covariance of the standardized features (masked pixels at the mean).

    ``ds`` should be deterministic (``fresh_noise=False``): both passes must see the same
    rows.  Memory: O(d^2) on the driver (46 MB at d = 2408), whatever the row count."""
    d = n_pix + 3
    s1, s2, cnt = np.zeros(d), np.zeros(d), np.zeros(d)
    n = 0
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
        flux, ivar, labels = spectra_of(batch, n_pix)
        v = np.concatenate([flux, labels], axis=1).astype(np.float64)
        good = np.concatenate([ivar > 0, np.isfinite(labels)], axis=1)
        v = np.where(good, v, 0.0)
        s1 += v.sum(axis=0)
        s2 += (v * v).sum(axis=0)
        cnt += good.sum(axis=0)
        n += len(v)
    if n < 2:
        raise ShardError(f"compute_moments: need at least 2 spectra, got {n}")
    if np.any(cnt == 0):
        never = np.flatnonzero(cnt == 0)
        pix, lab = never[never < n_pix], never[never >= n_pix] - n_pix
        raise ShardError(
            f"compute_moments: {len(pix)} pixel(s) (first: {pix[:5].tolist()}) are masked "
            f"(ivar 0) in every training spectrum and label(s) {lab.tolist()} are never "
            "finite; the full-space flow models every pixel, so it cannot learn them: train "
            "the signal-space model (--model signal, the default), which leaves such pixels "
            "out, or give those pixels data"
        )
    mean = s1 / cnt
    std = np.maximum(np.sqrt(np.maximum(s2 / cnt - mean**2, 0.0)), min_std)
    st = Standardizer(mean, std)
    sx, sxx, norm4 = np.zeros(d), np.zeros((d, d)), 0.0
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
        x = standardize_batch(batch, n_pix, mean, std)["x"].astype(np.float64)  # (b, d)
        sx += x.sum(axis=0)
        sxx += x.T @ x
        sq = np.einsum("ij,ij->i", x, x)
        norm4 += float(sq @ sq)
    xm = sx / n
    cov = sxx / n - np.outer(xm, xm)
    log.info("moments of %d spectra x %d features", n, d)
    return Moments(st, n, xm, cov, norm4)


def to_numpy(ds, n_pix: int) -> dict[str, np.ndarray]:
    """Materialize a (small) dataset on the driver: ids, flux, ivar, labels, snr."""
    ids, flux, ivar, labels, snr = [], [], [], [], []
    for batch in ds.iter_batches(batch_size=4096, batch_format="pyarrow"):
        f, i, lab = spectra_of(batch, n_pix)
        ids.append(np.asarray(batch.column("id").to_pylist(), dtype=object))
        flux.append(f)
        ivar.append(i)
        labels.append(lab)
        snr.append(batch.column("snr").to_numpy(zero_copy_only=False).astype(np.float32))
    if not flux:
        return {
            "ids": np.zeros(0, object), "flux": np.zeros((0, n_pix), np.float32),
            "ivar": np.zeros((0, n_pix), np.float32), "labels": np.zeros((0, 3)),
            "snr": np.zeros(0, np.float32),
        }  # fmt: skip
    return {
        "ids": np.concatenate(ids),
        "flux": np.concatenate(flux),
        "ivar": np.concatenate(ivar),
        "labels": np.concatenate(labels),
        "snr": np.concatenate(snr),
    }
