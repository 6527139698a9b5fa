"""What the survey benchmark's hardest sets allow at best, from the simulator's truth.

    python bench/bench_ceilings.py [--data mendis_out/bench_ood/data]   # after bench_ood.py

- ``unknown_line``: the AUROC of an ideal 1-pixel scan (the residual is pure noise, i.e. a
  perfect model) with each star's true line depth and pixel S/N, when the line's position
  is unknown (max |z| over all pixels) and when it is known (|z| at the line).
- ``between_alpha``: how well the signal coordinates carry [alpha/Fe]: the scatter of a
  linear estimate of the true [alpha/Fe] from the top-K signal coordinates plus the
  labels, per S/N bin, and the AUROC of a 2-D density of ([Fe/H], that estimate).
- ``off_branch``: what the observed labels alone say: the AUROC of a kernel density of the
  standardized (Teff, log g, [Fe/H]) of the training stars, overall and per S/N bin (label
  errors grow as S/N falls, so a noisy star's offset from the branch is partly hidden).
Writes ``bench/results/ceilings.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import gaussian_kde

from mendis_ray.flow.signal_basis import SignalBasis
from mendis_ray.science.metrics import auroc
from mendis_ray.spectra.shards import read_dataset, table_arrays

RESULTS = Path(__file__).resolve().parent / "results"
SNR_BINS = ((50, 100), (100, 200), (200, 500), (500, 1001))


def line_ceiling(data: Path, seed: int = 0) -> dict:
    t = read_dataset(data / "unknown_line")
    a = table_arrays(t)
    pix = np.asarray(t.column("truth_line_pixel").to_pylist(), int)
    depth = t.column("truth_size").to_numpy()
    rows = np.arange(len(pix))
    # the line removes depth x continuum; the observed flux at its core is (1 - depth) x that
    shift = depth * a.flux[rows, pix] / (1 - depth) * np.sqrt(a.ivar[rows, pix])  # (n,) sigma
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(a.flux.shape)
    z[rows, pix] -= shift
    inl = np.abs(rng.standard_normal((4000, a.flux.shape[1]))).max(axis=1)
    known = auroc(-np.abs(rng.standard_normal(4000)), -np.abs(z[rows, pix]))
    return {"scan_unknown_position": auroc(-inl, -np.abs(z).max(axis=1)),
            "known_position": known,
            "line_snr_quartiles": np.percentile(shift, [25, 50, 75]).round(1).tolist()}  # fmt: skip


def alpha_ceiling(data: Path, ks=(5, 10, 20)) -> dict:
    def load(name):
        t = read_dataset(data / name)
        return table_arrays(t), t.column("truth_alpha_fe").to_numpy()

    (tr, a_tr), (te, _), (ba, _) = load("train"), load("test"), load("between_alpha")
    basis = SignalBasis.fit(tr.flux, tr.ivar, max(ks))
    s = {n: basis.project(x.flux, x.ivar).s for n, x in (("tr", tr), ("te", te), ("ba", ba))}
    lab = {"tr": tr.labels, "te": te.labels, "ba": ba.labels}
    out = {}
    for k in ks:
        x = {n: np.c_[s[n][:, :k], lab[n], np.ones(len(lab[n]))] for n in s}
        coef = np.linalg.lstsq(x["tr"], a_tr, rcond=None)[0]
        est = {n: x[n] @ coef for n in x}
        err = est["tr"] - a_tr
        sd = [float(np.std(err[(tr.snr >= lo) & (tr.snr < hi)])) for lo, hi in SNR_BINS]
        pts = {n: np.c_[lab[n][:, 2], est[n]] for n in est}
        sc = pts["tr"].std(0)
        kde = gaussian_kde((pts["tr"] / sc).T, bw_method=0.1)
        au = auroc(kde.logpdf((pts["te"] / sc).T), kde.logpdf((pts["ba"] / sc).T))
        out[f"k={k}"] = {"alpha_scatter_by_snr_bin": np.round(sd, 4).tolist(), "auroc_2d": au}
    return out


def branch_ceiling(data: Path, n_fit: int = 10_000) -> dict:
    t = {n: table_arrays(read_dataset(data / n)) for n in ("train", "test", "off_branch")}
    sd = t["train"].labels.std(0)
    kde = gaussian_kde((t["train"].labels[:n_fit] / sd).T, bw_method=0.2)
    lp = {n: kde.logpdf((a.labels / sd).T) for n, a in t.items()}
    by_bin = []
    for lo, hi in SNR_BINS:
        te, ob = (((t[n].snr >= lo) & (t[n].snr < hi)) for n in ("test", "off_branch"))
        by_bin.append(round(auroc(lp["test"][te], lp["off_branch"][ob]), 3))
    return {"labels_kde_auroc": auroc(lp["test"], lp["off_branch"]), "by_snr_bin": by_bin}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="mendis_out/bench_ood/data")
    args = p.parse_args()
    data = Path(args.data)
    res = {
        "unknown_line": line_ceiling(data),
        "between_alpha": alpha_ceiling(data),
        "off_branch": branch_ceiling(data),
    }
    print(json.dumps(res, indent=1))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ceilings.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
