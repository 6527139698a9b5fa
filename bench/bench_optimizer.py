"""One training epoch of the signal-space model's flow: Adam fused against Adam's loop.

    python bench/bench_optimizer.py [--rows 18000] [--batch 512] [--k 8] [--repeats 5]

The flow of ``mendis train`` on the survey benchmark (k = 8 signal coordinates + 3 labels,
the default SignalConfig, 603k parameters in 120 tensors) trains one epoch of ``--rows``
standard-normal rows in steps of ``--batch`` (the large-set steps) with
``mendis_ray.train.loop.train_epoch``, gradient clipping and the weight average, two ways,
alternating ``--repeats`` times after one warm-up each:

- ``loop``: ``torch.optim.Adam`` as on a CPU by default (a Python loop over the tensors)
  and the weight average as one ``lerp_`` per tensor (the code before 2026-11-30);
- ``fused``: ``Adam(fused=True)`` and one ``torch._foreach_lerp_`` (the code now,
  ``make_optimizer`` and ``WeightAverage``).

The cost of a step does not depend on the data's values, so no data set is read.  Prints
the table and writes ``bench/results/optimizer.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mendis_ray.config import SignalConfig
from mendis_ray.flow.signal import ConditionalFlow
from mendis_ray.train.loop import WeightAverage, array_batches, train_epoch

RESULTS = Path(__file__).resolve().parent / "results"


def epoch_seconds(flow, x: torch.Tensor, batch: int, fused: bool, decay: float) -> float:
    opt = torch.optim.Adam(flow.parameters(), lr=1e-5, weight_decay=1e-5, fused=fused)
    avg = WeightAverage(flow, decay)

    @torch.no_grad()
    def loop_average() -> None:  # the weight average before: one lerp_ per tensor
        for a, p in zip(avg.shadow.parameters(), flow.parameters(), strict=True):
            a.lerp_(p, 1.0 - decay)

    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    train_epoch(flow, array_batches(x, batch, generator=gen), opt, 10.0,
                after_step=avg.update if fused else loop_average)  # fmt: skip
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=18_000)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = SignalConfig()
    flow = ConditionalFlow(args.k + 3, 1, cfg, seed=0)
    x = torch.randn(args.rows, args.k + 3 + 1, generator=torch.Generator().manual_seed(0))
    n_params = sum(p.numel() for p in flow.parameters())
    times: dict[str, list[float]] = {"loop": [], "fused": []}
    for name in times:  # warm-up
        epoch_seconds(flow, x, args.batch, name == "fused", 0.99)
    for _ in range(args.repeats):
        for name in times:
            times[name].append(epoch_seconds(flow, x, args.batch, name == "fused", 0.99))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"flow: {n_params:,} parameters in {len(list(flow.parameters()))} tensors; "
          f"{args.rows} rows in steps of {args.batch}, {args.threads} threads")  # fmt: skip
    print("| optimiser | epoch s (median) | epochs s | ratio |\n|---|---|---|---|")
    for k, v in times.items():
        row = ", ".join(f"{t:.2f}" for t in v)
        print(f"| {k} | {med[k]:.2f} | {row} | {med[k] / med['loop']:.2f} |")
    RESULTS.mkdir(exist_ok=True)
    out = {"benchmark": "optimizer", **vars(args), "n_params": n_params, "seconds": times,
           "median_s": med, "ratio_fused_to_loop": med["fused"] / med["loop"]}  # fmt: skip
    (RESULTS / "optimizer.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {RESULTS / 'optimizer.json'}")


if __name__ == "__main__":
    main()
