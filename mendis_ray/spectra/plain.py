"""Plain Parquet files: spectra written by pandas, pyarrow or DuckDB without our metadata.

A shard (:mod:`mendis_ray.spectra.shards`) carries its pixel grid and a fixed schema; a
user's own file carries neither.  Such a file is read when its rows hold as many pixels as
a grid this package knows (2405: paper, 7214: ASPCAP, 8575: apStar), and its columns are
brought to the shard schema here, the same way on every path (``mendis train``'s reader,
``mendis score``'s Ray Data batches):

- column names match case-insensitively, and ``t_eff``, ``log_g``, ``fe_h`` name the labels
  (``TEFF``, ``LOGG``, ``FE_H``, ``SNR``: an APOGEE allStar's);
- a label or ``snr`` column that is absent reads as null (unknown); numbers, text numbers
  and all-null columns become float32; ids become text;
- a masked pixel may be marked with NaN: NaN ivar is ivar 0, and a non-finite flux where
  ivar is 0 becomes the placeholder 1 (its flux carries no information).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mendis_ray.spectra.grid import GRID_NAMES, Grid, grid_text
from mendis_ray.spectra.schema import (
    META_KEY,
    OPTIONAL_COLUMNS,
    SHARD_COLUMNS,
    ShardError,
    list_matrix,
    matrix_column,
)

__all__ = [
    "clean_masked",
    "column_map",
    "first_length",
    "is_empty_plain",
    "known_grid",
    "matrices",
    "normalize_columns",
    "plain_grid",
    "warn_renames",
]

log = logging.getLogger(__name__)

ALIASES = {"teff": ("t_eff",), "logg": ("log_g",), "feh": ("fe_h",)}
_warned: set[str] = set()  # warnings given once per process: a catalog has many files


@functools.cache
def _grids_by_size() -> dict[int, str]:
    return {get().n_pix: name for name, get in GRID_NAMES.items()}


def known_grid(n_pix: int | None) -> Grid | None:
    """The grid this package knows with ``n_pix`` pixels, or None."""
    name = _grids_by_size().get(n_pix)
    return None if name is None else GRID_NAMES[name]()


def plain_grid(schema: pa.Schema, where: str, n_pix: int | None) -> Grid:
    """The known grid of a plain file's rows: the fixed list size of its ``flux`` column,
    else ``n_pix`` (its first row's length, :func:`first_length`)."""
    name = column_map(schema.names).get("flux")
    if name is None:
        raise ShardError(f"{where}: missing required column(s) ['flux']")
    t = schema.field(name).type
    n_pix = t.list_size if pa.types.is_fixed_size_list(t) else n_pix
    if n_pix is None:
        raise ShardError(
            f"{where}: a plain Parquet file (no 'mendis_ray' metadata) with no flux row to "
            "tell its pixel grid from (no rows, or every flux null); leave it out"
        )
    grid = known_grid(n_pix)
    if grid is None:
        known = ", ".join(f"{n} ({g})" for n, g in _grids_by_size().items())
        raise ShardError(
            f"{where}: no 'mendis_ray' file metadata (the pixel grid), and rows of {n_pix} "
            f"pixels match no grid this package knows ({known}); write shards with "
            "mendis_ray.spectra.shards.write_dataset(folder, [make_table(ids, flux, ivar, "
            "teff=..., logg=..., feh=...)], 1, grid_from_wavelength(wavelength)) (README: "
            "'Your own spectra'), or read APOGEE FITS files with mendis ingest apogee"
        )
    _warn_once(
        f"grid {grid.name}",
        f"{where}: a plain Parquet file (no 'mendis_ray' metadata): its rows of {n_pix} pixels "
        f"are read as the {grid.name} grid ({grid_text(grid)}); if they are not, write shards "
        "with their wavelengths (README: 'Your own spectra')",
    )
    return grid


def is_empty_plain(pf: pq.ParquetFile) -> bool:
    """A plain file (no ``mendis_ray`` metadata) without rows: nothing to read, and no row
    to tell its grid from; readers leave it out with a warning."""
    return pf.metadata.num_rows == 0 and META_KEY not in (pf.schema_arrow.metadata or {})


def first_length(pf: pq.ParquetFile, column: str) -> int | None:
    """Length of the first non-null row of a list column (None: no such row), reading
    row groups until one has it."""
    for i in range(pf.num_row_groups):
        n = table_first_length(pf.read_row_group(i, columns=[column]).column(0))
        if n is not None:
            return n
    return None


def table_first_length(col: pa.ChunkedArray) -> int | None:
    """:func:`first_length` of a table's list column (its chunks as they are: no copy)."""
    for chunk in col.chunks:
        valid = np.flatnonzero(chunk.is_valid().to_numpy(zero_copy_only=False))
        if valid.size:
            return len(chunk[int(valid[0])])
    return None


def column_map(names: Iterable[str]) -> dict[str, str]:
    """Shard column -> the file's column that holds it: the exact name first, else a
    case-insensitive match or an alias (:data:`ALIASES`)."""
    names = list(names)
    out = {}
    for want in SHARD_COLUMNS:
        if want in names:
            out[want] = want
            continue
        accept = {want, *ALIASES.get(want, ())}
        found = [n for n in names if n.lower() in accept and n not in SHARD_COLUMNS]
        if found:
            out[want] = found[0]
    return out


def normalize_columns(table: pa.Table, where: str = "table", warn: bool = True) -> pa.Table:
    """``table`` in the shard schema (see the module docstring): columns renamed (a
    warning once per process unless ``warn`` is False: Ray workers leave it to the
    driver, :func:`warn_renames`), absent optional ones null, labels float32, ids text,
    shard columns first, pandas' schema metadata dropped (it describes the columns
    before these changes)."""
    renames = warn_renames(table.column_names, where) if warn else _renames(table.column_names)
    if renames:
        table = table.rename_columns([renames.get(n, n) for n in table.column_names])
    for name in OPTIONAL_COLUMNS:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, type=pa.float32()))
        elif table.schema.field(name).type != pa.float32():
            table = _set(table, name, _as_float32(table.column(name), f"{where}: column {name!r}"))
    if "id" in table.column_names and table.schema.field("id").type != pa.string():
        table = _set(table, "id", table.column("id").cast(pa.string()))
    for f in table.schema:  # pandas' pyarrow strings are large: one type for every file
        if pa.types.is_large_string(f.type):
            table = _set(table, f.name, table.column(f.name).cast(pa.string()))
    kv = {k: v for k, v in (table.schema.metadata or {}).items() if k != b"pandas"}
    first = [c for c in SHARD_COLUMNS if c in table.column_names]
    table = table.select(first + [c for c in table.column_names if c not in first])
    return table.replace_schema_metadata(kv or None)


