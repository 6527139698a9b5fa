"""Ray Train: what runs in every TorchTrainer worker (one DDP rank).

:func:`train_loop_per_worker` loads the shared start (or resumes), wraps the flow in DDP,
trains with the no-Ray loop (:func:`mendis_ray.train.loop.train_epoch`,
:func:`~mendis_ray.train.loop.evaluate`) over its Ray Data shard, reports metrics every
epoch and a checkpoint every ``checkpoint_every`` epochs (rank 0), and the best weights
at the end.  The driver that starts the workers is :mod:`mendis_ray.distributed.train`.

The flow's ``forward(x)`` *is* ``log_prob(x)``, so calling the DDP-wrapped module
all-reduces the gradients (calling ``module.log_prob`` would bypass DDP; see
ray-notes.md).
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mendis_ray.config import TrainConfig
from mendis_ray.flow.checkpoint import load_checkpoint, save_checkpoint
from mendis_ray.flow.density import SpectrumDensity
from mendis_ray.train.loop import EarlyStopping, evaluate, make_optimizer, train_epoch
from mendis_ray.train.state import load_training_state, save_training_state

__all__ = ["MODEL_DIR", "train_loop_per_worker"]

MODEL_DIR = "model"  # inside a Ray Train checkpoint: our checkpoint format


@dataclass
class _Worker:
    """What one worker trains with, built by :func:`_setup_worker`."""

    rank: int
    world: int
    train_cfg: TrainConfig
    density: SpectrumDensity  # its flow is the one trained (``model`` wraps it)
    optimizer: torch.optim.Optimizer
    model: torch.nn.Module  # the flow in DDP when world > 1; forward = log_prob
    device: torch.device
    stopper: EarlyStopping
    val_it: object = None  # the worker's Ray Data shards
    train_it: object = None
    start_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    resumed: bool = False
    resumed_at: int | None = None

    @property
    def flow(self) -> torch.nn.Module:
        return self.density.flow


def train_loop_per_worker(config: dict) -> None:
    """Runs in every TorchTrainer worker: load the shared start (or resume), wrap in DDP,
    train with the no-Ray loop, report metrics every epoch and a checkpoint every
    ``checkpoint_every`` epochs (rank 0), and the best weights at the end."""
    w = _setup_worker(config)
    if w.start_epoch == 0 and not w.resumed:
        initial = _val_log_prob(w)
        w.stopper.step(-1, initial, w.flow)  # the start competes (as in loop.fit)
        w.stopper.bad_epochs = 0
    _run_epochs(w, config)
    _report_best(w)
    if config.get("dump_params_dir"):
        _dump_params(w, Path(config["dump_params_dir"]))


def _setup_worker(config: dict) -> _Worker:
    """Threads, seed, the start checkpoint (identical on every rank), optimizer, DDP,
    then the resume (after a failure, or explicit) and the dataset shards."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    torch.set_num_threads(int(config["threads"]))  # Ray sets OMP_NUM_THREADS=1
    train_cfg = TrainConfig(**config["train_config"])
    torch.manual_seed(train_cfg.seed)
    density, _ = load_checkpoint(config["init_checkpoint"])  # identical on every rank
    density.flow.train()
    optimizer = make_optimizer(density.flow, train_cfg)  # before DDP: it sets requires_grad
    model = ray.train.torch.prepare_model(density.flow)  # DDP when world > 1
    w = _Worker(
        ctx.get_world_rank(), ctx.get_world_size(), train_cfg, density, optimizer, model,
        ray.train.torch.get_device(), EarlyStopping(train_cfg.patience),
    )  # fmt: skip
    resume_dir = _resume_dir(config)
    if resume_dir is not None:
        _resume(w, resume_dir)
    w.val_it = ray.train.get_dataset_shard("val")
    w.train_it = ray.train.get_dataset_shard("train")
    return w


def _resume_dir(config: dict) -> str | None:
    """The checkpoint folder to resume from: the one Ray hands back after a failure (its
    latest report), else ``config["resume_from"]``, else None."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # restarted after a failure: Ray hands back the latest report
        return ckpt.to_directory()
    if config.get("resume_from"):
        return config["resume_from"]
    return None


def _resume(w: _Worker, resume_dir: str) -> None:
    """The weights, optimizer, early-stopping record and history of ``resume_dir``."""
    saved, _ = load_checkpoint(Path(resume_dir) / MODEL_DIR)
    w.flow.load_state_dict(saved.flow.state_dict())
    st = load_training_state(resume_dir, w.optimizer, w.flow)
    w.start_epoch, w.history, w.stopper = st["epoch"] + 1, st["history"], st["stopper"]
    w.resumed, w.resumed_at = True, w.start_epoch


def _val_log_prob(w: _Worker) -> float:
    """Mean validation log p over every rank's shard."""
    # the unwrapped flow: no gradients, so nothing to all-reduce; sums are combined
    out = evaluate(w.flow, (b["x"] for b in w.val_it.iter_torch_batches(
        batch_size=1024, device=w.device, dtypes=torch.float32)))  # fmt: skip
    tot = torch.tensor([out["val_log_prob"] * out["rows"], out["rows"]], dtype=torch.float64)
    if w.world > 1:
        torch.distributed.all_reduce(tot)
    return float(tot[0] / tot[1].clamp_min(1))


