"""The shard schema's names, its error type, and Arrow list columns <-> numpy matrices.

The pieces that :mod:`mendis_ray.spectra.shards` (shards with our metadata) and
:mod:`mendis_ray.spectra.plain` (plain Parquet files) both use.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

__all__ = [
    "LABEL_COLUMNS",
    "LABEL_LIMITS",
    "META_KEY",
    "MISSING_VALUE",
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "SCHEMA_VERSION",
    "SHARD_COLUMNS",
    "WAVE_KEY",
    "ShardError",
    "impossible_labels",
    "list_matrix",
    "matrix_column",
    "possible_labels",
]

SCHEMA_VERSION = 1
META_KEY = b"mendis_ray"
WAVE_KEY = b"mendis_ray.wavelength"
LABEL_COLUMNS = ("teff", "logg", "feh")
REQUIRED_COLUMNS = ("id", "flux", "ivar")
OPTIONAL_COLUMNS = (*LABEL_COLUMNS, "snr")  # float32; null (unknown) where a file lacks them
SHARD_COLUMNS = (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)
#: (column, unit, low, high) of LABEL_COLUMNS: a value outside what is physically possible
#: is a catalogue's mark of a missing label (-9999) or a wrong unit, never a measurement
LABEL_LIMITS = (("teff", "K", 1000.0, 100_000.0), ("logg", "dex", -2.0, 10.0),
                ("feh", "dex", -10.0, 5.0))  # fmt: skip
#: A value at or below this in a catalogue (APOGEE's -9999, -9999.99) means "missing".
MISSING_VALUE = -9990.0


class ShardError(ValueError):
    """A shard that is not what the reader expects; the message names the file (and row)."""


def matrix_column(m: np.ndarray) -> pa.FixedSizeListArray:
    """(n, k) array -> ``fixed_size_list<float32>[k]`` column (the inverse of
    :func:`list_matrix`)."""
    m = np.ascontiguousarray(m, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1)), m.shape[1])


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


def impossible_labels(labels: np.ndarray) -> np.ndarray:
    """(n,) bool: rows of ``labels`` (n, 3) that give a label (finite, not a catalogue's
    missing mark, :data:`MISSING_VALUE`) outside :data:`LABEL_LIMITS`: a wrong unit or a
    broken catalogue, which :func:`possible_labels` reads as missing and a scorer flags."""
    labels = np.asarray(labels, np.float64)
    if labels.ndim != 2 or labels.shape[1] != len(LABEL_LIMITS):
        return np.zeros(len(labels), bool)
    given = np.isfinite(labels) & (labels > MISSING_VALUE)
    return (given & np.isnan(possible_labels(labels))).any(axis=1)


def possible_labels(labels: np.ndarray) -> np.ndarray:
    """``labels`` (n, 3) float64 (Teff, log g, [Fe/H]) with infinite values and values
    outside :data:`LABEL_LIMITS` set to NaN (missing)."""
    labels = np.array(labels, np.float64)
    if labels.ndim != 2 or labels.shape[1] != len(LABEL_LIMITS):  # another label set
        return np.where(np.isinf(labels), np.nan, labels)
    lo = np.array([lim[2] for lim in LABEL_LIMITS])
    hi = np.array([lim[3] for lim in LABEL_LIMITS])
    with np.errstate(invalid="ignore"):
        return np.where((labels >= lo) & (labels <= hi), labels, np.nan)
