"""One local Ray session for every distributed test (``ray.init`` costs seconds), plus
small simulated datasets and a trained checkpoint shared by the tests.

Everything here is marked ``ray``; run only these with ``pytest -m ray``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

for key, value in {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
}.items():
    os.environ.setdefault(key, value)


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def ray_session():
    """The embedded Ray the package starts (4 logical CPUs on any machine, 1 GB object
    store, no dashboard, its worker setup hook)."""
    import ray

    from mendis_ray.distributed.session import ensure_ray

    ensure_ray(num_cpus=4, object_store_memory=1 << 30)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sim_sets(tmp_path_factory):
    """Simulated shards on the paper grid: ``train`` (noise-free, 4 shards, 480 rows),
    ``test`` (S/N 300, 160 rows), ``cemp`` (S/N 300, 80 rows) and ``ref`` (S/N 300, 80
    rows: the scoring reference, disjoint from every scored row so that no score sits
    exactly on a reference value, where the percentile would flip on float rounding)."""
    from mendis_ray.spectra.datasets import SetSpec, write_simulated_set
    from mendis_ray.spectra.simulate import OUTLIER_CLASSES, Simulator, paper_training_labels

    out = tmp_path_factory.mktemp("sim")
    sim = Simulator()
    write_simulated_set(out, SetSpec("train", 480, paper_training_labels, 4), sim, snr=0, seed=1)
    write_simulated_set(out, SetSpec("test", 160, paper_training_labels, 2), sim, seed=2)
    write_simulated_set(out, SetSpec("cemp", 80, OUTLIER_CLASSES["cemp"], 1), sim, seed=3)
    write_simulated_set(out, SetSpec("ref", 80, paper_training_labels, 1), sim, seed=4)
    return out


@pytest.fixture(scope="session")
def checkpoint(sim_sets, tmp_path_factory):
    """A small trained flow on the paper grid with its scoring reference (no Ray):
    1 unit, hidden 16, trained 1 epoch from the factor-analysis start on ``sim_sets``."""
    import numpy as np

    from mendis_ray.config import FlowConfig, TrainConfig
    from mendis_ray.experiment import Arrays, train_flow
    from mendis_ray.flow.checkpoint import save_checkpoint
    from mendis_ray.science.ood import Scorer
    from mendis_ray.spectra.degrade import add_noise, scatter_labels
    from mendis_ray.spectra.shards import read_dataset, shard_metadata, table_arrays

    train = table_arrays(read_dataset(sim_sets / "train"))
    rng = np.random.default_rng(0)
    flux, ivar = add_noise(train.flux, 300.0, rng)
    labels = scatter_labels(train.labels, rng).astype(np.float32)
    grid = shard_metadata(next((sim_sets / "train").glob("*.parquet")))["grid"]
    flow_cfg = FlowConfig(name="test", n_units=1, hidden=16, n_blocks=1, n_bins=4)
    train_cfg = TrainConfig(lr=1e-4, batch_size=128, epochs=1, linear_lr_scale=0.0)
    res = train_flow(Arrays(flux, ivar, labels), flow_cfg, train_cfg, grid, show_progress=False)
    ref = table_arrays(read_dataset(sim_sets / "ref"))
    scorer = Scorer.fit(res.density, ref.flux, ref.labels, n_marginal=8,
                        gaussian=res.gaussian)  # fmt: skip
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint"
    save_checkpoint(path, res.density, train_cfg, metrics={"epochs": 1},
                    extra_arrays=scorer.checkpoint_arrays())  # fmt: skip
    return path


@pytest.fixture(scope="session")
def survey_sets(tmp_path_factory):
    """Survey-population shards (``mendis simulate --population survey``): ``train``
    (1500 spectra, 2 shards; noise, masks and label errors per star) and ``test`` (60)."""
    from mendis_ray.spectra.datasets import survey_sets as specs
    from mendis_ray.spectra.datasets import write_survey_set
    from mendis_ray.spectra.simulate import Simulator

    out = tmp_path_factory.mktemp("survey")
    sim = Simulator()
    for k, spec in enumerate(specs(n_train=1500, n_test=60, n_outlier=0, n_shards=2)):
        write_survey_set(out, spec, sim, seed=0, set_index=k)
    return out


@pytest.fixture(scope="session")
def signal_checkpoint(survey_sets, tmp_path_factory):
    """A small signal-space model checkpoint (no Ray), as ``mendis train --model signal``
    writes it: k = 6 signal directions, 2 units of hidden width 32, 3 epochs on
    ``survey_sets/train``, the scorer's reference fitted on its validation rows."""
    from mendis_ray.config import SignalConfig
    from mendis_ray.train.signal import train_signal_checkpoint

    cfg = SignalConfig(n_signal=6, n_units=2, hidden=32, epochs=3)
    out = tmp_path_factory.mktemp("signal")
    summary = train_signal_checkpoint([survey_sets / "train"], out, cfg, show_progress=False)
    return Path(summary["checkpoint"])
