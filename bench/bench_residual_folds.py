"""The residual calibration in sample against cross-fitted, on one trained model.

    mendis simulate --out data --population survey --grid aspcap --n-train 3000 \\
        --n-test 1000 --n-outlier 200 --seed 5 --no-figures
    mendis train data/train --out run
    python bench/bench_residual_folds.py run/checkpoint data --folds 0 3 5

Refits the scorer's reference of the checkpoint's model (the same rows `mendis train` used:
its seeded shuffle, the last 10% held out) with ``SignalConfig.residual_folds`` set to each
value, scores the held-out inliers (``data/test``) and the outlier sets there, and prints
per setting: the inliers' mean percentile and fraction below 1 for each score (50 and 0.01
when calibrated) and the AUROC of each set.  Writes ``bench/results/residual_folds.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from mendis_ray.science.metrics import auroc
from mendis_ray.science.signal_scores import SignalScorer
from mendis_ray.spectra.shards import read_dataset, table_arrays
from mendis_ray.train.signal import load_training_shards

RESULTS = Path(__file__).resolve().parent / "results"
PCT = ("percentile", "signal_percentile", "residual_percentile")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("data", help="folder with train/, test/ and outlier sets")
    p.add_argument("--folds", type=int, nargs="+", default=[0, 3])
    args = p.parse_args()
    model = SignalScorer.from_checkpoint(args.checkpoint).model
    flux, ivar, labels, grid = load_training_shards([Path(args.data) / "train"], seed=0)
    n = len(flux) - max(2, round(0.1 * len(flux)))  # as train_signal_model splits
    coords = model.coordinates(flux[:n], ivar[:n], labels[:n])
    names = [d.name for d in sorted(Path(args.data).iterdir()) if (d / "_manifest.json").is_file()]
    sets = {k: table_arrays(read_dataset(Path(args.data) / k)) for k in names if k != "train"}
    rows = []
    for folds in args.folds:
        model.cfg = model.cfg.replace(residual_folds=folds)
        t0 = time.perf_counter()
        sc = SignalScorer.fit(model, flux[n:], ivar[n:], labels[n:], coords, grid=grid,
                              train=(flux[:n], ivar[:n], labels[:n]),
                              far_iqr=model.cfg.far_iqr)  # fmt: skip
        row: dict = {"folds": folds, "fit_s": round(time.perf_counter() - t0, 1)}
        outs = {k: sc.score(a.flux, a.ivar, a.labels) for k, a in sets.items()}
        te = outs["test"]
        for c in PCT:
            row[f"{c} mean"] = round(float(np.mean(te[c])), 1)
            row[f"{c} <1"] = round(float(np.mean(te[c] < 1)), 3)
        for k, o in outs.items():
            if k != "test":
                row[k] = round(auroc(te["score"], o["score"]), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = {"checkpoint": str(args.checkpoint), "data": str(args.data), "train_rows": n,
           "k": int(model.basis.k), "pixels": int(flux.shape[1]), "rows": rows}  # fmt: skip
    (RESULTS / "residual_folds.json").write_text(json.dumps(out, indent=1))
    print("wrote", RESULTS / "residual_folds.json")


if __name__ == "__main__":
    main()
