"""GPU checks (run on a machine with CUDA; never part of the tests): the paper preset's
training step and scoring, and the signal-space model's flow, in spectra per second.

    python bench/bench_gpu.py [--out DIR] [--device cuda] [--preset paper]

(a) the preset's flow (``paper``: 20 units on 2408 dimensions, ~1.19e9 parameters):
    - the training step as the product runs it (:func:`mendis_ray.train.loop.train_epoch`
      with :func:`~mendis_ray.train.loop.make_optimizer`'s fused Adam and the preset's
      gradient clipping, float32, TF32 off, the preset's batch), which is what a Ray Train
      worker with ``--gpu`` executes (without DDP's all-reduce);
    - the same step with the splines in CPU-sized chunks (the code before
      ``RQSplineCoupling.device_chunk_elements``: side by side), with TF32 matrix
      products, with the splines through ``torch.compile`` (``compiled_splines``; the
      compiling epoch timed apart), and under bf16 autocast (the splines stay in
      float32) at the preset's batch and at 256: what those options would buy;
    - evaluation-mode log p at batch 1024 (float32: exact scores), chunked and not;
    - scoring as ``mendis score`` does for a full-space flow (:class:`Scorer` on the
      device, a reference of 512 simulated paper-set spectra, ``marginal="none"``), on
      simulated spectra at S/N 300 with their inverse variances: numpy in, numpy out;
(b) the splines' cumulative sum over bins, before and after ``_cumsum_last``, alone;
(c) the signal-space model's conditional flow (k = 10 signal coordinates + 3 labels, the
    default architecture): log q at batch 65536 and a training step at batch 256.

Warm-ups excluded, synchronised wall time, median of the timed repeats.  Writes
``gpu.json`` into ``--out`` (default bench/results/).  ``--device cpu --preset compact``
runs every row on this machine's CPU (a dry run of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mendis_ray.config import SignalConfig, get_preset
from mendis_ray.flow.coupling import RQSplineCoupling, compiled_splines
from mendis_ray.flow.density import SpectrumDensity, Standardizer
from mendis_ray.flow.model import MendisFlow
from mendis_ray.flow.signal import ConditionalFlow
from mendis_ray.flow.spline import _cumsum_last
from mendis_ray.science.ood import Scorer
from mendis_ray.spectra.degrade import add_noise
from mendis_ray.spectra.grid import get_grid
from mendis_ray.spectra.simulate import Simulator, paper_training_labels
from mendis_ray.train.loop import make_optimizer, train_epoch

SNR = 300.0


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev: torch.device, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_gib(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def train_step(model, x, opt, autocast: bool) -> None:
    """One Adam step on -mean log p, optionally under bf16 autocast."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = -model(x).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def row(model: str, what: str, batch: int, seconds: float, dev, **extra) -> dict:
    r = {"model": model, "what": what, "batch": batch, "seconds": seconds,
         "spectra_per_s": batch / seconds, "peak_gib": peak_gib(dev), **extra}  # fmt: skip
    print(f"{model:<20} {what:<40} batch {batch:>6}  {r['spectra_per_s']:>12,.0f} spectra/s"
          f"  {1e3 * seconds:9.1f} ms", flush=True)  # fmt: skip
    return r


