"""Explanations of outliers (mendis_ray.science.explain): residuals, features, line
identification, per-element totals, tables."""

from __future__ import annotations

import numpy as np
import pytest

from mendis_ray.science.explain import (
    element_totals,
    explain_spectrum,
    explanation_tables,
    find_features,
    identify_line,
    response_maps,
    standardized_residual,
)
from mendis_ray.spectra.linelist import ELEMENTS, default_linelist
from mendis_ray.spectra.simulate import StellarLabels


def test_standardized_residual_masks_bad_pixels_and_combines_noise():
    flux = np.array([1.0, 0.5, 0.7, 0.9, np.nan])
    ref = np.array([1.0, 0.7, 0.7, 0.8, 1.0])
    ivar = np.array([100.0, 100.0, 0.0, np.inf, 100.0])  # 0 and +inf are masked
    r, z, w = standardized_residual(flux, ivar, ref, np.full(5, 100.0))
    assert z[1] == pytest.approx(-0.2 / np.sqrt(0.02))
    assert (r[2:] == 0).all() and (z[2:] == 0).all() and (w[2:] == 0).all()
    _, z_model, _ = standardized_residual(flux, ivar, ref)  # noise-free reference
    assert z_model[1] == pytest.approx(-0.2 * 10)


def test_find_features_bridges_one_pixel_splits_chip_gaps_and_ranks_by_chi2():
    wl = np.concatenate([np.arange(20.0), 100 + np.arange(10.0)])  # a chip gap after 19
    z = np.zeros(30)
    z[[3, 5]] = -6.0  # one feature, the 1-pixel dip at 4 bridged
    z[10] = 20.0  # strongest
    z[18:22] = -5.0  # crosses the chip gap: two features
    feats = find_features(z, wl, threshold=4.0)
    assert feats[0] == (10, 10, 10)
    assert (3, 5, 3) in feats
    assert (18, 19, 18) in feats and (20, 21, 20) in feats
    assert len(feats) == 4


def test_identify_line_uses_named_lines_within_two_pixels_only():
    lines = default_linelist()
    named = lines.strong | np.isin(lines.species, (1, 2, 4))  # named, CO, OH, H lines
    al = np.flatnonzero(lines.strong & (lines.element == ELEMENTS.index("Al")))
    # the Al line farthest from every other identifiable line
    gap = [np.sort(np.abs(lines.wavelength[named] - lines.wavelength[j]))[1] for j in al]
    i = int(al[int(np.argmax(gap))])
    assert max(gap) > 1.0
    wl0 = float(lines.wavelength[i])
    label, wl, element = identify_line(wl0 + 0.5, 0.6, lines)
    assert element == "Al" and wl == pytest.approx(wl0) and label.startswith("Al I")
    # a named line is preferred to a CO / OH line as close; with line strengths, the
    # strongest line within reach wins
    strength = np.where(np.isin(lines.species, (1, 2)), 5.0, -5.0)
    near = named & (np.abs(lines.wavelength - wl0 - 0.5) <= 1.2)
    if (near & np.isin(lines.species, (1, 2))).any():
        assert identify_line(wl0 + 0.5, 0.6, lines, strength=strength)[2] in ("CO", "OH")
    assert identify_line(wl0 + 0.5, 0.6, lines, tol_pix=0.5)[0] in (
        "",
        *(
            lines.label(j)
            for j in np.flatnonzero(named & (np.abs(lines.wavelength - wl0 - 0.5) <= 0.3))
        ),
    )
    # a pseudo-line (random wavelength) far from every named line is never an identification
    pseudo = np.flatnonzero(~named)
    far = [j for j in pseudo if np.min(np.abs(lines.wavelength[named] - lines.wavelength[j])) > 5]
    label, wl, element = identify_line(float(lines.wavelength[far[0]]), 0.6, lines)
    assert (label, element) == ("", "") and np.isnan(wl)


def _spectra(sim, x_h_change: dict[str, float], snr: float = 300.0, seed: int = 0):
    """A noisy giant with [X/H] changed, and a noisy giant of the same labels."""
    rng = np.random.default_rng(seed)
    base = StellarLabels.solar_giant(1, teff=4500.0, logg=2.3)
    x = base.x_h.copy()
    for el, dx in x_h_change.items():
        x[0, ELEMENTS.index(el)] += dx
    odd = StellarLabels(base.teff, base.logg, x, base.vmacro, base.vsini)
    f = sim(odd)[0] + rng.normal(size=sim.grid.n_pix) / snr
    ref = sim(base)[0] + rng.normal(size=sim.grid.n_pix) / snr
    ivar = np.full(sim.grid.n_pix, snr**2)
    return f, ivar, ref, ivar.copy()


