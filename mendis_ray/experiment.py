"""The paper's experiment end to end, without Ray: train the flow on the simulated
training set, score held-out inliers and outliers against baselines, sample the
conditional p(spectrum | labels), analyse its pixel correlations, reconstruct spectra.

Each stage is a function over numpy arrays so the Ray jobs (``mendis_ray.distributed``)
and the benchmark (``bench/train_compact.py``) reuse them unchanged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mendis_ray.atomic import write_atomic
from mendis_ray.config import FlowConfig, TrainConfig
from mendis_ray.flow.density import SpectrumDensity, Standardizer
from mendis_ray.flow.gaussian_init import initialize_whitened
from mendis_ray.flow.model import MendisFlow
from mendis_ray.science.baselines import (
    FactorAnalysisBaseline,
    GaussianBaseline,
    HotellingT2,
    PCABaseline,
)
from mendis_ray.science.conditional import gaussian_conditional, mala_conditional
from mendis_ray.science.correlation import absorption_pixels, correlation_clusters, matrix_error
from mendis_ray.science.metrics import adjusted_rand_index, auroc, purity
from mendis_ray.science.ood import Scorer, fill_masked
from mendis_ray.science.reconstruct import reconstruct
from mendis_ray.spectra.degrade import LABEL_SCATTER, add_noise, scatter_labels
from mendis_ray.spectra.linelist import ELEMENTS
from mendis_ray.spectra.simulate import (
    Simulator,
    StellarLabels,
    conditional_training_labels,
    dominant_element,
    element_response,
    paper_training_labels,
)
from mendis_ray.train.loop import History, array_batches, fit

__all__ = [
    "Arrays",
    "conditional_analysis",
    "ood_table",
    "reconstruction_analysis",
    "subtle_sets",
    "train_flow",
]

log = logging.getLogger(__name__)


@dataclass
class Arrays:
    """Flux (n, n_pix), ivar (n, n_pix) and observed labels (n, 3) of one set."""

    flux: np.ndarray
    ivar: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.flux)


# ----------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    density: SpectrumDensity
    history: History
    gaussian: GaussianBaseline  # on the standardized features of the training set
    seconds: float
    start: str = "gaussian"  # which Gaussian the flow started from
    start_models: dict = field(default_factory=dict)  # name -> fitted Gaussian candidate
    start_val_log_prob: dict = field(default_factory=dict)  # name -> mean val log p


def train_flow(
    train: Arrays,
    flow_cfg: FlowConfig,
    train_cfg: TrainConfig,
    grid: dict,
    *,
    val_fraction: float = 0.1,
    whiten: bool = True,
    n_factors: int = 20,
    time_limit_s: float | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Standardize, initialise and train the flow with the no-Ray loop; the last
    ``val_fraction`` of ``train`` is the validation set (rows must be in random order, as
    the simulator writes them; shuffle ordered catalogs first).

    With ``whiten`` the flow starts at the better, on the validation set, of two Gaussians
    fitted to the training rows: the Ledoit-Wolf shrunk full covariance and factor analysis
    with ``n_factors`` factors (``mendis_ray.flow.gaussian_init``); training then only has
    to learn what is not Gaussian, and early stopping keeps the start if nothing helps."""
    t0 = time.perf_counter()
    torch.manual_seed(train_cfg.seed)
    n_val = max(1, round(val_fraction * len(train)))
    fit_rows = slice(0, len(train) - n_val)
    std = Standardizer.fit(train.flux[fit_rows], train.labels[fit_rows])
    x_all = std.transform(train.flux, train.labels)  # (n, d) float32
    x_tr = torch.from_numpy(x_all[fit_rows])
    x_val = torch.from_numpy(x_all[len(train) - n_val :])
    gauss = GaussianBaseline().fit(x_all[fit_rows])
    flow = MendisFlow(flow_cfg, seed=train_cfg.seed)
    init_batch = x_tr if whiten else x_tr[: min(len(x_tr), 4096)]
    starts: dict[str, GaussianBaseline] = {}
    start_ll: dict[str, float] = {}
    start = "none"
    if whiten:
        starts = {"gaussian": gauss}
        if 0 < n_factors < x_all.shape[1]:
            starts[f"factor{n_factors}"] = FactorAnalysisBaseline(n_factors).fit(x_all[fit_rows])
        xv64 = x_val.numpy().astype(np.float64)
        start_ll = {k: float(np.mean(m.log_prob(xv64))) for k, m in starts.items()}
        start = max(start_ll, key=start_ll.__getitem__)
        log.info(
            "flow starts at %s (validation log p: %s)",
            start, ", ".join(f"{k} {v:.1f}" for k, v in start_ll.items()),
        )  # fmt: skip
        initialize_whitened(flow, init_batch, starts[start].covariance_)
    else:
        flow.initialize(init_batch)
    gen = torch.Generator().manual_seed(train_cfg.seed)
    hist = fit(
        flow,
        lambda epoch: array_batches(x_tr, train_cfg.batch_size, generator=gen),
        lambda: array_batches(x_val, 1024, shuffle=False),
        train_cfg,
        show_progress=show_progress,
        time_limit_s=time_limit_s,
    )
    flow.eval()
    density = SpectrumDensity(flow, std, flow_cfg, grid)
    return TrainResult(density, hist, gauss, time.perf_counter() - t0, start, starts, start_ll)


