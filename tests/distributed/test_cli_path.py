"""The astronomer's path through the command line, as a user runs it, on fresh folders
(issue 12): ``mendis simulate`` -> ``mendis train`` (both model kinds) -> ``mendis score``
-> ``mendis serve``, each command its own process (its own embedded Ray).  Every checkpoint
that training writes must carry the scorer's reference, so the catalog scores and the
served scores have finite percentiles; the console of every command must be quiet (no
deprecation warnings, no raylet warnings, no progress-bar escape sequences); the Ray Train
run folder lives under ``--out`` and keeps only the checkpoint a resume needs."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mendis_ray.spectra.shards import read_dataset, table_arrays

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
#: what must never reach a user's console
NOISE = (
    re.compile(r"DeprecationWarning|FutureWarning|UserWarning"),
    re.compile(r"\x1b\["),  # terminal escape sequences (progress bars, colours)
    re.compile(r"WARNING.*raylet|raylet.*WARNING", re.I),
    re.compile(r"\(raylet\)|\(pid=\d+\)|\(\w+ pid=\d+\)"),  # worker log lines forwarded
    re.compile(r"Traceback"),
)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def mendis(*args: str, cwd: Path, timeout: float = 900) -> str:
    """Run ``mendis ARGS`` as a user would; return its console (stdout + stderr)."""
    p = subprocess.run([sys.executable, "-m", "mendis_ray.cli", *args], cwd=cwd, env=_env(),
                       capture_output=True, text=True, timeout=timeout)  # fmt: skip
    console = p.stdout + p.stderr
    assert p.returncode == 0, f"mendis {' '.join(args)} exited {p.returncode}:\n{console}"
    return console


def assert_quiet(console: str, what: str) -> None:
    for pattern in NOISE:
        hit = pattern.search(console)
        assert hit is None, f"{what}: {pattern.pattern!r} on the console:\n{console[-3000:]}"


@pytest.fixture(scope="module")
def path_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("astronomer")  # the user's current directory
    consoles = {}
    consoles["simulate"] = mendis(
        "simulate", "--population", "survey", "--out", "data", "--n-train", "700",
        "--n-test", "40", "--n-outlier", "10", "--shards", "2", "--no-figures", cwd=work,
    )  # fmt: skip
    consoles["train flow"] = mendis(
        "train", "data/train", "--out", "flow", "--model", "flow", "--n-units", "1",
        "--hidden", "16", "--epochs", "2", "--batch-size", "64", "--workers", "1",
        "--no-label-scatter", cwd=work,
    )  # fmt: skip
    consoles["train signal"] = mendis(
        "train", "data/train", "--out", "signal", "--k", "4", "--n-units", "2", "--hidden",
        "16", "--epochs", "3", "--quiet", cwd=work,
    )  # fmt: skip
    for kind in ("flow", "signal"):
        consoles[f"score {kind}"] = mendis(
            "score", f"{kind}/checkpoint", "data/test", "data/binary", "--out",
            f"scores_{kind}", "--max-actors", "1", "--cpus-per-actor", "0.5", "--batch-size",
            "32", "--gallery-n", "2", "--marginal", "all", cwd=work,
        )  # fmt: skip
    return work, consoles


def test_every_command_runs_on_fresh_folders_with_a_quiet_console(path_run):
    work, consoles = path_run
    for what, console in consoles.items():
        assert_quiet(console, what)
    assert not (work / "mendis_out").exists()  # nothing written outside the --out folders


def test_train_writes_its_ray_run_under_out_keeping_one_checkpoint(path_run):
    """Before: Ray Train runs went to ./mendis_out/ray_runs whatever --out said, with two
    checkpoints (weights + optimizer state + best weights each) per run."""
    work, _ = path_run
    runs = list((work / "flow" / "ray_runs").iterdir())
    assert len(runs) == 1
    ckpts = sorted(p for p in runs[0].glob("checkpoint_*") if p.is_dir())
    assert len(ckpts) == 1, ckpts
    state = json.loads((ckpts[0] / "state.json").read_text())
    assert state["epoch"] == 1  # the last epoch: what --resume continues from


@pytest.mark.parametrize("kind", ["flow", "signal"])
def test_catalog_scores_have_finite_percentiles(path_run, kind):
    """Before: `mendis train --model flow` wrote no scoring reference: NaN percentiles,
    NaN signal scores, no range flags."""
    work, _ = path_run
    t = pq.read_table(work / f"scores_{kind}" / "scores")
    assert t.num_rows == 40 + 10
    for col in ("percentile", "signal_percentile", "signal_score"):
        v = t.column(col).to_numpy(zero_copy_only=False).astype(float)
        assert np.isfinite(v).all(), f"{kind}: {col} has {np.isnan(v).sum()} NaN"
    info = json.loads((work / kind / "checkpoint" / "config.json").read_text())
    if kind == "flow":
        assert "improved" in info["metrics"] and "diverged" in info["metrics"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/score", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def _wait_ready(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(1.0)
    raise AssertionError("mendis serve did not become ready")


@pytest.mark.parametrize("kind", ["flow", "signal"])
def test_mendis_serve_gives_finite_percentiles(path_run, kind):
    work, _ = path_run
    test = table_arrays(read_dataset(work / "data" / "test"))
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mendis_ray.cli", "serve", f"{kind}/checkpoint", "--port",
         str(port), "--num-cpus", "1"],
        cwd=work, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        _wait_ready(port, proc)
        spectra = [{"id": str(test.ids[i]), "flux": test.flux[i].tolist(),
                    "ivar": test.ivar[i].tolist(),
                    **dict(zip(("teff", "logg", "feh"), map(float, test.labels[i]), strict=True))}
                   for i in range(3)]  # fmt: skip
        spectra.append({"id": "unlabelled", "flux": test.flux[3].tolist(),
                        "ivar": test.ivar[3].tolist()})  # fmt: skip
        status, out = _post(port, {"spectra": spectra, "marginal": "unlabelled"})
        assert status == 200, out
        for r in out["results"]:
            assert r["percentile"] is not None and np.isfinite(r["percentile"]), r
            assert r["signal_percentile"] is not None and np.isfinite(r["signal_percentile"]), r
    finally:
        proc.send_signal(signal.SIGTERM)
        console, _ = proc.communicate(timeout=60)
    assert_quiet(console, f"serve {kind}")
