"""The simulator: determinism, broadening math, curve of growth, physics and ground truth."""

from dataclasses import replace

import numpy as np
import pytest

from mendis_ray.spectra.degrade import add_noise, scatter_labels
from mendis_ray.spectra.linelist import air_to_vacuum
from mendis_ray.spectra.simulate import (
    ELEMENTS,
    Simulator,
    SimulatorConfig,
    StellarLabels,
    _rotation_transfer,
    cemp_labels,
    dominant_element,
    element_response,
    paper_training_labels,
    rapid_rotator_labels,
    stripped_star_labels,
)

EL = {e: i for i, e in enumerate(ELEMENTS)}


@pytest.fixture(scope="module")
def giant_response(sim):
    return element_response(sim, StellarLabels.solar_giant(1))[0]  # (19, n_pix)


def _pixel(sim, wl_vac):
    return int(np.argmin(np.abs(sim.grid.wavelength - wl_vac)))


def test_shapes_range_and_determinism(sim):
    lab = paper_training_labels(40, np.random.default_rng(1))
    f = sim(lab)
    assert f.shape == (40, 2405) and f.dtype == np.float32
    assert np.all(f > 0.05) and np.all(f <= 1.0 + 1e-6)
    np.testing.assert_array_equal(f, sim(lab))
    small = Simulator(config=replace(SimulatorConfig(), batch_size=7))
    np.testing.assert_allclose(small(lab), f, atol=2e-6)
    again = paper_training_labels(40, np.random.default_rng(1))
    np.testing.assert_array_equal(again.x_h, lab.x_h)


