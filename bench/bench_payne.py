"""Independent data through the CLI: dwarfs from The Payne's 2018 emulator, not our simulator.

    python bench/bench_payne.py                      # 8,000 training stars, 2,405 pixels
    python bench/bench_payne.py --step 1 --out mendis_out/payne_7214   # 7,214 pixels
    python bench/bench_payne.py --step 1 --n-train 600 --out mendis_out/payne_7214_600

The emulator (``../shared/data/the_payne/NN_normalized_spectra_2018.npz``, trained on real
APOGEE dwarfs; labels Teff, log g, [Fe/H], [Mg/Fe], vmacro) makes a population our
simulator never made:

- main-sequence dwarfs, Teff 4,700-6,400 K, log g falling with Teff, [Fe/H] ~ N(-0.2,
  0.2), two [Mg/Fe] sequences (the high one more common at low [Fe/H]), vmacro ~ 6 km/s;
- S/N log-uniform in 50-500 (flat noise), the APOGEE pixel mask applied to every star
  (``apogee_mask.npz``: the model must leave those pixels out) and a random masked run of
  5-40 pixels in 30% of the stars; observed labels scattered by 50 K / 0.1 / 0.05 dex;
- outlier sets (300 each): ``between`` ([Mg/Fe] halfway between the sequences),
  ``mg_rich`` (+0.25 dex; partly overlaps the high sequence at low [Fe/H], by
  construction), ``off_sequence`` (log g 0.35 dex low), ``rotator`` (vmacro 25-44 km/s),
  ``binary`` (a second dwarf, cooler, shifted by 25-70 km/s, light-weighted),
  ``unknown_line`` (a Gaussian absorption line of depth 0.08-0.25, sigma 0.6 A, at a
  random wavelength), ``bump`` (a continuum bump of +-2-5%, sigma 20 A),
  ``wrong_labels`` (Teff given 400 K off).

Then ``mendis train`` and ``mendis score`` exactly as a user runs them, and per set the
AUROC against the held-out inliers (``test``, 1,000) for ``score`` / ``signal_score`` /
``residual_score``, the inliers' percentiles (mean, fraction below 1 and 5, mean per S/N
quartile) and which test fired (``strongest_test``) for the stars below percentile 5.
``--train-snr 300 300`` trains at one S/N and scores at 50-500.  Writes
``bench/results/payne[_step<step>][_n<n-train>][_train_snr<lo>-<hi>].json`` (``_n`` where
``--n-train`` is not 8,000).  Needs ``../shared``
(exits with a message without it).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads

from mendis_ray.science.metrics import auroc
from mendis_ray.science.signal_scores import PERCENTILE_OF
from mendis_ray.spectra.emulator import load_emulator
from mendis_ray.spectra.grid import grid_from_wavelength
from mendis_ray.spectra.shards import make_table, write_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "the_payne"
RESULTS = Path(__file__).resolve().parent / "results"
SETS = ("between", "mg_rich", "off_sequence", "rotator", "binary", "unknown_line", "bump",
        "wrong_labels")  # fmt: skip
SCORES = ("score", "signal_score", "residual_score")
EMULATOR = SHARED / "NN_normalized_spectra_2018.npz"


def _mg_sequence(feh: np.ndarray, high: np.ndarray) -> np.ndarray:
    return np.where(high, 0.30 - 0.25 * (feh + 0.5).clip(0, None), 0.02 - 0.05 * feh)


def population(rng: np.random.Generator, n: int, kind: str = "inlier") -> np.ndarray:
    """Labels (n, 5): Teff, log g, [Fe/H], [Mg/Fe], vmacro."""
    teff = rng.uniform(4700, 6400, n)
    logg = 4.65 - 0.00022 * (teff - 4700) + rng.normal(0, 0.04, n)
    feh = np.clip(rng.normal(-0.2, 0.2, n), -0.7, 0.3)
    high = rng.random(n) < np.clip(0.2 - 0.6 * feh, 0.05, 0.6)
    mg = _mg_sequence(feh, high) + rng.normal(0, 0.025, n)
    vmac = rng.normal(6, 1.0, n).clip(3, 10)
    if kind == "between":
        mid = 0.5 * (_mg_sequence(feh, np.ones(n, bool)) + _mg_sequence(feh, np.zeros(n, bool)))
        mg = mid + rng.normal(0, 0.015, n)
    elif kind == "mg_rich":
        mg = mg + 0.25
    elif kind == "off_sequence":
        logg = logg - 0.35
    elif kind == "rotator":
        vmac = rng.uniform(25, 44, n)
    return np.c_[teff, logg, feh, mg, vmac]


def _modify(rng, kind: str, flux: np.ndarray, labels: np.ndarray, emu, step: int, wl):
    """The spectral outlier sets: a binary's second star, an injected line, a bump."""
    n = len(flux)
    if kind == "binary":
        second = population(rng, n)
        second[:, 0] = np.minimum(labels[:, 0], second[:, 0])
        second[:, 1] = 4.65 - 0.00022 * (second[:, 0] - 4700)
        f2 = emu(second)[:, ::step]
        v = rng.uniform(25, 70, n) * rng.choice([-1, 1], n)
        shifted = np.stack([np.interp(wl, wl * (1 + v[i] / 3e5), f2[i]) for i in range(n)])
        w = ((second[:, 0] / labels[:, 0]) ** 4 * 0.8)[:, None]  # light ratio
        return (flux + w * shifted) / (1 + w)
    if kind == "unknown_line":
        centre, depth = rng.uniform(wl[5], wl[-5], n), rng.uniform(0.08, 0.25, n)
        return flux * (1 - depth[:, None] * np.exp(-0.5 * ((wl - centre[:, None]) / 0.6) ** 2))
    if kind == "bump":
        centre = rng.uniform(wl[0], wl[-1], n)
        amp = rng.uniform(0.02, 0.05, n) * rng.choice([-1, 1], n)
        return flux + amp[:, None] * np.exp(-0.5 * ((wl - centre[:, None]) / 20.0) ** 2)
    return flux


