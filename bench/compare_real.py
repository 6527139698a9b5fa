"""Simulated vs real APOGEE giants: pixel-depth distribution, line counts, strongest
features, and an overlay figure.  Needs ../shared/data (skips with a message otherwise).

    python bench/compare_real.py

Real: the DR14 aspcapStar spectrum of 2M08002084+4044415 (Teff 4858.5, log g 2.43,
[M/H] -0.33; payne_zero/apogee_dr14_example.npz).  Simulated at the same labels (all
[X/H] = [M/H]) and at the training set's centre (4400 K, 2.05, solar).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
from _common import RESULTS, report
from scipy.signal import find_peaks

from mendis_ray.spectra.grid import apstar_grid
from mendis_ray.spectra.simulate import ELEMENTS, Simulator, StellarLabels

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def stats(name: str, flux: np.ndarray, good: np.ndarray, wl: np.ndarray) -> dict:
    x = np.where(good, flux, 1.0)
    peaks, props = find_peaks(1 - x, height=0.05, distance=3)
    deepest = peaks[np.argsort(props["peak_heights"])[::-1][:5]]
    return {
        "spectrum": name,
        "median": float(np.median(x[good])),
        "frac_below_0.95": float((x[good] < 0.95).mean()),
        "frac_below_0.90": float((x[good] < 0.90).mean()),
        "min": float(x[good].min()),
        "lines_deeper_5pc": len(peaks),
        "lines_deeper_20pc": len(find_peaks(1 - x, height=0.2, distance=3)[0]),
        "deepest_A": " ".join(f"{wl[p]:.0f}" for p in sorted(deepest)),
    }


def main() -> int:
    path = SHARED / "payne_zero" / "apogee_dr14_example.npz"
    if not path.exists():
        print(f"skipped: {path} is absent (needs ../shared/data)")
        return 0
    z = np.load(path)
    pix = z["apstar_pixel"]
    good = z["good_pixel_mask"].astype(bool)
    real = z["normalized_flux"]
    wl = apstar_grid().wavelength[pix]
    sim = Simulator(grid=apstar_grid())
    n_el = len(ELEMENTS)
    same = StellarLabels(np.array([4858.5]), np.array([2.43]), np.full((1, n_el), -0.33),
                         np.array([6.0]), np.zeros(1))  # fmt: skip
    f_same = sim(same)[0][pix]
    f_ref = sim(StellarLabels.solar_giant(1))[0][pix]
    rows = [
        stats("real DR14 giant 4858/2.43/-0.33", real, good, wl),
        stats("simulated, same labels", f_same, good, wl),
        stats("simulated, 4400/2.05/0.00", f_ref, good, wl),
    ]
    fig_path = RESULTS / "compare_real.png"
    _figure(wl, real, good, f_same, f_ref, fig_path)
    report("compare_real", rows, {"figure": str(fig_path)})
    return 0


def _figure(wl, real, good, f_same, f_ref, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(13, 8))
    windows = [(15150, 15350), (15700, 15900), (16700, 16900)]
    for k, (a, b) in enumerate(windows):
        ax = fig.add_subplot(4, 1, k + 1)
        m = (wl > a) & (wl < b)
        r = np.where(good, real, np.nan)
        ax.plot(wl[m], r[m], "k-", lw=0.8, label="real DR14 giant (4858 K, 2.43, -0.33)")
        s = np.where(good, f_same, np.nan)
        ax.plot(wl[m], s[m], "C3-", lw=0.8, label="simulated, same labels")
        ax.set_xlim(a, b)
        ax.set_ylim(0.4, 1.1)
        if k == 0:
            ax.legend(fontsize=8, loc="lower left", ncol=2)
    ax = fig.add_subplot(4, 1, 4)
    bins = np.linspace(0, 0.6, 61)
    for f, lab, c in [(real, "real", "k"), (f_same, "simulated, same labels", "C3"),
                      (f_ref, "simulated 4400/2.05/0", "C0")]:  # fmt: skip
        ax.hist(1 - f[good], bins=bins, histtype="step", color=c, label=lab, log=True)
    ax.set_xlabel("pixel depth 1 - flux (lower panels: vacuum wavelength, A)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
