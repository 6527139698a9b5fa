"""Shared helpers for benchmarks: pin to one thread, time, print a table, write JSON."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def single_thread() -> None:
    """Pin BLAS/OpenMP to one thread (call before importing numpy)."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


def best_of(fn: Callable[[], object], repeat: int = 3) -> float:
    """Best wall time of ``repeat`` calls (the machine is shared and noisy)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def wait_quiet(busy: float = 0.25, window: float = 0.5, max_wait: float = 30.0) -> float:
    """Wait until the host's CPUs are less than ``busy`` busy over ``window`` seconds
    (``/proc/stat``, host-wide; e.g. a previous run's Ray workers still winding down), at
    most ``max_wait`` seconds (then a warning: the host is busy with other work).
    Returns the seconds spent, at least one ``window`` (0 where /proc/stat is missing)."""

    def ticks() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # all, idle + iowait

    if not os.path.exists("/proc/stat"):
        return 0.0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait:
        a = ticks()
        time.sleep(window)
        b = ticks()
        total = max(b[0] - a[0], 1)
        if 1.0 - (b[1] - a[1]) / total < busy:
            break
    else:
        logging.getLogger("bench").warning("host still busy after %.0f s; timing anyway", max_wait)
    return time.perf_counter() - t0


def report(name: str, rows: list[dict], extra: dict | None = None) -> Path:
    """Print ``rows`` as a table and write them (with machine info) to results/NAME.json."""
    cols = list(rows[0])
    fmt = {c: max(len(c), *(len(_s(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(fmt[c]) for c in cols))
    for r in rows:
        print("  ".join(_s(r[c]).ljust(fmt[c]) for c in cols))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}.json"
    payload = {
        "benchmark": name,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine()},
        "rows": rows,
        **(extra or {}),
    }  # fmt: skip
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")
    return out


def survey_stars(folder: Path, part: str, n: int, seed: int):
    """``n`` stars of the survey population in ``folder/part`` (``train`` or ``test``),
    simulated once with ``mendis simulate --population survey --seed SEED`` (10 in the
    other part and in each outlier set), as ``table_arrays``."""
    from mendis_ray.spectra.shards import read_dataset, table_arrays

    if not (folder / part / "_manifest.json").is_file():
        sizes = {"train": 10, "test": 10, part: n}
        subprocess.run(["mendis", "simulate", "--population", "survey", "--n-train",
                        str(sizes["train"]), "--n-test", str(sizes["test"]), "--n-outlier",
                        "10", "--seed", str(seed), "--out", str(folder), "--no-figures"],
                       check=True)  # fmt: skip
    return table_arrays(read_dataset(folder / part))


def _s(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v)
