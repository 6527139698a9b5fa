"""The actor pool of batch scoring: its ``map_batches`` options and default sizes.

:func:`mendis_ray.distributed.infer.score_catalog` scores on an autoscaling pool of actors
(one model loaded per actor); these functions turn the score settings and the cluster's
resources into that pool.
"""

from __future__ import annotations

__all__ = ["actor_pool_options", "default_actor_threads", "default_max_actors"]


def actor_pool_options(
    *,
    min_actors: int,
    max_actors: int,
    num_cpus_per_actor: float,
    num_gpus_per_actor: float,
    batch_size: int,
) -> dict:
    """The ``map_batches`` keyword arguments of the scoring step: an autoscaling actor pool
    of ``min_actors``..``max_actors`` actors, each with a (fractional) CPU share and
    ``num_gpus_per_actor`` GPUs, fed pyarrow batches of ``batch_size`` rows."""
    import ray

    if not 1 <= min_actors <= max_actors:
        raise ValueError(f"need 1 <= min_actors <= max_actors, got {min_actors}, {max_actors}")
    if not num_cpus_per_actor > 0 or num_gpus_per_actor < 0:
        raise ValueError(
            f"num_cpus_per_actor must be > 0 and num_gpus_per_actor >= 0, got "
            f"{num_cpus_per_actor}, {num_gpus_per_actor}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    opts: dict = {
        "compute": ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors),
        "batch_format": "pyarrow",
        "batch_size": batch_size,
        "num_cpus": num_cpus_per_actor,
    }
    if num_gpus_per_actor:
        opts["num_gpus"] = num_gpus_per_actor
    return opts


def default_actor_threads(num_cpus_per_actor: float) -> int:
    """torch threads of an actor with this CPU share: its whole CPUs, at least 1."""
    return max(1, int(num_cpus_per_actor))


def default_max_actors(resources: dict, num_cpus: float, num_gpus: float) -> int:
    """As many actors as the GPUs allow, or the CPUs less one (left to read tasks)."""
    if num_gpus > 0:
        return max(1, int(resources.get("GPU", 0) // num_gpus))
    return max(1, int((resources.get("CPU", 1) - 1) // num_cpus))
