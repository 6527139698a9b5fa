"""Ray Tune over the learning rate and the depth (number of flow units), with ASHA.

Train V2 pattern (``Tuner(trainer)`` is not supported with V2 trainers): every trial is a
*function trainable* that builds and fits its own TorchTrainer through
:func:`mendis_ray.distributed.train.train_distributed`, with a
``TuneReportCallback`` forwarding each epoch's metrics (and checkpoint path) to Tune, so
ASHA can stop poor trials early.  The data preparation (shard checks, standardization,
covariance) runs once on the driver and is shared by all trials.

Writes into ``out``: ``trials.csv`` and ``trials.json`` (one row per trial: its
hyperparameters, best validation log p, epochs run, status, checkpoint),
``best_config.json`` and ``best_checkpoint/`` (the best trial's best weights, our
checkpoint format).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from mendis_ray.atomic import replace_dir, temp_beside, write_atomic, write_json_atomic
from mendis_ray.config import FlowConfig, TrainConfig
from mendis_ray.distributed.train import (
    MODEL_DIR,
    DataPrep,
    RayTrainConfig,
    prepare_data,
    storage_uri,
    train_distributed,
)

__all__ = ["TuneConfig", "TuneResult", "tune_flow"]

log = logging.getLogger(__name__)

METRIC = "val_log_prob"


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
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    t0 = time.perf_counter()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ray_cfg = replace(ray_cfg, storage_path=storage_uri(ray_cfg.storage_path))
    prep = prepare_data(data, ray_cfg, batch_size=train_cfg.batch_size)
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
    tuner = tune.Tuner(
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
    log.info(
        "Tune: lr %s x units %s, ASHA grace %d, %d concurrent",
        tune_cfg.lr, tune_cfg.n_units, tune_cfg.grace_period, tune_cfg.max_concurrent_trials,
    )  # fmt: skip
    grid = tuner.fit()
    trials = []
    for r in grid:
        m = r.metrics or {}
        df = r.metrics_dataframe
        best_val = (
            float(df[METRIC].max()) if df is not None and METRIC in df else m.get(METRIC, math.nan)
        )
        trials.append(
            {
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
        )
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
    dst = out / "best_checkpoint"
    tmp = temp_beside(dst)
    try:
        shutil.copytree(Path(best["checkpoint"]) / MODEL_DIR, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, dst)
    log.info("best trial %s: lr %g, %d units, val log p %.2f", best["trial"], best["lr"],
             best["n_units"], best["best_val_log_prob"])  # fmt: skip
    return TuneResult(trials, best, dst, out, time.perf_counter() - t0)


def _write_csv(path: Path, rows: list[dict]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    write_atomic(path, write)
