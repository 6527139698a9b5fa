"""The survey benchmark as a figure: what the signal-space model finds, and whether its
percentiles are uniform at every S/N.

    python bench/plot_ood.py [--checkpoint mendis_out/bench_ood/signal]

Needs bench_ood.py's data (``mendis_out/bench_ood/data``) and the model it saved with
``--save-signal``.  Scores the held-out inliers and every outlier set with the saved model
and with Hotelling T^2 on 5 principal components (the simplest baseline that sees some of
them; fitted here on the same training rows) and writes ``bench/results/ood.png``:

1. ROC curves of the subtle sets, the model's ``score`` (solid) against T^2 (dashed);
2. the inliers' ``percentile`` in each S/N bin: its empirical CDF minus the uniform one
   (0 everywhere = calibrated), with the 95% band of a bin's sampling noise;
3. ``score`` against S/N for the inliers (gray) and two subtle sets: an S/N-blind score
   keeps the inliers' cloud flat.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from mendis_ray.atomic import save_figure_atomic
from mendis_ray.science.benchmark import SNR_BINS, baseline_runs
from mendis_ray.science.metrics import auroc, roc_curve
from mendis_ray.science.signal_scores import load_scorer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ood import load

RESULTS = Path(__file__).resolve().parent / "results"
SUBTLE = ("between_alpha", "off_branch", "single_element", "unknown_line",
          "second_population", "binary")  # fmt: skip


def _roc_panel(ax, model: dict, base: dict) -> None:
    for j, name in enumerate(s for s in SUBTLE if s in model):
        color = f"C{j}"
        for scores, ls in ((model, "-"), (base, "--")):
            out_kept, in_kept = roc_curve(scores["test"], scores[name])[:2]  # accepted
            label = f"{name} {auroc(scores['test'], scores[name]):.3f}" if ls == "-" else None
            ax.plot(1 - in_kept, 1 - out_kept, ls, color=color, lw=1.2, label=label)
    ax.plot([0, 1], [0, 1], ":", color="gray", lw=0.8)
    ax.set(xlabel="inliers flagged (false positive rate)", ylabel="outliers found",
           title="score (solid) vs Hotelling T$^2$ (dashed)")  # fmt: skip
    ax.legend(fontsize=7, loc="lower right", title="AUROC of score", title_fontsize=7)


def _calibration_panel(ax, pct: np.ndarray, snr: np.ndarray) -> None:
    for j, (lo, hi) in enumerate(SNR_BINS):
        p = np.sort(pct[(snr >= lo) & (snr < hi)]) / 100.0
        m = len(p)
        if m < 20:
            continue
        ecdf = np.arange(1, m + 1) / m
        ks = 100 * max(np.max(ecdf - p), np.max(p - (ecdf - 1 / m)))
        ax.plot(100 * p, 100 * (ecdf - p), color=f"C{j}", lw=1.2,
                label=f"S/N {lo:g}-{min(hi, 1000):g}: {m} stars, max {ks:.1f}")  # fmt: skip
        ax.axhspan(-136 / np.sqrt(m), 136 / np.sqrt(m), color=f"C{j}", alpha=0.06)
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xlabel="percentile", ylabel="ECDF - uniform (points)",
           title="inlier percentiles per S/N bin (bands: 95% noise)")  # fmt: skip
    ax.legend(fontsize=7)


def _snr_panel(ax, scores: dict, snr: dict) -> None:
    floor = -30.0  # the deepest outliers are shown at the floor
    ax.scatter(snr["test"], np.maximum(scores["test"], floor), s=2, c="0.6", label="inliers")
    for name, color in (("between_alpha", "C0"), ("off_branch", "C1")):
        if name in scores:
            ax.scatter(snr[name], np.maximum(scores[name], floor), s=4, c=color, label=name)
    ax.set(xscale="log", xlabel="S/N", ylabel="score (log tail probability)",
           title="score against S/N", ylim=(floor - 1, 0.5))  # fmt: skip
    ax.legend(fontsize=7, markerscale=3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="mendis_out/bench_ood/data")
    p.add_argument("--checkpoint", default="mendis_out/bench_ood/signal")
    p.add_argument("--out", default=str(RESULTS / "ood.png"))
    args = p.parse_args()
    data = load(Path(args.data))
    scorer = load_scorer(args.checkpoint)
    sets = {"test": data.test, **data.sets}
    outs = {n: scorer.score(a.flux, a.ivar, a.labels) for n, a in sets.items()}
    model = {n: o["score"] for n, o in outs.items()}
    (t2,) = baseline_runs(data, only=("hotelling-t2-5",))
    base = {n: s["score"] for n, s in t2.scores.items()}
    snr = {n: a.snr for n, a in sets.items()}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    _roc_panel(axes[0], model, base)
    _calibration_panel(axes[1], outs["test"]["percentile"], data.test.snr)
    _snr_panel(axes[2], model, snr)
    fig.suptitle(f"survey benchmark, signal-space model ({args.checkpoint})", fontsize=10)
    try:
        print("wrote", save_figure_atomic(fig, Path(args.out), dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)


if __name__ == "__main__":
    main()
