"""Simulated data sets written as Parquet shards: the paper's training set, held-out
inliers and the outlier classes.

Determinism: set ``k`` of a run with seed ``s`` draws its labels from
``SeedSequence([s, k])`` and shard ``j``'s noise from ``SeedSequence([s, k, j])``, so a
seed fixes every byte whatever the batch size.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from mendis_ray.spectra.degrade import LABEL_SCATTER, NOISE_FREE_IVAR, add_noise, scatter_labels
from mendis_ray.spectra.population import (
    SURVEY_SETS,
    Realized,
    SetContext,
    SurveyPopulation,
    apply_masks,
    inliers,
    observe_labels,
)
from mendis_ray.spectra.shards import make_table, write_dataset
from mendis_ray.spectra.simulate import (
    OUTLIER_CLASSES,
    Simulator,
    StellarLabels,
    paper_training_labels,
)

__all__ = [
    "POPULATIONS",
    "SetSpec",
    "paper_sets",
    "survey_sets",
    "write_simulated_set",
    "write_survey_set",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SetSpec:
    """One simulated set: a name, a size and a label sampler ``f(n, rng) -> labels``."""

    name: str
    n: int
    sampler: Callable[[int, np.random.Generator], StellarLabels]
    n_shards: int = 1


def noise_free(snr: float) -> bool:
    """S/N 0 or inf asks for noise-free spectra (ivar ``NOISE_FREE_IVAR``, true labels)."""
    return not np.isfinite(snr) or snr <= 0


def _shard_tables(
    spec: SetSpec,
    labels: StellarLabels,
    sim: Simulator,
    snr: float,
    seed: int,
    set_index: int,
    noise: str,
) -> Iterator[pa.Table]:
    bounds = np.linspace(0, len(labels), spec.n_shards + 1).astype(int)
    for j, (a, b) in enumerate(itertools.pairwise(bounds)):
        t0 = time.perf_counter()
        lab = labels[a:b]
        rng = np.random.default_rng(np.random.SeedSequence([seed, set_index, j]))
        true_labels = np.stack([lab.teff, lab.logg, lab.feh], axis=1)
        if noise_free(snr):  # degraded later (mendis_ray.distributed.data)
            flux = sim(lab).astype(np.float32)
            ivar = np.full_like(flux, NOISE_FREE_IVAR)
            obs = true_labels
        else:
            flux, ivar = add_noise(sim(lab), snr, rng, model=noise)
            obs = scatter_labels(true_labels, rng, LABEL_SCATTER)
        extra: dict = dict(lab.truth_columns())
        extra["truth_class"] = np.array([spec.name] * (b - a))
        log.info(
            "%s shard %d/%d: %d spectra in %.1f s",
            spec.name,
            j + 1,
            spec.n_shards,
            b - a,
            time.perf_counter() - t0,
        )
        yield make_table(
            [f"{spec.name}-{i:07d}" for i in range(a, b)],
            flux,
            ivar,
            teff=obs[:, 0],
            logg=obs[:, 1],
            feh=obs[:, 2],
            snr=np.full(b - a, np.inf if noise_free(snr) else snr),
            source="mendis_ray.simulate",
            extra=extra,
        )


def write_simulated_set(
    out_dir: str | Path,
    spec: SetSpec,
    sim: Simulator,
    *,
    snr: float = 300.0,
    seed: int = 0,
    set_index: int = 0,
    noise: str = "photon",
) -> dict:
    """Simulate ``spec`` and write it to ``out_dir/spec.name``; return a summary row."""
    t0 = time.perf_counter()
    labels = spec.sampler(spec.n, np.random.default_rng(np.random.SeedSequence([seed, set_index])))
    generator = {
        "name": "mendis_ray.spectra.simulate",
        "set": spec.name,
        "n": spec.n,
        "snr": None if noise_free(snr) else snr,
        "noise": "none" if noise_free(snr) else noise,
        "seed": seed,
        "set_index": set_index,
        "label_scatter": None if noise_free(snr) else LABEL_SCATTER,
        "simulator": sim.config.__dict__,
    }
    path = Path(out_dir) / spec.name
    files = write_dataset(
        path,
        _shard_tables(spec, labels, sim, snr, seed, set_index, noise),
        spec.n_shards,
        sim.grid,
        generator,
        prefix=spec.name,
    )
    return _summary_row(spec.name, spec.n, path, files, time.perf_counter() - t0)


def _summary_row(name: str, n: int, path: Path, files: list[Path], seconds: float) -> dict:
    """The summary row of one written set (``mendis simulate`` prints and saves these)."""
    return {
        "set": name,
        "rows": n,
        "shards": len(files),
        "path": str(path),
        "megabytes": sum(f.stat().st_size for f in files) / 1e6,
        "seconds": seconds,
    }


def paper_sets(
    n_train: int = 20_000,
    n_test: int = 2_000,
    n_outlier: int = 1_000,
    n_shards: int = 8,
) -> list[SetSpec]:
    """The paper's training set, held-out inliers and the three outlier classes."""
    shards_for = lambda n: max(1, min(n_shards, n // 500))  # noqa: E731
    specs = [
        SetSpec("train", n_train, paper_training_labels, n_shards),
        SetSpec("test", n_test, paper_training_labels, shards_for(n_test)),
    ]
    specs += [
        SetSpec(name, n_outlier, fn, shards_for(n_outlier)) for name, fn in OUTLIER_CLASSES.items()
    ]
    return [s for s in specs if s.n > 0]


# --- the survey population (mendis_ray.spectra.population) ----------------------------

#: Populations ``mendis simulate --population`` knows.
POPULATIONS = ("paper", "survey")


@dataclass(frozen=True)
class SurveySpec:
    """One survey set: a name, a size, a generator ``f(ctx, n, rng) -> Realized``."""

    name: str
    n: int
    maker: Callable[[SetContext, int, np.random.Generator], Realized]
    n_shards: int = 1


def survey_sets(
    n_train: int = 20_000,
    n_test: int = 2_000,
    n_outlier: int = 1_000,
    n_shards: int = 8,
) -> list[SurveySpec]:
    """Training, validation-free held-out inliers (``test``) and every outlier set of
    :data:`~mendis_ray.spectra.population.SURVEY_SETS`, ``n_outlier`` stars each."""
    shards_for = lambda n: max(1, min(n_shards, n // 500))  # noqa: E731
    specs = [
        SurveySpec("train", n_train, inliers, n_shards),
        SurveySpec("test", n_test, inliers, shards_for(n_test)),
    ]
    specs += [SurveySpec(k, n_outlier, f, shards_for(n_outlier)) for k, f in SURVEY_SETS.items()]
    return [s for s in specs if s.n > 0]


def _survey_tables(
    spec: SurveySpec, r: Realized, ctx: SetContext, set_index: int
) -> Iterator[pa.Table]:
    bounds = np.linspace(0, spec.n, spec.n_shards + 1).astype(int)
    for j, (a, b) in enumerate(itertools.pairwise(bounds)):
        rng = np.random.default_rng(np.random.SeedSequence([ctx.seed, set_index, j]))
        lab, snr = r.labels[a:b], r.snr[a:b]
        flux, ivar = add_noise(r.flux[a:b], snr, rng)
        apply_masks(ctx.pop, ivar, rng)
        true = np.stack([lab.teff, lab.logg, lab.feh], axis=1)
        obs = observe_labels(ctx.pop, true, snr, rng)
        extra: dict = dict(lab.truth_columns())
        extra |= {k: v[a:b] for k, v in r.truth.items()}
        extra["truth_class"] = np.array([spec.name] * (b - a))
        yield make_table(
            [f"{spec.name}-{i:07d}" for i in range(a, b)], flux, ivar,
            teff=obs[:, 0], logg=obs[:, 1], feh=obs[:, 2], snr=snr,
            source="mendis_ray.population.survey", extra=extra,
        )  # fmt: skip


def write_survey_set(
    out_dir: str | Path,
    spec: SurveySpec,
    sim: Simulator,
    *,
    seed: int = 0,
    set_index: int = 0,
    population: SurveyPopulation | None = None,
) -> dict:
    """Simulate survey set ``spec`` and write it to ``out_dir/spec.name``; a summary row.

    Determinism as for :func:`write_simulated_set`: the stars come from
    ``SeedSequence([seed, set_index])`` and shard ``j``'s noise, masks and label errors from
    ``SeedSequence([seed, set_index, j])``."""
    t0 = time.perf_counter()
    ctx = SetContext(population or SurveyPopulation(), sim, seed)
    r = spec.maker(ctx, spec.n, np.random.default_rng(np.random.SeedSequence([seed, set_index])))
    generator = {
        "name": "mendis_ray.spectra.population", "population": "survey", "set": spec.name,
        "n": spec.n, "seed": seed, "set_index": set_index, "noise": "photon, per-star S/N",
        "population_config": {k: v for k, v in ctx.pop.__dict__.items()},
        "simulator": sim.config.__dict__,
    }  # fmt: skip
    path = Path(out_dir) / spec.name
    files = write_dataset(
        path, _survey_tables(spec, r, ctx, set_index), spec.n_shards, sim.grid, generator,
        prefix=spec.name,
    )  # fmt: skip
    dt = time.perf_counter() - t0
    log.info("%s: %d spectra in %.1f s", spec.name, spec.n, dt)
    return _summary_row(spec.name, spec.n, path, files, dt)
