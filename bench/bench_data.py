"""Ray Data pipeline: degrade throughput vs the same steps in plain numpy, and streaming
with bounded memory on a dataset many times the object store.

    python bench/bench_data.py            # ~3-5 min on 2 cores
    python bench/bench_data.py --quick    # smaller

1. throughput: read -> validate -> degrade (noise to S/N 300, label scatter, fresh noise)
   of the same shards, (a) in plain numpy/pyarrow in this process, shard after shard, and
   (b) as a Ray Data pipeline consumed by the driver; the ratio is Ray / numpy;
2. streaming: the training feed (read -> validate -> degrade -> standardize ->
   ``iter_torch_batches``) over a dataset of ``--copies`` copies of the shards, at least
   10x the configured object store, while a thread samples the memory of this process
   and all its descendants (Ray's raylet, workers, object store): peak of the summed RSS
   (counts shared object-store pages once per process that maps them, an overestimate)
   and of the summed PSS (shared pages split between processes).

Writes bench/results/data.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report

log = logging.getLogger("bench_data")

for key, value in {
    "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
}.items():  # fmt: skip
    os.environ.setdefault(key, value)


def _tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _mem_kb(pid: int) -> tuple[int, int]:
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


class TreeMemory(threading.Thread):
    """Samples the summed RSS and PSS of a process tree every ``interval`` seconds."""

    def __init__(self, root: int, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak_rss = self.peak_pss = 0
        self.n_procs = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            pids = _tree_pids(self.root)
            rss, pss = map(sum, zip(*[_mem_kb(p) for p in pids], strict=True))
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.n_procs = max(self.n_procs, len(pids))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def numpy_degrade(files: list[Path], n_pix: int, cfg) -> int:
    import pyarrow.parquet as pq

    from mendis_ray.spectra.batches import degrade_batch, validate_batch

    rows = 0
    for f in files:
        t = pq.read_table(f, columns=["id", "flux", "ivar", "teff", "logg", "feh", "snr"])
        t = degrade_batch(validate_batch(t, n_pix), n_pix, cfg)
        rows += t.num_rows
    return rows


def ray_degrade(shards, cfg) -> int:
    from mendis_ray.distributed import data as D

    ds = D.degrade(D.read_spectra(shards), shards.n_pix, cfg)
    return sum(b.num_rows for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--work", type=Path, default=Path("mendis_out/bench_data"))
    p.add_argument("--object-store-mb", type=int, default=200)
    p.add_argument("--copies", type=int, default=None, help="copies of the base shards")
    p.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from mendis_ray.distributed import data as D
    from mendis_ray.distributed.session import ensure_ray
    from mendis_ray.spectra.datasets import SetSpec, write_simulated_set
    from mendis_ray.spectra.simulate import Simulator, paper_training_labels

    n_base = 1000 if args.quick else 4000
    copies = args.copies or (12 if args.quick else 28)
    base = args.work / "base"
    if not (base / "train").exists():
        log.info("simulating %d noise-free spectra into %s", n_base, base)
        write_simulated_set(base, SetSpec("train", n_base, paper_training_labels, 8), Simulator(),
                            snr=0, seed=0)  # fmt: skip
    files = D.list_shards(base / "train")
    shards = D.check_shards(files)
    cfg = D.DegradeConfig(snr=300.0, fresh_noise=True)
    ensure_ray(num_cpus=4, object_store_memory=args.object_store_mb * 2**20)

    moments = D.compute_moments(
        D.degrade(D.read_spectra(shards), shards.n_pix, D.DegradeConfig(snr=300.0)), shards.n_pix
    )
    # fixed cost of one Ray Data execution (plan, file listing, task start) on the base set
    ray_degrade(shards, cfg)  # warm: worker processes, imports
    t0 = time.perf_counter()
    ray_degrade(shards, cfg)
    t_small = time.perf_counter() - t0

    # Datasets of two sizes (the larger >= 10x the object store): the degrade step in plain
    # numpy and in Ray Data (throughput ratio), then the whole training feed through
    # Ray Data while the memory of the process tree is sampled (bounded memory means the
    # peak does not grow with the dataset).
    streams = []
    for n_copies in (max(1, copies // 4), copies):
        big = args.work / "big"
        if big.exists():
            shutil.rmtree(big)
        big.mkdir(parents=True)
        for c in range(n_copies):
            for f in files:
                shutil.copy(f, big / f"c{c:03d}-{f.name}")
        big_shards = D.check_shards(D.list_shards(big))
        mem_bytes = big_shards.n_rows * (2 * shards.n_pix * 4 + 64)  # flux + ivar in memory
        ratio = mem_bytes / (args.object_store_mb * 2**20)
        log.info("%d spectra (%.2f GB in memory, %.1fx the object store)",
                 big_shards.n_rows, mem_bytes / 1e9, ratio)  # fmt: skip
        t_np, t_ray = [], []
        for r in range(args.rounds):  # interleaved: the host is shared and noisy
            t0 = time.perf_counter()
            n1 = numpy_degrade(list(big_shards.files), big_shards.n_pix, cfg)
            t_np.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            n2 = ray_degrade(big_shards, cfg)
            t_ray.append(time.perf_counter() - t0)
            assert n1 == n2 == big_shards.n_rows, (n1, n2)
            log.info("round %d: numpy %.1f s, Ray Data %.1f s", r, t_np[-1], t_ray[-1])
        feed = D.standardize(D.degrade(D.read_spectra(big_shards), big_shards.n_pix, cfg),
                             big_shards.n_pix, moments.standardizer)  # fmt: skip
        mon = TreeMemory(os.getpid())
        mon.start()
        t0 = time.perf_counter()
        rows = 0
        for batch in feed.iter_torch_batches(batch_size=256):
            rows += batch["x"].shape[0]
        t_stream = time.perf_counter() - t0
        mon.stop()
        assert rows == big_shards.n_rows
        shutil.rmtree(big)
        streams.append({
            "spectra": rows,
            "dataset_gb_in_memory": mem_bytes / 1e9,
            "dataset_gb_on_disk": n_copies * shards.n_bytes / 1e9,
            "object_store_mb": args.object_store_mb,
            "dataset_over_object_store": ratio,
            "numpy_degrade_per_s": rows / float(np.median(t_np)),
            "ray_degrade_per_s": rows / float(np.median(t_ray)),
            "rounds_numpy_s": t_np,
            "rounds_ray_s": t_ray,
            "feed_seconds": t_stream,
            "feed_per_s": rows / t_stream,
            "peak_rss_sum_gb": mon.peak_rss * 1024 / 1e9,
            "peak_pss_sum_gb": mon.peak_pss * 1024 / 1e9,
            "max_processes": mon.n_procs,
        })  # fmt: skip
    rows_out = []
    for st in streams:
        size = f"{st['spectra']} spectra, {st['dataset_over_object_store']:.1f}x store"
        rows_out += [
            {"what": "degrade, plain numpy (1 process)", "data": size,
             "spectra_per_s": st["numpy_degrade_per_s"], "ratio": 1.0, "peak_pss_gb": "-"},
            {"what": "degrade, Ray Data", "data": size, "spectra_per_s": st["ray_degrade_per_s"],
             "ratio": st["ray_degrade_per_s"] / st["numpy_degrade_per_s"], "peak_pss_gb": "-"},
            {"what": "training feed (degrade+standardize+torch)", "data": size,
             "spectra_per_s": st["feed_per_s"], "ratio": "-",
             "peak_pss_gb": st["peak_pss_sum_gb"]},
        ]  # fmt: skip
    extra = {"n_base": shards.n_rows, "ray_fixed_cost_s_base_set": t_small,
             "streaming": streams}  # fmt: skip
    report("data", rows_out, extra=extra)
    for st in streams:
        print(
            f"streamed {st['spectra']} spectra ({st['dataset_gb_in_memory']:.2f} GB, "
            f"{st['dataset_over_object_store']:.1f}x the {args.object_store_mb} MB object store)"
            f" in {st['feed_seconds']:.0f} s; peak memory of the process tree "
            f"({st['max_processes']} processes): PSS {st['peak_pss_sum_gb']:.2f} GB, "
            f"RSS {st['peak_rss_sum_gb']:.2f} GB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
