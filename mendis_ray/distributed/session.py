"""Start or join Ray.

With no address this starts an embedded single-machine Ray (``address="local"``, so it
never attaches by accident to another ``ray start`` cluster on the machine), with a
pinned object store and no dashboard, bound to 127.0.0.1 (:func:`loopback_node`); with
an address (or ``RAY_ADDRESS``, as set by ``ray job submit``) it joins that cluster.
See ../shared/docs/ray-notes.md for why each setting is what it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from collections.abc import Iterator

log = logging.getLogger(__name__)

__all__ = [
    "ensure_ray",
    "filter_raylet_notices",
    "is_loopback",
    "listening_sockets",
    "loopback_node",
    "process_tree",
    "quiet_driver_logging",
    "quiet_ray_env",
    "quiet_worker_logging",
    "shutdown_embedded_ray",
    "worker_logs_to_driver",
]

#: whether this process started the embedded cluster (ensure_ray without an address)
_EMBEDDED = {"started": False}


def quiet_worker_logging() -> None:
    """Worker setup hook of the embedded cluster.  It runs without a dashboard, hence
    without Ray's State API, and Ray Train's placement-group cleaner actor then warns
    "Failed to query Ray Train Controller actor state" every second of every run.  The
    cleaner only matters when a controller dies ungracefully on a long-lived cluster;
    an embedded cluster ends with this process."""
    logging.getLogger(
        "ray.train.v2._internal.execution.controller.placement_group_cleaner"
    ).setLevel(logging.ERROR)


def quiet_driver_logging() -> None:
    """The driver's console gets this package's progress lines and Ray's warnings, not
    Ray's chatter: Ray Data's INFO lines (execution plans, parquet estimates) go to its log
    file only (``/tmp/ray/session_*/logs/ray-data``), its progress bars (terminal escape
    sequences) are off, and so is the one-time warning that says they are off."""
    import ray.data
    from ray.util.debug import log_once

    ray.data.DataContext.get_current().enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")  # consumed: that warning never prints
    for handler in _ray_data_console():
        handler.setLevel(logging.WARNING)
    for name in ("ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _ray_data_console() -> list[logging.Handler]:
    """Ray Data's console handlers (its file handler keeps every record)."""
    return [h for h in logging.getLogger("ray.data").handlers
            if getattr(h, "name", None) == "console"]  # fmt: skip


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


@contextlib.contextmanager
def ray_data_errors_to_log_file() -> Iterator[None]:
    """While a dataset runs whose errors the caller raises itself (named, as ShardError),
    Ray Data's ERROR lines about them (the failed task's stack, "Exception occurred in
    Ray Data or Ray Core internal code", up to 300 lines for a damaged shard) go to its log
    file only, not to the console before the one-line error; its warnings still reach
    the console."""
    handlers = _ray_data_console()
    for h in handlers:
        h.addFilter(_below_error)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(_below_error)


#: raylet notices that say nothing actionable about a small embedded cluster: on a 2-core
#: machine with 4 logical CPUs Ray Data and Ray Train start more workers at once than
#: the raylet's startup throttle (the physical core count) "expects"; and, when
#: ``mendis serve`` stops, ``serve.shutdown`` kills the Serve controller while its own
#: graceful-shutdown task is pending
_HARMLESS_RAYLET = re.compile(
    r"worker processes have been started on node|ServeController\.graceful_shutdown failed"
)


