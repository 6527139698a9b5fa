"""The embedded Ray runs without a token only on loopback: any other node IP is refused."""

from __future__ import annotations

import logging

import pytest

from mendis_ray.distributed import session


@pytest.fixture
def shutdowns(monkeypatch) -> list[int]:
    """Calls of ``shutdown_embedded_ray`` (recorded, so a Ray other tests run stays up)."""
    calls: list[int] = []
    monkeypatch.setattr(session, "shutdown_embedded_ray", lambda: calls.append(1))
    return calls


def test_an_unauthenticated_cluster_off_loopback_is_shut_down(monkeypatch, shutdowns) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    session._refuse_open_cluster("127.0.0.1")  # the normal case: nothing happens
    assert shutdowns == []
    with pytest.raises(RuntimeError, match=r"10\.1\.2\.3.*RAY_AUTH_MODE=token"):
        session._refuse_open_cluster("10.1.2.3")
    assert shutdowns == [1]


def test_with_its_own_auth_mode_the_caller_is_warned(monkeypatch, shutdowns, caplog) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with caplog.at_level(logging.WARNING, logger="mendis_ray"):
        session._refuse_open_cluster("10.1.2.3")
    assert shutdowns == [] and "reachable from the network" in caplog.text