def test_kernel_is_normalised_with_the_right_width(sim):
    cfg = sim.config
    for vmacro in (0.0, 6.0, 30.0):
        k = sim.kernel(vmacro, 0.0).astype(np.float64)
        v = (np.arange(k.size) - k.size // 2) * sim.dv
        assert k.sum() == pytest.approx(1.0, abs=1e-6)
        sigma_inst = 299792.458 / cfg.resolution / 2.3548
        pix = sim.dv * cfg.oversample
        expect = sigma_inst**2 + vmacro**2 / 2 + pix**2 / 12
        assert (k * v**2).sum() == pytest.approx(expect, rel=0.02)


def test_rotation_kernel_matches_grays_profile(sim):
    vsini, eps = 35.0, sim.config.limb_darkening
    k_rot = sim.kernel(6.0, vsini).astype(np.float64)
    k0 = sim.kernel(6.0, 0.0).astype(np.float64)
    # Gray's profile evaluated directly, averaged over each fine pixel, then convolved.
    fine = np.linspace(-0.5, 0.5, 201)
    half = int(np.ceil(vsini / sim.dv)) + 1
    u = ((np.arange(-half, half + 1)[:, None] + fine[None, :]) * sim.dv) / vsini
    inside = np.clip(1 - u**2, 0, None)
    g = (2 * (1 - eps) * np.sqrt(inside) + np.pi * eps / 2 * inside).mean(axis=1)
    direct = np.convolve(k0, g / g.sum())
    c = direct.size // 2
    h = k_rot.size // 2
    np.testing.assert_allclose(k_rot, direct[c - h : c + h + 1], atol=2e-4)
    assert _rotation_transfer(np.array([0.0, 1e-5]), eps) == pytest.approx([1.0, 1.0])


def test_broadening_conserves_equivalent_width(sim):
    lab = StellarLabels.solar_giant(3)
    lab = replace(lab, vmacro=np.array([6.0, 30.0, 6.0]), vsini=np.array([0.0, 0.0, 40.0]))
    f = sim(lab).astype(np.float64)
    ew = (1 - f).sum(axis=1)
    assert ew[1] == pytest.approx(ew[0], rel=0.02) and ew[2] == pytest.approx(ew[0], rel=0.02)
    assert f[1].min() > f[0].min() + 0.1  # broader -> shallower


def test_curve_of_growth_saturates(sim):
    base = StellarLabels.solar_giant(2)
    x = base.x_h.copy()
    x[1] += 0.3  # every element +0.3 dex
    f = sim(replace(base, x_h=x)).astype(np.float64)
    d0, d1 = 1 - f[0], 1 - f[1]
    weak = (d0 > 0.01) & (d0 < 0.03)
    ok = d0 > 0.005
    gain = np.zeros_like(d0)
    gain[ok] = np.log10(d1[ok] / d0[ok]) / 0.3  # d log(depth) / d [X/H]
    strong = d0 > 0.45
    assert weak.sum() > 50 and strong.sum() > 3
    # Weak lines grow nearly linearly (less than 1: metals also raise Pe and the H-
    # continuous opacity); saturated lines barely deepen.
    assert np.median(gain[weak]) > 0.4
    assert np.median(gain[strong]) < 0.3
    assert np.median(gain[strong]) < 0.5 * np.median(gain[weak])


def test_known_lines_are_dominated_by_their_element(sim, giant_response):
    dom = dominant_element(giant_response)
    for el, wl_air in [("Mg", 15765.8), ("Al", 16750.6), ("K", 15168.4), ("Si", 15960.1)]:
        wl = float(air_to_vacuum(np.array([wl_air]))[0])
        p = _pixel(sim, wl)
        window = dom[p - 1 : p + 2]
        assert EL[el] in window, (
            f"{el} {wl_air}: dominant {[ELEMENTS[i] for i in window if i >= 0]}"
        )
    # Every element moves some pixels, at widely separated wavelengths.
    for i, el in enumerate(ELEMENTS):
        moved = np.flatnonzero(np.abs(giant_response[i]) > 0.005)
        assert moved.size >= 3, el
        assert np.ptp(sim.grid.wavelength[moved]) > 300, el


def test_molecular_equilibrium_couples_c_n_o(sim, giant_response):
    r = giant_response
    o_pix = dominant_element(r) == EL["O"]
    assert o_pix.sum() > 50
    # OH: more O deepens the line; more C locks O into CO and weakens it.
    assert np.median(r[EL["O"], o_pix]) < 0
    assert np.mean(r[EL["C"], o_pix] > 0) > 0.7
    # CN: N deepens lines across the band; so does C (CN ~ C_free * N).
    n_pix = r[EL["N"]] < -0.01
    assert n_pix.sum() > 100
    assert np.mean(r[EL["C"], n_pix] < 0) > 0.8
    assert np.ptp(sim.grid.wavelength[n_pix]) > 1500


def test_temperature_and_gravity_signatures(sim):
    cool, hot = StellarLabels.solar_giant(1, teff=4300), StellarLabels.solar_giant(1, teff=4500)
    f = sim(StellarLabels.concat([cool, hot])).astype(np.float64)
    assert (1 - f[0]).sum() > (1 - f[1]).sum() * 1.05  # molecules fade with Teff
    dwarf = StellarLabels.solar_giant(1, teff=6500, logg=4.5)
    fd = sim(dwarf)[0]
    p = _pixel(sim, 16811.1)  # Brackett 11-4 (vacuum)
    assert fd[p] < f[0][p] - 0.2  # hydrogen appears only in the hot dwarf


def test_samplers_follow_the_paper(sim):
    rng = np.random.default_rng(0)
    lab = paper_training_labels(5000, rng)
    assert 4300 <= lab.teff.min() and lab.teff.max() <= 4500
    assert 1.9 <= lab.logg.min() and lab.logg.max() <= 2.2
    others = np.delete(lab.x_h, EL["N"], axis=1)
    assert -0.1 <= others.min() and others.max() <= 0.05
    assert 0.0 <= lab.x_h[:, EL["N"]].min() and lab.x_h[:, EL["N"]].max() <= 0.15
    assert abs(np.corrcoef(lab.x_h[:, 0], lab.x_h[:, 1])[0, 1]) < 0.05  # independent
    c = cemp_labels(500, rng)
    cfe = c.x_h[:, EL["C"]] - c.feh
    assert -2 <= c.feh.min() and c.feh.max() <= -1.5 and 1 <= cfe.min() and cfe.max() <= 2
    r = rapid_rotator_labels(500, rng)
    assert r.vmacro.min() >= 20
    assert rapid_rotator_labels(5, rng, kind="vsini").vsini.min() >= 20
    s = stripped_star_labels(500, rng)
    assert (
        4500 <= s.teff.min() and s.teff.max() <= 7000 and 4.5 <= s.logg.min() and s.logg.max() <= 6
    )
    with pytest.raises(ValueError, match="kind"):
        rapid_rotator_labels(2, rng, kind="spin")


def test_labels_validation():
    with pytest.raises(ValueError, match="x_h"):
        StellarLabels(np.ones(2) * 4400, np.ones(2), np.zeros((2, 3)), np.ones(2), np.zeros(2))
    with pytest.raises(ValueError, match="non-finite"):
        StellarLabels(np.array([np.nan]), np.ones(1), np.zeros((1, 19)), np.ones(1), np.zeros(1))


def test_noise_and_label_scatter():
    rng = np.random.default_rng(0)
    flux = np.full((200, 2405), 0.81, np.float32)
    noisy, ivar = add_noise(flux, 300.0, rng)
    assert np.std(noisy - flux) == pytest.approx(0.9 / 300, rel=0.02)
    np.testing.assert_allclose(ivar, (300 / 0.9) ** 2, rtol=1e-5)
    _, iv_flat = add_noise(flux, np.full(200, 100.0), rng, model="flat")
    np.testing.assert_allclose(iv_flat, 1e4, rtol=1e-5)
    with pytest.raises(ValueError, match="snr"):
        add_noise(flux, 0.0, rng)
    lab = np.tile([4400.0, 2.0, 0.0], (20000, 1))
    obs = scatter_labels(lab, rng)
    np.testing.assert_allclose((obs - lab).std(axis=0), [25, 0.1, 0.01], rtol=0.03)
