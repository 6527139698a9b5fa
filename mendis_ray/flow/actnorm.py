"""ActNorm (Glow): a per-feature affine normalisation with an explicit, deterministic
data-dependent initialisation.

Like every transform of the flow (:mod:`~mendis_ray.flow.lu`,
:mod:`~mendis_ray.flow.coupling`) it is an ``nn.Module`` with
``forward(x) -> (y, logabsdet)`` (x, y (batch, n); logabsdet (batch,) = log|det dy/dx|)
and ``inverse(y) -> (x, logabsdet)`` (logabsdet of the inverse).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ActNorm"]


def _distributed_world_size() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class ActNorm(nn.Module):
    """Per-feature affine normalisation (Glow's actnorm): ``y = (x - loc) * exp(-log_scale)``.

    ``loc`` and ``log_scale`` play the roles of a mean and a log standard deviation;
    ``logabsdet = -sum(log_scale)`` for every row.  Both start at 0 (the identity).

    Data-dependent initialisation is explicit: :meth:`initialize` sets ``loc`` to the batch
    mean and ``log_scale`` to the log of the batch standard deviation, deterministically,
    and sets the ``initialized`` buffer (a bool tensor, saved in the state_dict).  Under DDP
    call it on every rank with the same batch (or on rank 0 and broadcast the state) before
    wrapping the model; :meth:`MendisFlow.initialize` does this for all layers at once.

    Fallbacks when :meth:`initialize` was not called:

    - ``forward`` in training mode initialises from its batch (nflows' behaviour) in a
      single process, and raises ``RuntimeError`` when torch.distributed runs with more
      than one rank (each rank would initialise from its own batch and the replicas would
      silently diverge);
    - in evaluation mode, and for :meth:`inverse`, the current parameters are used as they
      are: an uninitialised ActNorm is exactly the identity.

    Args:
        n: number of features.
        min_scale: lower bound on the standard deviation used by :meth:`initialize`.
    """

    def __init__(self, n: int, min_scale: float = 1e-6) -> None:
        super().__init__()
        self.n = n
        self.min_scale = min_scale
        self.loc = nn.Parameter(torch.zeros(n))
        self.log_scale = nn.Parameter(torch.zeros(n))
        self.register_buffer("initialized", torch.tensor(False))
        # Python-side "known initialised" flag, so forward does not read the buffer (a device
        # sync on GPU) every call.  It is only ever a cache of initialized == True.
        self._known_initialized = False

    def extra_repr(self) -> str:
        return f"n={self.n}"

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set loc, log_scale from the batch ``x`` (batch, n) so that the output has zero
        mean and unit (unbiased) standard deviation per feature."""
        if x.dim() != 2 or x.shape[1] != self.n or x.shape[0] < 2:
            raise ValueError(
                f"ActNorm.initialize: need (batch >= 2, {self.n}), got {tuple(x.shape)}"
            )
        xf = x.detach().to(self.loc.dtype)
        self.loc.copy_(xf.mean(dim=0))  # (n,)
        self.log_scale.copy_(xf.std(dim=0).clamp_min(self.min_scale).log())  # (n,)
        self.initialized.fill_(True)
        self._known_initialized = True

    def is_initialized(self) -> bool:
        if not self._known_initialized and bool(self.initialized):
            self._known_initialized = True
        return self._known_initialized

    def _maybe_initialize(self, x: Tensor) -> None:
        if not self.training or self.is_initialized():
            return
        if _distributed_world_size() > 1:
            raise RuntimeError(
                "ActNorm: forward in training mode before initialize() under torch.distributed "
                "would initialise each rank from its own batch; call MendisFlow.initialize(x) "
                "with the same batch on every rank (or broadcast rank 0's state) first"
            )
        self.initialize(x)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (batch, n) -> y (batch, n), logabsdet (batch,)."""
        self._maybe_initialize(x)
        y = (x - self.loc) * torch.exp(-self.log_scale)  # (b, n)
        logabsdet = (-self.log_scale.sum()).expand(x.shape[0])  # (b,)
        return y, logabsdet

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """y (batch, n) -> x (batch, n), logabsdet (batch,) of the inverse."""
        x = y * torch.exp(self.log_scale) + self.loc  # (b, n)
        logabsdet = self.log_scale.sum().expand(y.shape[0])  # (b,)
        return x, logabsdet

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        flag = state_dict.get(prefix + "initialized")
        if flag is not None:
            self._known_initialized = bool(flag)
