"""Issue 14 regressions without Ray: a spectrum the model cannot score is flagged and
ranked most outlying (never an exception, never typical), its batch companions keep their
scores; checkpoints are validated at load; Parquet bodies are bounded before decoding; the
request parser is strict and never reflects client input."""

from __future__ import annotations

import io
import json
import resource

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tiny_case import CFG, GRID, N_PIX, _data, one_torch_thread  # noqa: F401 (fixture)

from mendis_ray import scoring_api as sa
from mendis_ray.flow.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mendis_ray.flow.density import SpectrumDensity, Standardizer
from mendis_ray.flow.gaussian_init import initialize_whitened
from mendis_ray.flow.model import MendisFlow
from mendis_ray.parquet_guard import (
    decode_struct,
    encode_struct,
    parquet_bounds,
    read_footer,
    write_footer,
)
from mendis_ray.science.baselines import GaussianBaseline
from mendis_ray.science.flags import Flag
from mendis_ray.science.ood import BATCH_TOLERANCE, Scorer


@pytest.fixture(scope="module")
def scorer() -> tuple[Scorer, np.ndarray, np.ndarray]:
    """A float32 flow (as served) at the Gaussian of the data, with a reference and a
    Gaussian baseline (whose Mahalanobis distance raised on +-3e38 before the fix)."""
    flux, labels = _data(1500)
    std = Standardizer.fit(flux, labels)
    x = std.transform(flux, labels).astype(np.float64)
    gauss = GaussianBaseline().fit(x)
    flow = MendisFlow(CFG)
    initialize_whitened(flow, torch.from_numpy(x).float(), gauss.covariance_)
    flow.eval()
    density = SpectrumDensity(flow, std, CFG, GRID)
    sc = Scorer.fit(density, flux[:300], labels[:300], n_signal=2, n_marginal=4, gaussian=gauss,
                    profile_steps=20)  # fmt: skip
    return sc, flux[300:], labels[300:]


def test_poison_rows_are_flagged_and_do_not_touch_their_companions(scorer):
    sc, flux, labels = scorer
    f, lab = flux[:8].copy(), labels[:8].copy()
    ivar = np.ones_like(f)
    f[1] = 3e38  # finite float32, squares overflow
    f[2] = -3e38
    f[3, :4] = 3e38
    ivar[4] = 0.0  # every pixel masked
    out = sc.score(f, ivar, lab, marginal="none")  # raised ValueError before the fix
    bad = [1, 2, 3, 4]
    assert (out["flags"][bad] & Flag.UNSCORABLE).all()
    assert out["flag_unscorable"].tolist() == [i in bad for i in range(8)]
    assert out["flags"][4] & Flag.MASKED
    # the most outlying rank, never typical
    np.testing.assert_array_equal(out["percentile"][bad], 0.0)
    np.testing.assert_array_equal(out["signal_percentile"][bad], 0.0)
    assert np.isneginf(out["log_p"][bad]).all() and np.isneginf(out["log_p_per_dim"][bad]).all()
    assert np.isnan(out["log_ratio_gaussian"][bad]).all()
    good = [0, 5, 6, 7]
    alone = sc.score(f[good], ivar[good], lab[good], marginal="none")
    assert not (alone["flags"] & Flag.UNSCORABLE).any()
    np.testing.assert_allclose(out["log_p"][good], alone["log_p"], atol=BATCH_TOLERANCE)
    np.testing.assert_array_equal(out["percentile"][good], alone["percentile"])


def test_all_masked_spectrum_is_not_typical_label_free_too(scorer):
    sc, flux, _ = scorer
    f = flux[:3].copy()
    ivar = np.ones_like(f)
    ivar[0] = 0.0
    out = sc.score(f, ivar, None, marginal="unlabelled")  # label-free for all three
    assert out["flags"][0] & Flag.UNSCORABLE and out["flags"][0] & Flag.MASKED
    assert out["percentile"][0] == 0.0 and np.isneginf(out["log_p_marginal"][0])
    assert np.isnan(out["labels_used"][0]).all()
    assert np.isfinite(out["log_p_marginal"][1:]).all()


