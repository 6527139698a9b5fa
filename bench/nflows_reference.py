"""Stock-nflows build of the Mendis architecture, for speed comparisons and as a numerical
reference for :class:`mendis_ray.flow.model.MendisFlow`.

Unit i (as in MendisFlow):

    nflows ActNorm -> nflows LULinear(identity_init=False) -> nflows Permutation(perm)
        -> nflows PiecewiseRationalQuadraticCouplingTransform(mask, ResidualNet, linear tails)

Mapping of our parameters onto nflows' (``copy_weights``):

- ActNorm: ours ``y = (x - loc) exp(-log_scale)``; nflows ``y = x exp(ls) + shift`` ->
  ``ls = -log_scale``, ``shift = -loc exp(-log_scale)``.
- LU: ours ``y = (x U^T L^T)[:, perm]``; nflows LULinear is ``y = x U^T L^T + bias`` with
  packed ``lower_entries``/``upper_entries`` (row-major tril/triu order) and the diagonal
  ``softplus(unconstrained_upper_diag) + eps`` -> bias = 0, entries copied,
  ``unconstrained = softplus^-1(exp(log_s) - eps)`` (computed in float64; a diagonal entry
  <= eps cannot be represented and raises), then ``Permutation(perm)`` gathers the columns.
- Coupling: same mask; our trunk has nflows ``ResidualNet``'s parameter names (copied as
  a state_dict); our three heads (widths K, heights K, derivatives K-1 per feature) are
  ResidualNet's ``final_layer`` with its rows regrouped: nflows row ``f (3K-1) + j`` is
  feature f's j-th number (widths, then heights, then derivatives).  Both divide widths and
  heights by sqrt(hidden_features).

Import from tests with ``importlib`` (this folder is not a package) or by putting
``bench/`` on ``sys.path``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from nflows.distributions.normal import StandardNormal
from nflows.flows.base import Flow
from nflows.nn.nets import ResidualNet
from nflows.transforms import (
    ActNorm,
    CompositeTransform,
    LULinear,
    Permutation,
    PiecewiseRationalQuadraticCouplingTransform,
)

from mendis_ray.config import FlowConfig
from mendis_ray.flow.actnorm import ActNorm as OurActNorm
from mendis_ray.flow.coupling import RQSplineCoupling
from mendis_ray.flow.lu import LUInvertibleLinear
from mendis_ray.flow.model import MendisFlow

__all__ = ["build_stock_flow", "copy_weights", "stock_mask"]


def stock_mask(n: int, parity: int) -> torch.Tensor:
    """The nflows mask (1 = transformed) of our coupling with this parity."""
    i = torch.arange(n)
    return (i >= n // 2 if parity == 0 else i < n // 2).to(torch.int64)


def build_stock_flow(cfg: FlowConfig) -> Flow:
    """nflows ``Flow`` with the architecture of ``MendisFlow(cfg)`` (weights: nflows' own
    init; use :func:`copy_weights` to share ours)."""
    n = cfg.n_features

    def net(n_in: int, n_out: int) -> ResidualNet:
        return ResidualNet(
            n_in,
            n_out,
            hidden_features=cfg.hidden,
            num_blocks=cfg.n_blocks,
            dropout_probability=cfg.dropout,
        )

    transforms = []
    for i in range(cfg.n_units):
        transforms += [
            ActNorm(n),
            LULinear(n, identity_init=False),
            Permutation(torch.arange(n)),
            PiecewiseRationalQuadraticCouplingTransform(
                mask=stock_mask(n, i % 2),
                transform_net_create_fn=net,
                num_bins=cfg.n_bins,
                tails="linear",
                tail_bound=cfg.tail_bound,
            ),
        ]
    return Flow(CompositeTransform(transforms), StandardNormal([n]))


def _inv_softplus(y: torch.Tensor) -> torch.Tensor:
    """softplus^-1(y) = y + log(-expm1(-y)), accurate for small and large y (y > 0)."""
    return y + torch.log(-torch.expm1(-y))


@torch.no_grad()
def copy_weights(ours: MendisFlow, stock: Flow) -> None:
    """Load our weights into the stock flow so both compute the same function."""
    stock_layers = list(stock._transform._transforms)
    our_units = [ours.layers[i : i + 3] for i in range(0, len(ours.layers), 3)]
    if len(stock_layers) != 4 * len(our_units):
        raise ValueError("copy_weights: the flows have different numbers of units")
    for u, (act, lu, cpl) in enumerate(our_units):
        s_act, s_lu, s_perm, s_cpl = stock_layers[4 * u : 4 * u + 4]
        assert isinstance(act, OurActNorm) and isinstance(s_act, ActNorm)
        assert isinstance(lu, LUInvertibleLinear) and isinstance(s_lu, LULinear)
        assert isinstance(cpl, RQSplineCoupling)
        assert isinstance(s_cpl, PiecewiseRationalQuadraticCouplingTransform)

        # ActNorm: y = (x - loc) e^-ls  ==  x e^-ls + (-loc e^-ls)
        ls = act.log_scale.double()
        s_act.log_scale.copy_(-ls)
        s_act.shift.copy_(-act.loc.double() * torch.exp(-ls))
        s_act.initialized.fill_(True)

        # LU
        n = lu.n
        lu_mat = lu.lu.detach().double().cpu().numpy()
        rows, cols = np.tril_indices(n, k=-1)
        s_lu.lower_entries.copy_(torch.from_numpy(lu_mat[rows, cols].copy()))
        rows, cols = np.triu_indices(n, k=1)
        s_lu.upper_entries.copy_(torch.from_numpy(lu_mat[rows, cols].copy()))
        diag = lu.log_s.detach().double().exp() - s_lu.eps
        if bool((diag <= 0).any()):
            raise ValueError(
                f"copy_weights: unit {u}: LU diagonal entries <= eps={s_lu.eps} cannot be "
                "represented by nflows' softplus parameterisation"
            )
        s_lu.unconstrained_upper_diag.copy_(_inv_softplus(diag))
        s_lu.bias.zero_()
        s_lu.cache.invalidate()
        s_perm._permutation.copy_(lu.perm)

        # coupling
        if not torch.equal(s_cpl.transform_features.cpu(), torch.nonzero(cpl.mask()).flatten()):
            raise ValueError(f"copy_weights: unit {u}: coupling masks differ")
        net = s_cpl.transform_net
        state = net.state_dict()
        state.update(cpl.conditioner.state_dict())  # everything but final_layer
        net.load_state_dict(state)
        k, n_tr = cpl.n_bins, cpl.n_transform
        w = net.final_layer.weight.view(n_tr, 3 * k - 1, -1)  # (n_tr, 3K-1, H)
        b = net.final_layer.bias.view(n_tr, 3 * k - 1)  # (n_tr, 3K-1)
        for head, lo, hi in (
            (cpl.widths, 0, k),
            (cpl.heights, k, 2 * k),
            (cpl.derivatives, 2 * k, 3 * k - 1),
        ):
            w[:, lo:hi].copy_(head.weight.view(n_tr, hi - lo, -1))
            b[:, lo:hi].copy_(head.bias.view(n_tr, hi - lo))
        if not math.isclose(s_cpl.tail_bound, cpl.tail_bound) or s_cpl.num_bins != cpl.n_bins:
            raise ValueError(f"copy_weights: unit {u}: spline settings differ")
