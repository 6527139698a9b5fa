"""The OOD benchmark on the survey population: every model, every outlier set, one table.

    python bench/bench_ood.py            # full: 20,000 training stars (~25 min on 2 cores)
    python bench/bench_ood.py --quick    # 4,000 training stars, smoke run (~4 min)

Simulates the survey sets once into ``--data`` (reused when present), trains the
signal-space model, the full-space compact flow (time-limited) and the baselines on the
same training rows, scores the same sets, and writes ``bench/results/ood[_quick].json``
and ``.md`` (the Markdown table the README shows).  See ``mendis_ray.science.benchmark``
for what each column means.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from mendis_ray.config import SignalConfig
from mendis_ray.science.benchmark import (
    BenchData,
    baseline_runs,
    evaluate,
    flow_run,
    signal_run,
)
from mendis_ray.spectra.datasets import survey_sets, write_survey_set
from mendis_ray.spectra.shards import read_dataset, shard_metadata, table_arrays
from mendis_ray.spectra.simulate import Simulator

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("bench_ood")


def simulate(out: Path, n_train: int, n_test: int, n_outlier: int, seed: int) -> None:
    """Simulate the sets into ``out``; a set already there with the same size and seed is
    reused (each set has its own seed, so changing one size re-simulates only that set)."""
    sim = Simulator()
    for k, spec in enumerate(survey_sets(n_train, n_test, n_outlier)):
        manifest = out / spec.name / "_manifest.json"
        if manifest.is_file():
            gen = json.loads(manifest.read_text()).get("generator", {})
            if (gen.get("n"), gen.get("seed"), gen.get("set_index")) == (spec.n, seed, k):
                continue
            shutil.rmtree(out / spec.name)
        row = write_survey_set(out, spec, sim, seed=seed, set_index=k)
        log.info("simulated %s: %d spectra in %.1f s", row["set"], row["rows"], row["seconds"])


def load(out: Path) -> BenchData:
    names = [p.name for p in sorted(out.iterdir()) if (p / "_manifest.json").is_file()]
    arrays = {n: table_arrays(read_dataset(out / n)) for n in names}
    train, test = arrays.pop("train"), arrays.pop("test")
    grid = shard_metadata(next((out / "train").glob("*.parquet")))["grid"]
    return BenchData(train, test, arrays, grid)


def markdown(rows: list[dict], sets: list[str]) -> str:
    cols = ["model", "score", "heldout_log_p", *sets, "snr1000_vs_300", "calib", "calib_mean",
            "train_s", "spectra_per_s"]  # fmt: skip
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"

    def cell(v: object) -> str:
        if v is None:
            return "-"
        return f"{v:.1f}" if isinstance(v, float) and abs(v) >= 10 else str(v)

    return head + "".join("| " + " | ".join(cell(r.get(c)) for c in cols) + " |\n" for r in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sets, short training")
    p.add_argument("--data", default=None, help="folder of simulated survey sets")
    p.add_argument("--flow-minutes", type=float, default=None, help="full-space flow budget")
    p.add_argument("--no-flow", action="store_true", help="skip the full-space flow")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--save-signal", default=None, metavar="DIR",
        help="save the trained signal-space model there (for bench_signal_gaussian.py "
        "--checkpoint DIR: the same model, side by side)",
    )  # fmt: skip
    p.add_argument(
        "--signal", default="{}", help="SignalConfig overrides as JSON, e.g. '{\"hidden\": 64}'"
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("mendis_ray.train.loop",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # 10,000 held-out inliers: the S/N calibration bins need them (at 2,000 the 500-1000
    # bin held 184 stars, and its mean percentile's noise alone was +-4 points at 95%)
    n_train, n_test, n_outlier = (4000, 1000, 300) if args.quick else (20_000, 10_000, 1000)
    tag = "ood_quick" if args.quick else "ood"
    data_dir = Path(args.data or f"mendis_out/bench_{tag}/data")
    t0 = time.perf_counter()
    simulate(data_dir, n_train, n_test, n_outlier, args.seed)
    data = load(data_dir)
    log.info("loaded %d training stars and %d sets", len(data.train.flux), len(data.sets) + 1)
    signal_cfg = SignalConfig(seed=args.seed).replace(**json.loads(args.signal))
    runs = [signal_run(data, signal_cfg)]
    log.info("signal model: k = %d, %.1f s", runs[0].extra["k"], runs[0].train_seconds)
    if args.save_signal:
        runs[0].extra["scorer"].save(args.save_signal)
    if not args.no_flow:
        minutes = args.flow_minutes or (1.0 if args.quick else 5.0)
        runs.append(flow_run(data, "compact", 60 * minutes))
    runs += baseline_runs(data)
    rows = evaluate(runs, data)
    sets = [s for s in data.sets if s not in ("snr300", "snr1000")]
    table = markdown(rows, sets)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    hist = runs[0].extra["history"]
    payload = {
        "benchmark": tag,
        "n_train": len(data.train.flux),
        "sets": {k: len(v.flux) for k, v in {"test": data.test, **data.sets}.items()},
        "signal_config": signal_cfg.to_dict(),
        # the steps it trained with (a large training set's, SignalConfig.train_config)
        "signal_steps": {
            k: getattr(runs[0].extra["steps"], k)
            for k in ("batch_size", "lr", "ema_decay", "patience")
        },
        "signal_k": runs[0].extra["k"],
        "signal_epochs": len(hist.epochs),
        "signal_best_val_log_q": hist.best_val_log_prob,
        "signal_initial_val_log_q": hist.initial_val_log_prob,
        "wall_seconds": time.perf_counter() - t0,
        "rows": rows,
    }
    (RESULTS / f"{tag}.json").write_text(json.dumps(payload, indent=1, default=float))
    (RESULTS / f"{tag}.md").write_text(table)
    print(f"wrote {RESULTS / (tag + '.json')} and .md in {payload['wall_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
