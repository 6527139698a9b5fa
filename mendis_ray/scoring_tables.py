"""Binary bodies of the scoring endpoint (no Ray here): Arrow IPC streams and files and
Parquet files with the columns of a shard, bounded before anything is decoded (rows and
decompressed bytes, :mod:`mendis_ray.parquet_guard`), then checked column by column into
a :class:`~mendis_ray.scoring_request.ParsedRequest` (422 naming the column, row and
pixel of the first problem).  :func:`mendis_ray.scoring_api.parse_body` dispatches here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mendis_ray.parquet_guard import Flatbuffer, ipc_message_bounds, parquet_bounds
from mendis_ray.scoring_request import (
    ARROW_COLUMNS,
    DEFAULT_MAX_SPECTRA,
    F32_MAX,
    LABELS,
    MAX_ID_LENGTH,
    ParsedRequest,
    RequestError,
    _check_rows,
    _clip,
    _id,
    check_grid,
)
from mendis_ray.spectra.shards import META_KEY, ShardError, schema_metadata

__all__ = ["decoded_limit", "parse_arrow", "table_request"]

log = logging.getLogger("mendis_ray.scoring_api")


_KIND_NAMES = {
    "arrow_stream": "Arrow IPC stream",
    "arrow_file": "Arrow IPC file",
    "parquet": "Parquet file",
}


def parse_arrow(
    body: bytes,
    kind: str,
    n_pix: int,
    *,
    max_spectra: int = DEFAULT_MAX_SPECTRA,
    model_grid: Mapping[str, Any] | None = None,
) -> ParsedRequest:
    """Parse an Arrow IPC (``arrow_stream``/``arrow_file``) or ``parquet`` body.

    The row count is checked before the data are read where the format allows (Parquet:
    the footer, the row groups and every page header of the read columns, see
    :func:`_read_parquet`; IPC batch by batch), and only the columns of ``ARROW_COLUMNS``
    are decoded.
    A body whose schema metadata carries ``mendis_ray`` shard metadata must be on
    ``model_grid``."""
    what = _KIND_NAMES.get(kind, kind)
    buf = pa.py_buffer(body)
    for step in ("schema", "table"):
        try:
            if step == "schema":  # the footer / first message only: the grid comes first
                schema = _read_schema(buf, kind)
            else:
                table = _read_table(buf, kind, max_spectra, n_pix)
        except RequestError:
            raise
        except Exception as err:  # pyarrow raises many types for corrupt input
            # the type only: pyarrow's messages quote column names and metadata
            log.info("unreadable %s body: %s", what, _clip(f"{type(err).__name__}: {err}", 200))
            raise RequestError(
                400, "body", f"not a readable {what} ({type(err).__name__})"
            ) from None
        if step == "schema" and META_KEY in (schema.metadata or {}):
            try:
                meta = schema_metadata(schema, "body")
            except ShardError:
                raise RequestError(422, "metadata", "invalid mendis_ray shard metadata") from None
            if model_grid is not None and isinstance(meta.get("grid"), dict):
                check_grid(model_grid, meta["grid"], "metadata.grid")
    return table_request(table, n_pix, max_spectra=max_spectra)


def _read_schema(buf: pa.Buffer, kind: str) -> pa.Schema:
    """The schema (with metadata) of a binary body, reading no data pages."""
    if kind == "parquet":
        return pq.read_schema(pa.BufferReader(buf))
    opener = pa.ipc.open_stream if kind == "arrow_stream" else pa.ipc.open_file
    return opener(buf).schema


def decoded_limit(max_spectra: int, n_pix: int) -> int:
    """Decompressed page bytes a Parquet body may hold: float64 flux and ivar of
    ``max_spectra`` spectra, ids and labels, plus 4 MiB."""
    return max_spectra * (16 * n_pix + 4096) + (4 << 20)


def _read_parquet(buf: pa.Buffer, max_spectra: int, n_pix: int) -> pa.Table:
    """The wanted columns of a Parquet body, bounded before anything is decoded: the
    footer's row count must equal its row groups' (:func:`parquet_bounds`), the pages'
    own value counts must fit that many rows of at most ``n_pix`` values, and their
    decompressed size :func:`decoded_limit`; then the row groups are read in batches,
    counting rows as they come."""
    limit = decoded_limit(max_spectra, n_pix)
    try:
        bounds = parquet_bounds(
            memoryview(buf), ARROW_COLUMNS, max_rows=max_spectra, max_decoded_bytes=limit
        )
    except ValueError as err:  # our own messages, no input in them
        raise RequestError(400, "body", f"not a readable Parquet file ({err})") from None
    _check_rows(bounds.num_rows, max_spectra)
    if bounds.decoded_bytes > limit:
        raise RequestError(413, "body", f"the Parquet pages decompress to more than {limit} bytes")
    per_row = {"flux": n_pix, "ivar": n_pix}
    for col, n_values in bounds.values.items():
        if n_values > bounds.num_rows * max(per_row.get(col, 1), 1):
            raise RequestError(
                422,
                col,
                f"the pages hold more values than {bounds.num_rows} row(s) of at most "
                f"{per_row.get(col, 1)} (the footer's row count, the model's pixels)",
            )
    pf = pq.ParquetFile(pa.BufferReader(buf))
    schema = pf.schema_arrow
    cols = [c for c in ARROW_COLUMNS if c in schema.names]
    batches: list[pa.RecordBatch] = []
    rows = 0
    for batch in pf.iter_batches(batch_size=1024, columns=cols, use_threads=False):
        rows += batch.num_rows
        _check_rows(rows, max_spectra)
        batches.append(batch)
    if rows != bounds.num_rows:
        raise RequestError(400, "body", "the Parquet pages do not hold the footer's row count")
    return pa.Table.from_batches(batches, schema=pa.schema([schema.field(c) for c in cols]))


def _read_table(buf: pa.Buffer, kind: str, max_spectra: int, n_pix: int) -> pa.Table:
    """The table of the wanted columns of a binary body."""
    if kind == "parquet":
        return _read_parquet(buf, max_spectra, n_pix)
    _check_ipc(buf, kind, max_spectra, n_pix)
    opener = pa.ipc.open_stream if kind == "arrow_stream" else pa.ipc.open_file
    schema = opener(buf).schema
    wanted = [i for i, f in enumerate(schema) if f.name in ARROW_COLUMNS]
    reader = opener(buf, options=pa.ipc.IpcReadOptions(included_fields=wanted))
    batches: list[pa.RecordBatch] = []
    rows = 0
    if kind == "arrow_stream":
        batch_iter = iter(reader)
    else:
        batch_iter = (reader.get_batch(i) for i in range(reader.num_record_batches))
    for batch in batch_iter:
        rows += batch.num_rows
        _check_rows(rows, max_spectra)
        batches.append(batch)
    return pa.Table.from_batches(batches, schema=reader.schema)


def _ipc_messages(buf: pa.Buffer, kind: str):
    """The (metadata, body) of every message of an IPC body, undecoded: the stream's
    messages in order, or the file footer's dictionary and record-batch blocks."""
    if kind == "arrow_stream":
        reader = pa.ipc.MessageReader.open_stream(pa.BufferReader(buf))
        while True:
            try:
                msg = reader.read_next_message()
            except StopIteration:
                return
            yield msg.metadata, msg.body
    data = memoryview(buf)
    n = len(data)
    if n < 18 or bytes(data[:6]) != b"ARROW1" or bytes(data[-6:]) != b"ARROW1":
        raise ValueError("not an Arrow IPC file")
    flen = int.from_bytes(data[n - 10 : n - 6], "little")
    if not 0 < flen <= n - 18:
        raise ValueError("IPC footer length out of range")
    fb = Flatbuffer(bytes(data[n - 10 - flen : n - 10]))
    footer = fb.root()
    for field in (2, 3):  # dictionaries, recordBatches: Block {offset, metaDataLength, body}
        for offset, meta_len, body_len in fb.struct_vector(footer, field, 3):
            size = (meta_len & 0xFFFFFFFF) + body_len
            if offset < 8 or body_len < 0 or offset + size > n:
                raise ValueError("an IPC block outside the file")
            msg = pa.ipc.read_message(buf.slice(offset, size))
            yield msg.metadata, msg.body


