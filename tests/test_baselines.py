"""Tests of the classical baselines (``mendis_ray.science.baselines``) and the score and
cluster metrics (``mendis_ray.science.metrics``)."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from scipy import stats

from mendis_ray.science.baselines import (
    BASELINES,
    Baseline,
    GaussianBaseline,
    HotellingT2,
    NotFittedError,
    PCABaseline,
    baseline_from_state,
    ledoit_wolf_shrinkage,
    oas_shrinkage,
)
from mendis_ray.science.metrics import (
    adjusted_rand_index,
    auroc,
    contingency_table,
    percentile_rank,
    purity,
    roc_curve,
)


def _random_cov(rng: np.random.Generator, d: int, spread: float = 3.0) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * np.exp(rng.uniform(-spread / 2, spread / 2, d))) @ q.T


def _ppca_data(rng: np.random.Generator, n: int, d: int = 50, k: int = 3, sigma: float = 0.1):
    w_true = rng.standard_normal((d, k)) * np.linspace(3.0, 1.5, k)
    mu = rng.standard_normal(d)
    x = mu + rng.standard_normal((n, k)) @ w_true.T + sigma * rng.standard_normal((n, d))
    return x, w_true, mu


def _signal_plus_noise(rng: np.random.Generator, n: int, shift: float = 0.0, d: int = 500):
    """Inliers: a 3-dim signal with std 10 in the first 3 coordinates plus unit isotropic
    noise in all d; ``shift`` moves the first signal coordinate by ``shift`` signal sigmas."""
    x = rng.standard_normal((n, d))
    x[:, :3] += 10.0 * rng.standard_normal((n, 3))
    x[:, 0] += shift * 10.0
    return x


# ----------------------------------------------------------------------------- Gaussian


def test_ledoit_wolf_matches_direct_small_sample_formula():
    rng = np.random.default_rng(1)
    n, d = 15, 6
    x = rng.standard_normal((n, d)) @ np.linalg.cholesky(_random_cov(rng, d)).T + 5.0
    xc = x - x.mean(axis=0)
    s = xc.T @ xc / n
    m = np.trace(s) / d
    d2 = np.sum((s - m * np.eye(d)) ** 2)
    b2_bar = sum(np.sum((np.outer(v, v) - s) ** 2) for v in xc) / n**2
    expected = min(b2_bar, d2) / d2
    assert ledoit_wolf_shrinkage(x) == pytest.approx(expected, rel=1e-12)

    g = GaussianBaseline().fit(x)
    assert g.shrinkage_ == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(
        g.covariance_, (1 - expected) * s + expected * m * np.eye(d), rtol=1e-12, atol=1e-14
    )
    np.testing.assert_allclose(g.mean_, x.mean(axis=0), rtol=1e-14)


def test_oas_matches_eigenvalue_form_and_fixed_shrinkage():
    rng = np.random.default_rng(2)
    n, d = 40, 10
    x = rng.standard_normal((n, d)) @ np.linalg.cholesky(_random_cov(rng, d)).T
    lam = np.linalg.eigvalsh(np.cov(x, rowvar=False, bias=True))
    tr_s2, tr2 = np.sum(lam**2), np.sum(lam) ** 2
    rho = min(((1 - 2 / d) * tr_s2 + tr2) / ((n + 1 - 2 / d) * (tr_s2 - tr2 / d)), 1.0)
    assert oas_shrinkage(x) == pytest.approx(rho, rel=1e-10)
    assert GaussianBaseline("oas").fit(x).shrinkage_ == pytest.approx(rho, rel=1e-10)
    assert GaussianBaseline(0.25).fit(x).shrinkage_ == 0.25
    for bad in (-0.1, 1.5, "ledoit_wolf"):
        with pytest.raises(ValueError, match="shrinkage"):
            GaussianBaseline(bad)  # type: ignore[arg-type]


def test_gaussian_log_prob_matches_true_density():
    rng = np.random.default_rng(3)
    d, n = 20, 5000
    cov = _random_cov(rng, d)
    mu = rng.standard_normal(d)
    truth = stats.multivariate_normal(mu, cov)
    x_train = truth.rvs(n, random_state=rng)
    x_test = truth.rvs(n, random_state=rng)
    g = GaussianBaseline().fit(x_train)
    assert abs(np.mean(g.log_prob(x_test)) - np.mean(truth.logpdf(x_test))) < 0.1
    # exact against scipy for the fitted parameters; float32 input is scored in float64
    np.testing.assert_allclose(
        g.log_prob(x_test[:50]),
        stats.multivariate_normal(g.mean_, g.covariance_).logpdf(x_test[:50]),
        rtol=1e-10,
    )
    np.testing.assert_array_equal(g.score(x_test[:50]), g.log_prob(x_test[:50]))
    g32 = GaussianBaseline().fit(x_train.astype(np.float32))
    np.testing.assert_allclose(
        g32.log_prob(x_test[:50].astype(np.float32)), g.log_prob(x_test[:50]), atol=1e-3
    )


@pytest.mark.parametrize("method", ["ledoit-wolf", "oas"])
def test_shrinkage_in_unit_interval_and_grows_when_n_small(method):
    rng = np.random.default_rng(4)
    d = 50
    chol = np.linalg.cholesky(_random_cov(rng, d, spread=4.0))
    big = GaussianBaseline(method).fit(rng.standard_normal((2000, d)) @ chol.T)
    small = GaussianBaseline(method).fit(rng.standard_normal((30, d)) @ chol.T)
    assert 0.0 <= big.shrinkage_ <= 1.0 and 0.0 <= small.shrinkage_ <= 1.0
    assert small.shrinkage_ > big.shrinkage_ + 0.1


def test_gaussian_d_greater_than_n():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((100, 300)) * np.linspace(0.5, 2.0, 300)
    g = GaussianBaseline().fit(x)
    assert 0.0 < g.shrinkage_ <= 1.0
    lp = g.log_prob(rng.standard_normal((20, 300)))
    assert lp.shape == (20,) and np.all(np.isfinite(lp))
    assert np.all(np.linalg.eigvalsh(g.covariance_) > 0)
    with pytest.raises(ValueError, match="not positive definite"):
        GaussianBaseline(0.0).fit(x)
    with pytest.raises(ValueError, match="constant"):
        GaussianBaseline().fit(np.ones((10, 3)))


# ----------------------------------------------------------------------------- PPCA


def test_ppca_recovers_true_model_and_exact_log_prob():
    rng = np.random.default_rng(6)
    d, k, sigma = 50, 3, 0.1
    x, w_true, _ = _ppca_data(rng, 4000, d, k, sigma)
    p = PCABaseline(k).fit(x)
    assert p.noise_variance_ == pytest.approx(sigma**2, rel=0.05)
    q_true, _ = np.linalg.qr(w_true)
    proj_true = q_true @ q_true.T
    proj_fit = p.components_.T @ p.components_
    assert np.linalg.norm(proj_fit - proj_true, 2) < 0.02
    np.testing.assert_allclose(p.components_ @ p.components_.T, np.eye(k), atol=1e-12)

    cov = p.loadings @ p.loadings.T + p.noise_variance_ * np.eye(d)
    np.testing.assert_allclose(p.covariance(), cov, rtol=1e-12, atol=1e-15)
    x_test = _ppca_data(rng, 200, d, k, sigma)[0][:100]
    x_test[:5] += rng.standard_normal((5, d))  # also off-model points
    direct = stats.multivariate_normal(p.mean_, cov).logpdf(x_test)
    np.testing.assert_allclose(p.log_prob(x_test), direct, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(p.score(x_test), p.log_prob(x_test))

    y = x_test - p.mean_
    resid = y - y @ p.components_.T @ p.components_
    np.testing.assert_allclose(p.reconstruction_error(x_test), np.sum(resid**2, axis=1), rtol=1e-10)
    np.testing.assert_allclose(p.transform(x_test), y @ p.components_.T, rtol=1e-12)


def test_pca_svd_and_eigh_solvers_agree_and_d_greater_than_n():
    rng = np.random.default_rng(7)
    x = _ppca_data(rng, 300, d=40, k=4, sigma=0.3)[0]
    a = PCABaseline(4, solver="eigh").fit(x)
    b = PCABaseline(4, solver="svd").fit(x)
    np.testing.assert_allclose(a.components_, b.components_, atol=1e-8)
    np.testing.assert_allclose(a.explained_variance_, b.explained_variance_, rtol=1e-10)
    assert a.noise_variance_ == pytest.approx(b.noise_variance_, rel=1e-10)
    assert a.discarded_variance_sq_ == pytest.approx(b.discarded_variance_sq_, rel=1e-8)
    np.testing.assert_allclose(a.log_prob(x[:20]), b.log_prob(x[:20]), rtol=1e-10)

    wide = _ppca_data(rng, 50, d=300, k=5, sigma=0.1)[0]  # n < d: SVD of the (n, d) data
    p = PCABaseline(5).fit(wide)
    lam = np.linalg.eigvalsh(np.cov(wide, rowvar=False, bias=True))[::-1]
    np.testing.assert_allclose(p.explained_variance_, lam[:5], rtol=1e-8)
    assert p.noise_variance_ == pytest.approx(lam[5:].sum() / 295, rel=1e-8)
    assert np.all(np.isfinite(p.log_prob(wide)))
    with pytest.raises(ValueError, match="needs at least 51 samples"):
        PCABaseline(50).fit(wide)
    with pytest.raises(ValueError, match="must be < the 300 features"):
        PCABaseline(300).fit(np.vstack([wide] * 7))
    with pytest.raises(ValueError, match="zero"):
        PCABaseline(2).fit(rng.standard_normal((30, 2)) @ rng.standard_normal((2, 6)))


# ----------------------------------------------------------------------------- Hotelling T^2


def test_t2_and_spe_match_direct_formula():
    rng = np.random.default_rng(8)
    d, k = 12, 4
    x = rng.standard_normal((400, d)) @ np.linalg.cholesky(_random_cov(rng, d)).T
    t = HotellingT2(k).fit(x)
    lam, u = np.linalg.eigh(np.cov(x, rowvar=False, bias=True))
    lam, u = lam[::-1][:k], u[:, ::-1][:, :k]
    x_new = rng.standard_normal((30, d)) * 2
    y = x_new - x.mean(axis=0)
    t2_direct = np.sum((y @ u) ** 2 / lam, axis=1)
    np.testing.assert_allclose(t.t2(x_new), t2_direct, rtol=1e-10)
    np.testing.assert_array_equal(t.score(x_new), -t.t2(x_new))
    spe_direct = np.sum((y - (y @ u) @ u.T) ** 2, axis=1)
    np.testing.assert_allclose(t.spe(x_new), spe_direct, rtol=1e-10)
    # log_prob: the Gaussian density of the k principal coordinates
    coords = stats.multivariate_normal(np.zeros(k), np.diag(lam))
    np.testing.assert_allclose(t.log_prob(x_new), coords.logpdf(y @ u), rtol=1e-10)
    # on the training set mean T^2 = k exactly (1/n covariance)
    assert np.mean(t.t2(x)) == pytest.approx(k, rel=1e-10)


def test_t2_mean_is_k_under_fitted_gaussian_and_control_limits():
    rng = np.random.default_rng(9)
    d, k = 30, 5
    cov = _random_cov(rng, d, spread=5.0)
    x = rng.multivariate_normal(np.zeros(d), cov, size=4000)
    t = HotellingT2(k).fit(x)
    fresh = rng.multivariate_normal(np.zeros(d), cov, size=20000)
    assert np.mean(t.t2(fresh)) == pytest.approx(k, rel=0.05)
    for alpha in (0.05, 0.01):
        assert np.mean(t.t2(fresh) > t.t2_limit(alpha)) == pytest.approx(alpha, abs=0.35 * alpha)
        assert np.mean(t.spe(fresh) > t.spe_limit(alpha)) == pytest.approx(alpha, abs=0.35 * alpha)
    with pytest.raises(ValueError, match="alpha"):
        t.t2_limit(1.5)


def test_t2_detects_shift_along_principal_axis():
    rng = np.random.default_rng(10)
    train = _signal_plus_noise(rng, 2000)
    t = HotellingT2(3).fit(train)
    inliers = _signal_plus_noise(rng, 1000)
    outliers = _signal_plus_noise(rng, 1000, shift=4.0)
    assert auroc(t.score(inliers), t.score(outliers)) > 0.95


def test_noise_chi2_hides_small_departures_from_full_gaussian():
    """A 2-sigma shift along a signal direction, in d = 500 with isotropic noise: the noise
    chi^2 dominates the spread of a full-dimensional log-likelihood, T^2 sees the shift."""
    rng = np.random.default_rng(11)
    train = _signal_plus_noise(rng, 2000)
    inliers = _signal_plus_noise(rng, 1500)
    outliers = _signal_plus_noise(rng, 1500, shift=2.0)
    gauss = GaussianBaseline().fit(train)
    t2 = HotellingT2(3).fit(train)
    auc_gauss = auroc(gauss.score(inliers), gauss.score(outliers))
    auc_t2 = auroc(t2.score(inliers), t2.score(outliers))
    assert auc_t2 > auc_gauss + 0.15
    assert auc_t2 > 0.72 and auc_gauss < 0.62


# ----------------------------------------------------------------------------- shared API


def _fitted_models(rng: np.random.Generator):
    x = _ppca_data(rng, 300, d=25, k=3, sigma=0.2)[0]
    models = [
        GaussianBaseline().fit(x),
        GaussianBaseline("oas").fit(x),
        GaussianBaseline(0.3).fit(x),
        PCABaseline(3).fit(x),
        HotellingT2(3).fit(x),
    ]
    return x, models


def test_state_roundtrip_gives_identical_scores():
    rng = np.random.default_rng(12)
    x, models = _fitted_models(rng)
    x_new = x[:40] + 0.5 * rng.standard_normal((40, x.shape[1]))
    for model in models:
        assert isinstance(model, Baseline)
        state = model.to_state()
        assert all(isinstance(v, np.ndarray | float | int | str) for v in state.values())
        buf = io.BytesIO()
        np.savez(buf, **state)
        buf.seek(0)
        with np.load(buf, allow_pickle=False) as npz:
            loaded = {key: npz[key] for key in npz.files}
        for again in (type(model).from_state(state), baseline_from_state(loaded)):
            assert type(again) is type(model) and again.name == model.name
            np.testing.assert_array_equal(again.score(x_new), model.score(x_new))
            np.testing.assert_array_equal(again.log_prob(x_new), model.log_prob(x_new))
        if isinstance(model, GaussianBaseline):
            assert GaussianBaseline.from_state(state).shrinkage == model.shrinkage
    with pytest.raises(ValueError, match="not 'ppca'"):
        PCABaseline.from_state(models[0].to_state())
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline_from_state({"baseline": "flow"})
    assert set(BASELINES) == {"gaussian", "factor", "ppca", "hotelling_t2"}


def test_input_errors_are_clear():
    rng = np.random.default_rng(13)
    x, models = _fitted_models(rng)
    bad = x[:10].copy()
    bad[7, 3] = np.nan
    bad[9, 0] = np.inf
    for model in models:
        cls = type(model).__name__
        with pytest.raises(ValueError, match=r"row 7 .*column 3"):
            model.score(bad)
        with pytest.raises(ValueError, match=rf"{cls}\.fit: row 7"):
            type(model)(3).fit(bad) if cls != "GaussianBaseline" else GaussianBaseline().fit(bad)
        with pytest.raises(ValueError, match=r"x has 24 features .* fitted on 25"):
            model.log_prob(x[:, :24])
        with pytest.raises(ValueError, match="2-D"):
            model.score(x[0])
        assert model.score(x[:0]).shape == (0,)
    for unfitted in (GaussianBaseline(), PCABaseline(2), HotellingT2(2)):
        with pytest.raises(NotFittedError, match="not fitted"):
            unfitted.score(x)
        with pytest.raises(ValueError, match="not fitted"):
            unfitted.to_state()
    with pytest.raises(ValueError, match="n_components"):
        HotellingT2(0)
    with pytest.raises(ValueError, match="real numeric"):
        GaussianBaseline().fit(np.array([["a", "b"], ["c", "d"]]))


# ----------------------------------------------------------------------------- metrics


def _auroc_brute(s_in: np.ndarray, s_out: np.ndarray) -> float:
    diff = s_in[:, None] - s_out[None, :]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def test_auroc_matches_brute_force_with_ties():
    rng = np.random.default_rng(14)
    for n_in, n_out in [(1, 1), (7, 3), (50, 80), (200, 150)]:
        s_in = rng.integers(0, 6, n_in).astype(float)  # many ties
        s_out = rng.integers(-2, 4, n_out).astype(float)
        assert auroc(s_in, s_out) == pytest.approx(_auroc_brute(s_in, s_out), abs=1e-12)
        c_in, c_out = rng.normal(0.5, 1, n_in), rng.normal(0, 1, n_out)
        assert auroc(c_in, c_out) == pytest.approx(_auroc_brute(c_in, c_out), abs=1e-12)
    assert auroc([2, 3], [0, 1]) == 1.0
    assert auroc([0, 1], [2, 3]) == 0.0
    assert auroc([1, 1], [1, 1, 1]) == 0.5
    assert auroc([np.inf, 0.0], [-np.inf]) == 1.0
    with pytest.raises(ValueError, match="NaN"):
        auroc([1.0, np.nan], [0.0])
    with pytest.raises(ValueError, match="empty"):
        auroc([], [0.0])


def test_roc_curve_endpoints_monotone_and_area():
    rng = np.random.default_rng(15)
    s_in = rng.integers(0, 10, 60).astype(float)
    s_out = rng.integers(-3, 7, 45).astype(float)
    fpr, tpr, thr = roc_curve(s_in, s_out)
    assert (fpr[0], tpr[0], thr[0]) == (0.0, 0.0, np.inf)
    assert (fpr[-1], tpr[-1], thr[-1]) == (1.0, 1.0, min(s_in.min(), s_out.min()))
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0) and np.all(np.diff(thr) < 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(s_in, s_out), abs=1e-12)
    i = 5
    assert tpr[i] == np.mean(s_in >= thr[i]) and fpr[i] == np.mean(s_out >= thr[i])


def test_percentile_rank_edge_cases():
    ref = np.array([1.0, 2.0, 2.0, 3.0])
    out = percentile_rank(ref, np.array([0.0, 1.0, 2.0, 2.5, 3.0, 10.0, -np.inf, np.inf]))
    np.testing.assert_array_equal(out, [0.0, 25.0, 75.0, 75.0, 100.0, 100.0, 0.0, 100.0])
    assert np.isnan(percentile_rank(ref, np.array([np.nan]))[0])
    assert percentile_rank([5.0], [5.0])[0] == 100.0
    with pytest.raises(ValueError, match="empty"):
        percentile_rank([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        percentile_rank([1.0, np.nan], [1.0])


def _ari_brute(a: np.ndarray, b: np.ndarray) -> float:
    """Hubert & Arabie's ARI from pair counts over all n (n - 1) / 2 pairs."""
    n11 = n10 = n01 = n00 = 0
    for i, j in itertools.combinations(range(a.size), 2):
        same_a, same_b = a[i] == a[j], b[i] == b[j]
        n11 += same_a and same_b
        n10 += same_a and not same_b
        n01 += same_b and not same_a
        n00 += not same_a and not same_b
    den = (n11 + n10) * (n10 + n00) + (n11 + n01) * (n01 + n00)
    return 1.0 if den == 0 else 2.0 * (n11 * n00 - n10 * n01) / den


