"""Issue 12, correctness of the scoring path without Ray: the label-free score of a
spectrum is its own (not its batch's), never NaN on a flow that is not concave in the
labels, computed with the flow's parameters frozen; the reference honours ivar; ivar =
+inf is a masked pixel; non-finite scores rank first; duplicate ids are refused."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tiny_case import CFG, GRID, N_PIX, _data, one_torch_thread  # noqa: F401 (fixture)

from mendis_ray.flow.density import SpectrumDensity, Standardizer
from mendis_ray.flow.gaussian_init import initialize_whitened
from mendis_ray.flow.model import MendisFlow
from mendis_ray.science.baselines import GaussianBaseline
from mendis_ray.science.flags import Flag
from mendis_ray.science.ood import BATCH_TOLERANCE, Scorer


@pytest.fixture(scope="module")
def curved():
    """A flow far from Gaussian in the labels: the Gaussian start with its spline
    conditioners' weights moved by seeded noise (a trained flow's splines are not zero
    either), and its scorer; plus held-out rows."""
    flux, labels = _data(1500)
    std = Standardizer.fit(flux, labels)
    x = std.transform(flux, labels).astype(np.float64)
    gauss = GaussianBaseline().fit(x)
    flow = MendisFlow(CFG)
    initialize_whitened(flow, torch.from_numpy(x).float(), gauss.covariance_)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in flow.named_parameters():
            if "lu" not in name and "log_s" not in name and "actnorm" not in name.lower():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    flow.eval()
    for m in flow.modules():
        if hasattr(m, "invalidate_cache"):
            m.invalidate_cache()
    density = SpectrumDensity(flow, std, CFG, GRID)
    sc = Scorer.fit(density, flux[:300], labels[:300], n_signal=2, n_marginal=40, gaussian=gauss)
    return sc, flux[300:], labels[300:]


def test_label_free_score_is_per_row_not_per_batch(curved):
    """Before: the label profile stopped when the *batch mean* converged, so a star's
    label-free score changed with the stars sharing its batch (Serve merges users' requests
    into one batch): 8e-3 nats here, with typical companions that dilute the mean."""
    sc, flux, labels = curved
    z = (labels - labels.mean(0)) / labels.std(0)
    rows = flux[np.argsort(-np.abs(z).max(axis=1))[:4]]  # labels far from the start (mean)
    alone = [sc.score(rows[i : i + 1], marginal="all") for i in range(len(rows))]
    lp_alone = np.array([a["log_p_marginal"][0] for a in alone])
    y_alone = np.array([a["labels_used"][0] for a in alone])
    typical = np.tile(sc.density.standardizer.mean[:N_PIX], (252, 1))
    for companions in (typical, flux[100:104] * 1.5, flux[200:260]):
        batch = sc.score(np.concatenate([rows, companions]), marginal="all", batch_size=256)
        np.testing.assert_allclose(batch["log_p_marginal"][:4], lp_alone, atol=BATCH_TOLERANCE)
        assert (np.abs(batch["labels_used"][:4] - y_alone) < 1e-3 * labels.std(0)).all()


def test_label_free_score_is_never_nan_where_the_flow_is_not_concave(curved):
    """Before: a negative-curvature label Hessian made the Laplace term NaN, hence NaN
    log p, percentile and signal score (and NaN entries in the reference)."""
    sc, flux, _ = curved
    rng = np.random.default_rng(5)
    f = np.concatenate([flux[:150], flux[:60] + 0.1 * rng.standard_normal((60, N_PIX)),
                        flux[:30] * 3])  # fmt: skip
    out = sc.score(f, marginal="all")
    for key in ("log_p_marginal", "percentile", "signal_score", "signal_percentile",
                "labels_used", "log_p_per_dim"):  # fmt: skip
        assert not np.isnan(out[key]).any(), key
    assert np.isfinite(sc.reference.ref_log_p_marginal).all()
    far = slice(210, 240)
    assert np.median(out["percentile"][far]) < 5  # the far rows are outlying, not typical


def test_scoring_computes_no_parameter_gradient_and_restores_requires_grad(curved):
    """Before: the label profile back-propagated into every flow parameter (their .grad
    filled), and the LU layers could not use their cached weights."""
    sc, flux, _ = curved
    params = list(sc.density.flow.parameters())
    for p in params:
        p.grad = None
    sc.score(flux[:5], marginal="all")
    assert all(p.grad is None for p in params)
    assert all(p.requires_grad for p in params)  # frozen only while scoring


def test_fit_honours_ivar_masked_pixels_stay_out_of_ranges_and_reference(curved):
    """Before: Scorer.fit took no ivar; masked reference pixels entered the flux ranges
    with their placeholder flux and the reference scores as if good."""
    sc, flux, labels = curved
    f, lab = flux[:200].copy(), labels[:200]
    ivar = np.ones_like(f)
    ivar[::3, 4] = 0.0
    f[::3, 4] = 0.0  # placeholder flux far below every real value
    fit = Scorer.fit(sc.density, f, lab, ivar=ivar, n_signal=2, n_marginal=0,
                     gaussian=sc.reference.gaussian)  # fmt: skip
    good = ivar[:, 4] > 0
    assert fit.reference.flux_range[0, 4] == f[good, 4].min()
    np.testing.assert_allclose(fit.reference.flux_range[:, 3], [f[:, 3].min(), f[:, 3].max()])
    again = fit.score(f, ivar, lab, marginal="none")
    np.testing.assert_allclose(fit.reference.ref_log_p, np.sort(again["log_p"]), atol=1e-6)
    assert not (again["flags"] & 4).any()  # no reference spectrum is out of its own range


def test_inf_ivar_is_a_masked_pixel(curved):
    sc, flux, labels = curved
    f, lab = flux[:3].copy(), labels[:3]
    ivar0, ivarinf = np.ones_like(f), np.ones_like(f)
    f[:, 5] = 40.0  # absurd value under the bad pixel
    ivar0[:, 5], ivarinf[:, 5] = 0.0, np.inf
    a = sc.score(f, ivar0, lab, marginal="none")
    b = sc.score(f, ivarinf, lab, marginal="none")
    np.testing.assert_allclose(b["log_p"], a["log_p"], atol=BATCH_TOLERANCE)
    assert (b["flags"] & Flag.NONFINITE).all() and not (b["flags"] & 4).any()
    assert np.isfinite(b["log_p"]).all() and not (b["flags"] & Flag.UNSCORABLE).any()


def test_non_finite_scores_rank_first():
    """+-inf in a ranking column is the most outlying (it ranked last before); NaN (no
    score asked for) stays last."""
    from mendis_ray.science.ranking import rank_outliers

    pct = [50.0, 0.0, 0.0, 0.0, np.nan, 10.0]
    lpd = [1.0, -2.0, np.inf, -np.inf, np.nan, 0.5]
    t = pa.table({"percentile": pct, "log_p_per_dim": lpd, "flags": [0] * 6})
    order = rank_outliers(t).tolist()
    assert set(order[:2]) == {2, 3} and order[2:] == [1, 5, 0, 4]
    t = pa.table({"percentile": [40.0, np.inf, -np.inf, 5.0], "score": [0.0] * 4,
                  "flags": [0] * 4})  # fmt: skip
    assert rank_outliers(t).tolist()[:2] == [1, 2]


def test_duplicate_ids_are_refused_naming_file_and_id(tmp_path):
    """Before: duplicate ids were only counted, and top_outliers could show the wrong
    row; now mendis score refuses the catalog before scoring, naming the file and id."""
    from mendis_ray.spectra.catalog import find_duplicate_ids
    from mendis_ray.spectra.shards import ShardError

    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(pa.table({"id": ["s1", "s2", "s3"]}), a)
    pq.write_table(pa.table({"id": ["s4", "s2"]}), b)
    with pytest.raises(ShardError, match=r"b\.parquet.*'s2'.*a\.parquet"):
        find_duplicate_ids([a, b])
    pq.write_table(pa.table({"id": ["s4", "s4"]}), b)
    with pytest.raises(ShardError, match=r"b\.parquet.*'s4'"):
        find_duplicate_ids([a, b])
    pq.write_table(pa.table({"id": ["s4", "s5"]}), b)
    find_duplicate_ids([a, b])  # distinct: nothing raised