def _check_ipc(buf: pa.Buffer, kind: str, max_spectra: int, n_pix: int) -> None:
    """Rows and decompressed bytes of an IPC body from its message metadata, before any
    batch is decoded (a compressed batch is decompressed whole): 422 over
    ``max_spectra`` rows, 413 over :func:`decoded_limit`."""
    limit = decoded_limit(max_spectra, n_pix)
    rows = decoded = 0
    for metadata, body in _ipc_messages(buf, kind):
        r, d = ipc_message_bounds(metadata, body)
        rows, decoded = rows + r, decoded + d
        _check_rows(rows, max_spectra)
        if decoded > limit:
            raise RequestError(413, "body", f"the Arrow batches decode to more than {limit} bytes")


def table_request(table: pa.Table, n_pix: int, *, max_spectra: int) -> ParsedRequest:
    """Arrays of a table with shard columns (``flux`` required); 422 naming the column
    and row of the first problem."""
    n = table.num_rows
    if n == 0:
        raise RequestError(422, "spectra", "the body holds no rows")
    _check_rows(n, max_spectra)
    names = table.column_names
    if "flux" not in names:
        raise RequestError(422, "flux", "missing column 'flux'")
    ids = _ids(table) if "id" in names else [None] * n
    flux = _matrix(table.column("flux"), n_pix, "flux", ids, nullable=False)
    ivar = (
        _matrix(table.column("ivar"), n_pix, "ivar", ids, nullable=True)
        if "ivar" in names
        else np.ones((n, n_pix))
    )
    labels = np.full((n, 3), np.nan)
    for j, name in enumerate(LABELS):
        if name in names:
            labels[:, j] = _vector(table.column(name), name, ids)
    return ParsedRequest(ids, flux, ivar, labels)