def simulated(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` paper-set spectra at S/N 300: flux (n, 2405), ivar (n, 2405), labels (n, 3)."""
    rng = np.random.default_rng(seed)
    lab = paper_training_labels(n, rng)
    flux, ivar = add_noise(Simulator()(lab), SNR, rng)  # (n, 2405) each
    labels = np.stack([lab.teff, lab.logg, lab.feh], axis=1)  # (n, 3)
    return flux, ivar, labels


@contextlib.contextmanager
def cpu_chunks(enabled: bool) -> Iterator[None]:
    """Within: the couplings chunk their splines on a GPU as on a CPU (the code before
    ``device_chunk_elements``), for a side-by-side row."""
    old = RQSplineCoupling.device_chunk_elements
    RQSplineCoupling.device_chunk_elements = RQSplineCoupling.chunk_elements if enabled else old
    try:
        yield
    finally:
        RQSplineCoupling.device_chunk_elements = old


def product_train_rows(flow, n: int, tcfg, dev: torch.device, steps: int = 10) -> list[dict]:
    """The product's epoch loop over ``steps`` batches (the preset's size, ``n`` features):
    float32 with the splines chunked as on a CPU (before) and in one call (now), then
    with TF32 matrix products."""
    xs = [torch.randn(tcfg.batch_size, n, device=dev) for _ in range(steps)]
    opt = make_optimizer(flow, tcfg)
    rows = []
    for what, chunks, tf32 in (("fp32, splines in CPU chunks", True, False),
                               ("fp32", False, False), ("fp32, TF32", False, True)):  # fmt: skip
        torch.backends.cuda.matmul.allow_tf32 = tf32
        reset_peak(dev)
        with cpu_chunks(chunks):
            dt = (
                timed(lambda: train_epoch(flow, xs, opt, tcfg.grad_clip), dev, warmup=1, repeats=3)
                / steps
            )
        rows.append(row("preset flow", f"train step, product ({what})", tcfg.batch_size, dt, dev))
    torch.backends.cuda.matmul.allow_tf32 = False
    return rows


def bf16_rows(flow, n: int, tcfg, dev: torch.device) -> list[dict]:
    """Adam steps under bf16 autocast at the preset's batch and at 256 (its own
    optimizer, freed on return, so later rows' peak memory does not hold its state)."""
    opt = torch.optim.Adam(flow.parameters(), lr=tcfg.lr, fused=True)
    flow.train()
    rows = []
    for batch in sorted({tcfg.batch_size, 256}):
        x = torch.randn(batch, n, device=dev)
        reset_peak(dev)
        dt = timed(lambda x=x: train_step(flow, x, opt, True), dev)
        rows.append(row("preset flow", "train step (bf16 autocast)", batch, dt, dev))
    return rows


def compiled_row(flow, n: int, tcfg, dev: torch.device, steps: int = 10) -> dict:
    """The product's step with the splines through ``torch.compile``
    (:func:`compiled_splines`); the first epoch (which compiles) is timed apart."""
    xs = [torch.randn(tcfg.batch_size, n, device=dev) for _ in range(steps)]
    opt = make_optimizer(flow, tcfg)
    reset_peak(dev)
    try:
        with compiled_splines():
            t0 = time.perf_counter()
            train_epoch(flow, xs, opt, tcfg.grad_clip)
            sync(dev)
            first = time.perf_counter() - t0
            dt = (
                timed(lambda: train_epoch(flow, xs, opt, tcfg.grad_clip), dev, warmup=0, repeats=3)
                / steps
            )
    except Exception as exc:  # a compiler missing or failing: say so, keep the other rows
        print(f"compiled splines failed: {exc!r}", flush=True)
        return {"model": "preset flow", "what": "train step, compiled splines", "error": repr(exc)}
    return row("preset flow", "train step, product (fp32, compiled splines)", tcfg.batch_size,
               dt, dev, first_epoch_s=first)  # fmt: skip


def profile_step(flow, n: int, tcfg, dev: torch.device, out: Path) -> str:
    """torch.profiler's table of one product training step, splines in one call (top 25
    ops by own time on the device, or on the CPU for a dry run); also written to
    ``out/gpu_profile_step.txt`` (a dry run: ``gpu_dry_run_profile_step.txt``)."""
    from torch.profiler import ProfilerActivity, profile

    xs = [torch.randn(tcfg.batch_size, n, device=dev)]
    opt = make_optimizer(flow, tcfg)
    train_epoch(flow, xs, opt, tcfg.grad_clip)  # warm-up
    sync(dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        train_epoch(flow, xs, opt, tcfg.grad_clip)
        sync(dev)
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25)
    name = "gpu_profile_step.txt" if dev.type == "cuda" else "gpu_dry_run_profile_step.txt"
    (out / name).write_text(table)
    print(table, flush=True)
    return table


def scoring_row(flow, cfg, dev: torch.device, n_ref: int = 512, n_score: int = 2048) -> dict:
    """``Scorer.score`` (``mendis score``'s full-flow path) on the device, numpy in/out."""
    flux, ivar, labels = simulated(n_ref + n_score)
    std = Standardizer.fit(flux[:n_ref], labels[:n_ref])
    grid = get_grid(cfg.grid).describe()
    density = SpectrumDensity(flow, std, cfg, grid).eval()
    sc = Scorer.fit(density, flux[:n_ref], labels[:n_ref], ivar=ivar[:n_ref],
                    n_signal=8, n_marginal=0, gaussian=False)  # fmt: skip
    f, iv, lab = flux[n_ref:], ivar[n_ref:], labels[n_ref:]
    reset_peak(dev)
    dt = timed(lambda: sc.score(f, iv, lab, marginal="none", batch_size=1024), dev,
               warmup=1, repeats=3)  # fmt: skip
    out = sc.score(f, iv, lab, marginal="none", batch_size=1024)
    finite = float(np.isfinite(out["log_p"]).mean())
    return row("preset flow", "Scorer.score (mendis score's path)", n_score, dt, dev,
               finite_log_p=finite)  # fmt: skip


def cumsum_rows(dev: torch.device, shape: tuple[int, int, int] = (1024, 1204, 8)) -> list[dict]:
    """The knots' cumulative sum over K bins, one spline's (rows, n_tr, K) tensor at the
    paper preset's log p batch: ``torch.cumsum`` over the innermost axis (before) against
    :func:`~mendis_ray.flow.spline._cumsum_last` (through the first axis on a GPU)."""
    reset_peak(dev)
    t = torch.rand(shape, device=dev)
    ref = torch.cumsum(t, dim=-1)
    rows = []
    for what, fn in (("cumsum, innermost axis", lambda: torch.cumsum(t, dim=-1)),
                     ("cumsum, _cumsum_last", lambda: _cumsum_last(t))):  # fmt: skip
        dt = timed(fn, dev, repeats=20)
        err = float((fn() - ref).abs().max())
        rows.append(row("spline knots", what, shape[0], dt, dev, max_abs_diff=err))
    return rows


def preset_rows(dev: torch.device, preset: str, out: Path) -> list[dict]:
    cfg, tcfg = get_preset(preset)
    t0 = time.perf_counter()
    flow = MendisFlow(cfg, seed=0)
    build_s = time.perf_counter() - t0
    flow = flow.to(dev)
    n = cfg.n_features
    flow.initialize(torch.randn(512, n, device=dev))
    print(f"{preset}: {flow.n_parameters():,} parameters, built in {build_s:.1f} s", flush=True)
    rows = product_train_rows(flow, n, tcfg, dev)
    profile_step(flow, n, tcfg, dev, out)
    rows += bf16_rows(flow, n, tcfg, dev)
    flow.eval()
    x = torch.randn(1024, n, device=dev)
    for what, chunks in (("log p (fp32, eval, splines in CPU chunks)", True),
                         ("log p (fp32, eval)", False)):  # fmt: skip
        reset_peak(dev)
        with torch.no_grad(), cpu_chunks(chunks):
            dt = timed(lambda: flow.log_prob(x), dev)
        rows.append(row("preset flow", what, 1024, dt, dev))
    rows.append(scoring_row(flow, cfg, dev))
    if dev.type == "cuda":  # last: a compiler may fail or take a while
        rows.append(compiled_row(flow.train(), n, tcfg, dev))
    for r in rows:
        r |= {"preset": preset, "parameters": flow.n_parameters(), "build_s": build_s}
    return rows


def signal_rows(dev: torch.device) -> list[dict]:
    reset_peak(dev)
    cfg = SignalConfig()
    flow = ConditionalFlow(13, 1, cfg, seed=0).to(dev)
    flow.initialize(torch.randn(1024, 14, device=dev))
    flow.eval()
    x = torch.randn(65536, 14, device=dev)
    with torch.no_grad():
        dt = timed(lambda: flow(x), dev)
    rows = [row("signal flow (k=10)", "log q (fp32, eval)", 65536, dt, dev)]
    flow.train()
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    xb = x[:256]
    dt = timed(lambda: train_step(flow, xb, opt, False), dev)
    rows.append(row("signal flow (k=10)", "train step (fp32)", 256, dt, dev))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a dry run)")
    ap.add_argument("--preset", default="paper", help="the full-space flow's preset")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device")
    dev = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = signal_rows(dev) + cumsum_rows(dev) + preset_rows(dev, args.preset, out)
    info = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "rows": rows}  # fmt: skip
    name = "gpu.json" if dev.type == "cuda" else "gpu_dry_run.json"
    (out / name).write_text(json.dumps(info, indent=1))
    print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
