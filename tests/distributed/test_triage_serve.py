"""The triage page served by the Ray Serve app at /triage (``mendis serve --triage DIR``):
headless Chromium loads it, a real click marks a verdict, and the verdict lands in
DIR/verdicts.parquet; the verdict endpoint validates and bounds its input."""

from __future__ import annotations

import json
import time

import pyarrow.parquet as pq
import pytest
from browser import chromium_or_skip
from test_triage import scored_folder

from distributed.test_serve import Client, _free_port
from mendis_ray.triage.verdicts import VERDICTS_FILE


@pytest.fixture(scope="module")
def triage_server(ray_session, checkpoint, tmp_path_factory):
    """Serve on 127.0.0.1 with the flow checkpoint and a scored folder at /triage."""
    from ray import serve

    from mendis_ray.distributed.serving import build_app
    from mendis_ray.spectra.simulate import Simulator

    folder = scored_folder(tmp_path_factory.mktemp("scored"), Simulator())
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        app = build_app({"checkpoint": str(checkpoint), "num_replicas": 1, "num_cpus": 0.5,
                         "triage": str(folder)})  # fmt: skip
        serve.run(app, name="mendis-triage", route_prefix="/")
        yield Client(port), folder
    finally:
        serve.shutdown()


def test_build_app_refuses_a_folder_that_was_not_scored(checkpoint, tmp_path):
    from mendis_ray.distributed.serving import build_app

    with pytest.raises(ValueError, match=r"triage: .*top_outliers"):
        build_app({"checkpoint": str(checkpoint), "triage": str(tmp_path)})


def test_default_label_free_mode_is_score_configs(triage_server):
    """A server deployed without ``marginal`` scores an unlabelled spectrum label-free
    when the request does not say, as ``mendis score`` does (ScoreConfig's default)."""
    from mendis_ray.config import ScoreConfig

    client, _ = triage_server
    want = ScoreConfig().marginal
    info = json.loads(client.request("GET", "/model")[1])
    assert info["limits"]["marginal"] == want == "unlabelled"
    n_pix = info["grid"]["n_pix"]
    status, out = client.post({"spectra": [{"id": "a", "flux": [1.0] * n_pix}]})
    assert status == 200 and out["marginal"] == want, out
    (r,) = out["results"]
    assert r["labelled"] is False and r["log_p_marginal"] is not None, r


def test_verdict_endpoint_validates_and_bounds_input(triage_server):
    client, folder = triage_server
    status, body = client.request("GET", "/triage")
    assert status == 200 and b'data-api="triage/verdicts"' in body

    def post(obj, ctype="application/json"):
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        status, out = client.request("POST", "/triage/verdicts", data, ctype)
        return status, json.loads(out)

    assert post({"id": "mg_rich", "verdict": "maybe"})[0] == 422
    assert post({"id": "not-on-the-page", "verdict": "normal"})[0] == 422
    assert post({"id": "mg_rich", "verdict": "normal"}, "text/plain")[0] == 415
    status, out = post(b"x" * 100_000)
    assert status == 413 and "x" * 10 not in json.dumps(out)  # never echoed
    assert not (folder / VERDICTS_FILE).exists()  # nothing written by bad requests


def test_served_page_click_saves_verdict_file(triage_server, tmp_path):
    client, folder = triage_server
    browser = chromium_or_skip(tmp_path)
    try:
        browser.open(f"http://127.0.0.1:{client.port}/triage")
        ids = browser.eval("[...document.querySelectorAll('#list li')].map(e => e.dataset.id)")
        i = ids.index("spike")
        browser.click(f'#list li[data-index="{i}"]')
        browser.eval("document.getElementById('note').value = 'one-pixel spike: cosmic ray?'")
        browser.click('.verdict[data-verdict="artefact"]')
        browser.wait_for("document.body.dataset.saved === '1'")
        assert "saved: 1 verdict(s)" in browser.eval(
            "document.getElementById('save-status').textContent"
        )
        rows = pq.read_table(folder / VERDICTS_FILE).to_pylist()
        assert [(r["id"], r["verdict"], r["note"]) for r in rows] == [
            ("spike", "artefact", "one-pixel spike: cosmic ray?")]  # fmt: skip
        # a reload shows the saved verdict
        browser.open(f"http://127.0.0.1:{client.port}/triage")
        browser.click(f'#list li[data-index="{i}"]')
        assert (
            browser.eval("document.querySelector('.verdict.active').dataset.verdict") == "artefact"
        )
        # clicking the active verdict again removes it
        browser.click('.verdict[data-verdict="artefact"]')
        browser.wait_for("document.body.dataset.saved === '0'")
        deadline = time.monotonic() + 10
        while pq.read_table(folder / VERDICTS_FILE).num_rows and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pq.read_table(folder / VERDICTS_FILE).num_rows == 0
    finally:
        browser.close()
