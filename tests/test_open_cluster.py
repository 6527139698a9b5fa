"""The embedded Ray runs without a token only on loopback: any other node IP is refused."""

from __future__ import annotations

import logging
import os

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


@pytest.mark.parametrize("given", [None, "7"])
def test_embedded_cluster_workers_get_a_fair_share_unless_told_otherwise(monkeypatch, given):
    """Workers of the embedded cluster at the command's own niceness (Ray's default, 15
    more, left them a few percent of a shared machine); the caller's own
    RAY_worker_niceness wins; a joined cluster keeps its own setting."""
    monkeypatch.setattr(os, "environ", dict(os.environ))  # nothing set here outlives the test
    for key in ("RAY_worker_niceness", "RAY_AUTH_MODE"):
        os.environ.pop(key, None)
    if given is not None:
        os.environ["RAY_worker_niceness"] = given
    session.quiet_ray_env(local=False)
    assert os.environ.get("RAY_worker_niceness") == given
    session.quiet_ray_env(local=True)
    assert os.environ["RAY_worker_niceness"] == (given or "0")
