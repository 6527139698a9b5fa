"""``mendis demo``: the paper's experiment end to end on Ray, sized for a laptop CPU.

1. simulate: noise-free training spectra, held-out inliers and the three outlier classes
   as Parquet shards (numpy simulator, on the driver);
2. Ray Data: validate, degrade (noise to S/N 300, label scatter, fresh every epoch),
   standardize (statistics streamed once, stored in the checkpoint);
3. Ray Train: TorchTrainer with ``workers`` DDP workers from the Gaussian start;
4. scoring: held-out log-likelihood and AUROC of the flow against Gaussian, factor
   analysis, PPCA and Hotelling T^2 for every outlier class and two hard cases;
5. conditional p(spectrum | 4300 K, 2.1, 0.0) by MALA, correlation graph vs the
   simulator's truth; 6. reconstruction; 7. ``report.md`` with figures.

Defaults finish in about 10-15 minutes on a 2-core machine; ``quick=True`` is the
few-minute smoke test the test suite runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from mendis_ray import experiment as ex
from mendis_ray.atomic import write_json_atomic
from mendis_ray.config import FlowConfig, get_preset
from mendis_ray.distributed import data as D
from mendis_ray.distributed.session import ensure_ray
from mendis_ray.distributed.train import RayTrainConfig, train_distributed
from mendis_ray.flow.checkpoint import save_checkpoint
from mendis_ray.flow.density import SpectrumDensity
from mendis_ray.science import figures
from mendis_ray.science.ood import Scorer
from mendis_ray.science.report import write_report
from mendis_ray.spectra.datasets import paper_sets, write_simulated_set
from mendis_ray.spectra.simulate import Simulator

__all__ = ["DemoConfig", "analyze", "analyze_checkpoint", "run_demo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    out: str = "mendis_out/demo"
    n_train: int = 4000
    n_test: int = 1000
    n_outlier: int = 300
    n_subtle: int = 500
    shards: int = 8
    preset: str = "compact"
    epochs: int = 8
    minutes: float = 5.0  # training time limit
    lr: float = 3e-4
    linear_lr_scale: float = 0.0  # affine layers stay at the Gaussian start
    batch_size: int = 128
    workers: int = 2
    cpus_per_worker: float = 1.0
    fresh_noise: bool = True
    snr: float = 300.0
    conditional: bool = True
    n_chains: int = 32
    n_warmup: int = 150
    n_keep: int = 80
    seed: int = 0
    address: str | None = None
    quick: bool = False

    @classmethod
    def quick_config(cls, **kw: object) -> DemoConfig:
        """A few-minute run: small sets, a small flow, 2 epochs."""
        base = dict(
            n_train=600, n_test=300, n_outlier=100, n_subtle=150, shards=4, epochs=2,
            minutes=2.0, n_chains=16, n_warmup=60, n_keep=40, quick=True,
        )  # fmt: skip
        return cls(**{**base, **kw})


def _flow_config(cfg: DemoConfig) -> tuple[FlowConfig, object]:
    flow_cfg, train_cfg = get_preset(cfg.preset)
    if cfg.quick:
        flow_cfg = flow_cfg.replace(name="demo-quick", n_units=2, hidden=32)
    train_cfg = train_cfg.replace(
        lr=cfg.lr, linear_lr_scale=cfg.linear_lr_scale, epochs=cfg.epochs,
        batch_size=cfg.batch_size, patience=max(2, cfg.epochs // 3), seed=cfg.seed,
    )  # fmt: skip
    return flow_cfg, train_cfg


def _arrays(path: Path, n_pix: int, limit: int | None = None) -> ex.Arrays:
    """A set read through Ray Data (validated), as arrays on the driver."""
    ds = D.read_spectra(D.check_shards(D.list_shards(path)))
    if limit is not None:
        ds = ds.limit(limit)
    a = D.to_numpy(ds, n_pix)
    order = np.argsort(a["ids"])  # Ray Data does not promise row order
    return ex.Arrays(a["flux"][order], a["ivar"][order], a["labels"][order].astype(np.float32))


def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage; return the results dict (also written to ``results.json``)."""
    t_all = time.perf_counter()
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    fig_dir = out / "figures"
    stage: dict[str, float] = {}
    result: dict = {"started": time.strftime("%Y-%m-%d %H:%M"), "config": asdict(cfg)}

    # 1. simulate
    t0 = time.perf_counter()
    sim = Simulator()
    data = out / "data"
    specs = paper_sets(cfg.n_train, cfg.n_test, cfg.n_outlier, cfg.shards)
    for k, spec in enumerate(specs):
        noise_free = spec.name == "train"  # degraded by Ray Data, fresh every epoch
        log.info("stage 1/7: simulating %s (%d spectra)", spec.name, spec.n)
        write_simulated_set(data, spec, sim, snr=0.0 if noise_free else cfg.snr,
                            seed=cfg.seed, set_index=k)  # fmt: skip
    subtle = ex.subtle_sets(sim, cfg.n_subtle, seed=cfg.seed + 1)
    result["stage_seconds"] = stage
    stage["simulate"] = time.perf_counter() - t0

    # 2-3. Ray Data + Ray Train
    t0 = time.perf_counter()
    resources = ensure_ray(cfg.address)
    result["ray"] = {"resources": {k: v for k, v in resources.items() if k in ("CPU", "GPU")}}
    flow_cfg, train_cfg = _flow_config(cfg)
    ray_cfg = RayTrainConfig(
        num_workers=cfg.workers,
        cpus_per_worker=cfg.cpus_per_worker,
        storage_path=str(out / "ray_runs"),
        name="demo",
        degrade=D.DegradeConfig(snr=cfg.snr, fresh_noise=cfg.fresh_noise, seed=cfg.seed),
        time_limit_s=60 * cfg.minutes,
    )
    log.info("stage 2-3/7: Ray Data ingest + TorchTrainer (%d workers)", cfg.workers)
    res = train_distributed(data / "train", out, flow_cfg, train_cfg, ray_cfg)
    stage["train"] = time.perf_counter() - t0
    density = res.density
    hist = res.history
    best = max(hist, key=lambda h: h["val_log_prob"]) if hist else None
    start_val = res.start_val_log_prob.get(res.start, float("nan"))
    result["training"] = {
        "preset": flow_cfg.name,
        "n_parameters": density.flow.n_parameters(),
        "workers": cfg.workers,
        "lr": train_cfg.lr,
        "linear_lr_scale": train_cfg.linear_lr_scale,
        "batch_size": train_cfg.batch_size,
        "start": res.start,
        "start_val_log_prob": res.start_val_log_prob,
        "epochs_run": len(hist),
        "seconds": res.seconds,
        "best_epoch": best["epoch"] if best and best["val_log_prob"] > start_val else -1,
        "best_val_log_prob": max(start_val, best["val_log_prob"] if best else -np.inf),
        "samples_per_s": float(np.median([h["samples_per_s"] for h in hist])) if hist else 0.0,
        "history": hist,
    }
    result["run_dir"] = str(res.run_dir)
    figures.training_curve(
        SimpleNamespace(epochs=hist, initial_val_log_prob=start_val), fig_dir / "training.png"
    )

    result["stage_seconds"] = stage
    result = analyze(density, data, out, cfg, sim=sim, moments=res.moments, result=result,
                     subtle=subtle, fitted=res.start_models)  # fmt: skip
    result["wall_seconds"] = time.perf_counter() - t_all
    _write_outputs(out, result, cfg)
    return result


