"""The signal-space model: layer invariants with a context, the exact total log p of the
linear stage (masks included), and its scorer end to end through the CLI (no Ray)."""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from mendis_ray.cli import main
from mendis_ray.config import SignalConfig
from mendis_ray.flow.checkpoint import CheckpointError, checkpoint_kind, load_checkpoint
from mendis_ray.flow.signal import ConditionalFlow
from mendis_ray.flow.signal_basis import SignalBasis
from mendis_ray.science.flags import Flag
from mendis_ray.science.metrics import auroc, percentile_rank
from mendis_ray.science.signal_scores import NoiseCalibration, SignalScorer, load_scorer
from mendis_ray.science.signal_tails import SLOPE_FLOOR, derivative_scales
from mendis_ray.spectra.shards import read_dataset, table_arrays

# --- invariants ------------------------------------------------------------------------


def _off_identity_flow(n: int, scale: float):
    """A float64 ConditionalFlow (3 units, context 1) initialised on 64 points y (64, n),
    ctx (64, 1), its parameters then moved by ``scale`` sd off the identity; eval mode."""
    torch.manual_seed(0)
    cfg = SignalConfig(n_units=3, hidden=16, n_blocks=1, n_bins=4)
    flow = ConditionalFlow(n, 1, cfg, seed=1).double()
    y = torch.randn(64, n, dtype=torch.float64) * 1.5
    ctx = torch.rand(64, 1, dtype=torch.float64) * 2 - 1
    flow.initialize(torch.cat([y, ctx], 1))
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn_like(p))
    return flow.eval(), y, ctx


@pytest.mark.parametrize("n", [2, 5])
def test_conditional_flow_inverse_and_logdet(n: int) -> None:
    flow, y, ctx = _off_identity_flow(n, 0.1)
    z, lad = flow.transform(y, ctx)
    torch.testing.assert_close(flow.inverse(z, ctx), y, atol=1e-8, rtol=1e-8)
    for i in range(3):  # log|det| against the autograd Jacobian, row by row
        jac = torch.autograd.functional.jacobian(
            lambda v, i=i: flow.transform(v[None], ctx[i : i + 1])[0][0], y[i]
        )
        torch.testing.assert_close(lad[i], torch.linalg.slogdet(jac)[1], atol=1e-8, rtol=1e-8)
    # the context matters: another noise level, another density
    assert not torch.allclose(flow.log_prob(y, ctx), flow.log_prob(y, -ctx))


@pytest.mark.parametrize("n", [2, 5])
def test_steepest_compression_is_the_smallest_spline_derivative(n: int) -> None:
    """``log_prob_and_compression``: log q as ``log_prob`` (to rounding), and the smallest
    log|dy_j/dx_j| of any coupling's spline at each point, each coupling's diagonal taken by
    autograd with its conditioning half held; with ``loc`` and ``scale``, the smallest of
    (log|dy_j/dx_j| - loc) / scale, feature by feature (``log_prob_and_derivatives``'
    columns); a coupling's elementwise log-derivatives sum to its logabsdet."""
    from mendis_ray.flow.coupling import RQSplineCoupling

    flow, y, ctx = _off_identity_flow(n, 0.3)
    log_q, steepest = flow.log_prob_and_compression(y, ctx)
    torch.testing.assert_close(log_q, flow.log_prob(y, ctx), atol=1e-10, rtol=1e-10)
    x, diags = y, []
    for layer in flow.layers:
        if isinstance(layer, RQSplineCoupling):
            x_id, x_tr = layer._split(x)
            x_tr = x_tr.detach().requires_grad_(True)
            out, lad = layer(layer._merge(x_id, x_tr), ctx)
            each = layer.forward_elementwise(layer._merge(x_id, x_tr), ctx)[1]
            torch.testing.assert_close(each.sum(1), lad, atol=1e-10, rtol=1e-10)
            diag = torch.autograd.grad(layer._split(out)[1].sum(), x_tr)[0]  # (b, n_tr)
            diags.append(diag.abs().log())
            x = out.detach()
        else:
            x = layer(x)[0]
    logd = torch.cat(diags, 1)  # (b, n_couplings x n_transform)
    torch.testing.assert_close(steepest, logd.min(1).values, atol=1e-8, rtol=1e-8)
    assert steepest.std() > 0.05  # off the identity: the points differ
    torch.testing.assert_close(flow.log_prob_and_derivatives(y, ctx)[1], logd, atol=1e-8, rtol=0)
    loc = torch.linspace(-0.2, 0.3, logd.shape[1], dtype=logd.dtype)
    scale = torch.linspace(0.05, 0.6, logd.shape[1], dtype=logd.dtype)
    std = flow.log_prob_and_compression(y, ctx, loc, scale)[1]
    torch.testing.assert_close(std, ((logd - loc) / scale).min(1).values, atol=1e-7, rtol=1e-7)
    assert not torch.allclose(std, steepest)
    far = torch.full((1, n), 1e4, dtype=y.dtype)  # beyond every spline's bound: the identity
    assert flow.log_prob_and_derivatives(far, ctx[:1])[1].abs().max() == 0
    assert flow.log_prob_and_compression(far, ctx[:1], loc, scale)[1].item() == 0  # neutral


def _dense_case(seed: int = 0, p: int = 40, k: int = 3):
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((p, k)))[0]
    basis = SignalBasis(np.zeros(p), np.ones(p), u, np.ones(k), rng.uniform(0.01, 0.1, p))
    ivar = rng.uniform(5.0, 50.0, (6, p))
    ivar[1, 5:12] = 0.0  # masked runs
    ivar[4, ::3] = 0.0
    flux = rng.standard_normal((6, p))
    return basis, flux, ivar, rng.standard_normal((k, k))


def test_total_log_p_is_the_exact_gaussian_marginal() -> None:
    """z = U s + e, s ~ N(0, A), e ~ N(0, noise + intrinsic): q(s_hat) = N(0, A + C) and the
    residual term must give log N(z_good; 0, Sigma_good) exactly, masked pixels simply
    marginalised out (a linear model loses their information and nothing else)."""
    from scipy.stats import multivariate_normal as mvn

    basis, flux, ivar, b = _dense_case()
    a = b @ b.T + 0.5 * np.eye(3)
    proj = basis.project(flux, ivar)
    for i in range(len(flux)):
        good = ivar[i] > 0
        u = basis.basis[good]
        sigma = u @ a @ u.T + np.diag(1 / ivar[i, good] + basis.intrinsic[good])
        exact = mvn(np.zeros(good.sum()), sigma).logpdf(flux[i, good])
        q = mvn(np.zeros(3), a + proj.cov[i]).logpdf(proj.s[i])
        assert q + proj.log_resid[i] == pytest.approx(exact, abs=2e-3)
        assert proj.n_good[i] == good.sum()


def crossed_fit(*args, **kw):
    """:func:`~mendis_ray.science.signal_tails.cross_fitted`'s folds as one projection."""
    from mendis_ray.flow.signal import SignalCoordinates
    from mendis_ray.science.signal_tails import cross_fitted

    return SignalCoordinates.concat(cross_fitted(*args, **kw))


def test_cross_fitted_residuals_see_the_calibration_stars_as_new_ones() -> None:
    """A basis fitted to few noisy stars (n = 240, p = 600, k = 24) absorbs part of each
    one's noise: their in-sample chi^2/dof runs below that of new stars from the same
    population.  Projected on bases fitted without them (3 folds), they look like new
    stars again (to within the small, conservative excess of a basis from 2/3 of them);
    0 folds is the model's own projection."""
    from mendis_ray.flow.signal import SignalSpaceModel

    rng = np.random.default_rng(4)
    p, k, n = 600, 24, 240
    mix = rng.standard_normal((p, 6)) * 0.02

    def stars(m):  # 6 real directions, S/N 100 photon-like noise
        f = 1 + rng.standard_normal((m, 6)) @ mix.T
        noisy = (f + rng.standard_normal(f.shape) * 0.01).astype(np.float32)
        return noisy, np.full(f.shape, 1e4, np.float32)

    (flux, ivar), (new_f, new_iv) = stars(n), stars(2000)
    labels = rng.standard_normal((n, 3))
    basis = SignalBasis.fit(flux, ivar, k)
    cfg = SignalConfig(n_signal=k, n_units=1, hidden=8)
    model = SignalSpaceModel(basis, labels.mean(0), labels.std(0), np.zeros(2), cfg)
    chi = lambda c: float(np.median(c.proj.chi2 / c.proj.dof))  # noqa: E731
    fresh = chi(model.coordinates(new_f, new_iv, rng.standard_normal((2000, 3))))
    inside = crossed_fit(model, flux, ivar, labels, None, folds=0)
    crossed = crossed_fit(model, flux, ivar, labels, None, folds=3)
    own = model.coordinates(flux, ivar, labels, keep_residual=True)
    np.testing.assert_array_equal(inside.proj.chi2, own.proj.chi2)
    assert chi(inside) < 0.97 * fresh, (chi(inside), fresh)
    assert abs(chi(crossed) - fresh) < 0.4 * abs(chi(inside) - fresh), (chi(crossed), fresh)
    assert crossed.proj.wres.shape == flux.shape and len(crossed.y) == n


def test_cross_fitting_falls_back_to_the_own_basis_where_a_fold_cannot_fit(caplog) -> None:
    """Pixel 5 good in two training stars only, both in the first fold: the other folds'
    bases leave it out (masked for the stars they project) and fit.  Most pixels good in
    the first fold only: the other folds cannot fit a basis at all, so the calibration
    stars keep the model's own projection, with a warning, instead of the training run
    failing at its end."""
    from mendis_ray.flow.signal import SignalSpaceModel

    rng = np.random.default_rng(5)
    flux, labels = rng.standard_normal((30, 40)), np.zeros((30, 3))
    for rows, expect_fallback in ((slice(2, None), False), (slice(10, None), True)):
        ivar = np.full((30, 40), 10.0)
        ivar[rows, 5 if not expect_fallback else slice(4, None)] = 0.0
        basis = SignalBasis.fit(flux, ivar, 3)
        model = SignalSpaceModel(basis, labels.mean(0), np.ones(3), np.zeros(2), SignalConfig())
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mendis_ray"):
            got = crossed_fit(model, flux, ivar, labels, None, folds=3)
        own = model.coordinates(flux, ivar, labels, keep_residual=True)
        assert ("in sample" in caplog.text) == expect_fallback
        assert np.array_equal(got.proj.chi2, own.proj.chi2) == expect_fallback
        assert np.isfinite(got.proj.chi2).all()