def test_adjusted_rand_index_vs_brute_force_and_known_values():
    rng = np.random.default_rng(16)
    for _ in range(25):
        n = int(rng.integers(2, 40))
        a = rng.integers(0, rng.integers(1, 6), n)
        b = rng.integers(0, rng.integers(1, 6), n)
        assert adjusted_rand_index(a, b) == pytest.approx(_ari_brute(a, b), abs=1e-12)
    lab = np.array([0, 0, 1, 1, 2, 2])
    assert adjusted_rand_index(lab, lab) == 1.0
    assert adjusted_rand_index(lab, np.array(["c", "c", "a", "a", "b", "b"])) == 1.0
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)
    assert adjusted_rand_index([0, 0, 1, 2], [0, 0, 1, 1]) == pytest.approx(4 / 7)
    assert adjusted_rand_index([0, 0, 0, 0], [0, 1, 2, 3]) == 0.0
    assert adjusted_rand_index([0, 0, 0], [5, 5, 5]) == 1.0
    assert adjusted_rand_index([0, 1, 2], [2, 0, 1]) == 1.0
    big = rng.integers(0, 10, 20000)
    assert abs(adjusted_rand_index(big, rng.integers(0, 10, 20000))) < 0.01
    with pytest.raises(ValueError, match="labels"):
        adjusted_rand_index([0, 1], [0, 1, 2])


