"""Scoring spectra with the flow: which ones do not belong?

:class:`Scorer` turns a :class:`~mendis_ray.flow.density.SpectrumDensity` into the scores
a survey astronomer triages with, all "higher = more typical":

``log_p``
    Exact log p(flux, Teff, log g, [Fe/H]) in physical units when labels are given.
``log_p_marginal``
    Label-free: log p(flux) = log of the integral of p(flux, y) over the labels y,
    by the Laplace approximation around the profile maximum y* (found by gradient ascent
    in standardized label space): ``log p(flux, y*) + (k/2) log 2 pi - (1/2) log det H``
    with H the negative Hessian of log p in y (k = 3 labels).  Exact when p(flux, y) is
    Gaussian in y, which the tests check against a closed form.  ``labels_profile`` is y*.
``log_p_per_dim``
    ``log_p`` (or the marginal when labels are missing) divided by the number of
    dimensions: comparable across grids and models.
``percentile``
    Percentage of held-out training spectra whose score is <= this one (0 = less
    typical than every reference spectrum).
``log_ratio_gaussian``
    ``log p_flow - log p_gaussian`` (both on the standardized features): the per-pixel
    noise term is nearly the same for both models and cancels, so the ratio isolates what
    the flow knows beyond a Gaussian (it is not raised by a cleaner, higher-S/N spectrum).

Flags (bit field ``flags`` plus boolean columns):

* ``FLAG_NONFINITE`` -- NaN/inf flux or labels at pixels with ivar > 0 (such pixels are
  then treated as masked; such a spectrum's score is not trustworthy);
* ``FLAG_MASKED`` -- more than ``max_masked_fraction`` of pixels masked;
* ``FLAG_FLUX_RANGE`` -- more than 1% of good pixels outside the training flux range
  widened by ``range_sigma`` training standard deviations;
* ``FLAG_LABEL_RANGE`` -- given labels outside the training range widened the same way.

Masked pixels (ivar = 0, or non-finite flux) are filled with the training mean flux at
that pixel before scoring: the score then measures the good pixels plus a perfectly
typical value at the masked ones, i.e. a masked pixel can never make a spectrum look
*less* typical, and heavily masked spectra are flagged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mendis_ray.flow.density import SpectrumDensity

__all__ = [
    "FLAG_FLUX_RANGE",
    "FLAG_LABEL_RANGE",
    "FLAG_MASKED",
    "FLAG_NONFINITE",
    "Scorer",
    "profile_labels",
]

FLAG_NONFINITE = 1
FLAG_MASKED = 2
FLAG_FLUX_RANGE = 4
FLAG_LABEL_RANGE = 8


def profile_labels(
    density: SpectrumDensity,
    x: torch.Tensor,
    n_labels: int = 3,
    steps: int = 200,
    lr: float = 0.05,
    tol: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Maximise log p_flow over the (standardized) label entries of ``x``.

    Args:
        x: (n, n_features) standardized rows; their last ``n_labels`` entries are the
            starting point (0 = the training mean).

    Returns:
        (y*, log p_flow at y*, log det of the negative Hessian in y), shapes (n, k), (n,), (n,).
    """
    flow = density.flow
    spec = x[:, :-n_labels].detach()
    y = x[:, -n_labels:].detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([y], lr=lr)
    prev = None
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        lp = flow.log_prob(torch.cat([spec, y], dim=1))
        (-lp.sum()).backward()
        opt.step()
        cur = float(lp.detach().mean())
        if prev is not None and abs(cur - prev) < tol * max(1.0, abs(cur)):
            break
        prev = cur
    y = y.detach()
    hess = _label_hessian(flow, spec, y)  # (n, k, k) of -log p
    sign, logdet = torch.linalg.slogdet(hess)
    logdet = torch.where(sign > 0, logdet, torch.full_like(logdet, float("nan")))
    with torch.no_grad():
        lp = flow.log_prob(torch.cat([spec, y], dim=1))
    return y, lp, logdet


def _label_hessian(
    flow: torch.nn.Module, spec: torch.Tensor, y: torch.Tensor, h: float = 1e-2
) -> torch.Tensor:
    """Negative Hessian of log p in the labels by central differences of the gradient."""
    k = y.shape[1]

    def grad_at(yy: torch.Tensor) -> torch.Tensor:
        yy = yy.detach().requires_grad_(True)
        lp = flow.log_prob(torch.cat([spec, yy], dim=1)).sum()
        (g,) = torch.autograd.grad(lp, yy)
        return g

    cols = []
    for j in range(k):
        e = torch.zeros_like(y)
        e[:, j] = h
        cols.append((grad_at(y + e) - grad_at(y - e)) / (2 * h))  # (n, k)
    hess = -torch.stack(cols, dim=2)
    return 0.5 * (hess + hess.transpose(1, 2))


