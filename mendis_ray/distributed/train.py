"""Ray Train: the Mendis flow on many workers with TorchTrainer (DDP).

The driver (:func:`train_distributed`) prepares everything once:

1. checks the training shards and splits off validation shards (:mod:`.data`);
2. streams the degraded training set once to compute the standardization and the
   covariance of the standardized features (``compute_moments``);
3. builds the flow at the better (on validation) of two Gaussians, Ledoit-Wolf and
   factor analysis, exactly as :func:`mendis_ray.experiment.train_flow` does, and writes
   it as the *initial checkpoint* (weights + standardization);
4. starts a TorchTrainer whose workers all load that initial checkpoint (so ActNorm and
   the whitening are identical on every rank by construction), wrap the flow in DDP, and
   run :func:`mendis_ray.train.loop.train_epoch` / :func:`~mendis_ray.train.loop.evaluate`
   unchanged over their Ray Data shard (:mod:`mendis_ray.distributed.worker`).

The flow's ``forward(x)`` *is* ``log_prob(x)``, so calling the DDP-wrapped module
all-reduces the gradients (calling ``module.log_prob`` would bypass DDP; see
ray-notes.md).  Every ``checkpoint_every`` epochs rank 0 reports a checkpoint with the
weights, the optimizer and the early-stopping record; after a worker failure Ray Train
restarts the group (``FailureConfig``) and the workers resume from it.  Each run gets a
unique folder (Ray Train V2 silently resumes a run folder that exists); resuming an
earlier run is explicit: ``resume_from=<run folder or checkpoint folder>``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from mendis_ray.atomic import replace_dir, temp_beside
from mendis_ray.config import FlowConfig, TrainConfig
from mendis_ray.distributed.data import (
    DegradeConfig,
    Moments,
    check_shards,
    compute_moments,
    degrade,
    list_shards,
    named_errors,
    read_spectra,
    split_files,
    standardize,
)
from mendis_ray.distributed.torch_group import torch_config
from mendis_ray.distributed.worker import MODEL_DIR, train_loop_per_worker
from mendis_ray.flow.checkpoint import load_checkpoint, save_checkpoint
from mendis_ray.flow.density import SpectrumDensity
from mendis_ray.flow.gaussian_init import initialize_whitened
from mendis_ray.flow.model import MendisFlow
from mendis_ray.science.baselines import FactorAnalysisBaseline, GaussianBaseline

__all__ = [
    "DataPrep",
    "DistributedResult",
    "RayTrainConfig",
    "fit_reference",
    "latest_checkpoint",
    "prepare_data",
    "prepare_training",
    "storage_uri",
    "train_distributed",
    "train_loop_per_worker",
    "training_verdict",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayTrainConfig:
    """How training is distributed (the flow and optimiser settings are separate).

    Attributes:
        num_workers: TorchTrainer workers (DDP ranks); 0 runs in the driver process.
        use_gpu: one GPU per worker.
        cpus_per_worker: logical CPUs per worker (also its torch thread count, >= 1).
        storage_path: where Ray Train writes run folders (shared storage on clusters);
            None: ``<out_dir>/ray_runs`` of the run (the ``--out`` of ``mendis train``).
        name: run name prefix; a timestamp and random suffix make every run unique.
        resume_from: a run folder or checkpoint folder to resume from (explicit).
        checkpoint_every: epochs between checkpoints (the last epoch is always saved).
        num_to_keep: checkpoints kept per run (each holds the weights, the optimizer state
            and the best weights so far: the latest alone is what a resume needs).
        max_failures: worker-group restarts allowed (from the latest checkpoint).
        val_fraction: share of the training shards used for validation.
        degrade: noise and label scatter applied to the training shards.
        n_factors: factor-analysis start (0: Ledoit-Wolf only); whiten: start at a
            Gaussian at all.
        time_limit_s: stop after the epoch during which this wall time is exceeded.
        fail_at_epoch, fail_marker: testing hook: rank 1 (or 0 if alone) kills its own
            process with SIGKILL at the start of this epoch, once (the marker file records
            that it happened), to exercise FailureConfig.
        dump_params_dir: testing hook: every rank writes its final parameters there.
    """

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    storage_path: str | None = None
    name: str = "mendis"
    resume_from: str | None = None
    checkpoint_every: int = 1
    num_to_keep: int = 1
    max_failures: int = 2
    val_fraction: float = 0.1
    degrade: DegradeConfig = field(default_factory=lambda: DegradeConfig(fresh_noise=True))
    n_factors: int = 20
    whiten: bool = True
    time_limit_s: float | None = None
    fail_at_epoch: int | None = None
    fail_marker: str | None = None
    dump_params_dir: str | None = None


@dataclass
class DistributedResult:
    density: SpectrumDensity  # best weights, eval mode
    history: list[dict]
    run_dir: Path
    checkpoint: Path  # the final Ray Train checkpoint folder (model/ inside)
    init_checkpoint: Path
    start: str
    start_val_log_prob: dict
    moments: Moments
    seconds: float
    info: dict = field(default_factory=dict)
    start_models: dict = field(default_factory=dict)  # name -> the fitted Gaussian candidates
    val_x: np.ndarray | None = None  # (n_val, d) standardized validation rows (fixed noise)


# ----------------------------------------------------------------------------- driver


@dataclass
class DataPrep:
    """Datasets and statistics shared by every run on the same data (and Tune trials)."""

    train_ds: object
    val_ds: object
    moments: Moments
    grid: dict
    n_train: int
    n_val: int
    val_x: np.ndarray  # (n_val, d) standardized validation features (fixed noise)


@dataclass
class Prepared:
    data: DataPrep
    init_checkpoint: Path
    start: str
    start_val_log_prob: dict
    start_models: dict


def prepare_data(
    data: str | os.PathLike | list, cfg: RayTrainConfig, *, batch_size: int | None = None
) -> DataPrep:
    """Steps 1-2 of the module docstring: check and split the shards, stream the degraded
    training set once for the standardization and covariance, build the pipelines.
    With ``batch_size``, a split too small for ``cfg.num_workers`` workers is refused
    before any data are read (:func:`check_rows_per_worker`)."""
    shards = check_shards(list_shards(data))
    tr_files, val_files = split_files(shards.files, cfg.val_fraction)
    train = check_shards(tr_files, shards.grid)
    if batch_size is not None:  # from the footers: before the pass over the data
        check_rows_per_worker(train.n_rows, cfg.num_workers, batch_size)
    val = check_shards(val_files, shards.grid)
    n_pix = shards.n_pix
    fixed = DegradeConfig(**{**asdict(cfg.degrade), "fresh_noise": False})
    log.info(
        "training shards: %d (%d spectra), validation shards: %d (%d spectra)",
        len(train.files), train.n_rows, len(val.files), val.n_rows,
    )  # fmt: skip
    t0 = time.perf_counter()
    with named_errors(train.files):  # a damaged shard, a row without labels: one line
        moments = compute_moments(
            degrade(read_spectra(train, require_labels=True), n_pix, fixed), n_pix
        )
    log.info("standardization and covariance from %d spectra in %.1f s", moments.n,
             time.perf_counter() - t0)  # fmt: skip
    std = moments.standardizer
    val_fixed = DegradeConfig(**{**asdict(fixed), "seed": fixed.seed + 1})
    with named_errors(val.files):
        val_ds = standardize(
            degrade(read_spectra(val, require_labels=True), n_pix, val_fixed), n_pix, std
        ).materialize()  # small, read every epoch
    train_ds = standardize(
        degrade(read_spectra(train, require_labels=True), n_pix, cfg.degrade), n_pix, std
    )
    val_x = np.concatenate([b["x"] for b in val_ds.iter_batches(batch_size=4096)])
    return DataPrep(train_ds, val_ds, moments, shards.grid, train.n_rows, val.n_rows, val_x)


def check_rows_per_worker(n_train: int, num_workers: int, batch_size: int) -> None:
    """Each worker gets about ``n_train / num_workers`` rows an epoch and drops the last
    partial batch (DDP needs equal step counts): refuse a run that would take no step."""
    per_worker = n_train // max(num_workers, 1)
    if per_worker < batch_size:
        raise ValueError(
            f"{n_train} training spectra over {num_workers} workers is {per_worker} per "
            f"worker per epoch, fewer than batch_size {batch_size}: no training step would "
            f"be taken. Lower batch_size or the number of workers, or add training shards."
        )


def prepare_training(
    data: str | os.PathLike | list | DataPrep,
    out_dir: str | os.PathLike,
    flow_cfg: FlowConfig,
    train_cfg: TrainConfig,
    cfg: RayTrainConfig,
) -> Prepared:
    """Steps 1-3 of the module docstring; ``data`` may be a :class:`DataPrep` already
    made (Tune trials share one)."""
    if isinstance(data, DataPrep):
        prep = data
        check_rows_per_worker(prep.n_train, cfg.num_workers, train_cfg.batch_size)
    else:
        prep = prepare_data(data, cfg, batch_size=train_cfg.batch_size)
    moments = prep.moments
    if flow_cfg.n_features != moments.mean.size:
        raise ValueError(
            f"the flow is built for {flow_cfg.n_pix} pixels but the shards have "
            f"{moments.mean.size - 3} (grid {prep.grid.get('name')!r})"
        )
    flow = MendisFlow(flow_cfg, seed=train_cfg.seed)
    starts: dict[str, GaussianBaseline] = {}
    start_ll: dict[str, float] = {}
    start = "none"
    # Two rows with the training mean and standard deviation of every standardized
    # feature: ActNorm's data-dependent initialisation then sees the streamed statistics
    # exactly (mean (a + b)/2, unbiased std |a - b|/sqrt(2)).
    sd = np.sqrt(np.clip(np.diag(moments.cov), 1e-12, None) * moments.n / (moments.n - 1))
    x_init = torch.from_numpy(np.stack([moments.mean + sd / math.sqrt(2),
                                        moments.mean - sd / math.sqrt(2)])).float()  # fmt: skip
    if cfg.whiten:
        starts["gaussian"] = GaussianBaseline().fit_moments(
            moments.mean, moments.cov, moments.n, moments.norm4
        )
        if 0 < cfg.n_factors < flow_cfg.n_features:
            starts[f"factor{cfg.n_factors}"] = FactorAnalysisBaseline(cfg.n_factors).fit_moments(
                moments.mean, moments.cov, moments.n
            )
        xv = prep.val_x.astype(np.float64)
        start_ll = {k: float(np.mean(m.log_prob(xv))) for k, m in starts.items()}
        start = max(start_ll, key=start_ll.__getitem__)
        log.info("flow starts at %s (validation log p: %s)", start,
                 ", ".join(f"{k} {v:.1f}" for k, v in start_ll.items()))  # fmt: skip
        initialize_whitened(flow, x_init, starts[start].covariance_)
    else:
        flow.initialize(x_init)
    density = SpectrumDensity(flow, moments.standardizer, flow_cfg, prep.grid)
    init = save_checkpoint(  # staged (an earlier run's stays until this one ends)
        # absolute: the workers run in another directory
        temp_beside(Path(out_dir).resolve() / "init_checkpoint"), density, train_cfg,
        extra={"start": start, "start_val_log_prob": start_ll},
    )  # fmt: skip
    return Prepared(prep, init, start, start_ll, starts)


def train_distributed(
    data: str | os.PathLike | list | DataPrep,
    out_dir: str | os.PathLike,
    flow_cfg: FlowConfig,
    train_cfg: TrainConfig,
    cfg: RayTrainConfig = RayTrainConfig(),
    *,
    prepared: Prepared | None = None,
    callbacks: list | None = None,
) -> DistributedResult:
    """Train on the shards under ``data`` with TorchTrainer; return the best flow.

    Ray must be initialised (:func:`mendis_ray.distributed.session.ensure_ray`).
    ``out_dir`` receives ``init_checkpoint/``; runs go to ``cfg.storage_path`` (default
    ``out_dir/ray_runs``)."""
    t0 = time.perf_counter()
    prep = prepared or prepare_training(data, out_dir, flow_cfg, train_cfg, cfg)
    staged = prep.init_checkpoint
    try:
        storage = storage_uri(cfg.storage_path or str(Path(out_dir) / "ray_runs"))
        loop_config = _loop_config(prep, train_cfg, cfg)
        run_name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        trainer = _make_trainer(prep, loop_config, cfg, storage, run_name, callbacks)
        log.info(
            "TorchTrainer: %d worker(s), GPU %s, run %s under %s",
            cfg.num_workers, cfg.use_gpu, run_name, storage,
        )  # fmt: skip
        result = _fit_and_release(trainer)
        if result.checkpoint is None:
            raise RuntimeError(f"training run {run_name} finished without a checkpoint")
        if staged.name.startswith("."):  # this run's start replaces an earlier one's now
            final = Path(out_dir).resolve() / "init_checkpoint"
            replace_dir(staged, final)
            prep.init_checkpoint = final
    finally:
        if staged.name.startswith("."):  # failed or interrupted: the earlier run's stays
            shutil.rmtree(staged, ignore_errors=True)
    return _collect(result, prep, storage, run_name, t0)


def _loop_config(prep: Prepared, train_cfg: TrainConfig, cfg: RayTrainConfig) -> dict:
    """The ``train_loop_config`` of :func:`~mendis_ray.distributed.worker.train_loop_per_worker`
    (the checkpoint to resume from resolved here, once)."""
    resume = None
    if cfg.resume_from:
        resume = latest_checkpoint(cfg.resume_from)
        log.info("resuming from %s", resume)
    return {
        "init_checkpoint": str(prep.init_checkpoint),
        "resume_from": str(resume) if resume else None,
        "train_config": asdict(train_cfg),
        "checkpoint_every": cfg.checkpoint_every,
        "threads": max(1, int(cfg.cpus_per_worker)),
        "time_limit_s": cfg.time_limit_s,
        "fail_at_epoch": cfg.fail_at_epoch,
        "fail_marker": cfg.fail_marker,
        "dump_params_dir": cfg.dump_params_dir,
    }


def _make_trainer(
    prep: Prepared, loop_config: dict, cfg: RayTrainConfig, storage: str, run_name: str,
    callbacks: list | None,
):  # fmt: skip
    """The TorchTrainer of one run: scaling, storage, checkpoints kept, failures allowed,
    and the training and validation datasets split over the workers."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks,
        ),
        datasets={"train": prep.data.train_ds, "val": prep.data.val_ds},
        dataset_config=DataConfig(datasets_to_split=["train", "val"]),
        torch_config=torch_config(),  # loopback-only process group in the embedded Ray
    )