def test_catalogue_marks_of_missing_data_are_missing_for_the_flow_too(scorer):
    """-9999 labels score as missing labels; NaN ivar as a masked pixel (no flag); an
    impossible label (Teff in kK) as missing, flagged."""
    sc, flux, labels = scorer
    f, lab = flux[:4].copy(), labels[:4].copy()
    ivar = np.ones_like(f)
    lab[1, 0], lab[3, 0] = -9999.0, 4.5
    missing = lab.copy()
    missing[[1, 3], 0] = np.nan
    ivar[2, 10:20], f[2, 10:20] = np.nan, np.nan
    zero = np.where(np.isnan(ivar), 0.0, ivar)
    got = sc.score(f, ivar, lab, marginal="unlabelled")
    want = sc.score(f, zero, missing, marginal="unlabelled")
    for key in ("log_p", "percentile"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert not got["flag_nonfinite"].any()
    np.testing.assert_array_equal(got["flags"] ^ want["flags"], [0, 0, 0, Flag.LABEL_RANGE])


def test_scores_do_not_depend_on_batch_companions_beyond_the_tolerance(scorer):
    sc, flux, labels = scorer
    alone = np.array(
        [sc.score(flux[i : i + 1], labels=labels[i : i + 1], marginal="none")["log_p"][0]
         for i in range(5)]
    )  # fmt: skip
    for n in (5, 64, 200):
        batch = sc.score(flux[:n], labels=labels[:n], marginal="none", batch_size=n)["log_p"]
        np.testing.assert_allclose(batch[:5], alone, atol=BATCH_TOLERANCE, rtol=0)


# ---------------------------------------------------------------------- checkpoints


def test_checkpoint_with_zero_std_or_bad_weights_fails_at_load(scorer, tmp_path):
    sc, _, _ = scorer
    d = sc.density
    zero = SpectrumDensity(d.flow, Standardizer(d.standardizer.mean, 0 * d.standardizer.std),
                           CFG, GRID)  # fmt: skip
    path = save_checkpoint(tmp_path / "zero", zero)
    with pytest.raises(CheckpointError, match="std must be finite and > 0"):
        load_checkpoint(path)
    good = save_checkpoint(tmp_path / "good", d)
    load_checkpoint(good)
    data = (good / "model.safetensors").read_bytes()
    (good / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="unreadable tensors"):
        load_checkpoint(good)


# ---------------------------------------------------------------------- Parquet bounds


def _parquet(table: pa.Table, **kw) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, **kw)
    return buf.getvalue()


