"""Full-covariance Gaussian baselines: shrunk covariance and factor analysis.

* :class:`GaussianBaseline` -- a full-covariance Gaussian whose sample covariance is shrunk
  toward a scaled identity (Ledoit & Wolf 2004, or the Oracle Approximating Shrinkage of
  Chen et al. 2010), so it is well posed when ``d > n``.
* :class:`FactorAnalysisBaseline` -- factor analysis, ``C = W W^T + diag(psi)`` by EM
  (Rubin & Thayer 1982): PPCA with a separate noise variance per feature.

The API they share with the other baselines and the flow is in :mod:`.baseline_api`;
import them from :mod:`mendis_ray.science.baselines`.

References:
    O. Ledoit & M. Wolf (2004), "A well-conditioned estimator for large-dimensional
    covariance matrices", J. Multivariate Anal. 88, 365.
    Y. Chen, A. Wiesel, Y. C. Eldar & A. O. Hero (2010), "Shrinkage algorithms for MMSE
    covariance estimation", IEEE Trans. Signal Process. 58, 5016 (eq. 23: OAS).
    D. B. Rubin & D. T. Thayer (1982), "EM algorithms for ML factor analysis",
    Psychometrika 47, 69.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Self

import numpy as np
from scipy import linalg

from mendis_ray.science.baseline_api import (
    _LOG_2PI,
    StateValue,
    _centered_moments,
    _check_x,
    _Fitted,
    _row_chunks,
    _state_array,
    _state_check_kind,
    _state_get,
)

__all__ = [
    "FactorAnalysisBaseline",
    "GaussianBaseline",
    "ledoit_wolf_shrinkage",
    "oas_shrinkage",
]


def _ledoit_wolf_from_moments(s: np.ndarray, norm4: float, n: int) -> float:
    """Ledoit-Wolf (2004) shrinkage intensity from ``S`` (d, d, the 1/n covariance) and
    ``sum_k |xc_k|^4``.

    With ``m = tr(S)/d``, ``d2 = |S - m I|_F^2`` and
    ``b2 = min(d2, n^-2 sum_k |xc_k xc_k^T - S|_F^2)``, the intensity is ``b2 / d2``.  The
    sum uses ``|x x^T - S|_F^2 = |x|^4 - 2 x^T S x + |S|_F^2`` and ``sum_k x_k^T S x_k =
    n |S|_F^2``, so it costs O(n d) beyond ``S``.
    """
    d = s.shape[0]
    m = float(np.trace(s)) / d
    t = s.copy()
    t.flat[:: d + 1] -= m
    d2 = float(np.vdot(t, t))
    if d2 <= 0.0:  # S is already a multiple of I: shrinking changes nothing
        return 0.0
    b2_bar = (norm4 - n * float(np.vdot(s, s))) / float(n) ** 2
    return min(max(b2_bar, 0.0), d2) / d2


def _oas_from_moments(s: np.ndarray, n: int) -> float:
    """Oracle Approximating Shrinkage intensity (Chen et al. 2010, eq. 23) from ``S``."""
    p = s.shape[0]
    tr_s2 = float(np.vdot(s, s))
    tr2 = float(np.trace(s)) ** 2
    num = (1.0 - 2.0 / p) * tr_s2 + tr2
    den = (n + 1.0 - 2.0 / p) * (tr_s2 - tr2 / p)
    if den <= 0.0:
        return 1.0
    return float(min(max(num / den, 0.0), 1.0))


def ledoit_wolf_shrinkage(x: np.ndarray) -> float:
    """Ledoit-Wolf (2004) shrinkage intensity in [0, 1] of the sample ``x`` (n, d).

    The shrunk covariance is ``(1 - a) S + a (tr S / d) I`` with ``S`` the 1/n sample
    covariance; ``a`` minimises the (asymptotic) expected Frobenius loss.
    """
    arr = _check_x(x, "ledoit_wolf_shrinkage", min_rows=2)
    _, scatter, norm4 = _centered_moments(arr)
    return _ledoit_wolf_from_moments(scatter / arr.shape[0], norm4, arr.shape[0])


def oas_shrinkage(x: np.ndarray) -> float:
    """Oracle Approximating Shrinkage intensity in [0, 1] of ``x`` (n, d) (Chen et al. 2010,
    eq. 23; derived for Gaussian data, often better than Ledoit-Wolf when n is small)."""
    arr = _check_x(x, "oas_shrinkage", min_rows=2)
    _, scatter, _ = _centered_moments(arr)
    return _oas_from_moments(scatter / arr.shape[0], arr.shape[0])


class GaussianBaseline(_Fitted):
    """Full-covariance Gaussian with covariance shrinkage toward a scaled identity.

    ``Sigma = (1 - a) S + a (tr S / d) I`` with ``S`` the maximum-likelihood (1/n) sample
    covariance and ``a`` the shrinkage intensity: Ledoit-Wolf (default), OAS, or a fixed
    float in [0, 1].  Any ``a > 0`` makes ``Sigma`` positive definite, so ``d > n`` is fine.
    ``log_prob`` uses the Cholesky factor ``Sigma = L L^T`` (one triangular solve per chunk
    of rows): O(d^3 / 3) once, then O(d^2) per sample.  ``score = log_prob``.

    Args:
        shrinkage: ``"ledoit-wolf"``, ``"oas"`` or a fixed intensity in [0, 1] (0 = plain
            sample covariance, singular when ``d >= n``).

    Attributes (after fit):
        mean_ (d,), covariance_ (d, d), shrinkage_ (the intensity used), n_samples_.
    """

    name: ClassVar[str] = "gaussian"

    def __init__(self, shrinkage: float | Literal["ledoit-wolf", "oas"] = "ledoit-wolf") -> None:
        if isinstance(shrinkage, str):
            if shrinkage not in ("ledoit-wolf", "oas"):
                raise ValueError(
                    f"GaussianBaseline: shrinkage must be 'ledoit-wolf', 'oas' or a float in "
                    f"[0, 1], got {shrinkage!r}"
                )
        elif not (isinstance(shrinkage, int | float) and 0.0 <= float(shrinkage) <= 1.0):
            raise ValueError(
                f"GaussianBaseline: a fixed shrinkage must lie in [0, 1], got {shrinkage!r}"
            )
        self.shrinkage: float | str = shrinkage if isinstance(shrinkage, str) else float(shrinkage)
        self.mean_: np.ndarray | None = None
        self.covariance_: np.ndarray | None = None
        self.shrinkage_: float | None = None
        self.n_samples_: int = 0
        self._chol: np.ndarray | None = None
        self._log_norm: float = 0.0

    def _repr_items(self) -> list[tuple[str, str]]:
        items = [("shrinkage", repr(self.shrinkage))]
        if self.mean_ is not None:
            items += [("d", str(self.mean_.size)), ("shrinkage_", f"{self.shrinkage_:.4g}")]
        return items

    @property
    def is_fitted(self) -> bool:
        return self._chol is not None

    def fit(self, x: np.ndarray) -> Self:
        """Fit the mean and shrunk covariance on ``x`` (n, d), n >= 2."""
        arr = _check_x(x, "GaussianBaseline.fit", min_rows=2)
        n = arr.shape[0]
        mean, scatter, norm4 = _centered_moments(arr)
        return self.fit_moments(mean, scatter / n, n, norm4)

    def fit_moments(
        self, mean: np.ndarray, s: np.ndarray, n: int, norm4: float | None = None
    ) -> Self:
        """Fit from streamed moments: ``mean`` (d,), ``s`` (d, d) the 1/n covariance of
        ``n`` rows, and ``norm4 = sum_k |x_k - mean|^4`` (needed by Ledoit-Wolf only).
        ``fit(x)`` is ``fit_moments`` of the moments of ``x``."""
        mean = np.asarray(mean, np.float64)
        s = np.array(s, np.float64, copy=True)
        if s.shape != (mean.size, mean.size) or n < 2:
            raise ValueError(
                f"{type(self).__name__}.fit_moments: s {s.shape} must be (d, d) for a mean of "
                f"{mean.size} and n >= 2 (got n={n})"
            )
        if self.shrinkage == "ledoit-wolf":
            if norm4 is None:
                raise ValueError("GaussianBaseline.fit_moments: Ledoit-Wolf needs norm4")
            a = _ledoit_wolf_from_moments(s, norm4, n)
        elif self.shrinkage == "oas":
            a = _oas_from_moments(s, n)
        else:
            a = float(self.shrinkage)
        self._set(mean, s, a, n, shrink=True)
        return self

    def _set(self, mean: np.ndarray, s: np.ndarray, a: float, n: int, shrink: bool) -> None:
        d = mean.size
        mu = float(np.trace(s)) / d
        if not mu > 0.0:
            raise ValueError("GaussianBaseline: every feature is constant (zero total variance)")
        cov = s
        if shrink:
            cov = (1.0 - a) * s
            cov.flat[:: d + 1] += a * mu
        try:
            chol = linalg.cholesky(cov, lower=True, check_finite=False)
        except linalg.LinAlgError as exc:
            raise ValueError(
                f"GaussianBaseline: the covariance (n={n}, d={d}, shrinkage={a:.3g}) is not "
                "positive definite; use shrinkage='ledoit-wolf' or a fixed shrinkage > 0"
            ) from exc
        logdet = 2.0 * float(np.sum(np.log(np.diag(chol))))
        self.mean_, self.covariance_, self.shrinkage_, self.n_samples_ = mean, cov, a, n
        self._chol = chol
        self._log_norm = -0.5 * (d * _LOG_2PI + logdet)

    def mahalanobis2(self, x: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance ``(x - mu)^T Sigma^-1 (x - mu)`` of ``x`` (n, d) -> (n,)."""
        self._require_fitted("mahalanobis2")
        assert self.mean_ is not None and self._chol is not None
        arr = _check_x(x, "GaussianBaseline.mahalanobis2", n_features=self.mean_.size)
        out = np.empty(arr.shape[0])
        for sl in _row_chunks(*arr.shape):
            y = (np.asarray(arr[sl], dtype=np.float64) - self.mean_).T  # (d, m), F-ordered
            z = linalg.solve_triangular(self._chol, y, lower=True, check_finite=False)
            out[sl] = np.einsum("ij,ij->j", z, z)
        return out

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        """Gaussian log density (nats) of each row of ``x`` (n, d) -> (n,) float64."""
        self._require_fitted("log_prob")
        return self._log_norm - 0.5 * self.mahalanobis2(x)

    def score(self, x: np.ndarray) -> np.ndarray:
        """Typicality = ``log_prob`` (n,)."""
        self._require_fitted("score")
        return self.log_prob(x)

    def to_state(self) -> dict[str, StateValue]:
        self._require_fitted("to_state")
        assert self.mean_ is not None and self.covariance_ is not None
        method = self.shrinkage if isinstance(self.shrinkage, str) else "fixed"
        return {
            "baseline": self.name,
            "shrinkage_method": method,
            "shrinkage": float(self.shrinkage_ or 0.0),
            "n_samples": int(self.n_samples_),
            "mean": self.mean_.copy(),
            "covariance": self.covariance_.copy(),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Self:
        where = "GaussianBaseline.from_state"
        _state_check_kind(state, cls.name, where)
        method = str(_state_get(state, "shrinkage_method", where))
        a = float(_state_get(state, "shrinkage", where))
        model = cls(a if method == "fixed" else method)  # type: ignore[arg-type]
        mean = _state_array(state, "mean", where, 1)
        cov = _state_array(state, "covariance", where, 2)
        if cov.shape != (mean.size, mean.size):
            raise ValueError(f"{where}: covariance {cov.shape} does not match mean {mean.shape}")
        model._set(mean, cov, a, int(_state_get(state, "n_samples", where)), shrink=False)
        return model


class FactorAnalysisBaseline(GaussianBaseline):
    """Factor analysis: a Gaussian with covariance ``W W^T + diag(psi)`` (k factors plus
    independent per-feature noise), fitted by EM (Rubin & Thayer 1982).

    The noise of a spectrum is independent per pixel but not equal across pixels (in
    standardized units it is ~1 of the variance at a continuum pixel and ~1% in a deep
    line), which probabilistic PCA's single ``sigma^2`` cannot express.  Scoring uses the
    dense covariance through :class:`GaussianBaseline` (same API, same ``covariance_``).

    Args:
        n_factors: k. n_iter: EM iterations (each O(d^2 k), after one O(n d^2) pass that
            forms the sample covariance). min_psi: floor of psi.

    Attributes (after fit): those of :class:`GaussianBaseline` plus ``loadings_`` (d, k),
    ``psi_`` (d,) and ``train_log_prob_`` (mean training log-likelihood after each
    iteration; EM never decreases it).
    """

    name: ClassVar[str] = "factor"

    def __init__(self, n_factors: int = 20, n_iter: int = 100, min_psi: float = 1e-6) -> None:
        super().__init__(shrinkage=0.0)
        if isinstance(n_factors, bool) or not isinstance(n_factors, int | np.integer):
            raise ValueError(f"FactorAnalysisBaseline: n_factors must be an int, got {n_factors!r}")
        if n_factors < 1 or n_iter < 1:
            raise ValueError("FactorAnalysisBaseline: n_factors and n_iter must be >= 1")
        self.n_factors, self.n_iter, self.min_psi = int(n_factors), int(n_iter), float(min_psi)
        self.loadings_: np.ndarray | None = None
        self.psi_: np.ndarray | None = None
        self.train_log_prob_: list[float] = []

    def _repr_items(self) -> list[tuple[str, str]]:
        return [("n_factors", str(self.n_factors)), ("n_iter", str(self.n_iter))]

    def fit(self, x: np.ndarray) -> Self:
        """EM on ``x`` (n, d), started from the top-k principal axes."""
        arr = _check_x(x, "FactorAnalysisBaseline.fit", min_rows=2)
        n = arr.shape[0]
        mean, scatter, _ = _centered_moments(arr)
        return self.fit_moments(mean, scatter / n, n)

    def fit_moments(
        self, mean: np.ndarray, s: np.ndarray, n: int, norm4: float | None = None
    ) -> Self:
        """EM from the sample mean (d,) and 1/n covariance ``s`` (d, d) of ``n`` rows
        (EM needs nothing else; ``norm4`` is ignored)."""
        mean = np.asarray(mean, np.float64)
        s = np.asarray(s, np.float64)
        d = mean.size
        k = self.n_factors
        if s.shape != (d, d) or n < 2:
            raise ValueError(
                f"FactorAnalysisBaseline.fit_moments: s {s.shape} must be ({d}, {d}), n >= 2"
            )
        if k >= d:
            raise ValueError(f"FactorAnalysisBaseline: n_factors={k} must be < d={d}")
        s_diag = np.diag(s).copy()
        lam, vec = linalg.eigh(s, subset_by_index=[d - k, d - 1])
        psi = np.full(d, max(float(s_diag.sum() - lam.sum()) / (d - k), self.min_psi))
        w = vec * np.sqrt(np.clip(lam - psi[0], 0.0, None))  # (d, k) PPCA start
        self.train_log_prob_ = []
        eye = np.eye(k)
        for _ in range(self.n_iter):
            # E step through the sufficient statistic S: beta = W^T C^-1 (Woodbury)
            wp = w / psi[:, None]  # (d, k) = Psi^-1 W
            m_inv = linalg.inv(eye + w.T @ wp)  # (k, k)
            beta = m_inv @ wp.T  # (k, d)
            sb = s @ beta.T  # (d, k) = S beta^T
            ezz = eye - beta @ w + beta @ sb  # (k, k) mean E[z z^T]
            # M step
            w = linalg.solve(ezz, sb.T, assume_a="pos").T  # (d, k)
            psi = np.maximum(s_diag - np.einsum("ij,ij->i", w, sb), self.min_psi)  # (d,)
            self.train_log_prob_.append(_fa_mean_log_prob(s, w, psi))
        self._set_factors(mean, w, psi, n)
        return self

    def _set_factors(self, mean: np.ndarray, w: np.ndarray, psi: np.ndarray, n: int) -> None:
        cov = w @ w.T  # (d, d)
        cov.flat[:: mean.size + 1] += psi
        self.loadings_, self.psi_ = w, psi
        self._set(mean, cov, 0.0, n, shrink=False)

    def to_state(self) -> dict[str, StateValue]:
        self._require_fitted("to_state")
        assert self.mean_ is not None and self.loadings_ is not None and self.psi_ is not None
        return {
            "baseline": self.name,
            "n_factors": self.n_factors,
            "n_iter": self.n_iter,
            "min_psi": self.min_psi,
            "n_samples": int(self.n_samples_),
            "mean": self.mean_.copy(),
            "loadings": self.loadings_.copy(),
            "psi": self.psi_.copy(),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Self:
        where = "FactorAnalysisBaseline.from_state"
        _state_check_kind(state, cls.name, where)
        model = cls(
            int(_state_get(state, "n_factors", where)),
            int(_state_get(state, "n_iter", where)),
            float(state.get("min_psi", 1e-6)),
        )
        mean = _state_array(state, "mean", where, 1)
        w = _state_array(state, "loadings", where, 2)
        psi = _state_array(state, "psi", where, 1)
        if w.shape != (mean.size, model.n_factors) or psi.shape != mean.shape:
            raise ValueError(f"{where}: loadings {w.shape} / psi {psi.shape} do not match mean")
        model._set_factors(mean, w, psi, int(_state_get(state, "n_samples", where)))
        return model


def _fa_mean_log_prob(s: np.ndarray, w: np.ndarray, psi: np.ndarray) -> float:
    """Mean Gaussian log-likelihood of data with 1/n covariance ``s`` under
    N(mean, W W^T + diag(psi)): -1/2 (d log 2 pi + log det C + tr(C^-1 S))."""
    d, k = w.shape
    wp = w / psi[:, None]
    m = np.eye(k) + w.T @ wp  # (k, k)
    logdet = float(np.log(psi).sum() + np.linalg.slogdet(m)[1])
    # tr(C^-1 S) = tr(Psi^-1 S) - tr(M^-1 W^T Psi^-1 S Psi^-1 W)
    tr = float((np.diag(s) / psi).sum() - np.trace(linalg.solve(m, wp.T @ s @ wp)))
    return -0.5 * (d * _LOG_2PI + logdet + tr)
