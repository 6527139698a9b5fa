"""Sampling the conditional p(spectrum | labels = y0) from the joint flow.

The flow models the joint density of x = (spectrum s, labels y).  With the labels fixed,
``log p(s | y0) = log p(s, y0) - log p(y0)`` is known up to a constant, so we sample it by
**preconditioned MALA** (Metropolis-adjusted Langevin; Roberts & Tweedie 1996) over s in
standardized space, with many chains run as one batch:

    s' = s + (eps^2 / 2) M grad log p(s, y0) + eps M^(1/2) xi,   xi ~ N(0, I)

accepted with the Metropolis-Hastings ratio (exact stationary distribution for any M and
eps).  The preconditioner ``M`` is the conditional covariance of a Gaussian fitted to the
training set, ``S_ss - S_sy S_yy^-1 S_ys`` (shrunk toward its diagonal so it is well
conditioned), which is what the flow's conditional looks like to first order, so a
single step size serves every pixel.  Chains start from the Gaussian conditional mean plus
a draw from M ("started well"); ``eps`` is adapted during warm-up toward an acceptance of
0.574 (the MALA optimum), then frozen.  Diagnostics: acceptance rate, split-R-hat and
effective sample size of the projections of s on the top principal directions of M, and of
the log-density trace.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ConditionalSamples", "ess", "gaussian_conditional", "mala_conditional", "split_rhat"]

log = logging.getLogger(__name__)


def gaussian_conditional(
    cov: np.ndarray, mean: np.ndarray, y0: np.ndarray, n_labels: int, shrink: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of s | y = y0 for x = (s, y) ~ N(mean, cov).

    Args:
        cov: (d, d). mean: (d,). y0: (k,) with k = n_labels (the last k features).
        shrink: blend the conditional covariance toward its diagonal by this fraction.

    Returns:
        (mu (d - k,), sigma (d - k, d - k)).
    """
    k = n_labels
    s_ss, s_sy, s_yy = cov[:-k, :-k], cov[:-k, -k:], cov[-k:, -k:]
    gain = np.linalg.solve(s_yy, s_sy.T).T  # (d - k, k)
    mu = mean[:-k] + gain @ (y0 - mean[-k:])
    sigma = s_ss - gain @ s_sy.T
    sigma = 0.5 * (sigma + sigma.T)
    if shrink:
        sigma = (1 - shrink) * sigma + shrink * np.diag(np.diag(sigma))
    return mu, sigma


@dataclass
class ConditionalSamples:
    """Draws of s | y0 in standardized units and their diagnostics.

    Attributes:
        samples: (n_chains * n_keep, d - k) pooled post-warm-up draws.
        chains: (n_chains, n_keep, d - k).
        acceptance: mean post-warm-up acceptance rate.
        step_size: the adapted eps.
        rhat: (n_proj,) split-R-hat of the projections on M's top directions and log p.
        ess: (n_proj,) effective sample size of the same.
    """

    samples: np.ndarray
    chains: np.ndarray
    acceptance: float
    step_size: float
    rhat: np.ndarray
    ess: np.ndarray
    log_prob_trace: np.ndarray

    def summary(self) -> dict[str, float]:
        return {
            "n_samples": int(self.samples.shape[0]),
            "acceptance": float(self.acceptance),
            "step_size": float(self.step_size),
            "max_rhat": float(np.nanmax(self.rhat)),
            "min_ess": float(np.nanmin(self.ess)),
        }


