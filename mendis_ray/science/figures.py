"""Figures of the science results (PNG via matplotlib, Agg backend): the training curve,
score distributions per class (the paper's Fig. 3), the conditional correlation matrix
raw and re-indexed into element blocks (Fig. 2 middle and right), and reconstructions
(Fig. 2 left).  Every function writes atomically and returns the path."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from mendis_ray.atomic import save_figure_atomic
from mendis_ray.spectra.linelist import ELEMENTS

__all__ = ["correlation_panels", "reconstruction", "score_histograms", "training_curve"]


def _save(fig: plt.Figure, path: Path) -> Path:
    try:
        return save_figure_atomic(fig, path, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)


def training_curve(history: object, path: Path) -> Path:
    """Train and validation mean log p per epoch, with the starting point."""
    ep = [e["epoch"] for e in history.epochs]  # type: ignore[attr-defined]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(ep, [e["train_log_prob"] for e in history.epochs], "o-", label="train")  # type: ignore[attr-defined]
    ax.plot(ep, [e["val_log_prob"] for e in history.epochs], "s-", label="validation")  # type: ignore[attr-defined]
    ax.axhline(history.initial_val_log_prob, color="gray", ls="--", label="validation at start")  # type: ignore[attr-defined]
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean log p (nats, standardized)")
    ax.legend()
    return _save(fig, path)


def score_histograms(
    scores: dict[str, dict[str, np.ndarray]], pairs: dict[str, str], path: Path,
    names: tuple[str, ...] = ("flow_log_p", "flow_signal", "gaussian", "t2_5"),
    subtle: tuple[str, ...] = ("inliers", "inliers_snr1000", "mg_edge"),
) -> Path:  # fmt: skip
    """One column per score.  Top row: the subtle sets (inliers, the same stars at higher
    S/N, an abundance just outside the training range) on a linear axis; bottom row: the
    held-out test set and the far outlier classes, as the distance below the test median
    on a log axis (their scores span orders of magnitude)."""
    far = [s for s in dict.fromkeys(list(pairs.values()) + list(pairs)) if s not in subtle]
    near = [s for s in subtle if s in scores]
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 6.6), squeeze=False)
    for j, name in enumerate(names):
        ax = axes[0, j]
        vals = [scores[s][name] for s in near if name in scores[s]]
        if vals:
            # relative to the inliers' median, so the tick labels stay short
            med0 = float(np.nanmedian(vals[0]))
            finite = np.concatenate([v[np.isfinite(v)] for v in vals]) - med0
            lo, hi = np.percentile(finite, [0.5, 99.5])
            bins = np.linspace(lo, hi, 50)
            for s in near:
                if name in scores[s]:
                    v = np.clip(scores[s][name] - med0, lo, hi)
                    ax.hist(v, bins=bins, histtype="step", density=True, label=s)
        ax.set_title(name)
        ax.set_xlabel(f"score - median({near[0] if near else 'inliers'}) (higher = more typical)")
        ax = axes[1, j]
        ref = [s for s in far if s in scores and name in scores[s]]
        if ref:
            med = float(np.nanmedian(scores[ref[0]][name]))
            gap = {s: np.maximum(med - scores[s][name], 0.0) + 1.0 for s in ref}
            top = max(float(np.nanmax(g)) for g in gap.values())
            bins = np.logspace(0, np.log10(max(top, 10.0)), 50)
            for s in ref:
                ax.hist(gap[s], bins=bins, histtype="step", density=False, label=s)
            ax.set_xscale("log")
        ax.set_xlabel(f"1 + max(0, median({ref[0] if ref else 'test'}) - score)")
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].legend(fontsize=7)
    axes[0, 0].set_ylabel("density")
    axes[1, 0].set_ylabel("count")
    fig.tight_layout()
    return _save(fig, path)


def correlation_panels(cond: object, wavelength: np.ndarray, path: Path) -> Path:
    """Conditional correlation over absorption pixels: flow in grid order, flow re-indexed
    by connected components, the true (simulated) matrix in the same order, and the
    dominant element of each pixel along the re-indexed axis."""
    cl = cond.clusters  # type: ignore[attr-defined]
    order = cl.order
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    kw = {"vmin": -1, "vmax": 1, "cmap": "RdBu_r", "interpolation": "nearest"}
    axes[0].imshow(cl.corr, **kw)
    n_px = cl.corr.shape[0]
    axes[0].set_title(f"flow p(spectrum | labels)\n{n_px} absorption pixels, grid order")
    im = axes[1].imshow(cl.reindexed, **kw)
    axes[1].set_title(f"flow, re-indexed by connected\ncomponents of corr > {cl.threshold}")
    axes[2].imshow(cond.true_clusters.corr[np.ix_(order, order)], **kw)  # type: ignore[attr-defined]
    axes[2].set_title("true conditional (simulator)\nsame order")
    dom = cond.dominant[order]  # type: ignore[attr-defined]
    # the dominant element of each multi-pixel block, as tick labels at the block centre
    start, ticks, labels = 0, [], []
    for size in cl.sizes[: cl.n_multi()]:
        block = dom[start : start + size]
        known = block[block >= 0]
        if known.size and size >= 3:
            ticks.append(start + size / 2)
            labels.append(f"{ELEMENTS[int(np.bincount(known).argmax())]} ({size})")
        start += size
    for ax in axes[1:]:
        ax.set_yticks(ticks, labels, fontsize=6)
    for ax in axes:
        ax.set_xlabel("pixel")
    fig.colorbar(im, ax=axes, shrink=0.8, label="correlation")
    return _save(fig, path)


def reconstruction(rec: dict, wavelength: np.ndarray, path: Path, n_show: int = 3) -> Path:
    """Input spectra, their reconstructions f^-1(z*) and residuals against the noise."""
    fig, axes = plt.subplots(n_show, 1, figsize=(12, 2.6 * n_show), sharex=True)
    for i, ax in enumerate(np.atleast_1d(axes)):
        ax.plot(wavelength, rec["flux"][i], lw=0.6, color="k", label="training-like input")
        ax.plot(wavelength, rec["flux_rec"][i], lw=0.6, color="C1", label="flow f^-1(z*)")
        ax.plot(
            wavelength, 0.55 + (rec["flux"][i] - rec["flux_rec"][i]) * 10, lw=0.5, color="C2",
            label="residual x10 (+0.55)",
        )  # fmt: skip
        ax.set_ylabel("normalized flux")
        ax.set_title(f"RMS residual {rec['rms'][i]:.4f} (noise ~{rec['noise']:.4f})", fontsize=9)
    np.atleast_1d(axes)[0].legend(fontsize=7, ncol=3)
    np.atleast_1d(axes)[-1].set_xlabel("wavelength (A)")
    return _save(fig, path)
