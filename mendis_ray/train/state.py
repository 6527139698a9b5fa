"""Resumable training state without pickle: the optimizer, the early-stopping record
and the history in a folder beside a model checkpoint.

Layout of a training-state folder (what :mod:`mendis_ray.distributed.train` reports to
Ray Train every ``checkpoint_every`` epochs)::

    model/              the current weights (mendis_ray.flow.checkpoint format)
    state.safetensors   optimizer tensors (``opt.<param>.<key>``) and the best weights
                        so far (``best.<name>``)
    state.json          epoch, history, early-stopping scalars, optimizer param groups
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mendis_ray.flow.checkpoint import CheckpointError
from mendis_ray.train.loop import EarlyStopping

__all__ = ["TrainingState", "load_training_state", "save_training_state"]

STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"


class TrainingState(dict):
    """``epoch`` (last finished), ``history`` (list of epoch metrics), ``stopper``
    (EarlyStopping) and ``extra`` (JSON), as returned by :func:`load_training_state`."""


def save_training_state(
    path: str | os.PathLike,
    optimizer: torch.optim.Optimizer,
    stopper: EarlyStopping,
    history: list[dict],
    epoch: int,
    extra: dict | None = None,
) -> None:
    """Write ``state.json`` and ``state.safetensors`` into the folder ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"opt.{pid}.{key}"] = val.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = val
    for name, val in (stopper.best_state or {}).items():
        tensors[f"best.{name}"] = val.detach().cpu().contiguous()
    meta = {
        "epoch": epoch,
        "history": history,
        "stopper": {
            "patience": stopper.patience,
            "min_delta": stopper.min_delta,
            "best": stopper.best if math.isfinite(stopper.best) else None,
            "best_epoch": stopper.best_epoch,
            "bad_epochs": stopper.bad_epochs,
        },
        "param_groups": sd["param_groups"],
        "opt_scalars": scalars,
        "extra": extra or {},
    }
    save_file(tensors, str(path / STATE_TENSORS))
    (path / STATE_JSON).write_text(json.dumps(meta, indent=1, default=float))


def load_training_state(
    path: str | os.PathLike, optimizer: torch.optim.Optimizer, model: nn.Module
) -> TrainingState:
    """Load the optimizer state into ``optimizer`` (its parameters must be ``model``'s,
    in the same order) and return the rest; raises CheckpointError naming the file."""
    path = Path(path)
    try:
        meta = json.loads((path / STATE_JSON).read_text())
        tensors = load_file(str(path / STATE_TENSORS), device="cpu")
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable training state ({err})") from err
    state: dict[int, dict] = {}
    for key, val in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = val
    for pid, sc in meta.get("opt_scalars", {}).items():
        state.setdefault(int(pid), {}).update(sc)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: optimizer state does not fit this model ({err})") from err
    s = meta["stopper"]
    stopper = EarlyStopping(int(s["patience"]), float(s["min_delta"]))
    stopper.best = -math.inf if s["best"] is None else float(s["best"])
    stopper.best_epoch, stopper.bad_epochs = int(s["best_epoch"]), int(s["bad_epochs"])
    best = {k.removeprefix("best."): v for k, v in tensors.items() if k.startswith("best.")}
    if best:
        ref = model.state_dict()
        stopper.best_state = {k: v.to(ref[k].device) for k, v in best.items() if k in ref}
    return TrainingState(
        epoch=int(meta["epoch"]),
        history=list(meta["history"]),
        stopper=stopper,
        extra=meta.get("extra", {}),
    )
