"""Read real APOGEE FITS files (apStar, aspcapStar, allStar) and ingest them as shards.

File layouts handled (SDSS DR12-DR17 data models):

* ``apStar`` -- HDU0 header only (``CRVAL1``, ``CDELT1``, ``NWAVE``, ``SNR``, ``NVISITS``,
  ``OBJID``, ``VHELIO``, ``RV_TEFF``/``RV_LOGG``/``RV_FEH``); HDU1 flux (1e-17 erg/s/cm2/A),
  HDU2 error, HDU3 pixel bitmask (``APOGEE_PIXMASK``), each ``(N, NWAVE)`` with rows 0-1
  the two combined spectra and rows 2.. the visits; a file may also hold 1-d ``(NWAVE,)``
  arrays.  Flux is *not* normalized; :func:`normalize` divides by a pseudo-continuum.
* ``aspcapStar`` -- HDU1 pseudo-continuum normalized flux, HDU2 its error, both 1-d, with
  ``CRVAL1``/``CDELT1``/``NAXIS1`` in the HDU1 header.  DR17 files use the full 8575-pixel
  apStar grid; DR13-DR16 files use 7514 pixels, the three chips with the gaps removed
  (apStar pixels ``[246:3274] + [3585:6080] + [6344:8335]``), although their header only
  says ``CRVAL1 = 4.180476``; :func:`aspcapstar_grid` recognises that layout (and the DR12
  7214-pixel one) and otherwise takes the header at its word (a contiguous log-lambda grid).
* ``allStar`` -- a binary table with ``APOGEE_ID``, ``TEFF``, ``LOGG``, ``FE_H``
  (or ``M_H``); ``-9999`` marks a missing value.

Every problem with an input file raises :class:`FitsInputError` (a ``ValueError``) whose
message starts with the file's path.  :func:`ingest_apogee` reads and checks every file
before it writes anything, and reports all broken files in one error.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from astropy.io import fits
from numpy.polynomial import chebyshev

from mendis_ray.spectra.grid import (
    APSTAR_CDELT1,
    APSTAR_CRVAL1,
    APSTAR_NPIX,
    ASPCAP_CHIPS,
    Grid,
    apstar_grid,
    aspcap_grid,
    log_lambda_grid,
    paper_grid,
    resample,
)
from mendis_ray.spectra.shards import make_table, write_dataset

__all__ = [
    "APOGEE_BAD_BITS",
    "BADERR",
    "DR13_CHIPS",
    "SIG_SKYLINE",
    "ApStarSpectrum",
    "FitsInputError",
    "aspcapstar_grid",
    "bad_pixel_mask",
    "chip_of_pixels",
    "detect_apogee_type",
    "ingest_apogee",
    "normalize",
    "prepare_spectrum",
    "pseudo_continuum",
    "read_apogee",
    "read_apstar",
    "read_aspcapstar",
    "read_label_ids",
    "read_label_table",
]

log = logging.getLogger(__name__)

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
#: apStar pixel ranges (half-open) of the DR13-DR16 7514-pixel aspcapStar grid.
DR13_CHIPS: tuple[tuple[int, int], ...] = ((246, 3274), (3585, 6080), (6344, 8335))
#: A value at or below this in an APOGEE catalogue means "missing" (-9999, -9999.99).
_MISSING_VALUE = -9990.0
_2MASS_ID = re.compile(r"2M\d{8}[+-]\d{7}")
_FILE_ID = re.compile(r"^(?:apStar|asStar|aspcapStar)-[^-]+-(?P<id>.+?)\.fits(?:\.gz)?$")

SpectrumSource = Literal["apStar", "aspcapStar"]


class FitsInputError(ValueError):
    """An input FITS file that cannot be used; the message starts with the file's path."""


