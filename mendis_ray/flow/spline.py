"""The monotonic rational-quadratic spline with linear tails (Durkan et al. 2019) as one
pure function, :func:`rq_spline`, elementwise over any batch shape.

The math of nflows' ``rational_quadratic_spline`` (eqs. 4-8 and the inverse's quadratic
root, with its minimum bin width / height / derivative) and the linear tails of
``unconstrained_rational_quadratic_spline`` (the identity outside ``[-bound, bound]``,
boundary derivatives 1), written without nflows' data-dependent checks (a domain check and
an assert that each read the whole tensor back): points outside the interval are routed
around the spline with ``torch.where``, so the function is one straight-line graph that
``torch.compile`` fuses whole (see :mod:`mendis_ray.flow.coupling`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from nflows.transforms.splines.rational_quadratic import (
    DEFAULT_MIN_BIN_HEIGHT,
    DEFAULT_MIN_BIN_WIDTH,
    DEFAULT_MIN_DERIVATIVE,
)
from torch import Tensor

__all__ = [
    "DEFAULT_MIN_BIN_HEIGHT",
    "DEFAULT_MIN_BIN_WIDTH",
    "DEFAULT_MIN_DERIVATIVE",
    "derivative_identity_constant",
    "rq_spline",
]


def derivative_identity_constant(min_derivative: float = DEFAULT_MIN_DERIVATIVE) -> float:
    """Unnormalised derivative u with ``min_derivative + softplus(u) == 1``.

    nflows pads the boundary knots of a linear-tails spline with this value; using it for
    the interior knots too (with equal bins) makes the spline the identity.
    """
    return math.log(math.expm1(1.0 - min_derivative))


def _cumsum_last(t: Tensor) -> Tensor:
    """Cumulative sum over the last axis (..., K), summed sequentially over K on every
    device.  Off the CPU, through the first axis: CUDA's scan of a short innermost axis
    took 35% of the GPU's time in the paper preset's training step on an H200, 6.9 ms
    against 0.1 ms for one (1024, 1204, 8) tensor (``bench/bench_gpu.py``)."""
    if t.device.type == "cpu":
        return torch.cumsum(t, dim=-1)
    return torch.cumsum(t.movedim(-1, 0), dim=0).movedim(0, -1)


def _knots(unnormalized: Tensor, lo: float, hi: float, min_bin: float) -> tuple[Tensor, Tensor]:
    """Bin edges (..., K + 1) spanning [lo, hi] exactly and bin sizes (..., K), from
    unnormalised sizes (..., K): softmax, floored at ``min_bin`` of the interval."""
    k = unnormalized.shape[-1]
    sizes = min_bin + (1 - min_bin * k) * torch.softmax(unnormalized, dim=-1)  # (..., K)
    cum = F.pad(_cumsum_last(sizes), (1, 0))  # (..., K + 1), 0 .. ~1
    cum = (hi - lo) * cum + lo
    # pin the end knots exactly (the cumulative sum's last entry is 1 only up to rounding)
    edge = torch.arange(k + 1, device=cum.device)
    cum = torch.where(edge == 0, lo, torch.where(edge == k, hi, cum))
    return cum, cum[..., 1:] - cum[..., :-1]


def _log_slope(theta: Tensor, s: Tensor, d0: Tensor, d1: Tensor, curv: Tensor) -> Tensor:
    """log dy/dx of a rational-quadratic bin at relative position ``theta`` (eq. 5), from
    the bin slope ``s``, the knot derivatives ``d0``, ``d1`` and ``curv = d0 + d1 - 2 s``."""
    t1t = theta * (1 - theta)
    # denominator first: the autograd graph (hence the float rounding of the gradients)
    # is then the one nflows' formula order gives
    denom = s + curv * t1t
    num = s * s * (d1 * theta * theta + 2 * s * t1t + d0 * (1 - theta) * (1 - theta))
    return torch.log(num) - 2 * torch.log(denom)


def rq_spline(
    x: Tensor,
    widths: Tensor,
    heights: Tensor,
    derivatives: Tensor,
    bound: float,
    *,
    inverse: bool = False,
    min_bin_width: float = DEFAULT_MIN_BIN_WIDTH,
    min_bin_height: float = DEFAULT_MIN_BIN_HEIGHT,
    min_derivative: float = DEFAULT_MIN_DERIVATIVE,
) -> tuple[Tensor, Tensor]:
    """Monotonic rational-quadratic spline on ``[-bound, bound]``, the identity outside.

    Args:
        x: points (...).
        widths, heights: unnormalised bin widths and heights (..., K) (softmax-normalised
            here, floored at ``min_bin_width`` / ``min_bin_height`` of the interval).
        derivatives: unnormalised interior knot derivatives (..., K - 1) (softplus plus
            ``min_derivative``; the two boundary derivatives are 1).
        bound: half-width of the interval.
        inverse: evaluate the inverse map instead.

    Returns:
        y (...) in ``x``'s dtype, and log|dy/dx| (...) elementwise (of the inverse map
        when ``inverse``), 0 outside the interval.  Computed in float32 (float64 for
        float64 inputs) whatever the parameters' dtype; NaN inputs pass through.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    xs = x.to(dtype)
    inside = (xs >= -bound) & (xs <= bound)  # False for NaN
    v = torch.where(inside, xs, 0.0)  # every point inside the interval
    k = widths.shape[-1]
    cumw, w = _knots(widths.to(dtype), -bound, bound, min_bin_width)  # (..., K + 1), (..., K)
    cumh, h = _knots(heights.to(dtype), -bound, bound, min_bin_height)
    tail = derivative_identity_constant(min_derivative)
    d = min_derivative + F.softplus(F.pad(derivatives.to(dtype), (1, 1), value=tail))

    # bin of each point: the number of interior knots at or below it
    knots = cumh if inverse else cumw
    idx = (v[..., None] >= knots[..., 1:k]).sum(dim=-1, keepdim=True)  # (..., 1)

    def pick(t: Tensor) -> Tensor:
        return t.gather(-1, idx)[..., 0]

    x_k, w_k, y_k, h_k = pick(cumw), pick(w), pick(cumh), pick(h)
    s_k = h_k / w_k  # bin slope
    d_k, d_k1 = pick(d), pick(d[..., 1:])
    curv = d_k + d_k1 - 2 * s_k
    if inverse:
        dy = v - y_k
        a = dy * curv + h_k * (s_k - d_k)
        b = h_k * d_k - dy * curv
        cq = -s_k * dy
        disc = (b * b - 4 * a * cq).clamp_min(0.0)
        theta = (2 * cq) / (-b - torch.sqrt(disc))
        out = theta * w_k + x_k
    else:
        theta = (v - x_k) / w_k
        t1t = theta * (1 - theta)
        out = y_k + h_k * (s_k * theta * theta + d_k * t1t) / (s_k + curv * t1t)
    lad = _log_slope(theta, s_k, d_k, d_k1, curv)
    if inverse:
        lad = -lad
    return torch.where(inside, out, xs).to(x.dtype), torch.where(inside, lad, 0.0)