def _collect(result, prep: Prepared, storage: str, run_name: str, t0: float) -> DistributedResult:
    """The best flow and history of a finished run (its final checkpoint) with what
    :func:`prepare_training` found."""
    with result.checkpoint.as_directory() as d:
        ckpt_dir = Path(d)
        density, _ = load_checkpoint(ckpt_dir / MODEL_DIR)
        state = json.loads((ckpt_dir / "state.json").read_text())
    return DistributedResult(
        density=density,
        history=state["history"],
        run_dir=Path(storage) / run_name if "://" not in storage else Path(run_name),
        checkpoint=Path(result.checkpoint.path),
        init_checkpoint=prep.init_checkpoint,
        start=prep.start,
        start_val_log_prob=prep.start_val_log_prob,
        moments=prep.data.moments,
        start_models=prep.start_models,
        val_x=prep.data.val_x,
        seconds=time.perf_counter() - t0,
        info={
            "run_name": run_name,
            "n_train": prep.data.n_train,
            "n_val": prep.data.n_val,
            **state.get("extra", {}),
        },
    )


def fit_reference(
    density: SpectrumDensity,
    val_x: np.ndarray,
    gaussian: GaussianBaseline | None = None,
    n_marginal: int = 32,
):
    """The scorer's reference for a flow trained with Ray Train: its validation rows
    ``val_x`` (n_val, d) (standardized, held out from training, degraded like the training
    rows with fixed noise) back in physical units; ``gaussian``: the Gaussian fitted on the
    training statistics (the likelihood-ratio baseline).  Returns a
    :class:`~mendis_ray.science.ood.Scorer`; save its ``checkpoint_arrays()`` with the
    weights so that ``mendis score`` / ``mendis serve`` give percentiles and flags."""
    from mendis_ray.science.ood import Scorer

    flux, labels = density.standardizer.inverse(np.asarray(val_x, np.float64))
    t0 = time.perf_counter()
    scorer = Scorer.fit(density, flux, labels, n_marginal=min(n_marginal, len(flux)),
                        gaussian=gaussian if gaussian is not None else True)  # fmt: skip
    log.info("scoring reference: %d validation spectra (%d label-free) in %.1f s", len(flux),
             min(n_marginal, len(flux)), time.perf_counter() - t0)  # fmt: skip
    return scorer


