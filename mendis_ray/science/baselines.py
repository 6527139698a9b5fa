"""Classical density / outlier baselines with one scoring API shared with the flow.

Four models, each fitted on an ``(n, d)`` sample and scoring new ``(m, d)`` samples:

* :class:`GaussianBaseline` -- a full-covariance Gaussian whose sample covariance is shrunk
  toward a scaled identity (Ledoit & Wolf 2004, or the Oracle Approximating Shrinkage of
  Chen et al. 2010), so it is well posed when ``d > n``.
* :class:`FactorAnalysisBaseline` -- factor analysis, ``C = W W^T + diag(psi)`` by EM
  (Rubin & Thayer 1982): PPCA with a separate noise variance per feature.
* :class:`PCABaseline` -- probabilistic PCA (Tipping & Bishop 1999), the closed-form maximum
  likelihood fit: ``C = W W^T + sigma^2 I`` with ``sigma^2`` the mean discarded eigenvalue.
* :class:`HotellingT2` -- Hotelling's T^2 in the top-k principal subspace and its companion,
  the squared prediction error (SPE, the Q statistic) off that subspace: the classic
  process-monitoring pair (Jackson & Mudholkar 1979; MacGregor & Kourti 1995).

The shared API (:class:`Baseline`) is ``fit(x) -> self``, ``log_prob(x) -> (m,)`` in nats,
``score(x) -> (m,)`` where HIGHER means MORE TYPICAL (inlier-like), and
``to_state() / from_state()`` to a flat ``dict`` of numpy arrays, floats, ints and strings
(storable with ``np.savez`` and reloadable with ``allow_pickle=False``).

All arithmetic is float64 whatever the input dtype; the data are streamed in row chunks, so
a float32 ``(20_000, 2408)`` array is never copied whole.  The models do not standardize:
pass standardized features when the columns have different units (the Gaussian's shrinkage
target and the principal axes are not scale invariant).  Covariances are the maximum
likelihood (``1/n``) estimates throughout.

References:
    O. Ledoit & M. Wolf (2004), "A well-conditioned estimator for large-dimensional
    covariance matrices", J. Multivariate Anal. 88, 365.
    Y. Chen, A. Wiesel, Y. C. Eldar & A. O. Hero (2010), "Shrinkage algorithms for MMSE
    covariance estimation", IEEE Trans. Signal Process. 58, 5016 (eq. 23: OAS).
    M. E. Tipping & C. M. Bishop (1999), "Probabilistic principal component analysis",
    J. R. Stat. Soc. B 61, 611.
    D. B. Rubin & D. T. Thayer (1982), "EM algorithms for ML factor analysis",
    Psychometrika 47, 69.
    H. Hotelling (1947), "Multivariate quality control"; J. E. Jackson & G. S. Mudholkar
    (1979), "Control procedures for residuals associated with principal component
    analysis", Technometrics 21, 341; G. E. P. Box (1954), Ann. Math. Stat. 25, 290.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Literal, Protocol, Self, runtime_checkable

import numpy as np
from scipy import linalg, stats

__all__ = [
    "BASELINES",
    "Baseline",
    "FactorAnalysisBaseline",
    "GaussianBaseline",
    "HotellingT2",
    "NotFittedError",
    "PCABaseline",
    "baseline_from_state",
    "ledoit_wolf_shrinkage",
    "oas_shrinkage",
]

#: A value in a baseline's state dict: arrays and plain scalars only (no pickle needed).
StateValue = np.ndarray | float | int | str

_LOG_2PI = math.log(2.0 * math.pi)
#: float64 elements per streamed row chunk (32 MiB).
_CHUNK_ELEMENTS = 1 << 22


class NotFittedError(ValueError):
    """A baseline was used (scored, saved) before :meth:`fit` or :meth:`from_state`."""


class _Fitted:
    """What every baseline shares: ``n_features``, the not-fitted error and ``__repr__``.

    A subclass defines ``is_fitted``, ``mean_`` (None until fitted) and
    :meth:`_repr_items` (its arguments, then, when fitted, what fitting found)."""

    mean_: np.ndarray | None

    @property
    def is_fitted(self) -> bool:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    def _repr_items(self) -> list[tuple[str, str]]:
        return []

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v}" for k, v in self._repr_items())
        return f"{type(self).__name__}({items})"

    @property
    def n_features(self) -> int:
        self._require_fitted("n_features")
        assert self.mean_ is not None
        return int(self.mean_.size)

    def _require_fitted(self, what: str) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                f"{type(self).__name__}.{what}: the model is not fitted; "
                "call fit(x) or from_state()"
            )


@runtime_checkable
class Baseline(Protocol):
    """The scoring API shared by the baselines and the flow.

    ``x`` is always ``(n, d)`` real; outputs are ``(n,)`` float64.
    """

    name: str

    def fit(self, x: np.ndarray) -> Self:
        """Fit on ``x`` (n, d); returns ``self``."""
        ...

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        """Log density (nats) of each row of ``x`` (n, d) -> (n,)."""
        ...

    def score(self, x: np.ndarray) -> np.ndarray:
        """Typicality of each row of ``x`` (n, d) -> (n,): higher = more inlier-like."""
        ...

    def to_state(self) -> dict[str, StateValue]:
        """The fitted model as a flat dict of arrays and scalars."""
        ...

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Self:
        """Rebuild a fitted model from :meth:`to_state` output (or ``np.load`` of it)."""
        ...


# ----------------------------------------------------------------------------- helpers


def _row_chunks(n: int, d: int) -> Iterator[slice]:
    """Row slices of at most ``_CHUNK_ELEMENTS`` float64 elements each."""
    step = max(1, _CHUNK_ELEMENTS // max(d, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _check_x(
    x: np.ndarray,
    where: str,
    n_features: int | None = None,
    min_rows: int = 0,
) -> np.ndarray:
    """Validate ``x`` as a finite real ``(n, d)`` array (not copied); clear errors otherwise.

    Raises:
        ValueError: wrong dtype or rank, ``d != n_features``, fewer than ``min_rows`` rows,
            or a non-finite value (the message names the first bad row and column).
    """
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{where}: x must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(
            f"{where}: x must be 2-D (n_samples, n_features), got shape {arr.shape}"
            + ("; pass x[None, :] for a single sample" if arr.ndim == 1 else "")
        )
    n, d = arr.shape
    if n_features is not None and d != n_features:
        raise ValueError(
            f"{where}: x has {d} features (columns) but the model was fitted on {n_features}"
        )
    if n < min_rows:
        raise ValueError(f"{where}: need at least {min_rows} samples (rows), got {n}")
    if arr.dtype.kind == "f":
        for sl in _row_chunks(n, d):
            ok = np.isfinite(arr[sl])
            if not ok.all():
                bad_rows = sl.start + np.flatnonzero(~ok.all(axis=1))
                row = int(bad_rows[0])
                col = int(np.flatnonzero(~np.isfinite(arr[row]))[0])
                every = np.flatnonzero(~np.isfinite(arr).all(axis=1))
                more = (
                    f"; {every.size} non-finite rows in all, the first: {every[:10].tolist()}"
                    if every.size > 1
                    else ""
                )
                raise ValueError(
                    f"{where}: row {row} of x is not finite ({arr[row, col]!r} in column "
                    f"{col}){more}"
                )
    return arr


def _centered_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Two-pass streamed moments of ``x`` (n, d).

    Returns:
        mean (d,), scatter ``Xc^T Xc`` (d, d) and ``sum_k |xc_k|^4`` (the fourth-moment
        term of the Ledoit-Wolf estimator), all float64, with ``Xc = x - mean``.
    """
    n, d = x.shape
    mean = np.mean(x, axis=0, dtype=np.float64)
    scatter = np.zeros((d, d))
    norm4 = 0.0
    for sl in _row_chunks(n, d):
        c = np.asarray(x[sl], dtype=np.float64) - mean
        scatter += c.T @ c
        sq = np.einsum("ij,ij->i", c, c)
        norm4 += float(sq @ sq)
    return mean, scatter, norm4


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