def write_set(
    rng, out: Path, name: str, n: int, emu, step: int, shards: int = 1,
    snr_range: tuple[float, float] = (50.0, 500.0),
) -> None:  # fmt: skip
    mask = np.load(SHARED / "apogee_mask.npz")["apogee_mask"][::step]
    wl = np.load(SHARED / "apogee_wavelength.npz")["wavelength"][::step]
    kind = "inlier" if name in ("train", "test") else name
    labels = population(rng, n, kind)
    flux = _modify(rng, kind, emu(labels)[:, ::step], labels, emu, step, wl)
    snr = np.exp(rng.uniform(*np.log(snr_range), n))
    ivar = np.broadcast_to(snr[:, None] ** 2, flux.shape).copy()
    noisy = flux + rng.standard_normal(flux.shape) / snr[:, None]
    ivar[:, mask] = 0.0
    for i in np.flatnonzero(rng.random(n) < 0.3):
        a = rng.integers(0, len(wl) - 40)
        ivar[i, a : a + rng.integers(5, 40)] = 0.0
    noisy[ivar == 0] = 1.0
    obs = labels[:, :3] + rng.normal(0, 1, (n, 3)) * [50, 0.1, 0.05]
    if kind == "wrong_labels":
        obs[:, 0] += rng.choice([-1, 1], n) * 400
    tables = [
        make_table([f"{name}-{i}" for i in idx], noisy[idx], ivar[idx], teff=obs[idx, 0],
                   logg=obs[idx, 1], feh=obs[idx, 2], snr=snr[idx], source="payne2018",
                   extra={"truth_mgfe": labels[idx, 3], "truth_vmacro": labels[idx, 4]})
        for idx in np.array_split(np.arange(n), shards)
    ]  # fmt: skip
    grid = grid_from_wavelength(wl, f"payne-aspcap-step{step}")
    write_dataset(out / name, tables, shards, grid, {"name": "bench_payne", "kind": kind})


