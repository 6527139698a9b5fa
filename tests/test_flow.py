"""Math invariants of every flow transform and of small flows (float64), the LU cache,
bf16, seeds, parameter counts, and agreement with a stock-nflows build of the same
architecture."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch

from mendis_ray.config import FlowConfig, get_preset
from mendis_ray.flow import MendisFlow, count_parameters
from mendis_ray.flow.actnorm import ActNorm
from mendis_ray.flow.coupling import RQSplineCoupling, compiled_splines
from mendis_ray.flow.lu import LUInvertibleLinear
from mendis_ray.flow.spline import rq_spline

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _reference():
    spec = importlib.util.spec_from_file_location("nflows_reference", BENCH / "nflows_reference.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("nflows_reference", mod)
    spec.loader.exec_module(mod)
    return mod


def _perturb(module: torch.nn.Module, scale: float, seed: int) -> None:
    """Move every parameter off its (often identity) init so the test sees real maps."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for m in module.modules():
            if isinstance(m, LUInvertibleLinear):
                m.lu.diagonal().zero_()
                m.perm.copy_(torch.randperm(m.n, generator=g))
                m.invalidate_cache()
            if isinstance(m, ActNorm):
                m.initialized.fill_(True)
                m._known_initialized = True


def _flow(n_pix: int, **kw: object) -> MendisFlow:
    cfg = FlowConfig(name="t", n_pix=n_pix, n_units=2, hidden=16, n_blocks=1, n_bins=4, grid="none")
    return MendisFlow(cfg.replace(**kw), seed=1)


