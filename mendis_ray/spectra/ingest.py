"""Ingest real APOGEE spectra: apStar/aspcapStar FITS files (read by
:mod:`mendis_ray.spectra.fits`) -> normalized, resampled onto a model grid -> Parquet
shards, with labels from an allStar-like table.

:func:`ingest_apogee` reads and checks every file before it writes anything, and reports
all broken files in one error (:class:`~mendis_ray.spectra.fits.FitsInputError`, whose
message starts with the file's path).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from astropy.io import fits

from mendis_ray.spectra.continuum import pseudo_continuum
from mendis_ray.spectra.fits import (
    MISSING_VALUE,
    FitsInputError,
    prepare_spectrum,
    read_apogee,
)
from mendis_ray.spectra.grid import Grid, paper_grid
from mendis_ray.spectra.shards import make_table, write_dataset

__all__ = ["ingest_apogee", "read_label_ids", "read_label_table"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------


def _column(names: dict[str, str], path: Path, *wanted: str) -> str:
    for w in wanted:
        if w in names:
            return names[w]
    raise FitsInputError(
        f"{path}: label table has no column {' or '.join(wanted)} "
        f"(columns: {', '.join(sorted(names.values())[:30])})"
    )


def _clean_label(values: np.ndarray) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    return np.where(np.isfinite(x) & (x > MISSING_VALUE), x, np.nan)


@contextlib.contextmanager
def _label_table(path: Path) -> Iterator[tuple[object, dict[str, str]]]:
    """(data, {UPPER-CASE name: column name}) of the first binary table of an allStar-like
    FITS file; anything that goes wrong reading it is a FitsInputError naming the file."""
    try:
        with fits.open(path, memmap=True) as hdul:
            tables = [h for h in hdul if isinstance(h, fits.BinTableHDU)]
            if not tables:
                raise FitsInputError(f"{path}: no binary table HDU (not an allStar-like file)")
            data = tables[0].data
            yield data, {n.upper(): n for n in data.columns.names}
    except FitsInputError:
        raise
    except Exception as err:
        raise FitsInputError(
            f"{path}: not a readable FITS table: {type(err).__name__}: {err}"
        ) from err


def read_label_table(path: str | os.PathLike) -> dict[str, tuple[float, float, float]]:
    """ASPCAP labels by APOGEE id from an allStar-like FITS binary table.

    Reads the first binary-table HDU's ``APOGEE_ID``, ``TEFF``, ``LOGG`` and ``FE_H``
    (``M_H`` when there is no ``FE_H``); column names are matched case-insensitively.
    -9999 (any value <= -9990) and NaN become NaN.  A star listed more than once keeps its
    first row with any finite label.

    Returns:
        {apogee_id: (teff, logg, feh)}.

    Raises:
        FitsInputError naming the file: unreadable, no table, or a missing column.
    """
    path = Path(path)
    if not path.is_file():
        raise FitsInputError(f"{path}: no such file")
    with _label_table(path) as (data, names):
        cols = [
            _column(names, path, "APOGEE_ID"),
            _column(names, path, "TEFF"),
            _column(names, path, "LOGG"),
            _column(names, path, "FE_H", "M_H"),
        ]
        ids = np.char.strip(np.asarray(data[cols[0]]).astype(str))
        labels = np.stack([_clean_label(data[c]) for c in cols[1:]], axis=1)
    out: dict[str, tuple[float, float, float]] = {}
    for star, row in zip(ids.tolist(), labels.tolist(), strict=True):
        if star not in out or (np.all(np.isnan(out[star])) and not np.all(np.isnan(row))):
            out[star] = (row[0], row[1], row[2])
    log.info("read %d labelled stars (%d rows) from %s", len(out), ids.size, path)
    return out


def _is_id_column(name: str) -> bool:
    """An identifier column of an allStar-like table (SDSS_ID, CATALOGID,
    GAIAEDR3_SOURCE_ID, TARGET_ID, ...), APOGEE_ID itself excluded."""
    low = name.lower()
    return low != "apogee_id" and (low.endswith("_id") or low == "catalogid")


def read_label_ids(path: str | os.PathLike) -> dict[str, dict[str, object]]:
    """The identifier columns of an allStar-like table by APOGEE id (the star's first
    row): ``{apogee_id: {column (lower case): value}}``, integers as Python ints (64-bit
    ids survive), text stripped.  Scalar columns only; see :func:`_is_id_column`."""
    path = Path(path)
    with _label_table(path) as (data, names):
        apogee = np.char.strip(np.asarray(data[_column(names, path, "APOGEE_ID")]).astype(str))
        cols = {n.lower(): np.asarray(data[n]) for n in data.columns.names
                if _is_id_column(n) and np.asarray(data[n]).ndim == 1}  # fmt: skip
    out: dict[str, dict[str, object]] = {}
    for i, star in enumerate(apogee.tolist()):
        if star not in out:
            out[star] = {c: (v[i].strip() if isinstance(v[i], str) else v[i].item())
                         for c, v in ((c, v.astype(str) if v.dtype.kind in "SU" else v)
                                      for c, v in cols.items())}  # fmt: skip
    return out


def _id_arrays(part: list[_Row], ids: dict[str, dict[str, object]] | None) -> dict[str, pa.Array]:
    """The label table's identifier columns for these rows (null where a star is absent):
    integer columns stay int64, others are text."""
    names = sorted({c for v in (ids or {}).values() for c in v})
    out = {}
    for c in names:
        vals = [(ids or {}).get(r.apogee_id or r.id, {}).get(c) for r in part]
        ints = all(v is None or isinstance(v, int) for v in vals)
        out[c] = pa.array(vals if ints else [None if v is None else str(v) for v in vals],
                          type=pa.int64() if ints else pa.string())  # fmt: skip
    return out


# --------------------------------------------------------------------------------------
# Ingest
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Row:
    id: str
    flux: np.ndarray
    ivar: np.ndarray
    snr: float
    source: str
    vhelio: float
    rv: tuple[float, float, float]
    file: str
    apogee_id: str = ""
    telescope: str = ""
    field: str = ""


def _ingest_one(path: Path, grid: Grid, row: int) -> _Row:
    spec = read_apogee(path, row=row)
    flux, ivar = prepare_spectrum(spec, grid)
    n_good = int(np.count_nonzero(ivar > 0))
    if n_good == 0:
        raise FitsInputError(f"{path}: no good pixel left on grid {grid.name!r}")
    log.info(
        "read %s: %s %s, snr %.1f, %d/%d good pixels on grid %s",
        path.name,
        spec.source,
        spec.id,
        spec.snr,
        n_good,
        grid.n_pix,
        grid.name,
    )
    return _Row(
        id=spec.id,
        flux=flux,
        ivar=ivar,
        snr=spec.snr,
        source=spec.source,
        vhelio=spec.vhelio,
        rv=(spec.rv_teff, spec.rv_logg, spec.rv_feh),
        file=path.name,
        apogee_id=spec.id,
        telescope=spec.telescope,
        field=spec.field,
    )


def _read_all(paths: list[Path], grid: Grid, row: int) -> list[_Row]:
    """Read every file; raise one FitsInputError listing every bad file."""
    rows: list[_Row] = []
    errors: list[str] = []
    for p in paths:
        try:
            rows.append(_ingest_one(p, grid, row))
        except FitsInputError as err:
            log.error("%s", err)
            errors.append(str(err))
    seen: dict[str, str] = {}
    for r in rows:
        if r.id in seen:
            errors.append(f"{r.file}: APOGEE id {r.id!r} already read from {seen[r.id]}")
        seen.setdefault(r.id, r.file)
    if errors:
        raise FitsInputError(
            f"{len(errors)} of {len(paths)} input file(s) unusable, nothing written:\n  "
            + "\n  ".join(errors)
        )
    return rows


def _tables(
    rows: list[_Row],
    labels: dict[str, tuple[float, float, float]] | None,
    n_shards: int,
    ids: dict[str, dict[str, object]] | None = None,
) -> Iterator[pa.Table]:
    nan3 = (np.nan, np.nan, np.nan)
    for chunk in np.array_split(np.arange(len(rows)), n_shards):
        part = [rows[i] for i in chunk]
        lab = np.array([(labels or {}).get(r.id, nan3) for r in part], dtype=np.float64)
        rv = np.array([r.rv for r in part], dtype=np.float64)
        yield make_table(
            [r.id for r in part],
            np.stack([r.flux for r in part]),
            np.stack([r.ivar for r in part]),
            teff=lab[:, 0],
            logg=lab[:, 1],
            feh=lab[:, 2],
            snr=np.array([r.snr for r in part], dtype=np.float64),
            source=[r.source for r in part],
            extra={
                "rv_teff": rv[:, 0],
                "rv_logg": rv[:, 1],
                "rv_feh": rv[:, 2],
                "vhelio": np.array([r.vhelio for r in part], dtype=np.float64),
                "file": [r.file for r in part],
                "apogee_id": [r.apogee_id for r in part],
                "telescope": [r.telescope for r in part],
                "field": [r.field for r in part],
                **_id_arrays(part, ids),
            },
        )


def ingest_apogee(
    paths: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    grid: Grid | None = None,
    labels_path: str | os.PathLike | None = None,
    n_shards: int = 1,
    prefix: str = "apogee",
    *,
    row: int = 0,
) -> list[Path]:
    """Read apStar/aspcapStar files, normalize, resample and write them as a dataset.

    Each file is read (:func:`read_apogee`, ``row`` for apStar files), apStar flux is
    divided by its :func:`pseudo_continuum`, and the spectrum is resampled onto ``grid``
    (default :func:`paper_grid`) with :func:`resample` (bad pixels: ivar 0, flux 1.0).
    Labels (teff, logg, feh) come from ``labels_path`` (:func:`read_label_table`) by
    APOGEE id, else they are null; the table's identifier columns (``sdss_id``,
    ``catalogid``, ``gaiaedr3_source_id``, ... :func:`read_label_ids`) are carried as
    extra columns, untouched (int64 ids stay int64).  Header ``RV_TEFF``/``RV_LOGG``/
    ``RV_FEH`` (Doppler template values, not ASPCAP labels) go to the extra columns
    ``rv_teff``, ``rv_logg``, ``rv_feh``; ``vhelio``, ``file`` and the identifiers
    ``apogee_id``, ``telescope`` and ``field`` (see :class:`ApStarSpectrum`) are stored
    too; ``snr`` is the header S/N and ``source`` is ``'apStar'`` or ``'aspcapStar'``.

    All files are read and checked before anything is written.

    Returns:
        the shard paths written by :func:`write_dataset`.

    Raises:
        FitsInputError listing every unusable file (or the broken label table);
        ValueError for no input or ``n_shards`` outside 1..number of files.
    """
    grid = paper_grid() if grid is None else grid
    files = [Path(p) for p in paths]
    if not files:
        raise ValueError("ingest_apogee: no input files")
    if not 1 <= n_shards <= len(files):
        raise ValueError(f"ingest_apogee: n_shards = {n_shards}, must be 1..{len(files)}")
    labels = read_label_table(labels_path) if labels_path is not None else None
    ids = read_label_ids(labels_path) if labels_path is not None else None
    rows = _read_all(files, grid, row)
    if labels is not None:
        missing = [r.id for r in rows if r.id not in labels]
        if missing:
            log.warning(
                "%d star(s) not in %s, labels null: %s",
                len(missing),
                labels_path,
                ", ".join(missing[:10]),
            )
    generator = {
        "name": "mendis_ray.spectra.fits.ingest_apogee",
        "n_files": len(files),
        "files": [f.name for f in files],
        "labels": None if labels_path is None else str(labels_path),
        "row": row,
        "continuum": {"method": "chebyshev-asymmetric-clip", **pseudo_continuum.__kwdefaults__},
    }
    return write_dataset(
        out_dir, _tables(rows, labels, n_shards, ids), n_shards, grid, generator, prefix=prefix
    )
