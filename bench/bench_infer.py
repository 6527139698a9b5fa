"""Throughput of batch scoring on Ray Data against in-process ``Scorer.score``.

Same machine, same data, same batch size, same total torch threads (default 2):

(a) in-process: the catalog's arrays in memory, ``torch.set_num_threads(T)``,
    ``Scorer.score(flux, ivar, labels, batch_size=B)`` (spectra/s of the call);
(b) Ray, ``T`` actors x 1 thread (``ActorPoolStrategy(min_size=T, max_size=T)``, 1 CPU
    each): shards read, validated, repartitioned and scored by the
    :mod:`mendis_ray.distributed.infer` pipeline, batches consumed on the driver;
(c) Ray, 1 actor x ``T`` threads (``T`` CPUs).

One-time startup is excluded from the Ray throughput and reported apart: Ray init, and
per run the time until every actor has finished its first batch (actor start, checkpoint
load, the first call's warm-up; the in-process scorer gets two warm-up calls before it is
timed).  Each actor stamps its batches with its pid, start and end; the steady rate is the
rows scored from then to the end of the last batch over that time (so the tail, where one
actor may idle, counts).  The configurations alternate (in alternating order) over
``--repeats`` rounds so that load from other work on a shared machine hits them alike,
each started once the host's CPUs are quiet (``_common.wait_quiet``: a Ray run's workers
wind down for seconds after it; the seconds waited are in the JSON).
The headline ratio is best round over best round (as ``_common.best_of``: on a shared
machine the best round is the least disturbed); medians are reported too, and every
round is in the JSON.
Ray runs its workers 15 nicer than itself by default: on a machine shared with other work
they then get a small fraction of the CPU that the in-process baseline gets.  The
package's embedded Ray starts them at its own niceness (``RAY_worker_niceness=0``, a
RayConfig override and an increment, in ``session.quiet_ray_env``; before 2026-11-30 only
this benchmark set it) so both sides compete alike; the actors' niceness is recorded
(``actor_niceness``) to check.

The model is the ``compact`` preset (38M parameters) at its Gaussian start (0 epochs;
scoring cost does not depend on the weights), standardized on simulated S/N 300 spectra,
with a scoring reference from held-out ones.  Data and checkpoint are cached in ``--work``.
Writes ``bench/results/bench_infer.json``.

``--model signal`` benchmarks the signal-space model (:class:`SignalScorer`) instead: a
small model trained once (``train_signal_checkpoint``, time-limited: scoring cost does not
depend on how far it trained) on simulated survey inliers, a catalog of 20,000 survey
inliers in shards of 1,000, the batch size of ``ScoreConfig``; and it also times the whole
``mendis score CHECKPOINT CATALOG --out DIR`` command as a user runs it (a subprocess,
after this process's Ray is shut down; best of ``--repeats``): wall time, spectra/s, and
the parts (process start and imports, Ray start and scoring, ranking and outputs) from
its ``summary.json``.  Writes ``bench/results/bench_infer_signal.json``.  Run it with
``OMP_NUM_THREADS=1`` (numpy's BLAS then uses one thread, as in Ray's workers): the
signal model's scoring is mostly numpy, and on this shared 2-core host two BLAS threads
made ``SignalScorer.score`` 2-7x slower, not faster.

    python bench/bench_infer.py                   # 4096 spectra, batch 256, 2 threads
    python bench/bench_infer.py --model signal --compare-batch 256   # 20,000 spectra, batch
        # 1024 beside 256 (Ray, 2 actors, and mendis score), + the mendis score CLI
    python bench/bench_infer.py --quick           # 2048 spectra, 1 round
    python bench/bench_infer.py --n 8192 --repeats 3
    python bench/bench_infer.py --threads 1 --name bench_infer_1thread   # Ray's overhead
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _common import report, wait_quiet  # noqa: E402

from mendis_ray.distributed.infer import CatalogScorer  # noqa: E402

log = logging.getLogger("bench_infer")
TARGET_RATIO = 0.90


class TimedScorer(CatalogScorer):
    """:class:`CatalogScorer` that stamps each output batch with the actor's pid, the
    batch's start and end (``time.time()``) and the checkpoint load time."""

    def __call__(self, batch):
        import pyarrow as pa

        t0 = time.time()
        out = super().__call__(batch)
        n = out.num_rows
        stamps = {"_pid": os.getpid(), "_t_start": t0, "_t_end": time.time(),
                  "_load_s": self.load_seconds, "_nice": os.nice(0)}  # fmt: skip
        for name, value in stamps.items():
            out = out.append_column(name, pa.array(np.full(n, value)))
        return out


