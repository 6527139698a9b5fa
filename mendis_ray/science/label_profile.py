"""The label profile: the maximum of log p_flow over the labels of a spectrum, and the
curvature there, for the label-free score.

:func:`profile_labels` maximises log p(flux, y) over the standardized labels y of each row
(Adam, then Newton steps that land each row on its maximum whatever its batch) and returns
the log det of the negative Hessian in y with its eigenvalues floored at
:data:`MIN_LABEL_CURVATURE`: the pieces of the Laplace approximation of log p(flux) that
:class:`~mendis_ray.science.ood.Scorer` assembles (see :mod:`mendis_ray.science.ood`).
The flow's parameters are frozen meanwhile (:func:`frozen_parameters`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from mendis_ray.flow.density import SpectrumDensity

__all__ = [
    "MIN_LABEL_CURVATURE",
    "NEWTON_STEPS",
    "NEWTON_TOL",
    "frozen_parameters",
    "profile_labels",
]

#: Floor of the label curvature (eigenvalues of -d^2 log p / dy^2 in standardized label
#: units) in the Laplace approximation: the label posterior of a spectrum is never wider
#: than the training label distribution (unit variance), so a flat or upward-curved
#: direction -- the profile stopped short of a maximum, or a flow that is not concave in
#: the labels there -- counts as that wide instead of making the score NaN.  For a Gaussian
#: density the curvature is the conditional precision, >= 1, so the floor never binds.
MIN_LABEL_CURVATURE = 1.0
#: Newton steps at most that land the label profile on its maximum (after Adam, whose
#: steps are about its learning rate long whatever the gradient, so it ends oscillating
#: around the maximum at a point that depends on float rounding, hence on the batch).
NEWTON_STEPS = 10
#: a Newton step shorter than this (standardized label units) ends a row's polish
NEWTON_TOL = 1e-5


@contextlib.contextmanager
def frozen_parameters(module: torch.nn.Module) -> Iterator[None]:
    """Within this block no parameter of ``module`` requires a gradient (restored after):
    gradients of the scores with respect to the *inputs* (the label profile) then skip
    every parameter's gradient, and the LU layers serve their cached dense weights."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def profile_labels(
    density: SpectrumDensity,
    x: torch.Tensor,
    n_labels: int = 3,
    steps: int = 200,
    lr: float = 0.05,
    tol: float = 1e-4,
    min_curvature: float = MIN_LABEL_CURVATURE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Maximise log p_flow over the (standardized) label entries of ``x``, row by row.

    Each row stops on its own criterion (its log p changed by less than ``tol`` relative
    in one Adam step, or ``steps`` steps): Adam is elementwise, so a row's path, and its
    score, do not depend on the other rows of the batch; Newton steps then land each row
    on its maximum (so Adam need only come close).  The flow's parameters are frozen
    meanwhile (:func:`frozen_parameters`).

    Args:
        x: (n, n_features) standardized rows; their last ``n_labels`` entries are the
            starting point (0 = the training mean).
        min_curvature: floor of the eigenvalues of the negative Hessian (standardized label
            units; see :data:`MIN_LABEL_CURVATURE`).

    Returns:
        (y*, log p_flow at y*, log det of the negative Hessian in y), shapes (n, k), (n,), (n,).
    """
    flow = density.flow
    with frozen_parameters(flow):
        spec = x[:, :-n_labels].detach()
        y = _profile_steps(flow, spec, x[:, -n_labels:], steps, lr, tol)
        y = _newton_polish(flow, spec, y, NEWTON_STEPS, min_curvature)
        hess = _label_hessian(flow, spec, y)  # (n, k, k) of -log p
        with torch.no_grad():
            lp = flow.log_prob(torch.cat([spec, y], dim=1))
    return y, lp, _clipped_logdet(hess, min_curvature)


def _profile_steps(
    flow: torch.nn.Module, spec: torch.Tensor, y0: torch.Tensor, steps: int, lr: float,
    tol: float,
) -> torch.Tensor:  # fmt: skip
    """Adam ascent of log p in the labels; each row stops on its own criterion (its log p
    changed by less than ``tol`` relative in one step, or ``steps`` steps) and stays where
    it stopped, so its path depends on its own values alone (Adam is elementwise)."""
    y = y0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([y], lr=lr)
    prev = torch.full((len(y),), float("nan"), dtype=y.dtype, device=y.device)
    active = torch.ones(len(y), dtype=torch.bool, device=y.device)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        lp = flow.log_prob(torch.cat([spec, y], dim=1))
        (-lp.sum()).backward()
        cur = lp.detach()
        active &= ~((cur - prev).abs() < tol * cur.abs().clamp_min(1.0))
        if not bool(active.any()):
            break
        done = ~active
        keep = y.detach()[done].clone()
        opt.step()
        with torch.no_grad():
            y[done] = keep  # converged rows stay where they converged
        prev = cur
    return y.detach()


def _newton_polish(
    flow: torch.nn.Module, spec: torch.Tensor, y: torch.Tensor, iters: int,
    min_curvature: float,
) -> torch.Tensor:  # fmt: skip
    """Newton steps on log p in the labels from ``y`` (n, k), with the negative Hessian's
    eigenvalues floored at ``min_curvature`` (always an ascent direction) and, per row, the
    first of the full, 1/2, 1/4 and 1/8 steps that raises log p (else the row stays):
    lands each row on its maximum to float precision, whatever its batch."""

    def log_p(yy: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return flow.log_prob(torch.cat([spec, yy], dim=1))

    lp = log_p(y)
    active = torch.ones(len(y), dtype=torch.bool, device=y.device)
    for _ in range(iters):
        grad = _label_grad(flow, spec, y)  # (n, k) of log p
        hess = _clip_eigenvalues(_label_hessian(flow, spec, y), min_curvature)
        ok = torch.isfinite(grad).all(dim=1) & torch.isfinite(hess).all(dim=2).all(dim=1)
        if not bool(ok.any()):
            break
        eye = torch.eye(y.shape[1], dtype=hess.dtype, device=hess.device)
        hess = torch.where(ok[:, None, None], hess, eye)
        step = torch.linalg.solve(hess.double(), torch.where(ok[:, None], grad, 0.0).double())
        step = step.to(y.dtype)
        ok &= active
        moved = torch.zeros(len(y), dtype=torch.bool, device=y.device)
        for frac in (1.0, 0.5, 0.25, 0.125):
            y_try = y + frac * step
            lp_try = log_p(y_try)
            take = ~moved & ok & torch.isfinite(lp_try) & (lp_try > lp)
            y = torch.where(take[:, None], y_try, y)
            lp = torch.where(take, lp_try, lp)
            moved |= take
        # a row is done when no step raises its log p or its step is negligible
        active &= moved & (step.abs().amax(dim=1) > NEWTON_TOL)
        if not bool(active.any()):
            break
    return y


def _label_grad(flow: torch.nn.Module, spec: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d log p / dy at (spec, y), (n, k)."""
    yy = y.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(flow.log_prob(torch.cat([spec, yy], dim=1)).sum(), yy)
    return g


