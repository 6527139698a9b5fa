"""Calibration of a score against reference stars at the same noise level.

Every score of the signal-space model (:mod:`mendis_ray.science.signal_scores`) is turned
into a tail probability among held-out training stars *with the same noise*: a star at S/N
50 is compared with training stars at S/N 50.  That is what makes an inlier's percentile
uniform in every S/N bin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["NoiseCalibration"]


@dataclass
class NoiseCalibration:
    """The distribution of a statistic u (large = unusual) among reference stars, as a
    function of a noise variable t (the signal fractions ``rho_res`` / ``rho_sig``).

    The reference stars are split into quantile bins of t; each bin keeps the empirical
    quantile function of u (``n_q`` points) and a robust scale (1.4826 x MAD).  The log
    upper-tail probability of a new u is read off the bins at the two nearest bin centres
    and interpolated linearly in t (flat beyond the outer centres): an inlier's tail
    probability is uniform in every noise bin by construction.  Above a bin's largest
    reference value the tail continues exponentially, ``log p = log(1 / (m + 1)) - (u -
    max) / scale``, so extreme outliers keep a finite, ordered score."""

    centers: np.ndarray  # (B,) median t of each bin
    quantiles: np.ndarray  # (B, n_q) u at probabilities linspace(0, 1, n_q)
    scale: np.ndarray  # (B,)
    count: np.ndarray  # (B,) reference stars per bin

    @classmethod
    def fit(cls, t: np.ndarray, u: np.ndarray, n_bins: int = 16, n_q: int = 201):
        ok = np.isfinite(u) & np.isfinite(t)
        t, u = t[ok], u[ok]
        n_bins = max(1, min(n_bins, len(t) // 60))
        order = np.argsort(t, kind="stable")
        parts = np.array_split(order, n_bins)  # equal-count bins of t
        probs = np.linspace(0, 1, n_q)
        centers = np.array([np.median(t[i]) for i in parts])
        quantiles = np.stack([np.quantile(u[i], probs) for i in parts])
        scale = np.array([max(1.4826 * np.median(np.abs(u[i] - np.median(u[i]))), 1e-9)
                          for i in parts])  # fmt: skip
        return cls(centers, quantiles, scale, np.array([len(i) for i in parts], float))

    def _log_tail_bin(self, b: int, u: np.ndarray) -> np.ndarray:
        q = self.quantiles[b]
        probs = np.linspace(0, 1, len(q))
        p_min = 1.0 / (self.count[b] + 1)
        tail = np.maximum(1.0 - np.interp(u, q, probs), p_min)  # (n,)
        beyond = u > q[-1]
        return np.where(beyond, np.log(p_min) - (u - q[-1]) / self.scale[b], np.log(tail))

    def log_tail(self, t: np.ndarray, u: np.ndarray) -> np.ndarray:
        """log P(U >= u | t) (n,): 0 for typical-or-smaller u, very negative for outliers."""
        return self._log_tail(self._groups(t), u)

    def _groups(self, t: np.ndarray) -> tuple | None:
        """Which two bins each star reads, and their weights (None: one bin).  Bin b serves
        the stars with lo == b and those with hi == b, i.e. lo == b - 1: one sort groups
        them, so each bin's quantiles are read once."""
        c = self.centers
        if len(c) == 1:
            return None
        hi = np.clip(np.searchsorted(c, t), 1, len(c) - 1)
        lo = hi - 1
        w = np.clip((t - c[lo]) / np.maximum(c[hi] - c[lo], 1e-12), 0, 1)
        order = np.argsort(lo, kind="stable")
        start = np.searchsorted(lo, np.arange(len(c) + 1), sorter=order)
        return w, order, start

    def _log_tail(self, groups: tuple | None, u: np.ndarray) -> np.ndarray:
        if groups is None:
            return self._log_tail_bin(0, u)
        w, order, start = groups
        out = np.zeros(len(u))
        for b in range(len(self.centers)):
            own, below = order[start[b] : start[b + 1]], order[start[max(b - 1, 0)] : start[b]]
            rows = np.concatenate([own, below])
            if rows.size:
                tail = self._log_tail_bin(b, u[rows])
                out[own] += (1 - w[own]) * tail[: own.size]
                out[below] += w[below] * tail[own.size :]
        return out

    @staticmethod
    def log_tails(cals: list[NoiseCalibration], t: np.ndarray, u: np.ndarray) -> list[np.ndarray]:
        """``[cal.log_tail(t, u[:, j]) for j, cal in enumerate(cals)]`` for statistics ``u``
        (n, m) at the same noise ``t``: the bins are grouped once where the calibrations
        share their centres (fit on the same reference stars), as the residual's do."""
        if not all(np.array_equal(c.centers, cals[0].centers) for c in cals):
            return [c.log_tail(t, u[:, j]) for j, c in enumerate(cals)]
        groups = cals[0]._groups(t) if cals else None
        return [c._log_tail(groups, u[:, j]) for j, c in enumerate(cals)]

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.{k}": getattr(self, k) for k in
                ("centers", "quantiles", "scale", "count")}  # fmt: skip

    @classmethod
    def from_arrays(cls, a: dict, prefix: str) -> NoiseCalibration:
        return cls(*(a[f"{prefix}.{k}"] for k in ("centers", "quantiles", "scale", "count")))