def evaluate(scores_dir: Path) -> dict:
    t = pads.dataset(scores_dir, format="parquet").to_table().to_pandas()
    t["set"] = t["id"].str.rsplit("-", n=1).str[0]
    inl = t[t.set == "test"]
    out: dict = {"rows": len(t), "non_finite_percentiles": int(t["percentile"].isna().sum())}
    for col in SCORES:
        p = inl[PERCENTILE_OF[col]].to_numpy()
        quart = np.quantile(inl["snr"], [0.25, 0.5, 0.75])
        bins = np.digitize(inl["snr"], quart)
        out[col] = {"inlier_mean": round(float(p.mean()), 1),
                    "inlier_below_1": round(float((p < 1).mean()), 3),
                    "inlier_below_5": round(float((p < 5).mean()), 3),
                    "mean_per_snr_quartile": [round(float(p[bins == b].mean()), 1)
                                              for b in range(4)]}  # fmt: skip
    for name in SETS:
        o = t[t.set == name]
        low = o[o["percentile"] < 5]["strongest_test"]
        out[name] = {c: round(auroc(inl[c].to_numpy(), o[c].to_numpy()), 3) for c in SCORES}
        out[name]["strongest_test_below_5"] = dict(collections.Counter(low).most_common(3))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="mendis_out/payne")
    p.add_argument("--n-train", type=int, default=8000)
    p.add_argument("--step", type=int, default=3, help="every step-th ASPCAP pixel (3: 2,405)")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument(
        "--train-snr",
        type=float,
        nargs=2,
        default=(50.0, 500.0),
        metavar=("LO", "HI"),
        help="S/N range of the training set (log-uniform)",
    )
    args = p.parse_args()
    if not EMULATOR.exists():
        sys.exit(f"bench_payne: needs {SHARED} (the shared reference data)")
    out, t0 = Path(args.out), time.perf_counter()
    rng, emu = (
        np.random.default_rng(args.seed),
        load_emulator(SHARED / "NN_normalized_spectra_2018.npz"),
    )
    for name, n in (("train", args.n_train), ("test", 1000), *((s, 300) for s in SETS)):
        train = name == "train"
        write_set(rng, out / "data", name, n, emu, args.step, shards=4 if train else 1,
                  snr_range=tuple(args.train_snr) if train else (50.0, 500.0))  # fmt: skip
    timings = {"simulate_s": round(time.perf_counter() - t0, 1)}

    def cli(*argv: str, key: str) -> None:
        t = time.perf_counter()
        subprocess.run(["mendis", *argv], check=True, stdout=subprocess.DEVNULL)
        timings[key] = round(time.perf_counter() - t, 1)

    cli("train", str(out / "data" / "train"), "--out", str(out / "run"), "--quiet", key="train_s")
    sets = [str(out / "data" / s) for s in ("test", *SETS)]
    cli("score", str(out / "run" / "checkpoint"), *sets, "--out", str(out / "scores"),
        key="score_s")  # fmt: skip
    result = {"args": vars(args), "timings": timings, **evaluate(out / "scores" / "scores")}
    print(f"{'set':14s} " + " ".join(f"{c:>15s}" for c in SCORES) + "  strongest test (< pct 5)")
    for name in SETS:
        r = result[name]
        print(f"{name:14s} " + " ".join(f"{r[c]:15.3f}" for c in SCORES)
              + f"  {r['strongest_test_below_5']}")  # fmt: skip
    for c in SCORES:
        print(f"inliers {c:15s} {result[c]}")
    print(timings)
    RESULTS.mkdir(exist_ok=True)
    tag = (
        ("" if args.step == 3 else f"_step{args.step}")
        + ("" if args.n_train == 8000 else f"_n{args.n_train}")
        + (
            ""
            if tuple(args.train_snr) == (50.0, 500.0)
            else "_train_snr{:g}-{:g}".format(*args.train_snr)
        )
    )
    path = RESULTS / f"payne{tag}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