# ----------------------------------------------------------------------------- OOD


def subtle_sets(
    sim: Simulator, n: int, seed: int = 1, element: str = "Mg", edge: tuple = (0.075, 0.125)
) -> dict[str, Arrays]:
    """Hard cases for likelihood OOD, simulated in memory:

    ``inliers`` -- training-distribution stars at S/N 300; ``inliers_snr1000`` -- the same
    stars (same labels) at S/N 1000; ``<element>_edge`` -- training-distribution stars with
    [element/H] uniform in ``edge``, just above the training range (-0.1..0.05), S/N 300.
    """
    rng = np.random.default_rng(seed)
    lab = paper_training_labels(n, rng)
    clean = sim(lab)
    obs = scatter_labels(np.stack([lab.teff, lab.logg, lab.feh], 1), rng, LABEL_SCATTER)
    f300, i300 = add_noise(clean, 300.0, rng)
    f1000, i1000 = add_noise(clean, 1000.0, rng)
    lab_e = paper_training_labels(n, rng)
    x = lab_e.x_h.copy()
    x[:, ELEMENTS.index(element)] = rng.uniform(*edge, size=n)
    lab_e = StellarLabels(lab_e.teff, lab_e.logg, x, lab_e.vmacro, lab_e.vsini)
    fe, ie = add_noise(sim(lab_e), 300.0, rng)
    obs_e = scatter_labels(np.stack([lab_e.teff, lab_e.logg, lab_e.feh], 1), rng, LABEL_SCATTER)
    return {
        "inliers": Arrays(f300, i300, obs.astype(np.float32)),
        "inliers_snr1000": Arrays(f1000, i1000, obs.astype(np.float32)),
        f"{element.lower()}_edge": Arrays(fe, ie, obs_e.astype(np.float32)),
    }


def baseline_scores(
    std: Standardizer,
    train: Arrays,
    n_t2: tuple[int, ...] = (5,),
    n_pca: int = 20,
    fitted: dict[str, object] | None = None,
) -> dict[str, object]:
    """Fitted baselines on the standardized training features, by score name; models in
    ``fitted`` (e.g. ``TrainResult.start_models``) are used as they are, not refitted."""
    x = std.transform(train.flux, train.labels).astype(np.float64)
    models: dict[str, object] = dict(fitted or {})
    if "gaussian" not in models:
        models["gaussian"] = GaussianBaseline().fit(x)
    models[f"pca{n_pca}"] = PCABaseline(n_pca).fit(x)
    for k in n_t2:
        models[f"t2_{k}"] = HotellingT2(k).fit(x)
    return models