# ----------------------------------------------------------------------------- data


def build(work: Path, n: int, batch: int, n_train: int, rebuild: bool) -> tuple[Path, Path]:
    """(catalog folder, checkpoint folder): ``n`` simulated S/N 300 spectra in shards of
    ``batch`` rows, and a compact-preset checkpoint with its scoring reference."""
    import json

    from mendis_ray.config import get_preset
    from mendis_ray.experiment import Arrays, train_flow
    from mendis_ray.flow.checkpoint import save_checkpoint
    from mendis_ray.science.ood import Scorer
    from mendis_ray.spectra.datasets import SetSpec, write_simulated_set
    from mendis_ray.spectra.shards import read_dataset, shard_metadata, table_arrays
    from mendis_ray.spectra.simulate import Simulator, paper_training_labels

    sim = Simulator()
    catalog, ckpt = work / "catalog", work / "checkpoint"
    manifest = catalog / "_manifest.json"
    shards = max(1, n // batch)
    if (
        rebuild
        or not manifest.exists()
        or json.loads(manifest.read_text())["rows"] != [n // shards] * shards
    ):
        t0 = time.perf_counter()
        write_simulated_set(work, SetSpec("catalog", n // shards * shards, paper_training_labels,
                                          shards), sim, snr=300, seed=11)  # fmt: skip
        log.info("catalog: %d spectra in %d shards (%.1f s)", n, shards, time.perf_counter() - t0)
    if rebuild or not (ckpt / "config.json").exists():
        t0 = time.perf_counter()
        write_simulated_set(work, SetSpec("train", n_train, paper_training_labels, 1), sim,
                            snr=300, seed=12)  # fmt: skip
        tr = table_arrays(read_dataset(work / "train"))
        grid = shard_metadata(next((work / "train").glob("*.parquet")))["grid"]
        flow_cfg, train_cfg = get_preset("compact")
        train_cfg = train_cfg.replace(epochs=0)  # the Gaussian start: cost is what matters
        n_ref = n_train // 4
        fit = slice(0, n_train - n_ref)
        res = train_flow(Arrays(tr.flux[fit], tr.ivar[fit], tr.labels[fit]), flow_cfg,
                         train_cfg, grid, show_progress=False)  # fmt: skip
        scorer = Scorer.fit(res.density, tr.flux[-n_ref:], tr.labels[-n_ref:], n_marginal=16,
                            gaussian=res.gaussian)  # fmt: skip
        save_checkpoint(ckpt, res.density, train_cfg, metrics={"epochs": 0},
                        extra_arrays=scorer.checkpoint_arrays())  # fmt: skip
        n_params = sum(p.numel() for p in res.density.flow.parameters())
        log.info("checkpoint: compact, %.1fM parameters (%.1f s)", n_params / 1e6,
                 time.perf_counter() - t0)  # fmt: skip
    return catalog, ckpt


def build_signal(work: Path, n: int, n_train: int, rebuild: bool) -> tuple[Path, Path]:
    """(catalog folder, checkpoint folder) for ``--model signal``: ``n`` simulated survey
    inliers in shards of 1,000 rows, and a signal-space checkpoint trained (for at most a
    minute: its scoring cost does not depend on the weights) on ``n_train`` others."""
    import json

    from mendis_ray.config import SignalConfig
    from mendis_ray.spectra.datasets import SurveySpec, write_survey_set
    from mendis_ray.spectra.population import inliers
    from mendis_ray.spectra.simulate import Simulator
    from mendis_ray.train.signal import train_signal_checkpoint

    sim = Simulator()
    catalog, ckpt = work / "catalog", work / "checkpoint"
    manifest = catalog / "_manifest.json"
    shards = max(1, round(n / 1000))
    if rebuild or not manifest.exists() or json.loads(manifest.read_text())["total_rows"] != n:
        write_survey_set(work, SurveySpec("catalog", n, inliers, shards), sim, seed=22)
        log.info("catalog: %d survey spectra in %d shards", n, shards)
    if rebuild or not (ckpt / "config.json").exists():
        write_survey_set(work, SurveySpec("train", n_train, inliers, 4), sim, seed=21)
        summary = train_signal_checkpoint([work / "train"], work, SignalConfig(seed=0),
                                          time_limit_s=60, show_progress=False)  # fmt: skip
        log.info("checkpoint: signal model, k = %d (%.1f s)", summary["k"], summary["seconds"])
    return catalog, ckpt


def _defaults(args) -> None:
    """Fill the per-model defaults of the options left unset."""
    from mendis_ray.config import ScoreConfig

    signal = args.model == "signal"
    args.n = args.n or (20_000 if signal else 4096)
    args.batch = args.batch or ScoreConfig().batch_size_for(args.model)
    args.n_train = args.n_train or (4000 if signal else 2000)
    args.work = args.work or (
        "mendis_out/bench_infer_signal" if signal else "mendis_out/bench_infer"
    )
    args.name = args.name or ("bench_infer_signal" if signal else "bench_infer")
    if args.quick:
        args.n, args.repeats = (4000 if signal else 2048), 1


# ----------------------------------------------------------------------------- runs


def run_inprocess(scorer, arrays, batch: int, threads: int) -> dict:
    import torch

    from mendis_ray.science.signal_scores import SignalScorer

    # batch_size: the full-space Scorer's model batches; chunk: the SignalScorer's
    kw = {"chunk": batch} if isinstance(scorer, SignalScorer) else {"batch_size": batch}
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    scorer.score(arrays.flux, arrays.ivar, arrays.labels, **kw)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "rate": len(arrays.flux) / dt}


def run_ray(ckpt: Path, shards, batch: int, actors: int, threads: int) -> dict:
    """One pass of the scoring pipeline with ``actors`` x ``threads``; see the module doc.

    Steady window: from the moment every actor has finished its first batch (model loaded
    and warmed up, as the in-process scorer is before it is timed) to the end of the last
    batch; each batch counts with the fraction of its (start, end) interval inside the
    window, so work done before the window is not credited to it."""
    from mendis_ray.distributed.infer import build_pipeline

    ds = build_pipeline(
        ckpt, shards, batch_size=batch, min_actors=actors, max_actors=actors,
        num_cpus_per_actor=float(threads), threads_per_actor=threads, scorer_cls=TimedScorer,
    )  # fmt: skip
    t0 = time.time()
    seen: dict[tuple, int] = {}  # (pid, start, end) -> rows
    nice = None
    loads: dict[int, float] = {}
    for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        cols = [b.column(c).to_numpy() for c in ("_pid", "_t_start", "_t_end", "_load_s")]
        for pid, ts, te, ld in zip(*cols, strict=True):  # one driver batch may hold several
            key = (int(pid), float(ts), float(te))
            seen[key] = seen.get(key, 0) + 1
            loads[int(pid)] = float(ld)
        nice = int(b.column("_nice")[0].as_py()) if b.num_rows else None
    t_done = time.time()
    pid = np.array([k[0] for k in seen])
    ts = np.array([k[1] for k in seen])
    te = np.array([k[2] for k in seen])
    n = np.array(list(seen.values()), np.float64)
    t_s = max(te[pid == p].min() for p in np.unique(pid))  # every actor is warm
    t_e = te.max()
    overlap = np.clip(np.minimum(te, t_e) - np.maximum(ts, t_s), 0, None)
    frac = overlap / np.maximum(te - ts, 1e-9)
    steady_rows = float((n * frac).sum())
    busy = float((te - ts).sum()) / max(len(np.unique(pid)) * (t_e - ts.min()), 1e-9)
    return {
        "rows": int(n.sum()),
        "batches": len(seen),
        "actors_seen": len(np.unique(pid)),
        "actor_niceness": nice,
        "startup_s": t_s - t0,
        "load_s": float(np.mean(list(loads.values()))),
        "steady_rows": steady_rows,
        "rate": steady_rows / (t_e - t_s) if t_e > t_s else float("nan"),
        "actor_busy_fraction": busy,
        "end_to_end_rate": float(n.sum()) / (t_done - t0),
        "seconds": t_done - t0,
    }


def run_cli(ckpt: Path, catalog: Path, out: Path, options: tuple[str, ...] = ()) -> dict:
    """``mendis score CKPT CATALOG --out OUT [options]`` as a user runs it (a subprocess
    with its own local Ray): wall time and the parts of it from its ``summary.json``."""
    import json
    import subprocess

    cmd = [sys.executable, "-m", "mendis_ray.cli", "score", str(ckpt), str(catalog), "--out",
           str(out), *options]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    env.pop("RAY_worker_niceness", None)  # the package's default, as a user gets it
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    tm = summary["timings"]
    outputs = sum(v for k, v in tm.items() if k != "score_s" and k != "ingest_s")
    return {
        "command": " ".join(["python", *cmd[1:]]),
        "wall_s": wall,
        "rate": summary["rows"] / wall,
        "in_process_s": summary["seconds"],  # from checks to summary.json
        "before_run_s": wall - summary["seconds"],  # interpreter, imports, argument parsing
        "ray_start_and_score_s": summary["seconds"] - outputs,
        "score_s": tm["score_s"],
        "outputs_s": outputs,
        "timings": tm,
        "actors": summary["actors"],
        "batch_size": summary["batch_size"],
    }


def _setup(args):
    """(catalog, checkpoint, shards, arrays, scorer, startup seconds, parameters)."""
    from mendis_ray.distributed.data import check_shards, list_shards
    from mendis_ray.science.signal_scores import load_scorer
    from mendis_ray.spectra.shards import read_dataset, table_arrays

    if args.model == "signal":
        catalog, ckpt = build_signal(Path(args.work), args.n, args.n_train, args.rebuild)
    else:
        catalog, ckpt = build(Path(args.work), args.n, args.batch, args.n_train, args.rebuild)
    shards = check_shards(list_shards(catalog))
    t0 = time.perf_counter()
    arrays = table_arrays(read_dataset(catalog))
    startup = {"read_arrays_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    scorer = load_scorer(str(ckpt), expect_grid=shards.grid)
    startup["load_s"] = time.perf_counter() - t0
    flow = scorer.model.flow if args.model == "signal" else scorer.density.flow
    n_params = sum(p.numel() for p in flow.parameters())
    return catalog, ckpt, shards, arrays, scorer, startup, n_params


def _rounds(configs: dict, repeats: int, threads: int) -> dict[str, list[dict]]:
    """Every configuration ``repeats`` times, in alternating order, each once the host is
    quiet (:func:`wait_quiet`: a Ray run's workers wind down for seconds after it, and
    the in-process run after one read 7,000 instead of 20,000 spectra/s)."""
    import torch

    results: dict[str, list[dict]] = {k: [] for k in configs}
    names = list(configs)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            waited = wait_quiet()
            res = configs[name]() | {"waited_s": round(waited, 1)}
            results[name].append(res)
            log.info("round %d %s: %.1f spectra/s", r, name, res["rate"])
        torch.set_num_threads(threads)
    return results


def _table(results: dict[str, list[dict]], load_s: float) -> list[dict]:
    """One row per configuration: best and median spectra/s and their ratios to the
    in-process ones, startup, end-to-end rate, actor busy fraction."""
    base = statistics.median(x["rate"] for x in results["in-process"])
    best_base = max(x["rate"] for x in results["in-process"])
    rows = []
    for name, runs in results.items():
        rate = statistics.median(x["rate"] for x in runs)
        ray_run = "startup_s" in runs[0]
        rows.append({
            "config": name,
            "spectra_per_s": max(x["rate"] for x in runs),
            "ratio": max(x["rate"] for x in runs) / best_base,
            "median_per_s": rate,
            "median_ratio": rate / base,
            "startup_s": statistics.median(x["startup_s"] for x in runs) if ray_run else load_s,
            "model_load_s": statistics.median(x["load_s"] for x in runs) if ray_run else load_s,
            "end_to_end_per_s": (statistics.median(x["end_to_end_rate"] for x in runs)
                                 if ray_run else rate),
            "actor_busy": (statistics.median(x["actor_busy_fraction"] for x in runs)
                           if ray_run else 1.0),
        })  # fmt: skip
    return rows


def _cli_rows(ckpt: Path, catalog: Path, work: Path, repeats: int, base: float,
              compare_batch: int | None) -> tuple:  # fmt: skip
    """(table rows, every run) of ``mendis score`` over ``repeats`` runs (best by wall),
    with its defaults and, with ``compare_batch``, with ``--batch-size compare_batch``
    (alternating)."""
    variants = {"mendis score (CLI, end to end)": ()}
    if compare_batch:
        variants[f"mendis score --batch-size {compare_batch}"] = (
            "--batch-size",
            str(compare_batch),
        )
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            runs[name].append(run_cli(ckpt, catalog, work / "cli_out", variants[name]))
            log.info("%s: %.1f s wall, %.1f spectra/s", name, runs[name][-1]["wall_s"],
                     runs[name][-1]["rate"])  # fmt: skip
    rows = []
    for name, rr in runs.items():
        best = min(rr, key=lambda x: x["wall_s"])
        median = statistics.median(x["rate"] for x in rr)
        rows.append({"config": name, "spectra_per_s": best["rate"], "ratio": best["rate"] / base,
                     "median_per_s": median, "median_ratio": median / base,
                     "startup_s": best["wall_s"] - best["score_s"] - best["outputs_s"],
                     "model_load_s": float("nan"), "end_to_end_per_s": best["rate"],
                     "actor_busy": float("nan")})  # fmt: skip
    return rows, [x | {"config": name} for name, rr in runs.items() for x in rr]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("flow", "signal"), default="flow")
    ap.add_argument("--n", type=int, default=None, help="catalog spectra (flow 4096, signal 20000)")
    ap.add_argument("--batch", type=int, default=None,
                    help="batch size (flow 256, signal ScoreConfig's)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=2, help="total torch threads")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=None, help="flow 2000, signal 4000")
    ap.add_argument(
        "--work",
        default=None,
        help="cached data/checkpoint "
        "(default mendis_out/bench_infer or mendis_out/bench_infer_signal)",
    )
    ap.add_argument("--no-cli", action="store_true", help="signal: skip the mendis score runs")
    ap.add_argument(
        "--compare-batch",
        type=int,
        default=None,
        help="also run Ray (2 actors) and mendis score with this batch size",
    )
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--quick", action="store_true", help="2048 spectra, 1 round")
    ap.add_argument("--name", default=None, help="results/NAME.json (default bench_infer or "
                    "bench_infer_signal)")  # fmt: skip
    args = ap.parse_args(argv)
    _defaults(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    T, B = args.threads, args.batch

    import ray

    from mendis_ray.distributed.session import ensure_ray

    catalog, ckpt, shards, arrays, scorer, startup, n_params = _setup(args)
    t0 = time.perf_counter()
    resources = ensure_ray(num_cpus=max(4, os.cpu_count() or 1))
    init_s = time.perf_counter() - t0
    driver_nice = os.nice(0)
    what = "compact flow" if args.model == "flow" else "signal-space model"
    print(
        f"{what} ({n_params / 1e6:.2f}M parameters), {shards.n_rows} spectra in "
        f"{len(shards.files)} shards, batch {B}, {T} threads in all; {os.cpu_count()} cores, "
        f"Ray {ray.__version__} with {resources.get('CPU')} logical CPUs"
    )
    print(f"startup: read arrays {startup['read_arrays_s']:.2f} s, load checkpoint "
          f"{startup['load_s']:.2f} s, ray.init {init_s:.2f} s")  # fmt: skip

    from mendis_ray.spectra.shards import read_dataset, table_arrays

    warm = table_arrays(read_dataset(catalog).slice(0, 2 * B))
    for _ in range(2):  # warm-up (first calls are slow: allocations, cached LU weights)
        run_inprocess(scorer, warm, B, T)
    configs = {
        "in-process": lambda: run_inprocess(scorer, arrays, B, T),
        f"ray {T} actors x 1 thread": lambda: run_ray(ckpt, shards, B, T, 1),
        f"ray 1 actor x {T} threads": lambda: run_ray(ckpt, shards, B, 1, T),
    }
    if args.compare_batch:
        C = args.compare_batch
        configs[f"ray {T} actors x 1 thread, batch {C}"] = lambda: run_ray(ckpt, shards, C, T, 1)
    if T == 1:  # the two Ray configurations are the same one
        configs.pop("ray 1 actor x 1 threads")
    load_before = os.getloadavg()
    results = _rounds(configs, args.repeats, T)
    rows = _table(results, startup["load_s"])
    load_after = os.getloadavg()
    cli_runs = []
    if args.model == "signal" and not args.no_cli:
        ray.shutdown()  # the CLI starts its own local Ray; leave it the machine
        cli, cli_runs = _cli_rows(ckpt, catalog, Path(args.work), args.repeats,
                                  rows[0]["spectra_per_s"], args.compare_batch)  # fmt: skip
        rows += cli
    print()
    report(
        args.name,
        rows,
        extra={
            "model": args.model,
            "n_spectra": shards.n_rows,
            "n_shards": len(shards.files),
            "batch_size": B,
            "threads": T,
            "n_params": n_params,
            "cores": os.cpu_count(),
            "ray_version": ray.__version__,
            "ray_init_s": init_s,
            "driver_niceness": driver_nice,
            "load_average_before_after": [load_before, load_after, os.getloadavg()],
            "read_arrays_s": startup["read_arrays_s"],
            "target_ratio": TARGET_RATIO,
            "rounds": results,
            "cli_runs": cli_runs,
            "command": " ".join(["python", "bench/bench_infer.py", *(argv or sys.argv[1:])]),
        },
    )
    ray_rows = [r for r in rows[1:] if r["config"].startswith("ray") and "batch" not in r["config"]]
    worst = min(r["ratio"] for r in ray_rows)
    ratios = ", ".join(f"{r['config']} {r['ratio']:.2f}" for r in ray_rows)
    verdict = "met" if worst >= TARGET_RATIO else "MISSED"
    print(f"\nRay / in-process throughput: {ratios} (target >= {TARGET_RATIO}: {verdict})")
    if cli_runs:
        best = min((x for x in cli_runs if x["config"] == cli[0]["config"]),
                   key=lambda x: x["wall_s"])  # fmt: skip
        print(f"mendis score end to end (best of {args.repeats}): {best['wall_s']:.1f} s, "
              f"{best['rate']:.0f} spectra/s; before the run {best['before_run_s']:.1f} s, "
              f"Ray start + scoring {best['ray_start_and_score_s']:.1f} s (scores written "
              f"{best['score_s']:.1f} s), outputs {best['outputs_s']:.1f} s")  # fmt: skip
    print(f"1-min load average before/after the timed rounds: {load_before[0]:.1f} / "
          f"{load_after[0]:.1f} on {os.cpu_count()} cores")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
