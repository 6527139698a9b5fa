"""The rational-quadratic spline coupling layer (Durkan et al. 2019) and how its spline
is run: eagerly in cache-sized row chunks, or fused by ``torch.compile`` inside a
:func:`compiled_splines` context.

Same interface as every transform of the flow: ``forward(x[, context]) -> (y, logabsdet)``,
``inverse(y[, context]) -> (x, logabsdet)`` (x, y (batch, n); logabsdet (batch,)).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mendis_ray.flow.mlp import ResidualMLP, default_generator, empty_linear
from mendis_ray.flow.spline import (
    DEFAULT_MIN_BIN_HEIGHT,
    DEFAULT_MIN_BIN_WIDTH,
    DEFAULT_MIN_DERIVATIVE,
    derivative_identity_constant,
    rq_spline,
)

__all__ = ["RQSplineCoupling", "compiled_splines"]

#: Row bucket of the compiled spline (batches are zero-padded to a multiple of it).
COMPILE_ROWS = 64
#: The ``torch.compile`` options of the splines run in the current context (None: eager);
#: set only by :func:`compiled_splines`, which restores it on exit.
_COMPILE: contextvars.ContextVar[tuple | None] = contextvars.ContextVar(
    "mendis_compiled_splines", default=None
)


def spline_elements(
    x: Tensor, w: Tensor, h: Tensor, d: Tensor, inverse: bool, k: int, bound: float,
    min_bin_width: float, min_bin_height: float, min_derivative: float,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The coupling's spline on rows: x (c, n_tr); w, h (c, n_tr * K); d (c, n_tr * (K-1))
    -> y (c, n_tr), log|dy/dx| of each element (c, n_tr)."""
    c = x.shape[0]
    return rq_spline(
        x, w.view(c, -1, k), h.view(c, -1, k), d.view(c, -1, k - 1), bound, inverse=inverse,
        min_bin_width=min_bin_width, min_bin_height=min_bin_height,
        min_derivative=min_derivative,
    )  # fmt: skip


