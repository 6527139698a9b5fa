"""The science methods on cases with known answers: a flow started at a Gaussian *is* that
Gaussian, so its label-free marginal, its latent signal statistic, its conditional and its
reconstruction all have closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from tiny_case import CFG, GRID, N_PIX, _data

from mendis_ray.config import TrainConfig
from mendis_ray.flow.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mendis_ray.flow.density import SpectrumDensity, Standardizer
from mendis_ray.flow.gaussian_init import initialize_whitened
from mendis_ray.flow.model import MendisFlow
from mendis_ray.science.baselines import GaussianBaseline
from mendis_ray.science.conditional import gaussian_conditional, mala_conditional
from mendis_ray.science.correlation import correlation_clusters
from mendis_ray.science.flags import Flag
from mendis_ray.science.metrics import adjusted_rand_index
from mendis_ray.science.ood import Scorer
from mendis_ray.science.reconstruct import reconstruct
from mendis_ray.train.loop import array_batches, fit


@pytest.fixture(scope="module")
def gauss_density() -> tuple[SpectrumDensity, GaussianBaseline, np.ndarray, np.ndarray]:
    """A float64 flow started at the shrunk Gaussian of the data (couplings identity)."""
    flux, labels = _data(3000)
    std = Standardizer.fit(flux, labels)
    x = std.transform(flux, labels).astype(np.float64)
    gauss = GaussianBaseline().fit(x)
    flow = MendisFlow(CFG).double()
    initialize_whitened(flow, torch.from_numpy(x), gauss.covariance_)
    flow.eval()
    return SpectrumDensity(flow, std, CFG, GRID), gauss, flux, labels


def test_whitened_start_is_the_gaussian(gauss_density):
    density, gauss, flux, labels = gauss_density
    x = density.standardizer.transform(flux[:200], labels[:200]).astype(np.float64)
    with torch.no_grad():
        lp = density.flow.log_prob(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(lp, gauss.log_prob(x), atol=1e-3)


def _physical_gaussian(density, gauss):
    s = density.standardizer
    mean = gauss.mean_ * s.std + s.mean
    cov = gauss.covariance_ * np.outer(s.std, s.std)
    return mean, cov


def test_label_free_score_is_exact_for_a_gaussian(gauss_density):
    density, gauss, flux, _labels = gauss_density
    scorer = Scorer(density, None)
    out = scorer.score(flux[:5], marginal="all")
    mean, cov = _physical_gaussian(density, gauss)
    truth = multivariate_normal(mean[:N_PIX], cov[:N_PIX, :N_PIX]).logpdf(flux[:5])
    np.testing.assert_allclose(out["log_p_marginal"], truth, atol=2e-3)
    # The profile labels are the Gaussian conditional mean of the labels given the flux.
    gain = cov[N_PIX:, :N_PIX] @ np.linalg.inv(cov[:N_PIX, :N_PIX])
    y_star = mean[N_PIX:] + (flux[:5] - mean[:N_PIX]) @ gain.T
    # (to 1% of each label's spread: the profile is an optimisation)
    tol = 0.01 * density.standardizer.std[N_PIX:]
    assert np.all(np.abs(out["labels_used"] - y_star) < tol)
    assert np.all(np.isnan(out["log_p"]))  # no labels given -> no joint score


def test_joint_score_matches_gaussian_density(gauss_density):
    density, gauss, flux, labels = gauss_density
    out = Scorer(density, None).score(flux[:5], labels=labels[:5], marginal="none")
    mean, cov = _physical_gaussian(density, gauss)
    truth = multivariate_normal(mean, cov).logpdf(np.concatenate([flux[:5], labels[:5]], 1))
    np.testing.assert_allclose(out["log_p"], truth, atol=1e-3)
    assert np.all(np.isnan(out["log_p_marginal"]))


def test_signal_score_is_projected_log_p_and_t2_for_a_gaussian(gauss_density):
    density, gauss, flux, labels = gauss_density
    scorer = Scorer.fit(density, flux[:400], labels[:400], n_signal=3, n_marginal=0, gaussian=gauss)
    out = scorer.score(flux[400:410], labels=labels[400:410], marginal="none")
    x = density.standardizer.transform(flux[400:410], labels[400:410]).astype(np.float64)
    ref = scorer.reference
    assert ref.basis.shape == (3, N_PIX + 3)
    np.testing.assert_allclose(ref.basis @ ref.basis.T, np.eye(3), atol=1e-10)
    # the definition: the density at the projection onto the signal subspace
    x_proj = ref.center + (x - ref.center) @ ref.basis.T @ ref.basis
    truth = multivariate_normal(gauss.mean_, gauss.covariance_).logpdf(x_proj)
    np.testing.assert_allclose(out["signal_score"], truth, rtol=1e-4, atol=1e-3)
    # Inliers' reference percentiles are spread over 0..100.
    assert 0 < np.nanmin(out["signal_percentile"]) and np.nanmax(out["signal_percentile"]) <= 100

    # With the Gaussian's own top eigenvectors as the basis and its mean as the center,
    # the score is const - T^2 / 2 (Hotelling's T^2 in those directions).
    lam, vec = np.linalg.eigh(gauss.covariance_)
    top = vec[:, ::-1][:, :3].T  # (3, d)
    ref.basis, ref.center = top, gauss.mean_
    out = scorer.score(flux[400:420], labels=labels[400:420], marginal="none")
    xs = density.standardizer.transform(flux[400:420], labels[400:420]).astype(np.float64)
    t2 = ((((xs - gauss.mean_) @ top.T) ** 2) / lam[::-1][:3]).sum(axis=1)
    const = out["signal_score"] + 0.5 * t2
    np.testing.assert_allclose(const, const[0], atol=1e-3)


def test_signal_score_ignores_noise_level(gauss_density):
    """Cleaner spectra get a much higher full log p but about the same signal score."""
    density, gauss, flux, labels = gauss_density
    scorer = Scorer.fit(density, flux[:400], labels[:400], n_signal=4, n_marginal=0, gaussian=gauss)
    rng = np.random.default_rng(5)
    lat = rng.standard_normal((300, 4))
    mix = np.random.default_rng(99).standard_normal((4, N_PIX)) * 0.02
    clean = 0.9 + lat @ mix
    lab = np.stack([4400 + 50 * lat[:, 0], 2.05 + 0.1 * lat[:, 1], 0.05 * lat[:, 2]], 1)
    noisy = scorer.score(clean + 0.003 * rng.standard_normal(clean.shape), labels=lab)
    quiet = scorer.score(clean + 0.0003 * rng.standard_normal(clean.shape), labels=lab)
    assert np.mean(quiet["log_p"] > noisy["log_p"]) > 0.95
    gap = np.median(quiet["signal_score"] - noisy["signal_score"])
    assert abs(gap) < 0.5 * np.std(noisy["signal_score"])


def test_flags_masks_and_bad_input(gauss_density):
    density, _gauss, flux, labels = gauss_density
    scorer = Scorer.fit(density, flux[:300], labels[:300], n_signal=2, n_marginal=0)
    f, lab = flux[300:304].copy(), labels[300:304].copy()
    ivar = np.ones_like(f)
    f[0, 3] = np.nan  # NaN at a good pixel
    ivar[1, :6] = 0.0  # half masked
    f[1, :6] = np.nan  # masked NaN is fine
    lab[2, 0] = 9000.0  # Teff far outside the training range
    out = scorer.score(f, ivar, lab)
    assert out["flags"][0] & Flag.NONFINITE
    assert out["flags"][1] & Flag.MASKED and not out["flags"][1] & Flag.NONFINITE
    assert out["flags"][2] & Flag.LABEL_RANGE
    assert out["flags"][3] == 0
    assert np.all(np.isfinite(out["log_p"])) and np.all(np.isfinite(out["signal_score"]))
    with pytest.raises(ValueError, match="pixels"):
        scorer.score(f[:, :5])
    with pytest.raises(ValueError, match="ivar"):
        scorer.score(f, ivar[:, :5])
    with pytest.raises(ValueError, match="labels"):
        scorer.score(f, labels=lab[:, :2])


def test_checkpoint_carries_the_scorer(gauss_density, tmp_path):
    density, _gauss, flux, labels = gauss_density
    scorer = Scorer.fit(density, flux[:300], labels[:300], n_signal=2, n_marginal=3)
    path = save_checkpoint(tmp_path / "ck", density, extra_arrays=scorer.checkpoint_arrays())
    again = Scorer.from_checkpoint(str(path))
    a = scorer.score(flux[300:310], labels=labels[300:310])
    assert next(again.density.flow.parameters()).dtype == torch.float64
    b = again.score(flux[300:310], labels=labels[300:310])
    for key in ("log_p", "signal_score", "percentile", "log_ratio_gaussian", "flags"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-9, err_msg=key)
    with pytest.raises(CheckpointError, match="grid"):
        load_checkpoint(path, expect_grid={"name": "apogee", "n_pix": 2405, "hash": "x"})
    with pytest.raises(CheckpointError, match="preset"):
        load_checkpoint(path, expect_preset="compact")
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "nowhere")


def test_checkpoint_with_a_factor_analysis_reference(gauss_density, tmp_path):
    """A scorer whose Gaussian is a factor-analysis model saves and reloads."""
    from mendis_ray.science.baselines import FactorAnalysisBaseline

    density, _gauss, flux, labels = gauss_density
    x = density.standardizer.transform(flux[:300], labels[:300]).astype(np.float64)
    fa = FactorAnalysisBaseline(3, n_iter=20).fit(x)
    scorer = Scorer.fit(density, flux[:300], labels[:300], n_signal=2, n_marginal=0, gaussian=fa)
    path = save_checkpoint(tmp_path / "ck", density, extra_arrays=scorer.checkpoint_arrays())
    a = scorer.score(flux[300:305], labels=labels[300:305])["log_ratio_gaussian"]
    b = Scorer.from_checkpoint(str(path)).score(flux[300:305], labels=labels[300:305])
    np.testing.assert_allclose(b["log_ratio_gaussian"], a, rtol=1e-9)


def test_flux_range_flag_counts_good_pixels_only(gauss_density):
    """2 of 3 good pixels far out of range flag the spectrum even when most are masked."""
    density, _gauss, flux, labels = gauss_density
    scorer = Scorer.fit(density, flux[:300], labels[:300], n_signal=2, n_marginal=0)
    f = flux[300:301].copy()
    ivar = np.ones_like(f)
    ivar[0, 3:] = 0.0  # N_PIX - 3 masked
    f[0, :2] = 50.0
    out = scorer.score(f, ivar, labels[300:301])
    assert out["flag_flux_range"][0] and out["flag_masked"][0]


def test_training_is_deterministic_and_keeps_the_best_state():
    flux, labels = _data(1200, seed=3)
    std = Standardizer.fit(flux, labels)
    x = torch.from_numpy(std.transform(flux, labels))
    cfg = TrainConfig(lr=3e-3, batch_size=128, epochs=3, patience=5, seed=7)

    def run():
        flow = MendisFlow(CFG, seed=7)
        flow.initialize(x[:512])
        gen = torch.Generator().manual_seed(7)
        hist = fit(
            flow,
            lambda e: array_batches(x[:1000], cfg.batch_size, generator=gen),
            lambda: array_batches(x[1000:], 200, shuffle=False),
            cfg,
            show_progress=False,
            adapt_threads=False,  # the thread count would follow the load
        )
        return flow, hist

    (f1, h1), (_f2, h2) = run(), run()
    assert [e["val_log_prob"] for e in h1.epochs] == [e["val_log_prob"] for e in h2.epochs]
    assert h1.epochs[-1]["train_log_prob"] > h1.epochs[0]["train_log_prob"]
    best = max([h1.initial_val_log_prob] + [e["val_log_prob"] for e in h1.epochs])
    assert h1.best_val_log_prob == best
    f1.eval()
    with torch.no_grad():
        assert float(f1.log_prob(x[1000:]).double().mean()) == pytest.approx(best, rel=1e-5)


def test_mala_recovers_a_known_gaussian_conditional():
    rng = np.random.default_rng(0)
    d, k = 10, 2
    a = rng.standard_normal((d, d))
    cov = a @ a.T / d + 0.2 * np.eye(d)
    mean = rng.standard_normal(d)
    y0 = mean[-k:] + 0.5
    mu, sig = gaussian_conditional(cov, mean, y0, k)
    prec = torch.as_tensor(np.linalg.inv(cov))
    m = torch.as_tensor(mean)

    def log_prob(x: torch.Tensor) -> torch.Tensor:
        r = x - m
        return -0.5 * ((r @ prec) * r).sum(dim=1)

    draws = mala_conditional(
        log_prob, y0, np.diag(np.diag(sig)), mu, n_chains=16, n_warmup=200, n_keep=400, seed=1
    )
    assert 0.3 < draws.acceptance < 0.85
    assert np.nanmax(draws.rhat) < 1.1
    corr = np.corrcoef(draws.samples, rowvar=False)
    true = sig / np.sqrt(np.outer(np.diag(sig), np.diag(sig)))
    assert np.max(np.abs(corr - true)) < 0.15
    np.testing.assert_allclose(draws.samples.mean(0), mu, atol=0.15 * np.sqrt(np.diag(sig)).max())


def test_correlation_clusters_find_planted_blocks():
    rng = np.random.default_rng(2)
    n, blocks = 2000, [6, 4, 3]
    cols, truth = [], []
    for b, size in enumerate(blocks):
        common = rng.standard_normal((n, 1))
        cols.append(common + 0.2 * rng.standard_normal((n, size)))
        truth += [b] * size
    cols.append(rng.standard_normal((n, 5)))  # 5 independent pixels
    truth += list(range(3, 8))
    samples = np.concatenate(cols, axis=1)
    perm = rng.permutation(samples.shape[1])
    cl = correlation_clusters(samples[:, perm], np.arange(samples.shape[1]), threshold=0.8)
    assert adjusted_rand_index(cl.labels, np.asarray(truth)[perm]) == pytest.approx(1.0)
    assert list(cl.sizes[:3]) == [6, 4, 3] and cl.n_multi() == 3
    re = cl.reindexed
    assert np.all(re[:6, :6] > 0.8)  # the largest block sits in the top-left corner


def test_reconstruction_reaches_the_input(gauss_density):
    density, _gauss, flux, labels = gauss_density
    x = torch.from_numpy(density.standardizer.transform(flux[:4], labels[:4]).astype(np.float64))
    rec = reconstruct(density.flow, x, steps=400, lr=0.1)
    # Least squares through an ill-conditioned whitening converges slowly but steadily.
    assert rec.history[-1] < 0.05 * rec.history[0]
    assert rec.history[-1] < rec.history[len(rec.history) // 2]  # still descending
