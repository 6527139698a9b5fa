"""Degrading noise-free spectra and labels into observations: noise to a target S/N and
Gaussian label scatter.  Pure numpy; the Ray Data pipeline calls these same functions."""

from __future__ import annotations

import numpy as np

__all__ = ["LABEL_SCATTER", "add_noise", "scatter_labels"]

#: The paper's observational label uncertainties: Teff (K), log g, [Fe/H].
LABEL_SCATTER = (25.0, 0.1, 0.01)


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
