"""Read real APOGEE FITS files (apStar, aspcapStar, allStar) and ingest them as shards.

File layouts handled (SDSS DR12-DR17 data models):

* ``apStar`` -- HDU0 header only (``CRVAL1``, ``CDELT1``, ``NWAVE``, ``SNR``, ``NVISITS``,
  ``OBJID``, ``VHELIO``, ``RV_TEFF``/``RV_LOGG``/``RV_FEH``); HDU1 flux (1e-17 erg/s/cm2/A),
  HDU2 error, HDU3 pixel bitmask (``APOGEE_PIXMASK``), each ``(N, NWAVE)`` with rows 0-1
  the two combined spectra and rows 2.. the visits; a file may also hold 1-d ``(NWAVE,)``
  arrays.  Flux is *not* normalized; :func:`~mendis_ray.spectra.continuum.normalize` divides
  by a pseudo-continuum.
* ``aspcapStar`` -- HDU1 pseudo-continuum normalized flux, HDU2 its error, both 1-d, with
  ``CRVAL1``/``CDELT1``/``NAXIS1`` in the HDU1 header.  DR17 files use the full 8575-pixel
  apStar grid; DR13-DR16 files use 7514 pixels, the three chips with the gaps removed
  (apStar pixels ``[246:3274] + [3585:6080] + [6344:8335]``), although their header only
  says ``CRVAL1 = 4.180476``; :func:`aspcapstar_grid` recognises that layout (and the DR12
  7214-pixel one) and otherwise takes the header at its word (a contiguous log-lambda grid).
* ``allStar`` -- a binary table with ``APOGEE_ID``, ``TEFF``, ``LOGG``, ``FE_H``
  (or ``M_H``); ``-9999`` marks a missing value.

Every problem with an input file raises :class:`FitsInputError` (a ``ValueError``) whose
message starts with the file's path.  Low-level access (headers, image HDUs, ids, pixel
masks) is :mod:`mendis_ray.spectra.fits_access`; ingest into shards (and the allStar label
table) :mod:`mendis_ray.spectra.ingest`; the pseudo-continuum
:mod:`mendis_ray.spectra.continuum`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from astropy.io import fits

from mendis_ray.spectra.continuum import normalize
from mendis_ray.spectra.fits_access import (
    APOGEE_BAD_BITS,
    BADERR,
    MISSING_VALUE,
    SIG_SKYLINE,
    FitsInputError,
    _check_length,
    _file_id,
    _FitsFile,
    _header_float,
    _header_text,
    _header_value,
    _image,
    _ivar,
    _load,
    _telescope,
    _wcs,
    bad_pixel_mask,
)
from mendis_ray.spectra.grid import (
    APSTAR_CDELT1,
    APSTAR_CRVAL1,
    APSTAR_NPIX,
    ASPCAP_CHIPS,
    Grid,
    apstar_grid,
    apstar_subset,
    aspcap_grid,
    log_lambda_grid,
    resample,
)

__all__ = [
    "APOGEE_BAD_BITS",
    "BADERR",
    "DR13_CHIPS",
    "MISSING_VALUE",
    "SIG_SKYLINE",
    "ApStarSpectrum",
    "FitsInputError",
    "aspcapstar_grid",
    "bad_pixel_mask",
    "detect_apogee_type",
    "prepare_spectrum",
    "read_apogee",
    "read_apstar",
    "read_aspcapstar",
]

log = logging.getLogger(__name__)

#: apStar pixel ranges (half-open) of the DR13-DR16 7514-pixel aspcapStar grid.
DR13_CHIPS: tuple[tuple[int, int], ...] = ((246, 3274), (3585, 6080), (6344, 8335))

SpectrumSource = Literal["apStar", "aspcapStar"]


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
# Grids of files
# --------------------------------------------------------------------------------------


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
            index = np.concatenate([np.arange(a, b) for a, b in DR13_CHIPS])
            return apstar_subset("aspcap-dr13", index, DR13_CHIPS)
    return log_lambda_grid(crval1, cdelt1, n_pix, name=f"log-lambda-{n_pix}")


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