def test_pixels_no_training_star_sees_are_left_out_exactly() -> None:
    """A mask common to every training star (and a pixel good in one star of 300, under
    the 1% floor) is not modelled: the basis equals the one fitted with those pixels
    deleted, and every projection ignores them, whatever flux and ivar a scored spectrum
    has there.  Before, the fit refused such a training set."""
    rng = np.random.default_rng(8)
    n, p, dead = 300, 40, [3, 7, 20, 11]
    u = np.linalg.qr(rng.standard_normal((p, 3)))[0]
    flux = 1 + (rng.standard_normal((n, 3)) * [0.3, 0.2, 0.1]) @ u.T * 0.1
    ivar = rng.uniform(1e3, 1e4, (n, p))
    flux += rng.standard_normal((n, p)) / np.sqrt(ivar)
    ivar[:, dead] = 0.0
    ivar[17, 11] = 5e3  # one star sees pixel 11
    keep = np.setdiff1d(np.arange(p), dead)
    full, cut = SignalBasis.fit(flux, ivar), SignalBasis.fit(flux[:, keep], ivar[:, keep])
    assert full.k == cut.k and full.n_modelled == p - len(dead) and cut.modelled is None
    np.testing.assert_array_equal(np.flatnonzero(~full.modelled), sorted(dead))
    for f in ("mean", "scale"):
        np.testing.assert_allclose(getattr(full, f)[keep], getattr(cut, f), rtol=1e-9)
    np.testing.assert_allclose(full.intrinsic[keep], cut.intrinsic, rtol=1e-5)  # float32
    np.testing.assert_allclose(full.eigenvalues, cut.eigenvalues, rtol=1e-6)
    np.testing.assert_allclose(np.abs(full.basis[keep]), np.abs(cut.basis), atol=1e-6)
    assert not full.basis[dead].any()
    new_f, new_iv = flux[:5].copy(), np.full((5, p), 5e3)
    new_f[:, dead] = 1e6  # a scored spectrum with "good" pixels the model never saw
    a, b = full.project(new_f, new_iv), cut.project(new_f[:, keep], new_iv[:, keep])
    for f in ("chi2", "log_resid", "n_good", "dof"):
        np.testing.assert_allclose(getattr(a, f), getattr(b, f), rtol=1e-4)
    np.testing.assert_allclose(np.abs(a.s), np.abs(b.s), rtol=1e-4, atol=1e-6)
    assert set(full.arrays()) == {*cut.arrays(), "modelled"}
    with pytest.raises(ValueError, match="only 2 of 40 pixels are good"):
        SignalBasis.fit(flux, np.where(np.arange(p) < 2, ivar, 0.0))
    with pytest.raises(ValueError, match=r"the \d+ training spectra do not vary"):
        SignalBasis.fit(np.ones_like(flux), ivar)  # was "SVD did not converge", a minute in


def test_masked_pixel_values_change_nothing() -> None:
    basis, flux, ivar, _ = _dense_case(1)
    other = flux.copy()
    other[ivar == 0] = 1e6  # whatever sits under a mask
    a, b = basis.project(flux, ivar), basis.project(other, ivar)
    np.testing.assert_allclose(a.s, b.s, rtol=1e-5)
    np.testing.assert_allclose(a.log_resid, b.log_resid, rtol=1e-5)


@pytest.mark.parametrize("chunk", [64, 1365, 4096])
def test_standardization_is_the_exact_mean_and_sd_of_good_pixels(chunk: int) -> None:
    """The basis's mean and scale, summed a block at a time in one pass, equal the two-pass
    float64 mean and standard deviation of each pixel's good values, whatever the block
    size.  Continuum-normalized flux is near 1 with an sd near 1e-3, so a float32 one-pass
    sum (as before) loses the variance in the cancellation of sum f^2 / n - mean^2: its
    scale was off by up to 2% (blocks of 64 rows) to 123% (4,096 rows) here."""
    rng = np.random.default_rng(3)
    n, p = 4096, 24
    flux = (1 - rng.uniform(0, 0.3, p) + 1e-3 * rng.standard_normal((n, p))).astype(np.float32)
    ivar = np.full((n, p), 1e6, np.float32)
    ivar[rng.random((n, p)) < 0.1] = 0.0  # masked pixels: left out of both
    basis = SignalBasis.fit(flux, ivar, 2, chunk=chunk)
    good = np.where(ivar > 0, flux.astype(np.float64), np.nan)
    np.testing.assert_allclose(basis.mean, np.nanmean(good, 0), rtol=1e-12)
    np.testing.assert_allclose(basis.scale, np.nanstd(good, 0), rtol=1e-7)


def test_template_statistics_match_their_definition_and_are_standard_normal() -> None:
    """z of a template a in the residual: a^T L r / sqrt(a^T (L - L U C U^T L) a), per star
    (masks included; 0 without a good pixel under a), is what the dense formula gives,
    N(0, 1) for stars the model describes, shifted by amplitude * sd when the pattern is
    planted, and finite for an absurd flux."""
    rng = np.random.default_rng(5)
    p, k, n = 60, 3, 4000
    basis, _, _, b = _dense_case(2, p=p, k=k)
    templates = rng.standard_normal((5, p)).astype(np.float32)
    templates[3, 20:] = 0.0  # a line pattern: read on its own pixels only
    templates[4, :10], templates[4, 20:] = 0.0, 0.0  # all under the masked run below
    ivar = rng.uniform(5.0, 50.0, (n, p))
    ivar[::7, 10:20] = 0.0  # masked runs
    noise = rng.standard_normal((n, p)) * np.sqrt(1 / np.maximum(ivar, 1e-12) + basis.intrinsic)
    flux = rng.standard_normal((n, k)) @ (b @ basis.basis.T) + noise
    proj = basis.project(flux, ivar, templates=templates)
    for i in (0, 7, 11):  # the dense definition
        good = ivar[i] > 0
        lam = np.where(good, 1 / (1 / np.where(good, ivar[i], 1) + basis.intrinsic), 0)
        r = np.where(good, flux[i] - basis.basis @ proj.s[i], 0)
        lu = lam[:, None] * basis.basis
        proj_l = np.diag(lam) - lu @ np.linalg.inv(basis.basis.T @ lu) @ lu.T
        var = np.einsum("mp,pq,mq->m", templates, proj_l, templates)
        want = np.where(var > 1e-9, templates @ (lam * r) / np.sqrt(np.maximum(var, 1e-9)), 0)
        np.testing.assert_allclose(proj.template_z[i], want, rtol=2e-3, atol=2e-3)
    assert (proj.template_z[::7, 4] == 0).all()  # no good pixel under template 4
    seen = np.arange(n) % 7 > 0
    assert np.abs(proj.template_z[seen].mean(0)).max() < 0.06
    np.testing.assert_allclose(proj.template_z[seen].std(0), 1.0, atol=0.05)
    planted = basis.project(flux + 0.3 * templates[2], ivar, templates=templates).template_z
    shift = planted - proj.template_z  # amplitude 0.3 of template 2: 0.3 sd_2 on z_2
    assert shift[:, 2].min() > 5
    assert np.abs(shift[:, [0, 1, 3]]).mean(0).max() < 0.4 * shift[:, 2].mean()
    absurd = flux[1:4].copy()
    absurd[:, 15] = 1e37  # finite, but the residual overflows float32: large, never NaN
    z = basis.project(absurd, ivar[1:4], templates=templates).template_z
    assert np.isfinite(z).all() and np.abs(z[:, 3]).min() > 1e6


# --- the scorer, trained through the CLI --------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("signal")
    data, out = root / "data", root / "run"
    assert main(["simulate", "--population", "survey", "--out", str(data), "--n-train",
                 "1500", "--n-test", "200", "--n-outlier", "60", "--shards", "2",
                 "--no-figures"]) == 0  # fmt: skip
    assert main(["train", str(data / "train"), "--out", str(out), "--epochs", "6",
                 "--quiet"]) == 0  # fmt: skip
    return data, out / "checkpoint"


STRUCTURE_KEYS = ("structure.", "cal.structure", "cal.signal_tests", "signal_tests.")


def _arrays(data, name):
    return table_arrays(read_dataset(data / name))


def test_cli_checkpoint_scores_finite_with_percentiles(trained) -> None:
    data, ckpt = trained
    info = json.loads((ckpt / "config.json").read_text())
    assert info["model_kind"] == "signal" and checkpoint_kind(ckpt) == "signal"
    scorer = load_scorer(ckpt)
    assert isinstance(scorer, SignalScorer)
    te = _arrays(data, "test")
    out = scorer.score(te.flux, te.ivar, te.labels)
    for key in ("score", "signal_score", "residual_score", "percentile", "log_p"):
        assert np.isfinite(out[key]).all(), key
    assert 20 < np.mean(out["percentile"]) < 80
    again = SignalScorer.from_checkpoint(ckpt).score(te.flux, te.ivar, te.labels)
    np.testing.assert_array_equal(again["score"], out["score"])
    with pytest.raises(CheckpointError, match="signal"):
        load_checkpoint(ckpt)  # the full-space loader says what it is


def test_obvious_outliers_rank_first(trained) -> None:
    data, ckpt = trained
    scorer = load_scorer(ckpt)
    te = _arrays(data, "test")
    base = scorer.score(te.flux, te.ivar, te.labels)["score"]
    for name in ("stripped", "cemp", "artefact_bump", "binary"):
        o = _arrays(data, name)
        assert auroc(base, scorer.score(o.flux, o.ivar, o.labels)["score"]) > 0.9, name


def test_element_tests_find_the_element_out_of_step(trained) -> None:
    """The checkpoint (paper grid) carries the simulator's element templates; stars with
    [Mg/H] or [Mn/H] raised 0.2-0.3 dex get the element test's most significant element
    right, and the residual score separates them from typical stars."""
    from mendis_ray.science.signal_tails import rho_res, stat_tails
    from mendis_ray.spectra.linelist import ELEMENTS

    data, ckpt = trained
    scorer = load_scorer(ckpt)
    assert scorer.ref["elements.templates"].shape == (len(ELEMENTS), 2405)
    te, odd = _arrays(data, "test"), _arrays(data, "single_element")
    kind = np.asarray(read_dataset(data / "single_element").column("truth_kind").to_pylist())
    px = scorer._pixel_pass(odd.flux, odd.ivar, odd.labels)
    tails = np.array(stat_tails(scorer.ref, rho_res(px.c), px.stats)[-len(ELEMENTS) :])
    found = np.asarray(ELEMENTS)[np.argmin(tails, axis=0)]
    for el in ("Mg", "Mn"):
        rows = kind == f"single_element_{el.lower()}"
        assert np.mean(found[rows] == el) > 0.7, (el, found[rows])
    base = scorer.score(te.flux, te.ivar, te.labels)["residual_score"]
    assert auroc(base, scorer.score(odd.flux, odd.ivar, odd.labels)["residual_score"]) > 0.9


def test_score_is_the_more_significant_tail_and_old_checkpoints_keep_fisher(trained) -> None:
    """``score`` is the tail of the more significant of signal_score and residual_score
    for the held-out correlation of the two (one per noise bin), not a pile of ties at 0;
    a reference without ``combine.corr`` (written before it) uses Fisher's method."""
    from mendis_ray.science.signal_noise import one_blas_thread
    from mendis_ray.science.signal_tails import min_tail, rho_sig

    data, ckpt = trained
    scorer = load_scorer(ckpt)
    assert "combine.corr" in scorer.ref and "cal.combined.centers" not in scorer.ref
    assert np.all(np.abs(scorer.ref["combine.corr"]) < 1)
    te = _arrays(data, "test")
    out = scorer.score(te.flux, te.ivar, te.labels)
    with one_blas_thread():  # as score() projects
        rho = rho_sig(scorer._pixel_pass(te.flux, te.ivar, te.labels).c, scorer.model)
    corr = np.interp(rho, scorer.ref["combine.centers"], scorer.ref["combine.corr"])
    both = np.minimum(out["signal_score"], out["residual_score"])
    np.testing.assert_array_equal(out["score"], min_tail(both, corr))
    assert np.all(out["score"] <= both + np.log(2) + 1e-12) and np.all(out["score"] >= both)
    assert np.mean(out["score"] == 0.0) < 0.01
    for key in ("combine.centers", "combine.corr"):  # an old checkpoint: Fisher, calibrated
        del scorer.ref[key]
    x = -2 * (out["signal_score"] + out["residual_score"])
    fisher = np.minimum(stats.chi2(4).logsf(x), 0.0)
    scorer.ref |= NoiseCalibration.fit(rho, -fisher).arrays("cal.combined")
    old = scorer.score(te.flux, te.ivar, te.labels)
    want = NoiseCalibration.from_arrays(scorer.ref, "cal.combined").log_tail(rho, -fisher)
    np.testing.assert_allclose(old["score"], want, atol=1e-9)
    # percentiles: the calibrated tail probabilities themselves; old checkpoints: the rank
    # among the held-out stars' scores
    for key, name in (("score", "percentile"), ("residual_score", "residual_percentile")):
        np.testing.assert_allclose(out[name], 100 * np.exp(out[key]), rtol=1e-12)
        ref = scorer.ref[f"sorted.{key}"]
        np.testing.assert_array_equal(old[name], percentile_rank(ref, old[key]))


