"""A tiny flow case shared by the scoring tests without Ray (test_hardening,
test_scoring_path): 12 pixels, 4 latent factors, paper-box-like labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mendis_ray.config import FlowConfig

N_PIX = 12
CFG = FlowConfig(name="test", n_pix=N_PIX, n_units=2, hidden=8, n_blocks=1, n_bins=4, grid="none")
GRID = {"name": "none", "n_pix": N_PIX, "hash": "test"}


def _data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lat = rng.standard_normal((n, 4))
    mix = np.random.default_rng(99).standard_normal((4, N_PIX)) * 0.02
    flux = 0.9 + lat @ mix + 0.003 * rng.standard_normal((n, N_PIX))
    labels = np.stack(
        [4400 + 50 * lat[:, 0], 2.05 + 0.1 * lat[:, 1], 0.05 * lat[:, 2]], axis=1
    ) + 0.01 * rng.standard_normal((n, 3))
    return flux, labels


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models: one thread is ~10x faster than two on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
