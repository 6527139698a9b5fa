"""Low-level access to APOGEE FITS files: headers, image HDUs, ids, pixel masks.

:func:`_load` reads every header of a file and the image data of the HDUs asked for into a
:class:`_FitsFile`, turning a missing, non-FITS or truncated file into a
:class:`FitsInputError` that names it; the helpers read typed header values (APOGEE's
``-9999`` as NaN), the wavelength solution, the star's id and telescope, and turn the
``APOGEE_PIXMASK`` bits and errors into an inverse variance.  The readers of apStar and
aspcapStar files built on them are :mod:`mendis_ray.spectra.fits`, which re-exports the
public names.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

from mendis_ray.spectra.schema import MISSING_VALUE

__all__ = [
    "APOGEE_BAD_BITS",
    "BADERR",
    "MISSING_VALUE",
    "SIG_SKYLINE",
    "FitsInputError",
    "bad_pixel_mask",
]

#: APOGEE_PIXMASK bit 12: the pixel lies near a sky line that is significant compared
#: with the object's flux (its sky-subtraction residual looks like an emission feature).
SIG_SKYLINE = 1 << 12
#: The APOGEE_PIXMASK bits that make a pixel bad here, as for the APOGEE pipelines'
#: abundances (ASPCAP gives these pixels no weight): bits 0-7 (BADPIX, CRPIX, SATPIX,
#: UNFIXABLE, BADDARK, BADFLAT, BADERR, NOSKY) and bit 12 (SIG_SKYLINE).  The warning bits
#: (8 LITTROW_GHOST, 9-11 PERSIST_*, 13 SIG_TELLURIC, 14 NOT_ENOUGH_PSF) keep the pixel.
APOGEE_BAD_BITS = 0xFF | SIG_SKYLINE
#: The pipeline sets the error of a masked pixel to 1e10 or more; such pixels are bad too.
BADERR = 1e10
_2MASS_ID = re.compile(r"2M\d{8}[+-]\d{7}")
_FILE_ID = re.compile(r"^(?:apStar|asStar|aspcapStar)-[^-]+-(?P<id>.+?)\.fits(?:\.gz)?$")


class FitsInputError(ValueError):
    """An input FITS file that cannot be used; the message starts with the file's path."""


@dataclass
class _FitsFile:
    """Headers of every HDU and the image data of the HDUs asked for."""

    path: Path
    headers: list[fits.Header]
    is_image: list[bool]
    data: dict[int, np.ndarray] = field(default_factory=dict)

    def fail(self, what: str) -> FitsInputError:
        return FitsInputError(f"{self.path}: {what}{_size_hint(self.path)}")

    @property
    def n_hdu(self) -> int:
        return len(self.headers)


def _size_hint(path: Path) -> str:
    """A note for error messages when an uncompressed file's size is not a whole number of
    2880-byte FITS blocks (the usual sign of a truncated file)."""
    try:
        size = path.stat().st_size
    except OSError:
        return ""
    if path.suffix.lower() in (".gz", ".fz", ".bz2") or size % 2880 == 0:
        return ""
    return f" [file size {size} bytes is not a multiple of 2880: truncated file?]"


