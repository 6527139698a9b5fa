"""The Mendis flow: ``n_units`` x [ActNorm -> LU linear -> RQ spline coupling] on the joint
vector x = (standardized spectrum, standardized labels), with a standard normal base.

    z = f(x) = T_K o ... o T_1 (x),   log p(x) = log N(z; 0, I) + sum_k log|det dT_k|

Shapes: x, z (batch, n_features) with n_features = n_pix + n_labels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mendis_ray.config import FlowConfig
from mendis_ray.flow.actnorm import ActNorm
from mendis_ray.flow.coupling import RQSplineCoupling
from mendis_ray.flow.lu import LUInvertibleLinear

__all__ = ["MendisFlow", "count_parameters"]

_LOG_2PI = math.log(2.0 * math.pi)


class MendisFlow(nn.Module):
    """Normalizing flow built from a :class:`~mendis_ray.config.FlowConfig`.

    Unit ``i`` is ``ActNorm -> LUInvertibleLinear -> RQSplineCoupling(parity=i % 2)``.
    All weights are drawn from one CPU generator seeded with ``seed`` (never the global
    RNG), so two processes building ``MendisFlow(cfg, seed=s)`` hold identical weights —
    what DDP replicas need.  Build under ``with torch.device("meta"):`` to count
    parameters without allocating (initialisation is skipped there).

    ``forward(x)`` returns ``log_prob(x)`` so the model can be wrapped in DDP and trained
    as ``loss = -model(x).mean()``.  Call :meth:`initialize` on one training batch (the same
    batch on every rank) before training: it sets the ActNorm layers from data.
    """

    def __init__(self, cfg: FlowConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        n = cfg.n_features
        g = torch.Generator(device="cpu").manual_seed(seed)
        layers: list[nn.Module] = []
        for i in range(cfg.n_units):
            layers.append(ActNorm(n))
            layers.append(LUInvertibleLinear(n, generator=g))
            layers.append(
                RQSplineCoupling(
                    n,
                    mask_parity=i % 2,
                    hidden=cfg.hidden,
                    n_blocks=cfg.n_blocks,
                    n_bins=cfg.n_bins,
                    tail_bound=cfg.tail_bound,
                    dropout=cfg.dropout,
                    generator=g,
                )
            )
        self.layers = nn.ModuleList(layers)

    @property
    def n_features(self) -> int:
        return self.cfg.n_features

    def _ref(self) -> Tensor:
        return self.layers[0].loc  # a parameter: the model's device and dtype

    # ---- directions ---------------------------------------------------------------------

    def transform(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Data to latent: x (batch, n_features) -> z (batch, n_features), log|det dz/dx|
        (batch,), accumulated in float32 or better."""
        acc = torch.promote_types(x.dtype, torch.float32)
        logabsdet = torch.zeros(x.shape[0], dtype=acc, device=x.device)  # (b,)
        for layer in self.layers:
            x, lad = layer(x)  # (b, n), (b,)
            logabsdet = logabsdet + lad.to(acc)
        return x, logabsdet

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Latent to data: z (batch, n_features) -> x (batch, n_features), log|det dx/dz|
        (batch,)."""
        acc = torch.promote_types(z.dtype, torch.float32)
        logabsdet = torch.zeros(z.shape[0], dtype=acc, device=z.device)  # (b,)
        for layer in reversed(self.layers):
            z, lad = layer.inverse(z)  # (b, n), (b,)
            logabsdet = logabsdet + lad.to(acc)
        return z, logabsdet

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) in nats: x (batch, n_features) -> (batch,)."""
        if x.dim() != 2 or x.shape[1] != self.n_features:
            raise ValueError(
                f"MendisFlow.log_prob: expected (batch, {self.n_features}), got {tuple(x.shape)}"
            )
        z, logabsdet = self.transform(x)  # (b, n), (b,)
        zf = z.to(logabsdet.dtype)
        base = -0.5 * (zf * zf).sum(dim=1) - 0.5 * self.n_features * _LOG_2PI  # (b,)
        return base + logabsdet

    def forward(self, x: Tensor) -> Tensor:
        """log_prob(x): (batch, n_features) -> (batch,)."""
        return self.log_prob(x)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws x (n, n_features) in the parameters' dtype and device.

        ``generator`` (on that device) makes the draw reproducible.
        """
        ref = self._ref()
        z = torch.randn(
            n, self.n_features, generator=generator, dtype=ref.dtype, device=ref.device
        )  # (n, n_features)
        x, _ = self.inverse(z)
        return x

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Data-dependent ActNorm initialisation from one batch x (batch, n_features).

        Passes the batch through the layers in order, initialising each ActNorm from the
        activations it receives.  Deterministic: every DDP rank calling it with the same
        batch gets the same weights.  Dropout is switched off during the pass; the other
        layers keep their mode (in training mode the LU layers take their factor path
        rather than building an evaluation cache).
        """
        dropouts = [m for m in self.modules() if isinstance(m, nn.Dropout) and m.training]
        for m in dropouts:
            m.eval()
        try:
            h = x.to(self._ref().dtype)  # (b, n)
            for layer in self.layers:
                if isinstance(layer, ActNorm):
                    layer.initialize(h)
                h, _ = layer(h)  # (b, n)
        finally:
            for m in dropouts:
                m.train()

    def n_parameters(self) -> int:
        """Number of scalar parameters (including the ``n_features`` unused diagonal entries
        of each LU layer's ``lu`` matrix)."""
        return sum(p.numel() for p in self.parameters())


def count_parameters(cfg: FlowConfig) -> int:
    """``MendisFlow(cfg).n_parameters()`` without allocating (built on the meta device)."""
    with torch.device("meta"):
        return MendisFlow(cfg).n_parameters()
