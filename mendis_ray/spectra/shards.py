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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mendis_ray.atomic import json_default, write_atomic, write_json_atomic
from mendis_ray.spectra import plain
from mendis_ray.spectra.grid import Grid, grid_text, same_grid
from mendis_ray.spectra.schema import (
    LABEL_COLUMNS,
    META_KEY,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    SCHEMA_VERSION,
    SHARD_COLUMNS,
    WAVE_KEY,
    ShardError,
    list_matrix,
    matrix_column,
)

__all__ = [
    "LABEL_COLUMNS",
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "SCHEMA_VERSION",
    "SHARD_COLUMNS",
    "ShardError",
    "SpectraArrays",
    "check_values",
    "dataset_files",
    "file_metadata",
    "list_matrix",
    "make_table",
    "manifest_rows",
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

MANIFEST = "_manifest.json"
#: pyarrow's words for a page whose CRC does not match (shards are written with page
#: checksums since 2026-12-01 and read with them verified; files without them read as before)
CRC_FAILED = "CRC checksum verification failed"
DAMAGED = ("a page's bytes do not match the CRC checksum written with it (the file was "
           "damaged after it was written: copy or write it again)")  # fmt: skip
WRITING = "_writing"  # present while write_dataset runs; left behind if it is interrupted
_SHARD_RE = re.compile(r"^(?P<prefix>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.parquet$")


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
    meta = _check_schema(table, str(path), grid)
    table, flux, ivar = plain.matrices(table, int(meta["grid"]["n_pix"]), str(path))
    check_values(table.column("id"), flux, ivar, str(path))
    dictionary = ["id", "source"]
    return write_atomic(
        path,
        lambda t: pq.write_table(table, t, compression=compression, use_dictionary=dictionary,
                                 write_page_checksum=True),  # read_shard verifies them
    )  # fmt: skip


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
        files = _manifest_files(mpath)
        missing = [f for f in files if not (p / f).exists()]
        if missing:
            raise ShardError(f"{mpath}: lists files that are missing: {missing[:5]}")
        return [p / f for f in files]
    files = sorted(f for f in p.glob("*.parquet") if not f.name.startswith("."))
    if not files:
        raise ShardError(f"{p}: folder holds no .parquet files")
    _check_complete(p, files)
    return files


def manifest_rows(path: str | os.PathLike) -> dict[Path, int]:
    """{file: rows} that a dataset folder's manifest recorded when the set was written
    (empty for a file, a folder without a manifest, or an older manifest without
    ``rows``).  A reader that counts a file's rows compares them: a shard replaced or
    emptied since the write would otherwise train on part of the set without a word."""
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        return {}
    files = _manifest_files(mpath)
    rows = json.loads(mpath.read_text(encoding="utf-8")).get("rows")
    if not (isinstance(rows, list) and len(rows) == len(files)):
        return {}
    return {Path(path) / f: r for f, r in zip(files, rows, strict=True) if isinstance(r, int)}


def _manifest_files(mpath: Path) -> list[str]:
    """The ``files`` of the manifest ``mpath``: names of files in its own folder.  A
    ShardError naming it for anything else (not JSON, not an object, no list of names, a
    name that leaves the folder)."""
    try:
        info = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardError(f"{mpath}: unreadable manifest ({err})") from err
    files = info.get("files") if isinstance(info, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
        raise ShardError(f"{mpath}: unreadable manifest (no 'files' list of file names)")
    outside = [f for f in files if Path(f).is_absolute() or ".." in Path(f).parts]
    if outside:
        raise ShardError(f"{mpath}: lists files outside its folder: {outside[:3]}")
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
    flux = plain.column_map(schema.names).get("flux")
    if META_KEY in (schema.metadata or {}) or flux is None:
        return schema_metadata(schema, where)
    return schema_metadata(schema, where, plain.first_length(pf, flux))


def schema_metadata(schema: pa.Schema, where: str, n_pix: int | None = None) -> dict:
    """The ``mendis_ray`` metadata of a schema.  A plain Parquet schema (no such key) gets
    the known grid whose size is its ``flux`` rows' length: the fixed list size, else
    ``n_pix`` (the first row's length, which the caller reads)."""
    kv = schema.metadata or {}
    if META_KEY not in kv:
        grid = plain.plain_grid(schema, where, n_pix)
        return {"schema_version": SCHEMA_VERSION, "grid": grid.describe(), "generator": {}}
    try:
        meta = json.loads(kv[META_KEY])
    except json.JSONDecodeError as err:
        raise ShardError(f"{where}: 'mendis_ray' metadata is not JSON ({err})") from err
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ShardError(f"{where}: schema_version {version!r}, this reader knows {SCHEMA_VERSION}")
    if WAVE_KEY in kv:
        _check_wavelength(kv[WAVE_KEY], meta.get("grid", {}), where)
    return meta


def _check_wavelength(raw: bytes, grid: Mapping, where: str) -> None:
    """The pixel wavelengths a shard carries (float64 bytes) fit its grid: as many as its
    pixels, finite and increasing (the grid's hash is compared where grids are: an edited
    hash is "another grid").  Damaged or edited ones would be copied into a checkpoint
    and name the wrong lines in every explanation."""
    whole = len(raw) % 8 == 0 and len(raw) // 8 == grid.get("n_pix")
    wl = np.frombuffer(raw[: len(raw) // 8 * 8], "<f8")
    if not (whole and np.isfinite(wl).all() and (np.diff(wl) > 0).all()):
        raise ShardError(
            f"{where}: its {WAVE_KEY.decode()!r} metadata ({len(raw)} bytes) are not the pixel "
            f"wavelengths of its grid {grid_text(grid)}: the file's metadata were damaged or "
            "edited (write the shard again)"
        )


def table_metadata(table: pa.Table, where: str) -> dict:
    """:func:`schema_metadata` of a table (its first row gives a plain table's length)."""
    flux = plain.column_map(table.column_names).get("flux")
    if META_KEY in (table.schema.metadata or {}) or flux is None:  # a shard: no data read
        return schema_metadata(table.schema, where)
    return schema_metadata(table.schema, where, plain.table_first_length(table.column(flux)))


def validate_table(table: pa.Table, where: str, grid: Grid | None = None) -> dict:
    """Check a table against schema v1 (and ``grid`` if given); return its metadata.

    Raises:
        ShardError naming ``where`` and, for per-row problems, the first bad row and id.
    """
    meta = _check_schema(table, where, grid)
    _, flux, ivar = plain.matrices(table, int(meta["grid"]["n_pix"]), where)
    check_values(table.column("id"), flux, ivar, where)
    return meta


def _check_schema(table: pa.Table, where: str, grid: Grid | Mapping | None) -> dict:
    """The required columns, the grid (and ``grid`` if given), the column types."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ShardError(f"{where}: missing required column(s) {missing}")
    meta = table_metadata(table, where)
    g = meta.get("grid", {})
    if grid is not None and not same_grid(g, grid):
        raise ShardError(
            f"{where}: shard grid {grid_text(g)} does not match the expected grid {grid_text(grid)}"
        )
    for name in OPTIONAL_COLUMNS:
        if name in table.column_names and not pa.types.is_floating(table.schema.field(name).type):
            raise ShardError(
                f"{where}: column {name!r} must be float, is {table.schema.field(name).type}"
            )
    ids = table.column("id")
    if ids.null_count:
        raise ShardError(f"{where}: column 'id' has {ids.null_count} null value(s)")
    return meta


def check_values(ids: pa.ChunkedArray, flux: np.ndarray, ivar: np.ndarray, where: str) -> None:
    """No negative or infinite ivar, no non-finite flux where ivar > 0 (flux, ivar (n, p);
    NaN ivar and NaN flux at ivar 0 were made masked pixels by :func:`plain.clean_masked`)."""
    checks = (
        (~np.isfinite(ivar) | (ivar < 0), "a negative or infinite ivar", ""),
        (~np.isfinite(flux), "a non-finite (NaN or inf) flux", ", where ivar > 0"),
    )
    for bad, what, at in checks:
        rows = np.flatnonzero(bad.any(axis=1))
        if rows.size:
            r = int(rows[0])
            pix = int(np.flatnonzero(bad[r])[0])
            raise ShardError(
                f"{where}: row {r} (id {ids[r].as_py()!r}) has {what} at pixel {pix}{at} "
                f"({rows.size} bad row(s) in all); a bad pixel is marked with ivar = 0"
            )


def read_shard(
    path: str | os.PathLike, grid: Grid | Mapping | None = None, columns: list[str] | None = None
) -> pa.Table:
    """Read and validate one shard.  ``columns`` restricts the columns read (the required
    ones are always read, so validation is complete).  A plain Parquet file comes back as
    a shard would (:mod:`mendis_ray.spectra.plain`): its grid in the metadata, columns in
    the shard schema, flux and ivar fixed-size float32 lists."""
    path, where = Path(path), str(path)
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ShardError(f"{path}: not a readable Parquet file ({err})") from err
    cols = None
    if columns is not None:
        have = plain.column_map(schema.names)
        want = list(dict.fromkeys([*REQUIRED_COLUMNS, *columns]))
        missing = [c for c in want if c not in have and c not in schema.names
                   and c not in OPTIONAL_COLUMNS]  # fmt: skip
        if missing:
            raise ShardError(f"{path}: missing column(s) {missing}")
        cols = [have.get(c, c) for c in want if c in have or c in schema.names]
    try:
        table = pq.read_table(path, columns=cols, page_checksum_verification=True)
    except (pa.ArrowInvalid, OSError) as err:
        if CRC_FAILED in str(err):
            raise _damaged(path, err) from err
        raise ShardError(f"{path}: not a readable Parquet file ({err})") from err
    is_plain = META_KEY not in (table.schema.metadata or {})
    table = plain.normalize_columns(table, where)
    meta = _check_schema(table, where, grid)
    table, flux, ivar = plain.matrices(table, int(meta["grid"]["n_pix"]), where)
    check_values(table.column("id"), flux, ivar, where)
    if is_plain:
        for name, m in (("flux", flux), ("ivar", ivar)):
            if table.schema.field(name).type != pa.list_(pa.float32(), m.shape[1]):
                table = table.set_column(table.column_names.index(name), name, matrix_column(m))
        g = plain.known_grid(flux.shape[1])  # the grid plain_grid gave the metadata
        table = _with_metadata(table, g, {"name": "plain Parquet", "path": where})
    return table


def _damaged(path: Path, err: BaseException) -> ShardError:
    return ShardError(f"{path}: damaged: {DAMAGED} ({err})")


def damaged_error(files: Sequence[Path], err: BaseException) -> ShardError:
    """The ShardError of a read that failed a page's CRC checksum (``err``, raised where
    the file is not known: in a Ray read task), naming the first of ``files`` whose pages
    fail it.  Reads the files whole, so only after such a failure."""
    for f in files:
        try:
            pq.read_table(f, page_checksum_verification=True)
        except OSError as e:
            if CRC_FAILED in str(e):
                return _damaged(f, e)
    last = str(err).strip().splitlines()[-1]
    return ShardError(f"a read of the shards failed a page's CRC checksum, but each reads "
                      f"whole now (the storage's read error?): {last}")  # fmt: skip


def iter_dataset(path: str | os.PathLike, grid: Grid | None = None) -> Iterator[pa.Table]:
    """Validated tables of a dataset (file or folder), one shard at a time, all on
    ``grid`` (if given, else the first file's)."""
    want: Grid | Mapping | None = grid
    for f in dataset_files(path):
        if _skip_empty_plain(f):
            continue
        table = read_shard(f, want)
        want = want or json.loads(table.schema.metadata[META_KEY])["grid"]
        yield table


def _skip_empty_plain(path: Path) -> bool:
    try:
        empty = plain.is_empty_plain(pq.ParquetFile(path))
    except Exception:  # unreadable: read_shard says so, naming the file
        return False
    if empty:
        log.warning("%s: a plain Parquet file without rows; left out", path)
    return empty


def read_dataset(path: str | os.PathLike, grid: Grid | None = None) -> pa.Table:
    """All rows of a dataset (file or folder) as one validated table."""
    tables = list(iter_dataset(path, grid))
    if not tables:
        raise ShardError(f"{path}: no rows (every file is an empty plain Parquet file)")
    meta = tables[0].schema.metadata
    return pa.concat_tables(  # permissive: files may differ in their other columns' types
        [t.replace_schema_metadata(meta) for t in tables], promote_options="permissive"
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
