"""Ray Train workers of the embedded cluster listen on loopback only (issue 14): torch's
TCPStore server, which Ray's default ``env://`` setup binds to every interface (``*`` in
``ss -ltnp`` while ``mendis demo`` trained), is bound to 127.0.0.1, and gloo to ``lo``."""

from __future__ import annotations


def test_train_workers_listen_on_loopback_only(ray_session, tmp_path):
    import json

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mendis_ray.distributed.session import embedded_cluster, is_loopback
    from mendis_ray.distributed.torch_group import LoopbackTorchConfig, torch_config
    from mendis_ray.distributed.train import _fit_and_release

    assert embedded_cluster() and isinstance(torch_config(), LoopbackTorchConfig)

    @ray_session.remote(num_cpus=0)
    def config_in_a_worker() -> str:  # where a Tune trial starts its TorchTrainer
        from mendis_ray.distributed.torch_group import torch_config

        return type(torch_config()).__name__

    assert ray_session.get(config_in_a_worker.remote()) == "LoopbackTorchConfig"

    def _loop(config: dict) -> None:  # nested: pickled by value (the module is not importable)
        import json
        import os

        import torch
        import torch.distributed as dist

        from mendis_ray.distributed.session import listening_sockets

        total = torch.ones(1)
        dist.all_reduce(total)  # the group works
        out = {"sum": float(total), "sockets": listening_sockets([os.getpid()])}
        with open(os.path.join(config["dir"], f"rank{dist.get_rank()}.json"), "w") as f:
            json.dump(out, f)

    trainer = TorchTrainer(
        _loop,
        train_loop_config={"dir": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="loopback", storage_path=str(tmp_path)),
        torch_config=torch_config(),
    )
    # fit and release the controller, as the product does: a plain fit() leaves Ray Train's
    # controller alive for the rest of the session (test_train checks none is left)
    _fit_and_release(trainer)
    per_worker = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [w["sum"] for w in per_worker] == [2.0, 2.0]
    assert all(w["sockets"] for w in per_worker), per_worker
    exposed = [s for w in per_worker for s in w["sockets"] if not is_loopback(s["address"])]
    assert not exposed, exposed