@dataclass(frozen=True, eq=False)
class ApStarSpectrum:
    """One APOGEE spectrum as read from a file, on the file's own pixel grid.

    Attributes:
        id: APOGEE identifier (header ``OBJID``/``APOGEE_ID``, else from the file name).
        flux: (n_pix,) float64; apStar: 1e-17 erg/s/cm2/A, aspcapStar: normalized.
        err: (n_pix,) float64 flux uncertainty as stored in the file.
        bitmask: (n_pix,) int64 APOGEE_PIXMASK (all zero for aspcapStar files).
        ivar: (n_pix,) float64 inverse variance, 0 for bad pixels (``APOGEE_BAD_BITS``: bits
            0-7 or 12 set; err <= 0, err >= ``BADERR``, non-finite flux or err).
        grid: the file's wavelength grid (``grid.n_pix == flux.size``).
        source: ``'apStar'`` or ``'aspcapStar'``.
        normalized: whether ``flux`` is already continuum normalized.
        path: the file read.
        row: the row of the 2-d HDUs that was read (0 for 1-d data).
        snr: header S/N (NaN when absent).
        vhelio, rv_teff, rv_logg, rv_feh: header facts from the Doppler RV fit (NaN when
            absent); the RV_* values are *not* ASPCAP labels.
        n_visits: header ``NVISITS`` (None when absent).
        field: header ``FIELD`` (APOGEE field name; "" when absent).
        telescope: header ``TELESCOP``/``TELESCOPE``, else the ``apo25m``/``lco25m``/
            ``apo1m`` folder the file sits in (the SAS layout ``stars/TELESCOPE/FIELD/``),
            else ``lco25m`` for an ``asStar`` file; "" when none says (DR17 apStar headers
            carry no telescope key).
    """

    id: str
    flux: np.ndarray
    err: np.ndarray
    bitmask: np.ndarray
    ivar: np.ndarray
    grid: Grid
    source: SpectrumSource
    normalized: bool
    path: Path
    row: int = 0
    snr: float = float("nan")
    vhelio: float = float("nan")
    rv_teff: float = float("nan")
    rv_logg: float = float("nan")
    rv_feh: float = float("nan")
    n_visits: int | None = None
    field: str = ""
    telescope: str = ""

    @property
    def n_pix(self) -> int:
        return int(self.flux.size)

    @property
    def good(self) -> np.ndarray:
        """(n_pix,) bool, True where ``ivar > 0``."""
        return self.ivar > 0


# --------------------------------------------------------------------------------------
# Low-level FITS access
# --------------------------------------------------------------------------------------


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
    return x if np.isfinite(x) and x > _MISSING_VALUE else float("nan")


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


# --------------------------------------------------------------------------------------
# Grids of files
# --------------------------------------------------------------------------------------


def _apstar_pixel_grid(name: str, chips: Sequence[tuple[int, int]]) -> Grid:
    """A grid of whole apStar pixels: the concatenation of ``chips`` (half-open ranges)."""
    index = np.concatenate([np.arange(a, b) for a, b in chips])
    centre = APSTAR_CRVAL1 + APSTAR_CDELT1 * index
    chip = np.repeat(np.arange(len(chips), dtype=np.int8), [b - a for a, b in chips])
    return Grid(
        name=name,
        log_lo=centre - APSTAR_CDELT1 / 2,
        log_hi=centre + APSTAR_CDELT1 / 2,
        apstar_index=index,
        chip=chip,
    )


def aspcapstar_grid(crval1: float, cdelt1: float, n_pix: int) -> Grid:
    """The pixel grid of a file with header ``CRVAL1``/``CDELT1``/``NAXIS1``.

    The chip-gapped ASPCAP layouts are recognised, since their headers describe only the
    first pixel: 7514 pixels starting at apStar pixel 246 (DR13-DR16) and 7214 pixels
    starting at pixel 322 (DR12, :func:`aspcap_grid`).  The full 8575-pixel apStar grid
    returns :func:`apstar_grid`.  Anything else is a contiguous log-lambda grid.

    Returns:
        a Grid with ``n_pix`` pixels.
    """
    start = (crval1 - APSTAR_CRVAL1) / APSTAR_CDELT1
    on_apstar = abs(cdelt1 - APSTAR_CDELT1) < 1e-12 and abs(start - round(start)) < 1e-3
    if on_apstar:
        first = round(start)
        if first == 0 and n_pix == APSTAR_NPIX:
            return apstar_grid()
        if first == ASPCAP_CHIPS[0][0] and n_pix == aspcap_grid().n_pix:
            return aspcap_grid()
        if first == DR13_CHIPS[0][0] and n_pix == sum(b - a for a, b in DR13_CHIPS):
            return _apstar_pixel_grid("aspcap-dr13", DR13_CHIPS)
    return log_lambda_grid(crval1, cdelt1, n_pix, name=f"log-lambda-{n_pix}")