def _train_sample(data: Path, n_pix: int, cfg: DemoConfig, limit: int) -> ex.Arrays:
    """Up to ``limit`` training spectra as the model saw them: noise-free shards are
    degraded (fixed draw) to ``cfg.snr`` with label scatter, noisy ones used as they are."""
    shards = D.check_shards(D.list_shards(data / "train"))
    ds = D.read_spectra(shards).limit(limit)
    first = ds.take_batch(1, batch_format="pyarrow")
    if not np.isfinite(first.column("snr").to_numpy()).all():
        ds = D.degrade(ds, n_pix, D.DegradeConfig(snr=cfg.snr, fresh_noise=False, seed=cfg.seed))
    a = D.to_numpy(ds, n_pix)
    return ex.Arrays(a["flux"], a["ivar"], a["labels"].astype(np.float32))


def analyze(
    density: SpectrumDensity,
    data: Path,
    out: Path,
    cfg: DemoConfig,
    *,
    sim: Simulator | None = None,
    moments: D.Moments | None = None,
    result: dict | None = None,
    subtle: dict | None = None,
    fitted: dict | None = None,
) -> dict:
    """Stages 4-6 on a trained density: scores vs baselines, conditional correlations,
    reconstruction; figures under ``out/figures``.  ``data`` holds the simulated sets
    (``train``, ``test``, ``cemp``, ``rotator``, ``stripped``)."""
    result = result if result is not None else {}
    stage = result.setdefault("stage_seconds", {})
    sim = sim or Simulator()
    fig_dir = out / "figures"
    subtle = subtle if subtle is not None else ex.subtle_sets(sim, cfg.n_subtle, seed=cfg.seed + 1)
    t0 = time.perf_counter()
    log.info("stage 4/7: scoring inliers, outliers and hard cases")
    n_pix = density.config.n_pix
    train_arr, sets, ref, test = _demo_sets(data, n_pix, cfg)
    gauss, fa = _gaussians(fitted or {}, moments, density.standardizer, train_arr)
    eval_sets = {"test": test, **{k: sets[k] for k in ("cemp", "rotator", "stripped")}, **subtle}
    _score_stage(density, out, cfg, result, train_arr, ref, eval_sets, gauss, fa,
                 grid=sim.grid.describe())  # fmt: skip
    stage["score"] = time.perf_counter() - t0

    if cfg.conditional:
        t0 = time.perf_counter()
        log.info("stage 5/7: conditional p(spectrum | 4300 K, 2.1, 0.0) by MALA")
        result["conditional"] = _conditional_stage(density, gauss, sim, cfg, fig_dir)
        stage["conditional"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log.info("stage 6/7: reconstruction")
    rec = ex.reconstruction_analysis(density, test, n=8, steps=100 if cfg.quick else 200)
    result["reconstruction"] = rec["metrics"]
    figures.reconstruction(rec, sim.grid.wavelength, fig_dir / "reconstruction.png")
    stage["reconstruct"] = time.perf_counter() - t0
    result["data"] = {
        "grid": sim.grid.name, "n_pix": n_pix, "n_train": len(train_arr),
        "n_test": len(sets["test"]), "n_outlier": len(sets["cemp"]), "snr": cfg.snr,
        "fresh_noise": cfg.fresh_noise,
    }  # fmt: skip
    return result


def _demo_sets(
    data: Path, n_pix: int, cfg: DemoConfig
) -> tuple[ex.Arrays, dict[str, ex.Arrays], ex.Arrays, ex.Arrays]:
    """The training sample, the simulated sets by name, and the held-out inliers split in
    half: the scorer's reference and the test set."""
    train_arr = _train_sample(data, n_pix, cfg, min(cfg.n_train, 4000))
    sets = {name: _arrays(data / name, n_pix) for name in ("test", "cemp", "rotator", "stripped")}
    n_ref = len(sets["test"]) // 2
    t = sets["test"]
    ref = ex.Arrays(t.flux[:n_ref], t.ivar[:n_ref], t.labels[:n_ref])
    test = ex.Arrays(t.flux[n_ref:], t.ivar[n_ref:], t.labels[n_ref:])
    return train_arr, sets, ref, test


def _gaussians(fitted: dict, moments: D.Moments | None, std, train_arr: ex.Arrays) -> tuple:
    """The Gaussian (Ledoit-Wolf) and factor-analysis (20) baselines: those
    ``train_distributed`` fitted, else from the streamed training ``moments``, else from
    the training sample."""
    from mendis_ray.science.baselines import FactorAnalysisBaseline, GaussianBaseline

    if "gaussian" in fitted and "factor20" in fitted:  # fitted by train_distributed already
        return fitted["gaussian"], fitted["factor20"]
    if moments is not None:  # the statistics of the whole training set, streamed
        m_args = (moments.mean, moments.cov, moments.n)
        gauss = GaussianBaseline().fit_moments(*m_args, moments.norm4)
        return gauss, FactorAnalysisBaseline(20).fit_moments(*m_args)
    # from the training sample
    x = std.transform(train_arr.flux, train_arr.labels).astype(np.float64)
    return GaussianBaseline().fit(x), FactorAnalysisBaseline(20).fit(x)


def _score_stage(
    density: SpectrumDensity, out: Path, cfg: DemoConfig, result: dict, train_arr: ex.Arrays,
    ref: ex.Arrays, eval_sets: dict[str, ex.Arrays], gauss, fa, grid: dict | None = None,
) -> None:  # fmt: skip
    """Stage 4 (into ``result``): held-out log-likelihoods, the AUROC table of the flow,
    the baselines and the signal-space model (on ``grid``), the score figure and the
    checkpoint."""
    std = density.standardizer
    baselines = ex.baseline_scores(std, train_arr, n_t2=(5,), n_pca=20,
                                   fitted={"gaussian": gauss, "factor20": fa})  # fmt: skip
    result["held_out_log_likelihood"] = ex.held_out_log_likelihood(
        density, baselines, eval_sets["test"]
    )
    scorer = Scorer.fit(
        density, ref.flux, ref.labels, n_signal="auto", n_marginal=0, gaussian=gauss,
        basis_flux=train_arr.flux, basis_labels=train_arr.labels,
    )  # fmt: skip
    pairs = {
        "cemp": "test", "rotator": "test", "stripped": "test",
        "mg_edge": "inliers", "inliers_snr1000": "inliers",
    }  # fmt: skip
    rows, scores = ex.ood_table(scorer, baselines, eval_sets, pairs)
    result["signal_model"] = _signal_model(train_arr, eval_sets, pairs, out, rows, scores,
                                           epochs=20 if cfg.quick else 200,
                                           grid=grid)  # fmt: skip
    lp = result["signal_model"].pop("test_log_p")
    result["held_out_log_likelihood"]["signal_model (given noise)"] = lp - std.log_abs_det
    result["auroc"] = rows
    figures.score_histograms(scores, pairs, out / "figures" / "scores.png")
    ckpt = save_checkpoint(
        out / "checkpoint", density, None,
        metrics={"held_out_log_likelihood": result["held_out_log_likelihood"],
                 **({"training": {k: v for k, v in result["training"].items() if k != "history"}}
                    if "training" in result else {})},
        extra={"demo": True},
        extra_arrays=scorer.checkpoint_arrays(),
    )  # fmt: skip
    result["checkpoint"] = str(ckpt)


def _conditional_stage(
    density: SpectrumDensity, gauss, sim: Simulator, cfg: DemoConfig, fig_dir: Path
) -> dict:
    """Stage 5: the conditional's pixel correlations by MALA against the simulator's true
    conditional (their metrics) and the correlation figure."""
    cond = ex.conditional_analysis(
        density, gauss, sim, n_true=1000 if cfg.quick else 3000, n_chains=cfg.n_chains,
        n_warmup=cfg.n_warmup, n_keep=cfg.n_keep, seed=cfg.seed,
    )  # fmt: skip
    figures.correlation_panels(cond, sim.grid.wavelength, fig_dir / "correlation.png")
    return cond.metrics


def _signal_model(train: ex.Arrays, sets: dict, pairs: dict, out: Path, rows: list,
                  scores: dict, epochs: int = 200, grid: dict | None = None) -> dict:  # fmt: skip
    """Stage 4b: the signal-space model on the same training spectra (on ``grid``: recorded
    in the checkpoint, and the element tests need it), its AUROC rows (appended to
    ``rows``, scores to ``scores``) and checkpoint; which model to recommend."""
    from mendis_ray.config import SignalConfig
    from mendis_ray.science.metrics import auroc
    from mendis_ray.science.signal_scores import SignalScorer
    from mendis_ray.train.signal import train_signal_model

    log.info("stage 4b/7: the signal-space model on the same training spectra")
    t0 = time.perf_counter()
    cfg = SignalConfig(epochs=epochs)
    res = train_signal_model(train.flux, train.ivar, train.labels, cfg, show_progress=False)
    va, tr = res.val_rows, slice(0, res.val_rows.start)
    scorer = SignalScorer.fit(res.model, train.flux[va], train.ivar[va], train.labels[va],
                              res.train_coords, grid=grid, train=(train.flux[tr],
                              train.ivar[tr], train.labels[tr]),
                              far_iqr=res.model.cfg.far_iqr)  # fmt: skip
    names = {"score": "signal_model", "signal_score": "signal_model_signal",
             "residual_score": "signal_model_residual"}  # fmt: skip
    for name, arr in sets.items():
        o = scorer.score(arr.flux, arr.ivar, arr.labels)
        scores[name].update({v: o[k] for k, v in names.items()})
    for out_name, in_name in pairs.items():
        rows += [{"outliers": out_name, "inliers": in_name, "score": v,
                  "auroc": auroc(scores[in_name][v], scores[out_name][v])}
                 for v in names.values()]  # fmt: skip
    ckpt = scorer.save(out / "checkpoint_signal")
    test_lp = scorer.score(sets["test"].flux, sets["test"].ivar, sets["test"].labels)["log_p"]
    snr = {r["score"]: r["auroc"] for r in rows if r["outliers"] == "inliers_snr1000"}
    mean = {s: float(np.mean([r["auroc"] for r in rows if r["score"] == s
                              and r["outliers"] != "inliers_snr1000"]))
            for s in ("signal_model", "flow_log_p", "flow_signal")}  # fmt: skip
    best_flow = max(mean["flow_log_p"], mean["flow_signal"])
    better = mean["signal_model"] >= best_flow
    return {
        "k": res.model.basis.k, "epochs": len(res.history.epochs),
        "seconds": time.perf_counter() - t0, "checkpoint": str(ckpt),
        "test_log_p": float(np.mean(test_lp[np.isfinite(test_lp)])),
        "mean_auroc": mean,
        "recommended": "the signal-space model" if better else "the full-space flow",
        "why": f"mean AUROC over the outlier sets {mean['signal_model']:.3f} against the "
               f"flow's best score {best_flow:.3f}; the same stars at S/N 1000 vs 300: "
               f"{snr.get('signal_model', float('nan')):.2f} against the flow's log p "
               f"{snr.get('flow_log_p', float('nan')):.2f} (0.5 = blind to S/N)",
    }  # fmt: skip


def _write_outputs(out: Path, result: dict, cfg: DemoConfig) -> None:
    """``report.md`` and ``results.json`` (atomically)."""
    fig_dir = out / "figures"
    result["results_json"] = str(out / "results.json")
    figs = {
        k: fig_dir / f"{k}.png"
        for k in ("training", "scores", "reconstruction", "correlation")
        if (fig_dir / f"{k}.png").exists()
    }
    result["report"] = str(write_report(out, result, figs))
    write_json_atomic(result, out / "results.json")
    log.info("stage 7/7: report written to %s", result["report"])


def analyze_checkpoint(checkpoint: str, data: str, cfg: DemoConfig) -> dict:
    """``mendis analyze``: stages 4-7 for a checkpoint trained elsewhere."""
    from mendis_ray.flow.checkpoint import load_checkpoint

    t_all = time.perf_counter()
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    density, _info = load_checkpoint(checkpoint)
    resources = ensure_ray(cfg.address)
    result: dict = {
        "started": time.strftime("%Y-%m-%d %H:%M"), "config": asdict(cfg),
        "ray": {"resources": {k: v for k, v in resources.items() if k in ("CPU", "GPU")}},
        "analyzed_checkpoint": str(Path(checkpoint).resolve()), "run_dir": "-",
    }  # fmt: skip
    result = analyze(density, Path(data), out, cfg, result=result)
    result["wall_seconds"] = time.perf_counter() - t_all
    _write_outputs(out, result, cfg)
    return result
