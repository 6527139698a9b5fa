"""Parquet shards: the on-disk form of a set of spectra, one row per spectrum.

Schema (version 1)
------------------
======================  ==========================================  =====================
column                  type                                        meaning
======================  ==========================================  =====================
``id``                  string (not null, unique within a shard)    spectrum identifier
``flux``                fixed_size_list<float32>[n_pix]             normalized flux
``ivar``                fixed_size_list<float32>[n_pix]             inverse variance, 0 = bad
``teff``                float32, nullable (optional)                observed Teff (K)
``logg``                float32, nullable (optional)                observed log g (cgs)
``feh``                 float32, nullable (optional)                observed [Fe/H]
``snr``                 float32, nullable (optional)                signal-to-noise ratio
``source``              string                                      simulator / emulator /
                                                                    apStar / aspcapStar ...
``truth_*``             float32 / string (optional)                 simulated ground truth
======================  ==========================================  =====================

Flux at a pixel with ``ivar == 0`` is a finite placeholder and carries no information.

File metadata (key ``mendis_ray``, JSON): ``schema_version``, ``grid`` (name, n_pix, hash,
wavelength range), ``generator`` (what made the rows and with which parameters), and the
full pixel wavelengths under the key ``mendis_ray.wavelength`` (float64 bytes), so a shard
is self-describing for any Arrow tool (pyarrow, pandas, DuckDB) without this package.

A plain Parquet file (no ``mendis_ray`` metadata) is read too when its rows hold as many
pixels as a grid this package knows (2405: paper, 7214: ASPCAP, 8575: apStar), with a
warning; a label or ``snr`` column it lacks reads as null (unknown).

Writes are atomic: every file is written under a temporary name in the target folder and
renamed into place; a dataset's ``_manifest.json`` is written last.  Rewriting a dataset
folder removes the shards of the previous write that the new one does not replace.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mendis_ray.atomic import json_default, write_atomic, write_json_atomic
from mendis_ray.spectra.grid import GRID_NAMES, Grid, grid_text, same_grid

__all__ = [
    "LABEL_COLUMNS",
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "SCHEMA_VERSION",
    "SHARD_COLUMNS",
    "ShardError",
    "SpectraArrays",
    "dataset_files",
    "file_metadata",
    "fill_masked_nonfinite",
    "fill_optional_columns",
    "list_matrix",
    "make_table",
    "matrix_column",
    "read_dataset",
    "read_shard",
    "schema_metadata",
    "shard_metadata",
    "table_arrays",
    "write_dataset",
    "write_shard",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
META_KEY = b"mendis_ray"
WAVE_KEY = b"mendis_ray.wavelength"
LABEL_COLUMNS = ("teff", "logg", "feh")
REQUIRED_COLUMNS = ("id", "flux", "ivar")
OPTIONAL_COLUMNS = (*LABEL_COLUMNS, "snr")  # float32; null (unknown) where a file lacks them
SHARD_COLUMNS = (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)
MANIFEST = "_manifest.json"
WRITING = "_writing"  # present while write_dataset runs; left behind if it is interrupted
_SHARD_RE = re.compile(r"^(?P<prefix>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.parquet$")


class ShardError(ValueError):
    """A shard that is not what the reader expects; the message names the file (and row)."""


def matrix_column(m: np.ndarray) -> pa.FixedSizeListArray:
    """(n, k) array -> ``fixed_size_list<float32>[k]`` column (the inverse of
    :func:`list_matrix`)."""
    m = np.ascontiguousarray(m, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1)), m.shape[1])


def make_table(
    ids: Iterable[str],
    flux: np.ndarray,
    ivar: np.ndarray,
    *,
    teff: np.ndarray | None = None,
    logg: np.ndarray | None = None,
    feh: np.ndarray | None = None,
    snr: np.ndarray | None = None,
    source: str | Iterable[str] = "unknown",
    extra: Mapping[str, np.ndarray | list] | None = None,
) -> pa.Table:
    """Build a schema-v1 table.

    Args:
        ids: n identifiers.
        flux, ivar: (n, n_pix) arrays (cast to float32).
        teff, logg, feh, snr: (n,) arrays; NaN becomes null. ``None`` means all null.
        source: one string for all rows or one per row.
        extra: further columns (e.g. ``truth_teff``); float arrays are stored as float32,
            pyarrow arrays as they are, anything else as text.
    """
    ids = [str(i) for i in ids]
    n = len(ids)
    flux = np.asarray(flux)
    ivar = np.asarray(ivar)
    if flux.ndim != 2 or flux.shape != ivar.shape or flux.shape[0] != n:
        raise ValueError(
            f"make_table: flux {flux.shape} and ivar {ivar.shape} must be ({n}, n_pix)"
        )

    def label(x: np.ndarray | None, name: str) -> pa.Array:
        if x is None:
            return pa.nulls(n, type=pa.float32())
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        if x.shape != (n,):
            raise ValueError(f"make_table: column {name!r} has {x.shape[0]} values, expected {n}")
        return pa.array(x, mask=np.isnan(x), type=pa.float32())

    src = [source] * n if isinstance(source, str) else [str(s) for s in source]
    cols: dict[str, pa.Array] = {
        "id": pa.array(ids, type=pa.string()),
        "flux": matrix_column(flux),
        "ivar": matrix_column(ivar),
        "teff": label(teff, "teff"),
        "logg": label(logg, "logg"),
        "feh": label(feh, "feh"),
        "snr": label(snr, "snr"),
        "source": pa.array(src, type=pa.string()),
    }
    for name, values in (extra or {}).items():
        if isinstance(values, pa.Array):  # typed already (e.g. int64 ids with nulls)
            cols[name] = values
            continue
        arr = np.asarray(values)
        if arr.dtype.kind == "f":
            cols[name] = label(arr, name)
        else:
            cols[name] = pa.array([str(v) for v in arr.reshape(-1)], type=pa.string())
        if len(cols[name]) != n:
            raise ValueError(
                f"make_table: column {name!r} has {len(cols[name])} values, expected {n}"
            )
    return pa.table(cols)


def _with_metadata(table: pa.Table, grid: Grid, generator: Mapping | None) -> pa.Table:
    meta = {
        "schema_version": SCHEMA_VERSION,
        "grid": grid.describe(),
        "generator": dict(generator or {}),
    }
    kv = dict(table.schema.metadata or {})
    kv[META_KEY] = json.dumps(meta, default=json_default).encode()
    kv[WAVE_KEY] = grid.wavelength.astype("<f8").tobytes()
    return table.replace_schema_metadata(kv)


def write_shard(
    path: str | os.PathLike,
    table: pa.Table,
    grid: Grid,
    generator: Mapping | None = None,
    *,
    compression: str = "zstd",
) -> Path:
    """Validate ``table`` against ``grid`` and write it atomically to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = _with_metadata(table, grid, generator)
    if all(c in table.column_names for c in REQUIRED_COLUMNS):  # else validate_table says so
        ivar = list_matrix(table.column("ivar"), grid.n_pix, f"{path}: column 'ivar'", table["id"])
        table = fill_masked_nonfinite(table, ivar, grid.n_pix, f"{path}: column 'flux'")
    validate_table(table, str(path), grid)
    dictionary = ["id", "source"]
    return write_atomic(
        path, lambda t: pq.write_table(table, t, compression=compression, use_dictionary=dictionary)
    )