def test_copula_correlation_recovers_r_and_ignores_unscorable_stars() -> None:
    """Kendall's tau of a simulated Gaussian copula gives back its correlation per noise
    bin; -inf tails (unscorable stars) and extreme ones do not move it."""
    from mendis_ray.science.signal_tails import copula_correlation

    rng = np.random.default_rng(11)
    rho = rng.uniform(0, 1, 8000)
    r = np.where(rho < 0.5, 0.1, 0.4)  # two noise regimes
    z1 = rng.standard_normal(8000)
    z2 = r * z1 + np.sqrt(1 - r**2) * rng.standard_normal(8000)
    sig, res = stats.norm.logcdf(z1), stats.norm.logcdf(z2)  # log tails, (n,)
    got = copula_correlation(rho, sig, res, n_bins=4)
    np.testing.assert_allclose(got["combine.corr"], [0.1, 0.1, 0.4, 0.4], atol=0.06)
    sig[:3], res[3:6] = -np.inf, -1e4  # unscorable and extreme stars
    again = copula_correlation(rho, sig, res, n_bins=4)
    np.testing.assert_allclose(again["combine.corr"], got["combine.corr"], atol=0.01)


@pytest.mark.parametrize("r", [-0.5, 0.0, 0.3, 0.8, 0.99])
def test_min_tail_is_the_bivariate_normal_probability(r: float) -> None:
    """``min_tail`` against scipy's bivariate normal CDF, 1 - Phi2(-c, -c; r); the two ends
    (independent: 2p - p^2; r -> 1: p); ordered and finite down to -1e4 and -inf."""
    from mendis_ray.science.signal_tails import min_tail

    m = np.log(np.array([1e-12, 1e-6, 1e-3, 0.01, 0.1, 0.3, 0.6, 0.9]))
    c = stats.norm.ppf(np.exp(m))
    bvn = stats.multivariate_normal([0, 0], [[1, r], [r, 1]])
    want = np.log(1 - np.array([bvn.cdf([-ci, -ci]) for ci in c]))
    ok = np.exp(m) > 1e-5  # the CDF's own accuracy (~1e-8 absolute) ends below
    np.testing.assert_allclose(min_tail(m, np.full(len(m), r))[ok], want[ok], atol=2e-4)
    if r == 0.0:
        p = np.exp(m)
        np.testing.assert_allclose(min_tail(m, np.zeros(len(m))), np.log(p * (2 - p)), rtol=1e-9)
    far = np.array([0.0, -1.0, -50.0, -1e4, -np.inf])
    out = min_tail(far, np.full(5, r))
    assert out[0] == 0.0 and out[-1] == -np.inf and np.all(np.isfinite(out[:-1]))
    assert np.all(np.diff(out) < 0) and np.all(out >= far)
    toward_min = min_tail(m, np.full(len(m), 0.99))  # more dependent: less to correct
    assert np.all(toward_min <= min_tail(m, np.zeros(len(m)))) and np.all(toward_min >= m)


def test_checkpoints_without_element_tests_still_score(trained) -> None:
    """A reference without the element arrays (a checkpoint written before them, or a grid
    the simulator does not know) scores with chi^2 and the four scans only; one without
    the structure tests with the flow's log q alone."""
    data, ckpt = trained
    scorer = load_scorer(ckpt)
    scorer.ref = {k: v for k, v in scorer.ref.items()
                  if not k.startswith(("elements.", "cal.elem", *STRUCTURE_KEYS))}  # fmt: skip
    te = _arrays(data, "test")
    assert scorer._pixel_pass(te.flux, te.ivar, te.labels).stats.shape[1] == 5
    out = scorer.score(te.flux, te.ivar, te.labels)
    assert np.isfinite(out["residual_score"]).all() and np.isfinite(out["score"]).all()


def test_structure_tests_see_stars_between_the_alpha_sequences(trained) -> None:
    """The checkpoint carries the structure tests (one 2-D density per label and
    independent component); they find the stars between the alpha sequences, which the
    flow's log q alone ranks near chance, and lift the signal score with them."""
    from mendis_ray.science.signal_tails import rho_sig
    from mendis_ray.science.structure import StructureTests

    data, ckpt = trained
    scorer = load_scorer(ckpt)
    k = scorer.model.basis.k
    tests = StructureTests.from_arrays(scorer.ref)
    assert tests is not None and tests.pairs.shape == (3 * k, 2)
    te, odd = _arrays(data, "test"), _arrays(data, "between_alpha")
    ct, co = (scorer.model.coordinates(a.flux, a.ivar, a.labels) for a in (te, odd))
    assert auroc(-tests.statistic(ct.y), -tests.statistic(co.y)) > 0.8
    without = SignalScorer(scorer.model, {k_: v for k_, v in scorer.ref.items()
                                          if not k_.startswith(STRUCTURE_KEYS)})  # fmt: skip
    flow_only = auroc(*(without.score(a.flux, a.ivar, a.labels)["signal_score"] for a in (te, odd)))
    both = auroc(*(scorer.score(a.flux, a.ivar, a.labels)["signal_score"] for a in (te, odd)))
    assert both > flow_only + 0.05, (flow_only, both)
    assert np.isfinite(rho_sig(ct, scorer.model)).all()


COMPRESSION_KEYS = ("cal.compression", "signal_compression", "compression.")  # _z too


def test_signal_score_is_the_more_significant_of_flow_structure_and_compression(trained):
    """With the structure tests, the signal tail is min_tail of the flow's and the tests'
    tails for their held-out correlation per noise bin, and ``signal_score`` min_tail of
    that and the tail of the flow's steepest compression (each spline's log-derivative
    standardized), the same way; a reference written before the standardization (the raw
    minimum under the ``COMPRESSION_RAW`` keys) scores with the raw minimum; one written
    before the compression test scores without it; one written before the copula (an
    empirical calibration ``cal.signal_tests`` of the minimum) keeps that calibration."""
    from mendis_ray.science.signal_tails import (
        COMPRESSION_RAW,
        COMPRESSION_STANDARDIZED,
        flow_tail,
        min_tail,
        rho_sig,
    )

    data, ckpt = trained
    scorer = load_scorer(ckpt)
    r = scorer.ref
    assert "signal_tests.corr" in r and "cal.signal_tests.centers" not in r
    assert np.all((r["signal_tests.corr"] > 0) & (r["signal_tests.corr"] < 1))
    (cal, pre), (cal_raw, pre_raw) = COMPRESSION_STANDARDIZED, COMPRESSION_RAW
    assert np.all(np.abs(r[f"{pre}.corr"]) < 1) and f"{pre_raw}.corr" not in r
    te = _arrays(data, "test")
    out = scorer.score(te.flux, te.ivar, te.labels)
    # as `score` reads them (one BLAS thread: the same float32 sums; the whitened label
    # density's gradient turns the default threads' rounding into 3e-4 in a tail)
    c = scorer._pixel_passes(te.flux, te.ivar, te.labels, [slice(None)])[0].c
    rho, tests = rho_sig(c, scorer.model), scorer._tests()
    loc, scale = r["compression.loc"], r["compression.scale"]
    lq, steepest = scorer.model.flow_log_prob_and_compression(c, loc=loc, scale=scale)
    flow = flow_tail(r, lq, c.y, rho, tests)
    struct = NoiseCalibration.from_arrays(r, "cal.structure").log_tail(rho, tests.statistic(c.y))
    both = np.minimum(flow, struct)
    corr = np.interp(rho, r["signal_tests.centers"], r["signal_tests.corr"])
    squeezed = NoiseCalibration.from_arrays(r, cal).log_tail(rho, -steepest)
    corr_c = np.interp(rho, r[f"{pre}.centers"], r[f"{pre}.corr"])
    want = min_tail(np.minimum(min_tail(both, corr), squeezed), corr_c)
    np.testing.assert_allclose(out["signal_score"], want, rtol=1e-4, atol=1e-4)

    def as_before(key: str) -> str:  # the raw minimum's keys, written before
        for new, old in ((cal, cal_raw), (pre, pre_raw)):
            if key.startswith(new + "."):
                return old + key[len(new) :]
        return key

    raw_ref = {as_before(k): v for k, v in r.items() if not k.startswith("compression.")}
    got = SignalScorer(scorer.model, raw_ref, scorer.grid).score(te.flux, te.ivar, te.labels)
    raw = scorer.model.flow_log_prob_and_compression(c)[1]
    squeezed = NoiseCalibration.from_arrays(raw_ref, cal_raw).log_tail(rho, -raw)
    want = min_tail(np.minimum(min_tail(both, corr), squeezed), corr_c)
    np.testing.assert_allclose(got["signal_score"], want, rtol=1e-4, atol=1e-4)
    assert not np.allclose(got["signal_score"], out["signal_score"], atol=1e-3)
    kept = {k: v for k, v in r.items() if not k.startswith(COMPRESSION_KEYS)}
    before = SignalScorer(scorer.model, kept, scorer.grid)
    got = before.score(te.flux, te.ivar, te.labels)
    np.testing.assert_allclose(got["signal_score"], min_tail(both, corr), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got["residual_score"], out["residual_score"])
    assert "signal:compression" not in set(got["strongest_test"])
    old = {k: v for k, v in before.ref.items() if not k.startswith("signal_tests.")}
    old |= NoiseCalibration.fit(rho, -both).arrays("cal.signal_tests")
    got = SignalScorer(scorer.model, old, scorer.grid).score(te.flux, te.ivar, te.labels)
    want = NoiseCalibration.from_arrays(old, "cal.signal_tests").log_tail(rho, -both)
    np.testing.assert_allclose(got["signal_score"], want, rtol=1e-4, atol=1e-4)


