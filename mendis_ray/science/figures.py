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

from mendis_ray.spectra.linelist import ELEMENTS

__all__ = ["correlation_panels", "reconstruction", "score_histograms", "training_curve"]


def _save(fig: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


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
) -> Path:  # fmt: skip
    """One panel per score: histograms of inliers and each outlier class."""
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6))
    sets = list(dict.fromkeys(list(pairs.values()) + list(pairs)))
    for ax, name in zip(np.atleast_1d(axes), names, strict=False):
        vals = [scores[s][name] for s in sets if name in scores[s]]
        finite = np.concatenate([v[np.isfinite(v)] for v in vals])
        lo, hi = np.percentile(finite, [0.5, 99.9])
        bins = np.linspace(lo, hi, 60)
        for s in sets:
            v = scores[s].get(name)
            if v is None:
                continue
            ax.hist(np.clip(v, lo, hi), bins=bins, histtype="step", density=True, label=s)
        ax.set_title(name)
        ax.set_xlabel("score (higher = more typical)")
    np.atleast_1d(axes)[0].legend(fontsize=7)
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
    axes[0].set_title(f"flow: {cl.corr.shape[0]} absorption pixels, wavelength order")
    im = axes[1].imshow(cl.reindexed, **kw)
    axes[1].set_title(f"flow: re-indexed by components (corr > {cl.threshold})")
    axes[2].imshow(cond.true_corr[np.ix_(order, order)], **kw)  # type: ignore[attr-defined]
    axes[2].set_title("true conditional (simulator), same order")
    dom = cond.dominant[order]  # type: ignore[attr-defined]
    # mark the dominant element of the largest blocks along the re-indexed axis
    start = 0
    for size in cl.sizes[: min(8, cl.n_multi())]:
        block = dom[start : start + size]
        known = block[block >= 0]
        if known.size:
            el = ELEMENTS[int(np.bincount(known).argmax())]
            axes[1].text(start + size / 2, start - 5, el, ha="center", fontsize=8)
        start += size
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
