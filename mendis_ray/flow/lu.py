"""An invertible dense linear map ``y = x W^T`` with ``W = P L U`` (Glow's "1x1 conv"),
with blocked triangular products and a hand-written backward: the layer never forms its
weight in training, caches it in evaluation and never serves a stale cache, and nothing
calls the deprecated ``torch.triangular_solve``.

Same interface as every transform of the flow: ``forward(x) -> (y, logabsdet)``,
``inverse(y) -> (x, logabsdet)`` (x, y (batch, n); logabsdet (batch,)).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from mendis_ray.flow.mlp import default_generator

__all__ = ["LUInvertibleLinear", "triangular_pair_flops"]


def _blocks(n: int, block_size: int) -> list[tuple[int, int]]:
    """Split range(n) into ceil(n / block_size) near-equal blocks [(start, end), ...]."""
    nb = max(1, -(-n // max(1, block_size)))
    edges = [round(i * n / nb) for i in range(nb + 1)]
    return list(itertools.pairwise(edges))


def triangular_pair_flops(b: int, n: int, block_size: int) -> int:
    """FLOPs of one blocked product ``x T^T`` (x (b, n), T triangular (n, n)): only the
    blocks on or beside the diagonal are multiplied (``2 b`` times their entries)."""
    entries = 0
    for a, e in _blocks(n, block_size):
        entries += (e - a) * (n - a)  # the diagonal block and everything right of it
    return 2 * b * entries


def _mm_ut(x: Tensor, lu: Tensor, s: Tensor, blocks: list[tuple[int, int]]) -> Tensor:
    """x U^T with U = triu(lu, 1) + diag(s): x (b, n) -> (b, n)."""
    n = lu.shape[0]
    out = x * s  # (b, n)
    for a, e in blocks:
        o = out[:, a:e]  # (b, m) view, written in place
        o.addmm_(x[:, a:e], lu[a:e, a:e].triu(1).T)
        if e < n:
            o.addmm_(x[:, e:], lu[a:e, e:].T)
    return out


def _mm_lt(z: Tensor, lu: Tensor, blocks: list[tuple[int, int]]) -> Tensor:
    """z L^T with L = tril(lu, -1) + I: z (b, n) -> (b, n)."""
    out = z.clone()  # (b, n)
    for a, e in blocks:
        o = out[:, a:e]
        o.addmm_(z[:, a:e], lu[a:e, a:e].tril(-1).T)
        if a > 0:
            o.addmm_(z[:, :a], lu[a:e, :a].T)
    return out


def _mm_l(g: Tensor, lu: Tensor, blocks: list[tuple[int, int]]) -> Tensor:
    """g L with L = tril(lu, -1) + I: g (b, n) -> (b, n)."""
    n = lu.shape[0]
    out = g.clone()  # (b, n)
    for a, e in blocks:
        o = out[:, a:e]
        o.addmm_(g[:, a:e], lu[a:e, a:e].tril(-1))
        if e < n:
            o.addmm_(g[:, e:], lu[e:, a:e])
    return out


def _mm_u(g: Tensor, lu: Tensor, s: Tensor, blocks: list[tuple[int, int]]) -> Tensor:
    """g U with U = triu(lu, 1) + diag(s): g (b, n) -> (b, n)."""
    out = g * s  # (b, n)
    for a, e in blocks:
        o = out[:, a:e]
        o.addmm_(g[:, a:e], lu[a:e, a:e].triu(1))
        if a > 0:
            o.addmm_(g[:, :a], lu[:a, a:e])
    return out


class _LUFunction(torch.autograd.Function):
    """y = (x U^T L^T)[:, perm] with blocked triangular products and a hand-written backward.

    Only blocks on one side of the diagonal are multiplied (about ``(nb + 1) / (2 nb)`` of
    the dense FLOPs for ``nb`` blocks), nothing of size n x n is masked or materialised in
    the forward, and the gradient of ``lu`` is written block by block into one buffer
    (the L and U gradients have disjoint supports).
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        lu: Tensor,
        log_s: Tensor,
        perm: Tensor,
        inv_perm: Tensor,
        block_size: int,
    ):
        blocks = _blocks(lu.shape[0], block_size)
        # In x's dtype: CUDA's autocast runs exp in float32, and the in-place products
        # below need one dtype (bf16 training on a GPU raised "Float and BFloat16").
        with torch.autocast(x.device.type, enabled=False):
            s = log_s.exp().to(x.dtype)  # (n,)
            z1 = _mm_ut(x, lu, s, blocks)  # (b, n) = x U^T
            z2 = _mm_lt(z1, lu, blocks)  # (b, n) = z1 L^T
        ctx.save_for_backward(x, z1, lu, s, inv_perm)
        ctx.blocks, ctx.log_s_dtype = blocks, log_s.dtype
        return z2[:, perm]  # (b, n)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy: Tensor):
        x, z1, lu, s, inv_perm = ctx.saved_tensors
        blocks = ctx.blocks
        n = lu.shape[0]
        g2 = gy[:, inv_perm]  # (b, n) gradient wrt z2
        g1 = _mm_l(g2, lu, blocks)  # (b, n) gradient wrt z1
        gx = _mm_u(g1, lu, s, blocks) if ctx.needs_input_grad[0] else None
        glu = gls = None
        if ctx.needs_input_grad[1]:
            glu = torch.empty_like(lu)  # (n, n): strict lower from L, strict upper from U
            for a, e in blocks:
                if a > 0:
                    torch.mm(g2[:, a:e].T, z1[:, :a], out=glu[a:e, :a])
                if e < n:
                    torch.mm(g1[:, a:e].T, x[:, e:], out=glu[a:e, e:])
                diag = (g2[:, a:e].T @ z1[:, a:e]).tril_(-1)  # (m, m)
                diag.add_((g1[:, a:e].T @ x[:, a:e]).triu_(1))
                glu[a:e, a:e] = diag
        if ctx.needs_input_grad[2]:
            acc = torch.promote_types(x.dtype, torch.float32)
            gls = ((g1 * x).sum(dim=0, dtype=acc) * s.to(acc)).to(ctx.log_s_dtype)  # (n,)
        return gx, glu, gls, None, None, None


