"""Typed configuration of the Mendis flow and its training, with named presets.

``tiny`` is for tests, ``compact`` is the CPU default (trains on the 20,000-spectrum set
on a 2-core machine in tens of minutes), ``paper`` is the published architecture
(20 units on the 2408-dimensional joint space, about 1e9 parameters).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Self

__all__ = ["N_LABELS", "PRESETS", "FlowConfig", "SignalConfig", "TrainConfig", "get_preset"]

#: Labels modelled jointly with the spectrum: Teff, log g, [Fe/H].
N_LABELS = 3


class _DictConfig:
    """``replace``, ``to_dict`` and a strict ``from_dict`` for the config dataclasses."""

    def replace(self, **changes: object) -> Self:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Self:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class FlowConfig(_DictConfig):
    """Architecture of the flow on x = (standardized spectrum, standardized labels).

    Each unit is ActNorm -> invertible 1x1 (LU) -> rational-quadratic spline coupling.
    """

    name: str = "custom"
    n_pix: int = 2405
    n_labels: int = N_LABELS
    n_units: int = 4
    hidden: int = 256  # conditioner width
    n_blocks: int = 2  # residual blocks in each conditioner
    n_bins: int = 8  # spline bins
    tail_bound: float = 5.0  # spline acts on [-B, B]; identity outside
    dropout: float = 0.0
    grid: str = "paper"

    @property
    def n_features(self) -> int:
        return self.n_pix + self.n_labels


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (paper: Adam, lr 5e-6, 3000 epochs)."""

    lr: float = 5e-6
    batch_size: int = 128
    epochs: int = 3000
    grad_clip: float = 10.0
    weight_decay: float = 0.0
    # lr multiplier of the affine layers (ActNorm, LU): Adam moves every one of the n^2
    # LU entries by about lr per step, which at lr >> 1e-6 scrambles a whitened start.
    linear_lr_scale: float = 1.0
    patience: int = 50  # epochs without validation improvement before stopping
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def replace(self, **changes: object) -> TrainConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class SignalConfig(_DictConfig):
    """The signal-space model (:mod:`mendis_ray.flow.signal`): its linear first stage, its
    conditional flow on (signal coordinates, labels) and how that flow is trained."""

    # linear stage
    n_signal: int | None = None  # k; None: directions whose variance beats a noisy star's noise
    k_max: int = 32  # largest automatic k
    snr_ratio: float = 1.0  # the automatic rule's signal-to-noise variance ratio
    # conditional flow: the paper's units on k + 3 dimensions, context = noise level
    n_units: int = 6
    hidden: int = 128
    n_blocks: int = 2
    n_bins: int = 8
    tail_bound: float = 5.0
    # noise augmentation: each epoch a fraction of the training stars is made noisier by a
    # variance factor log-uniform in [1, noise_augment], exactly, in the signal coordinates.
    # It decouples the noise-level context from the stars' content (with one training S/N
    # the noise level otherwise encodes line depths, and the flow learns it) and teaches
    # the flow noise levels below the training S/N.  1: off.
    noise_augment: float = 4.0
    augment_fraction: float = 0.5
    # training (Adam, early stopping on the validation log p)
    lr: float = 1e-3
    batch_size: int = 256
    epochs: int = 200
    patience: int = 12
    weight_decay: float = 1e-5
    grad_clip: float = 10.0
    seed: int = 0

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            lr=self.lr, batch_size=self.batch_size, epochs=self.epochs, grad_clip=self.grad_clip,
            weight_decay=self.weight_decay, patience=self.patience, seed=self.seed,
        )  # fmt: skip


PRESETS: dict[str, tuple[FlowConfig, TrainConfig]] = {
    "tiny": (
        FlowConfig(name="tiny", n_pix=16, n_units=2, hidden=32, n_blocks=1, n_bins=4, grid="none"),
        TrainConfig(lr=1e-3, batch_size=64, epochs=5, patience=5),
    ),
    "compact": (
        FlowConfig(name="compact", n_units=4, hidden=128, n_blocks=1, n_bins=8),
        # lr 1e-3 with the affine layers at full rate diverged on a fresh 10,000-spectrum
        # set (epoch 0: train log p -2e11 against a start of -2276): the 2408 x 2408 LU
        # layers stay at their Gaussian start (as in `mendis demo`), the splines learn.
        TrainConfig(lr=3e-4, batch_size=256, epochs=40, patience=8, linear_lr_scale=0.0),
    ),
    "paper": (
        FlowConfig(name="paper", n_units=20, hidden=1536, n_blocks=2, n_bins=8),
        TrainConfig(lr=5e-6, batch_size=64, epochs=3000, patience=100),
    ),
}


def get_preset(name: str) -> tuple[FlowConfig, TrainConfig]:
    """(FlowConfig, TrainConfig) of a named preset."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}") from None
