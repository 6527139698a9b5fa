"""SpectrumDensity: the flow plus the standardization that maps physical spectra and
labels onto its inputs, so ``log_prob`` is a density over (flux, Teff, log g, [Fe/H]).

Standardization is per feature: ``x = (v - mean) / std`` with statistics computed once
on the training set and stored in the checkpoint.  The density in physical units is
``log p(v) = log p_flow(x) - sum(log std)`` (the Jacobian of the affine map).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mendis_ray.config import FlowConfig

__all__ = ["SpectrumDensity", "Standardizer"]


@dataclass
class Standardizer:
    """Per-feature affine standardization of (flux, labels).

    Attributes:
        mean, std: (n_features,) float64 arrays; the features are the n_pix fluxes, then
            the labels (Teff, log g, [Fe/H]).
    """

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, flux: np.ndarray, labels: np.ndarray, min_std: float = 1e-6) -> Standardizer:
        """Statistics of a training set: ``flux`` (n, n_pix), ``labels`` (n, n_labels)."""
        v = np.concatenate([np.asarray(flux, np.float64), np.asarray(labels, np.float64)], axis=1)
        if not np.all(np.isfinite(v)):
            raise ValueError("Standardizer.fit: flux and labels must be finite")
        return cls(v.mean(axis=0), np.maximum(v.std(axis=0), min_std))

    @property
    def n_features(self) -> int:
        return int(self.mean.size)

    @property
    def log_abs_det(self) -> float:
        """log |dx / dv| = -sum(log std)."""
        return float(-np.log(self.std).sum())

    def transform(self, flux: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """(n, n_pix), (n, n_labels) -> standardized x (n, n_features) float32."""
        v = np.concatenate([np.asarray(flux, np.float64), np.asarray(labels, np.float64)], axis=1)
        if v.shape[1] != self.n_features:
            raise ValueError(f"Standardizer: got {v.shape[1]} features, expected {self.n_features}")
        return ((v - self.mean) / self.std).astype(np.float32)

    def inverse(self, x: np.ndarray, n_labels: int = 3) -> tuple[np.ndarray, np.ndarray]:
        """Standardized x (n, n_features) -> (flux (n, n_pix), labels (n, n_labels))."""
        v = np.asarray(x, np.float64) * self.std + self.mean
        return v[:, :-n_labels], v[:, -n_labels:]


class SpectrumDensity(nn.Module):
    """A flow on standardized (flux, labels) together with its standardization.

    Args:
        flow: a module with ``log_prob(x)``, ``transform``, ``inverse`` and ``sample``.
        standardizer: training-set statistics.
        config: the flow's architecture.
        grid: description of the wavelength grid (``Grid.describe()``).
    """

    def __init__(
        self, flow: nn.Module, standardizer: Standardizer, config: FlowConfig, grid: dict
    ) -> None:
        super().__init__()
        if standardizer.n_features != config.n_features:
            raise ValueError(
                f"SpectrumDensity: standardizer has {standardizer.n_features} features, "
                f"the flow {config.n_features}"
            )
        self.flow = flow
        self.standardizer = standardizer
        self.config = config
        self.grid = dict(grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """log p_flow of standardized x (batch, n_features) -> (batch,)."""
        return self.flow.log_prob(x)

    def standardize(self, flux: np.ndarray, labels: np.ndarray) -> torch.Tensor:
        """Physical (flux, labels) -> standardized tensor on the flow's device and dtype."""
        p = next(self.flow.parameters())
        x = self.standardizer.transform(flux, labels)
        return torch.as_tensor(x, device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def log_prob(self, flux: np.ndarray, labels: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """log p(flux, labels) in physical units (nats), (n,) float64."""
        out = [np.zeros(0)]
        for a in range(0, len(flux), batch_size):
            x = self.standardize(flux[a : a + batch_size], labels[a : a + batch_size])
            out.append(self.flow.log_prob(x).double().cpu().numpy())
        return np.concatenate(out) + self.standardizer.log_abs_det

    @torch.no_grad()
    def sample(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """n draws of (flux (n, n_pix), labels (n, n_labels)) in physical units."""
        x = self.flow.sample(n, generator=generator).double().cpu().numpy()
        return self.standardizer.inverse(x, self.config.n_labels)