def _ids(table: pa.Table) -> list[Any]:
    col = table.column("id")
    t = col.type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)):
        raise RequestError(422, "id", f"column must hold strings or integers, found {_kind(t)}")
    ids = [None if v is None else str(v) for v in col.to_pylist()]
    for r, v in enumerate(ids):
        if v is not None and len(v) > MAX_ID_LENGTH:
            raise RequestError(422, f"id[{r}]", f"longer than {MAX_ID_LENGTH} characters")
    return ids


def _matrix(
    col: pa.ChunkedArray, n_pix: int, name: str, ids: Sequence[Any], *, nullable: bool
) -> np.ndarray:
    """(n, n_pix) float64 from a list column; null rows are 1 (``nullable``, i.e. ivar
    not given for that spectrum) or an error."""
    arr = col.combine_chunks()
    t = arr.type
    if not (pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t)):
        raise RequestError(422, name, f"expected a list of numbers per row, found {_kind(t)}")
    vt = t.value_type
    if not (pa.types.is_floating(vt) or pa.types.is_integer(vt)):
        raise RequestError(422, name, f"expected numbers in the lists, found {_kind(vt)}")
    n = len(arr)
    null = arr.is_null().to_numpy(zero_copy_only=False)
    if null.any() and not nullable:
        r = int(np.flatnonzero(null)[0])
        raise RequestError(422, f"{name}[{r}]", f"row is null{_id(ids, r)}")
    if pa.types.is_fixed_size_list(t):
        if t.list_size != n_pix:
            raise RequestError(
                422, name, f"rows have {t.list_size} values, the model's grid has {n_pix} pixels"
            )
    else:
        lengths = arr.value_lengths().fill_null(n_pix).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(lengths != n_pix)
        if bad.size:
            r = int(bad[0])
            raise RequestError(
                422,
                f"{name}[{r}]",
                f"{lengths[r]} values, the model's grid has {n_pix} pixels{_id(ids, r)}",
            )
    keep = ~null
    sub = arr.filter(pa.array(keep)) if null.any() else arr
    values = _to_float64(sub.flatten(), name).to_numpy(zero_copy_only=False)
    out = np.ones((n, n_pix))
    out[keep] = values.reshape(-1, n_pix)
    bad = ~np.isfinite(out) | (np.abs(out) > F32_MAX)
    if name == "ivar":
        bad |= out < 0
    if bad.any():
        r, p = (int(i) for i in np.argwhere(bad)[0])
        what = "null, non-finite, negative or beyond float32" if name == "ivar" else (
            "null, non-finite or beyond float32"
        )  # fmt: skip
        raise RequestError(
            422,
            f"{name}[{r}][{p}]",
            f"{what} value{_id(ids, r)}; {int(bad.any(axis=1).sum())} bad row(s) in all",
        )
    return out


def _kind(t: pa.DataType) -> str:
    """A coarse name of an Arrow type (its str() quotes client-chosen field names)."""
    for test, name in (
        (pa.types.is_floating, "floats"), (pa.types.is_integer, "integers"),
        (pa.types.is_string, "strings"), (pa.types.is_large_string, "strings"),
        (pa.types.is_binary, "binary"), (pa.types.is_boolean, "booleans"),
        (pa.types.is_struct, "structs"), (pa.types.is_list, "lists"),
        (pa.types.is_large_list, "lists"), (pa.types.is_fixed_size_list, "lists"),
        (pa.types.is_null, "nulls"), (pa.types.is_dictionary, "dictionary"),
    ):  # fmt: skip
        if test(t):
            return name
    return "another type"


def _to_float64(arr: pa.Array | pa.ChunkedArray, name: str) -> pa.Array | pa.ChunkedArray:
    """``arr`` as float64.  Integers beyond 2^53 (e.g. uint64 2^64-1) are rounded, not
    refused: they are far outside any flux range and get scored and flagged."""
    try:
        return arr.cast(pa.float64(), safe=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        raise RequestError(422, name, "values not convertible to float64") from None


def _vector(col: pa.ChunkedArray, name: str, ids: Sequence[Any]) -> np.ndarray:
    """(n,) float64 label column; null and NaN mean not given."""
    t = col.type
    if not (pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_null(t)):
        raise RequestError(422, name, f"expected a numeric column, found {_kind(t)}")
    v = _to_float64(col, name).to_numpy(zero_copy_only=False).astype(np.float64)
    bad = np.isinf(v) | (np.abs(np.nan_to_num(v)) > F32_MAX)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise RequestError(422, f"{name}[{r}]", f"infinite or beyond float32{_id(ids, r)}")
    return v