def test_the_compression_test_can_be_turned_off(trained, monkeypatch) -> None:
    """``SignalConfig.compression_test`` on (the default, as ``mendis train`` fitted the
    checkpoint): it sets some stars' strongest test and moves their signal scores; off: the
    reference has none of its arrays, and no star's strongest test is the compression.  On,
    ``SignalScorer.fit`` takes each spline's median and spread from the held-out stars and
    calibrates the standardized minimum that scoring computes."""
    import mendis_ray.science.signal_scores as signal_scores

    data, ckpt = trained
    on = load_scorer(ckpt)
    assert on.model.cfg.compression_test and on._compression_keys() is not None
    tr, te, odd = _arrays(data, "train"), _arrays(data, "test"), _arrays(data, "between_alpha")
    model = load_scorer(ckpt).model
    model.cfg = model.cfg.replace(compression_test=False, residual_folds=0)
    coords = model.coordinates(tr.flux, tr.ivar, tr.labels)
    off = SignalScorer.fit(model, te.flux, te.ivar, te.labels, coords)
    assert not [k for k in off.ref if k.startswith(COMPRESSION_KEYS)]
    seen, calibrate = {}, signal_scores.compression_calibration

    def spy(rho, signal, steepest):  # what fit calibrates
        seen["steepest"] = steepest
        return calibrate(rho, signal, steepest)

    monkeypatch.setattr(signal_scores, "compression_calibration", spy)
    model.cfg = model.cfg.replace(compression_test=True)
    again = SignalScorer.fit(model, te.flux, te.ivar, te.labels, coords)
    c = model.coordinates(te.flux, te.ivar, te.labels)  # the held-out stars, no copies
    want = derivative_scales(model.flow_log_prob_and_derivatives(c)[1])
    for key in ("compression.loc", "compression.scale"):
        np.testing.assert_allclose(again.ref[key], want[key], rtol=1e-5, atol=1e-6)
    got = seen["steepest"][: len(te.flux)]  # the real held-out stars come first
    np.testing.assert_allclose(got, again._steepest(c, standardized=True)[1], atol=1e-5)
    assert not np.allclose(got, model.flow_log_prob_and_compression(c)[1], atol=1e-2)
    for scorer, fires in ((on, True), (off, False)):
        tests = [scorer.score(a.flux, a.ivar, a.labels)["strongest_test"] for a in (te, odd)]
        assert ("signal:compression" in set(np.concatenate(tests))) is fires


def test_impossible_spectra_rank_first_never_nan(trained) -> None:
    data, ckpt = trained
    scorer = load_scorer(ckpt)
    te = _arrays(data, "test")
    flux, ivar, labels = te.flux[:6].astype(np.float64), te.ivar[:6].copy(), te.labels[:6].copy()
    flux[0] = 3e38  # finite, squares overflow
    flux[1, :30] = np.nan  # NaN under good pixels: masked and flagged
    ivar[2] = 0.0  # nothing left to score
    ivar[3, :5] = np.inf  # inf ivar: masked and flagged
    labels[4] = np.nan  # label-free: integrated out
    out = scorer.score(flux, ivar, labels)
    for key, v in out.items():
        if np.asarray(v).dtype.kind == "f":
            assert not np.isnan(v).any(), key
    assert out["score"][0] == -math.inf and out["score"][2] == -math.inf
    assert out["percentile"][0] == 0 and out["percentile"][2] == 0
    assert out["flags"][1] & 1 and out["flags"][3] & 1 and out["flags"][2] & 2
    assert np.isfinite(out["score"][[1, 3, 4, 5]]).all()
    assert not out["labelled"][4] and np.isfinite(out["labels_used"][4]).all()


def test_same_stars_rank_alike_at_low_and_high_snr(trained) -> None:
    """S/N calibration: the same stars topped up with noise to S/N 100 and to S/N 300 get
    scores from the same distribution (AUROC near 0.5), while the raw density ranks the
    cleaner copies higher."""
    data, ckpt = trained
    scorer = load_scorer(ckpt)
    te = _arrays(data, "test")
    keep = te.snr > 300  # stars cleaner than both targets
    flux, ivar = te.flux[keep].astype(np.float64), te.ivar[keep]
    sigma0 = 1 / np.sqrt(np.where(ivar > 0, ivar, np.inf))
    rng = np.random.default_rng(0)
    res = {}
    for snr in (100.0, 300.0):
        target = np.sqrt(np.clip(flux, 1e-3, None)) / snr  # photon noise at this S/N
        add = np.sqrt(np.maximum(target**2 - sigma0**2, 0))
        f = flux + add * rng.standard_normal(add.shape)
        iv = np.where(ivar > 0, 1 / np.maximum(target, sigma0) ** 2, 0)
        res[snr] = scorer.score(f, iv, te.labels[keep])
    assert keep.sum() >= 30
    a = auroc(res[100.0]["score"], res[300.0]["score"])
    assert 0.3 < a < 0.7, a
    assert auroc(res[100.0]["log_p"], res[300.0]["log_p"]) < 0.05  # raw density: fooled


@pytest.mark.parametrize("n_ref", [30, 200, 5000])
def test_noise_calibration_is_uniform_per_noise_level(n_ref: int) -> None:
    """Reference stars whose statistic grows with the noise variable: a new inlier's tail
    probability is uniform at every noise level; a far outlier gets a finite, ordered score."""
    from mendis_ray.science.signal_scores import NoiseCalibration

    rng = np.random.default_rng(1)
    t = rng.uniform(0, 1, n_ref)
    cal = NoiseCalibration.fit(t, 3 * t + (1 + t) * rng.standard_normal(n_ref))
    t_new = rng.uniform(0, 1, 4000)
    p = np.exp(cal.log_tail(t_new, 3 * t_new + (1 + t_new) * rng.standard_normal(4000)))
    if n_ref >= 200:
        for lo in (0.0, 0.5):
            sel = (t_new >= lo) & (t_new < lo + 0.5)
            assert abs(np.mean(p[sel]) - 0.5) < 0.05
    far = cal.log_tail(np.array([0.5, 0.5]), np.array([50.0, 80.0]))
    assert np.isfinite(far).all() and far[1] < far[0] < np.log(0.01)


def test_pooled_tail_resolves_tails_a_bin_cannot() -> None:
    """Beyond each bin's 90th percentile the tail is read from every bin's exceedances
    (in units of the bin's scale): against a per-bin calibration of the same 2,000
    reference stars (16 bins of 125) it estimates tail probabilities of 3e-3 and 1e-3
    closer (RMS error of log p over 60 reference draws: 0.76x and 0.54x the per-bin one
    here, 0.67-0.92x and 0.54-0.81x over six seeds), ties fewer outliers at a bin's floor,
    keeps new inliers uniform, joins the bin's own tail continuously at the threshold,
    and references without the pooled arrays read as before."""
    rng = np.random.default_rng(3)
    scale_t = stats.t(4)  # heavy-tailed: the per-bin exponential beyond the max is wrong

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        t = rng.uniform(0, 1, n)
        return t, 3 * t + (1 + t) * scale_t.rvs(n, random_state=rng)

    probs = np.array([3e-3, 1e-3])
    err, ties = {"pooled": [], "per_bin": []}, {"pooled": 0, "per_bin": 0}
    for _ in range(60):
        t, u = draw(2000)
        fits = {"pooled": NoiseCalibration.fit(t, u),
                "per_bin": NoiseCalibration.fit(t, u, tail_from=None)}  # fmt: skip
        for name, cal in fits.items():
            tc = cal.centers[8]  # one bin's own centre: its tail alone
            x = 3 * tc + (1 + tc) * scale_t.isf(probs)
            err[name].append(cal.log_tail(np.full(2, tc), x) - np.log(probs))
            many = 3 * tc + (1 + tc) * scale_t.isf(np.geomspace(1e-2, 1e-3, 50))
            ties[name] += 50 - np.unique(np.round(cal.log_tail(np.full(50, tc), many), 9)).size
    rms = {k: np.sqrt(np.mean(np.square(v), axis=0)) for k, v in err.items()}
    assert (rms["pooled"] < 0.95 * rms["per_bin"]).all(), rms
    assert ties["pooled"] < 0.4 * ties["per_bin"], ties  # 141 against 516 here
    # new inliers: uniform, per half of the noise range and in the tail
    cal = fits["pooled"]
    t_new, u_new = draw(40000)
    p = np.exp(cal.log_tail(t_new, u_new))
    for lo in (0.0, 0.5):
        assert abs(np.mean(p[(t_new >= lo) & (t_new < lo + 0.5)]) - 0.5) < 0.04
    assert 0.006 < np.mean(p < 0.01) < 0.016
    # continuous where the pooled tail takes over; monotone beyond
    thr = cal.tail_thr[8]
    edge = cal.log_tail(np.full(2, cal.centers[8]), thr + np.array([-1e-6, 1e-6]))
    assert abs(edge[1] - edge[0]) < 0.01 and abs(edge[0] - np.log(0.1)) < 0.02
    # references written before the pooled tail: the per-bin reading
    old = {k: v for k, v in cal.arrays("cal.x").items() if ".tail_" not in k}
    base = NoiseCalibration(cal.centers, cal.quantiles, cal.scale, cal.count)
    np.testing.assert_array_equal(
        NoiseCalibration.from_arrays(old, "cal.x").log_tail(t_new, u_new),
        base.log_tail(t_new, u_new),
    )
    again = NoiseCalibration.from_arrays(cal.arrays("cal.x"), "cal.x")
    np.testing.assert_array_equal(again.log_tail(t_new, u_new), cal.log_tail(t_new, u_new))


def test_pooled_tail_with_ties_and_a_constant_bin() -> None:
    """Values tied at a bin's threshold (20% of them at 1.5, where the 90th percentile
    falls): the log tail stays non-increasing in u through it and continuous just past
    it (the pooled part starts from the bin's own tail there, about 0.05, not 0.1).  A
    bin whose scale is the floor (60% zeros) neither feeds nor reads the pool: the other
    bins' inliers stay calibrated in the tail and a 5-sigma outlier stays rare.  A
    reference with only some of the pooled tail's arrays is refused, naming the missing
    one."""
    rng = np.random.default_rng(5)
    t = rng.uniform(0, 1, 4000)
    u = np.where(rng.uniform(size=4000) < 0.2, 1.5, rng.standard_normal(4000))
    cal = NoiseCalibration.fit(t, u)
    assert cal.tail_q is not None and (cal.tail_thr == 1.5).all()
    grid = np.linspace(-1.0, 8.0, 20001)
    for b in range(len(cal.centers)):
        lt = cal._log_tail_bin(b, grid)
        assert (np.diff(lt) <= 1e-12).all(), b
        at, past = cal._log_tail_bin(b, np.array([1.5, 1.5 + 1e-9]))  # the bin's own, pooled
        assert past <= at and at - past < 1e-6

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:  # zeros below t = 0.5, N(5, 1) above
        t = rng.uniform(0, 1, n)
        low = np.where(rng.uniform(size=n) < 0.6, 0.0, rng.exponential(1.0, n))
        return t, np.where(t < 0.5, low, rng.normal(5.0, 1.0, n))

    t, u = draw(4000)
    cal = NoiseCalibration.fit(t, u)
    assert cal.tail_q is not None and np.isinf(cal.tail_thr[:7]).all()
    t_new, u_new = draw(40000)
    hi = t_new > 0.55
    p = np.exp(cal.log_tail(t_new[hi], u_new[hi]))
    assert 0.006 < np.mean(p < 0.01) < 0.016
    assert cal.log_tail(np.array([0.8]), np.array([10.0]))[0] < np.log(1e-3)
    part = cal.arrays("cal.x")
    del part["cal.x.tail_q"]
    with pytest.raises(KeyError, match=r"cal\.x\.tail_q"):
        NoiseCalibration.from_arrays(part, "cal.x")