def shard_name(prefix: str, i: int, n: int) -> str:
    return f"{prefix}-{i:05d}-of-{n:05d}.parquet"


def write_dataset(
    out_dir: str | os.PathLike,
    tables: Iterable[pa.Table],
    n_shards: int,
    grid: Grid,
    generator: Mapping | None = None,
    *,
    prefix: str = "part",
) -> list[Path]:
    """Write ``n_shards`` tables (an iterable, so rows can be produced lazily) as one
    dataset folder with a manifest.  Shards of an earlier write into the same folder
    that this write does not replace are removed after the new manifest is in place."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Until the new manifest is in place the folder may mix new shards with an earlier
    # write's (same names): the marker makes readers refuse it, and stays if this dies.
    (out / WRITING).write_text(f"write_dataset in progress (pid {os.getpid()})\n")
    written: list[Path] = []
    rows: list[int] = []
    for i, table in enumerate(tables):
        if i >= n_shards:
            raise ValueError(f"write_dataset: got more than the {n_shards} tables announced")
        written.append(write_shard(out / shard_name(prefix, i, n_shards), table, grid, generator))
        rows.append(table.num_rows)
        log.info("wrote %s (%d rows)", written[-1], table.num_rows)
    if len(written) != n_shards:
        raise ValueError(f"write_dataset: got {len(written)} tables, announced {n_shards}")
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "grid": grid.describe(),
        "generator": dict(generator or {}),
        "files": [p.name for p in written],
        "rows": rows,
        "total_rows": int(sum(rows)),
    }
    write_json_atomic(manifest, out / MANIFEST)
    keep = set(manifest["files"])
    for stale in out.glob(f"{prefix}-*-of-*.parquet"):
        if stale.name not in keep and _SHARD_RE.match(stale.name):
            stale.unlink()
            log.info("removed stale shard %s", stale)
    (out / WRITING).unlink()
    return written


def dataset_files(path: str | os.PathLike) -> list[Path]:
    """The Parquet files of a dataset: a single file, or a folder (its manifest's files
    when it has one, else every ``*.parquet`` in it, sorted)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise ShardError(f"{p}: no such file or folder")
    if (p / WRITING).exists():
        raise ShardError(
            f"{p}: holds a {WRITING} marker, so a write into it is in progress or was "
            f"interrupted and its shards may mix two writes; rewrite the set (or, if no "
            f"write is running and you trust the files, pass the .parquet files themselves)"
        )
    mpath = p / MANIFEST
    if mpath.exists():
        try:
            files = json.loads(mpath.read_text())["files"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ShardError(f"{mpath}: unreadable manifest ({err})") from err
        missing = [f for f in files if not (p / f).exists()]
        if missing:
            raise ShardError(f"{mpath}: lists files that are missing: {missing[:5]}")
        return [p / f for f in files]
    files = sorted(f for f in p.glob("*.parquet") if not f.name.startswith("."))
    if not files:
        raise ShardError(f"{p}: folder holds no .parquet files")
    _check_complete(p, files)
    return files


def _check_complete(folder: Path, files: list[Path]) -> None:
    """A folder without a manifest whose shard names (``prefix-00002-of-00010``) announce
    more shards than it holds is an interrupted write: refuse it rather than train on part."""
    announced: dict[tuple[str, int], set[int]] = {}  # (prefix, n announced) -> numbers held
    for f in files:
        m = _SHARD_RE.match(f.name)
        if m:
            announced.setdefault((m["prefix"], int(m["n"])), set()).add(int(m["i"]))
    for (prefix, n), have in announced.items():
        if len(have) < n:
            missing = sorted(set(range(n)) - have)
            raise ShardError(
                f"{folder}: incomplete dataset, {len(have)} of {n} '{prefix}' "
                f"shards and no {MANIFEST} (an interrupted write?); missing shard numbers "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''}. Rewrite the set, or "
                f"pass the .parquet files themselves to use a subset on purpose."
            )


