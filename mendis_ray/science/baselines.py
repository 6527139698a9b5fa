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

The shared API and helpers are in :mod:`.baseline_api`, the Gaussians in
:mod:`.gaussian_baselines`, the principal-subspace models in :mod:`.subspace_baselines`;
this module is the one public entry point (it re-exports them) and holds the registry of
state-dict names (:data:`BASELINES`, :func:`baseline_from_state`).

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

from collections.abc import Mapping
from typing import Any

from mendis_ray.science.baseline_api import Baseline, NotFittedError, _state_get
from mendis_ray.science.gaussian_baselines import (
    FactorAnalysisBaseline,
    GaussianBaseline,
    ledoit_wolf_shrinkage,
    oas_shrinkage,
)
from mendis_ray.science.subspace_baselines import HotellingT2, PCABaseline

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
