"""The embedded cluster's worker setup hook runs in Ray's worker processes."""

import logging


def test_worker_setup_hook_quiets_the_placement_group_cleaner(ray_session):
    ray = ray_session
    name = "ray.train.v2._internal.execution.controller.placement_group_cleaner"

    @ray.remote(num_cpus=0.1)
    def level() -> int:
        return logging.getLogger(name).level

    assert ray.get(level.remote()) == logging.ERROR
    assert logging.getLogger(name).level != logging.ERROR  # the driver's logging untouched
