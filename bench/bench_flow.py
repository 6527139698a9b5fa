"""Speed of our flow layers against stock nflows, same architecture, same weights.

One run, side by side, for a preset (default ``compact``) and batch size (default 256),
with torch's default thread count:

(a) measured FP32 matmul peak: the median rate of a model-sized ``torch.mm`` timed in the
    same interleaved rounds as the models (so both see the same load on a shared machine;
    the best-of-N rate of several sizes, measured up front, is reported too);
(b) our MendisFlow: train step (log_prob + backward + Adam step) and log_prob throughput
    (evaluation mode, no grad; our LU layers use their cached W);
(c) the stock-nflows build (``bench/nflows_reference.py``) with our weights copied in: the
    same two numbers, and ours / stock;
(d) analytic matmul FLOPs per train step and per log_prob call (matmuls only: the spline's
    elementwise work is not counted) and the achieved GFLOP/s as a fraction of (a).

Warm-up iterations are excluded, ours and stock alternate (in alternating order) so that
a noisy shared machine hurts both alike, and medians of the repeats are reported (the best
repeat is in the JSON too).  Writes ``bench/results/flow.json``.

    python bench/bench_flow.py                      # compact, batch 256
    python bench/bench_flow.py --quick              # fewer repeats
    python bench/bench_flow.py --compile            # + ours with torch.compile'd splines
    python bench/bench_flow.py --preset tiny --n-pix 200 --batch 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _common import report  # noqa: E402
from nflows_reference import build_stock_flow, copy_weights  # noqa: E402

from mendis_ray.config import FlowConfig, get_preset  # noqa: E402
from mendis_ray.flow.coupling import compiled_splines  # noqa: E402
from mendis_ray.flow.lu import triangular_pair_flops  # noqa: E402
from mendis_ray.flow.model import MendisFlow  # noqa: E402

TARGET_SPEEDUP = 1.5
TARGET_PEAK_FRACTION = 0.5


# ---- FLOP model -----------------------------------------------------------------------------


def conditioner_flops(cfg: FlowConfig, b: int) -> int:
    """Forward matmul FLOPs of all conditioners (trunk + heads), batch b."""
    n, h, k = cfg.n_features, cfg.hidden, cfg.n_bins
    total = 0
    for i in range(cfg.n_units):
        n_id = n // 2 if i % 2 == 0 else n - n // 2
        n_tr = n - n_id
        total += 2 * b * (n_id * h + 2 * cfg.n_blocks * h * h + h * n_tr * (3 * k - 1))
    return total


def flop_model(cfg: FlowConfig, b: int, block_size: int) -> dict[str, int]:
    """Matmul FLOPs per train step (forward + backward) and per log_prob call.

    Ours: each LU applies two blocked triangular products in the forward; the backward needs
    four more of the same size (input gradient through L and U, and the L and U weight
    gradients).  In evaluation the cached dense W is one ``2 b n^2`` product.  Stock nflows
    (``LULinear`` without cache) applies dense L and U: ``2 x 2 b n^2`` forward, twice that
    backward, in training and evaluation alike.  Conditioners: forward F, backward 2F.
    """
    n, u = cfg.n_features, cfg.n_units
    cond = conditioner_flops(cfg, b)
    pair = triangular_pair_flops(b, n, block_size)
    dense = 2 * b * n * n
    return {
        "ours_train": u * 6 * pair + 3 * cond,
        "ours_logprob": u * dense + cond,
        "stock_train": u * 6 * dense + 3 * cond,
        "stock_logprob": u * 2 * dense + cond,
        "conditioner_forward": cond,
    }


# ---- timing -----------------------------------------------------------------------------------


def measure_peak(sizes: list[tuple[int, int, int]], repeat: int) -> dict[str, float]:
    """GFLOP/s of torch.mm (m x k) @ (k x n), best of ``repeat``, for each size."""
    out = {}
    for m, k, n in sizes:
        a, w = torch.randn(m, k), torch.randn(k, n)
        torch.mm(a, w)
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            torch.mm(a, w)
            best = min(best, time.perf_counter() - t0)
        out[f"{m}x{k}@{k}x{n}"] = 2 * m * k * n / best / 1e9
    return out


def interleaved(fns: dict[str, Callable[[], object]], warmup: int, repeat: int) -> dict:
    """Times of each fn, called in turn (order alternating between rounds)."""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(warmup + repeat):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[name]()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return {k: {"median": statistics.median(v), "best": min(v), "all": v} for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="compact")
    ap.add_argument("--n-pix", type=int, default=None, help="override the preset's n_pix")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="3 repeats, 1 warm-up")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--name", default="flow", help="results/NAME.json")
    ap.add_argument(
        "--compile", action="store_true", help="also time ours with torch.compile'd splines"
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 3, 1

    cfg, _ = get_preset(args.preset)
    if args.n_pix is not None:
        cfg = cfg.replace(n_pix=args.n_pix)
    b, n = args.batch, cfg.n_features
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    print(
        f"preset {cfg.name}: n_features {n}, units {cfg.n_units}, hidden {cfg.hidden}, "
        f"blocks {cfg.n_blocks}, bins {cfg.n_bins}; batch {b}; threads {threads}"
    )

    # (a) matmul peak
    peak_sizes = [(b, n, n), (2048, 2048, 2048), (b, cfg.hidden, n * (3 * cfg.n_bins - 1) // 2)]
    peaks = measure_peak(peak_sizes, repeat=3 if args.quick else 5)
    peak = max(peaks.values())
    for k, v in peaks.items():
        print(f"  matmul {k}: {v:.1f} GFLOP/s")

    # models with the same weights
    ours = MendisFlow(cfg, seed=0)
    x = torch.randn(b, n)  # (b, n) standardized-like data
    ours.initialize(x)
    stock = build_stock_flow(cfg)
    copy_weights(ours, stock)
    with torch.no_grad():
        ours.eval(), stock.eval()
        lp_o, lp_s = ours.log_prob(x), stock.log_prob(x)
        agree = float(((lp_o - lp_s).abs() / lp_s.abs().clamp_min(1.0)).max())
    print(f"  log_prob agreement (max relative difference): {agree:.2e}")
    block_size = ours.layers[1].block_size

    # (b, c) train step, interleaved.  With --compile, "ours_compiled" is the same model
    # (same weights, same optimizer) with its splines run through torch.compile.
    variants = ["ours", "ours_compiled", "stock"] if args.compile else ["ours", "stock"]
    ours.train(), stock.train()
    opt_o = torch.optim.Adam(ours.parameters(), lr=args.lr)
    opt_s = torch.optim.Adam(stock.parameters(), lr=args.lr)

    def using(name: str, f: Callable[[], object]) -> Callable[[], None]:
        def g() -> None:
            with compiled_splines(name == "ours_compiled"):
                f()

        return g

    def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad(set_to_none=True)
        loss = -model.log_prob(x).mean()
        loss.backward()
        opt.step()

    def lp(model: torch.nn.Module) -> Callable[[], object]:
        def f() -> None:
            with torch.no_grad():
                model.log_prob(x)

        return f

    compile_s = 0.0
    if args.compile:  # compile every graph (train forward/backward, evaluation) up front
        t0 = time.perf_counter()
        for _ in range(2):
            using("ours_compiled", lambda: train_step(ours, opt_o))()
        ours.eval()
        for _ in range(2):
            using("ours_compiled", lp(ours))()
        ours.train()
        compile_s = time.perf_counter() - t0
        print(f"  torch.compile of the spline (train + eval graphs): {compile_s:.0f} s")

    # The matmul rate is also timed inside the same interleaved rounds (a model-sized
    # (b x n) @ (n x n) product), so that "% of peak" compares medians taken under the same
    # load; the best-of-N rate measured up front is kept as well.
    pa, pw = torch.randn(b, n), torch.randn(n, n)
    peak_reps = 8

    def matmul_round() -> None:
        for _ in range(peak_reps):
            torch.mm(pa, pw)

    models = {"ours": (ours, opt_o), "ours_compiled": (ours, opt_o), "stock": (stock, opt_s)}
    train = interleaved(
        {
            **{v: using(v, lambda m=models[v]: train_step(*m)) for v in variants},
            "matmul": matmul_round,
        },
        args.warmup,
        args.repeats,
    )

    # log_prob throughput, evaluation mode, no grad (our LU cache is built in the warm-up)
    ours.eval(), stock.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        ours.log_prob(x)
    first_call = time.perf_counter() - t0
    logp = interleaved(
        {**{v: using(v, lp(models[v][0])) for v in variants}, "matmul": matmul_round},
        args.warmup,
        args.repeats,
    )
    mm_flops = peak_reps * 2 * b * n * n
    peak_best = peak
    peak = statistics.median(
        mm_flops / t / 1e9 for t in train["matmul"]["all"] + logp["matmul"]["all"]
    )
    print(
        f"  matmul rate: best {peak_best:.1f} GFLOP/s up front, median {peak:.1f} GFLOP/s "
        "interleaved with the model runs (used for % of peak)"
    )

    # (d) FLOPs
    fl = flop_model(cfg, b, block_size)
    rows = []
    flops = {
        "train": {v: fl["stock_train" if v == "stock" else "ours_train"] for v in variants},
        "log_prob": {v: fl["stock_logprob" if v == "stock" else "ours_logprob"] for v in variants},
    }

    def row(measure: str, unit: str, vals: dict[str, float]) -> None:
        r = {"measure": measure, "unit": unit, **vals}
        for v in variants[:-1]:
            r[f"{v}/stock"] = vals[v] / vals["stock"] if vals["stock"] else float("nan")
        rows.append(r)

    achieved = {}
    for what, times in (("train", train), ("log_prob", logp)):
        t = {v: times[v]["median"] for v in variants}
        if what == "train":
            row("train step", "ms", {v: t[v] * 1e3 for v in variants})
            row("train speed", "steps/s", {v: 1 / t[v] for v in variants})
        else:
            row("log_prob call", "ms", {v: t[v] * 1e3 for v in variants})
            row("log_prob throughput", "spectra/s", {v: b / t[v] for v in variants})
        row(f"{what} matmul FLOPs", "GFLOP", {v: flops[what][v] / 1e9 for v in variants})
        ach = {v: flops[what][v] / t[v] / 1e9 for v in variants}
        achieved[what] = ach
        row(f"{what} achieved", "GFLOP/s", ach)
        row(f"{what} % of peak", "%", {v: 100 * ach[v] / peak for v in variants})
    print()
    speed = {
        what: {v: times["stock"]["median"] / times[v]["median"] for v in variants[:-1]}
        for what, times in (("train", train), ("log_prob", logp))
    }
    checks = {}
    for v in variants[:-1]:
        for what in ("train", "log_prob"):
            checks[f"{v} {what} speedup >= {TARGET_SPEEDUP}"] = speed[what][v] >= TARGET_SPEEDUP
            checks[f"{v} {what} >= {TARGET_PEAK_FRACTION:.0%} of peak"] = (
                achieved[what][v] / peak >= TARGET_PEAK_FRACTION
            )
    speed_train, speed_lp = speed["train"]["ours"], speed["log_prob"]["ours"]
    extra = {
        "config": cfg.to_dict(),
        "batch": b,
        "threads": threads,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "lu_block_size": block_size,
        "matmul_peak_gflops": peak,
        "matmul_peak_definition": "median rate of a (batch x n) @ (n x n) torch.mm timed in "
        "the same interleaved rounds as the models",
        "matmul_best_gflops_up_front": peak_best,
        "matmul_gflops": peaks,
        "flops": fl,
        "logprob_agreement_max_rel": agree,
        "ours_first_eval_call_s": first_call,
        "compile_seconds": compile_s,
        "speedup_vs_stock": speed,
        "times_s": {"train": train, "log_prob": logp},
        "targets": checks,
    }
    report(args.name, rows, extra)
    print(
        f"matmul peak {peak:.1f} GFLOP/s; "
        f"speedup train {speed_train:.2f}x, log_prob {speed_lp:.2f}x"
    )
    print(f"first evaluation call of ours (builds the LU caches): {first_call * 1e3:.0f} ms")
    for k, ok in checks.items():
        print(f"  target {k}: {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