def chip_of_pixels(grid: Grid) -> np.ndarray:
    """(n_pix,) int8 detector chip (0, 1, 2) of each pixel by the ASPCAP chip ranges
    (apStar pixels [322:3242], [3648:6048], [6412:8306]); -1 outside them."""
    position = (np.log10(grid.wavelength) - APSTAR_CRVAL1) / APSTAR_CDELT1
    index = np.round(position)
    chip = np.full(grid.n_pix, -1, dtype=np.int8)
    for c, (a, b) in enumerate(ASPCAP_CHIPS):
        chip[(index >= a) & (index < b)] = c
    return chip


# --------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------


def _apstar_from(ff: _FitsFile, row: int) -> ApStarSpectrum:
    flux = _image(ff, 1, "flux")
    err = _image(ff, 2, "error")
    mask = _image(ff, 3, "bitmask", dtype=np.int64)
    if flux.shape != err.shape or flux.shape != mask.shape:
        raise ff.fail(
            f"HDU shapes differ: flux {ff.data[1].shape}, error {ff.data[2].shape}, "
            f"bitmask {ff.data[3].shape}"
        )
    n_rows, n_pix = flux.shape
    _check_length(ff, "NWAVE", (0, 1), n_pix)
    if not 0 <= row < n_rows:
        raise ff.fail(f"row {row} asked for, the file holds {n_rows} spectra (rows 0..)")
    crval1, cdelt1 = _wcs(ff, (1, 0))
    grid = aspcapstar_grid(crval1, cdelt1, n_pix)
    f, e, m = flux[row], err[row], mask[row]
    ivar = _ivar(f, e, bad_pixel_mask(m))
    if not np.any(ivar > 0):
        raise ff.fail(f"all {n_pix} pixels of row {row} are bad (bitmask, error or NaN)")
    n_visits = _header_value(ff, "NVISITS")
    snr_key = "SNR" if row < 2 else f"SNRVIS{row - 1}"
    return ApStarSpectrum(
        id=_file_id(ff),
        flux=f,
        err=e,
        bitmask=m,
        ivar=ivar,
        grid=grid,
        source="apStar",
        normalized=False,
        path=ff.path,
        row=row,
        snr=_header_float(ff, snr_key),
        vhelio=_header_float(ff, "VHELIO"),
        rv_teff=_header_float(ff, "RV_TEFF"),
        rv_logg=_header_float(ff, "RV_LOGG"),
        rv_feh=_header_float(ff, "RV_FEH"),
        n_visits=int(n_visits) if isinstance(n_visits, int | float) else None,
        field=_header_text(ff, "FIELD"),
        telescope=_telescope(ff),
    )


def _aspcap_snr(ff: _FitsFile) -> float:
    snr = _header_float(ff, "SNR", (0, 1))
    if np.isfinite(snr) or ff.n_hdu < 5 or ff.is_image[4]:
        return snr
    try:  # DR14-DR17 aspcapStar: HDU4 is the ASPCAP table with an SNR column
        with fits.open(ff.path, memmap=False) as hdul:
            table = hdul[4].data
            if table is not None and "SNR" in table.columns.names:
                return float(np.ravel(table["SNR"])[0])
    except Exception as err:  # a broken optional table must not hide the spectrum
        log.debug("%s: no SNR from HDU4 (%s)", ff.path, err)
    return float("nan")