def _clip_eigenvalues(hess: torch.Tensor, floor: float) -> torch.Tensor:
    """The symmetric (n, k, k) ``hess`` with eigenvalues below ``floor`` raised to it
    (rows with non-finite entries are returned unchanged)."""
    ok = torch.isfinite(hess).all(dim=2).all(dim=1)
    eye = torch.eye(hess.shape[1], dtype=hess.dtype, device=hess.device)
    safe = torch.where(ok[:, None, None], hess, eye).double()
    eig, vec = torch.linalg.eigh(safe)
    fixed = (vec * eig.clamp_min(floor)[:, None, :]) @ vec.transpose(1, 2)
    return torch.where(ok[:, None, None], fixed.to(hess.dtype), hess)


def _clipped_logdet(hess: torch.Tensor, min_curvature: float) -> torch.Tensor:
    """log det of the symmetric (n, k, k) ``hess`` with its eigenvalues floored at
    ``min_curvature``, (n,); NaN only where ``hess`` itself is not finite."""
    ok = torch.isfinite(hess).all(dim=2).all(dim=1)
    safe = torch.where(ok[:, None, None], hess, torch.eye(hess.shape[1], dtype=hess.dtype))
    eig = torch.linalg.eigvalsh(safe.double())
    logdet = torch.log(eig.clamp_min(min_curvature)).sum(dim=1).to(hess.dtype)
    return torch.where(ok, logdet, torch.full_like(logdet, float("nan")))


def _label_hessian(
    flow: torch.nn.Module, spec: torch.Tensor, y: torch.Tensor, h: float = 1e-2
) -> torch.Tensor:
    """Negative Hessian of log p in the labels by central differences of the gradient."""
    k = y.shape[1]

    def grad_at(yy: torch.Tensor) -> torch.Tensor:
        yy = yy.detach().requires_grad_(True)
        lp = flow.log_prob(torch.cat([spec, yy], dim=1)).sum()
        (g,) = torch.autograd.grad(lp, yy)
        return g

    cols = []
    for j in range(k):
        e = torch.zeros_like(y)
        e[:, j] = h
        cols.append((grad_at(y + e) - grad_at(y - e)) / (2 * h))  # (n, k)
    hess = -torch.stack(cols, dim=2)
    return 0.5 * (hess + hess.transpose(1, 2))
