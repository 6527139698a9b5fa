"""What the survey benchmark's hardest sets allow at best, from the simulator's truth.

    python bench/bench_ceilings.py [--data mendis_out/bench_ood/data]   # after bench_ood.py

- ``unknown_line``: the AUROC of an ideal 1-pixel scan (the residual is pure noise, i.e. a
  perfect model) with each star's true line depth and pixel S/N, when the line's position
  is unknown (max |z| over all pixels) and when it is known (|z| at the line).
- ``between_alpha``: how well the signal coordinates carry [alpha/Fe]: the scatter of a
  linear estimate of the true [alpha/Fe] from the top-K signal coordinates plus the
  labels, per S/N bin, and the AUROC of a 2-D density of ([Fe/H], that estimate).
- ``between_alpha_exact``: the best the spectra allow, see :func:`alpha_exact_ceiling`.
- ``off_branch``: what the observed labels alone say: the AUROC of a kernel density of the
  standardized (Teff, log g, [Fe/H]) of the training stars, overall and per S/N bin (label
  errors grow as S/N falls, so a noisy star's offset from the branch is partly hidden);
  and the best any method can do: the population's exact density of (Teff, log g) given
  [Fe/H] (``SurveyPopulation``'s defaults, the benchmark's) at each star's *true* labels.
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


def alpha_exact_ceiling(data: Path, checkpoint: Path, seed: int = 0) -> dict:
    """The best the spectra allow: [alpha/Fe] measured with each star's own precision,
    1 / sqrt(sum a^2 ivar) with a = d flux / d[alpha/Fe] (the sum of the six alpha
    elements' templates of the checkpoint's element tests; degeneracies with the other
    labels ignored, so an upper bound), plus the elements' own scatter (0.02 dex each, six
    averaged), ranked by the population's exact density of ([Fe/H], [alpha/Fe]) at the
    true [Fe/H]."""
    from scipy.stats import norm, truncnorm

    from mendis_ray.science.signal_scores import load_scorer
    from mendis_ray.spectra.linelist import ELEMENTS
    from mendis_ray.spectra.population import SurveyPopulation

    ref, pop = load_scorer(checkpoint).ref, SurveyPopulation()
    names = [ELEMENTS[int(i)] for i in np.ravel(ref["elements.index"])]
    a = sum(ref["elements.templates"][names.index(e)] for e in ("O", "Mg", "Si", "S", "Ca", "Ti"))
    rng, out = np.random.default_rng(seed), {}

    def log_density(feh, alpha, err):
        low, high = pop.alpha_sequences(feh)
        sd = np.hypot(pop.alpha_scatter, err)
        cut = lambda p: truncnorm.pdf(feh, (p[2] - p[0]) / p[1], (p[3] - p[0]) / p[1], p[0], p[1])  # noqa: E731
        thin = pop.thin_weight * cut(pop.thin_feh) * norm.pdf(alpha, low, sd)
        return np.log(thin + (1 - pop.thin_weight) * cut(pop.thick_feh) * norm.pdf(alpha, high, sd))

    for name in ("test", "between_alpha"):
        t = read_dataset(data / name)
        ivar = table_arrays(t).ivar.astype(np.float64)
        spectral = 1 / np.sqrt((a[None] ** 2 * ivar).sum(1))  # (n,) dex
        err = np.hypot(spectral, pop.alpha_element_scatter / 6**0.5)
        alpha = t.column("truth_alpha_fe").to_numpy() + err * rng.standard_normal(len(err))
        out[name] = (log_density(t.column("truth_fe_h").to_numpy(), alpha, err), err)
    return {
        "alpha_error_quartiles": np.quantile(out["test"][1], [0.25, 0.5, 0.75]).round(4).tolist(),
        "auroc": auroc(out["test"][0], out["between_alpha"][0]),
    }  # fmt: skip


def branch_ceiling(data: Path, n_fit: int = 10_000) -> dict:
    t = {n: table_arrays(read_dataset(data / n)) for n in ("train", "test", "off_branch")}
    sd = t["train"].labels.std(0)
    kde = gaussian_kde((t["train"].labels[:n_fit] / sd).T, bw_method=0.2)
    lp = {n: kde.logpdf((a.labels / sd).T) for n, a in t.items()}
    by_bin = []
    for lo, hi in SNR_BINS:
        te, ob = (((t[n].snr >= lo) & (t[n].snr < hi)) for n in ("test", "off_branch"))
        by_bin.append(round(auroc(lp["test"][te], lp["off_branch"][ob]), 3))
    exact = {n: _branch_log_density(read_dataset(data / n)) for n in ("test", "off_branch")}
    return {
        "labels_kde_auroc": auroc(lp["test"], lp["off_branch"]), "by_snr_bin": by_bin,
        "true_labels_exact_density_auroc": auroc(exact["test"], exact["off_branch"]),
    }  # fmt: skip


def _branch_log_density(table) -> np.ndarray:
    """log p(Teff, log g | [Fe/H]) (n,) of the survey population (giant branch + clump) at
    the stars' true labels (the ``truth_*`` columns)."""
    from scipy.stats import norm, truncnorm

    from mendis_ray.spectra.population import SurveyPopulation

    pop = SurveyPopulation()
    teff, logg, feh = (table.column(f"truth_{c}").to_numpy() for c in ("teff", "logg", "fe_h"))
    lo, hi = pop.logg_range
    u = np.clip((logg - lo) / (hi - lo), 1e-12, 1.0)  # log g = lo + (hi - lo) u^0.7
    p_rgb = np.where((logg > lo) & (logg < hi), u ** (1 / 0.7 - 1) / (0.7 * (hi - lo)), 0.0)
    # the clump's log g: N(2.45, 0.06) clipped to [2.3, 2.65] (SurveyPopulation.sample_giants;
    # the clip's point masses at the ends, 0.6% of the clump, are taken as a truncation)
    p_rc = truncnorm.pdf(logg, (2.3 - 2.45) / 0.06, (2.65 - 2.45) / 0.06, 2.45, 0.06)
    s = pop.branch_scatter
    rgb = (1 - pop.clump_weight) * p_rgb * norm.pdf(teff, pop.branch_teff(logg, feh), s)
    clump = pop.clump_weight * p_rc * norm.pdf(teff, pop.clump_teff(feh), s)
    return np.log(rgb + clump + 1e-300)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="mendis_out/bench_ood/data")
    help_ckpt = "signal-space checkpoint with element tests (bench_ood.py --save-signal)"
    p.add_argument("--checkpoint", default="mendis_out/bench_ood/signal", help=help_ckpt)
    args = p.parse_args()
    data = Path(args.data)
    res = {
        "unknown_line": line_ceiling(data),
        "between_alpha": alpha_ceiling(data),
        "between_alpha_exact": alpha_exact_ceiling(data, Path(args.checkpoint)),
        "off_branch": branch_ceiling(data),
    }
    print(json.dumps(res, indent=1))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ceilings.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