def filter_raylet_notices() -> None:
    """Raylet notices the driver prints (``(raylet) WARNING: ...``, through Ray's error
    pub-sub whatever ``log_to_driver`` says) go to this package's DEBUG log when they are
    harmless (:data:`_HARMLESS_RAYLET`); every other notice still reaches the console."""
    from ray._private import worker

    original = worker.print_to_stdstream
    if getattr(original, "_mendis_filtered", False):
        return

    def filtered(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet":
            lines = [ln for ln in data.get("lines", []) if not _HARMLESS_RAYLET.search(ln)]
            for ln in data.get("lines", []):
                if _HARMLESS_RAYLET.search(ln):
                    log.debug("raylet: %s", ln)
            if not lines:
                return
            data = {**data, "lines": lines}
        original(data, ignore_prefix)

    filtered._mendis_filtered = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = filtered


def worker_logs_to_driver() -> bool:
    """Whether Ray forwards its workers' and actors' output (``(pid=...)`` lines, Ray
    Data's progress bars in its coordinator actors, Ray Train's checkpoint messages) to
    this console: only with ``mendis -v`` or ``MENDIS_RAY_WORKER_LOGS=1``; they are always
    in ``/tmp/ray/session_latest/logs``."""
    if os.environ.get("MENDIS_RAY_WORKER_LOGS", "") not in ("", "0"):
        return True
    return logging.getLogger("mendis_ray").isEnabledFor(logging.DEBUG)


def quiet_ray_env(local: bool) -> None:
    """Environment defaults set before Ray starts (the caller's own values win)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    if local:
        # No token for the embedded cluster: it is started inside loopback_node(), so every
        # listener (GCS, raylet, workers, agents, Serve, Train's rendezvous store) is bound to
        # 127.0.0.1 -- the "bind shown with ss -ltnp" mitigation of ../shared/docs/ray-notes.md,
        # checked by tests/distributed/test_serve.py::test_embedded_cluster_and_serve_listen_
        # on_loopback_only and test_torch_group.py::test_train_workers_listen_on_loopback_only.
        # With tokens on, Ray 2.60 writes ~/.ray/auth_token and later clients with an explicit
        # address fail.  Should the node IP not be loopback after all, ensure_ray shuts the
        # cluster down and raises (_refuse_open_cluster).  A joined cluster (address given)
        # keeps its own auth setting.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # Ray starts its workers 15 nicer than itself, for a cluster whose machines are its
        # own.  The embedded cluster runs one user's command on a machine shared with their
        # other work, where that left our workers a few percent of the CPU: `mendis score`
        # of 10,000 spectra beside two busy processes on 2 cores took 337 s instead of 33 s
        # alone.  At +0 (the command's own niceness) they take their fair share (61 s).
        os.environ.setdefault("RAY_worker_niceness", "0")


#: Ray's switch for its single-machine (Windows/macOS) mode: node IP = loopback
_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def loopback_node() -> Iterator[None]:
    """While Ray starts an embedded cluster inside this block, its node IP is 127.0.0.1.

    Ray 2.60's GCS, raylet and core workers bind loopback only when the node IP *is*
    127.0.0.1 (else ``*``/``::``), and the dashboard and runtime-env agents bind the node
    IP; but ``ray.init(_node_ip_address="127.0.0.1")`` replaces a loopback address by the
    host's outward address.  Ray's single-machine mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
    =0``, the default on Windows and macOS) keeps 127.0.0.1: set here for this process
    and for the processes Ray starts (they inherit the environment), and undone on exit
    in this process so that a later ``ray.init(address=...)`` joins clusters normally.
    The Serve replica's own gRPC server is bound by
    :func:`mendis_ray.distributed.serving.bind_replica_grpc_to_loopback`."""
    from ray._private import ray_constants

    old_env = os.environ.get(_SINGLE_NODE_ENV)
    old_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_SINGLE_NODE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_flag
        if old_env is None:
            os.environ.pop(_SINGLE_NODE_ENV, None)
        else:
            os.environ[_SINGLE_NODE_ENV] = old_env


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
    with contextlib.suppress(ImportError, AttributeError):  # a Ray without that hook
        filter_raylet_notices()
    address = address or os.environ.get("RAY_ADDRESS")
    quiet_ray_env(local=address is None)
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, logging_level="WARNING",
                 log_to_driver=worker_logs_to_driver())  # fmt: skip
    else:
        cpus = num_cpus or max(4, os.cpu_count() or 1)
        log.info(
            "starting a local Ray (%d logical CPUs, %.2f GB object store)",
            cpus, (object_store_memory or 0) / 1e9,
        )  # fmt: skip
        with loopback_node():
            ray.init(
                address="local",
                num_cpus=cpus,
                num_gpus=None,
                object_store_memory=object_store_memory,
                include_dashboard=False,
                logging_level="WARNING",
                runtime_env={"worker_process_setup_hook": quiet_worker_logging},
                _node_ip_address="127.0.0.1",
                log_to_driver=worker_logs_to_driver(),
            )
        _EMBEDDED["started"] = True
        _refuse_open_cluster(ray.util.get_node_ip_address())
    quiet_driver_logging()
    return ray.cluster_resources()


def _refuse_open_cluster(node_ip: str) -> None:
    """The embedded cluster runs without a token only because :func:`loopback_node` keeps
    every listener on 127.0.0.1.  Where a Ray whose internals changed gave it another node
    IP, its ports are reachable from the network and, with ``RAY_AUTH_MODE=disabled``,
    anyone reaching them can run code (ray-notes.md, "Network exposure"): shut it down and
    raise, not warn.  With the caller's own auth mode, a warning."""
    if node_ip == "127.0.0.1":
        return
    if os.environ.get("RAY_AUTH_MODE") == "disabled":
        shutdown_embedded_ray()
        raise RuntimeError(
            f"the embedded Ray's node IP is {node_ip}, not 127.0.0.1: without a token its "
            "ports would be open to the network, so it was shut down. Set RAY_AUTH_MODE=token "
            "(and hand the token to every client) or join a secured cluster with --address."
        )
    log.warning("the embedded Ray's node IP is %s, not 127.0.0.1: its ports are reachable "
                "from the network (RAY_AUTH_MODE=%s)", node_ip,
                os.environ.get("RAY_AUTH_MODE"))  # fmt: skip