def _state_get(state: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in state:
        raise ValueError(f"{where}: state has no {key!r} entry (keys: {sorted(state)})")
    return state[key]


def _state_array(state: Mapping[str, Any], key: str, where: str, ndim: int) -> np.ndarray:
    arr = np.array(_state_get(state, key, where), dtype=np.float64, copy=True)
    if arr.ndim != ndim:
        raise ValueError(f"{where}: state[{key!r}] must be {ndim}-D, got shape {arr.shape}")
    return arr


def _state_check_kind(state: Mapping[str, Any], expected: str, where: str) -> None:
    kind = str(_state_get(state, "baseline", where))
    if kind != expected:
        raise ValueError(f"{where}: state is for baseline {kind!r}, not {expected!r}")


# ----------------------------------------------------------------------------- Gaussian


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


# ----------------------------------------------------------------------------- PCA family


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


#: Baseline classes by their ``name`` (the ``"baseline"`` entry of a state dict).
BASELINES: dict[str, type[GaussianBaseline] | type[PCABaseline] | type[HotellingT2]] = {
    GaussianBaseline.name: GaussianBaseline,
    FactorAnalysisBaseline.name: FactorAnalysisBaseline,
    PCABaseline.name: PCABaseline,
    HotellingT2.name: HotellingT2,
}


def baseline_from_state(state: Mapping[str, Any]) -> GaussianBaseline | PCABaseline | HotellingT2:
    """Rebuild whichever baseline ``state`` (from ``to_state`` or ``np.load``) describes."""
    kind = str(_state_get(state, "baseline", "baseline_from_state"))
    if kind not in BASELINES:
        raise ValueError(
            f"baseline_from_state: unknown baseline {kind!r}; known: {sorted(BASELINES)}"
        )
    return BASELINES[kind].from_state(state)
