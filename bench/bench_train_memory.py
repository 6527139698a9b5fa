"""Peak memory of ``mendis train`` (the signal-space model) against the size of its data.

    python bench/bench_train_memory.py                  # 30,000 survey stars, 7,214 pixels
    python bench/bench_train_memory.py --n 20000 --grid paper
    python bench/bench_train_memory.py --code /tmp/oldwt --code .   # two checkouts, A/B

Simulates the training set once (``mendis simulate --population survey``, cached in
``--data``), then runs ``mendis train DATA/train`` as a user does, once per ``--code``
checkout (its ``mendis_ray`` first on the path; default: this one), one after the other
(memory, unlike time, is not disturbed by a busy host).  While a run lasts its resident
memory (``/proc/<pid>/status`` VmRSS) is read every 0.2 s and charged to the stage its
log last announced (reading, basis, flow training, score calibration, writing); the
run's peak is the kernel's (``VmHWM``, read with it).  The data are the training set's flux and ivar
as float32 (n x pixels x 8 bytes): the table gives each peak as a multiple of them.

Writes ``bench/results/train_memory[_<name>].json``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from _common import report

log = logging.getLogger("bench")

STAGES = (  # (stage, the log line that starts it)
    ("read", None),
    ("basis", re.compile(r"read \d+ training spectra")),
    ("flow", re.compile(r"signal basis: k =")),
    ("calibrate", re.compile(r"signal model: best val log q")),
    ("write", re.compile(r"scores calibrated on")),
)


def _rss_mb(pid: int, key: str = "VmRSS") -> int:
    """A process's resident memory now (``VmRSS``) or its peak so far (``VmHWM``), MB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(f.read().split(f"{key}:")[1].split()[0]) // 1024
    except (OSError, IndexError):
        return 0


def run_train(code: Path, data: Path, out: Path) -> dict:
    """``mendis train data --out out`` with ``code``'s mendis_ray: per-stage peak RSS (MB),
    the run's peak (MB) and wall time (s)."""
    env = dict(os.environ, PYTHONPATH=str(code.resolve()))  # run in it: -c puts the cwd first
    cmd = [sys.executable, "-c", "import sys, mendis_ray; from mendis_ray.cli import main; "
           "print('mendis_ray from', mendis_ray.__file__, flush=True); sys.exit(main())",
           "train", str(data.resolve()), "--out", str(out.resolve())]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=code.resolve(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")  # fmt: skip
    stage, peaks, done = ["read"], {name: 0 for name, _ in STAGES}, threading.Event()
    hwm = [0]

    def sample() -> None:
        while not done.is_set():
            peaks[stage[0]] = max(peaks[stage[0]], _rss_mb(proc.pid))
            hwm[0] = max(hwm[0], _rss_mb(proc.pid, "VmHWM"))  # the kernel's peak so far
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    tail = []
    for line in proc.stdout:  # the first line names the mendis_ray that runs
        if not tail:
            log.info("%s: %s", code, line.strip())
        tail = [*tail[-19:], line]
        for name, pattern in STAGES:
            if pattern is not None and pattern.search(line):
                stage[0] = name
    rc = proc.wait()
    done.set()
    if rc != 0:
        sys.exit(f"mendis train with {code} failed (rc {rc}):\n{''.join(tail)}")
    return {"stages": peaks, "peak_mb": hwm[0], "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=30000, help="training spectra")
    ap.add_argument("--grid", default="aspcap", choices=("paper", "aspcap", "apstar"))
    ap.add_argument("--data", type=Path, default=None, help="simulated set (cached)")
    ap.add_argument("--code", type=Path, action="append", default=None,
                    help="a checkout whose mendis_ray to run (repeat for an A/B)")  # fmt: skip
    ap.add_argument("--work", type=Path, default=Path("mendis_out/bench_train_memory"))
    ap.add_argument("--name", default="", help="suffix of the results file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    here = Path(__file__).resolve().parents[1]
    codes = args.code or [here]
    data = args.data or args.work / f"survey_{args.grid}_{args.n}"
    if not (data / "train").exists():
        subprocess.run([sys.executable, "-m", "mendis_ray.cli", "simulate", "--population",
                        "survey", "--grid", args.grid, "--n-train", str(args.n), "--n-test",
                        "100", "--n-outlier", "10", "--shards", str(max(1, args.n // 1000)),
                        "--no-figures", "--out", str(data)],
                       check=True, env=dict(os.environ, PYTHONPATH=str(here)))  # fmt: skip
    import pyarrow.parquet as pq

    files = sorted((data / "train").glob("*.parquet"))
    n_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    n_pix = {"paper": 2405, "aspcap": 7214, "apstar": 8575}[args.grid]
    data_mb = n_rows * n_pix * 8 / 2**20  # flux + ivar, float32
    rows = []
    for i, code in enumerate(codes):
        got = run_train(code, data / "train", args.work / f"checkpoint_{i}")
        row = {
            "code": str(code),
            "rows": n_rows,
            "pixels": n_pix,
            "data_mb": round(data_mb),
            "peak_mb": got["peak_mb"],
            "peak_x_data": round(got["peak_mb"] / data_mb, 2),
        }
        row |= {f"{k}_mb": v for k, v in got["stages"].items()} | {"seconds": got["seconds"]}
        rows.append(row)
    report("train_memory" + (f"_{args.name}" if args.name else ""), rows)


if __name__ == "__main__":
    main()
