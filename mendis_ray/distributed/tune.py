"""Ray Tune: the full-space flow (learning rate x depth, with ASHA) and the signal-space
model (signal directions k x depth, optionally x learning rate).

Full-space flow (:func:`tune_flow`).  Train V2 pattern (``Tuner(trainer)`` is not
supported with V2 trainers): every trial is a *function trainable* that builds and fits
its own TorchTrainer through :func:`mendis_ray.distributed.train.train_distributed`, with
a ``TuneReportCallback`` forwarding each epoch's metrics (and checkpoint path) to Tune, so
ASHA can stop poor trials early.  The data preparation (shard checks, standardization,
covariance) runs once on the driver and is shared by all trials.

Writes into ``out``: ``trials.csv`` and ``trials.json`` (one row per trial: its
hyperparameters, best validation log p, epochs run, status, checkpoint),
``best_config.json`` and ``best_checkpoint/`` (the best trial's best weights, our
checkpoint format).

Signal-space model (:func:`tune_signal`).  The shards are read once on the driver
(:func:`mendis_ray.train.signal.load_training_shards`: a seeded shuffle, so every trial
validates on the same rows) and put in the object store once; each trial is a function
trainable on a fractional CPU that trains in its own process
(:func:`mendis_ray.train.signal.train_signal_model`), fits the scorer's reference on its
validation rows and reports one result with its checkpoint.  Trials are ranked by the
validation log p of the *total* model, ``log p(good pixels, labels | noise)`` in physical
units, which is comparable across k (the flow's own log q of the k + 3 coordinates is
not: it lives in a k-dependent space).  Same files in ``out``; ``best_checkpoint/`` is a
signal-space checkpoint (``mendis serve``, ``mendis score``, ``load_scorer``).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from mendis_ray.atomic import replace_dir, temp_beside, write_atomic, write_json_atomic
from mendis_ray.config import FlowConfig, SignalConfig, TrainConfig
from mendis_ray.distributed.train import (
    MODEL_DIR,
    DataPrep,
    RayTrainConfig,
    fit_reference,
    prepare_data,
    storage_uri,
    train_distributed,
)

__all__ = ["SignalTuneConfig", "TuneConfig", "TuneResult", "tune_flow", "tune_signal"]

log = logging.getLogger(__name__)

METRIC = "val_log_prob"
#: the signal-space trials' metric: mean validation log p of the total model (nats)
SIGNAL_METRIC = "val_log_p"


@dataclass(frozen=True)
class TuneConfig:
    """The search.

    Attributes:
        lr: learning rates to try (a grid).
        n_units: depths to try (a grid); every (lr, n_units) pair is one trial, repeated
            ``num_samples`` times.
        grace_period: epochs every trial runs before ASHA may stop it.
        reduction_factor: ASHA's reduction factor.
        max_concurrent_trials: trials at once (each runs ``num_workers`` train workers).
    """

    lr: tuple[float, ...] = (1e-4, 3e-4)
    n_units: tuple[int, ...] = (2, 4)
    num_samples: int = 1
    grace_period: int = 1
    reduction_factor: int = 2
    max_concurrent_trials: int = 1


@dataclass
class TuneResult:
    trials: list[dict]
    best: dict
    best_checkpoint: Path
    out: Path
    seconds: float


def _trainable(config: dict, *, prep: DataPrep, base: dict) -> None:
    """One Tune trial: a TorchTrainer run with this trial's lr and depth."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial = tune.get_context().get_trial_name()
    flow_cfg = FlowConfig(**{**base["flow"], "n_units": int(config["n_units"])})
    train_cfg = TrainConfig(**{**base["train"], "lr": float(config["lr"])})
    ray_cfg = RayTrainConfig(**{**base["ray"], "name": trial})
    out = Path(base["out"]) / "trials" / trial
    train_distributed(prep, out, flow_cfg, train_cfg, ray_cfg, callbacks=[TuneReportCallback()])


def tune_flow(
    data: str | os.PathLike | list,
    out: str | os.PathLike,
    flow_cfg: FlowConfig,
    train_cfg: TrainConfig,
    ray_cfg: RayTrainConfig,
    tune_cfg: TuneConfig = TuneConfig(),
) -> TuneResult:
    """Search ``tune_cfg.lr`` x ``tune_cfg.n_units`` with ASHA on the validation log p.

    Ray must be initialised.  Returns the trial table and the best trial."""
    t0 = time.perf_counter()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ray_cfg = replace(ray_cfg, storage_path=storage_uri(ray_cfg.storage_path
                                                        or str(out / "ray_runs")))  # fmt: skip
    prep = prepare_data(data, ray_cfg, batch_size=train_cfg.batch_size)
    tuner = _flow_tuner(prep, out, flow_cfg, train_cfg, ray_cfg, tune_cfg)
    log.info(
        "Tune: lr %s x units %s, ASHA grace %d, %d concurrent",
        tune_cfg.lr, tune_cfg.n_units, tune_cfg.grace_period, tune_cfg.max_concurrent_trials,
    )  # fmt: skip
    trials = [_flow_trial_row(r) for r in tuner.fit()]
    return _finish_flow(out, trials, prep, flow_cfg, train_cfg, t0)


