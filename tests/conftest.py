"""Shared test fixtures.  ``shared_data`` is the reference-data folder beside the project
(``../shared/data``); tests that need it skip cleanly where it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def sim():
    from mendis_ray.spectra.simulate import Simulator

    return Simulator()
