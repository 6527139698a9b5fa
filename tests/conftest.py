"""Shared test fixtures.  ``shared_data`` is the reference-data folder beside the project
(``../shared/data``); tests that need it skip cleanly where it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_report_header(config) -> str:
    """Say up front whether the ``shared`` tests can run: a clone without ``../shared``
    beside it skips them all (a local check there misses what CI, which has it, tests)."""
    state = "present" if SHARED_DATA.is_dir() else "ABSENT: every test marked `shared` skips"
    return f"shared reference data: {SHARED_DATA} ({state})"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def sim():
    from mendis_ray.spectra.simulate import Simulator

    return Simulator()
