"""GPU checks (run on a machine with CUDA; never part of the tests): the paper preset's
training step and scoring, and the signal-space model's flow, in spectra per second.

    python bench/bench_gpu.py [--out DIR]

(a) ``paper`` preset (20 units on 2408 dimensions, ~1.19e9 parameters): Adam training steps
    at the paper's batch of 64 and at 256, under bf16 autocast (the splines run in fp32),
    and evaluation-mode log p at batch 1024 (no autocast: exact fp32 scores);
(b) the signal-space model's conditional flow (k = 10 signal coordinates + 3 labels, the
    default architecture): log q at batch 65536 and a training step at batch 256.

Warm-ups excluded, CUDA-synchronised wall time, median of the timed repeats.  Writes
``gpu.json`` into ``--out`` (default bench/results/).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mendis_ray.config import SignalConfig, get_preset
from mendis_ray.flow.model import MendisFlow
from mendis_ray.flow.signal import ConditionalFlow


def timed(fn, warmup: int = 2, repeats: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_step(model, x, opt, autocast: bool) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = -model(x).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def paper_rows(dev: torch.device) -> list[dict]:
    cfg, tcfg = get_preset("paper")
    t0 = time.perf_counter()
    flow = MendisFlow(cfg, seed=0).to(dev)
    build_s = time.perf_counter() - t0
    n = cfg.n_features
    flow.initialize(torch.randn(512, n, device=dev))
    opt = torch.optim.Adam(flow.parameters(), lr=tcfg.lr)
    rows = []
    for batch in (64, 256):
        x = torch.randn(batch, n, device=dev)
        flow.train()
        torch.cuda.reset_peak_memory_stats()
        dt = timed(lambda x=x: train_step(flow, x, opt, True))
        rows.append({"model": "paper flow", "what": "train step (bf16 autocast)", "batch": batch,
                     "seconds": dt, "spectra_per_s": batch / dt,
                     "peak_gib": torch.cuda.max_memory_allocated() / 2**30})  # fmt: skip
    flow.eval()
    x = torch.randn(1024, n, device=dev)
    with torch.no_grad():
        dt = timed(lambda: flow.log_prob(x))
    rows.append({"model": "paper flow", "what": "log p (fp32, eval)", "batch": 1024,
                 "seconds": dt, "spectra_per_s": 1024 / dt,
                 "peak_gib": torch.cuda.max_memory_allocated() / 2**30})  # fmt: skip
    for r in rows:
        r["parameters"] = flow.n_parameters()
        r["build_s"] = build_s
    return rows


def signal_rows(dev: torch.device) -> list[dict]:
    cfg = SignalConfig()
    flow = ConditionalFlow(13, 1, cfg, seed=0).to(dev)
    flow.initialize(torch.randn(1024, 14, device=dev))
    flow.eval()
    x = torch.randn(65536, 14, device=dev)
    with torch.no_grad():
        dt = timed(lambda: flow(x))
    rows = [{"model": "signal flow (k=10)", "what": "log q (fp32, eval)", "batch": 65536,
             "seconds": dt, "spectra_per_s": 65536 / dt}]  # fmt: skip
    flow.train()
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    xb = x[:256]
    dt = timed(lambda: train_step(flow, xb, opt, False))
    rows.append({"model": "signal flow (k=10)", "what": "train step (fp32)", "batch": 256,
                 "seconds": dt, "spectra_per_s": 256 / dt})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device")
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = signal_rows(dev) + paper_rows(dev)
    for r in rows:
        print(f"{r['model']:<20} {r['what']:<28} batch {r['batch']:>6}  "
              f"{r['spectra_per_s']:>12,.0f} spectra/s  {1e3 * r['seconds']:8.1f} ms")  # fmt: skip
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(info, indent=1))
    print(f"wrote {out / 'gpu.json'}")


if __name__ == "__main__":
    main()