def _aspcapstar_from(ff: _FitsFile) -> ApStarSpectrum:
    flux = _image(ff, 1, "normalized flux")
    err = _image(ff, 2, "error")
    if flux.shape != err.shape:
        raise ff.fail(f"HDU shapes differ: flux {ff.data[1].shape}, error {ff.data[2].shape}")
    if flux.shape[0] != 1:
        raise ff.fail(f"HDU1 has shape {ff.data[1].shape}; an aspcapStar spectrum is 1-d")
    f, e = flux[0], err[0]
    n_pix = f.size
    _check_length(ff, "NAXIS1", (1,), n_pix)
    crval1, cdelt1 = _wcs(ff, (1, 0))
    grid = aspcapstar_grid(crval1, cdelt1, n_pix)
    ivar = _ivar(f, e, f == 0.0)  # exact zeros fill chip gaps and masked pixels
    if not np.any(ivar > 0):
        raise ff.fail(f"all {n_pix} pixels are bad (zero flux, error or NaN)")
    return ApStarSpectrum(
        id=_file_id(ff),
        flux=f,
        err=e,
        bitmask=np.zeros(n_pix, dtype=np.int64),
        ivar=ivar,
        grid=grid,
        source="aspcapStar",
        normalized=True,
        path=ff.path,
        snr=_aspcap_snr(ff),
        vhelio=_header_float(ff, "VHELIO", (0, 1)),
        field=_header_text(ff, "FIELD"),
        telescope=_telescope(ff),
    )


def read_apstar(path: str | os.PathLike, row: int = 0) -> ApStarSpectrum:
    """Read one spectrum of an apStar file.

    Args:
        path: apStar FITS file.
        row: row of the (N, NWAVE) HDUs: 0 = the default combined spectrum, 1 = the other
            combination, 2.. = visits.  1-d HDUs hold one row.

    Returns:
        ApStarSpectrum with (NWAVE,) arrays on the header's log-lambda grid (for the usual
        header, ``apstar_grid()`` itself), flux not normalized.

    Raises:
        FitsInputError naming the file: unreadable or truncated, fewer than 4 HDUs, HDU
        shapes that differ or are not 1-d/2-d, pixels != NWAVE, no CRVAL1/CDELT1, a row out
        of range, or no good pixel.
    """
    return _apstar_from(_load(path), row)


def read_aspcapstar(path: str | os.PathLike) -> ApStarSpectrum:
    """Read an aspcapStar file: HDU1 normalized flux, HDU2 error, both (n_pix,).

    The grid comes from the HDU1 header (``CRVAL1``, ``CDELT1``, ``NAXIS1``) through
    :func:`aspcapstar_grid`, so DR17 (8575 px), DR13-16 (7514 px) and DR12 (7214 px)
    files, or any contiguous log-lambda grid, are read alike.  Pixels with flux exactly 0,
    non-positive or non-finite error get ivar 0.

    Raises:
        FitsInputError naming the file (as :func:`read_apstar`).
    """
    return _aspcapstar_from(_load(path))


def _detect(ff: _FitsFile) -> SpectrumSource:
    name = ff.path.name
    if name.startswith("aspcapStar"):
        return "aspcapStar"
    if name.startswith(("apStar", "asStar")):
        return "apStar"
    if name.startswith("apVisit"):
        raise ff.fail("apVisit files are not supported; use the apStar file of the star")
    shapes = {i: ff.data[i].shape for i in (1, 2, 3) if i in ff.data}
    if "NWAVE" in ff.headers[0] or (
        3 in ff.data and ff.data[3].dtype.kind in "iu" and shapes[3] == shapes.get(1)
    ):
        return "apStar"
    if 1 in shapes and len(shapes[1]) == 1 and shapes.get(2) == shapes[1]:
        return "aspcapStar"
    raise ff.fail(
        f"neither an apStar nor an aspcapStar file (image HDU shapes {shapes}, {ff.n_hdu} HDUs)"
    )


def detect_apogee_type(path: str | os.PathLike) -> SpectrumSource:
    """``'apStar'`` or ``'aspcapStar'``: from the file name prefix, else from the content
    (an ``NWAVE`` key or an integer bitmask HDU3 means apStar; 1-d HDU1 and HDU2 of
    equal shape mean aspcapStar)."""
    return _detect(_load(path))