def test_a_damaged_checkpoint_is_refused_naming_the_file(trained, tmp_path) -> None:
    """Bytes changed after the checkpoint was written (the SHA-256 its config.json
    recorded), NaN weights or a NaN calibration (written by hand, no hash), and a
    model_kind this version does not know are each refused at load with a
    CheckpointError naming the file and what is wrong; they scored every spectrum -inf
    (unscorable) with exit code 0, or named the wrong kind.  A checkpoint written before
    the hash loads as before."""
    import shutil

    from safetensors.numpy import load_file, save_file

    src = trained[1]
    info = json.loads((src / "config.json").read_text())
    assert len(info["tensors_sha256"]) == 64

    def copy(name: str, arrays: dict | None = None, **config) -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        if arrays is not None:
            save_file(arrays, str(dst / "model.safetensors"))
        cfg = {k: v for k, v in (info | config).items() if v is not None}
        (dst / "config.json").write_text(json.dumps(cfg))
        return dst

    damaged = copy("damaged")
    data = bytearray((damaged / "model.safetensors").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\x7f" * 64  # finite garbage in place
    (damaged / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"damaged/model\.safetensors: damaged: its SHA-256"):
        load_scorer(damaged)
    arrays = load_file(str(src / "model.safetensors"))
    older = copy("older", tensors_sha256=None)  # written before the hash: loads
    np.testing.assert_array_equal(load_scorer(older).ref["sorted.score"],
                                  load_scorer(src).ref["sorted.score"])  # fmt: skip
    key = next(k for k, v in arrays.items() if k.startswith("flow.") and v.dtype.kind == "f")
    nan_flow = copy("nan_flow", arrays | {key: np.full_like(arrays[key], np.nan)},
                    tensors_sha256=None)  # fmt: skip
    with pytest.raises(CheckpointError, match=rf"nan_flow/model\.safetensors: {key} holds "
                       r"\d+ non-finite value"):  # fmt: skip
        load_scorer(nan_flow)
    cal = "score.cal.chi2.quantiles"
    bad = arrays[cal].copy()
    bad[0, 3] = np.nan
    nan_cal = copy("nan_cal", arrays | {cal: bad}, tensors_sha256=None)
    with pytest.raises(CheckpointError, match=rf"{cal} holds 1 NaN value"):
        load_scorer(nan_cal)
    kind = copy("kind", model_kind="banana")
    with pytest.raises(CheckpointError, match=r"kind/config\.json: model_kind 'banana' is not"):
        load_scorer(kind)


@pytest.mark.parametrize("fault", ["missing", "shape", "zero_scale"])
def test_a_checkpoint_with_bad_derivative_scales_is_refused(trained, tmp_path, fault) -> None:
    """A reference with the standardized compression test but no, misshapen or zero
    spreads is refused at load, naming the file and the key."""
    scorer = load_scorer(trained[1])
    n = scorer.model.flow.n_spline_features
    assert scorer.ref["compression.loc"].shape == (n,) and n > 0
    if fault == "missing":
        del scorer.ref["compression.scale"]
    elif fault == "shape":
        scorer.ref["compression.loc"] = scorer.ref["compression.loc"][:-1]
    else:
        scorer.ref["compression.scale"] = np.zeros(n)
    path = scorer.save(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"compression\.(loc|scale)"):
        load_scorer(path)


def test_derivative_scales_are_robust_and_floored() -> None:
    """``derivative_scales``: each column's median and 1.4826 x MAD (an outlying row moves
    neither), at least the floor for a column that does not vary; rows with a non-finite
    value are left out."""
    rng = np.random.default_rng(0)
    d = np.c_[rng.normal(0.2, 0.1, 4000), rng.normal(-0.1, 0.5, 4000), np.full(4000, 0.3)]
    odd = np.tile([[-50.0, 40.0, 0.3]], (100, 1))  # 2.5% of the rows: the mean moves by ~1
    got = derivative_scales(np.r_[d, odd, [[np.nan, 0.0, 0.0]]])
    np.testing.assert_allclose(got["compression.loc"], [0.2, -0.1, 0.3], atol=0.05)
    np.testing.assert_allclose(got["compression.scale"], [0.1, 0.5, SLOPE_FLOOR], rtol=0.06)


def test_label_weight_is_the_ratio_of_robust_spreads() -> None:
    """The label density's weight: log q's spread over the label density's (IQR / 1.349,
    finite values only, so unscorable stars do not move it); 1 where either is flat."""
    from mendis_ray.science.signal_tails import label_weight

    rng = np.random.default_rng(13)
    a, b = rng.standard_normal(20000), rng.standard_normal(20000)
    assert label_weight(5.0 * a, b) == pytest.approx(5.0, rel=0.05)
    a[:50], b[:50] = -np.inf, 1e300  # unscorable and absurd rows
    assert label_weight(5.0 * a, b) == pytest.approx(5.0, rel=0.05)
    assert label_weight(a, np.zeros(20000)) == 1.0 and label_weight(np.zeros(3), b[:3]) == 1.0


def test_far_out_is_far_below_the_median_in_interquartile_ranges() -> None:
    """``far_out``: more than 6 IQRs below the median, or not finite; never on a Gaussian
    sample of 20,000 (6 IQRs is 8 sd), never where the quartiles coincide."""
    from mendis_ray.science.signal_tails import far_out

    rng = np.random.default_rng(14)
    lq = rng.standard_normal(20000)
    assert not far_out(lq).any()
    q1, med, q3 = np.quantile(lq, [0.25, 0.5, 0.75])
    lq[:4] = [med - 6.5 * (q3 - q1), np.nan, -np.inf, med - 5.5 * (q3 - q1)]
    np.testing.assert_array_equal(np.flatnonzero(far_out(lq)), [0, 1, 2])
    assert not far_out(np.r_[np.zeros(100), -1e9 * np.ones(3)]).any()


def test_far_out_held_out_stars_leave_the_reference_as_it_was(trained, caplog) -> None:
    """With ``far_iqr``, held-out stars far outside the rest (a catalogue's stripped and
    CEMP stars among the rows that calibrate) are left out of the reference: with six of them
    appended, every array of the reference equals the one fitted without them (so every
    score is the same); a log line counts them."""
    from mendis_ray.science.signal_tails import FAR_IQR, far_out

    data, ckpt = trained
    model = load_scorer(ckpt).model
    tr, te = _arrays(data, "train"), _arrays(data, "test")
    # a short training leaves a tail: the test stars that are far out among themselves
    # (1-2 of 200 here) are not what this test adds
    ok = ~far_out(model.flow_log_prob(model.coordinates(te.flux, te.ivar, te.labels)))
    clean_rows = [te.flux[ok], te.ivar[ok], te.labels[ok]]
    far = [_arrays(data, name) for name in ("stripped", "cemp")]  # log q below -100
    held = [
        np.concatenate([a] + [getattr(o, f)[:3] for o in far])
        for a, f in zip(clean_rows, ("flux", "ivar", "labels"), strict=True)
    ]
    coords = model.coordinates(tr.flux, tr.ivar, tr.labels)
    clean = SignalScorer.fit(model, *clean_rows, coords, far_iqr=FAR_IQR)
    with caplog.at_level(logging.INFO, logger="mendis_ray.science.signal_scores"):
        mixed = SignalScorer.fit(model, *held, coords, far_iqr=FAR_IQR)
    assert f"6 of {ok.sum() + 6} held-out spectra lie far outside the rest" in caplog.text
    assert "left out of the scores' reference" in caplog.text
    assert (clean.held_out_far, mixed.held_out_far) == (0, 6)
    assert sorted(mixed.ref) == sorted(clean.ref)
    for key, value in clean.ref.items():
        np.testing.assert_array_equal(mixed.ref[key], value, err_msg=key)
    kept = SignalScorer.fit(model, *held, coords)  # the default: counted, and kept
    assert kept.held_out_far == 6
    assert kept.ref["sorted.score"].shape == (ok.sum() + 6,)
    assert any(not np.array_equal(kept.ref[k], v) for k, v in clean.ref.items())
    with pytest.raises(ValueError, match="at least 1"):
        SignalScorer.fit(model, *held, coords, far_iqr=0.5)


def test_mendis_train_far_iqr_reaches_the_scorer_and_its_summary(
    trained, monkeypatch, tmp_path, capsys
) -> None:
    """``mendis train --far-iqr`` sets ``SignalConfig.far_iqr``, which every scorer fitted
    from a training result uses; without it the far-out validation spectra are counted,
    kept, and the summary says how to leave them out."""
    from mendis_ray.train import signal as train_signal

    seen, fits = [], []
    real_fit = SignalScorer.fit

    def spy_fit(*args, **kwargs):
        fits.append(kwargs.get("far_iqr", "not given"))
        return real_fit(*args, **kwargs)

    def fake_train(paths, out, cfg, **kwargs):  # what the CLI hands on and prints
        seen.append(cfg)
        keys = ("k", "train_rows", "epochs", "best_epoch", "seconds", "initial_val_log_q",
                "best_val_log_q", "val_log_p")  # fmt: skip
        return dict.fromkeys(keys, 1) | {"checkpoint": "c", "val_rows": 200, "val_far_out": 3,
                                         "far_iqr": cfg.far_iqr}  # fmt: skip

    monkeypatch.setattr(train_signal, "train_signal_checkpoint", fake_train)
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "a"), "--far-iqr", "6"]) == 0
    assert "3 of 200 validation spectra lie more than 6 interquartile ranges" in (
        capsys.readouterr().out
    )
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "b")]) == 0
    assert "kept in the scores' reference. If they are peculiar stars of the catalogue, " \
        "--far-iqr 6 leaves them out" in capsys.readouterr().out  # fmt: skip
    assert [c.far_iqr for c in seen] == [6.0, None]
    for bad in ("0", "0.5", "nan", "inf", "-3"):  # inside the IQR, or no cut: refused
        with pytest.raises(SystemExit):
            main(["train", str(tmp_path), "--out", str(tmp_path / "d"), "--far-iqr", bad])
    assert "a finite number of at least 1" in capsys.readouterr().err and len(seen) == 2
    monkeypatch.setattr(train_signal, "train_signal_checkpoint",
                        lambda *a, **k: fake_train(*a, **k) | {"val_far_out": 0})  # fmt: skip
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "e")]) == 0
    assert "validation spectra lie" not in capsys.readouterr().out
    for n, points, hint in ((2000, 6.15, True), (6000, 3.55, False)):  # the precision line
        monkeypatch.setattr(
            train_signal,
            "train_signal_checkpoint",
            lambda *a, n=n, p=points, **k: (
                fake_train(*a, **k) | {"val_rows": n, "percentile_points": p}
            ),
        )
        assert main(["train", str(tmp_path), "--out", str(tmp_path / f"p{n}")]) == 0
        out = capsys.readouterr().out
        assert (
            f"percentiles: {n} held-out spectra calibrate them, about {n // 10} in each "
            f"tenth of their noise range: good to about {round(points)} points there" in out
        )
        assert ("mendis train --reference adds" in out) == hint
    monkeypatch.undo()  # the real training function, with a spy on the scorer's fit
    monkeypatch.setattr(SignalScorer, "fit", spy_fit)
    data, _ = trained
    cfg = SignalConfig(n_units=1, hidden=16, epochs=1, far_iqr=9.0, residual_folds=0,
                       structure_tests=False, element_tests=False)  # fmt: skip
    summary = train_signal.train_signal_checkpoint([data / "train"], tmp_path / "c", cfg,
                                                   show_progress=False)  # fmt: skip
    assert fits == [9.0] and summary["far_iqr"] == 9.0 and summary["val_far_out"] >= 0
    saved = json.loads((tmp_path / "c" / "checkpoint" / "config.json").read_text())
    assert saved["signal_config"]["far_iqr"] == 9.0


