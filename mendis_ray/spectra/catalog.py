"""A catalog's inputs for batch scoring: Parquet shards and APOGEE FITS files.

``mendis score`` accepts shard files, dataset folders, apStar/aspcapStar FITS files and
folders of them; :func:`split_inputs` sorts them, :func:`ingest_fits` turns the FITS
files into shards on the model's grid, :func:`common_scalar_columns` names the input
columns a scores table carries along.  No Ray, no torch.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mendis_ray.spectra.grid import Grid
from mendis_ray.spectra.plain import column_map
from mendis_ray.spectra.shards import SHARD_COLUMNS, ShardError

__all__ = [
    "FITS_SUFFIXES",
    "common_scalar_columns",
    "find_duplicate_ids",
    "ingest_fits",
    "is_fits",
    "split_inputs",
]

log = logging.getLogger(__name__)

FITS_SUFFIXES = (".fits", ".fit", ".fits.gz", ".fit.gz")


def is_fits(p: Path) -> bool:
    """Whether ``p`` is named like a FITS file (case-insensitive, gzip allowed)."""
    return p.name.lower().endswith(FITS_SUFFIXES)


def split_inputs(inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[Path]]:
    """(Parquet files/folders, FITS files) of the inputs; a folder holding FITS files and
    no Parquet counts as its FITS files."""
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    parquet, fits_files = [], []
    for p in map(Path, inputs):
        if p.is_file() and is_fits(p):
            fits_files.append(p)
        elif p.is_dir() and not any(p.glob("*.parquet")) and not (p / "_manifest.json").exists():
            found = sorted(f for f in p.iterdir() if f.is_file() and is_fits(f))
            if not found:
                raise ShardError(f"{p}: folder holds no .parquet or FITS files")
            fits_files += found
        else:
            parquet.append(p)  # list_shards names what is missing or wrong
    return parquet, fits_files


def ingest_fits(
    fits_files: Sequence[Path],
    out_dir: Path,
    grid: Grid,
    *,
    labels_path: str | os.PathLike | None = None,
    n_shards: int | None = None,
) -> list[Path]:
    """APOGEE FITS -> shards on ``grid`` in ``out_dir`` (replacing an earlier ingest
    there; see :func:`~mendis_ray.spectra.ingest.ingest_apogee`); default about 1,000
    spectra per shard."""
    from mendis_ray.spectra.ingest import ingest_apogee

    n = len(fits_files)
    n_shards = min(n, max(1, n_shards or math.ceil(n / 1000)))
    log.info("ingesting %d FITS file(s) into %s (%d shard(s))", n, out_dir, n_shards)
    return ingest_apogee(
        list(fits_files), out_dir, grid=grid, labels_path=labels_path, n_shards=n_shards
    )


def find_duplicate_ids(files: Sequence[Path]) -> None:
    """Raise :class:`ShardError` naming the file (and the earlier file) and the id of the
    first spectrum id that occurs twice in ``files`` (the ``id`` columns only are read):
    every output row, the outlier table and the gallery are keyed by id."""
    seen: dict[str, Path] = {}
    for f in map(Path, files):
        for i in pq.read_table(f, columns=["id"]).column("id").to_pylist():
            key = str(i)
            if key in seen:
                where = "earlier in the same file" if seen[key] == f else f"also in {seen[key]}"
                raise ShardError(
                    f"{f}: spectrum id {key!r} occurs twice ({where}); ids must be unique "
                    "within a catalog (the scores, outlier table and gallery are keyed by id)"
                )
            seen[key] = f


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t)


#: the longest column name a FITS table holds (TTYPEn's value): the outputs' scores.fits
FITS_NAME_MAX = 68


def common_scalar_columns(files: Sequence[Path]) -> list[str]:
    """Non-list columns present in every shard, other than the shard columns (id,
    labels, snr) and ``path`` (read from the footers only), that every output can hold:
    not nested (a struct, a map) nor bytes, and named in at most ``FITS_NAME_MAX``
    characters.  Those are left out with one warning naming them: they failed the run
    after scoring, in the CSV or FITS writer."""
    common: list[str] | None = None
    types: dict[str, pa.DataType] = {}
    for f in files:
        schema = pq.read_schema(f)
        names = [fld.name for fld in schema if not _is_list(fld.type)]
        common = names if common is None else [c for c in common if c in names]
        types = {fld.name: fld.type for fld in schema} | types  # the first shard's type
    shard = set(SHARD_COLUMNS) | set(column_map(common or []).values())  # TEFF for teff
    keep, left = [], []
    for c in (c for c in common or [] if c not in shard and c != "path"):
        why = _why_not_carried(c, types[c])
        if why:
            left.append(f"{c!r} ({why})")
        else:
            keep.append(c)
    if left:
        log.warning("input columns not copied to the scores: %s", ", ".join(left))
    return keep


def _why_not_carried(name: str, t: pa.DataType) -> str | None:
    """Why the outputs cannot hold the scalar input column ``name`` of type ``t``, or None."""
    if len(name) > FITS_NAME_MAX:
        return f"a name of {len(name)} characters; FITS holds {FITS_NAME_MAX}"
    binary = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_fixed_size_binary)
    if pa.types.is_nested(t) or any(kind(t) for kind in binary):
        return f"type {t}: the CSV and FITS outputs hold no nested or binary values"
    return None
