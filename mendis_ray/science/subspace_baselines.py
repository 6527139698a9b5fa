"""Baselines in the top-k principal subspace: probabilistic PCA and Hotelling's T^2.

* :class:`PCABaseline` -- probabilistic PCA (Tipping & Bishop 1999), the closed-form maximum
  likelihood fit: ``C = W W^T + sigma^2 I`` with ``sigma^2`` the mean discarded eigenvalue.
* :class:`HotellingT2` -- Hotelling's T^2 in the top-k principal subspace and its companion,
  the squared prediction error (SPE, the Q statistic) off that subspace: the classic
  process-monitoring pair (Jackson & Mudholkar 1979; MacGregor & Kourti 1995).

Both share the fit of the subspace (:class:`_PrincipalSubspace`).  The API they share with
the other baselines and the flow is in :mod:`.baseline_api`; import them from
:mod:`mendis_ray.science.baselines`.

References:
    M. E. Tipping & C. M. Bishop (1999), "Probabilistic principal component analysis",
    J. R. Stat. Soc. B 61, 611.
    H. Hotelling (1947), "Multivariate quality control"; J. E. Jackson & G. S. Mudholkar
    (1979), "Control procedures for residuals associated with principal component
    analysis", Technometrics 21, 341; G. E. P. Box (1954), Ann. Math. Stat. 25, 290.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Self

import numpy as np
from scipy import linalg, stats

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

__all__ = ["HotellingT2", "PCABaseline"]


class _PrincipalSubspace(_Fitted):
    """Shared fit of the top-k principal subspace (PCA by eigh of S or SVD of the data).

    Attributes (after fit): mean_ (d,), components_ (k, d) orthonormal rows ordered by
    decreasing variance (sign fixed so each row's largest-magnitude entry is positive),
    explained_variance_ (k,) the top-k eigenvalues of the 1/n sample covariance,
    discarded_variance_ (sum of the other d - k eigenvalues), discarded_variance_sq_ (sum
    of their squares) and n_samples_.
    """

    name: ClassVar[str] = "subspace"

    def __init__(self, n_components: int, solver: Literal["auto", "eigh", "svd"] = "auto") -> None:
        cls = type(self).__name__
        if isinstance(n_components, bool) or not isinstance(n_components, int | np.integer):
            raise ValueError(f"{cls}: n_components must be an int, got {n_components!r}")
        if n_components < 1:
            raise ValueError(f"{cls}: n_components must be >= 1, got {n_components}")
        if solver not in ("auto", "eigh", "svd"):
            raise ValueError(f"{cls}: solver must be 'auto', 'eigh' or 'svd', got {solver!r}")
        self.n_components = int(n_components)
        self.solver = solver
        self.mean_: np.ndarray | None = None
        self.components_: np.ndarray | None = None
        self.explained_variance_: np.ndarray | None = None
        self.discarded_variance_: float = 0.0
        self.discarded_variance_sq_: float = 0.0
        self.n_samples_: int = 0

    def _repr_items(self) -> list[tuple[str, str]]:
        fitted = [("d", str(self.mean_.size))] if self.mean_ is not None else []
        return [("n_components", str(self.n_components)), *fitted]

    @property
    def is_fitted(self) -> bool:
        return self.components_ is not None

    def fit(self, x: np.ndarray) -> Self:
        """Fit the principal subspace on ``x`` (n, d); needs ``n_components < d`` and
        ``n_components <= n - 1``.  ``solver='auto'`` uses the SVD of the centered (n, d)
        data when ``n < d`` and a partial eigendecomposition of the (d, d) covariance
        otherwise."""
        cls = type(self).__name__
        arr = _check_x(x, f"{cls}.fit", min_rows=2)
        n, d = arr.shape
        k = self.n_components
        if k >= d:
            raise ValueError(f"{cls}.fit: n_components={k} must be < the {d} features")
        if k > n - 1:
            raise ValueError(f"{cls}.fit: n_components={k} needs at least {k + 1} samples, got {n}")
        use_svd = self.solver == "svd" or (self.solver == "auto" and n < d)
        if use_svd:
            mean = np.mean(arr, axis=0, dtype=np.float64)
            xc = np.asarray(arr, dtype=np.float64) - mean
            try:
                _, sv, vt = linalg.svd(xc, full_matrices=False, check_finite=False)
            except linalg.LinAlgError:
                _, sv, vt = linalg.svd(
                    xc, full_matrices=False, check_finite=False, lapack_driver="gesvd"
                )
            lam = sv**2 / n
            evals, comps = lam[:k].copy(), vt[:k].copy()
            theta1 = float(np.sum(lam[k:]))
            theta2 = float(np.sum(lam[k:] ** 2))
        else:
            mean, scatter, _ = _centered_moments(arr)
            s = scatter / n
            w, v = linalg.eigh(s, subset_by_index=[d - k, d - 1], driver="evr", check_finite=False)
            evals, comps = w[::-1].copy(), v[:, ::-1].T.copy()
            theta1 = float(np.trace(s)) - float(np.sum(evals))
            theta2 = float(np.vdot(s, s)) - float(np.sum(evals**2))
        if not evals[-1] > 1e-12 * max(float(evals[0]), 1e-300):
            raise ValueError(
                f"{cls}.fit: the data have fewer than n_components={k} directions with "
                f"nonzero variance (eigenvalues {evals.tolist()}); reduce n_components"
            )
        signs = np.sign(comps[np.arange(k), np.argmax(np.abs(comps), axis=1)])
        comps *= np.where(signs == 0, 1.0, signs)[:, None]
        self._set(mean, comps, evals, max(theta1, 0.0), max(theta2, 0.0), n)
        return self

    def _set(
        self,
        mean: np.ndarray,
        comps: np.ndarray,
        evals: np.ndarray,
        theta1: float,
        theta2: float,
        n: int,
    ) -> None:
        self.mean_, self.components_, self.explained_variance_ = mean, comps, evals
        self.discarded_variance_, self.discarded_variance_sq_ = theta1, theta2
        self.n_samples_ = n

    def _project(self, x: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
        """Principal coordinates (n, k) and squared residual off the subspace (n,)."""
        self._require_fitted(what)
        assert self.mean_ is not None and self.components_ is not None
        arr = _check_x(x, f"{type(self).__name__}.{what}", n_features=self.mean_.size)
        proj = np.empty((arr.shape[0], self.n_components))
        resid = np.empty(arr.shape[0])
        for sl in _row_chunks(*arr.shape):
            y = np.asarray(arr[sl], dtype=np.float64) - self.mean_
            p = y @ self.components_.T
            r = y - p @ self.components_
            proj[sl] = p
            resid[sl] = np.einsum("ij,ij->i", r, r)
        return proj, resid

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Principal coordinates ``U_k^T (x - mu)`` of ``x`` (n, d) -> (n, k)."""
        return self._project(x, "transform")[0]

    def reconstruction_error(self, x: np.ndarray) -> np.ndarray:
        """Squared residual off the principal subspace, ``|(I - U_k U_k^T)(x - mu)|^2``, of
        ``x`` (n, d) -> (n,) (the orthogonal-projection residual, not PPCA's shrunk
        posterior-mean reconstruction)."""
        return self._project(x, "reconstruction_error")[1]

    def _base_state(self) -> dict[str, StateValue]:
        self._require_fitted("to_state")
        assert self.mean_ is not None and self.components_ is not None
        assert self.explained_variance_ is not None
        return {
            "baseline": self.name,
            "n_components": int(self.n_components),
            "n_samples": int(self.n_samples_),
            "discarded_variance": float(self.discarded_variance_),
            "discarded_variance_sq": float(self.discarded_variance_sq_),
            "mean": self.mean_.copy(),
            "components": self.components_.copy(),
            "explained_variance": self.explained_variance_.copy(),
        }

    def to_state(self) -> dict[str, StateValue]:
        return self._base_state()

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Self:
        where = f"{cls.__name__}.from_state"
        _state_check_kind(state, cls.name, where)
        model = cls(int(_state_get(state, "n_components", where)))
        mean = _state_array(state, "mean", where, 1)
        comps = _state_array(state, "components", where, 2)
        evals = _state_array(state, "explained_variance", where, 1)
        if comps.shape != (model.n_components, mean.size) or evals.size != model.n_components:
            raise ValueError(
                f"{where}: components {comps.shape} / explained_variance {evals.shape} do not "
                f"match n_components={model.n_components} and mean {mean.shape}"
            )
        model._set(
            mean,
            comps,
            evals,
            float(_state_get(state, "discarded_variance", where)),
            float(_state_get(state, "discarded_variance_sq", where)),
            int(_state_get(state, "n_samples", where)),
        )
        return model


class PCABaseline(_PrincipalSubspace):
    """Probabilistic PCA (Tipping & Bishop 1999), closed-form maximum-likelihood fit.

    With ``lambda_1 >= ... >= lambda_d`` the eigenvalues of the 1/n sample covariance and
    ``u_j`` the eigenvectors: ``sigma^2 = mean(lambda_{k+1..d})`` (zeros included when
    ``n <= d``), ``W = U_k (Lambda_k - sigma^2 I)^{1/2}`` (rotation R = I) and the model
    density is ``N(mu, C)``, ``C = W W^T + sigma^2 I``.  ``log_prob`` never forms ``C``: by
    the Woodbury identity and the matrix determinant lemma (equivalently, in the eigenbasis)

        (x-mu)^T C^-1 (x-mu) = sum_j (u_j.(x-mu))^2 / lambda_j + |residual|^2 / sigma^2
        log|C| = sum_j log lambda_j + (d - k) log sigma^2,

    O(d k) per sample.  ``score = log_prob``; :meth:`reconstruction_error` is the squared
    residual off the principal subspace.

    Args:
        n_components: k, with ``1 <= k < d`` and ``k <= n - 1``.
        solver: ``"auto"`` (SVD of the data when n < d, else eigh of the covariance),
            ``"eigh"`` or ``"svd"``.
    """

    name: ClassVar[str] = "ppca"

    @property
    def noise_variance_(self) -> float:
        """The ML isotropic noise variance ``sigma^2`` (mean discarded eigenvalue)."""
        self._require_fitted("noise_variance_")
        assert self.mean_ is not None
        return self.discarded_variance_ / (self.mean_.size - self.n_components)

    @property
    def loadings(self) -> np.ndarray:
        """``W`` (d, k) = ``U_k (Lambda_k - sigma^2 I)^{1/2}``."""
        self._require_fitted("loadings")
        assert self.components_ is not None and self.explained_variance_ is not None
        scale = np.sqrt(np.clip(self.explained_variance_ - self.noise_variance_, 0.0, None))
        return self.components_.T * scale

    def covariance(self) -> np.ndarray:
        """The dense model covariance ``W W^T + sigma^2 I`` (d, d) (for checks and small d)."""
        w = self.loadings
        cov = w @ w.T
        cov.flat[:: cov.shape[0] + 1] += self.noise_variance_
        return cov

    def _set(
        self,
        mean: np.ndarray,
        comps: np.ndarray,
        evals: np.ndarray,
        theta1: float,
        theta2: float,
        n: int,
    ) -> None:
        # Relative test: with rank-k data the residual is round-off (~1e-16 of the total).
        if not theta1 > 1e-10 * (theta1 + float(np.sum(evals))):
            raise ValueError(
                f"PCABaseline: the residual variance off the top {comps.shape[0]} components is "
                "zero (the data lie in that subspace), so the density is degenerate; reduce "
                "n_components or add noise"
            )
        super()._set(mean, comps, evals, theta1, theta2, n)

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        """PPCA log density (nats) of each row of ``x`` (n, d) -> (n,)."""
        proj, resid = self._project(x, "log_prob")
        assert self.mean_ is not None and self.explained_variance_ is not None
        d, k = self.mean_.size, self.n_components
        s2 = self.noise_variance_
        lam = self.explained_variance_
        maha = (proj**2) @ (1.0 / lam) + resid / s2
        logdet = float(np.sum(np.log(lam))) + (d - k) * math.log(s2)
        return -0.5 * (d * _LOG_2PI + logdet + maha)

    def score(self, x: np.ndarray) -> np.ndarray:
        """Typicality = ``log_prob`` (n,)."""
        return self.log_prob(x)


class HotellingT2(_PrincipalSubspace):
    """Hotelling's T^2 in the top-k principal subspace, with the SPE (Q) statistic.

    ``T^2 = sum_{j<=k} (u_j.(x - mu))^2 / lambda_j`` (eigenpairs of the 1/n sample
    covariance; on the training set mean T^2 = k exactly) measures the departure WITHIN the
    subspace where the signal lives; ``SPE = |(I - U_k U_k^T)(x - mu)|^2`` measures the
    departure OFF it.  ``score = -T^2``: it ignores the residual, so the isotropic noise in
    the other d - k directions (whose chi^2 dominates a full-dimensional likelihood) cannot
    hide a small shift along a principal axis.

    ``log_prob`` is the Gaussian log density of the k principal coordinates,
    ``-(k log 2 pi + sum_j log lambda_j + T^2) / 2`` -- a density on R^k, not on R^d, so
    it is not comparable with the other baselines' log_prob.

    Args:
        n_components: k, with ``1 <= k < d`` and ``k <= n - 1``.
        solver: as for :class:`PCABaseline`.
    """

    name: ClassVar[str] = "hotelling_t2"

    def t2(self, x: np.ndarray) -> np.ndarray:
        """Hotelling T^2 of each row of ``x`` (n, d) -> (n,)."""
        proj = self._project(x, "t2")[0]
        assert self.explained_variance_ is not None
        return (proj**2) @ (1.0 / self.explained_variance_)

    def spe(self, x: np.ndarray) -> np.ndarray:
        """Squared prediction error (Q statistic) off the subspace of ``x`` (n, d) -> (n,)."""
        return self._project(x, "spe")[1]

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        """Log density (nats) of the k principal coordinates of ``x`` (n, d) -> (n,)."""
        proj = self._project(x, "log_prob")[0]
        assert self.explained_variance_ is not None
        lam = self.explained_variance_
        norm = self.n_components * _LOG_2PI + float(np.sum(np.log(lam)))
        return -0.5 * (norm + (proj**2) @ (1.0 / lam))

    def score(self, x: np.ndarray) -> np.ndarray:
        """Typicality = ``-T^2`` (n,)."""
        proj = self._project(x, "score")[0]
        assert self.explained_variance_ is not None
        return -((proj**2) @ (1.0 / self.explained_variance_))

    def t2_limit(self, alpha: float = 0.01) -> float:
        """Upper control limit of T^2 for a new observation at false-alarm rate ``alpha``:
        ``k (n + 1) / (n - k) F_{k, n-k}(1 - alpha)`` (Tracy, Young & Mason 1992, rescaled to
        the 1/n covariance used here; approximate because the axes are estimated too)."""
        self._require_fitted("t2_limit")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"HotellingT2.t2_limit: alpha must be in (0, 1), got {alpha}")
        n, k = self.n_samples_, self.n_components
        if n <= k:
            return math.inf
        return float(k * (n + 1) / (n - k) * stats.f.ppf(1.0 - alpha, k, n - k))

    def spe_limit(self, alpha: float = 0.01) -> float:
        """Upper control limit of SPE at false-alarm rate ``alpha``: Box's (1954) scaled
        chi^2 approximation ``g chi^2_h(1 - alpha)`` with ``g = theta2 / theta1`` and
        ``h = theta1^2 / theta2`` from the discarded eigenvalues (exact for isotropic
        Gaussian noise)."""
        self._require_fitted("spe_limit")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"HotellingT2.spe_limit: alpha must be in (0, 1), got {alpha}")
        t1, t2 = self.discarded_variance_, self.discarded_variance_sq_
        if t1 <= 0.0 or t2 <= 0.0:
            return 0.0
        return float(t2 / t1 * stats.chi2.ppf(1.0 - alpha, t1**2 / t2))
