"""The README's astronomer path ("Your catalog: train, score, triage"), run as written:
simulate a small survey, train, score a catalog with --html, serve the triage page and
save a verdict through it (a free port is added to `mendis serve`)."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from astropy.io import fits

from distributed.test_serve import _free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Your catalog: train, score, triage", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)\n```", section, flags=re.S)[1]
    return [line.strip() for line in block.splitlines() if line.strip()]


def _argv(cmd: str) -> list[str]:
    words = shlex.split(cmd)
    assert words[0] == "mendis", cmd
    return [sys.executable, "-m", "mendis_ray.cli", *words[1:]]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except OSError:
        return 0, b""


def test_readme_path_train_score_triage(tmp_path):
    cmds = readme_commands()
    assert [shlex.split(c)[1] for c in cmds] == ["simulate", "train", "score", "serve"]
    for cmd in cmds[:3]:
        done = subprocess.run(_argv(cmd), cwd=tmp_path, capture_output=True, text=True,
                              timeout=1800)  # fmt: skip
        assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    out = tmp_path / "scores"
    assert "triage page:" in done.stdout and (out / "triage.html").exists()
    with fits.open(out / "scores.fits") as h:
        assert len(h["SCORES"].data) == 300 + 3 * 20
    top = pq.read_table(out / "top_outliers.parquet").to_pylist()
    assert len(top) == 40 and all(r["explanation"] for r in top)
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")  # a file: a full pipe would block the server
    serve = subprocess.Popen([*_argv(cmds[3]), "--port", str(port)], cwd=tmp_path,
                             stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while (status := _get(f"http://127.0.0.1:{port}/triage")[0]) != 200:
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the triage page never answered"
            time.sleep(2)
        body = json.dumps({"id": top[0]["id"], "verdict": "interesting"}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/triage/verdicts", data=body,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200 and json.load(r)["n"] == 1
        rows = pq.read_table(out / "verdicts.parquet").to_pylist()
        assert [(r["id"], r["verdict"]) for r in rows] == [(top[0]["id"], "interesting")]
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(120)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait(30)
        log.close()
    assert status == 200