def read_apogee(path: str | os.PathLike, row: int = 0) -> ApStarSpectrum:
    """Read an apStar (``row`` as in :func:`read_apstar`) or aspcapStar file (one
    spectrum, ``row`` unused), whichever :func:`detect_apogee_type` says it is."""
    ff = _load(path)
    if _detect(ff) == "apStar":
        return _apstar_from(ff, row)
    return _aspcapstar_from(ff)


# --------------------------------------------------------------------------------------
# Pseudo-continuum normalization
# --------------------------------------------------------------------------------------


def _fit_chip(
    x: np.ndarray,
    y: np.ndarray,
    ivar: np.ndarray,
    degree: int,
    n_iter: int,
    lower: float,
    upper: float,
) -> np.ndarray | None:
    """Coefficients of an asymmetric sigma-clipped weighted Chebyshev fit (or None).

    x, y, ivar: (n,) good pixels of one chip, x in [-1, 1].
    """
    if x.size < 2 * (degree + 1):
        return None
    w = np.sqrt(ivar)
    keep = np.ones(x.size, dtype=bool)
    coef = chebyshev.chebfit(x, y, degree, w=w)
    for _ in range(n_iter):
        z = (y - chebyshev.chebval(x, coef)) * w  # residuals in units of the noise
        scale = float(np.sqrt(np.mean(z[keep] ** 2)))  # rms about the fit of kept pixels
        scale = scale if scale > 0 else 1.0
        new_keep = (z > -lower * scale) & (z < upper * scale)
        if new_keep.sum() < degree + 1:
            break
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
        coef = chebyshev.chebfit(x[keep], y[keep], degree, w=w[keep])
    return coef