def _flow_tuner(
    prep: DataPrep, out: Path, flow_cfg: FlowConfig, train_cfg: TrainConfig,
    ray_cfg: RayTrainConfig, tune_cfg: TuneConfig,
):  # fmt: skip
    """The Tuner of :func:`tune_flow`: a grid over lr x n_units, ASHA on the epochs,
    every trial a function trainable that shares ``prep``."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    base = {
        "flow": asdict(flow_cfg),
        "train": asdict(train_cfg),
        "ray": {**asdict(ray_cfg), "degrade": ray_cfg.degrade},
        "out": str(out),
    }
    # the trial itself does no work (its TorchTrainer workers take the CPUs); Tune needs a
    # non-empty request, so it asks for a sliver of a CPU
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, prep=prep, base=base), {"cpu": 0.01}
    )
    scheduler = ASHAScheduler(
        max_t=max(train_cfg.epochs, 1) + 1,  # + the final report (best weights)
        grace_period=tune_cfg.grace_period,
        reduction_factor=tune_cfg.reduction_factor,
        time_attr="training_iteration",
    )
    return tune.Tuner(
        trainable,
        param_space={
            "lr": tune.grid_search(list(tune_cfg.lr)),
            "n_units": tune.grid_search(list(tune_cfg.n_units)),
        },
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            scheduler=scheduler,
            num_samples=tune_cfg.num_samples,
            max_concurrent_trials=tune_cfg.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=ray_cfg.storage_path,
        ),
    )


def _flow_trial_row(r) -> dict:
    """One row of the trial table of :func:`tune_flow` from a Tune ``Result``."""
    m = r.metrics or {}
    df = r.metrics_dataframe
    best_val = (
        float(df[METRIC].max()) if df is not None and METRIC in df else m.get(METRIC, math.nan)
    )
    return {
        "trial": Path(r.path).name if r.path else "?",
        "lr": r.config["lr"],
        "n_units": r.config["n_units"],
        "best_val_log_prob": best_val,
        "epochs": int(m.get("training_iteration", 0)),
        "finished": bool(m.get("final", False)),
        "status": "error" if r.error else ("completed" if m.get("final") else "stopped"),
        "error": str(r.error).splitlines()[0] if r.error else "",
        "checkpoint": m.get("checkpoint_path", ""),
    }


def _finish_flow(
    out: Path, trials: list[dict], prep: DataPrep, flow_cfg: FlowConfig,
    train_cfg: TrainConfig, t0: float,
) -> TuneResult:  # fmt: skip
    """Write the trial table and best_config.json, save the best trial's best weights
    with the scorer's reference to ``out``/best_checkpoint."""
    write_json_atomic(trials, out / "trials.json")
    _write_csv(out / "trials.csv", trials)
    ok = [t for t in trials if t["checkpoint"] and math.isfinite(t["best_val_log_prob"])]
    if not ok:
        raise RuntimeError(f"Tune: no trial produced a checkpoint; see {out / 'trials.json'}")
    best = max(ok, key=lambda t: t["best_val_log_prob"])
    best_cfg = {
        "flow_config": {**asdict(flow_cfg), "n_units": best["n_units"]},
        "train_config": {**asdict(train_cfg), "lr": best["lr"]},
        "trial": best,
    }
    write_json_atomic(best_cfg, out / "best_config.json")
    dst = _save_with_reference(Path(best["checkpoint"]) / MODEL_DIR, out / "best_checkpoint",
                               prep, best)  # fmt: skip
    log.info("best trial %s: lr %g, %d units, val log p %.2f", best["trial"], best["lr"],
             best["n_units"], best["best_val_log_prob"])  # fmt: skip
    return TuneResult(trials, best, dst, out, time.perf_counter() - t0)


def _save_with_reference(src: Path, dst: Path, prep: DataPrep, best: dict) -> Path:
    """The best trial's weights (``src``) saved to ``dst`` with the scorer's reference
    fitted on the validation rows every trial shared (``mendis score`` / ``mendis serve``
    then give percentiles and flags)."""
    from mendis_ray.flow.checkpoint import load_checkpoint, save_checkpoint
    from mendis_ray.science.baselines import GaussianBaseline

    density, info = load_checkpoint(src)
    m = prep.moments
    gauss = GaussianBaseline().fit_moments(m.mean, m.cov, m.n, m.norm4)
    scorer = fit_reference(density, prep.val_x, gauss)
    train_cfg = TrainConfig(**info["train_config"]) if info.get("train_config") else None
    return save_checkpoint(dst, density, train_cfg, metrics={**info.get("metrics", {}),
                           "trial": best}, extra_arrays=scorer.checkpoint_arrays())  # fmt: skip


