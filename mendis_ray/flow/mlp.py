"""The conditioner of a coupling layer (nflows' ``ResidualNet`` trunk, same parameter
names) and its initialisation helpers: every weight is drawn from an explicit CPU
generator, never the global RNG, so two processes building the same flow with the same
seed hold identical weights (what DDP replicas need)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ResidualMLP", "default_generator", "empty_linear", "uniform_"]


def default_generator(seed: int = 0) -> torch.Generator:
    """A CPU generator with a fixed seed (used when a layer is built without one)."""
    return torch.Generator(device="cpu").manual_seed(seed)


def uniform_(t: Tensor, bound: float, generator: torch.Generator) -> None:
    """Fill ``t`` with U(-bound, bound) drawn on the CPU from ``generator`` (skip meta)."""
    if t.is_meta:
        return
    with torch.no_grad():
        t.copy_(
            torch.empty(t.shape, dtype=torch.float64).uniform_(-bound, bound, generator=generator)
        )


def empty_linear(n_in: int, n_out: int) -> nn.Linear:
    """nn.Linear on the default device with uninitialised weights (no global-RNG draw)."""
    return torch.nn.utils.skip_init(nn.Linear, n_in, n_out, device=torch.get_default_device())


def _linear(n_in: int, n_out: int, generator: torch.Generator) -> nn.Linear:
    """nn.Linear with PyTorch's default init distribution, U(+-1/sqrt(n_in)), drawn from
    ``generator`` so the weights do not depend on the global RNG."""
    lin = empty_linear(n_in, n_out)
    bound = 1.0 / math.sqrt(n_in) if n_in > 0 else 0.0
    uniform_(lin.weight, bound, generator)
    uniform_(lin.bias, bound, generator)
    return lin


class _ResidualBlock(nn.Module):
    """``h + Linear(dropout(relu(Linear(relu(h)))))`` — nflows' ResidualBlock (no batch norm,
    no context), with the same parameter names."""

    def __init__(self, hidden: int, dropout: float, generator: torch.Generator) -> None:
        super().__init__()
        self.linear_layers = nn.ModuleList([_linear(hidden, hidden, generator) for _ in range(2)])
        self.dropout = nn.Dropout(p=dropout)
        # nflows' "zero_initialization": the block starts close to the identity.
        uniform_(self.linear_layers[1].weight, 1e-3, generator)
        uniform_(self.linear_layers[1].bias, 1e-3, generator)

    def forward(self, h: Tensor) -> Tensor:
        t = self.linear_layers[0](F.relu(h))  # (b, hidden)
        t = self.linear_layers[1](self.dropout(F.relu(t)))  # (b, hidden)
        return h + t


class ResidualMLP(nn.Module):
    """Trunk of the conditioner: nflows' ``ResidualNet`` without its final layer (same
    parameter names): ``Linear(n_in, hidden) -> n_blocks residual blocks``.

    Args:
        n_in: input width; hidden: block width; n_blocks: residual blocks; dropout: inside
            each block; generator: CPU generator for the init.
    """

    def __init__(
        self,
        n_in: int,
        hidden: int,
        n_blocks: int,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        g = generator if generator is not None else default_generator()
        self.hidden_features = hidden
        self.initial_layer = _linear(n_in, hidden, g)
        self.blocks = nn.ModuleList([_ResidualBlock(hidden, dropout, g) for _ in range(n_blocks)])

    def forward(self, x: Tensor) -> Tensor:
        """x (batch, n_in) -> (batch, hidden)."""
        h = self.initial_layer(x)  # (b, hidden)
        for block in self.blocks:
            h = block(h)  # (b, hidden)
        return h