def _load(path: str | os.PathLike, data_hdus: Sequence[int] = (1, 2, 3)) -> _FitsFile:
    """Read all headers of ``path`` and the image data of ``data_hdus`` (those present).

    Raises:
        FitsInputError for a missing, non-FITS, truncated or otherwise unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise FitsInputError(f"{path}: no such file")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with fits.open(path, memmap=False, lazy_load_hdus=False) as hdul:
                headers = [h.header.copy() for h in hdul]
                is_image = [isinstance(h, fits.PrimaryHDU | fits.ImageHDU) for h in hdul]
                data = {
                    i: np.array(hdul[i].data)
                    for i in data_hdus
                    if i < len(hdul) and is_image[i] and hdul[i].data is not None
                }
    except Exception as err:  # astropy raises OSError, ValueError, TypeError, ...
        raise FitsInputError(
            f"{path}: not a readable FITS file (not FITS, truncated or corrupt): "
            f"{type(err).__name__}: {err}{_size_hint(path)}"
        ) from err
    truncated = [w for w in caught if "truncat" in str(w.message).lower()]
    if truncated:
        raise FitsInputError(f"{path}: truncated FITS file ({truncated[0].message})")
    return _FitsFile(path=path, headers=headers, is_image=is_image, data=data)


def _header_value(ff: _FitsFile, key: str, hdus: Sequence[int] = (0,)) -> object | None:
    """First value of ``key`` among the headers of ``hdus`` (None when absent)."""
    for i in hdus:
        if i < ff.n_hdu and key in ff.headers[i]:
            return ff.headers[i][key]
    return None


def _header_float(ff: _FitsFile, key: str, hdus: Sequence[int] = (0,)) -> float:
    """Header value as float; NaN when absent, not a number, or an APOGEE -9999."""
    value = _header_value(ff, key, hdus)
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")
    return x if np.isfinite(x) and x > MISSING_VALUE else float("nan")


def _check_length(ff: _FitsFile, key: str, hdus: Sequence[int], n_pix: int) -> None:
    """Raise unless header ``key`` (when present) equals ``n_pix``."""
    value = _header_value(ff, key, hdus)
    if value is None:
        return
    try:
        ok = float(value) == n_pix  # type: ignore[arg-type]
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ff.fail(f"flux has {n_pix} pixels but header {key} = {value!r}")


def _image(ff: _FitsFile, i: int, what: str, dtype: type = np.float64) -> np.ndarray:
    """(n_rows, n_pix) array of image HDU ``i``; 1-d data becomes one row."""
    if i >= ff.n_hdu:
        raise ff.fail(f"has {ff.n_hdu} HDU(s), HDU{i} ({what}) is missing")
    if i not in ff.data:
        kind = "an image" if ff.is_image[i] else "a table"
        raise ff.fail(f"HDU{i} ({what}) holds no image data (it is {kind} without data)")
    arr = ff.data[i]
    if arr.ndim not in (1, 2):
        raise ff.fail(f"HDU{i} ({what}) has shape {arr.shape}; expected (n_pix,) or (n, n_pix)")
    if dtype is np.int64 and arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr) & (arr == np.round(arr))):
            raise ff.fail(f"HDU{i} ({what}) holds non-integer values; expected a bitmask")
    return np.atleast_2d(np.asarray(arr, dtype=dtype))


def _file_id(ff: _FitsFile) -> str:
    """APOGEE id from the header (``OBJID``/``APOGEE_ID``), else from the file name."""
    for key in ("OBJID", "APOGEE_ID"):
        value = _header_value(ff, key, (0, 1))
        if isinstance(value, str) and value.strip():
            return value.strip()
    name = ff.path.name
    m = _2MASS_ID.search(name)
    if m:
        return m.group(0)
    m = _FILE_ID.match(name)
    if m:
        return m.group("id")
    return name.split(".fits")[0]


_TELESCOPES = ("apo25m", "lco25m", "apo1m")


def _header_text(ff: _FitsFile, *keys: str) -> str:
    """The first non-empty string value of ``keys`` in HDU0/HDU1 ("" when none)."""
    for key in keys:
        value = _header_value(ff, key, (0, 1))
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


def _telescope(ff: _FitsFile) -> str:
    """Telescope of an APOGEE file: header, else the SAS folder, else the file prefix."""
    found = _header_text(ff, "TELESCOP", "TELESCOPE")
    if found:
        return found
    for part in reversed(ff.path.absolute().parent.parts):  # as given: links not followed
        if part.lower() in _TELESCOPES:
            return part.lower()
    return "lco25m" if ff.path.name.startswith("asStar") else ""


def _wcs(ff: _FitsFile, hdus: Sequence[int]) -> tuple[float, float]:
    """(crval1, cdelt1) of pixel 0 in log10(Angstrom) from the first header holding them."""
    values = {}
    for key in ("CRVAL1", "CDELT1"):
        value = _header_value(ff, key, hdus)
        if value is None:
            where = " or ".join(f"HDU{i}" for i in hdus)
            raise ff.fail(f"header key {key} missing (looked in {where}); no wavelength grid")
        try:
            values[key] = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ff.fail(f"header key {key} = {value!r} is not a number") from None
    crval1, cdelt1 = values["CRVAL1"], values["CDELT1"]
    crpix1 = _header_float(ff, "CRPIX1", hdus)
    if np.isfinite(crpix1):
        crval1 += (1.0 - crpix1) * cdelt1  # FITS pixels count from 1
    if not (3.0 < crval1 < 5.5 and 0 < cdelt1 < 1e-3):
        raise ff.fail(
            f"CRVAL1 = {crval1}, CDELT1 = {cdelt1} do not describe a log10(Angstrom) grid"
        )
    return crval1, cdelt1


def bad_pixel_mask(bitmask: np.ndarray, bits: int = APOGEE_BAD_BITS) -> np.ndarray:
    """True where ``bitmask`` (any shape, integer) has any of ``bits`` set."""
    return (np.asarray(bitmask, dtype=np.int64) & bits) != 0


def _ivar(flux: np.ndarray, err: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """Inverse variance ``1/err**2``, 0 where ``bad``, err <= 0 or >= BADERR, or non-finite."""
    ok = ~bad & np.isfinite(flux) & np.isfinite(err) & (err > 0) & (err < BADERR)
    return np.where(ok, 1.0 / np.where(ok, err, 1.0) ** 2, 0.0)