def test_reference_spectra_join_the_calibration_and_are_checked_first(
    trained, tmp_path, monkeypatch, capsys, caplog
) -> None:
    """``mendis train --reference``: held-out spectra the model does not learn join the
    validation rows in the scores' reference (``SignalScorer.fit``'s held-out stars, the
    percentiles' sorted scores) and not the training rows; a reference holding training
    spectra (the same flux, under their ids or others) or on another grid stops the
    command before it trains, naming it; an id that names another spectrum in the
    training set is kept, said once."""
    from mendis_ray.spectra import shards
    from mendis_ray.spectra.grid import aspcap_grid, paper_grid
    from mendis_ray.train import signal as train_signal

    data, _ = trained
    test = table_arrays(read_dataset(data / "test"))
    train_ids = table_arrays(read_dataset(data / "train")).ids
    n = 30  # training ids on (changed) test spectra: other stars under the same names
    renamed = shards.make_table(train_ids[:n], test.flux[:n] * 0.999, test.ivar[:n],
                                teff=test.labels[:n, 0], logg=test.labels[:n, 1],
                                feh=test.labels[:n, 2])  # fmt: skip
    shards.write_dataset(tmp_path / "renamed", [renamed], 1, paper_grid())
    held, trained_rows = [], []
    real_fit, real_train = SignalScorer.fit, train_signal.train_signal_model

    def spy_fit(model, flux, ivar, labels, *args, **kwargs):
        held.append(np.asarray(labels).copy())
        return real_fit(model, flux, ivar, labels, *args, **kwargs)

    def spy_train(flux, *args, **kwargs):
        trained_rows.append(len(flux))
        return real_train(flux, *args, **kwargs)

    monkeypatch.setattr(SignalScorer, "fit", spy_fit)
    monkeypatch.setattr(train_signal, "train_signal_model", spy_train)
    cfg = SignalConfig(n_units=1, hidden=16, epochs=1, residual_folds=0,
                       structure_tests=False, element_tests=False)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="mendis_ray.train.signal"):
        s = train_signal.train_signal_checkpoint(
            [data / "train"], tmp_path / "a", cfg, reference=[data / "test", tmp_path / "renamed"],
            show_progress=False,
        )  # fmt: skip
    assert "30 reference ids also name training spectra with other flux" in caplog.text
    assert trained_rows == [len(train_ids)] and s["reference_rows"] == len(test.flux) + n
    got = held[0][s["val_rows"] :]  # the validation rows, then the reference's (shuffled)
    want = np.r_[test.labels[:, 0], test.labels[:n, 0]]
    np.testing.assert_array_equal(np.sort(got[:, 0]), np.sort(want))
    ref = load_scorer(s["checkpoint"]).ref
    assert len(ref["sorted.score"]) == s["val_rows"] + 230  # far_iqr None: every one kept

    def refused(*args, **kwargs):
        raise AssertionError("trained before the reference was checked")

    monkeypatch.setattr(train_signal, "train_signal_model", refused)

    def stops(reference, message) -> None:
        argv = ["train", str(data / "train"), "--out", str(tmp_path / "b"), "--epochs", "1",
                "--quiet", *(w for r in reference for w in ("--reference", str(r)))]  # fmt: skip
        assert main(argv) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "b").exists()

    stops([data / "test", data / "train"], "1500 of its 1700 spectra are in the training set")
    tr = table_arrays(read_dataset(data / "train"))
    copies = shards.make_table([f"copy{i}" for i in range(n)], tr.flux[:n], tr.ivar[:n],
                               teff=tr.labels[:n, 0], logg=tr.labels[:n, 1],
                               feh=tr.labels[:n, 2])  # fmt: skip
    shards.write_dataset(tmp_path / "copies", [copies], 1, paper_grid())
    stops([tmp_path / "copies"], "30 of its 30 spectra are in the training set too (the same flux")
    wide = aspcap_grid()  # the same stars on all 7,214 pixels
    flat = np.ones((n, wide.n_pix), np.float32) + np.arange(n, dtype=np.float32)[:, None] / 100
    table = shards.make_table([f"w{i}" for i in range(n)], flat,
                              np.full((n, wide.n_pix), 1e4, np.float32), teff=test.labels[:n, 0],
                              logg=test.labels[:n, 1], feh=test.labels[:n, 2])  # fmt: skip
    shards.write_dataset(tmp_path / "wide", [table], 1, wide)
    stops([tmp_path / "wide"], f"--reference {tmp_path / 'wide'}: grid 'aspcap' (7214 px")
    argv = ["train", str(data / "train"), "--out", str(tmp_path / "c"), "--model", "flow",
            "--reference", str(data / "test")]  # fmt: skip
    assert main(argv) == 2 and "--reference calibrates the signal-space model" in (
        capsys.readouterr().err
    )


def test_log_tails_of_many_statistics_equal_their_own_log_tail() -> None:
    """``NoiseCalibration.log_tails`` (the bins grouped once for calibrations fit on the
    same reference stars) gives each calibration's own ``log_tail``, also where the
    centres differ (no shared grouping) and beyond every bin's largest value."""
    rng = np.random.default_rng(12)
    t, u = rng.uniform(0, 1, 3000), rng.standard_normal((3000, 3)) * [1.0, 2.0, 5.0]
    shared = [NoiseCalibration.fit(t, u[:, j]) for j in range(3)]
    other = [shared[0], NoiseCalibration.fit(t[:1500], u[:1500, 1]), shared[2]]
    new_t, new_u = rng.uniform(-0.2, 1.2, 500), rng.standard_normal((500, 3)) * 8
    for cals in (shared, other):
        got = NoiseCalibration.log_tails(cals, new_t, new_u)
        for j, cal in enumerate(cals):
            np.testing.assert_array_equal(got[j], cal.log_tail(new_t, new_u[:, j]))
    assert NoiseCalibration.log_tails([], new_t, new_u[:, :0]) == []


def test_conditional_correlations_and_reconstruction(trained) -> None:
    """p(spectrum | labels) by MALA in the k signal coordinates: converged chains, a valid
    correlation matrix with its clusters, and a reconstruction closer than the noise."""
    from mendis_ray.science.signal_conditional import reconstruct_signal, signal_conditional

    data, ckpt = trained
    model = load_scorer(ckpt).model
    te = _arrays(data, "test")
    res = signal_conditional(model, tuple(np.median(te.labels, axis=0)), n_chains=32,
                             n_keep=1500, n_draw=40_000)  # fmt: skip
    assert res.max_rhat < 1.1 and 0.05 < res.mcmc.acceptance < 0.9  # a 6-epoch toy model
    corr = res.clusters.corr
    np.testing.assert_allclose(corr, corr.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(corr), 1.0)
    assert np.linalg.eigvalsh(corr).min() > -1e-8 and res.clusters.sizes.sum() == len(corr)
    rec = reconstruct_signal(model, te.flux[:50], te.ivar[:50])
    good = te.ivar[:50] > 0
    chi2 = ((te.flux[:50] - rec) ** 2 * te.ivar[:50])[good].mean()
    assert chi2 < 3.0  # residual about the noise (plus the intrinsic part at high S/N)


def test_cleaner_than_training_is_noised_down_deterministically() -> None:
    from mendis_ray.science.signal_noise import match_noise, star_snr

    rng = np.random.default_rng(0)
    flux = 1 + 0.001 * rng.standard_normal((3, 500))
    ivar = np.full((3, 500), 1000.0**2)  # S/N 1000
    ivar[0] = 200.0**2  # S/N 200: below the limit, untouched
    ivar[2, :50] = 0.0
    f, iv = match_noise(flux, ivar, 300.0)
    np.testing.assert_array_equal(f[0], flux[0])
    np.testing.assert_allclose(star_snr(f, iv)[1:], 300.0, rtol=0.02)
    assert np.all(iv[2, :50] == 0) and np.all(f[2, :50] == flux[2, :50])
    assert np.std(f[1] - flux[1]) == pytest.approx(np.sqrt(1 / 300.0**2 - 1 / 1000.0**2), rel=0.1)
    f2, _ = match_noise(flux[1:2], ivar[1:2], 300.0)  # alone: the same noise
    np.testing.assert_array_equal(f2[0], f[1])


@pytest.mark.parametrize("snr", [20.0, 1000.0])
def test_flux_range_counts_pixels_outside_by_more_than_their_noise(snr: float) -> None:
    """A star inside the training range is never flagged, however noisy; one whose flux
    leaves it at 1% of its good pixels by more than its noise allows is; 0.3% is not, 0.6%
    is (the share counts good pixels only)."""
    from mendis_ray.science.signal_noise import FLUX_RANGE_Z, outside_flux_range

    rng = np.random.default_rng(1)
    p, sigma = 2000, 1 / snr
    ref = {"flux_lo": np.full(p, 0.9), "flux_hi": np.full(p, 1.1)}
    flux = np.where(rng.random((3, p)) < 0.5, 0.9, 1.1) + sigma * rng.standard_normal((3, p))
    ivar = np.full((3, p), snr**2, np.float32)
    beyond = 1.1 + 2 * FLUX_RANGE_Z * sigma  # past the range by twice the allowance
    flux[1, :20] = beyond  # 1% of the pixels
    flux[2, :6] = beyond  # 0.3%
    flux[0, :100], ivar[0, :100] = 5.0, 0.0  # masked pixels do not count
    flux = np.r_[flux, flux[2:]]  # row 3: row 2 with half its pixels masked: 6 of 1,000
    ivar = np.r_[ivar, ivar[2:]]
    ivar[3, 1000:] = 0.0
    ref["flux_lo"][-50:], ref["flux_hi"][-50:] = -np.inf, np.inf  # pixels no star had
    ivar[:, -50:] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no inf x 0 warnings
        out = outside_flux_range(flux.astype(np.float32), ivar, ref)
    assert out.tolist() == [False, True, False, True]
    np.testing.assert_array_equal(outside_flux_range(flux, ivar.astype(np.float64), ref), out)
    flux[1, :20] = 1.1 + 0.5 * FLUX_RANGE_Z * sigma  # inside the allowance: not flagged
    assert not outside_flux_range(flux.astype(np.float32), ivar, ref)[:3].any()