def shard_metadata(path: str | os.PathLike) -> dict:
    """The ``mendis_ray`` metadata of a shard, read from the footer only (and, for a plain
    Parquet file of variable-length lists, the first row's length)."""
    path = Path(path)
    try:
        return file_metadata(pq.ParquetFile(path), str(path))
    except ShardError:
        raise
    except Exception as err:  # pyarrow raises several types for broken files
        raise ShardError(f"{path}: not a readable Parquet file ({err})") from err


def file_metadata(pf: pq.ParquetFile, where: str) -> dict:
    """The metadata of an open Parquet file; see :func:`schema_metadata`."""
    schema = pf.schema_arrow
    if META_KEY in (schema.metadata or {}) or "flux" not in schema.names:
        return schema_metadata(schema, where)
    first = next(pf.iter_batches(batch_size=1, columns=["flux"]), None)
    n_pix = None if first is None or first.num_rows == 0 else _first_length(first.column(0))
    return schema_metadata(schema, where, n_pix)


def schema_metadata(schema: pa.Schema, where: str, n_pix: int | None = None) -> dict:
    """The ``mendis_ray`` metadata of a schema.  A plain Parquet schema (no such key) gets
    the known grid whose size is its ``flux`` rows' length: the fixed list size, else
    ``n_pix`` (the first row's length, which the caller reads)."""
    kv = schema.metadata or {}
    if META_KEY not in kv:
        return _plain_metadata(schema, where, n_pix)
    try:
        meta = json.loads(kv[META_KEY])
    except json.JSONDecodeError as err:
        raise ShardError(f"{where}: 'mendis_ray' metadata is not JSON ({err})") from err
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ShardError(f"{where}: schema_version {version!r}, this reader knows {SCHEMA_VERSION}")
    return meta