def ood_table(
    scorer: Scorer,
    baselines: dict[str, object],
    sets: dict[str, Arrays],
    inlier_set: dict[str, str],
) -> tuple[list[dict], dict[str, dict[str, np.ndarray]]]:
    """AUROC of every score for every outlier set against its inlier set.

    Args:
        sets: name -> arrays (labels given).  inlier_set: outlier set name -> inlier set name.

    Returns:
        (rows: one per (outlier set, score) with the AUROC, the raw scores by set and
        score name).
    """
    std = scorer.density.standardizer
    scores: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in sets.items():
        t0 = time.perf_counter()
        out = scorer.score(arr.flux, arr.ivar, arr.labels, marginal="none")
        # the baselines see what the flow sees: masked pixels at the training mean
        flux, _ = fill_masked(arr.flux, arr.ivar, std.mean[: arr.flux.shape[1]])
        x = std.transform(flux, arr.labels).astype(np.float64)
        s = {
            "flow_log_p": out["log_p"],
            "flow_signal": out["signal_score"],
            "flow_ratio_gaussian": out["log_ratio_gaussian"],
        }
        for bname, model in baselines.items():
            s[bname] = model.score(x)  # type: ignore[attr-defined]
        scores[name] = s
        log.info("scored %s (%d spectra) in %.1f s", name, len(arr), time.perf_counter() - t0)
    rows = []
    for out_name, in_name in inlier_set.items():
        for score in scores[out_name]:
            rows.append(
                {
                    "outliers": out_name,
                    "inliers": in_name,
                    "score": score,
                    "auroc": auroc(scores[in_name][score], scores[out_name][score]),
                }
            )
    return rows, scores


def held_out_log_likelihood(
    density: SpectrumDensity, baselines: dict[str, object], test: Arrays
) -> dict[str, float]:
    """Mean log p per spectrum (standardized units, nats) of each model on ``test``."""
    std = density.standardizer
    x = std.transform(test.flux, test.labels)
    with torch.no_grad():
        lp = torch.cat(
            [density.flow.log_prob(torch.from_numpy(x[a : a + 512])) for a in range(0, len(x), 512)]
        )
    out = {"flow": float(lp.double().mean())}
    for name, model in baselines.items():
        if name.startswith("t2"):
            continue  # T^2 is a statistic, not a density over all features
        out[name] = float(np.mean(model.log_prob(x.astype(np.float64))))  # type: ignore[attr-defined]
    return out


# ----------------------------------------------------------------------------- conditional


@dataclass
class ConditionalResult:
    pixels: np.ndarray  # analysed pixels (grid indices)
    gauss_corr: np.ndarray  # (flow and true matrices: clusters.corr, true_clusters.corr)
    clusters: object  # CorrelationClusters of the flow
    true_clusters: object
    dominant: np.ndarray  # dominant element index per analysed pixel (-1: none)
    mean_flux: np.ndarray  # (n_pix,) conditional mean of the true samples
    metrics: dict