@dataclass
class Scorer:
    """Scores for new spectra from a trained density.

    Args:
        density: the trained flow with its standardization.
        reference: (m,) ``log_p`` of held-out training spectra (for percentiles).
        gaussian: optional fitted Gaussian baseline on the *standardized* features
            (``log_prob(x) -> (n,)``) for ``log_ratio_gaussian``.
        flux_range, label_range: (2, n) min/max of the training flux and labels.
        range_sigma: widening of the ranges in training standard deviations.
        max_masked_fraction: above this masked fraction a spectrum is flagged.
    """

    density: SpectrumDensity
    reference: np.ndarray | None = None
    gaussian: object | None = None
    flux_range: np.ndarray | None = None
    label_range: np.ndarray | None = None
    range_sigma: float = 5.0
    max_masked_fraction: float = 0.2
    profile_steps: int = 200

    def score(
        self,
        flux: np.ndarray,
        ivar: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        batch_size: int = 256,
    ) -> dict[str, np.ndarray]:
        """Scores of n spectra.

        Args:
            flux: (n, n_pix). ivar: (n, n_pix) or None (all good).
            labels: (n, 3) Teff, log g, [Fe/H]; NaN rows (or None) are unlabelled.

        Returns:
            dict of (n,) arrays: log_p (NaN where unlabelled), log_p_marginal,
            labels_profile (n, 3), log_p_per_dim, percentile, log_ratio_gaussian,
            masked_fraction, flags and one boolean column per flag.
        """
        std = self.density.standardizer
        n_lab = self.density.config.n_labels
        flux = np.asarray(flux, dtype=np.float64)
        n, n_pix = flux.shape
        if n_pix != std.n_features - n_lab:
            raise ValueError(
                f"Scorer: spectra have {n_pix} pixels, the model {std.n_features - n_lab}"
            )
        ivar = np.ones_like(flux) if ivar is None else np.asarray(ivar, dtype=np.float64)
        if ivar.shape != flux.shape:
            raise ValueError(f"Scorer: ivar {ivar.shape} does not match flux {flux.shape}")
        labels = np.full((n, n_lab), np.nan) if labels is None else np.asarray(labels, np.float64)
        if labels.shape != (n, n_lab):
            raise ValueError(f"Scorer: labels must be ({n}, {n_lab}), got {labels.shape}")

        flags = np.zeros(n, dtype=np.int64)
        bad_value = ~np.isfinite(flux) & (ivar > 0) | ~np.isfinite(ivar)
        bad_label = np.isinf(labels).any(axis=1)
        flags[bad_value.any(axis=1) | bad_label] |= FLAG_NONFINITE
        masked = (ivar <= 0) | ~np.isfinite(flux) | ~np.isfinite(ivar)
        masked_fraction = masked.mean(axis=1)
        flags[masked_fraction > self.max_masked_fraction] |= FLAG_MASKED
        mean_flux = std.mean[:n_pix]
        filled = np.where(masked, mean_flux, flux)
        labels = np.where(np.isinf(labels), np.nan, labels)
        if self.flux_range is not None:
            width = self.range_sigma * std.std[:n_pix]
            out = (filled < self.flux_range[0] - width) | (filled > self.flux_range[1] + width)
            flags[(out & ~masked).mean(axis=1) > 0.01] |= FLAG_FLUX_RANGE
        has_labels = np.isfinite(labels).all(axis=1)
        if self.label_range is not None:
            width = self.range_sigma * std.std[n_pix:]
            lab_out = (labels < self.label_range[0] - width) | (
                labels > self.label_range[1] + width
            )
            flags[has_labels & lab_out.any(axis=1)] |= FLAG_LABEL_RANGE

        log_p = np.full(n, np.nan)
        log_p_marg = np.full(n, np.nan)
        prof = np.full((n, n_lab), np.nan)
        gauss = np.full(n, np.nan)
        lab_fill = np.where(has_labels[:, None], labels, std.mean[n_pix:])
        d = std.n_features
        for a in range(0, n, batch_size):
            sl = slice(a, a + batch_size)
            x = self.density.standardize(filled[sl], lab_fill[sl])
            with torch.no_grad():
                lp = self.density.flow.log_prob(x).double().cpu().numpy()
            log_p[sl] = np.where(has_labels[sl], lp + std.log_abs_det, np.nan)
            x0 = x.clone()
            x0[:, -n_lab:] = 0.0  # start the profile at the training mean
            y, lpy, logdet = profile_labels(self.density, x0, n_lab, steps=self.profile_steps)
            # Laplace in standardized labels, then back to physical units.
            log_p_marg[sl] = (
                lpy.double().cpu().numpy() + 0.5 * n_lab * math.log(2 * math.pi)
                - 0.5 * logdet.double().cpu().numpy() + std.log_abs_det
                + float(np.log(std.std[n_pix:]).sum())
            )  # fmt: skip
            prof[sl] = y.double().cpu().numpy() * std.std[n_pix:] + std.mean[n_pix:]
            if self.gaussian is not None:
                gauss[sl] = self.gaussian.log_prob(x.double().cpu().numpy())
        base = np.where(has_labels, log_p, log_p_marg)
        std_log_p = base - std.log_abs_det if self.gaussian is not None else None
        result = {
            "log_p": log_p,
            "log_p_marginal": log_p_marg,
            "labels_profile": prof,
            "log_p_per_dim": base / np.where(has_labels, d, d - n_lab),
            "percentile": self._percentile(base),
            "log_ratio_gaussian": (std_log_p - gauss) if std_log_p is not None else gauss,
            "masked_fraction": masked_fraction,
            "flags": flags,
            "flag_nonfinite": (flags & FLAG_NONFINITE) > 0,
            "flag_masked": (flags & FLAG_MASKED) > 0,
            "flag_flux_range": (flags & FLAG_FLUX_RANGE) > 0,
            "flag_label_range": (flags & FLAG_LABEL_RANGE) > 0,
        }
        return result

    def _percentile(self, scores: np.ndarray) -> np.ndarray:
        if self.reference is None or len(self.reference) == 0:
            return np.full(scores.shape, np.nan)
        ref = np.sort(np.asarray(self.reference, dtype=np.float64))
        return 100.0 * np.searchsorted(ref, scores, side="right") / ref.size
