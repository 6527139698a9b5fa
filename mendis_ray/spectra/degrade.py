"""Degrading noise-free spectra and labels into observations: noise to a target S/N and
Gaussian label scatter.  Pure numpy; the Ray Data pipeline calls these same functions."""

from __future__ import annotations

import numpy as np

__all__ = ["LABEL_SCATTER", "NOISE_FREE_IVAR", "add_noise", "degrade_to_snr", "scatter_labels"]

#: The paper's observational label uncertainties: Teff (K), log g, [Fe/H].
LABEL_SCATTER = (25.0, 0.1, 0.01)

#: ivar written for noise-free simulated flux (sigma 1e-6, below float32 resolution of a
#: continuum-normalized flux); such shards carry ``snr = inf``.
NOISE_FREE_IVAR = 1e12


def add_noise(
    flux: np.ndarray,
    snr: float | np.ndarray,
    rng: np.random.Generator,
    model: str = "photon",
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian noise to signal-to-noise ``snr`` (per pixel, at the continuum).

    Args:
        flux: (n, n_pix) noise-free continuum-normalized flux.
        snr: scalar or (n,) S/N at the continuum.
        rng: numpy Generator (the caller owns determinism).
        model: ``'photon'`` -- sigma = sqrt(flux) / snr (Poisson-like: line cores are
            noisier in absolute terms, less in relative terms); ``'flat'`` -- sigma = 1 / snr.

    Returns:
        noisy flux and ivar = 1 / sigma^2, both (n, n_pix) float32.
    """
    flux = np.asarray(flux, dtype=np.float32)
    snr = np.asarray(snr, dtype=np.float32)
    if snr.ndim == 1:
        snr = snr[:, None]
    if np.any(snr <= 0) or not np.all(np.isfinite(snr)):
        raise ValueError("add_noise: snr must be finite and > 0")
    if model == "photon":
        sigma = np.sqrt(np.clip(flux, 1e-3, None)) / snr
    elif model == "flat":
        sigma = np.broadcast_to(1.0 / snr, flux.shape)
    else:
        raise ValueError(f"add_noise: model must be 'photon' or 'flat', got {model!r}")
    noisy = flux + sigma * rng.standard_normal(flux.shape, dtype=np.float32)
    return noisy.astype(np.float32), (1.0 / sigma**2).astype(np.float32)


def scatter_labels(
    labels: np.ndarray,
    rng: np.random.Generator,
    sigma: tuple[float, ...] = LABEL_SCATTER,
) -> np.ndarray:
    """Observed labels: ``labels`` (n, k) plus Gaussian scatter ``sigma`` (k,)."""
    labels = np.asarray(labels, dtype=np.float64)
    s = np.asarray(sigma, dtype=np.float64)
    if labels.ndim != 2 or labels.shape[1] != s.size:
        raise ValueError(f"scatter_labels: labels {labels.shape} do not match sigma {s.shape}")
    return labels + rng.standard_normal(labels.shape) * s


def degrade_to_snr(
    flux: np.ndarray,
    ivar: np.ndarray,
    snr: float | np.ndarray,
    rng: np.random.Generator | None,
    model: str = "photon",
    z: np.ndarray | None = None,
    snr_in: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Add just enough Gaussian noise that every good pixel has the noise of S/N ``snr``.

    The added variance is ``max(sigma_target^2 - 1/ivar, 0)``: noise-free input
    (``ivar = NOISE_FREE_IVAR``) gets the full target noise, input already noisier than the
    target is left as it is.  Masked pixels (``ivar <= 0``) stay masked and unchanged.

    Args:
        flux, ivar: (n, n_pix).  snr: scalar or (n,) target S/N at the continuum.
        model: ``'photon'`` (sigma = sqrt(flux) / snr) or ``'flat'`` (1 / snr).
        z: (n, n_pix) standard normal draws to use instead of drawing from ``rng``.
        snr_in: (n,) S/N the input was observed at (the shards' ``snr`` column; inf or NaN:
            noise-free or unknown).  With photon noise the target variance of an already
            noisy spectrum is then ``(1/ivar) (snr_in / snr)^2``, which is exact, where the
            noisy flux itself would be a noisy estimate of the true one.

    Returns:
        degraded flux and its ivar, (n, n_pix) float32.
    """
    flux = np.asarray(flux, dtype=np.float32)
    ivar = np.asarray(ivar, dtype=np.float32)
    if flux.shape != ivar.shape:
        raise ValueError(f"degrade_to_snr: flux {flux.shape} and ivar {ivar.shape} differ")
    snr = np.asarray(snr, dtype=np.float32)
    if snr.ndim == 1:
        snr = snr[:, None]
    if np.any(snr <= 0) or not np.all(np.isfinite(snr)):
        raise ValueError("degrade_to_snr: snr must be finite and > 0")
    good = ivar > 0
    var_now = np.where(good, 1.0 / np.where(good, ivar, 1.0), 0.0)
    if model == "photon":
        var_t = np.clip(flux, 1e-3, None) / snr**2
        if snr_in is not None:
            s_in = np.asarray(snr_in, np.float32).reshape(-1, 1)
            known = np.isfinite(s_in) & (s_in > 0)
            var_t = np.where(known & good, var_now * (np.where(known, s_in, 1.0) / snr) ** 2, var_t)
    elif model == "flat":
        var_t = np.broadcast_to(1.0 / snr**2, flux.shape)
    else:
        raise ValueError(f"degrade_to_snr: model must be 'photon' or 'flat', got {model!r}")
    var_add = np.where(good, np.clip(var_t - var_now, 0.0, None), 0.0)
    if z is None:
        if rng is None:
            raise ValueError("degrade_to_snr: give rng or z")
        z = rng.standard_normal(flux.shape, dtype=np.float32)
    elif z.shape != flux.shape:
        raise ValueError(f"degrade_to_snr: z {z.shape} does not match flux {flux.shape}")
    noisy = flux + np.sqrt(var_add) * z
    new_ivar = np.where(good, 1.0 / np.maximum(var_now + var_add, 1e-30), 0.0)
    return noisy.astype(np.float32), new_ivar.astype(np.float32)
