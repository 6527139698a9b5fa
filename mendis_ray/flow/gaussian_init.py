"""Start the flow at the best Gaussian: whiten in the first unit's LU layer.

A flow whose couplings are the identity (as :class:`~mendis_ray.flow.coupling.RQSplineCoupling`
is at initialisation) is an affine map, i.e. a Gaussian density.  Setting the first
invertible linear layer to the Cholesky whitening of a (shrunk) covariance of the
training features makes that Gaussian the shrunk full-covariance Gaussian of the data, so
training starts at the Gaussian baseline's log-likelihood and the splines only have to
learn what is *not* Gaussian.  With ~2400 strongly correlated features, gradient descent
from a random orthogonal start needs many epochs just to find these correlations (the
paper trained 3000 epochs); starting whitened turns that into a fine-tuning problem.

The whitening is exactly representable: with ``C C^T = Sigma`` (C lower triangular), the
map ``x -> C^-1 x`` is lower triangular, ``C^-1 = L D`` with L unit lower triangular and
``D = diag(C^-1) > 0``, i.e. ``P = I``, ``L``, ``U = D`` in ``W = P L U``.
"""

from __future__ import annotations

import numpy as np
import torch

from mendis_ray.flow.actnorm import ActNorm
from mendis_ray.flow.lu import LUInvertibleLinear
from mendis_ray.flow.model import MendisFlow

__all__ = ["initialize_whitened"]


@torch.no_grad()
def initialize_whitened(
    flow: MendisFlow, x_init: torch.Tensor, covariance: np.ndarray | torch.Tensor
) -> None:
    """Data-dependent initialisation that starts ``flow`` at a Gaussian.

    Args:
        flow: a freshly built flow (couplings at identity).
        x_init: (batch, d) standardized training rows for the first ActNorm's statistics
            (the same batch on every DDP rank; the more rows, the closer its mean is to the
            training mean).
        covariance: (d, d) positive-definite covariance of the standardized training
            features (e.g. ``GaussianBaseline().fit(x).covariance_``).
    """
    act, lin = flow.layers[0], flow.layers[1]
    if not isinstance(act, ActNorm) or not isinstance(lin, LUInvertibleLinear):
        raise TypeError("initialize_whitened: the flow must start with ActNorm -> LU linear")
    d = flow.n_features
    cov = torch.as_tensor(np.asarray(covariance), dtype=torch.float64)
    if cov.shape != (d, d):
        raise ValueError(f"initialize_whitened: covariance must be ({d}, {d}), got {cov.shape}")
    act.initialize(x_init)
    s = torch.exp(-act.log_scale.double())  # (d,) ActNorm's per-feature scale
    c = cov * s[:, None] * s[None, :]  # covariance after the first ActNorm
    chol = torch.linalg.cholesky(c)  # (d, d) lower, c = chol chol^T
    eye = torch.eye(d, dtype=torch.float64)
    w = torch.linalg.solve_triangular(chol, eye, upper=False)  # C^-1, lower triangular
    diag = torch.diagonal(w)  # (d,) > 0
    lower = w / diag[None, :]  # unit lower triangular
    lin.lu.copy_(torch.tril(lower, -1).to(lin.lu))
    lin.log_s.copy_(diag.log().to(lin.log_s))
    lin.perm.copy_(torch.arange(d))
    lin.invalidate_cache()
    # The later ActNorms start as the identity (marked initialised), so the whole flow is
    # exactly N(loc, covariance) until training moves the splines.  Re-fitting them to the
    # whitened batch would rescale the shrunk directions back to unit variance, i.e. undo
    # the shrinkage and overfit the covariance.
    for layer in flow.layers:
        if isinstance(layer, ActNorm) and layer is not act:
            layer.loc.zero_()
            layer.log_scale.zero_()
            layer.initialized.fill_(True)
            layer._known_initialized = True
