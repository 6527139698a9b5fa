"""The torch process group of Ray Train workers, on loopback only in the embedded cluster.

Ray Train's ``TorchConfig`` sets up the group through ``env://``: rank 0 starts torch's
``TCPStore`` server (the rendezvous every worker connects to), and that server binds
every interface (``*:MASTER_PORT`` in ``ss -ltnp``) whatever ``MASTER_ADDR`` says;
gloo and NCCL then listen on the interface the host name resolves to.  When the node's
IP is loopback (the embedded cluster of ``ensure_ray`` without an address: ``mendis
demo``, ``train``, ``tune``, the tests) :class:`LoopbackTorchConfig` binds the store to
127.0.0.1 itself (``master_listen_fd``) and pins gloo and NCCL to the loopback interface
(issue 14).  On a real cluster workers on other machines must reach rank 0: Ray's own
``TorchConfig`` is used there.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import ray
from ray.train.torch.config import (
    TorchConfig,
    V1WorkerGroup,
    _set_torch_distributed_env_vars,
    _TorchBackend,
)

_STORE: dict = {}  # rank 0's TCPStore server, kept for the worker's lifetime


def loopback_interface() -> str:
    """The loopback interface's name (``lo`` on Linux, ``lo0`` on macOS)."""
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in names if n.startswith("lo")), "lo")


def _store_server(world_size: int, timeout_s: float) -> int:
    """Rank 0: a TCPStore server listening on 127.0.0.1 only; returns its port."""
    import torch.distributed as dist

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(max(16, world_size))
    port = sock.getsockname()[1]
    _STORE["server"] = dist.TCPStore(
        "127.0.0.1", port, world_size, True, timedelta(seconds=timeout_s),
        wait_for_workers=False, master_listen_fd=sock.detach(),
    )  # fmt: skip
    return port


def _join_group(backend: str, rank: int, world_size: int, port: int, timeout_s: float) -> None:
    """Every worker: join the process group through the loopback store."""
    import torch.distributed as dist

    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        os.environ.setdefault(var, loopback_interface())
    timeout = timedelta(seconds=timeout_s)
    if rank == 0:
        store = _STORE["server"]
    else:
        store = dist.TCPStore("127.0.0.1", port, world_size, False, timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timeout)  # fmt: skip


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        backend = backend_config.backend
        if backend is None:
            gpus = worker_group.get_resources_per_worker().get("GPU", 0)
            backend = "nccl" if gpus > 0 else "gloo"
        if not isinstance(worker_group, V1WorkerGroup):  # as Ray's own backend does
            worker_group.execute(_set_torch_distributed_env_vars)
        n, timeout_s = len(worker_group), backend_config.timeout_s
        port = worker_group.execute_single(0, _store_server, n, timeout_s)
        ray.get([worker_group.execute_single_async(i, _join_group, backend, i, n, port,
                                                   timeout_s) for i in range(n)])  # fmt: skip


class LoopbackTorchConfig(TorchConfig):
    """``TorchConfig`` whose process group listens on 127.0.0.1 only (one machine)."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend


def torch_config() -> TorchConfig:
    """The process-group setup for the cluster this process uses: loopback only when the
    node's IP is loopback (the embedded cluster; also inside its workers, e.g. a Tune
    trial that starts a TorchTrainer), Ray's default otherwise."""
    from mendis_ray.distributed.session import is_loopback

    local = is_loopback(ray.util.get_node_ip_address())
    return LoopbackTorchConfig() if local else TorchConfig()
