"""Typed configuration of the Mendis flow and its training, with named presets.

``tiny`` is for tests, ``compact`` is the CPU default (trains on the 20,000-spectrum set
on a 2-core machine in tens of minutes), ``paper`` is the published architecture
(20 units on the 2408-dimensional joint space, about 1e9 parameters).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Self

__all__ = [
    "MARGINAL_MODES",
    "N_LABELS",
    "PRESETS",
    "RANK_BY",
    "FlowConfig",
    "ScoreConfig",
    "SignalConfig",
    "TrainConfig",
    "get_preset",
]

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
    # on a plateau of patience // 2 epochs: go back to the best state and multiply the lr
    # by this, at most twice, before stopping on the full patience (1: off)
    lr_drop: float = 1.0
    # > 0: validate and keep an exponential moving average of the weights with this decay
    # per step (Polyak averaging; 0: the weights themselves)
    ema_decay: float = 0.0
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
    # 16 bins, not 8: the stars between the alpha sequences 0.67 -> 0.74 (signal_score AUROC
    # on the survey benchmark, two seeds), the other sets unchanged.  One residual block
    # reached 0.77 but lost the paper set's [Mg/H] edge (0.985 -> 0.964) and its S/N
    # blindness (S/N 1000 vs 300: 0.42), so two blocks (bench/bench_single_snr.py --n 20000)
    n_blocks: int = 2
    n_bins: int = 16
    # the splines act on [-10, 10] (identity beyond): 0.4% of the training stars lie beyond
    # 5 sd in the heavy-tailed signal coordinates.  Validation log q on the survey
    # benchmark -3.73 (5) -> -3.70 (6.5) -> -3.68 (8) -> -3.65 (10), -3.66 (15); the AUROCs
    # within 0.005
    tail_bound: float = 10.0
    # the residual score also tests each element's line pattern (the simulator's d flux /
    # d[X/H]; only on its grids): single-element anomalies 0.906 -> 0.965 (`score`) on the
    # survey benchmark, the other sets within 0.013
    element_tests: bool = True
    # the signal score also looks for gaps in two-dimensional projections, each label
    # against each independent component of the signal coordinates at fixed labels
    # (mendis_ray.science.structure): between the alpha sequences 0.74 -> 0.89
    # (signal_score AUROC, survey benchmark), the other sets within 0.01
    structure_tests: bool = True
    # the signal score also tests the flow's steepest compression at the star (the smallest
    # log-derivative of any coupling's spline, each in units of its spread among held-out
    # stars: a star in a gap the flow has learned sits where one spline is flat;
    # mendis_ray.flow.signal.ConditionalFlow): survey benchmark, between the alpha
    # sequences 0.935 -> 0.973 (signal_score), 0.902 -> 0.955 (score); off the giant branch
    # 0.983 -> 0.977 (score); The Payne's dwarfs between the [Mg/Fe] sequences 0.913 -> 0.935
    compression_test: bool = True
    # the residual score is calibrated on the training stars, each projected on a basis
    # fitted without it (this many folds; 0 or 1: on the full basis, in-sample).  In
    # sample, the basis has absorbed part of each star's own noise: with 2,700 training
    # stars, k = 32 and 7,214 pixels, held-out inliers' residual percentiles fell below 1%
    # for 8% of them (mean 41); see mendis_ray.science.signal_tails.cross_fitted
    residual_folds: int = 3
    # held-out stars whose flow log q lies more than this many interquartile ranges below
    # the median are left out of the scores' reference (a catalogue's CEMP stars, rotators,
    # stripped stars: their far tails are not an inlier's); None: every one kept.  Off by
    # default: with 56 rotators and stripped stars among the survey benchmark's 2,048
    # held-out stars, 6 left out those 56 and no other (between the alpha sequences 0.835
    # -> 0.900), but after a short training (3,000 stars, 5 epochs) it also left out 4 of
    # 300 clean ones (test inliers below the 1st percentile 1.3% -> 2.7%); README, "A
    # catalogue that holds the stars you search for"
    far_iqr: float | None = None
    # noise augmentation: each epoch a fraction of the training stars is made noisier by a
    # variance factor log-uniform in [1, noise_augment], exactly, in the signal coordinates.
    # It decouples the noise-level context from the stars' content (with one training S/N
    # the noise level otherwise encodes line depths, and the flow learns it) and teaches
    # the flow noise levels below the training S/N.  1: off.
    noise_augment: float = 4.0
    augment_fraction: float = 0.5
    # ... and at least down to this S/N (the factor grows to (S/N of the noisiest training
    # star / min_snr)^2): the flow learns, and the signal score is calibrated on noised
    # copies of held-out stars, down to about this S/N whatever the training S/N (noisier
    # spectra are flagged noise_range).  Trained at S/N 300 alone and scored at 50-500
    # (bench/bench_payne.py --train-snr 300 300), the inliers' mean signal percentile in
    # the noisiest S/N quartile was 1.3 with the factor 4 alone, 52.4 with this (and k
    # counting that noise: between the [Mg/Fe] sequences 0.550 -> 0.906).  25: a survey's
    # S/N 50 stars reach it with the factor 4
    min_snr: float = 25.0
    # training (Adam, early stopping on the validation log p); 2e-3 with the weight average
    # below: the same validation log q as 1e-3 (-3.73 / -3.72) in 139 s instead of 178 s
    lr: float = 2e-3
    batch_size: int = 256
    epochs: int = 200
    patience: int = 12
    # back to the best state at lr x 0.3 on a plateau of patience // 2 epochs (6; 4 with the
    # large-set steps below; at most twice): validation log q on the survey benchmark +0.25
    # nats per star (-4.07 -> -3.82), and +0.13 / +0.19 with one residual block (two seeds)
    lr_drop: float = 0.3
    # validate and keep an exponential moving average of the weights (decay per step): the
    # validation log q on the survey benchmark -3.82 -> -3.72 nats per star (0.99: -3.73,
    # 0.999: -3.74 and 30 more epochs), the AUROCs within 0.005
    ema_decay: float = 0.995
    weight_decay: float = 1e-5
    grad_clip: float = 10.0
    seed: int = 0
    # a set of at least this many training rows (the 90% that do not validate: 16,384 of
    # about 18,200 spectra) takes steps of 2 x batch_size rows at 1.5 x lr, with the weight
    # average's decay squared (the same horizon in rows) and 2/3 of the patience.  On a CPU
    # a step's fixed cost dominates (512 rows cost 1.2x 256), so an epoch takes 0.6x as
    # long: `mendis train` on 20,000 survey spectra 245 -> 171 s end to end (286 -> 227 s
    # on a busier host), validation log q -3.52 -> -3.55 (bench/bench_train_signal.py);
    # on the survey benchmark's split -3.50 -> -3.50 and every AUROC within 0.001.
    # Smaller sets keep the settings above (at 512 rows an epoch of theirs would be under
    # 32 steps).  0: never; `mendis train --batch-size` or `--lr` and a lr searched by Tune
    # turn it off (the settings as given)
    large_set: int = 16384

    def train_config(self, n_rows: int = 0) -> TrainConfig:
        """The optimiser's settings for ``n_rows`` training rows (see ``large_set``)."""
        steps = TrainConfig(
            lr=self.lr, batch_size=self.batch_size, epochs=self.epochs, grad_clip=self.grad_clip,
            weight_decay=self.weight_decay, patience=self.patience, seed=self.seed,
            lr_drop=self.lr_drop, ema_decay=self.ema_decay,
        )  # fmt: skip
        if not 0 < self.large_set <= n_rows:
            return steps
        return dataclasses.replace(
            steps, lr=1.5 * self.lr, batch_size=2 * self.batch_size,
            patience=max(1, round(self.patience * 2 / 3)), ema_decay=self.ema_decay**2,
        )  # fmt: skip

    def with_given(self, **changes: object) -> SignalConfig:
        """``replace(**changes)``, with the large-set steps off where ``changes`` sets the lr
        or the batch size (a user's or a search's): those are used as given, any set size."""
        if {"lr", "batch_size"} & changes.keys():
            changes["large_set"] = 0
        return self.replace(**changes)