class _Spline(torch.nn.Module):
    """:func:`rq_spline` on each of ``n`` features, its knot parameters held as
    parameters (the pure function as a transform)."""

    def __init__(self, n: int, k: int, bound: float) -> None:
        super().__init__()
        self.n, self.bound = n, bound
        g = torch.Generator().manual_seed(4)
        self.w = torch.nn.Parameter(torch.randn(n, k, generator=g))
        self.h = torch.nn.Parameter(torch.randn(n, k, generator=g))
        self.d = torch.nn.Parameter(torch.randn(n, k - 1, generator=g))

    def _run(self, x: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        params = (p.expand(b, *p.shape) for p in (self.w, self.h, self.d))
        y, lad = rq_spline(x, *params, self.bound, inverse=inverse)  # (b, n), (b, n)
        return y, lad.sum(dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run(x, inverse=False)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run(y, inverse=True)


class _WithContext(torch.nn.Module):
    """A context-conditioned coupling (as in the signal-space flow) at a fixed context."""

    def __init__(self, layer: RQSplineCoupling) -> None:
        super().__init__()
        self.layer, self.n = layer, layer.n
        self.register_buffer("context", torch.linspace(-1.0, 2.0, layer.n_context))

    def _ctx(self, x: torch.Tensor) -> torch.Tensor:
        return self.context.to(x.dtype).expand(x.shape[0], -1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer(x, self._ctx(x))

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer.inverse(y, self._ctx(y))


# (name, builder) pairs: every transform and small variants of the whole flow.
VARIANTS = {
    "spline": lambda: _Spline(6, k=5, bound=2.0),
    "actnorm": lambda: ActNorm(7),
    "lu": lambda: LUInvertibleLinear(7, generator=torch.Generator().manual_seed(3)),
    "lu_blocked": lambda: LUInvertibleLinear(
        9, generator=torch.Generator().manual_seed(3), block_size=2
    ),
    "coupling_even": lambda: RQSplineCoupling(6, 0, hidden=8, n_blocks=1, n_bins=4, tail_bound=3.0),
    "coupling_odd": lambda: RQSplineCoupling(7, 1, hidden=8, n_blocks=2, n_bins=5, tail_bound=2.0),
    "coupling_context": lambda: _WithContext(
        RQSplineCoupling(6, 1, hidden=8, n_blocks=1, n_bins=4, tail_bound=3.0, n_context=2)
    ),
    "flow": lambda: _flow(5),
    "flow_odd_width": lambda: _flow(4, n_units=3, n_bins=6, tail_bound=2.0),
}


def _x(n: int, b: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 1.5 * torch.randn(b, n, generator=g, dtype=torch.float64)  # some points in the tails


def _n(m: torch.nn.Module) -> int:
    return m.n_features if isinstance(m, MendisFlow) else m.n


def _fwd(m: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return m.transform(x) if isinstance(m, MendisFlow) else m(x)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_invariants_float64(name: str, training: bool) -> None:
    m = VARIANTS[name]().double()
    _perturb(m, 0.3, seed=7)
    m.train(training)
    n = _n(m)
    x = _x(n)  # (5, n)

    # inverse(forward(x)) == x, and the inverse's log-det is minus the forward's
    y, lad = _fwd(m, x)
    assert y.shape == x.shape and lad.shape == (x.shape[0],) and y.dtype == torch.float64
    x_back, lad_inv = m.inverse(y)
    torch.testing.assert_close(x_back, x, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(lad_inv, -lad, atol=1e-9, rtol=1e-9)

    # log|det J| equals the autograd Jacobian, row by row
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda r: _fwd(m, r[None])[0][0], x[i])
        torch.testing.assert_close(lad[i], torch.linalg.slogdet(jac)[1], atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("name", [k for k in VARIANTS if k.startswith("flow")])
def test_sample_shape_dtype_and_save_load(name: str, tmp_path: Path) -> None:
    m = VARIANTS[name]()
    _perturb(m, 0.2, seed=2)
    m.eval()
    s = m.sample(11, generator=torch.Generator().manual_seed(0))
    assert s.shape == (11, m.n_features) and s.dtype == torch.float32 and torch.isfinite(s).all()
    s64 = m.double().sample(3)
    assert s64.dtype == torch.float64
    m.float()
    # samples are draws of the model: log_prob of a sample matches the change of variables
    z = torch.randn(4, m.n_features, generator=torch.Generator().manual_seed(1))
    x, lad_inv = m.inverse(z)
    base = -0.5 * (z * z).sum(1) - 0.5 * m.n_features * torch.log(torch.tensor(2 * torch.pi))
    torch.testing.assert_close(m.log_prob(x), base - lad_inv, atol=1e-3, rtol=1e-4)

    from safetensors.torch import load_file, save_file

    x = _x(m.n_features).float()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    fresh = VARIANTS[name]()
    fresh.load_state_dict(load_file(str(path)))
    fresh.eval()
    assert torch.equal(fresh.log_prob(x), m.log_prob(x))


def test_lu_cache_never_stale() -> None:
    lu = LUInvertibleLinear(6, generator=torch.Generator().manual_seed(0)).eval()
    x = torch.randn(3, 6)
    with torch.no_grad():
        y0, _ = lu(x)
        assert lu._cache_key is not None  # the evaluation path cached W
        torch.testing.assert_close(y0, x @ lu.weight().T)
        # an optimizer-style in-place update must invalidate the cache
        lu.lu.add_(0.1)
        torch.testing.assert_close(lu(x)[0], x @ lu.weight().T)
        # load_state_dict of other weights must too
        other = LUInvertibleLinear(6, generator=torch.Generator().manual_seed(5))
        lu.load_state_dict(other.state_dict())
        torch.testing.assert_close(lu(x)[0], x @ other.weight().T)
        # the cached inverse follows as well
        lu.log_s.add_(0.2)
        torch.testing.assert_close(lu.inverse(lu(x)[0])[0], x, atol=1e-5, rtol=1e-5)


def test_lu_training_path_matches_dense_and_gradients() -> None:
    """The blocked, hand-differentiated factor path equals the dense W = P L U product,
    values and gradients, in float64 (gradcheck)."""
    lu = LUInvertibleLinear(7, generator=torch.Generator().manual_seed(1), block_size=3).double()
    _perturb(lu, 0.2, seed=3)
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(lu(x)[0], x @ lu.weight().T)
    from mendis_ray.flow.lu import _LUFunction

    inv = torch.argsort(lu.perm)
    assert torch.autograd.gradcheck(
        lambda xx, a, s: _LUFunction.apply(xx, a, s, lu.perm, inv, 3),
        (x, lu.lu.detach().clone().requires_grad_(), lu.log_s.detach().clone().requires_grad_()),
    )


def test_lu_training_path_keeps_the_input_dtype_when_exp_runs_in_float32() -> None:
    """CUDA's bf16 autocast runs ``exp`` in float32, so the diagonal of U arrived in
    float32 beside bfloat16 products (a GPU training step raised "Float and BFloat16").
    A float32 ``log_s`` beside bfloat16 ``x`` and ``lu`` stands for that on any machine:
    values and gradients in bfloat16 close to the dense float32 product's."""
    from mendis_ray.flow.lu import _LUFunction

    lu = LUInvertibleLinear(7, generator=torch.Generator().manual_seed(1), block_size=3)
    _perturb(lu, 0.2, seed=3)
    x = torch.randn(4, 7)
    xb = x.bfloat16().requires_grad_()
    a = lu.lu.detach().bfloat16().requires_grad_()
    s = lu.log_s.detach().clone().requires_grad_()  # float32
    y = _LUFunction.apply(xb, a, s, lu.perm, torch.argsort(lu.perm), 3)  # (4, 7)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), (x @ lu.weight().T).detach(), atol=0.06, rtol=0.03)
    y.float().square().sum().backward()
    assert (xb.grad.dtype, a.grad.dtype, s.grad.dtype) == (
        torch.bfloat16, torch.bfloat16, torch.float32,
    )  # fmt: skip
    x32 = x.clone().requires_grad_()
    (x32 @ lu.weight().T).square().sum().backward()  # the dense float32 reference
    for got, want in ((xb.grad, x32.grad), (a.grad, lu.lu.grad), (s.grad, lu.log_s.grad)):
        torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, _CUDA])])
def test_flow_trains_under_bf16_autocast(device, monkeypatch) -> None:
    """A training step of a small flow under bf16 autocast, through the LU layers'
    blocked products (batch < features): log p within bf16 precision of float32, finite
    gradients.  On CUDA this raised "Float and BFloat16" before (bench_gpu.py's rows)."""
    from mendis_ray.flow import lu as lu_module

    flow = _flow(40).to(device)
    x = torch.randn(16, flow.cfg.n_features, device=device)  # (16, 43): the blocked path
    flow.initialize(x)
    flow.train()
    calls = []
    apply = lu_module._LUFunction.apply
    monkeypatch.setattr(lu_module._LUFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    with torch.autocast(device, dtype=torch.bfloat16):
        lp = flow(x)  # (16,)
    assert len(calls) == 2  # both LU layers took the blocked path under autocast
    exact = flow(x)
    torch.testing.assert_close(lp.float(), exact, atol=0.5, rtol=0.05)
    (-lp.mean()).backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in flow.parameters() if p.grad is not None)


@pytest.mark.gpu
@_CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spline_on_cuda_matches_the_cpu(dtype) -> None:
    """rq_spline on a GPU (knots summed through the first axis there) equals the CPU's
    values, log-derivatives and gradients to rounding.  float32 on an H200: at most
    1.8e-5 (values), 1.0e-4 (log-derivatives up to 8.6) and 4e-3 relative (gradients up to
    500, from these deliberately extreme random bins); float64 to 1e-11."""
    g = torch.Generator().manual_seed(4)
    x = 4 * torch.rand(256, 30, generator=g, dtype=dtype) - 2
    w, h = (torch.randn(256, 30, 8, generator=g, dtype=dtype) for _ in range(2))
    d = torch.randn(256, 30, 7, generator=g, dtype=dtype)
    out = {}
    for dev in ("cpu", "cuda"):
        ws = w.to(dev).detach().requires_grad_()  # a leaf on each device
        y, lad = rq_spline(x.to(dev), ws, h.to(dev), d.to(dev), 3.0)
        (y.sum() + lad.sum()).backward()
        out[dev] = [t.detach().cpu() for t in (y, lad, ws.grad)]
    tol = {"rtol": 1e-2, "atol": 1e-3} if dtype == torch.float32 else {}
    for a, b in zip(out["cpu"], out["cuda"], strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_actnorm_initialize_is_explicit_and_deterministic() -> None:
    x = torch.randn(64, 8) * 3 + 2
    a, b = _flow(5), _flow(5)
    a.initialize(x)
    b.initialize(x)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    first = a.layers[0]
    y, _ = first(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(0), torch.ones(8), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"ActNorm\.initialize"):
        ActNorm(3).initialize(torch.randn(1, 3))


def test_seed_fixes_weights_and_global_rng_is_untouched() -> None:
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    a = _flow(5)
    assert torch.equal(torch.random.get_rng_state(), state)  # no draw from the global RNG
    b = _flow(5)
    for va, vb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb)
    c = MendisFlow(a.cfg, seed=2)
    assert not torch.equal(a.layers[1].lu, c.layers[1].lu)


def test_fresh_flow_coupling_is_identity() -> None:
    cpl = RQSplineCoupling(6, 1, hidden=8, n_blocks=1, n_bins=4, tail_bound=3.0)
    x = torch.randn(5, 6)
    y, lad = cpl(x)
    torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lad, torch.zeros(5), atol=1e-5, rtol=0)


def test_bf16_autocast_runs_and_stays_close() -> None:
    m = _flow(30)
    _perturb(m, 0.05, seed=4)
    x = torch.randn(8, m.n_features)
    ref = m.log_prob(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = m.log_prob(x)
        lp.mean().backward()  # the backward runs too (stock nflows' spline crashes here)
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all()
    assert (lp - ref).abs().max() < 0.05 * ref.abs().max() + 1.0


def test_no_deprecation_warnings() -> None:
    m = _flow(5)
    x = torch.randn(6, m.n_features)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.initialize(x)
        m.train()
        (-m.log_prob(x).mean()).backward()
        m.eval()
        with torch.no_grad():
            m.inverse(m.transform(x)[0])
            m.sample(3)
        m.layers[1].train()
        m.layers[1].inverse(x)  # solve_triangular path, not torch.triangular_solve


def test_count_parameters() -> None:
    cfg = FlowConfig(name="t", n_pix=5, n_units=2, hidden=16, n_blocks=1, n_bins=4, grid="none")
    assert count_parameters(cfg) == MendisFlow(cfg).n_parameters()
    n, h, k = cfg.n_features, cfg.hidden, cfg.n_bins
    # ActNorm (loc, log_scale) + LU (lu matrix incl. its unused diagonal, log_s), per unit
    expected = cfg.n_units * (2 * n + n * n + n)
    for n_id in (n // 2, n - n // 2):  # two units: one coupling of each parity
        n_tr = n - n_id
        trunk = (n_id * h + h) + cfg.n_blocks * 2 * (h * h + h)
        heads = (h + 1) * n_tr * (3 * k - 1)  # widths K, heights K, derivatives K - 1
        expected += trunk + heads
    assert count_parameters(cfg) == expected
    paper = count_parameters(get_preset("paper")[0])
    assert 0.5e9 < paper < 2e9  # "about 1e9 parameters as published"


@pytest.mark.parametrize("n_pix", [5, 12])
def test_agreement_with_stock_nflows(n_pix: int) -> None:
    ref = _reference()
    cfg = FlowConfig(name="t", n_pix=n_pix, n_units=3, hidden=16, n_blocks=2, n_bins=5, grid="none")
    ours = MendisFlow(cfg, seed=3)
    _perturb(ours, 0.1, seed=5)
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, LUInvertibleLinear):
                m.log_s.clamp_(min=-3.0)  # stay representable by nflows' softplus diagonal
    stock = ref.build_stock_flow(cfg)
    ref.copy_weights(ours, stock)
    ours.eval()
    stock.eval()
    x = 1.5 * torch.randn(64, cfg.n_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours.log_prob(x), stock.log_prob(x)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch")  # torch's own, while compiling
def test_compiled_spline_matches_eager() -> None:
    """torch.compile'd splines give the eager values and gradients (float32 rounding), only
    inside the compiled_splines context."""
    from mendis_ray.flow import coupling

    m = _flow(9)
    _perturb(m, 0.2, seed=8)
    x = 1.5 * torch.randn(16, m.n_features, generator=torch.Generator().manual_seed(2))

    def run() -> tuple[torch.Tensor, ...]:
        m.zero_grad()
        lp = m.log_prob(x)
        lp.sum().backward()
        back, _ = m.inverse(m.transform(x)[0].detach())
        return lp.detach(), back.detach(), m.layers[2].widths.weight.grad.clone()

    eager = run()
    with compiled_splines():
        assert coupling.spline_function() is not coupling.spline_rows
        compiled = run()
        with compiled_splines(False):
            assert coupling.spline_function() is coupling.spline_rows
        assert coupling.spline_function() is not coupling.spline_rows
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    assert coupling.spline_function() is coupling.spline_rows


def test_coupling_rejects_bad_bins() -> None:
    with pytest.raises(ValueError, match="n_bins"):
        RQSplineCoupling(6, 0, hidden=8, n_blocks=1, n_bins=1, tail_bound=3.0)
    with pytest.raises(ValueError, match="do not fit"):
        RQSplineCoupling(6, 0, hidden=8, n_blocks=1, n_bins=2000, tail_bound=3.0)


def test_make_optimizer_freezes_and_unfreezes_the_affine_layers() -> None:
    from mendis_ray.config import TrainConfig
    from mendis_ray.train.loop import make_optimizer

    m = _flow(5)
    affine = [p for mod in m.modules() if isinstance(mod, ActNorm | LUInvertibleLinear)
              for p in mod.parameters(recurse=False)]  # fmt: skip
    opt = make_optimizer(m, TrainConfig(lr=1e-3, linear_lr_scale=0.0, weight_decay=0.1))
    assert not any(p.requires_grad for p in affine) and len(opt.param_groups) == 1
    opt = make_optimizer(m, TrainConfig(lr=1e-3, linear_lr_scale=0.01, weight_decay=0.1))
    assert all(p.requires_grad for p in affine) and len(opt.param_groups) == 2
    lin = opt.param_groups[1]
    assert lin["lr"] == pytest.approx(1e-5) and lin["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="linear_lr_scale"):
        make_optimizer(m, TrainConfig(linear_lr_scale=-1.0))