def lying_parquet(n_rows: int, n_pix: int, file_rows: int = 1, group_rows: int | None = None):
    """A few KB holding ``n_rows`` all-zero spectra: one compressed row group of 1,000
    rows, referenced ``n_rows / 1000`` times by the footer (cheap to build), whose footer
    says ``file_rows`` rows; the row groups say 1,000 each, or with ``group_rows`` the
    first says that and the others 0 (a footer lying consistently)."""
    n = 1000
    flux = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * n_pix, np.float32)), n_pix)
    body = _parquet(pa.table({"flux": flux}), compression="zstd", row_group_size=n,
                    data_page_size=1 << 30)  # fmt: skip
    meta = read_footer(body)
    et, (group,) = meta[4][1]
    groups = [{**group} for _ in range(n_rows // n)]
    if group_rows is not None:
        for k, g in enumerate(groups):
            g[3] = (g[3][0], group_rows if k == 0 else 0)
    meta[4] = (meta[4][0], (et, groups))
    meta[3] = (meta[3][0], file_rows)
    return write_footer(body, meta)


def test_footer_codec_round_trips():
    table = pa.table({"flux": pa.array([[1.0, 2.0], None, [3.0, 4.0]]), "id": ["a", "b", "c"]})
    body = _parquet(table)
    meta = read_footer(body)
    assert meta[3][1] == 3
    assert write_footer(body, meta) == body
    raw = encode_struct(meta)
    assert decode_struct(raw)[0] == meta
    bounds = parquet_bounds(body, ["flux"])
    assert bounds.num_rows == 3 and bounds.values == {"flux": 5}  # 4 values + 1 null row
    for broken in (body[:-1], b"PAR1" + body[4:-4] + b"PARE", body[: len(body) // 2] + body[-8:]):
        with pytest.raises(ValueError):
            parquet_bounds(broken, ["flux"])


def test_lying_footer_is_refused_before_decoding():
    """Regression (defect 3): 6 KB whose footer says 1 row while its pages hold 100,000
    spectra of 2405 pixels were decoded in full (gigabytes) before the row limit."""
    n_pix = 2405
    bodies = [lying_parquet(100_000, n_pix, 1, g) for g in (None, 1)]
    # the same spectra, honestly described, are refused by their row count
    honest = lying_parquet(100_000, n_pix, 100_000)
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    for body, status in zip([*bodies, honest], (400, 422, 422), strict=True):
        assert len(body) < 16_000
        with pytest.raises(sa.RequestError) as info:
            sa.parse_body(body, "parquet", n_pix=n_pix, model_grid={"n_pix": n_pix})
        assert info.value.status == status, info.value
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak0
    assert grown < 200_000, f"peak RSS grew by {grown / 1024:.0f} MB"


def test_parquet_multi_row_group_dictionary_and_nulls_still_parse():
    flux = pa.array([[1.0] * 6, [2.0] * 6, [3.0] * 6, [1.0] * 6], type=pa.list_(pa.float32()))
    ivar = pa.array([[1.0] * 6, None, [2.0] * 6, [1.0] * 6], type=pa.list_(pa.float64()))
    table = pa.table({"flux": flux, "ivar": ivar, "id": ["a", "b", None, "d"],
                      "teff": [4400.0, None, 4410.0, 4420.0]})  # fmt: skip
    body = _parquet(table, row_group_size=1, use_dictionary=True, compression="snappy")
    req = sa.parse_body(body, "parquet", n_pix=6, model_grid={"n_pix": 6})
    assert len(req) == 4 and req.ids == ["a", "b", None, "d"]
    np.testing.assert_array_equal(req.ivar[1], np.ones(6))
    with pytest.raises(sa.RequestError) as err:
        sa.parse_body(body, "parquet", n_pix=6, model_grid={"n_pix": 6}, max_spectra=3)
    assert err.value.status == 422 and err.value.field == "spectra"


# ---------------------------------------------------------------------- strict and quiet


def _json_spectrum(**kw) -> dict:
    return {"flux": [1.0] * 6, "teff": 4400.0, "logg": 2.0, "feh": 0.0, **kw}


@pytest.mark.parametrize("value", ["1.0", True, None, [1.0], {"x": 1}])
def test_json_numbers_are_strict(value):
    body = _json_spectrum()
    body["flux"][2] = value
    with pytest.raises(sa.RequestError) as info:
        sa.parse_body(json.dumps(body).encode(), "json", n_pix=6, model_grid={})
    assert (info.value.status, info.value.field) == (422, "flux[2]")
    body = _json_spectrum(teff="4400")
    with pytest.raises(sa.RequestError) as info:
        sa.parse_body(json.dumps(body).encode(), "json", n_pix=6, model_grid={})
    assert info.value.field == "teff"


MARK = "EVIL<script>"


def _quiet(err: sa.RequestError) -> None:
    text = json.dumps(err.to_dict())
    assert MARK.lower() not in text.lower() and len(text) < 400, text


def test_errors_never_reflect_client_input():
    grid = {"name": "toy", "n_pix": 6, "hash": "abc"}

    def bad(body: bytes, kind: str = "json", **kw) -> sa.RequestError:
        with pytest.raises(sa.RequestError) as info:
            sa.parse_body(body, kind, n_pix=6, model_grid=grid, **kw)
        return info.value

    _quiet(bad(json.dumps(_json_spectrum(**{MARK: 1})).encode()))
    _quiet(bad(json.dumps({"spectra": [_json_spectrum(**{MARK * 10: 1})]}).encode()))
    _quiet(bad(json.dumps(_json_spectrum(grid=MARK)).encode()))
    _quiet(bad(json.dumps(_json_spectrum(id=MARK, flux=[1e39] * 6)).encode()))
    _quiet(bad(b"{}", grid=MARK))
    with pytest.raises(sa.RequestError) as info:
        sa.body_kind(f"application/{MARK}")
    _quiet(info.value)

    def arrow(table: pa.Table) -> bytes:
        sink = io.BytesIO()
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        return sink.getvalue()

    _quiet(bad(arrow(pa.table({MARK: [1.0]})), "arrow_stream"))  # no flux column
    nested = pa.array([[1.0] * 6], type=pa.list_(pa.field(MARK, pa.float64())))
    _quiet(bad(arrow(pa.table({"flux": pa.array([{MARK: 1}])})), "arrow_stream"))
    _quiet(bad(arrow(pa.table({"flux": nested, "id": pa.array([{MARK: 1}])})), "arrow_stream"))
    _quiet(bad(arrow(pa.table({"flux": nested, "ivar": [[-1.0] * 6], "id": [MARK]})),
               "arrow_stream"))  # fmt: skip


def test_uint64_flux_is_parsed_not_a_server_error():
    """Regression (defect 2): list<uint64> holding 2^64-1 raised ArrowInvalid in the cast."""
    values = pa.array(np.full(6, 2**64 - 1, dtype=np.uint64))
    table = pa.table({"flux": pa.FixedSizeListArray.from_arrays(values, 6)})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    req = sa.parse_body(sink.getvalue(), "arrow_stream", n_pix=6, model_grid={})
    assert req.flux[0, 0] == pytest.approx(1.8446744073709552e19)


# ---------------------------------------------------------------------- mendis score --out


def test_score_out_must_be_a_folder_and_a_failed_run_leaves_nothing(tmp_path, capsys):
    from mendis_ray.cli import main

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"grid": {"hash": "x", "n_pix": 5}}))
    a_file = tmp_path / "scores.txt"
    a_file.write_text("keep me")
    # an existing file: a clear message, no traceback (was a FileExistsError traceback)
    assert main(["score", str(ckpt), str(tmp_path / "nowhere"), "--out", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert "is not a folder" in err and "Traceback" not in err
    assert a_file.read_text() == "keep me"
    # a run that fails after making --out removes it (was left empty)
    out = tmp_path / "new" / "out"
    assert main(["score", str(ckpt), str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert not out.exists()
    # an existing folder is kept (a rerun must not lose earlier results)
    out.mkdir(parents=True)
    (out / "summary.json").write_text("{}")
    assert main(["score", str(ckpt), str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert (out / "summary.json").read_text() == "{}"


# ---------------------------------------------------------------------- Arrow IPC bounds


def _ipc(table: pa.Table, kind: str, compression: str | None = None) -> bytes:
    sink = io.BytesIO()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    new = pa.ipc.new_stream if kind == "arrow_stream" else pa.ipc.new_file
    with new(sink, table.schema, options=options) as w:
        w.write_table(table, max_chunksize=1 << 30)
    return sink.getvalue()


@pytest.mark.parametrize("kind", ["arrow_stream", "arrow_file"])
def test_compressed_ipc_batches_are_bounded_before_decompression(kind):
    """A zstd-compressed batch of 20,000 zero spectra is a few hundred KB; pyarrow would
    decompress it whole (385 MB as float64) before the row count was seen."""
    n_pix = 2405
    flux = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(20_000 * n_pix)), n_pix)
    body = _ipc(pa.table({"flux": flux}), kind, "zstd")
    del flux
    assert len(body) < 1_000_000
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(sa.RequestError) as info:
        sa.parse_body(body, kind, n_pix=n_pix, model_grid={}, max_spectra=4096)
    assert (info.value.status, info.value.field) == (422, "spectra")
    with pytest.raises(sa.RequestError) as info:  # rows allowed, bytes not
        sa.parse_body(body, kind, n_pix=10, model_grid={}, max_spectra=20_000)
    assert info.value.status == 413
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak0
    assert grown < 100_000, f"peak RSS grew by {grown / 1024:.0f} MB"


@pytest.mark.parametrize("compression", [None, "lz4", "zstd"])
@pytest.mark.parametrize("kind", ["arrow_stream", "arrow_file"])
def test_ipc_bodies_with_dictionaries_and_compression_still_parse(kind, compression):
    flux = pa.array([[1.0] * 6, [2.0] * 6, [3.0] * 6], type=pa.list_(pa.float32()))
    ids = pa.array(["a", "b", "a"]).dictionary_encode()
    table = pa.table({"flux": flux, "id": ids.cast(pa.string()), "path": ids})
    req = sa.parse_body(_ipc(table, kind, compression), kind, n_pix=6, model_grid={})
    assert req.ids == ["a", "b", "a"] and req.flux[2, 0] == 3.0


def test_mendis_serve_fails_fast_on_a_bad_checkpoint(scorer, tmp_path, capsys):
    """A truncated (or zero-std) checkpoint ends `mendis serve` at once with the
    checkpoint's error, before Ray starts (replicas were retried for a minute)."""
    from mendis_ray.cli import main

    sc, _, _ = scorer
    d = sc.density
    path = save_checkpoint(tmp_path / "ck", d, extra_arrays=sc.checkpoint_arrays())
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    ray_before = _ray_initialized()
    assert main(["serve", str(path), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "unreadable tensors" in err and "Traceback" not in err
    assert _ray_initialized() == ray_before  # no Ray was started
    zero = SpectrumDensity(d.flow, Standardizer(d.standardizer.mean, 0 * d.standardizer.std),
                           CFG, GRID)  # fmt: skip
    path = save_checkpoint(tmp_path / "zero", zero, extra_arrays=sc.checkpoint_arrays())
    assert main(["serve", str(path), "--port", "1"]) == 2
    assert "standardizer.std" in capsys.readouterr().err


def _ray_initialized() -> bool:
    import sys

    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def test_a_full_disk_is_one_line_and_leaves_no_half_checkpoint(tmp_path, capsys, monkeypatch):
    """safetensors reports a full disk as its own error type (not an OSError): it becomes
    ENOSPC naming the checkpoint, the staged folder goes, an earlier checkpoint stays, and
    the CLI says it in one line (a 25-line traceback before)."""
    import errno
    import os

    from mendis_ray import cli_data
    from mendis_ray.cli import main
    from mendis_ray.flow.checkpoint import write_checkpoint_dir

    ck = tmp_path / "checkpoint"
    ck.mkdir()
    (ck / "config.json").write_text("{}")  # an earlier run's

    def full(path: str) -> None:
        with open(path, "wb") as f:
            f.write(b"x" * 10)
        raise RuntimeError("No space left on device (os error 28)")

    with pytest.raises(OSError) as caught:
        write_checkpoint_dir(ck, {"model_kind": "flow"}, full)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(ck)
    assert os.listdir(tmp_path) == ["checkpoint"] and os.listdir(ck) == ["config.json"]

    def inspect(args):
        raise caught.value

    monkeypatch.setattr(cli_data, "cmd_inspect", inspect)
    assert main(["inspect", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"mendis inspect: error: {ck}: No space left on device\n"