@pytest.mark.parametrize("element", ["Mg", "Al", "Ni"])
def test_a_single_element_anomaly_is_attributed_to_that_element(sim, element):
    f, ivar, ref, ref_ivar = _spectra(sim, {element: 0.4})
    resp = response_maps(sim.grid.describe(), np.array([[4500.0, 2.3, 0.0]]))[0]
    ex = explain_spectrum(f, ivar, ref, ref_ivar, sim.grid.wavelength, default_linelist(),
                          response=resp)  # fmt: skip
    assert ex.elements[0]["element"] == element
    assert ex.elements[0]["offset_dex"] == pytest.approx(0.4, abs=0.12)
    # most of the chi^2 beyond the noise (about one per pixel), far more than any other
    assert ex.elements[0]["delta_chi2"] > 0.6 * (ex.chi2 - ex.n_good)
    assert ex.elements[0]["share"] > 5 * ex.elements[1]["share"]
    assert ex.features and ex.features[0]["depth"] < 0  # stronger lines: more absorption
    # the strongest feature sits on a line of that element, identified within 2 pixels
    top = [f for f in ex.features[:3] if f["element"]]
    assert any(f["element"] == element for f in top), ex.features[:3]
    assert element in ex.summary()


def test_identical_spectra_have_no_features(sim):
    f, ivar, ref, ref_ivar = _spectra(sim, {})
    ex = explain_spectrum(f, ivar, ref, ref_ivar, sim.grid.wavelength, default_linelist())
    assert ex.features == [] and ex.elements == []
    assert 0.8 < ex.chi2_per_pixel < 1.2  # pure noise
    assert "no pixel beyond the threshold" in ex.summary()


def test_a_tiny_response_cannot_explain_with_an_absurd_offset():
    r = np.ones(50) * 0.1
    w = np.full(50, 1e4)
    resp = np.zeros((len(ELEMENTS), 50))
    resp[0] = 0.001  # C: tiny response, exact shape of the residual -> 100 dex unclipped
    resp[1] = 0.05  # N: a real response, 2 dex
    out = element_totals(r, w, resp, chi2_total=float(np.sum(w * r * r)))
    by = {e["element"]: e for e in out}
    assert by["C"]["clipped"] and by["C"]["offset_dex"] == 2.0
    assert out[0]["element"] == "N" and not by["N"]["clipped"]
    assert by["N"]["share"] == pytest.approx(1.0)


def test_response_maps_only_on_the_simulator_grids(sim):
    g = sim.grid.describe()
    maps = response_maps(g, np.array([[4500.0, 2.3, 0.0], [np.nan, 2.0, 0.0]]))
    assert maps.shape == (2, len(ELEMENTS), sim.grid.n_pix)
    assert np.isfinite(maps[0]).all() and np.isnan(maps[1]).all()
    kk = response_maps(g, np.array([[4.5, 2.3, 0.0]]))  # Teff in kK: none, and no overflow
    assert np.isnan(kk).all()
    r, w = np.ones(sim.grid.n_pix) * 0.1, np.full(sim.grid.n_pix, 1e4)
    assert element_totals(r, w, kk[0], chi2_total=1.0) == []  # no element, not a NaN "C"
    assert response_maps({**g, "hash": "0" * 16}, np.zeros((1, 3))) is None
    assert response_maps({**g, "name": "custom"}, np.zeros((1, 3))) is None


def test_explanation_tables_long_format_and_summary(sim):
    f, ivar, ref, ref_ivar = _spectra(sim, {"Mg": 0.5})
    resp = response_maps(sim.grid.describe(), np.array([[4500.0, 2.3, 0.0]]))[0]
    wl, lines = sim.grid.wavelength, default_linelist()
    exs = [explain_spectrum(f, ivar, ref, ref_ivar, wl, lines, response=resp),
           explain_spectrum(ref, ivar, ref, ref_ivar, wl, lines)]  # fmt: skip
    feats, elems, summ = explanation_tables([1, 2], ["a", "b"], exs)
    assert feats.num_rows == len(exs[0].features) and set(feats.column("id").to_pylist()) == {"a"}
    assert feats.column_names[:4] == ["rank", "id", "feature", "wavelength"]
    assert elems.num_rows == len(exs[0].elements) > 0
    assert summ["n_features"] == [len(exs[0].features), 0]
    assert summ["top_element"] == ["Mg", ""]
    assert summ["explanation"][1].startswith("no pixel beyond")