def mala_conditional(
    log_prob: Callable[[torch.Tensor], torch.Tensor],
    y0: np.ndarray,
    precond_cov: np.ndarray,
    start_mean: np.ndarray,
    *,
    n_chains: int = 32,
    n_warmup: int = 300,
    n_keep: int = 300,
    thin: int = 1,
    step_size: float = 0.5,
    target_accept: float = 0.574,
    n_proj: int = 5,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> ConditionalSamples:
    """Preconditioned MALA for s | y = y0 under ``log_prob`` (standardized joint space).

    Args:
        log_prob: (n, d) -> (n,) joint log density (the flow's ``log_prob``).
        y0: (k,) standardized labels to condition on.
        precond_cov: (d - k, d - k) positive-definite preconditioner M.
        start_mean: (d - k,) where chains start (plus a draw from M).
    """
    mala = _Mala(log_prob, y0, precond_cov, n_chains, seed, dtype)
    s, lp, g = mala.start(start_mean)
    eps = step_size
    kept, lps, acc_sum, acc_n = [], [], 0.0, 0
    total = n_warmup + n_keep * thin
    for it in range(total):
        s, lp, g, rate = mala.step(s, lp, g, eps)
        if it < n_warmup:
            # Robbins-Monro adaptation of log eps toward the target acceptance.
            eps = float(math.exp(math.log(eps) + (rate - target_accept) / math.sqrt(it + 1)))
        else:
            acc_sum += rate
            acc_n += 1
            if (it - n_warmup) % thin == 0:
                kept.append(s.clone())
                lps.append(lp.clone())
        if it % 100 == 0:
            log.info("MALA step %d/%d: acceptance %.2f, eps %.3g", it, total, rate, eps)
    return _pooled(kept, lps, precond_cov, n_proj, acc_sum / max(acc_n, 1), eps)


class _Mala:
    """The preconditioned MALA kernel of :func:`mala_conditional` for ``n_chains`` chains
    at once: the target ``log_prob`` with the labels fixed at ``y0`` (k,), the
    preconditioner M = ``precond_cov`` (ds, ds) and its Cholesky factor, one seeded
    generator for every draw."""

    def __init__(
        self, log_prob: Callable[[torch.Tensor], torch.Tensor], y0: np.ndarray,
        precond_cov: np.ndarray, n_chains: int, seed: int, dtype: torch.dtype,
    ) -> None:  # fmt: skip
        self.log_prob, self.n_chains, self.dtype = log_prob, n_chains, dtype
        self.gen = torch.Generator().manual_seed(seed)
        m = torch.as_tensor(precond_cov, dtype=dtype)
        self.m = m
        self.chol = torch.linalg.cholesky(m + 1e-9 * torch.eye(m.shape[0], dtype=dtype))
        self.y = torch.as_tensor(y0, dtype=dtype).expand(n_chains, -1)
        self.ds = m.shape[0]

    def lp_and_grad(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(s, y0) (n,) and its gradient in s (n, ds)."""
        s = s.detach().requires_grad_(True)
        lp = self.log_prob(torch.cat([s, self.y], dim=1).to(self.dtype))
        (g,) = torch.autograd.grad(lp.sum(), s)
        return lp.detach().to(self.dtype), g.to(self.dtype)

    def start(self, start_mean: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Chains at ``start_mean`` (ds,) plus half a draw from M: (s, log p, gradient)."""
        noise = torch.randn(self.n_chains, self.ds, generator=self.gen, dtype=self.dtype)
        s = torch.as_tensor(start_mean, dtype=self.dtype) + 0.5 * noise @ self.chol.T
        lp, g = self.lp_and_grad(s)
        return s, lp, g

    def log_q(self, to: torch.Tensor, frm: torch.Tensor, g_frm: torch.Tensor, eps: float):
        """log N(to; frm + eps^2/2 M g, eps^2 M) up to a constant, (n,)."""
        r = to - frm - 0.5 * eps**2 * g_frm @ self.m.T
        w = torch.linalg.solve_triangular(self.chol, r.T, upper=False).T
        return -0.5 * (w**2).sum(dim=1) / eps**2

    def step(self, s: torch.Tensor, lp: torch.Tensor, g: torch.Tensor, eps: float) -> tuple:
        """One Metropolis-adjusted Langevin step of every chain: (s, log p, gradient,
        acceptance rate of this step)."""
        n_chains, ds, dtype, gen = self.n_chains, self.ds, self.dtype, self.gen
        xi = torch.randn(n_chains, ds, generator=gen, dtype=dtype)
        prop = s + 0.5 * eps**2 * g @ self.m.T + eps * xi @ self.chol.T
        lp_p, g_p = self.lp_and_grad(prop)
        log_alpha = lp_p - lp + self.log_q(s, prop, g_p, eps) - self.log_q(prop, s, g, eps)
        u = torch.rand(n_chains, generator=gen, dtype=dtype)
        accept = (torch.log(u) < log_alpha) & torch.isfinite(lp_p)
        s = torch.where(accept[:, None], prop, s)
        lp = torch.where(accept, lp_p, lp)
        g = torch.where(accept[:, None], g_p, g)
        return s, lp, g, float(accept.double().mean())


def _pooled(
    kept: list[torch.Tensor], lps: list[torch.Tensor], precond_cov: np.ndarray, n_proj: int,
    acceptance: float, eps: float,
) -> ConditionalSamples:  # fmt: skip
    """The kept draws (each (n_chains, ds)) and log p (each (n_chains,)) as
    :class:`ConditionalSamples`, with R-hat and ESS of the projections on M's top
    ``n_proj`` directions and of log p."""
    chains = torch.stack(kept, dim=1).cpu().numpy()  # (n_chains, n_keep, ds)
    lp_trace = torch.stack(lps, dim=1).cpu().numpy()  # (n_chains, n_keep)
    evals, evecs = np.linalg.eigh(np.asarray(precond_cov))
    top = evecs[:, np.argsort(evals)[::-1][:n_proj]]  # (ds, n_proj)
    proj = np.concatenate([chains @ top, lp_trace[..., None]], axis=2)  # (c, n, n_proj + 1)
    rhat = np.array([split_rhat(proj[..., j]) for j in range(proj.shape[2])])
    neff = np.array([ess(proj[..., j]) for j in range(proj.shape[2])])
    return ConditionalSamples(
        samples=chains.reshape(-1, chains.shape[2]),
        chains=chains,
        acceptance=acceptance,
        step_size=eps,
        rhat=rhat,
        ess=neff,
        log_prob_trace=lp_trace,
    )


def split_rhat(x: np.ndarray) -> float:
    """Split-R-hat (Gelman et al. 2013) of draws ``x`` (n_chains, n_draws)."""
    n = x.shape[1]
    half = n // 2
    if half < 2:
        return float("nan")
    parts = np.concatenate([x[:, :half], x[:, half : 2 * half]], axis=0)  # (2c, half)
    w = parts.var(axis=1, ddof=1).mean()
    b = half * parts.mean(axis=1).var(ddof=1)
    var = (half - 1) / half * w + b / half
    return float(np.sqrt(var / w)) if w > 0 else float("nan")


def ess(x: np.ndarray) -> float:
    """Effective sample size of ``x`` (n_chains, n_draws) from the pooled
    autocorrelation, truncated at the first negative pair sum (Geyer 1992)."""
    c, n = x.shape
    xc = x - x.mean(axis=1, keepdims=True)
    f = np.fft.rfft(xc, n=2 * n, axis=1)
    acov = np.fft.irfft(f * np.conj(f), axis=1)[:, :n].mean(axis=0) / n
    if acov[0] <= 0:
        return float("nan")
    rho = acov / acov[0]
    tau = 1.0
    for t in range(1, n - 1, 2):
        pair = rho[t] + rho[t + 1]
        if pair < 0:
            break
        tau += 2 * pair
    return float(c * n / tau)
