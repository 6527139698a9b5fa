"""Score tables as FITS binary tables, one row per spectrum like an APOGEE allStar file.

``mendis score`` writes ``scores.fits`` (every spectrum) and ``top_outliers.fits`` (the
ranked outliers, with their explanation tables as further HDUs) beside the Parquet and
CSV outputs.  Columns are the Parquet columns, upper-cased as in allStar files
(``id`` -> ``ID``, ``apogee_id`` -> ``APOGEE_ID``); input identifier columns
(``APOGEE_ID``, ``TELESCOPE``, ``FIELD`` of ingested APOGEE files, or any id columns of the
input shards such as ``sdss_id`` or ``gaia_dr3_source_id``) keep their type: an int64 id
stays a 64-bit integer (FITS ``K``), with ``TNULL`` where it is null.  Floats keep their
width with NaN for null, booleans become FITS logicals, strings fixed-width text ("" for
null).  The header documents the flag bits (``FLAGBIT0``..``FLAGBIT4`` and comment lines,
:data:`FLAG_DOC`) and the run (checkpoint, grid, ranking).

Files are written atomically (temporary name, then rename).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
from astropy.io import fits
from astropy.io.fits.verify import VerifyWarning
from astropy.table import MaskedColumn, Table

from mendis_ray.atomic import write_atomic
from mendis_ray.science.flags import Flag

log = logging.getLogger(__name__)

__all__ = ["FLAG_DOC", "flag_header_cards", "to_fits_hdu", "write_fits_tables"]

#: bit value -> (name, meaning) of the ``flags`` column (:class:`Flag`).
FLAG_DOC: dict[int, tuple[str, str]] = {int(f): (f.label, f.meaning) for f in Flag}


def flag_header_cards() -> list[tuple[str, object, str]]:
    """Header cards documenting the flag bits: ``FLAGBITn = 'NAME' / FLAGS bit n (value
    2**n)`` and one ``COMMENT`` line per bit with its meaning."""
    cards: list[tuple[str, object, str]] = [
        ("COMMENT", "FLAGS: bit field, 0 = no flag; FLAG_<NAME> columns are the same bits", "")
    ]
    for bit, (name, meaning) in FLAG_DOC.items():
        n = int(np.log2(bit))
        cards.append((f"FLAGBIT{n}", name.upper(), f"FLAGS bit {n} (value {bit})"))
        cards.append(("COMMENT", f"bit {n}={bit} {name.upper()}: {meaning}", ""))
    return cards


def _add_cards(header: fits.Header, cards: Sequence[tuple[str, object, str]]) -> None:
    """Add ``cards``; a card whose value leaves no room for its comment (a long checkpoint
    path) is written without the comment (a long string continues on CONTINUE cards)
    instead of astropy truncating it with a warning on the user's console."""
    for key, value, comment in cards:
        if key == "COMMENT":
            header.add_comment(str(value))
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", VerifyWarning)
            _ = fits.Card(key, value, comment).image  # formats the card: warns if it cannot fit
        header[key] = (value, "" if caught else comment)


def _column(name: str, arr: pa.ChunkedArray | pa.Array) -> MaskedColumn | np.ndarray | None:
    """A FITS-writable column of an arrow column; None for a list/struct (left out)."""
    t = arr.type
    if pa.types.is_nested(t):
        return None
    null = np.asarray(arr.is_null().to_numpy(zero_copy_only=False), bool)
    if pa.types.is_boolean(t):
        return np.asarray(arr.fill_null(False).to_numpy(zero_copy_only=False), bool)
    if pa.types.is_integer(t):
        values = np.asarray(arr.fill_null(0).to_numpy(zero_copy_only=False))
        if not null.any():
            return values
        return MaskedColumn(values, mask=null, fill_value=_int_null(values.dtype))
    if pa.types.is_floating(t):
        values = np.asarray(arr.to_numpy(zero_copy_only=False), dtype=t.to_pandas_dtype())
        return np.where(null, np.nan, values).astype(values.dtype)
    text = ["" if v is None else str(v) for v in arr.to_pylist()]
    width = max(1, *(len(s.encode()) for s in text)) if text else 1
    return np.array([s.encode() for s in text], dtype=f"S{width}")


def _int_null(dtype: np.dtype) -> int:
    """The TNULL of an integer column: its most negative value (or max for unsigned)."""
    info = np.iinfo(dtype)
    return int(info.max if info.min == 0 else info.min)


def to_fits_hdu(
    table: pa.Table, extname: str, cards: Sequence[tuple[str, object, str]] = ()
) -> fits.BinTableHDU:
    """A binary-table HDU of ``table`` (columns upper-cased; nested columns left out)
    with ``cards`` (key, value, comment) in its header.  A column whose upper-case name
    an earlier one has (``TEFF`` carried from the input beside ``teff``) becomes
    ``TEFF_2``, with a warning."""
    cols: dict[str, object] = {}
    first: dict[str, str] = {}
    for name in table.column_names:
        col = _column(name, table.column(name))
        if col is None:
            continue
        key = name.upper()
        if key in cols:
            n = 2
            while f"{key}_{n}" in cols or f"{key}_{n}" in map(str.upper, table.column_names):
                n += 1
            log.warning("%s: columns %r and %r are both %r in FITS; the second is %s_%d",
                        extname, first[key], name, key, key, n)  # fmt: skip
            key = f"{key}_{n}"
        first[key] = name
        cols[key] = col
    t = Table(cols) if cols else Table()
    hdu = fits.table_to_hdu(t)
    hdu.header["EXTNAME"] = extname
    _add_cards(hdu.header, cards)
    return hdu


def write_fits_tables(
    path: str | os.PathLike,
    tables: Mapping[str, pa.Table],
    cards: Sequence[tuple[str, object, str]] = (),
) -> Path:
    """Write each table as a binary-table HDU named by its key (the first one after an
    empty primary HDU; ``cards`` go to the primary header and the first table's),
    atomically."""
    primary = fits.PrimaryHDU()
    _add_cards(primary.header, cards)
    hdus = [primary]
    for k, (extname, table) in enumerate(tables.items()):
        hdus.append(to_fits_hdu(table, extname, cards if k == 0 else ()))
    hdul = fits.HDUList(hdus)
    return write_atomic(path, lambda tmp: hdul.writeto(tmp, output_verify="exception"))
