"""Start or join Ray.

With no address this starts an embedded single-machine Ray (``address="local"``, so it
never attaches by accident to another ``ray start`` cluster on the machine), with a
pinned object store and no dashboard; with an address (or ``RAY_ADDRESS``, as set by
``ray job submit``) it joins that cluster.  See ../shared/docs/ray-notes.md for why each
setting is what it is.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

__all__ = ["ensure_ray", "quiet_ray_env", "quiet_worker_logging"]


def quiet_worker_logging() -> None:
    """Worker setup hook of the embedded cluster.  It runs without a dashboard, hence
    without Ray's State API, and Ray Train's placement-group cleaner actor then warns
    "Failed to query Ray Train Controller actor state" every second of every run.  The
    cleaner only matters when a controller dies ungracefully on a long-lived cluster;
    an embedded cluster ends with this process."""
    logging.getLogger(
        "ray.train.v2._internal.execution.controller.placement_group_cleaner"
    ).setLevel(logging.ERROR)


def quiet_ray_env(local: bool) -> None:
    """Environment defaults set before Ray starts (the caller's own values win)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    if local:
        # An embedded cluster bound to 127.0.0.1 needs no token; with tokens on, Ray 2.60
        # writes ~/.ray/auth_token and later clients with an explicit address fail.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def ensure_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    object_store_memory: int | None = 1 << 30,
) -> dict:
    """Connect to Ray once per process; return ``ray.cluster_resources()``.

    Args:
        address: a cluster address (``auto``, ``ray://...``) or None: ``RAY_ADDRESS`` if set
            (jobs submitted with ``ray job submit``), else an embedded local cluster.
        num_cpus: logical CPUs of the embedded cluster (default: the machine's, at least 4:
            Ray Data read tasks and train workers must both find a CPU, see ray-notes.md).
        object_store_memory: bytes of the embedded cluster's object store (Ray's default is
            30% of RAM).
    """
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    address = address or os.environ.get("RAY_ADDRESS")
    quiet_ray_env(local=address is None)
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, logging_level="WARNING")
    else:
        cpus = num_cpus or max(4, os.cpu_count() or 1)
        log.info(
            "starting a local Ray (%d logical CPUs, %.2f GB object store)",
            cpus, (object_store_memory or 0) / 1e9,
        )  # fmt: skip
        ray.init(
            address="local",
            num_cpus=cpus,
            num_gpus=None,
            object_store_memory=object_store_memory,
            include_dashboard=False,
            logging_level="WARNING",
            runtime_env={"worker_process_setup_hook": quiet_worker_logging},
        )
    return ray.cluster_resources()
