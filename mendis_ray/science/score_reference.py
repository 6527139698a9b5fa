"""What scoring needs besides the flow, from held-out training spectra.

:class:`ScoreReference` holds the reference statistics (ranges, signal subspace, reference
scores, Gaussian baseline) and stores them as flat arrays in a checkpoint;
:func:`signal_subspace` finds the signal directions; :func:`fill_masked` is the
masked-pixel fill shared by fitting and scoring; the checks of the reference rows are here
too.  :class:`~mendis_ray.science.ood.Scorer` fits and uses them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from mendis_ray.science.baselines import GaussianBaseline

__all__ = ["ScoreReference", "fill_masked", "signal_subspace"]


def signal_subspace(
    x: np.ndarray, n_signal: int | str = "auto", max_signal: int = 64, factor: float = 10.0
) -> np.ndarray:
    """Orthonormal rows spanning the top principal directions of ``x`` (n, d).

    ``n_signal="auto"`` keeps the directions whose variance exceeds ``factor`` times the
    Marchenko-Pastur upper edge of pure noise, ``median(lambda) (1 + sqrt(d / n))^2``:
    directions that noise alone would not produce *and* in which the signal dominates
    the noise, so that the projection is insensitive to the noise level (between 1 and
    ``max_signal``).  Returns (k, d).
    """
    xc = np.asarray(x, np.float64)
    xc = xc - xc.mean(axis=0)
    n, d = xc.shape
    _, sv, vt = np.linalg.svd(xc, full_matrices=False)
    lam = sv**2 / max(n - 1, 1)
    if n_signal == "auto":
        edge = np.median(lam) * (1.0 + np.sqrt(d / n)) ** 2
        k = int(np.clip((lam > factor * edge).sum(), 1, max_signal))
    else:
        k = int(n_signal)
        if not 1 <= k < min(n, d):
            raise ValueError(f"signal_subspace: n_signal={k} must be in [1, {min(n, d) - 1}]")
    return vt[:k].copy()


@dataclass
class ScoreReference:
    """What scoring needs besides the flow, computed once from held-out training spectra.

    Attributes:
        flux_range: (2, n_pix) min and max training flux. label_range: (2, k) likewise.
        center: (d,) mean standardized feature vector (spectrum, labels); basis:
            (n_signal, d) orthonormal signal directions (standardized units).
        ref_log_p, ref_signal: (m,) scores of the reference spectra (joint, signal).
        ref_log_p_marginal: (m2,) label-free scores of (a subset of) them.
        gaussian: a Gaussian baseline on the standardized features, or None.
    """

    flux_range: np.ndarray
    label_range: np.ndarray
    center: np.ndarray
    basis: np.ndarray
    ref_log_p: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ref_signal: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ref_log_p_marginal: np.ndarray = field(default_factory=lambda: np.zeros(0))
    gaussian: GaussianBaseline | None = None

    _ARRAYS = (
        "flux_range", "label_range", "center", "basis",
        "ref_log_p", "ref_signal", "ref_log_p_marginal",
    )  # fmt: skip

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat dict of float64 arrays (for a safetensors checkpoint)."""
        out = {k: np.ascontiguousarray(getattr(self, k), dtype=np.float64) for k in self._ARRAYS}
        if self.gaussian is not None:
            # any GaussianBaseline (incl. factor analysis) is stored as mean + covariance
            g = self.gaussian
            out["gaussian.mean"] = np.ascontiguousarray(g.mean_, dtype=np.float64)
            out["gaussian.covariance"] = np.ascontiguousarray(g.covariance_, dtype=np.float64)
            out["gaussian.meta"] = np.array([float(g.shrinkage_ or 0.0), float(g.n_samples_)])
        return out

    @classmethod
    def from_arrays(
        cls, arrays: Mapping[str, np.ndarray], where: str = "ScoreReference"
    ) -> ScoreReference:
        missing = [k for k in cls._ARRAYS if k not in arrays]
        if missing:
            raise ValueError(f"{where}: missing score-reference arrays {missing}")
        kw = {k: np.asarray(arrays[k], dtype=np.float64) for k in cls._ARRAYS}
        gauss = None
        if "gaussian.mean" in arrays:
            meta = np.asarray(arrays["gaussian.meta"])
            gauss = GaussianBaseline.from_state(
                {
                    "baseline": "gaussian",
                    "shrinkage_method": "fixed",
                    "shrinkage": float(meta[0]),
                    "n_samples": int(meta[1]),
                    "mean": np.asarray(arrays["gaussian.mean"], np.float64),
                    "covariance": np.asarray(arrays["gaussian.covariance"], np.float64),
                }
            )
        return cls(**kw, gaussian=gauss)


def fill_masked(
    flux: np.ndarray, ivar: np.ndarray, fill: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Masked pixels (ivar <= 0, NaN or +inf ivar, or non-finite flux) of ``flux``
    (n, n_pix) replaced by ``fill`` (n_pix,) (the training mean): (filled flux, mask)
    (n, n_pix)."""
    masked = ~((ivar > 0) & np.isfinite(ivar)) | ~np.isfinite(flux)
    return np.where(masked, fill, flux), masked


def _reference_rows(
    flux: np.ndarray, labels: np.ndarray, ivar: np.ndarray | None, name: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked reference rows: (flux (m, n_pix), labels (m, 3), good-pixel mask)."""
    flux = np.asarray(flux, np.float64)
    labels = np.asarray(labels, np.float64)
    ivar = np.ones_like(flux) if ivar is None else np.asarray(ivar, np.float64)
    if ivar.shape != flux.shape:
        raise ValueError(f"Scorer.fit: {name} {flux.shape} and its ivar {ivar.shape} differ")
    good = (ivar > 0) & np.isfinite(ivar) & np.isfinite(flux)
    if not np.isfinite(labels).all():
        raise ValueError(f"Scorer.fit: the reference labels of {name} must be finite")
    if not good.any(axis=1).all():
        row = int(np.flatnonzero(~good.any(axis=1))[0])
        raise ValueError(f"Scorer.fit: {name} row {row} has no good pixel (ivar > 0, finite)")
    return flux, labels, good


def _good_range(flux: np.ndarray, good: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """(2, n_pix) min and max of ``flux`` over good pixels (``fill`` where none is)."""
    lo = np.where(good, flux, np.inf).min(axis=0)
    hi = np.where(good, flux, -np.inf).max(axis=0)
    none = ~good.any(axis=0)
    return np.stack([np.where(none, fill, lo), np.where(none, fill, hi)])
