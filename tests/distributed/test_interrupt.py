"""Ctrl-C of ``mendis score`` mid-run (issue 14): the embedded Ray it started (GCS,
raylet, workers, dashboard and runtime-env agents) stops with it, nothing of it keeps
listening, and the --out folder it made is removed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mendis_ray.distributed.session import listening_sockets, process_tree

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def test_ctrl_c_of_mendis_score_leaves_nothing_running(checkpoint, sim_sets, tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "mendis_ray.cli", "score", str(checkpoint),
           str(sim_sets / "test"), "--out", str(out), "--num-cpus", "4",
           "--cpus-per-actor", "0.5", "--gallery-n", "0"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal
    )  # fmt: skip
    seen: set[int] = set()
    try:
        # wait until the embedded Ray is up (its GCS listens), then press Ctrl-C
        deadline = time.time() + 90
        while time.time() < deadline and proc.poll() is None:
            tree = process_tree(proc.pid)
            seen.update(tree)
            if any(r["process"] == "gcs_server" for r in listening_sockets(tree)):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(1.0)
        seen.update(process_tree(proc.pid))
        os.kill(proc.pid, signal.SIGINT)
        rc = proc.wait(60)
        err = proc.stderr.read().decode()
        assert rc == 130, err[-2000:]
        assert "interrupted" in err
        # Ray's own processes exit within a few seconds of a clean shutdown
        deadline = time.time() + 15
        while time.time() < deadline and _alive(sorted(seen - {proc.pid})):
            time.sleep(0.5)
        left = _alive(sorted(seen - {proc.pid}))
        assert not left, [(p, Path(f"/proc/{p}/comm").read_text().strip()) for p in left]
        assert not out.exists()
    finally:
        for pid in _alive(sorted(seen)):  # clean up after a failure, by PID
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def test_a_swallowed_ctrl_c_removes_the_out_folder(tmp_path, monkeypatch):
    """The run finished writing, but Ctrl-C was pressed (and swallowed) on the way: the
    folder it made does not stay as if the run had counted, and Ray is stopped."""
    from mendis_ray import interrupt
    from mendis_ray.distributed import session
    from mendis_ray.distributed.infer import _removed_on_failure

    stopped = []  # not the test session's Ray: record the call instead
    monkeypatch.setattr(session, "shutdown_embedded_ray", lambda: stopped.append(1))
    out = tmp_path / "out"
    with interrupt.catching(), pytest.raises(KeyboardInterrupt):
        with _removed_on_failure(out):
            out.mkdir()
            (out / "summary.json").write_text("{}")
            _swallow()
    assert not out.exists() and stopped == [1]


def _swallow() -> None:
    class Eats:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)

    Eats()
