"""How many held-out stars the signal score's calibration needs (``mendis train --reference``).

    python bench/bench_reference.py          # after bench_ood.py --save-signal (15-20 min)

The signal-space model's scores are tail probabilities among held-out stars at the same
noise level (``NoiseCalibration``); ``mendis train`` holds out 10% of the training set for
that, 2,000 stars on the survey benchmark, of which ~190 lie at S/N 500-1000.  On 12,000
independent inliers the signal score's percentiles were 5.8 points (Kolmogorov distance)
from uniform in that bin.  Is it the reference's sampling?  This refits the scorer of the
benchmark's saved model (the same flow, basis and training stars: only the reference
changes, as ``--reference`` does) with

- its 2,000 validation stars plus 0, 4,000 and 8,000 more held-out stars of the same
  population (``mendis simulate --population survey --seed 13``);
- three disjoint sets of 2,000 of those stars alone (the spread of the reference's
  sampling at the default size);

and reports the benchmark's AUROCs and test-star calibration, and the calibration on 12,000
independent inliers (``--seed 7``), each S/N bin's distance and mean percentile for
``signal_score`` and ``residual_score``.  Writes
``bench/results/reference.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from mendis_ray.science.benchmark import ModelRun, calibration, evaluate
from mendis_ray.science.signal_scores import PERCENTILE_OF, SignalScorer, load_scorer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report, survey_stars
from bench_ood import load

KEYS = ("score", "signal_score", "residual_score")
SETS = ("between_alpha", "off_branch", "single_element", "unknown_line", "binary")


def refit(model, data, held: tuple, train_coords, a0: int) -> tuple[SignalScorer, float]:
    """The scorer of ``model`` with the held-out stars ``held`` = (flux, ivar, labels), as
    ``mendis train`` fits it (its training stars for the residual), and the fit's seconds."""
    tr = data.train
    t0 = time.perf_counter()
    sc = SignalScorer.fit(model, *held, train_coords, grid=data.grid,
                          train=(tr.flux[:a0], tr.ivar[:a0], tr.labels[:a0]),
                          far_iqr=model.cfg.far_iqr)  # fmt: skip
    return sc, time.perf_counter() - t0


def measure(sc: SignalScorer, data, indep) -> dict:
    """AUROCs and calibration on the benchmark (``evaluate``), and on ``indep``."""
    scores, log_p, pct = {}, {}, {}
    for name, a in {"test": data.test, **data.sets}.items():
        out = sc.score(a.flux, a.ivar, a.labels)
        scores[name], log_p[name] = {k: out[k] for k in KEYS}, out["log_p"]
        if name == "test":
            pct = {k: out[PERCENTILE_OF[k]] for k in KEYS}
    run = ModelRun("signal", scores, {k: sc.ref[f"sorted.{k}"] for k in KEYS}, log_p, 0.0, 0.0,
                   {}, test_percentiles=pct)  # fmt: skip
    rows = {r["score"]: r for r in evaluate([run], data)}
    out = sc.score(indep.flux, indep.ivar, indep.labels)
    ind = {k: calibration(out[PERCENTILE_OF[k]], indep.snr) for k in KEYS}
    row = {f"{s}": rows["score"][s] for s in SETS}
    row |= {f"{s} (signal)": rows["signal_score"][s] for s in ("between_alpha", "off_branch")}
    row["snr1000_vs_300"] = rows["signal_score"]["snr1000_vs_300"]
    row["calib test"] = "/".join(f"{rows[k]['calib']:.1f}" for k in KEYS)
    row["calib indep"] = "/".join(f"{ind[k]['max']:.1f}" for k in KEYS)
    for k in ("signal_score", "residual_score"):  # each S/N bin's distance, mean - 50
        bins = {b: v for b, v in ind[k].items() if "-" in b}
        row[f"{k.split('_')[0]} indep by S/N"] = " ".join(f"{v:.1f}" for v in bins.values())
        means = ind[k]["mean_minus_50"].values()
        row[f"{k.split('_')[0]} indep mean-50"] = " ".join(f"{v:+.1f}" for v in means)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="mendis_out/bench_ood/data")
    p.add_argument("--model", default="mendis_out/bench_ood/signal")
    p.add_argument("--extra", default="mendis_out/bench_reference/extra", help="seed-13 stars")
    p.add_argument("--indep", default="mendis_out/bench_reference/indep", help="seed-7 stars")
    p.add_argument("--sizes", type=int, nargs="+", default=[0, 4000, 8000])
    p.add_argument("--disjoint", type=int, default=3, help="2,000-star references alone")
    args = p.parse_args()
    data = load(Path(args.data))
    model = load_scorer(args.model).model
    extra = survey_stars(Path(args.extra), "test", max(max(args.sizes), 2000 * args.disjoint), 13)
    indep = survey_stars(Path(args.indep), "test", 12_000, 7)
    tr = data.train
    a0 = len(tr.flux) - round(0.1 * len(tr.flux))  # mendis train's validation rows
    train_coords = model.coordinates(tr.flux[:a0], tr.ivar[:a0], tr.labels[:a0])
    arrays = ((tr.flux, extra.flux), (tr.ivar, extra.ivar), (tr.labels, extra.labels))
    plans = [(f"validation + {n:,d}", [np.concatenate([a[a0:], b[:n]]) for a, b in arrays])
             for n in args.sizes]  # fmt: skip
    plans += [(f"seed 13 rows {i * 2000:,d}-{(i + 1) * 2000:,d}",
               [b[i * 2000 : (i + 1) * 2000] for _, b in arrays])
              for i in range(args.disjoint)]  # fmt: skip
    rows = []
    for name, held in plans:
        sc, seconds = refit(model, data, tuple(held), train_coords, a0)
        rows.append({"reference": name, "stars": len(held[0]), "fit s": round(seconds, 1),
                     **measure(sc, data, indep)})  # fmt: skip
        print(rows[-1], flush=True)
    report("reference", rows, {"bins": "S/N 50-100, 100-200, 200-500, 500-1000",
                               "calib": "score/signal_score/residual_score"})  # fmt: skip


if __name__ == "__main__":
    main()