def _renames(names: Iterable[str]) -> dict[str, str]:
    return {actual: want for want, actual in column_map(names).items() if actual != want}


def warn_renames(names: Iterable[str], where: str) -> dict[str, str]:
    """The renames :func:`normalize_columns` makes (file name -> shard name), with a
    warning once per process for each set of them."""
    renames = _renames(names)
    if renames:
        _warn_once(f"rename {sorted(renames.items())}", f"{where}: column(s) read as {renames}")
    return renames


def _as_float32(col: pa.ChunkedArray, where: str) -> pa.ChunkedArray:
    t, types = col.type, pa.types
    kinds = (types.is_integer, types.is_floating, types.is_decimal, types.is_null,
             types.is_string, types.is_large_string)  # fmt: skip
    if not any(kind(t) for kind in kinds):
        raise ShardError(f"{where} must hold numbers, is {t}")
    try:
        return col.cast(pa.float32())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise ShardError(f"{where} must hold numbers ({err})") from None


def _set(table: pa.Table, name: str, col: pa.ChunkedArray | pa.Array) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, col)


def matrices(table: pa.Table, n_pix: int, where: str) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """(table, flux, ivar (n, n_pix) float32) of a table in the shard schema, each row's
    length checked, and masked pixels made uniform (:func:`clean_masked`): a null flux or
    ivar row is a spectrum without data (every pixel masked).  The table's columns are
    rebuilt only where something changed."""
    ids = table.column("id")
    flux, fnull = _matrix(table.column("flux"), n_pix, f"{where}: column 'flux'", ids)
    ivar, inull = _matrix(table.column("ivar"), n_pix, f"{where}: column 'ivar'", ids)
    if fnull.any() or inull.any():
        flux, ivar = flux.copy(), ivar.copy()  # zero-copy views of Arrow memory are read-only
        flux[fnull | inull], ivar[fnull | inull] = 1.0, 0.0
        table = _set(_set(table, "flux", matrix_column(flux)), "ivar", matrix_column(ivar))
    return clean_masked(table, flux, ivar)


def _matrix(col: pa.ChunkedArray, n_pix: int, where: str, ids) -> tuple[np.ndarray, np.ndarray]:
    """(matrix (n, n_pix), null rows (n,) bool) of a list column; null rows NaN."""
    col = col.combine_chunks()
    null = col.is_null().to_numpy(zero_copy_only=False)
    if not null.any():
        return list_matrix(col, n_pix, where, ids), null
    out = np.full((len(col), n_pix), np.nan, np.float32)
    keep = pa.array(~null)
    out[~null] = list_matrix(col.filter(keep), n_pix, where, ids.filter(keep))
    return out, null


def clean_masked(
    table: pa.Table, flux: np.ndarray, ivar: np.ndarray
) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """NaN ivar -> 0 and non-finite flux where ivar is 0 -> 1, in ``table`` and in its
    (n, n_pix) ``flux`` and ``ivar``.  One pass over each when all is finite; a column is
    rebuilt only where something changed."""
    if np.isnan(ivar).any():
        ivar = np.where(np.isnan(ivar), np.float32(0), ivar)
        table = _set(table, "ivar", matrix_column(ivar))
    if not np.isfinite(flux).all():
        fill = ~np.isfinite(flux) & (ivar == 0)
        if fill.any():
            flux = np.where(fill, np.float32(1), flux)
            table = _set(table, "flux", matrix_column(flux))
    return table, flux, ivar


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning("%s", message)