def _write_csv(path: Path, rows: list[dict]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    write_atomic(path, write)


# ---------------------------------------------------------------------- signal-space model


@dataclass(frozen=True)
class SignalTuneConfig:
    """The signal-space model's search: a grid over ``ks`` x ``n_units`` (x ``lr`` when
    given; else the SignalConfig's), each point ``num_samples`` times.

    Attributes:
        ks: numbers of signal directions k (``SignalConfig.n_signal``).
        n_units: flow depths.
        lr: learning rates, or None (not searched).
        cpus_per_trial: the CPU share of one trial (fractional: Ray's other tasks keep
            CPUs); its torch thread count is its whole CPUs, at least 1.
        max_concurrent_trials: trials at once (None: as many as the CPUs allow).
        time_limit_s: training time limit of one trial.
        storage_path: Tune's storage (a local folder or ``s3://``, ``gs://``; shared
            storage on a multi-node cluster; None: ``out/ray_runs``); every run gets its
            own folder in it.
    """

    ks: tuple[int, ...] = (5, 10, 20)
    n_units: tuple[int, ...] = (4, 6)
    lr: tuple[float, ...] | None = None
    num_samples: int = 1
    cpus_per_trial: float = 0.5
    max_concurrent_trials: int | None = 1
    time_limit_s: float | None = None
    storage_path: str | None = None

    def param_space(self) -> dict:
        from ray import tune

        space = {
            "k": tune.grid_search([int(k) for k in self.ks]),
            "n_units": tune.grid_search([int(u) for u in self.n_units]),
        }
        if self.lr:
            space["lr"] = tune.grid_search([float(x) for x in self.lr])
        return space


def validation_log_p(model, coords) -> tuple[float, float]:
    """Mean total log p (nats per spectrum) of validation coordinates ``coords`` (n rows)
    over its finite values, and the fraction of finite values (n,) -> (mean, fraction)."""
    lp = model.total_log_prob(coords, model.flow_log_prob(coords))
    ok = np.isfinite(lp)
    return (float(lp[ok].mean()) if ok.any() else -math.inf), float(ok.mean())


def _signal_trainable(config: dict, *, data: dict, base: dict) -> None:
    """One Tune trial: train the signal-space model with this trial's k, depth (and lr)
    on the shared arrays, score the validation rows with the total model, fit the scorer's
    reference and report the metrics with the checkpoint (one report)."""
    import ray
    import torch
    from ray import tune

    from mendis_ray.science.signal_scores import SignalScorer
    from mendis_ray.train.signal import train_signal_model

    torch.set_num_threads(base["threads"])
    flux, ivar, labels = ray.get(data["arrays"])  # (n, p), (n, p), (n, 3): read-only views
    changes = {"n_signal": int(config["k"]), "n_units": int(config["n_units"])}
    if "lr" in config:
        changes["lr"] = float(config["lr"])
    cfg = SignalConfig.from_dict(base["signal"]).with_given(**changes)
    res = train_signal_model(flux, ivar, labels, cfg, time_limit_s=base["time_limit_s"],
                             show_progress=False)  # fmt: skip
    val_log_p, finite = validation_log_p(res.model, res.val_coords)
    hist = res.history
    metrics = {
        SIGNAL_METRIC: val_log_p, "val_finite": finite, "val_log_q": hist.best_val_log_prob,
        "k_used": int(res.model.basis.k), "epochs": len(hist.epochs),
        "best_epoch": hist.best_epoch, "train_seconds": res.seconds, "lr": res.steps.lr,
        "batch_size": res.steps.batch_size,
    }  # fmt: skip
    va, tr = res.val_rows, slice(0, res.val_rows.start)
    scorer = SignalScorer.fit(
        res.model, flux[va], ivar[va], labels[va], res.train_coords, grid=base["grid"],
        train=(flux[tr], ivar[tr], labels[tr]), far_iqr=res.model.cfg.far_iqr,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        scorer.save(Path(d) / "checkpoint", metrics={**metrics, "signal_config": cfg.to_dict()})
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def tune_signal(
    data: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    cfg: SignalConfig | None = None,
    tune_cfg: SignalTuneConfig = SignalTuneConfig(),
) -> TuneResult:
    """Grid search of the signal-space model over ``tune_cfg`` (the rest of the model and
    its training from ``cfg``), ranked by the mean validation log p of the total model.

    Ray must be initialised.  Writes ``out``/trials.csv, trials.json, best_config.json and
    best_checkpoint/; returns the trial table and the best trial."""
    import ray
    from ray import tune

    from mendis_ray.distributed.train import storage_uri
    from mendis_ray.train.signal import load_training_shards

    t0 = time.perf_counter()
    cfg = cfg or SignalConfig()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    flux, ivar, labels, grid = load_training_shards(paths, cfg.seed)
    log.info("Tune (signal): %d spectra (%d px) read in %.1f s; k %s x units %s x lr %s",
             len(flux), flux.shape[1], time.perf_counter() - t0, tune_cfg.ks,
             tune_cfg.n_units, tune_cfg.lr or cfg.lr)  # fmt: skip
    arrays = ray.put((flux, ivar, labels))  # once; every trial reads it from the store
    del flux, ivar
    base = {
        "signal": cfg.to_dict(), "grid": grid, "time_limit_s": tune_cfg.time_limit_s,
        "threads": max(1, int(tune_cfg.cpus_per_trial)),
    }  # fmt: skip
    trainable = tune.with_resources(
        tune.with_parameters(_signal_trainable, data={"arrays": arrays}, base=base),
        {"cpu": tune_cfg.cpus_per_trial},
    )
    tuner = tune.Tuner(
        trainable,
        param_space=tune_cfg.param_space(),
        tune_config=tune.TuneConfig(
            metric=SIGNAL_METRIC,
            mode="max",
            num_samples=tune_cfg.num_samples,
            max_concurrent_trials=tune_cfg.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=f"tune-signal-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
            storage_path=storage_uri(tune_cfg.storage_path or str(out / "ray_runs")),
        ),
    )
    trials = [_signal_trial_row(r, cfg.lr) for r in tuner.fit()]
    return _finish_signal(out, trials, cfg, t0, searched_lr=bool(tune_cfg.lr))


def _signal_trial_row(r, lr: float) -> dict:
    """One row of the trial table from a Tune ``Result`` (``lr``: when not searched)."""
    m = r.metrics or {}
    done = SIGNAL_METRIC in m
    return {
        "trial": Path(r.path).name if r.path else "?",
        "k": r.config["k"],
        "n_units": r.config["n_units"],
        "lr": float(m.get("lr", r.config.get("lr", lr))),  # as trained (SignalConfig.large_set)
        SIGNAL_METRIC: float(m.get(SIGNAL_METRIC, math.nan)),
        "val_finite": float(m.get("val_finite", math.nan)),
        "val_log_q": float(m.get("val_log_q", math.nan)),
        "k_used": int(m.get("k_used", 0)),
        "epochs": int(m.get("epochs", 0)),
        "best_epoch": int(m.get("best_epoch", -1)),
        "train_seconds": float(m.get("train_seconds", math.nan)),
        "status": "error" if r.error else ("completed" if done else "stopped"),
        "error": str(r.error).splitlines()[0] if r.error else "",
        "checkpoint": r.checkpoint.path if (r.checkpoint and done) else "",
        "_checkpoint": r.checkpoint if done else None,
    }


def _finish_signal(
    out: Path, trials: list[dict], cfg: SignalConfig, t0: float, searched_lr: bool = False
) -> TuneResult:
    """Write the trial table and best_config.json (the best trial's settings: a searched
    lr as it was used, without the large-set steps), copy the best trial's checkpoint to
    ``out``/best_checkpoint (from Tune's storage, local or remote)."""
    handles = [t.pop("_checkpoint") for t in trials]
    write_json_atomic(trials, out / "trials.json")
    _write_csv(out / "trials.csv", trials)
    ok = [i for i, t in enumerate(trials)
          if handles[i] is not None and math.isfinite(t[SIGNAL_METRIC])]  # fmt: skip
    if not ok:
        raise RuntimeError(f"Tune: no trial produced a checkpoint; see {out / 'trials.json'}")
    i = max(ok, key=lambda j: trials[j][SIGNAL_METRIC])
    best = trials[i]
    changes = {"n_signal": best["k"], "n_units": best["n_units"]}
    if searched_lr:  # as _signal_trainable trained it
        changes["lr"] = best["lr"]
    write_json_atomic({"signal_config": cfg.with_given(**changes).to_dict(), "trial": best},
                      out / "best_config.json")  # fmt: skip
    dst = out / "best_checkpoint"
    tmp = temp_beside(dst)
    try:
        with handles[i].as_directory() as d:
            shutil.copytree(Path(d) / "checkpoint", tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, dst)
    log.info("best trial %s: k %d, %d units, val log p %.1f nats", best["trial"], best["k"],
             best["n_units"], best[SIGNAL_METRIC])  # fmt: skip
    return TuneResult(trials, best, dst, out, time.perf_counter() - t0)
