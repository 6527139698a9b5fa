"""`mendis train` on 20,000 survey spectra, end to end: the large-set steps against the
settings of a small set, side by side.

    python bench/bench_train_signal.py [--data DIR] [--rounds 1]

Runs the whole command, ``mendis train DATA --out DIR --quiet`` (read, signal basis, flow
to early stopping, the scorer's calibrations, the checkpoint), as a user does, once with
the defaults (a set of ``SignalConfig.large_set`` rows or more takes steps of twice the
rows at 1.5x the lr) and once with ``--batch-size 256``, which keeps the small-set settings
(the defaults before).  The runs alternate, each after the host's CPUs are quiet.  The
target: to early stopping on 20,000 spectra in 3 minutes.  ``--data``: training shards,
default the survey benchmark's (``bench/bench_ood.py`` simulates them; missing, this
simulates the 20,000 training stars alone).  Writes ``bench/results/train_signal.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import report, wait_quiet

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT / "mendis_out" / "bench_ood" / "data" / "train"
VARIANTS = {"large-set steps (default)": [], "small-set steps (--batch-size 256)":
            ["--batch-size", "256"]}  # fmt: skip
SUMMARY = re.compile(
    r"(?P<train>\d+) training / (?P<val>\d+) validation spectra, (?P<epochs>\d+) epochs "
    r"\(best (?P<best>-?\d+)\) in (?P<seconds>[\d.]+) s.*?-> (?P<val_log_q>-?[\d.]+);",
    re.S,
)


def ensure_data(path: Path) -> Path:
    """``path`` if it holds shards, else 20,000 survey training stars simulated beside it
    (with a few test and outlier stars: `mendis simulate` writes every set)."""
    if any(path.glob("*.parquet")):
        return path
    out = path.parent
    cmd = ["mendis", "simulate", "--population", "survey", "--out", str(out), "--n-train",
           "20000", "--n-test", "100", "--n-outlier", "10", "--no-figures"]  # fmt: skip
    subprocess.run(cmd, check=True)
    return out / "train"


def one_run(data: Path, extra: list[str], scratch: Path) -> dict:
    """One ``mendis train`` process: its wall time and the summary it prints."""
    wait_quiet()
    cmd = ["mendis", "train", str(data), "--out", str(scratch), "--quiet", *extra]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    m = SUMMARY.search(done.stdout)
    if m is None:
        sys.exit(f"no summary in the output of {' '.join(cmd)}:\n{done.stdout[-2000:]}")
    steps = json.loads((scratch / "checkpoint" / "config.json").read_text())["metrics"]
    return {
        "rows": int(m["train"]) + int(m["val"]), "batch": steps["batch_size"],
        "lr": steps["lr"],
        "epochs": int(m["epochs"]), "best_epoch": int(m["best"]),
        "val_log_q": float(m["val_log_q"]), "command_s": float(m["seconds"]),
        "wall_s": round(wall, 1),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="training shards")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds of the two")
    args = p.parse_args()
    data = ensure_data(args.data)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, extra in VARIANTS.items():
                row = {"settings": name, "round": r, **one_run(data, extra, Path(tmp) / "run")}
                print(row, flush=True)
                rows.append(row)
    report("train_signal", rows, {"data": str(data), "target_wall_s": 180})


if __name__ == "__main__":
    main()