def test_purity_and_contingency_table():
    # Manning, Raghavan & Schuetze (2008), Fig. 16.4: purity (5 + 4 + 3) / 17
    pred = np.array([1] * 6 + [2] * 6 + [3] * 5)
    truth = np.array(list("xxxxxo") + list("xoooo") + ["d"] + list("xxddd"))
    assert purity(pred, truth) == pytest.approx(12 / 17)
    np.testing.assert_array_equal(contingency_table(pred, truth), [[0, 1, 5], [1, 4, 1], [3, 0, 2]])
    assert purity(truth, truth) == 1.0
    assert purity(np.zeros(4), [0, 0, 1, 2]) == 0.5
    with pytest.raises(ValueError, match="no items"):
        purity([], [])


def test_factor_analysis_recovers_a_factor_model_and_em_ascends():
    """Data from N(mu, W W^T + diag(psi)) with unequal psi: EM's likelihood never drops,
    the fitted covariance approaches the truth, and FA beats PPCA (one sigma^2) held out."""
    from mendis_ray.science.baselines import FactorAnalysisBaseline

    rng = np.random.default_rng(3)
    d, k, n = 40, 3, 6000
    w = rng.standard_normal((d, k))
    psi = rng.uniform(0.05, 2.0, d)
    cov = w @ w.T + np.diag(psi)
    x = rng.multivariate_normal(np.zeros(d), cov, size=n)
    x_test = rng.multivariate_normal(np.zeros(d), cov, size=2000)
    fa = FactorAnalysisBaseline(k, n_iter=200).fit(x)
    lp = np.array(fa.train_log_prob_)
    assert np.all(np.diff(lp) >= -1e-9)
    np.testing.assert_allclose(lp[-1], fa.log_prob(x).mean(), rtol=1e-8)
    assert np.abs(fa.covariance_ - cov).max() < 0.15 * np.abs(cov).max()
    np.testing.assert_allclose(fa.psi_, psi, atol=0.2)
    ppca = PCABaseline(k).fit(x)
    assert fa.log_prob(x_test).mean() > ppca.log_prob(x_test).mean() + 1.0
    truth = stats.multivariate_normal(np.zeros(d), cov).logpdf(x_test).mean()
    assert abs(fa.log_prob(x_test).mean() - truth) < 0.1
    again = baseline_from_state(fa.to_state())
    np.testing.assert_allclose(again.log_prob(x_test[:5]), fa.log_prob(x_test[:5]), rtol=1e-10)
    with pytest.raises(ValueError, match="n_factors"):
        FactorAnalysisBaseline(d).fit(x)
