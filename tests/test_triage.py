"""Explained outputs, verdicts and the triage page without Ray (mendis_ray.science.explained,
mendis_ray.triage); the browser tests are in tests/test_triage_browser.py."""

from __future__ import annotations

import json
import multiprocessing as mp
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import fits

from mendis_ray.science.explained import add_verdicts, explain_top, write_outputs
from mendis_ray.spectra.linelist import ELEMENTS
from mendis_ray.spectra.simulate import StellarLabels
from mendis_ray.triage.page import load_triage, render_page, write_page
from mendis_ray.triage.verdicts import (
    VERDICTS_FILE,
    VerdictError,
    merge_into,
    post_verdict,
    read_verdicts,
    record_verdict,
    validate_verdict,
)

EVIL_ID = 'x</script><script>document.title="pwned"</script>&<!--'


def scored_folder(out: Path, sim, n_typical: int = 24, seed: int = 0) -> Path:
    """A scored catalog folder as ``mendis score`` leaves it, built without Ray: giants
    near 4500 K, one Mg-rich star, one C-rich star, one with a spike artefact, one with
    an id that tries to break out of the page's script; ranked by chi^2 to the median."""
    rng = np.random.default_rng(seed)
    n = n_typical + 4
    teff = rng.normal(4500, 40, n)
    logg = rng.normal(2.4, 0.05, n)
    x = np.zeros((n, len(ELEMENTS)))
    x[n_typical, ELEMENTS.index("Mg")] = 0.5
    x[n_typical + 1, ELEMENTS.index("C")] = 0.6
    x[n_typical + 3, ELEMENTS.index("Ni")] = 0.6  # the star with the evil id: an outlier
    lab = StellarLabels(teff, logg, x, np.full(n, 6.0), np.zeros(n))
    flux = sim(lab, dtype=np.float64) + rng.normal(size=(n, sim.grid.n_pix)) / 200
    flux[n_typical + 2, 1000:1003] += 0.8  # a spike: an artefact
    ivar = np.full_like(flux, 200.0**2)
    ivar[:, :40] = 0  # masked pixels
    ids = [f"star{k:03d}" for k in range(n_typical)] + ["mg_rich", "c_rich", "spike", EVIL_ID]
    med = np.median(flux, axis=0)
    chi2 = np.sum((flux - med) ** 2 * ivar, axis=1) / np.sum(ivar > 0, axis=1)
    order = np.argsort(-chi2)
    pct = np.empty(n)
    pct[order] = np.linspace(0, 100, n)
    scores = pa.table({
        "id": ids, "path": ["shard.parquet"] * n, "percentile": pct, "log_p_per_dim": -chi2,
        "flags": pa.array(np.where(np.arange(n) == n_typical + 2, 4, 0), pa.int64()),
        "teff_used": teff, "logg_used": logg, "feh_used": np.zeros(n),
        "sdss_id": pa.array(np.arange(n) + (1 << 55), pa.int64()),
    })  # fmt: skip
    k_top = 6
    top = scores.take(order[:k_top]).append_column("rank", pa.array(np.arange(1, k_top + 1)))
    typ = order[k_top:]
    d = ((flux[order[:k_top], None, :] - flux[None, typ, :]) ** 2 * (ivar[typ] > 0)).sum(axis=2)
    nearest = np.argmin(d, axis=1)
    sel = order[:k_top]
    ex = explain_top(top, flux[sel], ivar[sel], [ids[j] for j in typ], flux[typ], ivar[typ],
                     nearest, sim.grid.wavelength, sim.grid.describe())  # fmt: skip
    summary = {
        "checkpoint": "ckpt",
        "grid": sim.grid.describe(),
        "rows": n,
        "rank_by": "percentile",
    }
    (out / "summary.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary))
    write_outputs(out, ex, scores, sim.grid.wavelength, "wavelength (Angstrom, vacuum)", summary,
                  read_verdicts(out / VERDICTS_FILE))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory, sim) -> Path:
    return scored_folder(tmp_path_factory.mktemp("scored"), sim)


def test_outputs_explain_the_planted_outliers(folder):
    top = pq.read_table(folder / "top_outliers.parquet").to_pylist()
    by_id = {r["id"]: r for r in top}
    assert {"mg_rich", "c_rich", "spike"} <= set(by_id)
    assert by_id["mg_rich"]["top_element"] == "Mg"
    assert by_id["c_rich"]["top_element"] in ("C", "N", "O")  # CN/CO molecules
    spike = pq.read_table(folder / "explain_features.parquet").to_pylist()
    spike = [f for f in spike if f["id"] == "spike"]
    assert spike[0]["depth"] > 0.5 and spike[0]["n_pix"] <= 5  # the emission spike first
    assert spike[0]["kind"] == "emission" and "emission" in by_id["spike"]["explanation"]
    assert EVIL_ID in by_id
    for r in top:
        assert r["ref_id"].startswith("star") and r["explanation"]


def test_fits_outputs_have_every_row_ids_and_documented_flags(folder):
    with fits.open(folder / "scores.fits") as h:
        assert h["SCORES"].header["NSPEC"] == 28 and h["SCORES"].data.shape == (28,)
        assert h["SCORES"].data["SDSS_ID"].dtype.kind == "i"
        assert h["SCORES"].data["SDSS_ID"][0] == 1 << 55
        assert h["SCORES"].header["FLAGBIT2"] == "FLUX_RANGE"
    with fits.open(folder / "top_outliers.fits") as h:
        assert [x.name for x in h] == ["PRIMARY", "TOP_OUTLIERS", "FEATURES", "ELEMENTS"]
        assert "EXPLANATION" in h["TOP_OUTLIERS"].columns.names
        assert (
            len(h["FEATURES"].data) == pq.read_table(folder / "explain_features.parquet").num_rows
        )