GRIDS_BY_SIZE = {get().n_pix: name for name, get in GRID_NAMES.items()}
_warned_plain: set[str] = set()


def _plain_metadata(schema: pa.Schema, where: str, n_pix: int | None) -> dict:
    """Metadata for a file without ours: the grid is the known grid of its row length."""
    if "flux" not in schema.names:
        raise ShardError(f"{where}: missing required column(s) ['flux']")
    t = schema.field("flux").type
    n_pix = t.list_size if pa.types.is_fixed_size_list(t) else n_pix
    if n_pix not in GRIDS_BY_SIZE:
        known = ", ".join(f"{n} ({name})" for n, name in GRIDS_BY_SIZE.items())
        rows = "no rows" if n_pix is None else f"rows of {n_pix} pixels"
        raise ShardError(
            f"{where}: no 'mendis_ray' file metadata (the pixel grid), and {rows} match no "
            f"grid this package knows ({known} pixels); write shards with "
            "mendis_ray.spectra.shards.write_dataset(folder, [make_table(ids, flux, ivar, "
            "teff=..., logg=..., feh=...)], 1, grid_from_wavelength(wavelength)) (grid_from_"
            "wavelength from mendis_ray.spectra.grid; README: 'Your own spectra'), or read "
            "APOGEE FITS files with mendis ingest apogee"
        )
    grid = GRID_NAMES[GRIDS_BY_SIZE[n_pix]]()
    if grid.name not in _warned_plain:  # once per process: a catalog has many such files
        _warned_plain.add(grid.name)
        log.warning(
            "%s: a plain Parquet file (no 'mendis_ray' metadata): its rows of %d pixels are "
            "read as the %s grid (%s); if they are not, write shards with their "
            "wavelengths (README: 'Your own spectra')",
            where,
            n_pix,
            grid.name,
            grid_text(grid),
        )
    return {"schema_version": SCHEMA_VERSION, "grid": grid.describe(), "generator": {}}


def _first_length(col: pa.ChunkedArray | pa.Array) -> int | None:
    """Length of a list column's first row (None if it has none or it is null)."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(col) == 0 or not (_is_list_type(col.type)) or not col[0].is_valid:
        return None
    return len(col[0])


def _is_list_type(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def table_metadata(table: pa.Table, where: str) -> dict:
    """:func:`schema_metadata` of a table (its first row gives a plain table's length)."""
    has_flux = "flux" in table.column_names
    return schema_metadata(
        table.schema, where, _first_length(table.column("flux")) if has_flux else None
    )


def fill_optional_columns(table: pa.Table) -> pa.Table:
    """``table`` as a shard holds it: a null column for each of :data:`OPTIONAL_COLUMNS`
    it lacks, numeric ones as float32, integer ids as text, the shard columns first (what
    a plain file may differ in; tables from several files then concatenate)."""
    for name in OPTIONAL_COLUMNS:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, type=pa.float32()))
        elif _is_number(t := table.schema.field(name).type) and t != pa.float32():
            i = table.column_names.index(name)
            table = table.set_column(i, name, table.column(name).cast(pa.float32()))
    if "id" in table.column_names and pa.types.is_integer(table.schema.field("id").type):
        i = table.column_names.index("id")
        table = table.set_column(i, "id", table.column("id").cast(pa.string()))
    first = [c for c in SHARD_COLUMNS if c in table.column_names]
    return table.select(first + [c for c in table.column_names if c not in first])