def embedded_cluster() -> bool:
    """Whether this process started the Ray it uses (one machine, loopback only)."""
    return _EMBEDDED["started"]


def shutdown_embedded_ray() -> None:
    """Stop the embedded cluster this process started (GCS, raylet, workers, dashboard and
    runtime-env agents): call on Ctrl-C or failure, so nothing is left running or
    listening.  A joined cluster is only disconnected from."""
    import ray

    ours = _ray_descendants()  # before shutdown: the agents re-parent once the raylet exits
    if ray.is_initialized():
        ray.shutdown()
    _EMBEDDED["started"] = False
    _reap(ours, grace_s=5.0)


def _start_time(pid: int) -> str | None:
    """A process's start time (``/proc/PID/stat`` field 22): tells a PID from its reuse."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _ray_descendants() -> dict[int, str]:
    """Ray processes below this one (GCS, raylet, workers, agents): ``{pid: start time}``."""
    found = {}
    for pid in process_tree(os.getpid())[1:]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ")
        except OSError:
            continue
        started = _start_time(pid)
        if b"ray" in cmd and started is not None:
            found[pid] = started
    return found


def _reap(procs: dict[int, str], grace_s: float) -> None:
    """Wait up to ``grace_s`` for ``procs`` to exit, then SIGKILL the ones still there (a
    loaded machine can leave Ray's dashboard and runtime-env agents behind a shutdown)."""
    import signal
    import time

    def alive() -> list[int]:
        return [p for p, t in procs.items() if _start_time(p) == t and not _zombie(p)]

    deadline = time.monotonic() + grace_s
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in alive():
        log.debug("Ray process %d outlived shutdown: killing it", pid)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


# ---------------------------------------------------------------------- exposure checks


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux ``/proc``; ``[pid]`` elsewhere)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return [pid]
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, stack = [pid], [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


def _tcp_listeners() -> dict[str, tuple[str, int]]:
    """socket inode -> (address, port) of every listening TCP socket (v4 and v6)."""
    out: dict[str, tuple[str, int]] = {}
    for path, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            with open(path) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != "0A":  # 0A = LISTEN
                continue
            hex_addr, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_addr)
            # /proc prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            out[fields[9]] = (socket.inet_ntop(family, raw), int(hex_port, 16))
    return out


def listening_sockets(pids: list[int]) -> list[dict]:
    """The listening TCP sockets held by ``pids``, like ``ss -ltnp``: dicts of ``pid``,
    ``process`` (its name), ``address`` and ``port``.  Linux only (``/proc``)."""
    socks = _tcp_listeners()
    out = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            with open(f"/proc/{pid}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        seen = set()
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            inode = link[8:-1] if link.startswith("socket:[") else None
            if inode in socks and inode not in seen:
                seen.add(inode)
                addr, port = socks[inode]
                out.append({"pid": pid, "process": name, "address": addr, "port": port})
    return sorted(out, key=lambda r: (r["process"], r["port"]))


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1 or an IPv4-mapped loopback address (::ffff:127.x.y.z)."""
    import ipaddress

    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback
