"""The embedded cluster's workers: its setup hook runs in them; they run at the driver's
niceness."""

import logging


def test_worker_setup_hook_quiets_the_placement_group_cleaner(ray_session):
    ray = ray_session
    name = "ray.train.v2._internal.execution.controller.placement_group_cleaner"

    @ray.remote(num_cpus=0.1)
    def level() -> int:
        return logging.getLogger(name).level

    assert ray.get(level.remote()) == logging.ERROR
    assert logging.getLogger(name).level != logging.ERROR  # the driver's logging untouched


def test_embedded_cluster_workers_run_at_the_callers_niceness(ray_session):
    """Not 15 nicer (Ray's default), where a busy machine left them a few percent of the
    CPU (``quiet_ray_env``); skipped where the caller chose a niceness of their own."""
    import os

    import pytest

    if os.environ.get("RAY_worker_niceness", "0") != "0":
        pytest.skip("RAY_worker_niceness set by the caller")
    ray = ray_session

    @ray.remote(num_cpus=0.1)
    def niceness() -> int:
        return os.nice(0)

    assert ray.get(niceness.remote()) == os.nice(0)
