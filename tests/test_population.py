"""The survey population and its outlier sets: reproducible, labels where promised, ground
truth that matches what was injected."""

from __future__ import annotations

import numpy as np
import pytest

from mendis_ray.spectra.datasets import SurveySpec, survey_sets, write_survey_set
from mendis_ray.spectra.population import (
    SURVEY_SETS,
    SetContext,
    SurveyPopulation,
    inliers,
)
from mendis_ray.spectra.shards import read_dataset, table_arrays
from mendis_ray.spectra.simulate import Simulator

N = 24
#: sets that may leave the training ranges by design (the paper's classes)
OUT_OF_RANGE = {"cemp", "stripped"}


@pytest.fixture(scope="module")
def ctx() -> SetContext:
    return SetContext(SurveyPopulation(), Simulator(), seed=3)


def _make(ctx: SetContext, name: str, seed: int = 1):
    maker = inliers if name == "inliers" else SURVEY_SETS[name]
    return maker(ctx, N, np.random.default_rng(seed))


@pytest.mark.parametrize("name", ["inliers", *SURVEY_SETS])
def test_sets_are_reproducible_and_finite(ctx: SetContext, name: str) -> None:
    a, b = _make(ctx, name), _make(ctx, name)
    np.testing.assert_array_equal(a.flux, b.flux)
    np.testing.assert_array_equal(a.labels.teff, b.labels.teff)
    assert a.flux.shape == (N, ctx.sim.grid.n_pix) and np.isfinite(a.flux).all()
    assert set(a.truth) >= {"truth_kind", "truth_size"} and all(
        len(v) == N for v in a.truth.values()
    )
    if name not in OUT_OF_RANGE:  # every single true label inside the training ranges
        for label, (lo, hi) in ctx.pop.training_ranges().items():
            v = a.labels.feh if label == "feh" else getattr(a.labels, label)
            assert np.all((v >= lo) & (v <= hi)), (name, label, v.min(), v.max())


def test_population_relations(ctx: SetContext) -> None:
    lab, truth = ctx.pop.sample(4000, np.random.default_rng(0))
    thick = truth["truth_thick"].astype(bool)
    low, high = ctx.pop.alpha_sequences(lab.feh)
    alpha = truth["truth_alpha_fe"]
    assert np.std(alpha[thick] - high[thick]) == pytest.approx(0.025, abs=0.005)
    assert np.std(alpha[~thick] - low[~thick]) == pytest.approx(0.025, abs=0.005)
    rgb = ~truth["truth_clump"]
    resid = lab.teff[rgb] - ctx.pop.branch_teff(lab.logg[rgb], lab.feh[rgb])
    assert np.std(resid) == pytest.approx(ctx.pop.branch_scatter, rel=0.1)
    snr = ctx.pop.sample_snr(4000, np.random.default_rng(1))
    assert snr.min() >= 50 and snr.max() <= 1000 and 0.05 < np.mean(snr > 500) < 0.15


def test_outliers_keep_their_promises(ctx: SetContext) -> None:
    pop = ctx.pop
    r = _make(ctx, "between_alpha")
    low, high = pop.alpha_sequences(r.labels.feh)
    a = r.truth["truth_alpha_fe"]
    assert np.all(np.abs(a - 0.5 * (low + high)) < 0.045)  # the midpoint +- 0.01 (4.5 sigma)
    assert np.all((a > low + 2 * pop.alpha_scatter) & (a < high - 2 * pop.alpha_scatter))
    r = _make(ctx, "off_branch")
    off = (r.labels.teff - pop.branch_teff(r.labels.logg, r.labels.feh)) / pop.branch_scatter
    np.testing.assert_allclose(off, r.truth["truth_size"])
    assert np.all((np.abs(off) >= 4) & (np.abs(off) <= 5))
    r = _make(ctx, "second_population")
    n_fe = r.labels.x_h[:, 1] - r.labels.feh
    assert np.all((n_fe >= 0.5) & (n_fe <= 1.0))
    r300, r1000 = _make(ctx, "snr300"), _make(ctx, "snr1000")
    np.testing.assert_array_equal(r300.flux, r1000.flux)  # the same stars
    assert np.all(r300.snr == 300) and np.all(r1000.snr == 1000)


def test_unknown_line_depth_at_its_pixel(ctx: SetContext) -> None:
    base = inliers(ctx, N, np.random.default_rng(7))
    r = SURVEY_SETS["unknown_line"](ctx, N, np.random.default_rng(7))  # same stars, + a line
    pix = r.truth["truth_line_pixel"]
    ratio = r.flux[np.arange(N), pix] / base.flux[np.arange(N), pix]
    np.testing.assert_allclose(1 - ratio, r.truth["truth_size"], rtol=1e-4)


def test_binary_velocity_recovered_by_cross_correlation(ctx: SetContext) -> None:
    r = _make(ctx, "binary", seed=5)
    sim, lab = ctx.sim, r.labels
    q, dv = r.truth["truth_q"], r.truth["truth_rv2"]
    from mendis_ray.spectra.simulate import StellarLabels

    f1 = sim(lab)
    sec = StellarLabels(r.truth["truth_teff2"], r.truth["truth_logg2"], lab.x_h,
                        np.full(N, 5.0), np.zeros(N))  # fmt: skip
    trial = np.arange(-80.0, 80.5, 1.0)
    for i in range(4):  # the second star's lines, cross-correlated with its template
        resid = (r.flux[i] * (1 + q[i]) - f1[i]) / q[i]  # = F2 shifted by dv
        m = trial.size
        x_h = np.repeat(sec.x_h[i : i + 1], m, 0)
        one = StellarLabels(np.full(m, sec.teff[i]), np.full(m, sec.logg[i]), x_h,
                            np.full(m, 5.0), np.zeros(m))  # fmt: skip
        templates = sim(one, rv=trial)
        cc = ((1 - templates) * (1 - resid)).sum(axis=1)
        assert trial[np.argmax(cc)] == pytest.approx(dv[i], abs=1.5)


def test_written_survey_set_has_truth_and_calibrated_label_errors(tmp_path) -> None:
    sim = Simulator()
    spec = SurveySpec("test", 400, inliers, 2)
    write_survey_set(tmp_path, spec, sim, seed=2, set_index=1)
    t = read_dataset(tmp_path / "test")
    a = table_arrays(t)
    assert {"truth_kind", "truth_alpha_fe", "truth_teff", "truth_class"} <= set(t.column_names)
    sig = SurveyPopulation().label_sigma(a.snr)
    true = np.stack([t.column(c).to_numpy() for c in ("truth_teff", "truth_logg", "truth_fe_h")], 1)
    pull = (a.labels - true) / sig
    np.testing.assert_allclose(pull.std(axis=0), 1.0, atol=0.12)
    masked = (a.ivar == 0).any(axis=1).mean()
    assert 0.2 < masked < 0.4
    again = tmp_path / "again"
    write_survey_set(again, spec, sim, seed=2, set_index=1)
    np.testing.assert_array_equal(table_arrays(read_dataset(again / "test")).flux, a.flux)


def test_survey_sets_list() -> None:
    names = [s.name for s in survey_sets(100, 10, 5)]
    assert names[:2] == ["train", "test"] and set(SURVEY_SETS) <= set(names)
