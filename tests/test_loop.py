"""The training loop's stopping rules: early stopping and the lr drop on a plateau."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mendis_ray.config import TrainConfig
from mendis_ray.train.loop import fit


class _Mean(nn.Module):
    """log N(x; mu, 1) up to a constant: one parameter, so its path is easy to follow."""

    def __init__(self) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -0.5 * (x[:, 0] - self.mu) ** 2


@pytest.mark.parametrize("lr_drop", [1.0, 0.3])
def test_lr_drops_on_a_plateau_then_stops_at_the_best_state(lr_drop: float) -> None:
    # training pulls mu towards 1, validation prefers 0: the start is the best state
    train = torch.ones(64, 1)
    val = torch.zeros(64, 1)
    model = _Mean()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = TrainConfig(lr=0.1, epochs=100, patience=4, lr_drop=lr_drop)
    hist = fit(model, lambda e: [train], lambda: [val], cfg, optimizer=opt, show_progress=False)
    assert hist.best_epoch == -1 and hist.stopped_early
    assert model.mu.item() == 0.0  # the best (starting) state is restored
    if lr_drop == 1.0:
        assert len(hist.epochs) == 4 and opt.param_groups[0]["lr"] == pytest.approx(0.1)
    else:  # a drop after 2 bad epochs, twice (each from the best state), then 4 more
        assert len(hist.epochs) == 2 + 2 + 4
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.3**2)
        # the first drop (after epoch 1) restarted training from mu = 0: log p(1) = -0.5
        assert hist.epochs[2]["train_log_prob"] == pytest.approx(-0.5, abs=1e-6)
        assert hist.epochs[1]["train_log_prob"] > -0.5  # without the restore, mu had moved


def test_lr_drop_keeps_an_improving_run_going() -> None:
    """No plateau, no drop: a run that improves every epoch keeps its lr."""
    train = val = torch.full((64, 1), 1.0)
    model = _Mean()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cfg = TrainConfig(lr=0.05, epochs=6, patience=4, lr_drop=0.3)
    hist = fit(model, lambda e: [train], lambda: [val], cfg, optimizer=opt, show_progress=False)
    assert len(hist.epochs) == 6 and not hist.stopped_early
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_weight_average_is_validated_and_kept() -> None:
    """With ema_decay d, the validated and restored weights are the moving average: SGD
    moves mu from 0 towards 1 by lr (1 - mu) per step; the average follows
    a <- d a + (1 - d) mu; validation on the training data improves every epoch, so the
    final state is the last average, not the raw weights."""
    train = val = torch.ones(64, 1)
    model = _Mean()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    d, epochs = 0.5, 5
    cfg = TrainConfig(lr=0.1, epochs=epochs, patience=10, ema_decay=d)
    hist = fit(model, lambda e: [train], lambda: [val], cfg, optimizer=opt, show_progress=False)
    mu, avg = 0.0, 0.0
    for _ in range(epochs):  # one batch per epoch: one step
        mu += 0.1 * (1 - mu)
        avg = d * avg + (1 - d) * mu
    assert hist.best_epoch == epochs - 1
    assert model.mu.item() == pytest.approx(avg, rel=1e-6)
    assert hist.epochs[-1]["val_log_prob"] == pytest.approx(-0.5 * (1 - avg) ** 2, rel=1e-5)


@pytest.mark.parametrize(("show_progress", "every", "shown"), [(True, 0.0, 0), (False, 0.0, 3),
                                                                (False, 1e9, 1)])  # fmt: skip
def test_one_progress_line_per_stage(show_progress, every, shown, caplog, monkeypatch) -> None:
    """With the progress bar, which shows each epoch's log p, the epochs' log lines are
    debug-level (the console gets the bar alone); without it an epoch's line is
    info-level once ``LOG_EVERY_S`` has passed since the last one (the first always)."""
    if show_progress:
        pytest.importorskip("tqdm")
    monkeypatch.setattr("mendis_ray.train.loop.LOG_EVERY_S", every)
    data = torch.ones(8, 1)
    cfg = TrainConfig(lr=0.1, epochs=3, patience=10)
    with caplog.at_level("INFO", logger="mendis_ray.train.loop"):
        fit(_Mean(), lambda e: [data], lambda: [data], cfg, show_progress=show_progress)
    epochs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(epochs) == shown and (shown == 0 or epochs[0].startswith("epoch 0:"))