def conditional_analysis(
    density: SpectrumDensity,
    gaussian: GaussianBaseline,
    sim: Simulator,
    y0: tuple[float, float, float] = (4300.0, 2.1, 0.0),
    *,
    n_true: int = 4000,
    n_chains: int = 64,
    n_warmup: int = 300,
    n_keep: int = 150,
    threshold: float = 0.8,
    min_depth: float = 0.05,
    seed: int = 0,
) -> ConditionalResult:
    """Sample p(spectrum | labels = y0) from the flow by MALA, build the correlation graph
    over absorption pixels and score it against the simulator's truth: the correlation of
    spectra simulated from the true conditional, and each pixel's dominant element."""
    std = density.standardizer
    n_lab = density.config.n_labels
    n_pix = std.n_features - n_lab
    # Ground truth: the true conditional, simulated.
    rng = np.random.default_rng(seed)
    lab = conditional_training_labels(n_true, rng, observed=y0)
    true_flux, _ = add_noise(sim(lab), 300.0, rng)
    mean_flux = true_flux.mean(axis=0)
    pixels = absorption_pixels(mean_flux, min_depth)
    resp = element_response(
        sim,
        StellarLabels(
            np.array([y0[0]]), np.array([y0[1]]), np.zeros((1, len(ELEMENTS))),
            np.array([6.0]), np.zeros(1),
        ),
    )[0]  # fmt: skip
    dom = dominant_element(resp)[pixels]
    # Flow conditional by MALA in standardized space, preconditioned by the Gaussian's.
    y0s = (np.asarray(y0) - std.mean[n_pix:]) / std.std[n_pix:]
    mu, cov = gaussian_conditional(gaussian.covariance_, gaussian.mean_, y0s, n_lab)
    flow = density.flow
    t0 = time.perf_counter()
    draws = mala_conditional(
        lambda x: flow.log_prob(x.float()).double(),
        y0s,
        cov,
        mu,
        n_chains=n_chains,
        n_warmup=n_warmup,
        n_keep=n_keep,
        seed=seed,
    )
    mala_s = time.perf_counter() - t0
    flux_flow = draws.samples * std.std[:n_pix] + std.mean[:n_pix]  # physical units
    gen = np.random.default_rng(seed + 1)
    g = gen.multivariate_normal(mu, cov, size=len(flux_flow), method="cholesky")
    flux_gauss = g * std.std[:n_pix] + std.mean[:n_pix]
    clusters = correlation_clusters(flux_flow, pixels, threshold)
    true_cl = correlation_clusters(true_flux, pixels, threshold)
    gauss_cl = correlation_clusters(flux_gauss, pixels, threshold)
    metrics = {
        "n_pixels": int(pixels.size),
        "mala": {**draws.summary(), "seconds": mala_s},
        "flow_vs_true": matrix_error(clusters.corr, true_cl.corr),
        "gaussian_vs_true": matrix_error(gauss_cl.corr, true_cl.corr),
    }
    for name, cl in (("flow", clusters), ("gaussian", gauss_cl), ("true", true_cl)):
        metrics[f"{name}_clusters"] = {
            "n_multi": cl.n_multi(),
            "largest": int(cl.sizes[0]),
            "ari_vs_dominant_element": adjusted_rand_index(cl.labels, dom),
            "purity_vs_dominant_element": purity(cl.labels, dom),
            "ari_vs_true_clusters": adjusted_rand_index(cl.labels, true_cl.labels),
        }
    return ConditionalResult(
        pixels, gauss_cl.corr, clusters, true_cl, dom, mean_flux,
        metrics,
    )  # fmt: skip


# ----------------------------------------------------------------------------- reconstruction


def reconstruction_analysis(
    density: SpectrumDensity, test: Arrays, n: int = 8, steps: int = 300
) -> dict:
    """Reconstruct ``n`` held-out spectra (argmin_z |x - f^-1(z)|^2); RMS residual of the
    flux in physical units against the noise level (median 1/sqrt(ivar))."""
    std = density.standardizer
    n_lab = density.config.n_labels
    x = torch.from_numpy(std.transform(test.flux[:n], test.labels[:n]))
    rec = reconstruct(density.flow, x, steps=steps)
    flux_rec, _ = std.inverse(rec.x, n_lab)
    resid = test.flux[:n] - flux_rec
    noise = float(np.median(1.0 / np.sqrt(test.ivar[:n])))
    rms = np.sqrt((resid**2).mean(axis=1))
    return {
        "flux": test.flux[:n],
        "flux_rec": flux_rec,
        "rms": rms,
        "noise": noise,
        "metrics": {
            "n": n,
            "rms_median": float(np.median(rms)),
            "noise_median": noise,
            "rms_over_noise": float(np.median(rms) / noise),
            "loss_first": float(rec.history[0]),
            "loss_last": float(rec.history[-1]),
        },
    }


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Atomic ``np.savez`` (to an open file: ``np.savez`` would append ``.npz`` to a name)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    write_atomic(path, write)