class LUInvertibleLinear(nn.Module):
    """Invertible dense linear map ``y = x W^T`` with ``W = P L U`` (Glow's "1x1 conv").

    - ``L``: unit lower triangular; its strictly lower part is ``tril(lu, -1)``;
    - ``U``: upper triangular; strictly upper part ``triu(lu, 1)``, diagonal
      ``exp(log_s) > 0``;  the diagonal of the ``lu`` parameter is unused (kept at 0,
      it never receives a gradient);
    - ``P``: a fixed permutation, stored as the index buffer ``perm`` with
      ``P[i, perm[i]] = 1``, i.e. ``(z P^T)[:, i] = z[:, perm[i]]``.

    ``log|det W| = sum(log_s)``.  Initialisation: ``W`` is a random orthogonal matrix (QR of
    a Gaussian matrix drawn from ``generator``, with the column signs flipped so that the
    LU diagonal is positive), so the layer starts volume-preserving.

    Cost.  Training mode applies the factors to the batch and never forms ``W``:
    ``z = x U^T`` then ``z L^T`` then a column gather.  The triangular products are done
    in blocks of ``block_size`` (see :func:`triangular_pair_flops`): about
    ``(nb + 1) / nb * b n^2`` FLOPs each for ``nb`` blocks, against ``2 b n^2`` for a dense
    product and ``2 n^3`` for forming ``L @ U``.  When the batch is larger than ``n``,
    forming ``W`` is cheaper and that path is taken instead.  The inverse uses
    ``torch.linalg.solve_triangular``.

    Evaluation mode (``.eval()`` and no gradient needed for ``lu``/``log_s``) caches the
    dense ``W`` (forward, one ``2 b n^2`` matmul) and ``W^-1`` (inverse).  The cache is
    dropped on train()/eval(), on ``load_state_dict``, on ``.to()``/``.double()`` and
    whenever ``lu``, ``log_s`` or ``perm`` changed in place (an optimizer step, ``copy_``):
    it is keyed on the tensors' ``_version`` counters and storage.  Writes through
    ``.data`` bypass the version counter: call :meth:`invalidate_cache` after those.
    For inference that needs input gradients only (e.g. MCMC in x), call
    ``requires_grad_(False)`` on the model to keep the cached path.

    Under autocast the triangular products run in the autocast dtype, like ``F.linear``.

    Args:
        n: number of features.
        generator: CPU generator for the random orthogonal init (default: seed 0).
        block_size: block size of the triangular products.
    """

    def __init__(
        self, n: int, generator: torch.Generator | None = None, block_size: int = 512
    ) -> None:
        super().__init__()
        self.n = n
        self.block_size = block_size
        self.lu = nn.Parameter(torch.zeros(n, n))
        self.log_s = nn.Parameter(torch.zeros(n))
        self.register_buffer("perm", torch.arange(n))
        self._cache: dict[str, Tensor] = {}
        self._cache_key: tuple | None = None
        self.reset_parameters(generator if generator is not None else default_generator())

    def extra_repr(self) -> str:
        return f"n={self.n}, block_size={self.block_size}"

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """Random orthogonal ``W = P L U`` from ``generator`` (no-op on the meta device)."""
        self.invalidate_cache()
        if self.lu.is_meta:
            return
        a = torch.randn(self.n, self.n, dtype=torch.float64, generator=generator)  # (n, n)
        q, r = torch.linalg.qr(a)
        q = q * torch.sign(torch.diagonal(r))  # Haar-distributed orthogonal (n, n)
        p, lower, upper = torch.linalg.lu(q)  # q = p @ lower @ upper
        d = torch.diagonal(upper)  # (n,)
        upper = upper * torch.sign(d)  # flip columns: W = q diag(sign d), still orthogonal
        lu = torch.tril(lower, -1) + torch.triu(upper, 1)  # (n, n), zero diagonal
        self.lu.copy_(lu)
        self.log_s.copy_(d.abs().log())
        self.perm.copy_(p.argmax(dim=1))  # p[i, perm[i]] = 1

    # ---- factors ------------------------------------------------------------------------

    def factors(self) -> tuple[Tensor, Tensor]:
        """Dense (L, U), each (n, n), differentiable (O(n^2) memory)."""
        eye = torch.eye(self.n, dtype=self.lu.dtype, device=self.lu.device)
        lower = torch.tril(self.lu, -1) + eye
        upper = torch.triu(self.lu, 1) + torch.diag(self.log_s.exp())
        return lower, upper

    def weight(self) -> Tensor:
        """W = P L U (n, n), differentiable (O(n^3))."""
        lower, upper = self.factors()
        return (lower @ upper)[self.perm]

    def logabsdet(self) -> Tensor:
        """log|det W| (scalar)."""
        return self.log_s.sum()

    # ---- cache --------------------------------------------------------------------------

    def invalidate_cache(self) -> None:
        self._cache = {}
        self._cache_key = None

    def _key(self) -> tuple:
        lu, ls, pm = self.lu, self.log_s, self.perm
        return (
            lu._version, ls._version, pm._version,
            lu.data_ptr(), ls.data_ptr(), pm.data_ptr(),
            lu.dtype, lu.device,
        )  # fmt: skip

    def _use_cache(self) -> bool:
        if self.training:
            return False
        needs_grad = torch.is_grad_enabled() and (self.lu.requires_grad or self.log_s.requires_grad)
        return not needs_grad

    def _cached(self, name: str) -> Tensor:
        key = self._key()
        if key != self._cache_key:
            self._cache = {}
            self._cache_key = key
        if name not in self._cache:
            with torch.no_grad():
                if name == "weight":
                    self._cache[name] = self.weight()  # (n, n)
                elif name == "inverse":  # W^-1 = U^-1 L^-1 P^T
                    lower, upper = self.factors()
                    eye = torch.eye(self.n, dtype=lower.dtype, device=lower.device)
                    linv = torch.linalg.solve_triangular(
                        lower, eye, upper=False, unitriangular=True
                    )
                    ulinv = torch.linalg.solve_triangular(upper, linv, upper=True)
                    self._cache[name] = ulinv[:, self.perm].contiguous()  # (n, n)
                else:  # inverse permutation
                    self._cache[name] = torch.argsort(self.perm)
        return self._cache[name]

    def train(self, mode: bool = True) -> LUInvertibleLinear:
        self.invalidate_cache()
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        self.invalidate_cache()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.invalidate_cache()
        super()._load_from_state_dict(*args, **kwargs)

    # ---- transforms ---------------------------------------------------------------------

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (batch, n) -> y = x W^T (batch, n), logabsdet (batch,)."""
        b = x.shape[0]
        logabsdet = self.log_s.sum().expand(b)  # (b,)
        if self._use_cache():
            return x @ self._cached("weight").T, logabsdet  # (b, n)
        if b > self.n:  # forming W (2 n^3) is cheaper than the triangular products
            return x @ self.weight().T, logabsdet
        lu, log_s = self.lu, self.log_s
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            dtype = torch.get_autocast_dtype(dev)
            x, lu, log_s = x.to(dtype), lu.to(dtype), log_s.to(dtype)
        elif x.dtype != lu.dtype:
            x = x.to(lu.dtype)
        inv_perm = self._cached("inv_perm")  # (n,)
        y = _LUFunction.apply(x, lu, log_s, self.perm, inv_perm, self.block_size)  # (b, n)
        return y, logabsdet

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """y (batch, n) -> x = y W^-T (batch, n), logabsdet (batch,) of the inverse."""
        b = y.shape[0]
        logabsdet = (-self.log_s.sum()).expand(b)  # (b,)
        if self._use_cache():
            return y @ self._cached("inverse").T, logabsdet  # (b, n)
        lower, upper = self.factors()
        z = y[:, torch.argsort(self.perm)]  # (b, n) = y P  (P^-1 = P^T)
        w = torch.linalg.solve_triangular(lower.T, z, upper=True, left=False, unitriangular=True)
        x = torch.linalg.solve_triangular(upper.T, w, upper=False, left=False)  # (b, n)
        return x, logabsdet
