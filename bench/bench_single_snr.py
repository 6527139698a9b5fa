"""The signal-space model trained on one S/N (the paper's box at S/N 300), with and without
noise augmentation, side by side: does it rank the same stars alike at S/N 1000 and 300?

    python bench/bench_single_snr.py            # 4,000 training stars (~5 min on 2 cores)
    python bench/bench_single_snr.py --n 1500   # smaller
    python bench/bench_single_snr.py --n 20000  # the paper's training-set size (~6 min)

With a single training S/N, a star's noise level (the flow's context) varies only through
its line depths, so without augmentation the flow learns the noise level as a proxy for
the star's content, and a cleaner spectrum noised down to the training S/N carries a noise
level that contradicts its content.  With augmentation the factor reaches S/N
``min_snr`` (25): up to 144x here (``max_factor``), and k counts that noise.  Writes
``bench/results/single_snr.json`` (with ``--n`` other than 4,000: ``single_snr_n<N>.json``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from mendis_ray.config import SignalConfig
from mendis_ray.experiment import subtle_sets
from mendis_ray.science.metrics import auroc
from mendis_ray.science.signal_scores import SignalScorer
from mendis_ray.spectra.degrade import LABEL_SCATTER, add_noise, scatter_labels
from mendis_ray.spectra.simulate import Simulator, paper_training_labels
from mendis_ray.train.signal import augment_factor, train_signal_model

RESULTS = Path(__file__).resolve().parent / "results"
KEYS = ("score", "signal_score", "residual_score")


def run(cfg: SignalConfig, flux, ivar, labels, sets, grid: dict) -> dict:
    t0 = time.perf_counter()
    res = train_signal_model(flux, ivar, labels, cfg, show_progress=False)
    va, tr = res.val_rows, slice(0, res.val_rows.start)
    scorer = SignalScorer.fit(res.model, flux[va], ivar[va], labels[va], res.train_coords,
                              grid=grid, train=(flux[tr], ivar[tr], labels[tr]),
                              far_iqr=cfg.far_iqr)  # fmt: skip
    out = {k: scorer.score(v.flux, v.ivar, v.labels) for k, v in sets.items()}
    row = {"noise_augment": cfg.noise_augment,  # the factor reaches S/N min_snr at least
           "max_factor": augment_factor(flux[tr], ivar[tr], cfg), "k": res.model.basis.k,
           "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    for key in KEYS:
        row[f"snr1000_vs_300 {key}"] = auroc(out["inliers"][key], out["inliers_snr1000"][key])
        row[f"mg_edge {key}"] = auroc(out["inliers"][key], out["mg_edge"][key])
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4000, help="training stars")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    sim, rng = Simulator(), np.random.default_rng(args.seed)
    lab = paper_training_labels(args.n, rng)
    flux, ivar = add_noise(sim(lab), 300.0, rng)
    labels = scatter_labels(np.stack([lab.teff, lab.logg, lab.feh], 1), rng, LABEL_SCATTER)
    sets = subtle_sets(sim, 500, seed=args.seed + 1)  # inliers at S/N 300 and 1000, [Mg/H] edge
    grid = sim.grid.describe()  # the element tests need the simulator's grid
    rows = [run(SignalConfig(seed=args.seed, noise_augment=a), flux, ivar, labels, sets, grid)
            for a in (1.0, SignalConfig().noise_augment)]  # fmt: skip
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c])
                                for c in cols) + " |")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("single_snr.json" if args.n == 4000 else f"single_snr_n{args.n}.json")
    out.write_text(json.dumps({"n_train": args.n, "rows": rows}, indent=1, default=float))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
