"""The out-of-distribution benchmark every model is judged on (``bench/bench_ood.py``).

One training set, one held-out inlier set (``test``), the survey outlier sets and the
S/N pair (the same stars at S/N 300 and 1000).  Every model is fitted on the same training
rows and scored on the same sets; the table holds, per model and score:

* held-out mean log p (density models; physical units, on the test stars without masked
  pixels so that every model scores the same pixels),
* AUROC of every outlier set against the test inliers (1 = perfect, 0.5 = blind; "higher
  score = more typical" throughout), and of S/N 1000 against S/N 300 (0.5 = no S/N artefact),
* S/N calibration: the test inliers' percentiles against the model's held-out reference,
  binned by S/N (50-100, 100-200, 200-500, 500-1000); ``calib`` is the largest distance,
  in percentile points, between a bin's distribution and the uniform one (Kolmogorov;
  includes sampling noise of about 136 / sqrt(stars in the bin)), ``calib_mean`` the
  largest distance of a bin's mean percentile from 50,
* seconds to train and spectra per second to score.

Baselines: Ledoit-Wolf Gaussian, factor analysis (20 factors), PPCA (20 components),
Hotelling T^2 and SPE (5 components), k-nearest-neighbour distance in the whitened top-5
principal components plus labels, and a deliberately wrong diagonal Gaussian that a sound
benchmark must rank clearly worse.  Baselines see the standardized (spectrum, labels)
vector with masked pixels filled by the training mean.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mendis_ray.science.baselines import (
    FactorAnalysisBaseline,
    GaussianBaseline,
    HotellingT2,
    PCABaseline,
)
from mendis_ray.science.metrics import auroc, percentile_rank
from mendis_ray.science.ood import fill_masked
from mendis_ray.spectra.shards import SpectraArrays

__all__ = ["SNR_BINS", "BenchData", "ModelRun", "baseline_runs", "calibration", "evaluate"]

log = logging.getLogger(__name__)

SNR_BINS = ((50.0, 100.0), (100.0, 200.0), (200.0, 500.0), (500.0, 1000.0 + 1e-6))
PAIR = ("snr300", "snr1000")


@dataclass
class BenchData:
    """The arrays of a benchmark run: training rows, held-out inliers, other sets."""

    train: SpectraArrays
    test: SpectraArrays
    sets: dict[str, SpectraArrays]
    grid: dict = field(default_factory=dict)  # the shards' grid (element tests need it)


@dataclass
class ModelRun:
    """One fitted model: its scores per set (name -> score -> (n,)), reference scores
    (held-out training stars) and timings."""

    name: str
    scores: dict[str, dict[str, np.ndarray]]
    reference: dict[str, np.ndarray]
    log_p: dict[str, np.ndarray] = field(default_factory=dict)  # density models only
    train_seconds: float = 0.0
    spectra_per_s: float = 0.0
    extra: dict = field(default_factory=dict)  # model-specific (history, scorer, k)
    # the held-out inliers' percentiles as the model reports them (score -> (n,)); absent:
    # their rank among ``reference`` (what the baselines and the full flow report)
    test_percentiles: dict[str, np.ndarray] = field(default_factory=dict)


def fill(a: SpectraArrays, mean: np.ndarray) -> np.ndarray:
    """Flux with masked pixels replaced by the training mean (:func:`fill_masked`)."""
    return fill_masked(np.asarray(a.flux, np.float64), a.ivar, mean)[0]


def _standardize(a: SpectraArrays, mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
    v = np.concatenate([fill(a, mu[:-3]), np.asarray(a.labels, np.float64)], axis=1)
    return (v - mu) / sd


class _KNN:
    """Distance to the k-th nearest training star in whitened top PCs + labels."""

    def __init__(self, n_components: int = 5, k: int = 10, n_ref: int = 5000) -> None:
        self.n_components, self.k, self.n_ref = n_components, k, n_ref

    def fit(self, x: np.ndarray) -> _KNN:
        pca = HotellingT2(self.n_components).fit(x[:, :-3])
        self.pca = pca
        self.ref = self._features(x[: self.n_ref])
        return self

    def _features(self, x: np.ndarray) -> np.ndarray:
        c = self.pca.transform(x[:, :-3]) / np.sqrt(self.pca.explained_variance_)
        return np.concatenate([c, x[:, -3:]], axis=1)

    def score(self, x: np.ndarray) -> np.ndarray:
        f = self._features(x)
        out = np.empty(len(f))
        for a in range(0, len(f), 512):
            d = ((f[a : a + 512, None, :] - self.ref[None]) ** 2).sum(-1)
            out[a : a + 512] = -np.sqrt(np.partition(d, self.k, axis=1)[:, self.k])
        return out


def baseline_runs(
    data: BenchData, val_fraction: float = 0.1, only: tuple[str, ...] | None = None
) -> list[ModelRun]:
    """Fit every baseline (or those named in ``only``) on the training rows (the last
    ``val_fraction`` are their reference) and score every set."""
    tr = data.train
    n_ref = max(2, round(val_fraction * len(tr.flux)))
    fit_rows, ref_rows = slice(0, len(tr.flux) - n_ref), slice(len(tr.flux) - n_ref, None)
    good = tr.ivar[fit_rows] > 0
    mean = np.where(good, tr.flux[fit_rows], 0).sum(0) / np.maximum(good.sum(0), 1)
    v = np.concatenate([np.where(good, tr.flux[fit_rows], mean), tr.labels[fit_rows]], axis=1)
    mu, sd = v.mean(0), np.maximum(v.std(0), 1e-6)
    x_fit = (v - mu) / sd
    log_jac = -float(np.log(sd).sum())
    x_ref = _standardize(_rows(tr, ref_rows), mu, sd)
    models: dict[str, Callable[[], object]] = {
        "gaussian-lw": lambda: GaussianBaseline().fit(x_fit),
        "factor-analysis-20": lambda: FactorAnalysisBaseline(20).fit(x_fit),
        "ppca-20": lambda: PCABaseline(20).fit(x_fit),
        "hotelling-t2-5": lambda: HotellingT2(5).fit(x_fit),
        "knn-5pc": lambda: _KNN().fit(x_fit),
        "diag-gaussian (wrong on purpose)": lambda: _DiagGaussian().fit(x_fit),
    }
    runs = []
    for name, make in models.items():
        if only is not None and name not in only:
            continue
        t0 = time.perf_counter()
        model = make()
        dt = time.perf_counter() - t0
        log.info("baseline %s fitted in %.1f s", name, dt)
        score_fns = {"score": model.score}
        if isinstance(model, HotellingT2):
            score_fns["spe"] = lambda x, m=model: -m.spe(x)
        sets = {"test": data.test, **data.sets}
        t1 = time.perf_counter()
        xs = {k: _standardize(a, mu, sd) for k, a in sets.items()}
        scores = {k: {s: f(x) for s, f in score_fns.items()} for k, x in xs.items()}
        n_scored = sum(len(x) for x in xs.values())
        rate = n_scored / max(time.perf_counter() - t1, 1e-9)
        ref = {s: f(x_ref) for s, f in score_fns.items()}
        dens = hasattr(model, "log_prob") and not isinstance(model, (HotellingT2, _KNN))
        log_p = {k: model.log_prob(x) + log_jac for k, x in xs.items()} if dens else {}
        runs.append(ModelRun(name, scores, ref, log_p, dt, rate))
    return runs


class _DiagGaussian:
    """Independent Gaussian per feature: ignores every correlation between pixels."""

    def fit(self, x: np.ndarray) -> _DiagGaussian:
        self.mean, self.var = x.mean(0), np.maximum(x.var(0), 1e-12)
        return self

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        d = (x - self.mean) ** 2 / self.var
        return -0.5 * (d.sum(1) + np.log(2 * np.pi * self.var).sum())

    def score(self, x: np.ndarray) -> np.ndarray:
        return self.log_prob(x)


def _rows(a: SpectraArrays, rows: slice) -> SpectraArrays:
    return SpectraArrays(a.ids[rows], a.flux[rows], a.ivar[rows], a.labels[rows], a.snr[rows])


def calibration(pct: np.ndarray, snr: np.ndarray) -> dict:
    """Per S/N bin, the inliers' percentiles ``pct`` (n,) (the ones the model reports):
    the Kolmogorov distance from the uniform distribution (percentile points; with m stars
    in a bin its 95% sampling noise alone is about 136 / sqrt(m)) and the distance of the
    bin's mean percentile from 50 (noise about 29 / sqrt(m)); ``max`` and ``max_mean``
    over bins."""
    out, means = {}, {}
    for lo, hi in SNR_BINS:
        m = (snr >= lo) & (snr < hi)
        if m.sum() < 20:
            continue
        p = np.sort(pct[m]) / 100.0
        n = len(p)
        ks = max(np.max(np.arange(1, n + 1) / n - p), np.max(p - np.arange(n) / n))
        key = f"{lo:g}-{min(hi, 1000):g}"
        out[key] = round(100.0 * float(ks), 1)
        means[key] = round(float(np.mean(pct[m])) - 50.0, 1)
    out["max"] = max(out.values()) if out else float("nan")
    out["max_mean"] = max(abs(v) for v in means.values()) if means else float("nan")
    out["mean_minus_50"] = means
    return out


def evaluate(runs: list[ModelRun], data: BenchData) -> list[dict]:
    """One row per (model, score): held-out log p, AUROCs, S/N AUROC, calibration, speed."""
    rows = []
    no_mask = (data.test.ivar > 0).all(axis=1)
    for run in runs:
        for score in run.reference:
            inl = run.scores["test"][score]
            row: dict = {"model": run.name, "score": score}
            lp = run.log_p.get("test")
            row["heldout_log_p"] = float(np.mean(lp[no_mask])) if lp is not None else None
            for name in data.sets:
                if name in PAIR:
                    continue
                row[name] = round(auroc(inl, run.scores[name][score]), 3)
            if all(p in data.sets for p in PAIR):
                s300, s1000 = (run.scores[p][score] for p in PAIR)
                row["snr1000_vs_300"] = round(auroc(s300, s1000), 3)
            pct = run.test_percentiles.get(score)
            if pct is None:  # the rank among the finite reference scores
                ref = run.reference[score]
                pct = percentile_rank(ref[np.isfinite(ref)], inl)
            cal = calibration(pct, data.test.snr)
            row["calib"], row["calib_mean"] = cal["max"], cal["max_mean"]
            row["train_s"] = round(run.train_seconds, 1)
            row["spectra_per_s"] = round(run.spectra_per_s)
            rows.append(row)
    return rows


def signal_run(data: BenchData, cfg=None, time_limit_s: float | None = None) -> ModelRun:
    """Train the signal-space model on the training rows (its last 10% validate and are
    the scorer's reference) and score every set with its three scores."""
    from mendis_ray.science.signal_scores import PERCENTILE_OF, SignalScorer
    from mendis_ray.train.signal import train_signal_model

    tr = data.train
    t0 = time.perf_counter()
    res = train_signal_model(
        tr.flux, tr.ivar, tr.labels, cfg, time_limit_s=time_limit_s, show_progress=False
    )
    va = res.val_rows
    scorer = SignalScorer.fit(
        res.model, tr.flux[va], tr.ivar[va], tr.labels[va], res.train_coords, grid=data.grid,
        train=(tr.flux[: va.start], tr.ivar[: va.start], tr.labels[: va.start]),
        far_iqr=res.model.cfg.far_iqr,
    )  # fmt: skip
    dt = time.perf_counter() - t0
    keys = ("score", "signal_score", "residual_score")
    ref = {k: scorer.ref[f"sorted.{k}"] for k in keys}
    scores, log_p, pct = {}, {}, {}
    t1 = time.perf_counter()
    n = 0
    for name, a in {"test": data.test, **data.sets}.items():
        out = scorer.score(a.flux, a.ivar, a.labels)
        scores[name] = {k: out[k] for k in keys}
        log_p[name] = out["log_p"]
        if name == "test":  # the percentile columns a user reads
            pct = {k: out[PERCENTILE_OF[k]] for k in keys}
        n += len(a.flux)
    rate = n / max(time.perf_counter() - t1, 1e-9)
    name = f"signal-space flow (k={res.model.basis.k})"
    extra = {"history": res.history, "scorer": scorer, "k": res.model.basis.k,
             "steps": res.steps, "train_result": res}  # fmt: skip
    return ModelRun(name, scores, ref, log_p, dt, rate, extra, test_percentiles=pct)


def flow_run(data: BenchData, preset: str = "compact", time_limit_s: float = 300.0) -> ModelRun:
    """The full-space Mendis flow (a preset of :mod:`mendis_ray.config`) trained with a time
    limit; scores: its log p (labels given) and its projected ``signal_score``."""
    from mendis_ray.config import get_preset
    from mendis_ray.experiment import Arrays, train_flow
    from mendis_ray.science.ood import Scorer

    tr = data.train
    flow_cfg, train_cfg = get_preset(preset)
    mean = np.where(tr.ivar > 0, tr.flux, 0).sum(0) / np.maximum((tr.ivar > 0).sum(0), 1)
    arrays = Arrays(fill(tr, mean).astype(np.float32), tr.ivar, tr.labels.astype(np.float32))
    t0 = time.perf_counter()
    res = train_flow(arrays, flow_cfg, train_cfg, {}, time_limit_s=time_limit_s,
                     show_progress=False)  # fmt: skip
    n_val = max(1, round(0.1 * len(tr.flux)))
    scorer = Scorer.fit(res.density, arrays.flux[-n_val:], arrays.labels[-n_val:], n_marginal=0,
                        gaussian=res.gaussian)  # fmt: skip
    dt = time.perf_counter() - t0
    ref = {"log_p": scorer.reference.ref_log_p, "signal_score": scorer.reference.ref_signal}
    scores, log_p = {}, {}
    t1 = time.perf_counter()
    n = 0
    for name, a in {"test": data.test, **data.sets}.items():
        out = scorer.score(fill(a, mean), None, a.labels, marginal="none")
        scores[name] = {"log_p": out["log_p"], "signal_score": out["signal_score"]}
        log_p[name] = out["log_p"]
        n += len(a.flux)
    rate = n / max(time.perf_counter() - t1, 1e-9)
    return ModelRun(f"full-space flow ({preset})", scores, ref, log_p, dt, rate)