def test_verdict_validation_names_the_field():
    ok = validate_verdict({"id": "a", "verdict": "artefact", "note": "sky line"})
    assert ok["verdict"] == "artefact" and ok["updated"].endswith("Z")
    bad = [({"id": "", "verdict": "normal"}, "id"), ({"id": "a", "verdict": "weird"}, "verdict"),
           ({"id": "a", "verdict": "normal", "note": "x" * 2001}, "note"),
           ({"id": "a", "verdict": "normal", "evil": 1}, "evil"), ([1, 2], "body"),
           ({"id": "a", "verdict": "unset"}, "verdict"),
           ({"id": "a", "verdict": "normal", "updated": "yesterday"}, "updated")]  # fmt: skip
    for obj, field in bad:
        with pytest.raises(VerdictError) as err:
            validate_verdict(obj)
        assert err.value.field == field
    with pytest.raises(VerdictError, match="not a spectrum"):
        validate_verdict({"id": "zz", "verdict": "normal"}, known_ids={"a"})


def test_post_verdict_statuses_and_atomic_file(tmp_path):
    ids = {"a", "b"}

    def post(obj, ctype="application/json"):
        return post_verdict(tmp_path, json.dumps(obj).encode(), ctype, ids)

    assert post({"id": "a", "verdict": "interesting"})[0] == 200
    status, body = post({"id": "b", "verdict": "artefact", "note": "ghost"})
    assert status == 200 and body["n"] == 2
    assert post({"id": "a", "verdict": "nope"})[0] == 422
    assert post({"id": "c", "verdict": "normal"})[0] == 422
    assert post({"id": "a", "verdict": "normal"}, "text/plain")[0] == 415
    assert post_verdict(tmp_path, b"{", "application/json", ids)[0] == 400
    assert post_verdict(tmp_path, b" " * 20000, "application/json", ids)[0] == 413
    v = read_verdicts(tmp_path / VERDICTS_FILE)
    assert {k: x["verdict"] for k, x in v.items()} == {"a": "interesting", "b": "artefact"}
    assert v["b"]["note"] == "ghost"
    assert post({"id": "a", "verdict": "unset"})[1]["n"] == 1  # a second click removes it
    assert sorted(p.name for p in tmp_path.iterdir()) == [VERDICTS_FILE, VERDICTS_FILE + ".lock"]


def _writer(args):
    path, k = args
    for j in range(10):
        record_verdict(path, validate_verdict({"id": f"p{k}-{j}", "verdict": "normal"}))


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / VERDICTS_FILE
    with mp.get_context("spawn").Pool(4) as pool:
        pool.map(_writer, [(path, k) for k in range(4)])
    assert len(read_verdicts(path)) == 40


def test_downloaded_json_merges_newer_wins(tmp_path):
    path = tmp_path / VERDICTS_FILE
    record_verdict(path, validate_verdict({"id": "a", "verdict": "normal",
                                           "updated": "2030-01-01T00:00:00Z"}))  # fmt: skip
    doc = {
        "format": "mendis-verdicts-1",
        "verdicts": [
            {"id": "a", "verdict": "artefact", "note": "", "updated": "2020-01-01T00:00:00Z"},
            {"id": "b", "verdict": "interesting", "note": "", "updated": "2031-01-01T00:00:00Z"},
        ],
    }
    (tmp_path / "verdicts.json").write_text(json.dumps(doc))
    merged = merge_into(path, read_verdicts(tmp_path / "verdicts.json"))
    assert {k: v["verdict"] for k, v in merged.items()} == {"a": "normal", "b": "interesting"}
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(VerdictError, match=r"bad\.json"):
        read_verdicts(tmp_path / "bad.json")


def test_verdicts_are_carried_into_tables():
    t = pa.table({"id": ["a", "b"]})
    v = {"b": {"id": "b", "verdict": "artefact", "note": "n", "updated": "2030-01-01T00:00:00Z"}}
    out = add_verdicts(t, v)
    assert out.column("verdict").to_pylist() == [None, "artefact"]
    assert out.column("verdict_note").to_pylist() == [None, "n"]


def test_page_is_self_contained_and_escapes_catalog_text(folder):
    path = write_page(folder)
    html = path.read_text()
    # nothing loaded from elsewhere: no src/href to a URL, no fetch but the verdict API
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "https://" not in html and "http://" not in html
    assert EVIL_ID not in html and "</script><script>" not in html
    assert html.count("</script>") == 2  # the data's and the code's
    assert (
        json.dumps(EVIL_ID)[1:-1]
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        in html
    )  # the id is there, escaped
    data = load_triage(folder)
    assert [s["id"] for s in data["stars"]][:6] == pq.read_table(
        folder / "top_outliers.parquet").column("id").to_pylist()  # fmt: skip
    assert len(data["wavelength"]) == len(data["stars"][0]["flux"])
    assert data["stars"][0]["flux"][0] is None  # a masked pixel
    served = render_page(data, api="/triage/verdicts")
    assert 'data-api="/triage/verdicts"' in served


def test_load_triage_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"top_outliers\.parquet"):
        load_triage(tmp_path)