def _run_epochs(w: _Worker, config: dict) -> None:
    """The epochs from ``w.start_epoch``, each reported (with a checkpoint when due),
    until early stopping, the time limit or ``epochs``."""
    t_start = time.perf_counter()
    for epoch in range(w.start_epoch, w.train_cfg.epochs):
        _maybe_fail(config, epoch, w.rank, w.world)
        metrics = _train_one_epoch(w, epoch)
        w.history.append(metrics)
        stop = w.stopper.step(epoch, metrics["val_log_prob"], w.flow)
        limit = config.get("time_limit_s")
        if limit is not None and time.perf_counter() - t_start > limit:
            stop = True
        last = stop or epoch == w.train_cfg.epochs - 1
        save = last or (epoch + 1) % int(config["checkpoint_every"]) == 0
        _report(metrics, save and w.rank == 0, w.density, w.train_cfg, w.optimizer, w.stopper,
                w.history, epoch, {"resumed_at": w.resumed_at, "world_size": w.world})  # fmt: skip
        if stop:
            break


def _train_one_epoch(w: _Worker, epoch: int) -> dict:
    """One pass over the worker's training shard, then validation: the epoch's metrics
    (rows and throughput summed over the ranks)."""
    t_ep = time.perf_counter()
    batches = (
        b["x"]
        for b in w.train_it.iter_torch_batches(
            batch_size=w.train_cfg.batch_size, device=w.device, dtypes=torch.float32,
            drop_last=True,
        )
    )  # fmt: skip
    tr = train_epoch(w.model, batches, w.optimizer, w.train_cfg.grad_clip)
    t_train = time.perf_counter() - t_ep  # the training pass alone (data feed included)
    if tr["rows"] == 0:
        raise RuntimeError(
            f"rank {w.rank}: epoch {epoch} took no training step (fewer rows on this "
            f"worker than batch_size {w.train_cfg.batch_size}); lower batch_size or the "
            "number of workers"
        )
    val = _val_log_prob(w)
    rows = torch.tensor([tr["rows"]], dtype=torch.float64)
    if w.world > 1:
        torch.distributed.all_reduce(rows)
    t_epoch = time.perf_counter() - t_ep
    return {
        "epoch": epoch,
        "train_log_prob": tr["train_log_prob"],
        "val_log_prob": val,
        "rows": int(rows.item()),
        "seconds": t_epoch,
        "samples_per_s": float(rows.item()) / max(t_epoch, 1e-9),
        "train_samples_per_s": float(rows.item()) / max(t_train, 1e-9),
    }


def _report_best(w: _Worker) -> None:
    """Final report: the best weights (the start if training never beat it)."""
    stopper, history = w.stopper, w.history
    if stopper.best_state is not None:
        w.flow.load_state_dict(stopper.best_state)
    final = {**history[-1], "final": True, "best_epoch": stopper.best_epoch,
             "best_val_log_prob": stopper.best} if history else {"final": True}  # fmt: skip
    _report(final, w.rank == 0, w.density, w.train_cfg, w.optimizer, stopper, history,
            history[-1]["epoch"] if history else -1,
            {"resumed_at": w.resumed_at, "world_size": w.world, "best": True})  # fmt: skip


def _dump_params(w: _Worker, d: Path) -> None:
    """Testing hook (see RayTrainConfig.dump_params_dir): this rank's final parameters."""
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in w.flow.state_dict().items()},
              str(d / f"rank{w.rank}.safetensors"))  # fmt: skip


def _report(
    metrics: dict,
    with_checkpoint: bool,
    density: SpectrumDensity,
    train_cfg: TrainConfig,
    optimizer: torch.optim.Optimizer,
    stopper: EarlyStopping,
    history: list[dict],
    epoch: int,
    extra: dict,
) -> None:
    """``ray.train.report`` on every rank (it is a barrier); rank 0 attaches the state."""
    import ray.train

    if not with_checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        density.flow.eval()
        save_checkpoint(Path(tmp) / MODEL_DIR, density, train_cfg, metrics=metrics)
        density.flow.train()
        save_training_state(tmp, optimizer, stopper, history, epoch, extra)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _maybe_fail(config: dict, epoch: int, rank: int, world: int) -> None:
    """Testing hook (see RayTrainConfig.fail_at_epoch): a real process death, once."""
    at, marker = config.get("fail_at_epoch"), config.get("fail_marker")
    if at is None or epoch != at or rank != min(1, world - 1) or not marker:
        return
    if Path(marker).exists():
        return
    Path(marker).write_text(f"rank {rank} killed itself at epoch {epoch}\n")
    # Let the controller register the last checkpoint first: Ray Train V2 collects
    # reports by polling, and a group that dies within the same poll interval restarts
    # from the checkpoint before (measured: from scratch when killed at once).
    time.sleep(5.0)
    os.kill(os.getpid(), signal.SIGKILL)