def fill_masked_nonfinite(
    table: pa.Table, ivar: np.ndarray, n_pix: int, where: str = "column 'flux'"
) -> pa.Table:
    """``table`` with a non-finite flux at a masked pixel (``ivar`` (n, n_pix) == 0)
    replaced by 1 (NaN is a common mark of a bad pixel; its flux carries no information).
    One pass over the flux when every value is finite; the column is rebuilt otherwise."""
    flux = list_matrix(table.column("flux"), n_pix, where, table.column("id"))
    if np.isfinite(flux).all():
        return table
    fill = ~np.isfinite(flux) & (ivar == 0)
    if not fill.any():
        return table
    i = table.column_names.index("flux")
    return table.set_column(i, "flux", matrix_column(np.where(fill, np.float32(1), flux)))


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def validate_table(table: pa.Table, where: str, grid: Grid | None = None) -> dict:
    """Check a table against schema v1 (and ``grid`` if given); return its metadata.

    Raises:
        ShardError naming ``where`` and, for per-row problems, the first bad row and id.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ShardError(f"{where}: missing required column(s) {missing}")
    meta = table_metadata(table, where)
    g = meta.get("grid", {})
    if grid is not None and not same_grid(g, grid):
        raise ShardError(
            f"{where}: shard grid {grid_text(g)} does not match the expected grid {grid_text(grid)}"
        )
    n_pix = int(g.get("n_pix", -1))
    ids = table.column("id")
    for name in ("flux", "ivar"):
        arr = list_matrix(table.column(name), n_pix, f"{where}: column {name!r}", ids)
        if name == "flux":
            bad = ~np.isfinite(arr)
            what = "non-finite (NaN or inf) flux at a good pixel; mark bad pixels with ivar = 0"
        else:
            bad = ~np.isfinite(arr) | (arr < 0)
            what = "negative or non-finite ivar"
        rows = np.flatnonzero(bad.any(axis=1))
        if rows.size:
            r = int(rows[0])
            pix = int(np.flatnonzero(bad[r])[0])
            raise ShardError(
                f"{where}: row {r} (id {ids[r].as_py()!r}) has {what} at pixel {pix} "
                f"({rows.size} bad row(s) in all)"
            )
    for name in OPTIONAL_COLUMNS:
        if name in table.column_names and not pa.types.is_floating(table.schema.field(name).type):
            raise ShardError(
                f"{where}: column {name!r} must be float, is {table.schema.field(name).type}"
            )
    if ids.null_count:
        raise ShardError(f"{where}: column 'id' has {ids.null_count} null value(s)")
    return meta


def _row(r: int, ids: pa.ChunkedArray | pa.Array | None) -> str:
    return f"row {r}" if ids is None else f"row {r} (id {ids[r].as_py()!r})"


def list_matrix(
    col: pa.ChunkedArray | pa.Array,
    n_pix: int,
    where: str = "list column",
    ids: pa.ChunkedArray | pa.Array | None = None,
) -> np.ndarray:
    """(n, n_pix) float32 of a list column (zero-copy where Arrow allows), checking that
    every row holds ``n_pix`` float values; a ShardError names ``where`` and the first bad
    row (and its id from ``ids``).  The inverse of :func:`matrix_column`."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    t = col.type
    if pa.types.is_fixed_size_list(t):
        if t.list_size != n_pix:
            raise ShardError(f"{where}: rows have {t.list_size} pixels, the grid has {n_pix}")
        if col.null_count:
            r = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise ShardError(f"{where}: {_row(r, ids)} is null")
        values = col.flatten()
    elif pa.types.is_list(t) or pa.types.is_large_list(t):
        lengths = col.value_lengths().to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(np.isnan(lengths.astype(float)) | (lengths != n_pix))
        if bad.size:
            r = int(bad[0])
            raise ShardError(
                f"{where}: {_row(r, ids)} has {lengths[r]} pixels, the grid has {n_pix}"
            )
        values = col.flatten()
    else:
        raise ShardError(f"{where}: expected a list of float32, found {t}")
    if not pa.types.is_floating(values.type):
        raise ShardError(f"{where}: expected float values, found {values.type}")
    return values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, n_pix)


