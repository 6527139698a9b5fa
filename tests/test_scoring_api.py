"""The scoring endpoint's request schema, body parsers and response rows, without Ray."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mendis_ray import scoring_api as sa
from mendis_ray.science.flags import Flag
from mendis_ray.spectra.grid import paper_grid
from mendis_ray.spectra.shards import _with_metadata, make_table

N_PIX = 6
GRID = {"name": "toy", "n_pix": N_PIX, "hash": "0123456789abcdef"}


def spectrum(i: int = 0, labels: bool = True, ivar: bool = True) -> dict:
    s: dict = {"id": f"s{i}", "flux": [1.0 + 0.01 * (i + k) for k in range(N_PIX)]}
    if ivar:
        s["ivar"] = [100.0] * (N_PIX - 1) + [0.0]
    if labels:
        s.update(teff=4400.0 + i, logg=2.0, feh=-0.1)
    return s


def parse(body: bytes | dict, kind: str = "json", **kw) -> sa.ParsedRequest:
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    return sa.parse_body(body, kind, n_pix=N_PIX, model_grid=GRID, **kw)


def bad(body: bytes | dict, kind: str = "json", **kw) -> sa.RequestError:
    with pytest.raises(sa.RequestError) as info:
        parse(body, kind, **kw)
    return info.value


# ---------------------------------------------------------------------- JSON


def test_json_many_and_single_forms():
    req = parse({"spectra": [spectrum(0), spectrum(1, labels=False, ivar=False)]})
    assert req.flux.shape == (2, N_PIX) and req.flux.dtype == np.float64
    assert req.ids == ["s0", "s1"]
    np.testing.assert_array_equal(req.ivar[0], [100.0] * 5 + [0.0])
    np.testing.assert_array_equal(req.ivar[1], np.ones(N_PIX))  # omitted = all good
    np.testing.assert_array_equal(req.labels[0], [4400.0, 2.0, -0.1])
    assert np.isnan(req.labels[1]).all()
    assert req.labelled.tolist() == [True, False] and req.marginal == "unlabelled"  # default

    one = parse(spectrum(3))
    assert len(one) == 1 and one.ids == ["s3"]
    np.testing.assert_array_equal(one.flux[0], spectrum(3)["flux"])


def test_json_partial_labels_are_unlabelled_and_int_ids_become_strings():
    s = spectrum(0, labels=False)
    s.update(teff=4400.0, id=7)
    req = parse({"spectra": [s]})
    assert req.labelled.tolist() == [False] and req.ids == ["7"]


def test_json_marginal_from_body_or_query():
    s = spectrum(0, labels=False)
    assert parse(s, marginal="unlabelled").marginal == "unlabelled"
    assert parse({**s, "marginal": "none"}, marginal="unlabelled").marginal == "none"
    assert parse(s).marginal == "unlabelled"  # ScoreConfig's default, as mendis score's


@pytest.mark.parametrize(
    ("body", "status", "field", "words"),
    [
        ({"spectra": [{**spectrum(), "flux": [1.0] * (N_PIX - 1)}]}, 422, "spectra[0].flux",
         "at least 6"),
        ({**spectrum(), "flux": [1.0] * (N_PIX + 1)}, 422, "flux", "at most 6"),
        ({"spectra": [{"id": "a"}]}, 422, "spectra[0].flux", "required"),
        ({}, 422, "spectra", "required"),
        ({"spectra": []}, 422, "spectra", "at least 1"),
        ({"spectra": [spectrum()] * 5}, 422, "spectra", "at most 4"),
        ({**spectrum(), "ivar": [-1.0] * N_PIX}, 422, "ivar[0]", "greater than or equal"),
        ({**spectrum(), "flux": [1e39] * N_PIX}, 422, "flux[0]", "float32"),
        ({**spectrum(), "teff": 1e300}, 422, "teff", "float32"),
        ({**spectrum(), "teff": "hot"}, 422, "teff", "number"),
        ({**spectrum(), "fluxes": [1.0]}, 422, "(unknown field)", "not permitted"),
        ({**spectrum(), "marginal": "all"}, 422, "marginal", "'none' or 'unlabelled'"),
        ({**spectrum(), "grid": "other"}, 422, "grid", "not the model's grid"),
        ({**spectrum(), "id": "x" * 300}, 422, "id", "at most 256"),
        ([1, 2], 422, "body", "object"),
    ],
)  # fmt: skip
def test_json_errors_name_the_field(body, status, field, words):
    err = bad(json.dumps(body).encode(), max_spectra=4)
    assert (err.status, err.field) == (status, field), err
    assert words in err.message
    assert err.to_dict() == {"error": f"{field}: {err.message}", "field": field}


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e400", "-1e999", "9" * 400])
def test_json_non_finite_and_huge_numbers(token):
    text = json.dumps(spectrum()).replace("1.05", token, 1)
    err = bad(text.encode())
    assert err.status == 422 and err.field == "flux[5]"


@pytest.mark.parametrize("body", [b"", b"{", b"not json", b"\xff\xfe\x00", b"[" * 5000])
def test_json_unreadable_is_400(body):
    err = bad(body)
    assert err.status in (400, 422) and err.field == "body"


def test_errors_never_echo_the_input():
    secret = "SECRET" * 50
    body = {"spectra": [{**spectrum(), "flux": [secret] * N_PIX}]}
    err = bad(body)
    assert "SECRET" not in err.message and len(err.message) <= 300
    many = {"spectra": [{**spectrum(), "flux": ["x"] * N_PIX}] * 3}
    assert "more error(s)" in bad(many).message


def test_grid_check_by_hash_or_name():
    assert len(parse(spectrum(), grid=GRID["hash"])) == 1
    assert len(parse({**spectrum(), "grid": "toy"})) == 1
    err = bad(spectrum(), grid="0000")
    assert err.status == 422 and err.field == "grid" and GRID["hash"] in err.message
    sa.check_grid(GRID, {"name": "toy", "n_pix": N_PIX, "hash": GRID["hash"]}, "g")
    with pytest.raises(sa.RequestError, match="not the model's grid"):
        sa.check_grid(GRID, {"name": "x", "n_pix": 5, "hash": "zz"}, "g")


def test_marginal_is_bounded():
    body = {"spectra": [spectrum(i, labels=False) for i in range(3)], "marginal": "unlabelled"}
    err = bad(body, max_marginal=2)
    assert err.status == 422 and err.field == "marginal" and "at most 2" in err.message
    assert parse(body, max_marginal=3).marginal == "unlabelled"
    labelled = {"spectra": [spectrum(i) for i in range(3)], "marginal": "unlabelled"}
    assert len(parse(labelled, max_marginal=0)) == 3  # labelled rows need no optimisation


@pytest.mark.parametrize(
    ("ctype", "kind"),
    [
        ("application/json", "json"),
        ("Application/JSON; charset=utf-8", "json"),
        ("application/vnd.apache.arrow.stream", "arrow_stream"),
        ("application/vnd.apache.arrow.file", "arrow_file"),
        ("application/x-parquet", "parquet"),
        ("application/vnd.apache.parquet", "parquet"),
    ],
)
def test_body_kind(ctype, kind):
    assert sa.body_kind(ctype) == kind


@pytest.mark.parametrize("ctype", [None, "", "text/plain", "application/jsonx", "multipart/x"])
def test_body_kind_415(ctype):
    with pytest.raises(sa.RequestError) as info:
        sa.body_kind(ctype)
    assert info.value.status == 415 and info.value.field == "Content-Type"
    assert "application/json" in info.value.message


# ---------------------------------------------------------------------- Arrow / Parquet


def toy_table(n: int = 4, n_pix: int = N_PIX, meta_grid=None) -> pa.Table:
    rng = np.random.default_rng(0)
    flux = 1 + 0.01 * rng.standard_normal((n, n_pix))
    ivar = np.full((n, n_pix), 1e4)
    teff = np.full(n, 4400.0)
    teff[-1] = np.nan
    t = make_table([f"r{i}" for i in range(n)], flux, ivar, teff=teff, logg=np.full(n, 2.0),
                   feh=np.zeros(n), snr=np.full(n, 100.0))  # fmt: skip
    if meta_grid is not None:
        t = _with_metadata(t, meta_grid, {"kind": "test"})
    return t


def encode(table: pa.Table, kind: str) -> bytes:
    if kind == "parquet":
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return buf.getvalue()
    sink = pa.BufferOutputStream()
    new = pa.ipc.new_stream if kind == "arrow_stream" else pa.ipc.new_file
    with new(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


@pytest.mark.parametrize("kind", ["arrow_stream", "arrow_file", "parquet"])
def test_binary_bodies(kind):
    t = toy_table()
    req = parse(encode(t, kind), kind, marginal="none")
    assert req.ids == ["r0", "r1", "r2", "r3"]
    want = np.stack(t.column("flux").to_numpy(zero_copy_only=False)).astype(np.float64)
    np.testing.assert_array_equal(req.flux, want)
    assert req.labelled.tolist() == [True, True, True, False]  # null teff = unlabelled
    np.testing.assert_array_equal(req.ivar, 1e4)


def test_binary_minimal_and_variable_lists_and_null_ivar_rows():
    flux = pa.array([[1.0] * N_PIX, [2.0] * N_PIX], type=pa.list_(pa.float64()))
    ivar = pa.array([[4.0] * N_PIX, None], type=pa.list_(pa.float32()))
    req = parse(encode(pa.table({"flux": flux, "ivar": ivar}), "arrow_stream"), "arrow_stream")
    assert req.ids == [None, None] and not req.labelled.any()
    np.testing.assert_array_equal(req.ivar, [[4.0] * N_PIX, [1.0] * N_PIX])


def test_shard_metadata_grid_must_match():
    grid = paper_grid()  # 2405 px, not the toy model's grid
    body = encode(toy_table(n_pix=grid.n_pix, meta_grid=grid), "parquet")
    err = bad(body, "parquet")
    assert err.status == 422 and err.field == "metadata.grid" and "'toy'" in err.message
    assert "paper" not in err.message  # the body's own grid is not echoed
    ok = sa.parse_body(body, "parquet", n_pix=grid.n_pix, model_grid=grid.describe())
    assert len(ok) == 4


@pytest.mark.parametrize(
    ("table", "field", "words"),
    [
        (pa.table({"ivar": pa.array([[1.0] * N_PIX])}), "flux", "missing column"),
        (pa.table({"flux": pa.array([[1.0] * (N_PIX - 1)])}), "flux[0]", "5 values"),
        (pa.table({"flux": pa.array([[1.0] * N_PIX, None])}), "flux[1]", "null"),
        (pa.table({"flux": pa.array([[1.0] * (N_PIX - 1) + [np.nan]])}), "flux[0][5]", "finite"),
        (pa.table({"flux": pa.array([[1.0] * (N_PIX - 1) + [None]])}), "flux[0][5]", "null"),
        (pa.table({"flux": pa.array(["abc"])}), "flux", "list of numbers"),
        (pa.table({"flux": pa.array([["a"] * N_PIX])}), "flux", "numbers"),
        (pa.table({"flux": pa.array([[1.0] * N_PIX]), "ivar": pa.array([[-1.0] * N_PIX])}),
         "ivar[0][0]", "negative"),
        (pa.table({"flux": pa.array([[1.0] * N_PIX]), "teff": pa.array(["hot"])}), "teff",
         "numeric"),
        (pa.table({"flux": pa.array([[1.0] * N_PIX]), "teff": pa.array([np.inf])}), "teff[0]",
         "infinite"),
        (pa.table({"flux": pa.array([[1.0] * N_PIX]), "id": pa.array([[1]])}), "id", "strings"),
        (pa.table({"flux": pa.array([], type=pa.list_(pa.float32()))}), "spectra", "no rows"),
        (pa.table({"flux": pa.array([[1.0] * N_PIX] * 5)}), "spectra", "more than 4"),
    ],
)  # fmt: skip
def test_binary_errors_name_column_and_row(table, field, words):
    for kind in ("arrow_stream", "parquet"):
        err = bad(encode(table, kind), kind, max_spectra=4)
        assert (err.status, err.field) == (422, field), (kind, err)
        assert words in err.message


@pytest.mark.parametrize("kind", ["arrow_stream", "arrow_file", "parquet"])
def test_corrupt_binary_is_400(kind):
    good = encode(toy_table(), kind)
    for body in (b"", b"garbage" * 10, good[: len(good) // 2], json.dumps(spectrum()).encode()):
        err = bad(body, kind)
        assert err.status in (400, 422) and err.field in ("body", "spectra"), err


def test_json_body_sent_as_arrow_and_vice_versa():
    assert bad(json.dumps(spectrum()).encode(), "arrow_stream").status == 400
    assert bad(encode(toy_table(), "arrow_stream"), "json").status == 400


# ---------------------------------------------------------------------- responses


def test_results_to_json_nulls_and_flag_names():
    n = 3
    nan = np.nan
    scores = {
        "log_p": np.array([-10.0, nan, -np.inf]),
        "log_p_marginal": np.array([nan, -12.0, nan]),
        "labels_used": np.array([[4400.0, 2.0, 0.0], [4300.0, 1.9, -0.1], [nan, nan, nan]]),
        "log_p_per_dim": np.array([-1.0, -1.2, nan]),
        "signal_score": np.array([1.0, 2.0, nan]),
        "percentile": np.array([50.0, 10.0, nan]),
        "signal_percentile": np.array([40.0, nan, nan]),
        "log_ratio_gaussian": np.array([0.5, 0.1, nan]),
        "masked_fraction": np.array([0.0, 0.5, 0.0]),
        "flags": np.array([0, Flag.MASKED | Flag.FLUX_RANGE, 0]),
    }
    rows = sa.results_to_json(scores, ["a", "2", None], np.array([True, False, True]))
    assert len(rows) == n
    assert rows[0]["log_p"] == -10.0 and rows[0]["flags"] == [] and rows[0]["labelled"] is True
    assert rows[1]["log_p"] is None and rows[1]["log_p_marginal"] == -12.0
    assert rows[1]["flags"] == ["masked", "flux_range"] and rows[1]["flag_bits"] == 6
    assert rows[1]["labels_used"] == {"teff": 4300.0, "logg": 1.9, "feh": -0.1}
    assert rows[2]["log_p"] is None and rows[2]["labels_used"]["teff"] is None
    assert [r["id"] for r in rows] == ["a", "2", None] and [r["index"] for r in rows] == [0, 1, 2]
    text = sa.dumps({"results": rows})  # strict JSON: no NaN tokens
    assert b"NaN" not in text and b"Infinity" not in text
    resp = sa.ScoreResponse.model_validate({"n": n, "grid": "h", "marginal": "none",
                                           "results": json.loads(text)["results"]})  # fmt: skip
    assert resp.results[1].flags == ["masked", "flux_range"]


def test_openapi_request_body_lists_every_content_type():
    body = sa.openapi_request_body(max_spectra=10)
    assert set(body["content"]) == {sa.JSON, sa.ARROW_STREAM, sa.ARROW_FILE, sa.PARQUET}
    text = json.dumps(body)
    assert "$defs" not in text and "#/$defs" not in text
    many = body["content"][sa.JSON]["schema"]["oneOf"][0]
    assert many["properties"]["spectra"]["maxItems"] == 10
