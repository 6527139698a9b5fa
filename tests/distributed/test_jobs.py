"""The cluster config validates with Ray's own validator, and a real ``ray job submit``
of ``jobs/train.py`` against a real local head (127.0.0.1) succeeds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_yaml_is_valid_and_safe():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(fillout_defaults(cfg))  # raises on an invalid config
    types = cfg["available_node_types"]
    gpus = sum(t["max_workers"] * t["resources"].get("GPU", 0) for t in types.values()
               if "max_workers" in t)  # fmt: skip
    assert gpus == 16
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # reached through `ray dashboard` only


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A real ``ray start --head`` on 127.0.0.1, stopped by its PID (never ``ray stop``)."""
    if shutil.which("ray") is None:
        pytest.skip("the ray CLI is not on PATH")
    # every port the head opens is a free one: the session's own Ray (conftest) already
    # holds Ray's default agent ports on this host
    port, dash, agent, agent_grpc, metrics, runtime_env = (_free_port() for _ in range(6))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    log = (tmp_path / "head.log").open("w")
    # Ray's socket paths must stay under 107 bytes: a short temp dir, not pytest's
    ray_tmp = tempfile.mkdtemp(prefix="mrh", dir="/tmp")
    proc = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(port), "--num-cpus", "4", "--num-gpus", "0",
         "--object-store-memory", str(500 * 2**20),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--include-dashboard", "true", "--temp-dir", ray_tmp,
         "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port",
         str(agent_grpc), "--metrics-export-port", str(metrics),
         "--runtime-env-agent-port", str(runtime_env)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(
                    f"ray head did not start: {(tmp_path / 'head.log').read_text()[-2000:]}"
                )
            time.sleep(1)
        yield url, env, Path(ray_tmp)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_ray_job_submit_train(ray_head, sim_sets, tmp_path):
    url, env, ray_tmp = ray_head
    out = tmp_path / "job"
    cfg = {
        "train": {
            "args": [str(sim_sets / "train")], "out": str(out / "train"), "model": "flow",
            "preset": "compact",
            "n_units": 1, "hidden": 16, "epochs": 1, "batch_size": 64, "workers": 2,
            "linear_lr_scale": 0.0, "storage": str(out / "runs"),
        }
    }  # fmt: skip
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = [
        "ray", "job", "submit", "--address", url, "--working-dir", str(ROOT),
        "--submission-id", f"mendis-test-{os.getpid()}",
        "--", sys.executable, "jobs/train.py", "--config", str(cfg_path),
    ]  # fmt: skip
    deadline = time.time() + 300  # the head's job agent registers after the dashboard
    while True:  # (seconds on a quiet host; minutes when CI shares 2 cores with a test run)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if "No available agent" not in res.stderr + res.stdout or time.time() > deadline:
            break
        time.sleep(5)
    agent_logs = "".join(
        f"\n--- {p.name}\n" + p.read_text(errors="replace")[-1500:]
        for p in sorted(ray_tmp.glob("session_latest/logs/dashboard_agent*"))
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:] + agent_logs
    from ray.job_submission import JobStatus, JobSubmissionClient

    status = JobSubmissionClient(url).get_job_status(f"mendis-test-{os.getpid()}")
    assert status == JobStatus.SUCCEEDED
    assert "best checkpoint:" in res.stdout
    info = json.loads((out / "train" / "checkpoint" / "config.json").read_text())
    assert info["flow_config"]["n_units"] == 1