def read_shard(
    path: str | os.PathLike, grid: Grid | None = None, columns: list[str] | None = None
) -> pa.Table:
    """Read and validate one shard.  ``columns`` restricts the columns read (the required
    ones are always read, so validation is complete).  A plain Parquet file comes back as
    a shard would: its grid in the metadata, absent label/``snr`` columns null."""
    path = Path(path)
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ShardError(f"{path}: not a readable Parquet file ({err})") from err
    cols = None
    if columns is not None:
        cols = list(dict.fromkeys([*REQUIRED_COLUMNS, *columns]))
        missing = [c for c in cols if c not in schema.names and c not in OPTIONAL_COLUMNS]
        if missing:
            raise ShardError(f"{path}: missing column(s) {missing}")
        cols = [c for c in cols if c in schema.names]
    try:
        table = pq.read_table(path, columns=cols)
    except (pa.ArrowInvalid, OSError) as err:
        raise ShardError(f"{path}: not a readable Parquet file ({err})") from err
    table = fill_optional_columns(table)
    if all(c in table.column_names for c in REQUIRED_COLUMNS):
        n_pix = int(table_metadata(table, str(path))["grid"]["n_pix"])
        ivar = list_matrix(table.column("ivar"), n_pix, f"{path}: column 'ivar'", table["id"])
        table = fill_masked_nonfinite(table, ivar, n_pix, f"{path}: column 'flux'")
    meta = validate_table(table, str(path), grid)
    if META_KEY not in (table.schema.metadata or {}):
        g = GRID_NAMES[meta["grid"]["name"]]()
        table = _with_metadata(table, g, {"name": "plain Parquet", "path": str(path)})
    return table


def iter_dataset(path: str | os.PathLike, grid: Grid | None = None) -> Iterator[pa.Table]:
    """Validated tables of a dataset (file or folder), one shard at a time."""
    for f in dataset_files(path):
        yield read_shard(f, grid)


def read_dataset(path: str | os.PathLike, grid: Grid | None = None) -> pa.Table:
    """All rows of a dataset (file or folder) as one validated table."""
    tables = list(iter_dataset(path, grid))
    meta = tables[0].schema.metadata
    return pa.concat_tables(
        [t.replace_schema_metadata(meta) for t in tables], promote_options="default"
    )


@dataclass
class SpectraArrays:
    """Numpy view of a shard table: ``flux``/``ivar`` (n, n_pix) float32, ``labels``
    (n, 3) float32 (Teff, logg, [Fe/H]; NaN where unknown), ``snr`` (n,), ``ids``."""

    ids: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    labels: np.ndarray
    snr: np.ndarray


def table_arrays(table: pa.Table) -> SpectraArrays:
    """Convert a validated table to numpy arrays."""
    meta = table_metadata(table, "table")
    n_pix = int(meta["grid"]["n_pix"])
    ids = table.column("id")

    def mat(name: str) -> np.ndarray:
        return list_matrix(table.column(name), n_pix, f"column {name!r}", ids)

    def vec(name: str) -> np.ndarray:
        if name not in table.column_names:  # an optional column: unknown
            return np.full(table.num_rows, np.nan, np.float32)
        return table.column(name).to_numpy().astype(np.float32)  # nulls -> NaN

    labels = (
        np.stack([vec(c) for c in LABEL_COLUMNS], axis=1)
        if table.num_rows
        else np.zeros((0, 3), np.float32)
    )
    return SpectraArrays(
        ids=np.asarray(ids.to_pylist(), dtype=object),
        flux=mat("flux"),
        ivar=mat("ivar"),
        labels=labels,
        snr=vec("snr"),
    )
