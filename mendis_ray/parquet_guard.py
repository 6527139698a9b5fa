"""Bounds of a Parquet or Arrow IPC body, read from its own bytes before pyarrow decodes
anything (:func:`parquet_bounds`; :func:`ipc_message_bounds` for IPC messages).

A Parquet footer is not evidence: ``FileMetaData.num_rows`` can say 1 while the pages
hold 100,000 rows, and a few KB of run-length-encoded pages can decompress to gigabytes.
:func:`parquet_bounds` parses the footer (Thrift compact protocol) and then walks the
page headers of every column chunk that will be read, and returns the row count of every
row group together with the pages' own value counts and decompressed sizes, so that the
caller can refuse a body before a single page is decompressed.  It refuses (``ValueError``)
footers and page headers that do not add up (row groups against the file's row count,
page offsets outside the body, a chunk's pages against its ``num_values``).

:func:`encode_struct` writes a parsed struct back; the tests use it to forge
inconsistent files.  Only the subset of the compact protocol Parquet uses is supported
(no maps of structs are needed, but maps are skipped correctly).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Flatbuffer",
    "ParquetBounds",
    "decode_struct",
    "encode_struct",
    "ipc_message_bounds",
    "parquet_bounds",
    "read_footer",
    "write_footer",
]

MAGIC = b"PAR1"
MAX_FOOTER = 16 << 20  # bytes of Thrift metadata accepted
_MAX_DEPTH = 24
_MAX_ITEMS = 1 << 20
# compact-protocol type codes
_TRUE, _FALSE, _I8, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(1, 13)

#: A decoded struct: field id -> (type code, value); lists are (element type, [values]).
Struct = dict[int, tuple[int, Any]]


def _bytes_view(data: bytes | memoryview) -> memoryview:
    """An unsigned-byte view (a pyarrow Buffer's memoryview has format 'b', signed)."""
    view = memoryview(data)
    return view if view.format == "B" else view.cast("B")


class _Reader:
    def __init__(self, data: bytes | memoryview, pos: int = 0, end: int | None = None) -> None:
        self.data = _bytes_view(data)
        self.pos = pos
        self.end = len(self.data) if end is None else end

    def byte(self) -> int:
        if self.pos >= self.end:
            raise ValueError("truncated metadata")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        out, shift = 0, 0
        while True:
            b = self.byte()
            out |= (b & 0x7F) << shift
            if not b & 0x80:
                return out
            shift += 7
            if shift > 63:
                raise ValueError("varint too long")

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise ValueError("truncated metadata")
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def value(self, t: int, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise ValueError("metadata nested too deeply")
        if t in (_TRUE, _FALSE):  # inside a list: a byte 1/2 (booleans in fields: header)
            return self.byte() == 1 if depth else t == _TRUE
        if t == _I8:
            return self.byte()
        if t in (_I16, _I32, _I64):
            return self.zigzag()
        if t == _DOUBLE:
            return struct.unpack("<d", self.take(8))[0]
        if t == _BINARY:
            return self.take(self.varint())
        if t in (_LIST, _SET):
            head = self.byte()
            n, et = head >> 4, head & 0x0F
            if n == 15:
                n = self.varint()
            if n > _MAX_ITEMS:
                raise ValueError("list too long")
            return (et, [self.value(et, depth + 1) if et not in (_TRUE, _FALSE)
                         else self.byte() == 1 for _ in range(n)])  # fmt: skip
        if t == _MAP:
            n = self.varint()
            if n == 0:
                return (0, 0, [])
            kv = self.byte()
            kt, vt = kv >> 4, kv & 0x0F
            if n > _MAX_ITEMS:
                raise ValueError("map too long")
            items = [(self.value(kt, depth + 1), self.value(vt, depth + 1)) for _ in range(n)]
            return (kt, vt, items)
        if t == _STRUCT:
            return self.struct(depth + 1)
        raise ValueError(f"unknown Thrift type {t}")

    def struct(self, depth: int = 0) -> Struct:
        if depth > _MAX_DEPTH:
            raise ValueError("metadata nested too deeply")
        out: Struct = {}
        last = 0
        while True:
            head = self.byte()
            if head == 0:
                return out
            t, delta = head & 0x0F, head >> 4
            fid = last + delta if delta else self.zigzag()
            last = fid
            if t in (_TRUE, _FALSE):
                out[fid] = (t, t == _TRUE)
            else:
                out[fid] = (t, self.value(t, depth))


def decode_struct(data: bytes | memoryview, pos: int = 0, end: int | None = None):
    """(struct, position after it) of a compact-protocol struct at ``pos``."""
    r = _Reader(data, pos, end)
    s = r.struct()
    return s, r.pos


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _zigzag(n: int) -> bytes:
    return _varint((n << 1) ^ (n >> 63))


def _encode_value(t: int, v: Any, in_list: bool = False) -> bytes:
    if t in (_TRUE, _FALSE):
        return bytes([1 if v else 2]) if in_list else b""
    if t == _I8:
        return bytes([v & 0xFF])
    if t in (_I16, _I32, _I64):
        return _zigzag(int(v))
    if t == _DOUBLE:
        return struct.pack("<d", v)
    if t == _BINARY:
        return _varint(len(v)) + bytes(v)
    if t in (_LIST, _SET):
        et, items = v
        head = bytes([(len(items) << 4) | et]) if len(items) < 15 else (
            bytes([0xF0 | et]) + _varint(len(items))
        )  # fmt: skip
        return head + b"".join(_encode_value(et, x, True) for x in items)
    if t == _MAP:
        kt, vt, items = v
        if not items:
            return b"\x00"
        body = b"".join(_encode_value(kt, k, True) + _encode_value(vt, x, True) for k, x in items)
        return _varint(len(items)) + bytes([(kt << 4) | vt]) + body
    if t == _STRUCT:
        return encode_struct(v)
    raise ValueError(f"unknown Thrift type {t}")


def encode_struct(s: Struct) -> bytes:
    """Compact-protocol bytes of a struct from :func:`decode_struct`."""
    out = bytearray()
    last = 0
    for fid in sorted(s):
        t, v = s[fid]
        if t in (_TRUE, _FALSE):
            t = _TRUE if v else _FALSE
        delta = fid - last
        if 0 < delta <= 15:
            out.append((delta << 4) | t)
        else:
            out.append(t)
            out += _zigzag(fid)
        out += _encode_value(t, v)
        last = fid
    out.append(0)
    return bytes(out)


def read_footer(body: bytes | memoryview) -> Struct:
    """The FileMetaData struct of a Parquet file in memory."""
    data = _bytes_view(body)
    n = len(data)
    if n < 12 or bytes(data[:4]) != MAGIC or bytes(data[-4:]) != MAGIC:
        raise ValueError("not a Parquet file (magic bytes missing or footer encrypted)")
    flen = struct.unpack("<I", data[-8:-4])[0]
    if flen > MAX_FOOTER or flen > n - 12:
        raise ValueError("footer length out of range")
    meta, end = decode_struct(data, n - 8 - flen, n - 8)
    if end != n - 8:
        raise ValueError("footer length does not match its content")
    return meta


def write_footer(body: bytes, meta: Struct) -> bytes:
    """``body`` with its footer replaced by ``meta`` (for tests that forge files)."""
    flen = struct.unpack("<I", body[-8:-4])[0]
    new = encode_struct(meta)
    return body[: len(body) - 8 - flen] + new + struct.pack("<I", len(new)) + MAGIC


@dataclass
class ParquetBounds:
    """What a Parquet body will decode to, from its own bytes (see :func:`parquet_bounds`).

    Attributes:
        num_rows: the footer's row count (= the sum over row groups, checked).
        row_group_rows: rows of each row group.
        decoded_bytes: decompressed page bytes of the selected columns.
        values: {column: leaf values in its data pages}.
    """

    num_rows: int
    row_group_rows: list[int]
    decoded_bytes: int
    values: dict[str, int]


def _get(s: Struct, fid: int, default: Any = None) -> Any:
    v = s.get(fid)
    return default if v is None else v[1]


def parquet_bounds(
    body: bytes | memoryview,
    columns: Iterable[str],
    *,
    max_rows: int | None = None,
    max_decoded_bytes: int | None = None,
) -> ParquetBounds:
    """Row counts and decompressed sizes of the top-level ``columns`` of a Parquet body,
    from the footer and every page header of those columns, without decompressing a page.

    Stops early (with what it has counted so far) as soon as ``max_rows`` rows or
    ``max_decoded_bytes`` bytes are exceeded, so a caller checks the returned bounds.
    Raises ValueError where the footer or the page headers are inconsistent."""
    data = _bytes_view(body)
    size = len(data) - 8
    meta = read_footer(data)
    wanted = set(columns)
    file_rows = int(_get(meta, 3, -1))
    groups = _get(meta, 4, (0, []))[1]
    rg_rows = [int(_get(g, 3, -1)) for g in groups]
    if file_rows < 0 or any(r < 0 for r in rg_rows) or sum(rg_rows) != file_rows:
        raise ValueError("the row groups' row counts do not add up to the file's")
    decoded = 0
    values: dict[str, int] = {}
    total_rows = 0
    for g, rows in zip(groups, rg_rows, strict=True):
        total_rows += rows
        if max_rows is not None and total_rows > max_rows:
            break
        for chunk in _get(g, 1, (0, []))[1]:
            cmeta = _get(chunk, 3)
            if cmeta is None:
                raise ValueError("a column chunk without metadata")
            path = [bytes(p).decode("utf-8", "replace") for p in _get(cmeta, 3, (0, []))[1]]
            if not path or path[0] not in wanted:
                continue
            n_values = int(_get(cmeta, 5, -1))
            offsets = [int(_get(cmeta, f, 0)) for f in (9, 11)]  # data, dictionary page
            start = min([o for o in offsets if o >= 4], default=-1)
            end = start + int(_get(cmeta, 7, -1))
            if not 4 <= start < end <= size or n_values < 0:
                raise ValueError("a column chunk outside the file")
            pos, seen = start, 0
            while pos < end:
                page, pos = decode_struct(data, pos, end)
                usize, csize = int(_get(page, 2, -1)), int(_get(page, 3, -1))
                if usize < 0 or csize < 0 or pos + csize > end:
                    raise ValueError("a page outside its column chunk")
                pos += csize
                decoded += usize
                header = _get(page, 5) or _get(page, 8)  # data page v1 / v2
                if header is not None:
                    seen += int(_get(header, 1, 0))
                if max_decoded_bytes is not None and decoded > max_decoded_bytes:
                    return ParquetBounds(file_rows, rg_rows, decoded, values)
            if seen != n_values:
                raise ValueError("a column chunk's pages do not hold its num_values")
            values[path[0]] = values.get(path[0], 0) + seen
    return ParquetBounds(file_rows, rg_rows, decoded, values)


# ---------------------------------------------------------------------- Arrow IPC
#
# An IPC record batch may be compressed (LZ4/ZSTD): a few KB of body can claim gigabytes
# once decompressed, and pyarrow decompresses a whole batch before the caller sees its
# row count.  The Message flatbuffer says the batch's row count and every buffer's place
# in the body, and a compressed buffer starts with its uncompressed length (int64), so
# both bounds are known before decoding.

_RECORD_BATCH, _DICTIONARY_BATCH = 3, 2  # MessageHeader union tags


class Flatbuffer:
    """Minimal flatbuffer table access (little-endian, offsets checked against the end)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def _u(self, pos: int, size: int, signed: bool = False) -> int:
        if pos < 0 or pos + size > len(self.data):
            raise ValueError("IPC metadata out of range")
        return int.from_bytes(self.data[pos : pos + size], "little", signed=signed)

    def root(self) -> int:
        return self._u(0, 4)

    def field(self, table: int, i: int) -> int:
        """Position of field ``i`` of the table at ``table`` (0 if absent)."""
        vtable = table - self._u(table, 4, signed=True)
        vt_size = self._u(vtable, 2)
        o = 4 + 2 * i
        if o + 2 > vt_size:
            return 0
        off = self._u(vtable + o, 2)
        return table + off if off else 0

    def int_field(self, table: int, i: int, size: int, default: int = 0) -> int:
        pos = self.field(table, i)
        return self._u(pos, size, signed=True) if pos else default

    def table_field(self, table: int, i: int) -> int:
        pos = self.field(table, i)
        return pos + self._u(pos, 4) if pos else 0

    def struct_vector(self, table: int, i: int, n_longs: int) -> list[tuple[int, ...]]:
        pos = self.field(table, i)
        if not pos:
            return []
        vec = pos + self._u(pos, 4)
        n = self._u(vec, 4)
        if n > _MAX_ITEMS:
            raise ValueError("IPC metadata vector too long")
        size = 8 * n_longs
        return [
            tuple(self._u(vec + 4 + k * size + 8 * j, 8, signed=True) for j in range(n_longs))
            for k in range(n)
        ]


def ipc_message_bounds(metadata: bytes, body: bytes | memoryview | None) -> tuple[int, int]:
    """(rows, decoded bytes) of one IPC message from its flatbuffer ``metadata`` and its
    ``body``, without decoding it: (0, 0) for a schema message, (0, bytes) for a
    dictionary batch (its entries are not rows of the table)."""
    fb = Flatbuffer(bytes(metadata))
    msg = fb.root()
    kind = fb.int_field(msg, 1, 1)
    header = fb.table_field(msg, 2)
    dictionary = kind == _DICTIONARY_BATCH
    if dictionary and header:
        header = fb.table_field(header, 1)  # DictionaryBatch.data: a RecordBatch
    elif kind != _RECORD_BATCH:
        return 0, 0
    if not header:
        raise ValueError("IPC record batch without a header")
    rows = fb.int_field(header, 0, 8)
    compressed = bool(fb.field(header, 3))
    view = _bytes_view(body if body is not None else b"")
    decoded = 0
    for offset, length in fb.struct_vector(header, 2, 2):  # Buffer {offset, length}
        if offset < 0 or length < 0 or offset + length > len(view):
            raise ValueError("an IPC buffer outside its message body")
        size = length
        if compressed and length >= 8:
            claimed = int.from_bytes(view[offset : offset + 8], "little", signed=True)
            size = length if claimed < 0 else claimed  # -1: stored uncompressed
        decoded += size
    if rows < 0:
        raise ValueError("negative IPC batch length")
    return (0 if dictionary else rows), decoded