#: which rows get the label-free score: those without labels, every row, or none
MARGINAL_MODES = ("unlabelled", "all", "none")
#: the catalog ranking's key: the primary score's percentile, the signal score, or (signal-space
#: model) the residual score (mendis_ray.science.ranking.RANK_KEYS: the columns)
RANK_BY = ("percentile", "signal", "residual")

#: spectra per actor call of ``mendis score`` by checkpoint kind, where ``batch_size`` is
#: not set: the signal-space model scores a spectrum ~100x faster than the full-space
#: flow, so its per-batch costs weigh more (bench/bench_infer.py --model signal, 2 actors
#: x 1 thread on 2 cores: 5,100 spectra/s at 256, 12,300 at 1,024)
SCORE_BATCH_SIZE = {"flow": 256, "signal": 1024}


def _setting(default: object, help: str, **cli: object):
    """A config field with its command-line help (and ``choices``, ``flag``, ``metavar``):
    the options of ``mendis score`` are generated from these (``mendis_ray.cli_options``)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class ScoreConfig(_DictConfig):
    """How spectra are scored: the one source of the score settings.

    It feeds the ``mendis score`` options (generated from the fields, with their help;
    ``mendis_ray.cli_options.add_config_options``), the batch pipeline
    (:func:`mendis_ray.distributed.infer.score_catalog` takes a ScoreConfig), the scoring
    arguments of Serve (``ServeArgs.marginal`` and the Scorer knobs, defaults and help from
    here) and the ``score_catalog:`` section of ``jobs/configs/*.yaml`` (its keys are
    these fields).  What is scored and where (checkpoint, inputs, ``--out``, a labels
    table, a verdicts file, the Ray address) are arguments, not settings.

    The label-free default is ``"unlabelled"`` for both ``mendis score`` and HTTP: every
    spectrum gets a score (a score is never silently missing: with ``"none"`` an
    unlabelled spectrum of a full-space flow would get null scores and rank as if
    typical); the signal-space model scores unlabelled spectra label-free anyway (cheap),
    so it only matters for a full-space flow, where Serve bounds the label-free spectra
    of a request (``max_marginal``; a request over it gets a 422 that says to pass
    ``marginal=none`` or labels) and batch scoring pays its cost offline.
    """

    # --- what each spectrum gets
    # rows that get the label-free score (full-space flow: an optimisation per spectrum,
    # ~100-1000x a labelled score; the signal-space model always scores them label-free)
    marginal: str = _setting(
        "unlabelled", "rows that get the (slow) label-free score", choices=MARGINAL_MODES
    )
    # Scorer knobs (full-space flow; the signal-space model has its own calibration)
    # widening of the training flux/label ranges before flux_range/label_range flags, in
    # training standard deviations
    range_sigma: float = _setting(5.0, "flow: flag values beyond the training range widened "
                                  "by this many training standard deviations")  # fmt: skip
    # a spectrum with more masked pixels (ivar 0) than this fraction is flagged `masked`
    max_masked_fraction: float = _setting(0.2, "flag spectra with more masked pixels than this")
    # Adam steps of the label profile behind the label-free score
    profile_steps: int = _setting(200, "flow: Adam steps of the label-free score's label fit")
    # --- the batch pipeline (mendis score): model batches and the actor pool
    # spectra per map_batches call and per model evaluation (Serve has its own batch_size:
    # a latency knob of the @serve.batch queue, 64 by default); None: by checkpoint kind,
    # SCORE_BATCH_SIZE (see batch_size_for)
    batch_size: int | None = _setting(
        None, "spectra per actor call (default: 256 for a full-space flow, 1024 for the "
        "signal-space model)",
    )  # fmt: skip
    min_actors: int = _setting(1, "smallest actor pool")
    # None: as many actors as the cluster's GPUs allow, or its CPUs less one (for reads)
    max_actors: int | None = _setting(
        None, "largest actor pool (default: as many as the cluster's GPUs or CPUs - 1 allow)"
    )
    # CPUs reserved per actor; fractions allowed (a pool holding every CPU starves reads)
    num_cpus_per_actor: float = _setting(
        1.0, "CPUs per actor (fractions allowed)", flag="--cpus-per-actor"
    )
    # None: 1 if the cluster has GPUs, else 0
    num_gpus_per_actor: float | None = _setting(
        None, "default: 1 if the cluster has GPUs, else 0", flag="--gpus-per-actor"
    )
    # None: the actor's whole CPUs, at least 1 (Ray sets OMP_NUM_THREADS=1 in workers)
    threads_per_actor: int | None = _setting(
        None, "torch threads per actor (default: its whole CPUs, at least 1)"
    )
    # --- the outputs of a catalog run
    top_n: int = _setting(100, "rows of top_outliers.csv")  # the outlier table's rows
    gallery_n: int = _setting(12, "outliers in gallery.png (0: none)")  # of them, in the gallery
    # the most typical rows among which the gallery finds each outlier's neighbour
    n_typical: int = _setting(200, "typical rows the gallery's neighbours are chosen from")
    # percentile: primary score (log p, or the signal model's score); signal: signal score;
    # residual: the signal-space model's residual score
    rank_by: str = _setting(
        "percentile", "percentile: primary score (log p); signal: projected signal score; "
        "residual: the signal-space model's residual score", choices=RANK_BY,
    )  # fmt: skip
    flags_first: bool = _setting(False, "rank flagged spectra before unflagged ones")
    # also write OUT/triage.html (the ranked outliers, explanations, verdict buttons)
    html: bool = _setting(
        False, "also write OUT/triage.html: the ranked outliers with their explanations and "
        "verdict buttons, a self-contained page that opens with no internet",
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.marginal not in MARGINAL_MODES:
            raise ValueError(f"marginal must be one of {MARGINAL_MODES}, got {self.marginal!r}")
        if self.rank_by not in RANK_BY:
            raise ValueError(f"rank_by must be one of {RANK_BY}, got {self.rank_by!r}")
        if self.top_n < 1 or self.gallery_n < 0 or self.n_typical < 1:
            raise ValueError(f"need top_n >= 1, gallery_n >= 0, n_typical >= 1 (got "
                             f"{self.top_n}, {self.gallery_n}, {self.n_typical})")  # fmt: skip
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def batch_size_for(self, kind: str) -> int:
        """Spectra per actor call for a checkpoint of ``kind`` (``"flow"`` or
        ``"signal"``): ``batch_size``, or the kind's default (:data:`SCORE_BATCH_SIZE`)."""
        if self.batch_size is not None:
            return self.batch_size
        return SCORE_BATCH_SIZE.get(kind, SCORE_BATCH_SIZE["flow"])

    def scorer_kwargs(self) -> dict:
        """The knobs of :class:`mendis_ray.science.ood.Scorer` (full-space flow)."""
        return {"range_sigma": self.range_sigma, "max_masked_fraction": self.max_masked_fraction,
                "profile_steps": self.profile_steps}  # fmt: skip


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