def pseudo_continuum(
    flux: np.ndarray,
    ivar: np.ndarray,
    grid: Grid,
    *,
    degree: int = 4,
    n_iter: int = 5,
    lower: float = 2.0,
    upper: float = 3.0,
) -> np.ndarray:
    """Pseudo-continuum of one spectrum, fitted chip by chip.

    Method: for each detector chip (the ASPCAP apStar ranges [322:3242], [3648:6048],
    [6412:8306], see :func:`chip_of_pixels`), a Chebyshev polynomial of ``degree`` in
    log-lambda (scaled to [-1, 1] over the chip) is fitted to the good pixels (ivar > 0,
    finite flux) by weighted least squares with weights ``ivar`` (``w = sqrt(ivar)`` in
    numpy's convention).  Then, up to ``n_iter`` times (stopping early when the kept set no
    longer changes), pixels more than ``lower`` sigma below or ``upper`` sigma above the fit
    are rejected and the fit redone on the rest, where sigma is the rms of the
    noise-normalized residuals ``(flux - fit) * sqrt(ivar)`` of the pixels kept so far.
    The asymmetry discards absorption lines, so the fit climbs from the line-depressed
    first guess to the upper envelope (the rms, unlike a MAD, is inflated by the lines at
    first, which keeps the early iterations from rejecting the true continuum above a low
    first fit); masked pixels never enter the fit.

    Args:
        flux: (n_pix,) flux on ``grid`` (any units; NaN allowed where ivar == 0).
        ivar: (n_pix,) inverse variance, 0 = bad pixel.
        grid: the spectrum's grid.
        degree, n_iter, lower, upper: fit settings (above).

    Returns:
        (n_pix,) continuum; NaN outside the chips and in a chip with fewer than
        ``2 * (degree + 1)`` good pixels.
    """
    flux = np.asarray(flux, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    if flux.shape != (grid.n_pix,) or ivar.shape != flux.shape:
        raise ValueError(
            f"pseudo_continuum: flux {flux.shape} and ivar {ivar.shape} must be "
            f"({grid.n_pix},) for grid {grid.name!r}"
        )
    chip = chip_of_pixels(grid)
    loglam = np.log10(grid.wavelength)
    good = (ivar > 0) & np.isfinite(flux) & np.isfinite(ivar)
    continuum = np.full(grid.n_pix, np.nan)
    for c in range(len(ASPCAP_CHIPS)):
        in_chip = chip == c
        if not in_chip.any():
            continue
        lo, hi = loglam[in_chip].min(), loglam[in_chip].max()
        x = 2.0 * (loglam - lo) / max(hi - lo, 1e-12) - 1.0
        sel = in_chip & good
        scale = np.median(flux[sel]) if sel.any() else 1.0
        scale = scale if np.isfinite(scale) and scale != 0 else 1.0
        coef = _fit_chip(
            x[sel], flux[sel] / scale, ivar[sel] * scale**2, degree, n_iter, lower, upper
        )
        if coef is None:
            log.debug("pseudo_continuum: chip %d has %d good pixels, no fit", c, sel.sum())
            continue
        continuum[in_chip] = scale * chebyshev.chebval(x[in_chip], coef)
    return continuum


def normalize(
    flux: np.ndarray, ivar: np.ndarray, grid: Grid, **fit: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Divide a spectrum by its :func:`pseudo_continuum`.

    Args:
        flux, ivar: (n_pix,) on ``grid``.
        **fit: settings passed to :func:`pseudo_continuum`.

    Returns:
        (flux_norm, ivar_norm, continuum), each (n_pix,): ``flux / continuum`` and
        ``ivar * continuum**2``; pixels outside the chips, without a continuum or with a
        non-positive one get ivar 0 and the placeholder flux 1.0.
    """
    continuum = pseudo_continuum(flux, ivar, grid, **fit)  # type: ignore[arg-type]
    ok = (ivar > 0) & np.isfinite(flux) & np.isfinite(continuum) & (continuum > 0)
    safe = np.where(ok, continuum, 1.0)
    flux_norm = np.where(ok, flux / safe, 1.0)
    ivar_norm = np.where(ok, ivar * safe**2, 0.0)
    return flux_norm, ivar_norm, continuum


def prepare_spectrum(
    spec: ApStarSpectrum, grid: Grid, **fit: float
) -> tuple[np.ndarray, np.ndarray]:
    """Normalize (apStar) and resample a spectrum onto ``grid``.

    Returns:
        (flux, ivar), each (grid.n_pix,) float64; bad pixels have ivar 0 and flux 1.0.
    """
    if spec.normalized:
        flux = np.where(spec.ivar > 0, spec.flux, 1.0)
        ivar = spec.ivar
    else:
        flux, ivar, _ = normalize(spec.flux, spec.ivar, spec.grid, **fit)
    return resample(flux, ivar, spec.grid, grid, fill=1.0)


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
    return np.where(np.isfinite(x) & (x > _MISSING_VALUE), x, np.nan)


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
    try:
        with fits.open(path, memmap=True) as hdul:
            tables = [h for h in hdul if isinstance(h, fits.BinTableHDU)]
            if not tables:
                raise FitsInputError(f"{path}: no binary table HDU (not an allStar-like file)")
            data = tables[0].data
            names = {n.upper(): n for n in data.columns.names}
            cols = [
                _column(names, path, "APOGEE_ID"),
                _column(names, path, "TEFF"),
                _column(names, path, "LOGG"),
                _column(names, path, "FE_H", "M_H"),
            ]
            ids = np.char.strip(np.asarray(data[cols[0]]).astype(str))
            labels = np.stack([_clean_label(data[c]) for c in cols[1:]], axis=1)
    except FitsInputError:
        raise
    except Exception as err:
        raise FitsInputError(
            f"{path}: not a readable FITS table: {type(err).__name__}: {err}"
        ) from err
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
    try:
        with fits.open(path, memmap=True) as hdul:
            data = next(h for h in hdul if isinstance(h, fits.BinTableHDU)).data
            names = {n.upper(): n for n in data.columns.names}
            apogee = np.char.strip(np.asarray(data[_column(names, path, "APOGEE_ID")]).astype(str))
            cols = {n.lower(): np.asarray(data[n]) for n in data.columns.names
                    if _is_id_column(n) and np.asarray(data[n]).ndim == 1}  # fmt: skip
    except FitsInputError:
        raise
    except Exception as err:
        raise FitsInputError(
            f"{path}: not a readable FITS table: {type(err).__name__}: {err}"
        ) from err
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
