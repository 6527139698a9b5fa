"""Pseudo-continuum normalization of an un-normalized (apStar) spectrum, chip by chip:
an asymmetric sigma-clipped weighted Chebyshev fit per detector chip, then a division.
numpy only; :mod:`mendis_ray.spectra.fits` applies it to apStar files before ingest."""

from __future__ import annotations

import logging

import numpy as np
from numpy.polynomial import chebyshev

from mendis_ray.spectra.grid import APSTAR_CDELT1, APSTAR_CRVAL1, ASPCAP_CHIPS, Grid, chip_of_index

__all__ = ["chip_of_pixels", "normalize", "pseudo_continuum"]

log = logging.getLogger(__name__)


def chip_of_pixels(grid: Grid) -> np.ndarray:
    """(n_pix,) int8 detector chip (0, 1, 2) of each pixel by the ASPCAP chip ranges
    (apStar pixels [322:3242], [3648:6048], [6412:8306]); -1 outside them."""
    position = (np.log10(grid.wavelength) - APSTAR_CRVAL1) / APSTAR_CDELT1
    return chip_of_index(np.round(position), ASPCAP_CHIPS)


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
