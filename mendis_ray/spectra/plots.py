"""Figures of the simulator: example spectra per class and which pixels each element
moves.  matplotlib (Agg) only; every function writes one PNG and returns its path."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mendis_ray.atomic import save_figure_atomic
from mendis_ray.spectra.simulate import (
    ELEMENTS,
    OUTLIER_CLASSES,
    Simulator,
    StellarLabels,
    dominant_element,
    element_response,
    paper_training_labels,
)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _atomic_savefig(fig, path: Path) -> Path:
    return save_figure_atomic(fig, path, dpi=110)


def _gaps_to_nan(wl: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Copy of ``f`` with NaN at the first pixel after each chip gap (no line across)."""
    f = f.astype(np.float64)
    step = np.diff(np.log10(wl))
    f[1:][step > 3 * np.median(step)] = np.nan
    return f


def plot_examples(sim: Simulator, path: Path, seed: int = 0) -> Path:
    """One noise-free spectrum per class over the full range and a 60 A zoom."""
    plt = _plt()
    rng = np.random.default_rng(seed)
    sets = {"training giant": paper_training_labels(1, rng)}
    sets |= {name: fn(1, rng) for name, fn in OUTLIER_CLASSES.items()}
    wl = sim.grid.wavelength
    fig, axes = plt.subplots(2, 1, figsize=(13, 7))
    zoom = (wl > 15740) & (wl < 15800)
    for k, (name, lab) in enumerate(sets.items()):
        f = _gaps_to_nan(wl, sim(lab)[0])
        desc = f"{name}: Teff {lab.teff[0]:.0f} logg {lab.logg[0]:.2f} [Fe/H] {lab.feh[0]:+.2f}"
        if name == "cemp":
            desc += f" [C/Fe] {lab.x_h[0, 0] - lab.feh[0]:+.2f}"
        if lab.vmacro[0] > 10 or lab.vsini[0] > 0:
            desc += f" vbroad {max(lab.vmacro[0], lab.vsini[0]):.0f} km/s"
        axes[0].plot(wl, f - 0.6 * k, lw=0.5, label=desc)
        axes[1].plot(wl[zoom], f[zoom], "-", lw=1.2, label=name)
    axes[0].set(
        xlabel="vacuum wavelength (A)",
        ylabel="normalized flux (offset)",
        title=f"Simulated spectra on the {sim.grid.name} grid ({sim.grid.n_pix} px)",
    )
    axes[0].legend(fontsize=7, loc="lower left")
    axes[1].set(
        xlabel="vacuum wavelength (A)", ylabel="normalized flux", title="Zoom: Mg I triplet region"
    )
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    out = _atomic_savefig(fig, path)
    plt.close(fig)
    return out


def plot_element_response(sim: Simulator, path: Path, threshold: float = 0.01) -> Path:
    """|d flux / d[X/H]| for each element at the reference giant, and the dominant
    element of each pixel (the ground truth for the correlation analysis)."""
    plt = _plt()
    resp = element_response(sim, StellarLabels.solar_giant(1))[0]  # (19, n_pix)
    dom = dominant_element(resp, threshold)
    wl = sim.grid.wavelength
    fig, axes = plt.subplots(
        2, 1, figsize=(13, 9), gridspec_kw={"height_ratios": [3, 1.3]}, sharex=True
    )
    img = np.log10(np.abs(resp) + 1e-4)
    x = np.arange(wl.size)
    axes[0].imshow(
        img,
        aspect="auto",
        cmap="magma",
        vmin=-3,
        vmax=0,
        interpolation="nearest",
        extent=(-0.5, wl.size - 0.5, len(ELEMENTS) - 0.5, -0.5),
    )
    axes[0].set_yticks(range(len(ELEMENTS)), ELEMENTS)
    counts = [(dom == i).sum() for i in range(len(ELEMENTS))]
    dominated = ", ".join(f"{e} {c}" for e, c in zip(ELEMENTS, counts, strict=True) if c)
    axes[0].set_title(
        "log10 |d flux / d[X/H]| (per dex), Teff 4400 K, log g 2.05, solar\n"
        f"pixels dominated by each element: {dominated}",
        fontsize=10,
    )
    cmap = plt.get_cmap("tab20")
    colors = np.array([cmap(i % 20) for i in range(len(ELEMENTS))])
    has = dom >= 0
    axes[1].scatter(x[has], dom[has], c=colors[dom[has]], s=4)
    axes[1].set_yticks(range(len(ELEMENTS)), ELEMENTS, fontsize=6)
    axes[1].set_ylim(-0.5, len(ELEMENTS) - 0.5)
    axes[1].set_ylabel("dominant")
    ticks = np.linspace(0, wl.size - 1, 9).astype(int)
    axes[1].set_xticks(ticks, [f"{wl[t]:.0f}" for t in ticks])
    axes[1].set_xlabel(
        f"pixel (vacuum wavelength, A); {has.sum()} of {wl.size} pixels move > {threshold} per dex"
    )
    fig.tight_layout()
    out = _atomic_savefig(fig, path)
    plt.close(fig)
    return out


def plot_population(train_dir: Path, path: Path) -> Path:
    """The survey population's labels (truth columns of the shards under ``train_dir``):
    the Teff-log g diagram coloured by [Fe/H], [alpha/Fe] vs [Fe/H] (the two sequences),
    and the S/N distribution."""
    from mendis_ray.spectra.population import SurveyPopulation
    from mendis_ray.spectra.shards import read_dataset

    t = read_dataset(train_dir)
    col = lambda name: t.column(name).to_numpy(zero_copy_only=False)  # noqa: E731
    teff, logg, feh = col("truth_teff"), col("truth_logg"), col("truth_fe_h")
    alpha, snr = col("truth_alpha_fe"), col("snr")
    plt = _plt()
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.6))
    sc = ax[0].scatter(teff, logg, c=feh, s=2, cmap="viridis", rasterized=True)
    ax[0].invert_xaxis()
    ax[0].invert_yaxis()
    ax[0].set(xlabel="Teff (K)", ylabel="log g", title="giant branch and red clump")
    fig.colorbar(sc, ax=ax[0], label="[Fe/H]")
    ax[1].scatter(feh, alpha, s=2, c="0.3", alpha=0.4, rasterized=True)
    grid = np.linspace(-1.0, 0.4, 50)
    low, high = SurveyPopulation().alpha_sequences(grid)
    ax[1].plot(grid, low, "C0", label="low-alpha sequence")
    ax[1].plot(grid, high, "C3", label="high-alpha sequence")
    ax[1].plot(grid, 0.5 * (low + high), "k--", lw=1, label="between (outlier set)")
    ax[1].set(xlabel="[Fe/H]", ylabel="[alpha/Fe]", title="two disc sequences")
    ax[1].legend(fontsize=8)
    ax[2].hist(snr, bins=np.geomspace(50, 1000, 40), color="0.4")
    ax[2].set(xscale="log", xlabel="S/N", ylabel="stars", title="per-star S/N")
    fig.suptitle(f"survey population: {len(teff)} training stars (true labels)")
    fig.tight_layout()
    out = _atomic_savefig(fig, path)
    plt.close(fig)
    return out