def test_noise_augmentation_matches_noising_the_spectrum() -> None:
    """Augmenting in the signal coordinates equals adding pixel noise and dividing ivar by
    f, then projecting (exact when the intrinsic residual variance is negligible): same
    noise level t, same spread of the coordinates, same mean."""
    from mendis_ray.flow.signal import SignalSpaceModel
    from mendis_ray.train.signal import NoiseAugmenter

    basis, flux, ivar, _ = _dense_case(2)
    basis.intrinsic[:] = 0.0
    basis.eigenvalues = np.array([4.0, 2.0, 1.0])
    model = SignalSpaceModel(basis, np.zeros(3), np.ones(3), np.zeros(2), SignalConfig())
    star, f, m = 1, 3.0, 4000  # a star with a masked run
    rng = np.random.default_rng(0)
    fl = flux[star] + np.sqrt((f - 1) / np.where(ivar[star] > 0, ivar[star], 1)) * (
        rng.standard_normal((m, flux.shape[1]))
    )
    real = model.coordinates(fl, np.repeat(ivar[star : star + 1] / f, m, 0), np.zeros((m, 3)))
    c = model.coordinates(flux, ivar, np.zeros((len(flux), 3)))
    aug = NoiseAugmenter(c, basis.eigenvalues, max_factor=f, fraction=1.0)
    y, t = aug.noisier(np.full(m, star), np.full(m, np.log(f)), rng)
    np.testing.assert_allclose(t, real.t, atol=1e-6)
    ca, cr = np.cov(y[:, :3].T), np.cov(real.y[:, :3].T)
    np.testing.assert_allclose(ca, cr, atol=0.1 * np.diag(cr).max())  # 4000 draws: ~3% noise
    np.testing.assert_allclose(y[:, :3].mean(0), real.y[:, :3].mean(0),
                               atol=0.1 * np.sqrt(np.diag(cr).max()))  # fmt: skip
    half = np.cov(aug.noisier(np.full(m, star), np.full(m, np.log(2.0)), rng)[0][:, :3].T)
    np.testing.assert_allclose(half, cr / 2, atol=0.05 * np.diag(cr).max())  # (f - 1) scaling
    assert np.all(y[:, 3:] == c.y[star, 3:])  # labels untouched


@pytest.mark.parametrize("batch_size", [64, 256])
def test_a_large_training_set_takes_larger_steps(batch_size: int, monkeypatch, tmp_path) -> None:
    """From ``large_set`` rows on: twice the rows per step at 1.5x the lr, the weight
    average's horizon the same in rows, 2/3 of the patience; below it, and with
    ``large_set = 0`` or ``mendis train --batch-size`` / ``--lr``, the settings as given."""
    cfg = SignalConfig(batch_size=batch_size)
    small, big = cfg.train_config(n_rows=cfg.large_set - 1), cfg.train_config(cfg.large_set)
    given = (cfg.batch_size, cfg.lr, cfg.patience, cfg.ema_decay)
    assert (small.batch_size, small.lr, small.patience, small.ema_decay) == given
    assert (big.batch_size, big.patience) == (2 * batch_size, 8)
    assert big.lr == pytest.approx(1.5 * cfg.lr)
    horizon = lambda t: t.batch_size / (1 - t.ema_decay)  # noqa: E731 rows averaged over
    assert horizon(big) == pytest.approx(horizon(small), rel=0.01)  # d^2 ~ 1 - 2 (1 - d)
    assert cfg.replace(large_set=0).train_config(n_rows=10**7) == small
    seen = []

    def fake_train(paths, out, cfg, **kwargs):  # only what the CLI hands on is checked
        seen.append(cfg)
        keys = ("k", "train_rows", "val_rows", "epochs", "best_epoch", "seconds",
                "initial_val_log_q", "best_val_log_q", "val_log_p")  # fmt: skip
        return dict.fromkeys(keys, 1) | {"checkpoint": "c"}

    monkeypatch.setattr("mendis_ray.train.signal.train_signal_checkpoint", fake_train)
    for opts in ([], ["--batch-size", str(batch_size)], ["--lr", "1e-3"]):
        assert main(["train", str(tmp_path), "--out", str(tmp_path / "o"), *opts]) == 0
    assert [c.large_set for c in seen] == [SignalConfig().large_set, 0, 0]


def test_training_uses_the_large_set_steps_from_its_training_rows() -> None:
    """train_signal_model trains with ``train_config`` of its training rows (the 90% that
    do not validate): 216 of 240 here, so ``large_set`` 216 doubles the batch, 217 not."""
    from mendis_ray.train.signal import train_signal_model

    rng = np.random.default_rng(0)
    n, p = 240, 40
    signal = rng.standard_normal((n, 3)) @ rng.standard_normal((3, p))  # (n, p), rank 3
    flux = (1 + 0.05 * signal + 0.01 * rng.standard_normal((n, p))).astype(np.float32)
    ivar = np.full((n, p), 1e4, np.float32)
    for large_set, batch in ((217, 16), (216, 32)):
        cfg = SignalConfig(n_signal=2, n_units=1, hidden=8, epochs=1, batch_size=16,
                           large_set=large_set)  # fmt: skip
        res = train_signal_model(flux, ivar, rng.standard_normal((n, 3)), cfg, show_progress=False)
        assert res.steps == cfg.train_config(n_rows=216) and res.steps.batch_size == batch


def test_label_free_score_is_per_row_not_per_batch(trained) -> None:
    """The label-free signal scores (labels integrated out by importance sampling with
    common draws, clean spectra noised with their own seed) of a spectrum are the same
    alone and in any batch, e.g. beside outliers or many other stars (Serve merges the
    requests of several users into one batch)."""
    data, ckpt = trained
    scorer = load_scorer(ckpt)
    te, bi = _arrays(data, "test"), _arrays(data, "binary")
    alone = [scorer.score(te.flux[i : i + 1], te.ivar[i : i + 1], None) for i in range(4)]
    for f, iv in ((bi.flux[:20], bi.ivar[:20]), (te.flux[50:150], te.ivar[50:150])):
        batch = scorer.score(np.concatenate([te.flux[:4], f]), np.concatenate([te.ivar[:4], iv]),
                             None)  # fmt: skip
        for key in ("score", "signal_score", "residual_score", "percentile", "log_p"):
            want = np.array([a[key][0] for a in alone])
            np.testing.assert_allclose(batch[key][:4], want, rtol=1e-5, atol=1e-4, err_msg=key)
        want = np.array([a["labels_used"][0] for a in alone])
        np.testing.assert_allclose(batch["labels_used"][:4], want, rtol=1e-5)


