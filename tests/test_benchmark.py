"""The OOD benchmark can tell a bad model from a good one: a Gaussian that ignores every
pixel correlation must come out clearly worse than the full-covariance baselines."""

from __future__ import annotations

import numpy as np
import pytest

from mendis_ray.science.benchmark import BenchData, baseline_runs, calibration, evaluate
from mendis_ray.science.metrics import percentile_rank
from mendis_ray.spectra.datasets import SurveySpec, write_survey_set
from mendis_ray.spectra.population import SURVEY_SETS, inliers
from mendis_ray.spectra.shards import read_dataset, table_arrays
from mendis_ray.spectra.simulate import Simulator

SETS = ("binary", "artefact_bump", "stripped", "snr300", "snr1000")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    sim = Simulator()
    specs = [SurveySpec("train", 1500, inliers), SurveySpec("test", 200, inliers)]
    specs += [SurveySpec(s, 100, SURVEY_SETS[s]) for s in SETS]
    for k, spec in enumerate(specs):
        write_survey_set(root, spec, sim, seed=4, set_index=k)
    arrays = {s.name: table_arrays(read_dataset(root / s.name)) for s in specs}
    data = BenchData(arrays.pop("train"), arrays.pop("test"), arrays)
    return {r["model"]: r for r in evaluate(baseline_runs(data), data) if r["score"] == "score"}


def test_a_deliberately_wrong_model_comes_out_worse(rows) -> None:
    wrong = rows["diag-gaussian (wrong on purpose)"]
    for good in ("factor-analysis-20", "ppca-20"):
        assert rows[good]["heldout_log_p"] > wrong["heldout_log_p"] + 100, good
    mean_auroc = {m: np.mean([r[s] for s in ("binary", "artefact_bump")]) for m, r in rows.items()}
    assert mean_auroc["factor-analysis-20"] > mean_auroc["diag-gaussian (wrong on purpose)"]


def test_table_has_every_column(rows) -> None:
    for r in rows.values():
        assert {"heldout_log_p", "snr1000_vs_300", "calib", "train_s", "spectra_per_s"} <= set(r)
        assert 0.0 <= r["stripped"] <= 1.0 and 0.0 <= r["calib"] <= 100.0


def test_calibration_measures_distance_from_uniform() -> None:
    rng = np.random.default_rng(0)
    snr = rng.uniform(50, 1000, 20000)
    ref = rng.standard_normal(20000)
    fair = calibration(percentile_rank(ref, rng.standard_normal(20000)), snr)
    shifted = rng.standard_normal(20000) + 0.5 * (snr > 500)
    biased = calibration(percentile_rank(ref, shifted), snr)
    assert fair["max"] < 3 and biased["max"] > 15
