"""Epochs of the signal-space flow with torch's threads fixed or governed, on an idle CPU
and beside a process that keeps one core busy.

    python bench/bench_threads.py [--rows 18000] [--rounds 4]

One process, the arms alternating: ``fixed-N`` (torch's default, every core), ``fixed-1``
and ``governed`` (:class:`mendis_ray.train.threads.ThreadGovernor`, as ``fit`` runs it:
one governor across the arm's epochs).  The flow is the benchmark's (``mendis_out/
bench_ood/signal`` if present, else a fresh one of the default config) on random
coordinates, steps of 512 rows: only the time matters.  Busy rounds run fewer rows (an
epoch with spinning threads beside a busy core took minutes).  Writes
``bench/results/threads.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from mendis_ray.config import SignalConfig
from mendis_ray.flow.signal import ConditionalFlow
from mendis_ray.train.loop import array_batches, train_epoch
from mendis_ray.train.threads import ThreadGovernor

RESULTS = Path(__file__).resolve().parent / "results"
CHECKPOINT = Path("mendis_out/bench_ood/signal")


def base_flow() -> torch.nn.Module:
    if (CHECKPOINT / "config.json").is_file():
        from mendis_ray.science.signal_scores import SignalScorer

        return SignalScorer.from_checkpoint(CHECKPOINT).model.flow
    return ConditionalFlow(11, 1, SignalConfig())


def epoch(flow, x, threads: int | None, governor: ThreadGovernor | None) -> float:
    """Seconds of one epoch of a fresh copy of ``flow`` (threads: fixed count, or None)."""
    if threads is not None:
        torch.set_num_threads(threads)
    model = copy.deepcopy(flow)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5, fused=True)
    g = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    train_epoch(model, array_batches(x, 512, generator=g), opt, 10.0, governor=governor)
    return time.perf_counter() - t


def run(flow, rows: int, rounds: int, n_max: int) -> dict[str, list[float]]:
    x = torch.randn(rows, flow.n + flow.n_context) * 0.5
    times: dict[str, list[float]] = {f"fixed-{n_max}": [], "fixed-1": [], "governed": []}
    governor = ThreadGovernor(n_max)
    for _ in range(rounds):
        times[f"fixed-{n_max}"].append(epoch(flow, x, n_max, None))
        times["fixed-1"].append(epoch(flow, x, 1, None))
        times["governed"].append(epoch(flow, x, None, governor))
        governor.restore()
    torch.set_num_threads(n_max)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=18000)
    p.add_argument("--busy-rows", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    flow, n_max = base_flow(), torch.get_num_threads()
    res = {"benchmark": "threads", "n_max": n_max, "rows": args.rows,
           "busy_rows": args.busy_rows, "rounds": args.rounds}  # fmt: skip
    res["idle"] = run(flow, args.rows, args.rounds, n_max)
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        res["busy"] = run(flow, args.busy_rows, args.rounds, n_max)
    finally:
        burner.kill()
    print(f"| CPU | rows | {' | '.join(res['idle'])} |  (median s per epoch; each round)")
    print("|---|---|---|---|---|")
    for cpu, rows in (("idle", args.rows), ("busy", args.busy_rows)):
        cells = [f"{statistics.median(v):.2f} ({', '.join(f'{t:.1f}' for t in v)})"
                 for v in res[cpu].values()]  # fmt: skip
        print(f"| {cpu} | {rows} | {' | '.join(cells)} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "threads.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
