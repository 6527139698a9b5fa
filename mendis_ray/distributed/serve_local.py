"""``mendis serve CHECKPOINT``: the scoring application on a local Ray (or a cluster's,
``--address``), Serve's HTTP proxy on ``host:port`` (127.0.0.1 by default), blocking
until Ctrl-C or SIGTERM, then Serve and the embedded cluster stopped.  The application is
:func:`mendis_ray.distributed.serving.build_app`'s.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from typing import Any

import numpy as np
from ray import serve

from mendis_ray.cli_options import SERVE_SCORE_FIELDS
from mendis_ray.distributed.serving import build_app

__all__ = ["main_serve"]

log = logging.getLogger("mendis_ray.distributed.serving")


#: ``mendis serve`` options passed on to :func:`build_app` when given
_CLI_ARGS = (
    "batch_size",
    "batch_wait_timeout_s",
    "device",
    "num_cpus",
    "num_gpus",
    "num_threads",
    "num_replicas",
    "max_request_bytes",
    "max_spectra",
    "max_marginal",
    "triage",
    *SERVE_SCORE_FIELDS,
)


def main_serve(args: argparse.Namespace) -> int:
    """``mendis serve CHECKPOINT``: a local Ray (or ``--address``), Serve on
    ``host:port`` (127.0.0.1 by default) with one replica using every core, blocking until
    Ctrl-C."""
    a = vars(args)
    app_args: dict[str, Any] = {"checkpoint": a["checkpoint"]}
    app_args.update({k: a[k] for k in _CLI_ARGS if a.get(k) is not None})
    app_args.setdefault("num_replicas", 1)  # one replica using every core of this machine
    app_args.setdefault("num_cpus", float(os.cpu_count() or 1))
    application = build_app(app_args)  # validates before Ray starts
    host, port = a.get("host") or "127.0.0.1", int(a.get("port") or 8000)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding to %s: anyone who reaches it can use the endpoint", host)

    from mendis_ray.distributed.session import ensure_ray, shutdown_embedded_ray

    def _stop(signum: int, frame: Any) -> None:  # SIGTERM (docker stop, systemd): as Ctrl-C
        raise KeyboardInterrupt

    try:
        ensure_ray(a.get("address"), num_cpus=max(4, int(np.ceil(app_args["num_cpus"]))))
        signal.signal(signal.SIGTERM, _stop)  # after Ray, which installs its own handler
        serve.start(http_options={"host": host, "port": port})
        serve.run(application, name="mendis", route_prefix="/")
        url = f"http://{host}:{port}"
        print(f"mendis serve: scoring {a['checkpoint']} at {url}/score (docs {url}/docs); "
              "Ctrl-C stops")  # fmt: skip
        if app_args.get("triage"):
            print(f"mendis serve: triage page of {app_args['triage']} at {url}/triage")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("mendis serve: stopping")
    finally:
        # Serve's actors, then the embedded cluster (GCS, raylet, agents) by this process:
        # nothing of it is left running or listening.
        import ray

        try:
            if ray.is_initialized():
                serve.shutdown()
        except Exception as err:  # Ray already gone: nothing to stop
            log.debug("serve.shutdown: %s", err)
        shutdown_embedded_ray()
    return 0
