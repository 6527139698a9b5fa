"""Tests for mendis_ray.spectra.emulator (Payne-format emulators)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from mendis_ray.spectra.emulator import (
    X_MAX_2018,
    X_MIN_2018,
    PayneEmulator2018,
    PayneMLP,
    emulate_dataset,
    load_emulator,
    to_model_grid,
)
from mendis_ray.spectra.grid import aspcap_grid, log_lambda_grid, paper_grid

PAYNE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "the_payne"
PAYNE_2018 = PAYNE_DIR / "NN_normalized_spectra_2018.npz"
N_PIX = 7214

# Dwarfs: the 2018 network was trained on APOGEE dwarfs (logg 4.0-4.985).
SUN_LIKE = [5500.0, 4.5, 0.0, 0.0, 5.0]
LABELS = np.array([[4800.0, 4.6, 0.0, 0.0, 3.0], SUN_LIKE, [6500.0, 4.2, -0.5, 0.2, 10.0]])


@pytest.fixture(scope="module")
def payne2018() -> PayneEmulator2018:
    if not PAYNE_2018.exists():
        pytest.skip(f"reference file {PAYNE_2018} not present (needs ../shared/data)")
    return load_emulator(PAYNE_2018)


def _write_mlp(path: Path, n_labels: int = 25, n_hidden: int = 30, n_pix: int = N_PIX, **over):
    """A random network in exactly the Payne 2019 npz format (float32 weights)."""
    rng = np.random.default_rng(1)
    arrays = {
        "w_array_0": rng.normal(size=(n_hidden, n_labels)),
        "w_array_1": rng.normal(size=(n_hidden, n_hidden)) / np.sqrt(n_hidden),
        "w_array_2": rng.normal(size=(n_pix, n_hidden)) / np.sqrt(n_hidden),
        "b_array_0": rng.normal(size=n_hidden) * 0.3,
        "b_array_1": rng.normal(size=n_hidden) * 0.3,
        "b_array_2": 1.0 + 0.01 * rng.normal(size=n_pix),
        "x_min": np.linspace(-1.0, 3000.0, n_labels),
        "x_max": np.linspace(1.0, 7000.0, n_labels),
    }
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    arrays.update(over)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return arrays


def _write_2018(path: Path, n_pix: int = N_PIX, **over):
    """A random network in the 2018 per-pixel format, without x_min / x_max."""
    rng = np.random.default_rng(2)
    arrays = {
        "w_array_0": rng.normal(size=(n_pix, 5, 5)).astype(np.float32),
        "b_array_0": rng.normal(size=(n_pix, 5)).astype(np.float32),
        "w_array_1": 0.1 * rng.normal(size=(n_pix, 5)).astype(np.float32),
        "b_array_1": np.ones(n_pix, dtype=np.float32),
    }
    arrays.update(over)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return arrays


# --------------------------------------------------------------------------------------
# The real 2018 network


def _loop_2018(npz: np.lib.npyio.NpzFile, labels: list[float]) -> np.ndarray:
    """The documented formula, one pixel and one hidden unit at a time, in plain python."""
    w0, b0 = npz["w_array_0"].astype(float).tolist(), npz["b_array_0"].astype(float).tolist()
    w1, b1 = npz["w_array_1"].astype(float).tolist(), npz["b_array_1"].astype(float).tolist()
    lo, hi = npz["x_min"].tolist(), npz["x_max"].tolist()
    s = [(x - a) / (b - a) - 0.5 for x, a, b in zip(labels, lo, hi, strict=True)]
    flux = []
    for i in range(len(b1)):
        total = b1[i]
        for j in range(len(b0[i])):
            z = sum(w0[i][j][k] * s[k] for k in range(len(s))) + b0[i][j]
            total += w1[i][j] / (1.0 + math.exp(-z))
        flux.append(total)
    return np.array(flux)


@pytest.mark.shared
def test_2018_file_layout(payne2018):
    with np.load(PAYNE_2018) as npz:
        assert npz["w_array_0"].shape == (N_PIX, 5, 5)
        assert {"x_min", "x_max"} <= set(npz.files)
    assert payne2018.n_labels == 5 and payne2018.grid == aspcap_grid()
    assert payne2018.label_names == ("teff", "logg", "feh", "mgfe", "vmacro")
    # The stored ranges agree with the documented (rounded) ones.
    np.testing.assert_allclose(payne2018.x_min, X_MIN_2018, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(payne2018.x_max, X_MAX_2018, rtol=1e-4, atol=1e-3)


@pytest.mark.shared
def test_2018_matches_per_pixel_loop(payne2018):
    flux = payne2018(LABELS)
    with np.load(PAYNE_2018) as npz:
        for row, labels in zip(flux, LABELS, strict=True):
            np.testing.assert_allclose(row, _loop_2018(npz, labels.tolist()), rtol=0, atol=1e-10)
    np.testing.assert_allclose(payne2018(LABELS[1]), flux[1], rtol=0, atol=1e-14)


@pytest.mark.shared
def test_2018_shapes_and_plausible_flux(payne2018):
    one = payne2018(SUN_LIKE)
    assert one.shape == (N_PIX,) and one.dtype == np.float64
    many = payne2018(np.tile(SUN_LIKE, (4, 1)))
    assert many.shape == (4, N_PIX)
    assert payne2018(np.empty((0, 5))).shape == (0, N_PIX)
    assert payne2018.in_range(SUN_LIKE)
    assert 0.9 < np.median(one) < 1.02 and one.min() > 0.2


@pytest.mark.shared
def test_2018_metal_rich_has_deeper_lines(payne2018):
    labels = np.tile(SUN_LIKE, (3, 1))
    labels[:, 2] = [-0.5, 0.0, 0.3]
    depth = (1.0 - payne2018(labels)).sum(axis=1)
    assert np.all(np.diff(depth) > 0)


@pytest.mark.shared
def test_2018_chunking_does_not_change_output(payne2018, monkeypatch):
    import mendis_ray.spectra.emulator as emu

    labels = np.random.default_rng(0).uniform(payne2018.x_min, payne2018.x_max, (7, 5))
    full = payne2018(labels)
    monkeypatch.setattr(emu, "_CHUNK_BYTES", 1)  # one label vector per chunk
    np.testing.assert_allclose(payne2018(labels), full, rtol=0, atol=1e-14)  # BLAS rounding


# --------------------------------------------------------------------------------------
# The 2019 MLP format


def _leaky(z):
    return z * (z > 0) + 0.01 * z * (z < 0)


def test_mlp_matches_reference(tmp_path):
    path = tmp_path / "payne_mlp.npz"
    a = {k: v.astype(np.float64) for k, v in _write_mlp(path).items()}
    emulator = load_emulator(path)
    assert isinstance(emulator, PayneMLP) and emulator.n_labels == 25
    assert emulator.grid == aspcap_grid() and emulator.label_names[0] == "label_0"

    labels = np.random.default_rng(3).uniform(a["x_min"], a["x_max"], (6, 25))
    flux = emulator(labels)
    assert flux.shape == (6, N_PIX)
    relu_only = []
    for row, lab in zip(flux, labels, strict=True):  # The Payne's own per-star recipe
        s = (lab - a["x_min"]) / (a["x_max"] - a["x_min"]) - 0.5
        inside = np.einsum("ij,j->i", a["w_array_0"], s) + a["b_array_0"]
        outside = np.einsum("ij,j->i", a["w_array_1"], _leaky(inside)) + a["b_array_1"]
        ref = np.einsum("ij,j->i", a["w_array_2"], _leaky(outside)) + a["b_array_2"]
        np.testing.assert_allclose(row, ref, rtol=0, atol=1e-10)
        # The leaky branch is exercised: both layers have negative pre-activations ...
        assert 0 < (inside < 0).mean() < 1 and 0 < (outside < 0).mean() < 1
        relu = np.maximum(a["w_array_1"] @ np.maximum(inside, 0) + a["b_array_1"], 0)
        relu_only.append(a["w_array_2"] @ relu + a["b_array_2"])
    # ... and a plain ReLU would give a different answer.
    assert np.abs(np.array(relu_only) - flux).max() > 1e-4
    np.testing.assert_allclose(emulator(labels[0]), flux[0], rtol=0, atol=1e-12)


def test_mlp_label_names_and_grid(tmp_path):
    path = tmp_path / "payne_mlp.npz"
    _write_mlp(path, n_labels=3, label_names=np.array(["teff", "logg", "feh"]))
    assert load_emulator(path).label_names == ("teff", "logg", "feh")
    renamed = PayneMLP.from_npz(path, label_names=["a", "b", "c"], grid=aspcap_grid().wavelength)
    assert renamed.label_names == ("a", "b", "c") and renamed.grid == aspcap_grid()
    # An emulator on the paper grid needs 2405 outputs.
    _write_mlp(path, n_labels=3, n_pix=paper_grid().n_pix)
    assert PayneMLP.from_npz(path, grid=paper_grid())(np.ones(3)).shape == (2405,)


def test_in_range(tmp_path):
    path = tmp_path / "payne_mlp.npz"
    _write_mlp(path, n_labels=2, x_min=np.array([0.0, 1.0]), x_max=np.array([1.0, 2.0]))
    emulator = load_emulator(path)
    ok = emulator.in_range([[0.0, 1.0], [1.0, 2.0], [0.5, 2.5], [-0.1, 1.5]])
    np.testing.assert_array_equal(ok, [True, True, False, False])
    assert bool(emulator.in_range([0.5, 1.5]))


def test_2018_format_defaults_and_dispatch(tmp_path):
    path = tmp_path / "nn_2018.npz"
    a = _write_2018(path)
    emulator = load_emulator(path)
    assert isinstance(emulator, PayneEmulator2018)
    np.testing.assert_array_equal(emulator.x_min, X_MIN_2018)  # not stored: documented values
    s = (np.array(SUN_LIKE) - X_MIN_2018) / (X_MAX_2018 - X_MIN_2018) - 0.5
    z = a["w_array_0"].astype(float) @ s + a["b_array_0"]
    ref = (a["w_array_1"] / (1 + np.exp(-z))).sum(axis=1) + a["b_array_1"]
    np.testing.assert_allclose(emulator(SUN_LIKE), ref, rtol=0, atol=1e-6)  # float32 ref


# --------------------------------------------------------------------------------------
# Bad files and bad labels


@pytest.mark.parametrize(
    ("writer", "key", "bad"),
    [
        (_write_mlp, "b_array_1", None),  # missing
        (_write_mlp, "x_min", None),  # missing (required for an MLP)
        (_write_mlp, "b_array_0", np.zeros(31, dtype=np.float32)),
        (_write_mlp, "w_array_1", np.zeros((30, 29), dtype=np.float32)),
        (_write_mlp, "w_array_2", np.zeros((N_PIX, 29), dtype=np.float32)),
        (_write_mlp, "x_max", np.ones(24)),
        (_write_2018, "b_array_1", None),
        (_write_2018, "w_array_1", np.zeros((N_PIX, 4), dtype=np.float32)),
        (_write_2018, "w_array_0", np.zeros((N_PIX, 25), dtype=np.float32)),
    ],
)
def test_broken_file_names_file_and_key(tmp_path, writer, key, bad):
    path = tmp_path / "broken_net.npz"
    writer(path, **{key: bad})
    with pytest.raises(ValueError, match=key) as info:
        load_emulator(path)
    assert "broken_net.npz" in str(info.value)


def test_wrong_output_length_says_expected(tmp_path):
    path = tmp_path / "short.npz"
    _write_mlp(path, n_labels=3, n_pix=100)
    with pytest.raises(ValueError, match="7214") as info:
        PayneMLP.from_npz(path)
    assert "short.npz" in str(info.value) and "100" in str(info.value)


def test_bad_labels(tmp_path):
    path = tmp_path / "payne_mlp.npz"
    _write_mlp(path, n_labels=4)
    emulator = load_emulator(path)
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        emulator(np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        emulator(np.zeros((1, 2, 4)))
    with pytest.raises(ValueError, match=r"finite.*row\(s\) \[1\]"):
        emulator([[0.0, 1.0, 2.0, 3.0], [0.0, np.nan, 2.0, 3.0]])


# --------------------------------------------------------------------------------------
# Grids and training sets


def test_paper_grid_is_every_third_pixel(tmp_path):
    path = tmp_path / "payne_mlp.npz"
    _write_mlp(path, n_labels=3)
    emulator = load_emulator(path)
    flux = emulator(np.random.default_rng(4).uniform(emulator.x_min, emulator.x_max, (3, 3)))
    np.testing.assert_array_equal(emulator.on_grid(flux, paper_grid()), flux[:, ::3])
    np.testing.assert_array_equal(to_model_grid(flux[0], paper_grid()), flux[0, ::3])
    np.testing.assert_array_equal(to_model_grid(flux, aspcap_grid()), flux)


def test_non_subset_grid_is_resampled():
    flux = np.random.default_rng(5).normal(1.0, 0.1, N_PIX)
    # 100 pixels shifted by half an apStar pixel inside the blue chip (apStar 322 = ASPCAP 0):
    # each straddles two ASPCAP pixels equally; the last one hangs into the chip gap.
    shifted = log_lambda_grid(4.179 + 6e-6 * 322.5, 6e-6, 100)
    np.testing.assert_allclose(to_model_grid(flux, shifted), 0.5 * (flux[:100] + flux[1:101]))
    gap = log_lambda_grid(4.179 + 6e-6 * 3400, 6e-6, 5)  # in the blue-green chip gap
    np.testing.assert_array_equal(to_model_grid(flux, gap), 1.0)


def test_emulate_dataset(tmp_path):
    path = tmp_path / "payne_mlp.npz"
    _write_mlp(path, n_labels=3)
    emulator = load_emulator(path)
    labels = np.random.default_rng(6).uniform(emulator.x_min, emulator.x_max, (40, 3))
    flux, ivar = emulate_dataset(emulator, labels, paper_grid(), 50.0, rng=0)
    assert flux.shape == ivar.shape == (40, 2405) and flux.dtype == ivar.dtype == np.float32
    np.testing.assert_array_equal(ivar, 2500.0)
    resid = flux - emulator.on_grid(emulator(labels), paper_grid())
    assert abs(resid.std() * 50.0 - 1.0) < 0.02 and abs(resid.mean()) < 1e-3
    again, _ = emulate_dataset(emulator, labels, paper_grid(), 50.0, rng=0)
    np.testing.assert_array_equal(again, flux)

    snr = np.array([10.0, 100.0])
    flux, ivar = emulate_dataset(emulator, labels[:2], None, snr, np.random.default_rng(1))
    assert flux.shape == (2, N_PIX)
    np.testing.assert_allclose(ivar[:, 0], snr**2)
    resid = flux - emulator(labels[:2])
    np.testing.assert_allclose(resid.std(axis=1) * snr, 1.0, atol=0.05)
    with pytest.raises(ValueError, match="snr"):
        emulate_dataset(emulator, labels, None, np.ones(3), 0)
    with pytest.raises(ValueError, match="snr"):
        emulate_dataset(emulator, labels, None, 0.0, 0)
