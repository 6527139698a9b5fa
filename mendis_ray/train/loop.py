"""Training without Ray: one epoch, evaluation and a fit loop over any iterable of batches.

The model's ``forward(x)`` must return ``log p(x)`` per row (batch,), so the same
functions train a bare flow, a :class:`~mendis_ray.flow.density.SpectrumDensity`, or a
DDP-wrapped module (gradients are all-reduced only when the wrapper itself is called).
The Ray trainer calls these functions unchanged inside each TorchTrainer worker.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from mendis_ray.config import TrainConfig
from mendis_ray.flow.actnorm import ActNorm
from mendis_ray.flow.lu import LUInvertibleLinear
from mendis_ray.train.threads import ThreadGovernor

__all__ = [
    "EarlyStopping",
    "History",
    "WeightAverage",
    "array_batches",
    "evaluate",
    "fit",
    "make_optimizer",
    "train_epoch",
]

log = logging.getLogger(__name__)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (the paper's optimiser) with ``cfg.lr`` and ``cfg.weight_decay``.

    The affine layers (ActNorm, LU linear) form their own group with lr
    ``cfg.lr * cfg.linear_lr_scale`` and no weight decay (decay would pull a whitened
    start back toward the identity).  ``linear_lr_scale == 0`` freezes them: their
    ``requires_grad`` is set to False (and back to True for a scale > 0), so no gradient is
    computed for them.  Under DDP call this *before* wrapping the model: parameters
    frozen after wrapping would never be reduced.
    """
    scale = float(cfg.linear_lr_scale)
    if not (scale >= 0.0 and math.isfinite(scale)):
        raise ValueError(f"TrainConfig.linear_lr_scale must be finite and >= 0, got {scale!r}")
    affine = [
        p
        for m in model.modules()
        if isinstance(m, ActNorm | LUInvertibleLinear)
        for p in m.parameters(recurse=False)
    ]
    ids = {id(p) for p in affine}
    for p in affine:
        p.requires_grad_(scale > 0)
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups: list[dict] = [{"params": rest}]
    if affine and scale > 0:
        groups.append({"params": affine, "lr": cfg.lr * scale, "weight_decay": 0.0})
    # fused: one kernel for every parameter tensor instead of a loop over them (on a CPU
    # the default; 120 tensors in the signal model's flow: Adam's step 6x cheaper)
    return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def array_batches(
    x: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Mini-batches of the rows of ``x`` (n, d); a fresh permutation per call."""
    n = x.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for a in range(0, n, batch_size):
        yield x[order[a : a + batch_size]]


def train_epoch(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    grad_clip: float | None = None,
    progress: Callable[[int, float], None] | None = None,
    after_step: Callable[[], None] | None = None,
    governor: ThreadGovernor | None = None,
) -> dict[str, float]:
    """One pass of maximum likelihood over ``batches`` (``after_step``: called after each
    optimizer step, e.g. :meth:`WeightAverage.update`; ``governor`` sets torch's threads
    for each step, :class:`~mendis_ray.train.threads.ThreadGovernor`).

    Returns:
        ``{"train_log_prob": mean log p per row, "rows": n, "seconds": wall time}``.
    Raises:
        FloatingPointError if the loss becomes non-finite (names the step).
    """
    model.train()
    total, rows, t0 = 0.0, 0, time.perf_counter()
    for step, x in enumerate(batches):
        if governor is not None:
            governor.before_step()
        log_p = model(x)  # (batch,)
        loss = -log_p.mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train_epoch: non-finite loss at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if after_step is not None:
            after_step()
        if governor is not None:
            governor.after_step()
        total += float(log_p.detach().sum())
        rows += x.shape[0]
        if progress is not None:
            progress(x.shape[0], float(loss.detach()))
    return {
        "train_log_prob": total / max(rows, 1),
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """Mean log p per row over ``batches`` (eval mode, no gradients)."""
    model.eval()
    total, rows = 0.0, 0
    for x in batches:
        total += float(model(x).double().sum())
        rows += x.shape[0]
    return {"val_log_prob": total / max(rows, 1), "rows": rows}


class WeightAverage:
    """An exponential moving average of a model's parameters (Polyak averaging), updated
    after every optimizer step; buffers are copied.  ``shadow`` is the averaged model, the
    one that is validated and kept."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model, self.decay = model, decay
        self.shadow = copy.deepcopy(model).eval()
        self.shadow.requires_grad_(False)

    @torch.no_grad()
    def update(self) -> None:
        # one foreach call over every tensor, as torch.optim.swa_utils' EMA does
        avg, now = list(self.shadow.parameters()), list(self.model.parameters())
        torch._foreach_lerp_(avg, now, 1.0 - self.decay)
        for a, b in zip(self.shadow.buffers(), self.model.buffers(), strict=True):
            a.copy_(b)


@dataclass
class EarlyStopping:
    """Stop when the validation log-likelihood has not improved by ``min_delta`` for
    ``patience`` epochs; remembers the best epoch's state_dict."""

    patience: int
    min_delta: float = 0.0
    best: float = -math.inf
    best_epoch: int = -1
    best_state: dict | None = None
    bad_epochs: int = 0

    def step(self, epoch: int, value: float, model: nn.Module) -> bool:
        """Record ``value``; return True when training should stop."""
        if value > self.best + self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience


@dataclass
class History:
    """Per-epoch metrics and the stopping decision."""

    epochs: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    best_epoch: int = -1
    best_val_log_prob: float = -math.inf
    initial_val_log_prob: float = math.nan


def fit(
    model: nn.Module,
    train_batches: Callable[[int], Iterable[torch.Tensor]],
    val_batches: Callable[[], Iterable[torch.Tensor]],
    cfg: TrainConfig,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
    show_progress: bool = True,
    restore_best: bool = True,
    time_limit_s: float | None = None,
    adapt_threads: bool = True,
) -> History:
    """Train for ``cfg.epochs`` epochs with early stopping on the validation log p.

    Args:
        model: ``forward(x) -> log p`` (batch,).
        train_batches: ``epoch -> iterable of batches`` (so each epoch can reshuffle or
            draw fresh noise).
        val_batches: ``() -> iterable of batches``.
        cfg: optimisation settings; ``cfg.seed`` seeds torch before training.
        on_epoch: called after each epoch with ``(epoch, metrics)`` (checkpointing,
            reporting to Ray).
        restore_best: load the best validation state into ``model`` at the end.
        time_limit_s: stop after the epoch during which this wall time is exceeded.
        adapt_threads: run each step with the faster of 1 and torch's threads, measured
            as it trains (:class:`~mendis_ray.train.threads.ThreadGovernor`: another
            process on the CPUs made an epoch 50x slower with 2 spinning threads); False
            keeps torch's setting, for bit-identical reruns.
    """
    torch.manual_seed(cfg.seed)
    optimizer = optimizer or make_optimizer(model, cfg)
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    judged = model if average is None else average.shadow  # validated, kept
    step_hook = None if average is None else average.update
    stopper = EarlyStopping(cfg.patience)
    hist = History()
    bar = _progress_bar(cfg.epochs, show_progress)
    t_start = t_shown = time.perf_counter()
    # The starting point competes too: a flow initialised at a Gaussian (see
    # mendis_ray.flow.gaussian_init) is kept if training never improves on it.
    hist.initial_val_log_prob = evaluate(model, val_batches())["val_log_prob"]
    stopper.step(-1, hist.initial_val_log_prob, model)
    stopper.bad_epochs = 0
    log.info("initial val log p %.2f", hist.initial_val_log_prob)
    drops = 0
    governor = ThreadGovernor() if adapt_threads else None
    try:
        for epoch in range(cfg.epochs):
            metrics = {
                "epoch": epoch,
                **train_epoch(
                    model,
                    train_batches(epoch),
                    optimizer,
                    cfg.grad_clip,
                    after_step=step_hook,
                    governor=governor,
                ),
            }
            metrics |= evaluate(judged, val_batches())
            hist.epochs.append(metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    train=f"{metrics['train_log_prob']:.1f}", val=f"{metrics['val_log_prob']:.1f}"
                )
            shown = bar is None and (epoch == 0 or time.perf_counter() - t_shown >= LOG_EVERY_S)
            t_shown = time.perf_counter() if shown else t_shown
            log.log(
                logging.INFO if shown else logging.DEBUG,  # the bar, or a line now and then
                "epoch %d: train log p %.2f, val log p %.2f (%.1f s)",
                epoch, metrics["train_log_prob"], metrics["val_log_prob"], metrics["seconds"],
            )  # fmt: skip
            if on_epoch is not None:
                on_epoch(epoch, metrics)
            if stopper.step(epoch, metrics["val_log_prob"], judged):
                hist.stopped_early = True
                break
            if _plateau(stopper, cfg, drops):
                drops += 1
                _drop_lr(model, optimizer, stopper, cfg.lr_drop)
                if average is not None:
                    average.shadow.load_state_dict(stopper.best_state)
                log.info("epoch %d: plateau, back to epoch %d at lr x %g", epoch,
                         stopper.best_epoch, cfg.lr_drop ** drops)  # fmt: skip
            if time_limit_s is not None and time.perf_counter() - t_start > time_limit_s:
                log.info("time limit %.0f s reached after epoch %d", time_limit_s, epoch)
                hist.stopped_early = True
                break
    finally:
        if governor is not None:
            governor.restore()
    if bar is not None:
        bar.close()
    hist.best_epoch, hist.best_val_log_prob = stopper.best_epoch, stopper.best
    if restore_best and stopper.best_state is not None:
        model.load_state_dict(stopper.best_state)
    return hist


MAX_LR_DROPS = 2
#: without a progress bar, an epoch's log line is info-level at most this often (the first
#: epoch's always; the others debug-level): a 1-second epoch does not flood the console
LOG_EVERY_S = 10.0


def _plateau(stopper: EarlyStopping, cfg: TrainConfig, drops: int) -> bool:
    """Time to drop the lr: ``patience // 2`` epochs without improvement, drops left."""
    return (
        cfg.lr_drop < 1
        and drops < MAX_LR_DROPS
        and stopper.best_state is not None
        and stopper.bad_epochs >= max(1, cfg.patience // 2)
    )


def _drop_lr(model: nn.Module, optimizer, stopper: EarlyStopping, factor: float) -> None:
    """Go back to the best state and multiply every group's lr by ``factor``."""
    model.load_state_dict(stopper.best_state)
    for group in optimizer.param_groups:
        group["lr"] *= factor
    stopper.bad_epochs = 0


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: the log lines still show progress
        return None
    return tqdm(total=total, desc="epochs", unit="epoch", leave=False)