def test_catalogue_marks_of_missing_data_score_as_missing(trained) -> None:
    """A -9999 label (a catalogue's 'missing') scores as a missing label, not as a star
    9,999 K cold; a NaN ivar as a masked pixel (ivar 0), not as a broken spectrum.  An
    impossible label (log g 50) scores as missing too, and is flagged."""
    data, ckpt = trained
    scorer = load_scorer(ckpt)
    te = _arrays(data, "test")
    f, iv, lab = te.flux[:6].copy(), te.ivar[:6].copy(), te.labels[:6].copy()
    lab[[1, 2], 0], lab[3, 2], lab[5, 1] = -9999.0, -9999.0, 50.0
    missing = lab.copy()
    missing[(lab == -9999.0) | (lab == 50.0)] = np.nan
    iv[4, 100:130], f[4, 100:130] = np.nan, np.nan
    zero_iv = iv.copy()
    zero_iv[4, 100:130] = 0.0
    got, want = scorer.score(f, iv, lab), scorer.score(f, zero_iv, missing)
    for key in ("score", "percentile", "labelled"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert not got["flag_nonfinite"].any() and not got["labelled"][[1, 2, 3, 5]].any()
    np.testing.assert_array_equal(got["flags"] ^ want["flags"], [0, 0, 0, 0, 0, Flag.LABEL_RANGE])


def test_fast_pixel_statistics_equal_their_definitions() -> None:
    """The blocked residual scan (window sums by doubling; float32 against float64), the
    partitioned S/N and match_noise's counting pre-filter give what their plain
    definitions give (masked, infinite, negative ivar)."""
    import warnings
    from types import SimpleNamespace

    from mendis_ray.science.signal_noise import SCALES, match_noise, residual_statistics, star_snr

    rng = np.random.default_rng(3)
    w = rng.standard_normal((23, 300)).astype(np.float32)
    w[[0, 5, 6], 40:90] = 0  # masked runs in rows 0-7 only: blocks of both kinds
    proj = SimpleNamespace(
        wres=w, chi2=(w.astype(np.float64) ** 2).sum(1), dof=np.full(23, 290), template_z=None
    )
    got = residual_statistics(SimpleNamespace(proj=proj), rows=4)
    w64 = w.astype(np.float64)
    for j, s in enumerate(SCALES):  # every window summed directly, in float64
        sums = np.stack([w64[:, a : a + s].sum(1) for a in range(300 - s + 1)], 1)
        cnt = np.stack([(w[:, a : a + s] != 0).sum(1) for a in range(300 - s + 1)], 1)
        want = np.abs(sums / np.sqrt(np.maximum(cnt, 1))).max(1)
        np.testing.assert_allclose(got[:, 1 + j], want, rtol=1e-5)
    # S/N: median of sqrt(ivar) over good pixels, against numpy's nanmedian
    ivar = rng.uniform(50, 400, (40, 301)) ** 2
    ivar[::4, :100] = 0.0
    ivar[1, 5], ivar[2, 6], ivar[3, 7], ivar[5, :] = np.inf, -1.0, 2e11, 0.0
    good = (ivar > 0) & np.isfinite(ivar) & (ivar < 1e11)
    with warnings.catch_warnings():  # row 5 has no good pixel: its median is NaN -> 0
        warnings.simplefilter("ignore", RuntimeWarning)
        want = np.nan_to_num(
            np.nanmedian(np.sqrt(np.where(good, ivar, np.nan).astype(np.float32)), 1)
        )
    np.testing.assert_allclose(star_snr(np.ones_like(ivar), ivar), want, rtol=1e-6)
    # the pre-filter never drops a row whose S/N is above the limit (ties at the limit too)
    limit = float(np.median(want[want > 0]))
    ivar[7] = np.r_[np.full(150, (limit * 1.01) ** 2), np.full(151, (limit * 0.995) ** 2)]
    ivar[8] = np.r_[np.full(151, (limit * 1.01) ** 2), np.full(150, (limit * 0.995) ** 2)]
    flux = 1 + 0.01 * rng.standard_normal(ivar.shape)
    f, _ = match_noise(flux, ivar, limit)
    changed = np.flatnonzero((f != flux).any(1))
    assert 8 in changed and 7 not in changed
    np.testing.assert_array_equal(changed, np.flatnonzero(star_snr(flux, ivar) > limit))


def test_scores_do_not_depend_on_chunking_or_threads(trained) -> None:
    import torch

    data, ckpt = trained
    scorer = load_scorer(ckpt)
    te = _arrays(data, "test")
    ref = scorer.score(te.flux, te.ivar, te.labels)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = scorer.score(te.flux, te.ivar, te.labels, chunk=37)  # several threaded chunks
        torch.set_num_threads(1)
        one = scorer.score(te.flux, te.ivar, te.labels, chunk=37)
    finally:
        torch.set_num_threads(threads)
    for key in ("score", "signal_score", "residual_score", "flags", "percentile"):
        np.testing.assert_array_equal(two[key], one[key], err_msg=key)
        # float32 sums differ with a row's position in its batch (~6e-5 relative): the
        # scores agree to that, deep outliers' too (-28.66 and -28.66 + 0.0016 seen)
        tol = {"rtol": 2e-3} if key == "percentile" else {"rtol": 1e-4, "atol": 1e-3}
        np.testing.assert_allclose(two[key], ref[key], err_msg=key, **tol)


def test_label_density_sees_stars_off_the_giant_branch(trained) -> None:
    """The flow's tail is calibrated on -(log q + w x the log density of the denoised
    labels), w the ratio of their held-out spreads: that sees stars moved off the giant
    branch better than the flow's log q alone; a reference without the label density
    (written before it) keeps -log q."""
    from mendis_ray.science.signal_tails import flow_statistic, rho_sig
    from mendis_ray.science.structure import StructureTests

    data, ckpt = trained
    scorer = load_scorer(ckpt)
    tests = StructureTests.from_arrays(scorer.ref)
    assert tests.label_density.size > 0
    te, odd = _arrays(data, "test"), _arrays(data, "off_branch")
    ct, co = (scorer.model.coordinates(a.flux, a.ivar, a.labels) for a in (te, odd))
    lt, lo = scorer.model.flow_log_prob(ct), scorer.model.flow_log_prob(co)
    w = float(scorer.ref["cal.signal_labels.weight"][0])
    assert 1 < w < 100  # log q over k + 3 dimensions spreads wider than a density over 3
    alone = auroc(lt, lo)  # 0.88 with these 1,500 training stars
    both = auroc(-flow_statistic(lt, ct.y, tests, w), -flow_statistic(lo, co.y, tests, w))
    labels = auroc(tests.label_log_density(ct.y), tests.label_log_density(co.y))  # 0.91
    assert both > alone and labels > 0.85, (alone, both, labels)
    assert "cal.signal_labels.centers" in scorer.ref
    before = scorer.score(te.flux, te.ivar, te.labels)["signal_score"]
    # a reference written before the label density: the flow's log q alone, on cal.signal
    new = ("cal.signal_labels.", *(f"structure.label_{f}" for f in ("lo", "step", "ban", "den")),
           *COMPRESSION_KEYS)  # fmt: skip
    scorer.ref = {k: v for k, v in scorer.ref.items() if not k.startswith(new)}
    np.testing.assert_array_equal(flow_statistic(lt, ct.y, scorer._tests()), -lt)
    out = scorer.score(te.flux, te.ivar, te.labels)
    c = scorer._pixel_pass(te.flux, te.ivar, te.labels).c  # as scored (noise matched)
    rho, lq = rho_sig(c, scorer.model), scorer.model.flow_log_prob(c)
    flow = NoiseCalibration.from_arrays(scorer.ref, "cal.signal").log_tail(rho, -lq)
    want = scorer._with_structure(c, rho, flow)[0]
    np.testing.assert_allclose(out["signal_score"], want, rtol=0, atol=1e-3)  # float32 sums
    assert np.abs(out["signal_score"] - before).max() > 0.05  # a different path from before


def test_a_survey_training_set_with_a_common_mask_and_unlabelled_stars(
    trained, tmp_path, caplog, capsys
) -> None:
    """A survey mask applied to every training spectrum (here 60 pixels) and stars
    without labels: ``mendis train`` trains (it refused both before: "a pixel has fewer
    than 2 good training spectra", "training rows have missing labels"), leaving the
    unlabelled stars out with a warning; the checkpoint records the pixels it models,
    and a scored spectrum's values there change nothing; they do not count as masked."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mendis_ray.spectra.shards import dataset_files, matrix_column

    data, _ = trained
    dead = np.arange(100, 160)
    (tmp_path / "train").mkdir()
    for f in dataset_files(data / "train"):
        t = pq.read_table(f)
        ivar = table_arrays(t).ivar.copy()
        ivar[:, dead] = 0.0
        t = t.set_column(t.schema.get_field_index("ivar"), "ivar", matrix_column(ivar))
        teff = t.column("teff").to_numpy().copy()
        teff[:10] = np.nan  # ten stars per shard without a Teff
        t = t.set_column(t.schema.get_field_index("teff"), "teff",
                         pa.array(teff, mask=np.isnan(teff), type=pa.float32()))  # fmt: skip
        pq.write_table(t, tmp_path / "train" / f.name)
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="mendis_ray"):
        assert main(["train", str(tmp_path / "train"), "--out", str(run), "--epochs", "2",
                     "--quiet"]) == 0  # fmt: skip
    assert "20 of 1500 training spectra have no finite Teff" in caplog.text
    assert json.loads((run / "checkpoint" / "config.json").read_text())["metrics"]["rows"] == 1480
    (tmp_path / "nolabels").mkdir()  # no labelled star at all: a clear error
    for f in dataset_files(tmp_path / "train"):
        t = pq.read_table(f)
        t = t.set_column(
            t.schema.get_field_index("teff"), "teff", pa.nulls(t.num_rows, pa.float32())
        )
        pq.write_table(t, tmp_path / "nolabels" / f.name)
    capsys.readouterr()
    assert main(["train", str(tmp_path / "nolabels"), "--out", str(tmp_path / "x")]) != 0
    assert "1500 of the 1500 training spectra that pass the checks have no finite Teff" in (
        capsys.readouterr().err
    )
    scorer = load_scorer(run / "checkpoint")
    np.testing.assert_array_equal(np.flatnonzero(~scorer.model.basis.modelled), dead)
    te = _arrays(data, "test")
    seen = scorer.score(te.flux, te.ivar, te.labels)
    hidden_ivar = te.ivar.copy()
    hidden_ivar[:, dead] = 0.0
    hidden = scorer.score(te.flux, hidden_ivar, te.labels)
    for key in ("score", "residual_score", "log_p", "masked_fraction"):
        np.testing.assert_allclose(seen[key], hidden[key], rtol=1e-6, err_msg=key)
    assert np.isfinite(seen["score"]).all() and not seen["flag_masked"].any()


def test_strongest_test_names_the_kind_of_anomaly(trained) -> None:
    """``strongest_test`` is the side (and test) whose tail set ``score``: a broad bump
    is the 64-pixel scan's, a sky line the 1-pixel scan's; it is consistent with the two
    tails, label-free rows name only the flow on the signal side, unscorable rows say so."""
    import re

    data, ckpt = trained
    scorer = load_scorer(ckpt)
    pattern = re.compile(
        r"signal:(flow|compression)|signal:structure:(teff|logg|feh),ic\d+"
        r"|residual:(chi2|scan\d+|elem\.\w+)"
    )
    for name, expect in (("artefact_bump", "residual:scan64"), ("artefact_sky", "residual:scan1")):
        o = _arrays(data, name)
        out = scorer.score(o.flux, o.ivar, o.labels)
        named = out["strongest_test"][out["percentile"] < 5]
        assert len(named) > 40 and np.mean(named == expect) > 0.8, (name, named)
    te = _arrays(data, "test")
    labels = te.labels.copy()
    labels[::3] = np.nan  # label-free rows
    flux = te.flux.copy()
    flux[1] = np.nan  # unscorable
    out = scorer.score(flux, te.ivar, labels)
    test = out["strongest_test"]
    assert test[1] == "unscorable" and all(pattern.fullmatch(t) for t in np.delete(test, 1))
    signal = np.array([t.startswith("signal:") for t in test])
    ok = np.isfinite(out["score"])
    assert (out["signal_score"] <= out["residual_score"])[ok].tolist() == signal[ok].tolist()
    assert set(test[::3][signal[::3]]) <= {"signal:flow"}


def test_spectra_noisier_than_every_training_star_are_flagged(trained) -> None:
    """The training stars span S/N 50-1000: the test stars are not flagged ``noise_range``;
    the same stars with 16x the noise variance are where they are noisier than the signal
    calibration's noisiest bin (its centre at about S/N 34 here: 150 held-out stars and
    their noised copies, which reach S/N 18, in 3 bins), never above S/N 50."""
    from mendis_ray.science.signal_noise import star_snr

    data, ckpt = trained
    scorer = load_scorer(ckpt)
    te = _arrays(data, "test")
    assert not scorer.score(te.flux, te.ivar, te.labels)["flag_noise_range"].any()
    rng = np.random.default_rng(3)
    sigma = np.sqrt(15 / np.where(te.ivar > 0, te.ivar, 1))
    flux = np.where(te.ivar > 0, te.flux + sigma * rng.standard_normal(te.flux.shape), 1)
    ivar = te.ivar / 16
    out = scorer.score(flux.astype(np.float32), ivar, te.labels)
    snr = star_snr(flux, ivar)
    assert out["flag_noise_range"][snr < 25].all() and not out["flag_noise_range"][snr > 50].any()
    assert 0 < out["flag_noise_range"].mean() < 1
    assert np.isfinite(out["score"]).all()  # flagged, still scored


@pytest.fixture(scope="module")
def trained_at_one_snr(tmp_path_factory):
    """The paper's setting: every training star at S/N 300."""
    root = tmp_path_factory.mktemp("one_snr")
    data, out = root / "data", root / "run"
    assert main(["simulate", "--out", str(data), "--n-train", "1500", "--n-test", "300",
                 "--n-outlier", "5", "--snr", "300", "--no-figures"]) == 0  # fmt: skip
    assert main(["train", str(data / "train"), "--out", str(out), "--epochs", "6",
                 "--quiet"]) == 0  # fmt: skip
    return data, out / "checkpoint"


def _noised_to(te, snr: float, seed: int = 0):
    """The stars of ``te`` with flat noise added down to S/N ``snr``: flux, ivar."""
    rng = np.random.default_rng(seed)
    good = te.ivar > 0
    add = np.sqrt(np.maximum(1 / snr**2 - 1 / np.where(good, te.ivar, np.inf), 0))
    flux = np.where(good, te.flux + add * rng.standard_normal(add.shape), te.flux)
    return flux.astype(np.float32), np.where(good, snr**2, 0.0).astype(np.float32)


def test_trained_at_one_snr_scores_noisier_stars_calibrated(trained_at_one_snr) -> None:
    """Trained at S/N 300 alone, inliers at S/N 30-100 get calibrated signal percentiles:
    the augmentation takes the flow down to S/N ``min_snr`` (25) and noised copies of the
    held-out stars calibrate it there (before: the noise level was clipped to S/N 150 and
    the calibration extrapolated: at S/N 50 these inliers' mean signal percentile was 9.6,
    61% of them below 1; at S/N 30, 1.1).  At S/N 20 they are flagged ``noise_range``."""
    from mendis_ray.science.signal_noise import star_snr

    data, ckpt = trained_at_one_snr
    scorer = load_scorer(ckpt)
    te = _arrays(data, "test")
    for snr in (30.0, 50.0, 100.0):
        out = scorer.score(*_noised_to(te, snr), te.labels)
        pct = out["signal_percentile"]
        assert 38 < pct.mean() < 62 and (pct < 1).mean() < 0.05, (snr, pct.mean())
        assert 38 < out["percentile"].mean() < 62, (snr, out["percentile"].mean())
        assert not (out["flag_noise_range"] | out["flag_flux_range"]).any()
    flux, ivar = _noised_to(te, 20.0)
    assert np.median(star_snr(flux, ivar)) == pytest.approx(20.0, rel=0.01)
    assert scorer.score(flux, ivar, te.labels)["flag_noise_range"].all()


def test_a_diverging_training_stops_with_one_line_naming_the_lr(trained, tmp_path, capsys):
    """``mendis train --lr 1e6``: the loss overflows at the first steps; the command says
    so in one line with what to change (a FloatingPointError traceback before), exit 2,
    and writes no checkpoint."""
    data, _ = trained
    out = tmp_path / "run"
    argv = ["train", str(data / "train"), "--out", str(out), "--lr", "1e6", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "lower --lr" in err and "Traceback" not in err
    assert not (out / "checkpoint").exists()
