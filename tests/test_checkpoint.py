"""Checkpoint metadata without the model (mendis_ray.flow.checkpoint.checkpoint_info)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mendis_ray.config import FlowConfig
from mendis_ray.flow.checkpoint import CheckpointError, checkpoint_info, save_checkpoint
from mendis_ray.flow.density import SpectrumDensity, Standardizer
from mendis_ray.flow.model import MendisFlow
from mendis_ray.spectra.grid import get_grid, grid_from_wavelength, log_lambda_grid


def _save(path, grid):
    cfg = FlowConfig(name="t", n_pix=grid.n_pix, n_units=1, hidden=4, n_blocks=1, n_bins=2)
    d = grid.n_pix + 3
    std = Standardizer(np.zeros(d), np.ones(d))
    density = SpectrumDensity(MendisFlow(cfg), std, cfg, {**grid.describe(), "wavelength":
                              grid.wavelength})  # fmt: skip
    return save_checkpoint(path, density)


def test_info_of_a_named_grid_checkpoint(tmp_path):
    grid = get_grid("paper")
    info = checkpoint_info(_save(tmp_path / "ck", grid))
    assert info.kind == "flow"
    assert info.require_grid() == {k: v for k, v in grid.describe().items()}
    assert info.config["flow_config"]["name"] == "t"
    np.testing.assert_allclose(info.wavelength(), grid.wavelength)
    assert info.grid_object().hash == grid.hash


def test_custom_grid_is_rebuilt_from_stored_wavelengths(tmp_path):
    grid = grid_from_wavelength(log_lambda_grid(4.18, 6e-6, 40).wavelength, name="mine")
    path = _save(tmp_path / "ck", grid)
    assert checkpoint_info(path).grid_object().hash == grid.hash
    # no stored wavelengths: a custom grid cannot be rebuilt, and says so
    cfg = json.loads((path / "config.json").read_text())
    from safetensors.numpy import load_file, save_file

    tensors = {k: v for k, v in load_file(str(path / "model.safetensors")).items()
               if k != "grid.wavelength"}  # fmt: skip
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"not a named grid.*mendis ingest apogee"):
        checkpoint_info(path).grid_object()
    cfg["grid"] = {"name": "mine"}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"no grid \(hash, n_pix\) recorded"):
        checkpoint_info(path).require_grid()


def test_not_a_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"empty: not a mendis_ray checkpoint"):
        (tmp_path / "empty").mkdir()
        checkpoint_info(tmp_path / "empty")


def test_load_builds_on_meta_and_keeps_the_saved_weights(tmp_path, monkeypatch):
    """No random initialisation on load (every weight would be overwritten): the LU
    layers' QR init runs only on meta tensors; the loaded weights are the saved ones."""
    import torch

    from mendis_ray.flow.checkpoint import load_checkpoint
    from mendis_ray.flow.lu import LUInvertibleLinear

    path = _save(tmp_path / "ck", get_grid("paper"))
    saved = {k: v.clone() for k, v in load_checkpoint(path)[0].flow.state_dict().items()}
    real, seen = LUInvertibleLinear.reset_parameters, []

    def spy(self, generator):
        seen.append(self.lu.is_meta)
        return real(self, generator)

    monkeypatch.setattr(LUInvertibleLinear, "reset_parameters", spy)
    density, _ = load_checkpoint(path)
    assert seen and all(seen)
    state = density.flow.state_dict()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    assert not any(t.is_meta for t in (*density.flow.parameters(), *density.flow.buffers()))
    x = torch.zeros(2, density.config.n_features)
    assert torch.isfinite(density.flow.log_prob(x)).all()
