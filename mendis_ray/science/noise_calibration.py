"""Calibration of a score against reference stars at the same noise level.

Every score of the signal-space model (:mod:`mendis_ray.science.signal_scores`) is turned
into a tail probability among held-out training stars *with the same noise*: a star at S/N
50 is compared with training stars at S/N 50.  That is what makes an inlier's percentile
uniform in every S/N bin.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = ["NoiseCalibration", "percentile_precision"]

TAIL_FROM = 0.9  # the pooled tail starts at each bin's 90th percentile (class doc)
MIN_POOLED = 50  # fewer pooled exceedances: no pooled tail
_MIN_SCALE = 1e-9  # the floor of a bin's scale


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
    max) / scale``, so extreme outliers keep a finite, ordered score.

    A bin of m stars resolves no tail below 1 / (m + 1) (16 bins of 2,000 stars: 1/126),
    so outliers between a bin's two largest values all share that floor.  With a pooled
    tail (``tail_from`` = 0.9, the default of :meth:`fit`), a bin's tail beyond its own
    90th percentile is read from the exceedances of every bin, each in units of its bin's
    scale: ``P(U >= u) = 0.1 x P(Z >= (u - u_90) / scale)``, resolved to 0.1 / (M + 1)
    for M pooled exceedances (about 1/2,000 there), the same exponential beyond them
    (the factor is the bin's own tail at u_90: 0.1, less where values tie there, so the
    tail stays continuous and non-increasing; a bin whose scale is the floor, over half
    its values tied, keeps its own tail).  This assumes the tail's shape, not its
    location or width, is common to the noise levels.  Survey benchmark, one model,
    references refitted: off the giant branch 0.978 -> 0.982, single-element anomalies
    0.970 -> 0.974, between the alpha sequences 0.906 -> 0.910 (``score``); pooled from
    the 80th percentile the residual score's inliers were 5.9 points off uniform in one
    S/N bin (3.1 from the 90th); for the structure tests the pooled tail cost between the
    sequences 0.936 -> 0.933 (``signal_score``), so theirs stays per bin
    (``tail_from=None``)."""

    centers: np.ndarray  # (B,) median t of each bin
    quantiles: np.ndarray  # (B, n_q) u at probabilities linspace(0, 1, n_q)
    scale: np.ndarray  # (B,)
    count: np.ndarray  # (B,) reference stars per bin
    tail_thr: np.ndarray | None = None  # (B,) each bin's u at fit's ``tail_from`` quantile
    tail_q: np.ndarray | None = None  # (n_q,) pooled (u - tail_thr) / scale, quantiles
    tail_count: np.ndarray | None = None  # (1,) pooled exceedances

    @classmethod
    def fit(
        cls, t: np.ndarray, u: np.ndarray, n_bins: int = 16, n_q: int = 201,
        tail_from: float | None = TAIL_FROM,
    ) -> NoiseCalibration:  # fmt: skip
        """From reference stars' noise variable ``t`` and statistic ``u`` (n,); non-finite
        pairs left out; ``tail_from``: where the pooled tail starts (None: none)."""
        ok = np.isfinite(u) & np.isfinite(t)
        t, u = t[ok], u[ok]
        n_bins = max(1, min(n_bins, len(t) // 60))
        order = np.argsort(t, kind="stable")
        parts = np.array_split(order, n_bins)  # equal-count bins of t
        probs = _probs(n_q)
        centers = np.array([np.median(t[i]) for i in parts])
        quantiles = np.stack([np.quantile(u[i], probs) for i in parts])
        scale = np.array([max(1.4826 * np.median(np.abs(u[i] - np.median(u[i]))), _MIN_SCALE)
                          for i in parts])  # fmt: skip
        cal = cls(centers, quantiles, scale, np.array([len(i) for i in parts], float))
        if tail_from is not None:
            cal._pool_tails(u, parts, tail_from, probs)
        return cal

    def _pool_tails(self, u: np.ndarray, parts: list, tail_from: float, probs: np.ndarray):
        """The pooled tail's arrays (class doc) from each bin's stars ``u[parts[b]]``.  A
        bin whose scale is the floor (over half its values tied) joins neither the pool
        nor reads it (threshold +inf): its exceedances over a zero scale are infinite."""
        usable = self.scale > _MIN_SCALE
        thr = np.array([np.quantile(u[i], tail_from) if ok else np.inf  # (B,)
                        for i, ok in zip(parts, usable, strict=True)])  # fmt: skip
        z = np.concatenate([(u[i][u[i] > thr[b]] - thr[b]) / self.scale[b]
                            for b, i in enumerate(parts)])  # fmt: skip
        if z.size >= MIN_POOLED:
            self.tail_thr, self.tail_q = thr, np.quantile(z, probs)
            self.tail_count = np.array([z.size], float)

    def _log_tail_bin(self, b: int, u: np.ndarray) -> np.ndarray:
        q, scale = self.quantiles[b], self.scale[b]
        out = _empirical_log_tail(q, self.count[b], u, scale)  # (n,)
        if self.tail_q is not None:  # beyond the bin's threshold: the pooled tail, from the
            thr = self.tail_thr[b]  # bin's own tail there (0.1; less where values tie at it)
            above = u > thr
            start = _empirical_log_tail(q, self.count[b], np.array([thr]), scale)[0]
            z = (u[above] - thr) / scale
            out[above] = start + _empirical_log_tail(self.tail_q, self.tail_count[0], z, 1.0)
        return out

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
        keys = _FIELDS + (_TAIL_FIELDS if self.tail_q is not None else ())
        return {f"{prefix}.{k}": getattr(self, k) for k in keys}

    @classmethod
    def from_arrays(cls, a: dict, prefix: str) -> NoiseCalibration:
        """From :meth:`arrays`' keys; the pooled tail's all or none (none: a reference
        written before it).  A missing key raises KeyError naming it."""
        cal = cls(*(a[f"{prefix}.{k}"] for k in _FIELDS))
        if any(f"{prefix}.{k}" in a for k in _TAIL_FIELDS):
            for k in _TAIL_FIELDS:
                setattr(cal, k, a[f"{prefix}.{k}"])  # KeyError if only some are there
        return cal


_FIELDS = ("centers", "quantiles", "scale", "count")
_TAIL_FIELDS = ("tail_thr", "tail_q", "tail_count")


@lru_cache(maxsize=8)
def _probs(n_q: int) -> np.ndarray:
    """linspace(0, 1, n_q), read-only: built once, not on each of a score call's ~1,000
    tail reads."""
    probs = np.linspace(0, 1, n_q)
    probs.flags.writeable = False
    return probs


def _empirical_log_tail(q: np.ndarray, m: float, u: np.ndarray, scale: float) -> np.ndarray:
    """log P(U >= u) (n,) from the quantiles ``q`` (n_q,) at linspace(0, 1, n_q) of m
    values: resolved to 1 / (m + 1), exponential with scale ``scale`` beyond the largest."""
    p_min = 1.0 / (m + 1)
    tail = np.maximum(1.0 - np.interp(u, q, _probs(len(q))), p_min)
    return np.where(u > q[-1], np.log(p_min) - (u - q[-1]) / scale, np.log(tail))


def percentile_precision(n_reference: int, fraction: float = 0.1) -> float:
    """About how far (percentile points) an inlier's percentile is off in a ``fraction`` of
    the noise range when ``n_reference`` held-out stars calibrate it: the mean Kolmogorov
    distance of an empirical distribution of that many values, 87 / sqrt(n x fraction).
    Survey benchmark (``bench/bench_reference.py``), the worst of four S/N bins (S/N
    500-1000 holds a tenth of the stars), 12,000 independent inliers: 3.5-6.2 points with
    2,000 held-out stars (this gives 6.2 for a tenth), 2.6-3.3 with 6,000 (3.6)."""
    m = max(1.0, n_reference * fraction)
    return 87.0 / float(np.sqrt(m))