def spline_rows(
    x: Tensor, w: Tensor, h: Tensor, d: Tensor, inverse: bool, k: int, bound: float,
    min_bin_width: float, min_bin_height: float, min_derivative: float,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """:func:`spline_elements` with logabsdet (c,) summed over the row (what is compiled)."""
    y, lad = spline_elements(
        x, w, h, d, inverse, k, bound, min_bin_width, min_bin_height, min_derivative
    )
    return y, lad.sum(dim=1)


@functools.cache
def _compiled(options: tuple) -> Callable:
    """:func:`spline_rows` through ``torch.compile(**dict(options))``, one per option set
    (so every coupling shares the compiled kernels)."""
    return torch.compile(spline_rows, **dict(options))


@contextlib.contextmanager
def compiled_splines(enabled: bool = True, **compile_kwargs: object) -> Iterator[None]:
    """Within this context every coupling runs its spline through ``torch.compile``
    (``enabled=False``: eagerly); the previous setting comes back on exit.

        with compiled_splines():
            train_flow(...)

    The spline is ~20 elementwise passes over (batch, n_tr, K) tensors plus ~30 over
    (batch, n_tr): memory-bound in eager mode, where it takes more than half of a CPU
    train step of the ``compact`` preset.  Inductor fuses those passes (C++/OpenMP on the
    CPU, Triton on a GPU); measured in ``bench/bench_flow.py --compile``: about 2x on the
    spline alone.  Shapes are static (``dynamic=False`` unless given: dynamic-shape
    kernels measured 3-5x slower than static ones here), so batches are zero-padded to a
    multiple of 64 rows and run in one call; the first call of each padded shape and
    direction compiles (10-60 s), and beyond ``torch._dynamo.config.cache_size_limit``
    shapes torch falls back to eager.  Outputs agree with eager mode to float32 rounding
    (``tests/test_flow.py``).  Needs a C++ compiler on the CPU.  The setting is a context
    variable: it holds in this thread (and asyncio task) only.
    """
    options = tuple(sorted({"dynamic": False, **compile_kwargs}.items())) if enabled else None
    token = _COMPILE.set(options)
    try:
        yield
    finally:
        _COMPILE.reset(token)


def spline_function() -> Callable:
    """The spline of the current context: :func:`spline_rows` or its compiled version."""
    options = _COMPILE.get()
    return spline_rows if options is None else _compiled(options)


class RQSplineCoupling(nn.Module):
    """Rational-quadratic spline coupling (Durkan et al. 2019) with linear tails.

    The features are split into halves ``A = x[:, :n // 2]`` and ``B = x[:, n // 2:]``.
    ``mask_parity`` 0 keeps ``A`` and transforms ``B`` conditioned on ``A``; parity 1 the
    reverse.  (In nflows terms the mask is ``arange(n) >= n // 2`` for parity 0 and
    ``arange(n) < n // 2`` for parity 1.)

    Conditioner: the trunk (:class:`ResidualMLP`, hidden width H) followed by three linear
    heads giving, per transformed feature, ``K`` bin widths, ``K`` bin heights and
    ``K - 1`` interior knot derivatives (unnormalised).  Together the heads are nflows'
    ``ResidualNet.final_layer`` with its rows regrouped (nflows interleaves the
    ``3K - 1`` numbers per feature; ``bench/nflows_reference.copy_weights`` maps one onto
    the other); separate heads avoid slicing a (batch, n_tr * (3K - 1)) tensor, whose
    backward would allocate and fill that whole tensor once per slice.  Like nflows'
    ``PiecewiseRationalQuadraticCouplingTransform``, widths and heights are divided by
    ``sqrt(H)`` (applied to the heads' input and bias, not to their large outputs).

    Spline: :func:`~mendis_ray.flow.spline.rq_spline` (nflows' math with linear tails,
    no data-dependent check, so :func:`compiled_splines` fuses it whole), evaluated on
    batch chunks of about ``chunk_elements`` parameters per (chunk, n_tr, K) tensor on a
    CPU so that its many elementwise passes stay in cache (on a GPU in one call:
    ``device_chunk_elements``).  It runs with autocast disabled, in
    float32 (float64 for float64 inputs); under bf16/fp16 autocast the conditioner's
    outputs are cast up first.

    Initialisation: the heads have zero weights and biases, except the derivative biases,
    set to ``log(exp(1 - min_derivative) - 1)`` so every knot derivative is 1: the coupling
    starts as the exact identity.

    Args:
        n: features; mask_parity: 0 or 1; hidden, n_blocks, dropout: conditioner;
        n_bins: spline bins K; tail_bound: B; generator: CPU generator for the init;
        n_context: width of a context vector fed to the conditioner with the kept half
            (0: unconditional; the signal-space model conditions on the noise level).
    """

    #: on a CPU, spline calls cover about this many (row, n_tr, K) elements (cache-sized)
    chunk_elements: int = 1 << 18
    #: the same on other devices; None: the whole batch in one call.  Each call is ~50
    #: kernel launches, and the GPU waited on them: the paper preset's training step on
    #: an H200 was bound by launches, 3 chunks per coupling at batch 64 (bench_gpu.py)
    device_chunk_elements: int | None = None

    def __init__(
        self,
        n: int,
        mask_parity: int,
        hidden: int,
        n_blocks: int,
        n_bins: int,
        tail_bound: float,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
        min_bin_width: float = DEFAULT_MIN_BIN_WIDTH,
        min_bin_height: float = DEFAULT_MIN_BIN_HEIGHT,
        min_derivative: float = DEFAULT_MIN_DERIVATIVE,
        n_context: int = 0,
    ) -> None:
        super().__init__()
        if n < 2:
            raise ValueError("RQSplineCoupling needs at least 2 features")
        if mask_parity not in (0, 1):
            raise ValueError(f"mask_parity must be 0 or 1, got {mask_parity!r}")
        if n_bins < 2:
            raise ValueError(f"RQSplineCoupling: n_bins must be >= 2, got {n_bins}")
        if min_bin_width * n_bins > 1.0 or min_bin_height * n_bins > 1.0:
            raise ValueError(
                f"RQSplineCoupling: n_bins={n_bins} bins of at least min_bin_width="
                f"{min_bin_width} / min_bin_height={min_bin_height} do not fit in the interval"
            )
        g = generator if generator is not None else default_generator()
        self.n = n
        self.mask_parity = mask_parity
        self.n_bins = n_bins
        self.tail_bound = float(tail_bound)
        self.min_bin_width = min_bin_width
        self.min_bin_height = min_bin_height
        self.min_derivative = min_derivative
        self.split = n // 2
        a, b = self.split, n - self.split
        self.n_identity, self.n_transform = (a, b) if mask_parity == 0 else (b, a)
        self._tail_derivative = derivative_identity_constant(min_derivative)
        self.n_context = int(n_context)
        self.conditioner = ResidualMLP(
            self.n_identity + self.n_context, hidden, n_blocks, dropout, g
        )
        self.widths = empty_linear(hidden, self.n_transform * n_bins)
        self.heights = empty_linear(hidden, self.n_transform * n_bins)
        self.derivatives = empty_linear(hidden, self.n_transform * (n_bins - 1))
        self.reset_heads()

    def extra_repr(self) -> str:
        return (
            f"n={self.n}, mask_parity={self.mask_parity}, n_bins={self.n_bins}, "
            f"tail_bound={self.tail_bound}"
        )

    @torch.no_grad()
    def reset_heads(self) -> None:
        """Make the coupling the identity (zero heads, derivative biases = constant)."""
        if self.widths.weight.is_meta:
            return
        for head in (self.widths, self.heights, self.derivatives):
            head.weight.zero_()
            head.bias.zero_()
        self.derivatives.bias.fill_(self._tail_derivative)

    def mask(self) -> Tensor:
        """nflows-style mask (n,): 1 where the feature is transformed."""
        i = torch.arange(self.n)
        return (i >= self.split if self.mask_parity == 0 else i < self.split).to(torch.int64)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a, b = x[:, : self.split], x[:, self.split :]
        return (a, b) if self.mask_parity == 0 else (b, a)  # (identity, transformed)

    def _merge(self, x_id: Tensor, x_tr: Tensor) -> Tensor:
        parts = (x_id, x_tr) if self.mask_parity == 0 else (x_tr, x_id)
        return torch.cat(parts, dim=1)  # (b, n)

    def spline_params(self, x_id: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x_id (b, n_id) -> unnormalised widths (b, n_tr * K) (already divided by
        sqrt(H)), heights (b, n_tr * K), and interior derivatives (b, n_tr * (K - 1))."""
        h = self.conditioner(x_id)  # (b, H)
        # (h W^T + b) / sqrt(H) computed as (h / sqrt(H)) W^T + b / sqrt(H): the scaling
        # touches (b, H) and (n_tr K,) tensors instead of the (b, n_tr K) outputs.
        root = math.sqrt(self.conditioner.hidden_features)
        hs = h / root  # (b, H)
        w = F.linear(hs, self.widths.weight, self.widths.bias / root)  # (b, n_tr * K)
        ht = F.linear(hs, self.heights.weight, self.heights.bias / root)  # (b, n_tr * K)
        d = self.derivatives(h)  # (b, n_tr * (K - 1))
        return w, ht, d

    def _spline(
        self, x_tr: Tensor, x_id: Tensor, inverse: bool, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """x_tr (b, n_tr) conditioned on x_id (b, n_id) and ``context`` (b, n_context) ->
        y_tr (b, n_tr), logabsdet (b,)."""
        w, h, d = self.spline_params(self._conditioner_input(x_id, context))
        fn = spline_function()
        with torch.autocast(device_type=x_tr.device.type, enabled=False):
            if fn is not spline_rows:
                return self._spline_padded(fn, x_tr, w, h, d, inverse)
            cap = self.chunk_elements if x_tr.device.type == "cpu" else self.device_chunk_elements
            rows = x_tr.shape[0] if cap is None else max(1, cap // (self.n_transform * self.n_bins))
            if x_tr.shape[0] <= rows:
                return self._rows(fn, x_tr, w, h, d, inverse)
            parts = [
                self._rows(fn, *chunk, inverse)
                for chunk in zip(
                    x_tr.split(rows), w.split(rows), h.split(rows), d.split(rows), strict=True
                )
            ]
            y = torch.cat([p[0] for p in parts])  # (b, n_tr)
            lad = torch.cat([p[1] for p in parts])  # (b,)
            return y, lad

    def _conditioner_input(self, x_id: Tensor, context: Tensor | None) -> Tensor:
        """x_id (b, n_id) and the context (b, n_context), if the coupling takes one."""
        if not self.n_context:
            return x_id
        if context is None or context.shape != (x_id.shape[0], self.n_context):
            raise ValueError(f"RQSplineCoupling: needs a context (batch, {self.n_context})")
        return torch.cat([x_id, context.to(x_id.dtype)], dim=1)  # (b, n_id + n_context)

    def _rows(
        self, fn: Callable, x: Tensor, w: Tensor, h: Tensor, d: Tensor, inverse: bool
    ) -> tuple[Tensor, Tensor]:
        """x (c, n_tr); w, h (c, n_tr * K); d (c, n_tr * (K-1)) -> y (c, n_tr) and ``fn``'s
        lad: (c,) from :func:`spline_rows`, (c, n_tr) from :func:`spline_elements`."""
        return fn(
            x, w, h, d, inverse, self.n_bins, self.tail_bound, self.min_bin_width,
            self.min_bin_height, self.min_derivative,
        )  # fmt: skip

    def _spline_padded(
        self, fn: Callable, x_tr: Tensor, w: Tensor, h: Tensor, d: Tensor, inverse: bool
    ) -> tuple[Tensor, Tensor]:
        """The compiled spline: one fused call over all rows, padded to a multiple of
        :data:`COMPILE_ROWS` so that only a few static shapes are ever compiled."""
        b = x_tr.shape[0]
        pad = -b % COMPILE_ROWS
        if not pad:
            # a contiguous copy: the static kernel for the strided half-view measured
            # 2.5x slower than for a contiguous input (F.pad makes a contiguous copy too)
            x_tr = x_tr.contiguous()
        else:
            x_tr, w, h, d = (F.pad(t, (0, 0, 0, pad)) for t in (x_tr, w, h, d))
        y, lad = self._rows(fn, x_tr, w, h, d, inverse)
        return y[:b], lad[:b]

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (batch, n) [, context (batch, n_context)] -> y (batch, n), logabsdet (batch,)."""
        x_id, x_tr = self._split(x)
        y_tr, logabsdet = self._spline(x_tr, x_id, inverse=False, context=context)
        return self._merge(x_id, y_tr), logabsdet

    def forward_elementwise(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """x (batch, n) [, context] -> y (batch, n) and log|dy_j / dx_j| of each transformed
        feature (batch, n_transform), whose row sums are :meth:`forward`'s logabsdet.  Eager
        and in one call (for scoring the small flows of the signal-space model)."""
        x_id, x_tr = self._split(x)
        w, h, d = self.spline_params(self._conditioner_input(x_id, context))
        y_tr, lad = self._rows(spline_elements, x_tr, w, h, d, inverse=False)
        return self._merge(x_id, y_tr), lad

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """y (batch, n) [, context] -> x (batch, n), logabsdet (batch,) of the inverse."""
        y_id, y_tr = self._split(y)
        x_tr, logabsdet = self._spline(y_tr, y_id, inverse=True, context=context)
        return self._merge(y_id, x_tr), logabsdet