def training_verdict(history: list[dict], start_val: float) -> dict:
    """Did training improve on its Gaussian start, did it diverge?  ``history``: the
    epochs' metrics (``train_log_prob``, ``val_log_prob``); ``start_val``: the start's
    validation log p.  Diverged: an epoch's train or validation log p is not finite or
    more than ``max(|start|, 1000)`` nats below the start (e.g. -3.4e12 against -2268)."""
    vals = [h.get("val_log_prob", math.nan) for h in history]
    trains = [h.get("train_log_prob", math.nan) for h in history]
    floor = start_val - max(abs(start_val), 1000.0)
    improved = any(math.isfinite(v) and v > start_val for v in vals)
    diverged = any(not math.isfinite(v) or v < floor for v in vals + trains)
    return {"improved": improved, "diverged": diverged, "start_val_log_prob": start_val}


def _fit_and_release(trainer):
    """``trainer.fit()``, then let its actors go.  Ray Train V2 registers a SIGINT handler
    that holds the TrainController's handle (so Ctrl-C aborts the run); left in place, it
    keeps the controller, its DatasetManager and SplitCoordinators alive (and polling) for
    the rest of the process: through the scoring stages of ``mendis demo``, say.  The
    previous handler comes back after the run, the handle goes, and Ray stops them.  Its
    handler ends an aborted run with ``sys.exit``: raised here as the KeyboardInterrupt it
    is (``mendis train`` exited 1 without a word)."""
    import gc
    import threading

    main = threading.current_thread() is threading.main_thread()  # Tune trials are not
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    except SystemExit:  # Ray's SIGINT handler aborts the run and exits (status 0 or 1,
        raise KeyboardInterrupt from None  # no word): an interrupt, as the CLI says it
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
            gc.collect()


def storage_uri(path: str) -> str:
    """Ray Train storage: a URI (``s3://``, ``gs://``) as it is, a local path absolute."""
    return path if "://" in path else str(Path(path).resolve())


def latest_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint to resume from: ``path`` itself if it is one (has ``state.json``),
    else the one of ``path``'s ``checkpoint_*`` folders with the highest epoch."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    found = []
    for c in path.glob("checkpoint_*"):
        try:
            found.append((json.loads((c / "state.json").read_text())["epoch"], c))
        except (OSError, ValueError, KeyError):
            continue
    if not found:
        raise FileNotFoundError(
            f"{path}: no checkpoint to resume from (no checkpoint_*/state.json)"
        )
    return max(found)[1]
