import numpy as np
import pytest

from mendis_ray.spectra.grid import (
    ASPCAP_CHIPS,
    apstar_grid,
    apstar_subset,
    aspcap_grid,
    chip_of_index,
    get_grid,
    grid_from_wavelength,
    grid_text,
    log_lambda_grid,
    paper_grid,
    resample,
    resampling_matrix,
    same_grid,
)


def test_grid_sizes_and_definitions():
    ap, asp, pap = apstar_grid(), aspcap_grid(), paper_grid()
    assert (ap.n_pix, asp.n_pix, pap.n_pix) == (8575, 7214, 2405)
    np.testing.assert_allclose(ap.wavelength, 10 ** (4.179 + 6e-6 * np.arange(8575)), rtol=1e-12)
    idx = np.r_[322:3242, 3648:6048, 6412:8306]
    np.testing.assert_array_equal(asp.apstar_index, idx)
    np.testing.assert_array_equal(pap.apstar_index, idx[::3])
    assert np.all(np.bincount(asp.chip) == [2920, 2400, 1894])
    assert get_grid("paper") == pap and pap != asp
    with pytest.raises(ValueError, match="unknown grid"):
        get_grid("nope")


@pytest.mark.shared
def test_grids_match_the_payne_wavelengths(shared_data):
    wl = np.load(shared_data / "the_payne" / "apogee_wavelength.npz")["wavelength"]
    np.testing.assert_allclose(aspcap_grid().wavelength, wl, rtol=1e-10)
    np.testing.assert_allclose(paper_grid().wavelength, wl[::3], rtol=1e-10)


def test_resample_apstar_to_paper_is_an_exact_pick():
    rng = np.random.default_rng(0)
    f = rng.random((3, 8575))
    iv = rng.random((3, 8575)) + 0.5
    out, out_iv = resample(f, iv, apstar_grid(), paper_grid())
    idx = paper_grid().apstar_index
    np.testing.assert_array_equal(out, f[:, idx])
    np.testing.assert_allclose(out_iv, iv[:, idx], rtol=1e-12)


def test_resample_conserves_flux_and_propagates_variance():
    src = log_lambda_grid(4.179, 2e-6, 3000)  # 3x finer than apStar
    dst = log_lambda_grid(4.179 + 2e-6, 6e-6, 990)  # each output = 3 whole inputs
    x = np.linspace(0, 1, src.n_pix)
    f = 1 + 0.3 * np.sin(20 * x)
    out, iv = resample(f, np.full(src.n_pix, 4.0), src, dst)
    expect = f[: 3 * 990].reshape(990, 3).mean(axis=1)
    np.testing.assert_allclose(out, expect, rtol=1e-10)
    np.testing.assert_allclose(iv, 12.0, rtol=1e-10)  # var 1/4 averaged over 3 -> 1/12
    # Integral of flux density is conserved over the covered range.
    widths_src = src.log_hi - src.log_lo
    widths_dst = dst.log_hi - dst.log_lo
    assert abs((out * widths_dst).sum() - (f[:2970] * widths_src[:2970]).sum()) < 1e-9


def test_resample_fractional_overlap_rows_sum_to_one():
    src = apstar_grid()
    dst = log_lambda_grid(4.179 + 3e-6 + 1e-5, 6e-6, 8000)  # shifted by half a pixel and more
    o = resampling_matrix(src, dst)
    np.testing.assert_allclose(np.asarray(o.sum(axis=1)).ravel(), 1.0, atol=1e-9)
    assert o.nnz > 8000  # most rows mix two inputs


def test_resample_bad_pixels():
    src = log_lambda_grid(4.179, 3e-6, 20)
    dst = log_lambda_grid(4.179 + 1.5e-6, 6e-6, 10)  # each output = 2 inputs
    f = np.ones(20)
    f[4] = np.nan  # bad, must be ignored
    iv = np.ones(20)
    iv[4] = 0.0
    iv[6:8] = 0.0  # output 3 has no good input at all
    out, oiv = resample(f, iv, src, dst)
    assert np.all(np.isfinite(out))
    assert out[2] == 1.0 and oiv[2] == pytest.approx(1.0)  # half covered: kept, var not reduced
    assert oiv[3] == 0.0 and out[3] == 1.0  # placeholder
    np.testing.assert_allclose(oiv[[0, 1, 4]], 2.0)
    out, oiv = resample(f, iv, src, dst, min_coverage=0.9)
    assert oiv[2] == 0.0


def test_resample_errors():
    g = paper_grid()
    with pytest.raises(ValueError, match="2405"):
        resample(np.ones(10), np.ones(10), g, g)
    with pytest.raises(ValueError, match="ivar"):
        resample(np.ones(2405), -np.ones(2405), g, g)
    with pytest.raises(ValueError, match="increasing"):
        grid_from_wavelength(np.array([3.0, 2.0, 1.0]))


def test_grid_from_wavelength_roundtrip():
    g = grid_from_wavelength(aspcap_grid().wavelength[:2920])
    np.testing.assert_allclose(g.wavelength, aspcap_grid().wavelength[:2920], rtol=1e-12)


def test_same_grid_compares_hash_and_size_of_grids_or_dicts():
    paper = paper_grid()
    d = paper.describe()
    assert same_grid(paper, d) and same_grid(d, {"hash": d["hash"], "n_pix": d["n_pix"]})
    assert not same_grid(paper, aspcap_grid())
    assert not same_grid(d, {**d, "n_pix": d["n_pix"] + 1})
    assert not same_grid(d, {})  # a grid without a hash matches nothing recorded
    assert grid_text(paper) == f"'paper' (2405 px, hash {paper.hash})"
    assert grid_text({"name": "x"}) == "'x' (None px, hash None)"


def test_apstar_subset_numbers_chips_by_the_given_ranges():
    """Chips follow the ranges given: the DR13-16 layout's own, not the DR12 ranges."""
    dr13 = ((246, 3274), (3585, 6080), (6344, 8335))
    index = np.concatenate([np.arange(a, b) for a, b in dr13])
    g = apstar_subset("aspcap-dr13", index, dr13)
    assert g.n_pix == 7514 and set(np.unique(g.chip)) == {0, 1, 2}
    assert (np.diff(g.chip) >= 0).all()
    assert (chip_of_index(index) == -1).any()  # by the DR12 ranges some are off-chip
    assert (aspcap_grid().chip == chip_of_index(aspcap_grid().apstar_index, ASPCAP_CHIPS)).all()
    np.testing.assert_allclose(g.wavelength, apstar_grid().wavelength[index], rtol=1e-12)
