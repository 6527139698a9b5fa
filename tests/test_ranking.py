"""The catalog outputs without Ray: ranking, outlier table, flags, gallery, input sorting
and stale-temporary cleanup (mendis_ray.science.ranking/gallery/flags,
mendis_ray.spectra.catalog, mendis_ray.atomic)."""

from __future__ import annotations

import datetime as dt
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mendis_ray.atomic import remove_stale_dirs
from mendis_ray.science.flags import Flag, flag_columns, flag_list, flag_names
from mendis_ray.science.gallery import (
    ShardSpectra,
    make_gallery,
    nearest_typical,
    plot_gallery,
    read_spectra,
)
from mendis_ray.science.ranking import (
    rank_keys,
    rank_outliers,
    read_ranking,
    top_table,
    typical_rows,
)
from mendis_ray.spectra.catalog import common_scalar_columns, split_inputs
from mendis_ray.spectra.shards import ShardError

NAN = float("nan")


def _scores(**cols) -> pa.Table:
    n = len(next(iter(cols.values())))
    base = {"id": [f"s{i}" for i in range(n)], "path": ["a.parquet"] * n, "flags": [0] * n}
    return pa.table({**base, **cols})


def test_rank_by_percentile_then_log_p_per_dim_nan_last():
    t = _scores(percentile=[50.0, 0.0, 0.0, NAN, 10.0], log_p_per_dim=[1.0, -2, -1, 0, 5])
    assert rank_outliers(t).tolist() == [1, 2, 4, 0, 3]
    flagged = t.set_column(2, "flags", pa.array([0, 0, 0, 0, int(Flag.MASKED)]))
    assert rank_outliers(flagged).tolist() == [1, 2, 4, 0, 3]  # flags do not reorder
    assert rank_outliers(flagged, flags_first=True).tolist() == [4, 1, 2, 0, 3]


def test_rank_keys_per_checkpoint_kind_and_exact_ties_keep_order():
    flow = _scores(percentile=[0.0, 0.0], log_p_per_dim=[1.0, 1.0])
    signal = _scores(percentile=[0.0, 0.0], score=[-3.0, -9.0],
                     signal_percentile=[5.0, 1.0], signal_score=[0.0, 0.0])  # fmt: skip
    assert rank_keys(flow, "percentile") == ("percentile", "log_p_per_dim")
    assert rank_keys(signal, "percentile") == ("percentile", "score")
    assert rank_outliers(flow).tolist() == [0, 1]
    assert rank_outliers(signal).tolist() == [1, 0]
    assert rank_outliers(signal, rank_by="signal").tolist() == [1, 0]
    with pytest.raises(ValueError, match="rank_by"):
        rank_outliers(flow, rank_by="loudest")


def test_typical_rows_skip_flagged_nonfinite_and_excluded():
    t = _scores(percentile=[90.0, 80.0, 99.0, 70.0, 95.0], log_p_per_dim=[1.0, 1, NAN, 1, 1])
    t = t.set_column(2, "flags", pa.array([0, 0, 0, 0, int(Flag.FLUX_RANGE)]))
    assert typical_rows(t, 10, exclude=np.array([], np.int64)).tolist() == [0, 1, 3]
    assert typical_rows(t, 2, exclude=np.array([1])).tolist() == [0, 3]


def test_top_table_matches_id_and_path_and_names_flags(tmp_path):
    """The same id in two shards stays two rows; every column comes back, rank first."""
    scores = tmp_path / "scores"
    scores.mkdir()
    a = pa.table({"id": ["x", "y"], "path": ["p1", "p1"], "flags": [6, 0], "percentile": [1.0, 40],
                  "log_p_per_dim": [-3.0, 0.5], "teff": [4400.0, 4500]})  # fmt: skip
    b = pa.table({"id": ["x"], "path": ["p2"], "flags": [0], "percentile": [0.0],
                  "log_p_per_dim": [-9.0], "teff": [4300.0]})  # fmt: skip
    pq.write_table(a, scores / "0.parquet")
    pq.write_table(b, scores / "1.parquet")
    ranking = read_ranking(scores, "percentile")
    assert "teff" not in ranking.column_names and ranking.num_rows == 3
    order = rank_outliers(ranking)
    top = top_table(scores, ranking, order[:2])
    assert top.column_names[:3] == ["rank", "id", "percentile"]
    assert top.column("rank").to_pylist() == [1, 2]
    assert list(zip(top["id"].to_pylist(), top["path"].to_pylist(), strict=True)) == [
        ("x", "p2"), ("x", "p1")]  # fmt: skip
    assert top.column("teff").to_pylist() == [4300.0, 4400.0]
    assert top.column("flag_names").to_pylist() == ["", "masked|flux_range"]


def test_flag_names_and_columns():
    assert flag_names(0) == "" and flag_list(0) == []
    assert flag_names(Flag.MASKED | Flag.UNSCORABLE) == "masked|unscorable"
    assert [f.label for f in Flag] == [
        "nonfinite", "masked", "flux_range", "label_range", "unscorable",
        "noise_range"]  # fmt: skip
    cols = flag_columns(np.array([0, 5, 16]))
    assert cols["flag_nonfinite"].tolist() == [False, True, False]
    assert cols["flag_flux_range"].tolist() == [False, True, False]
    assert cols["flag_unscorable"].tolist() == [False, False, True]


def test_nearest_typical_uses_pixels_good_in_both():
    typ = np.array([[1.0, 1.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    typ_ivar = np.ones_like(typ)
    flux = np.array([[1.0, 1.0, 1.0, 50.0], [0.6, 0.5, 0.4, 0.5], [NAN] * 4])
    ivar = np.array([[1.0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    idx, dist = nearest_typical(flux, ivar, typ, typ_ivar)
    assert idx.tolist() == [0, 1, -1]  # the masked 50 does not count; NaN compares with none
    np.testing.assert_allclose(dist[:2], [0.0, 0.02 / 4])
    assert np.isnan(dist[2])
    idx, _ = nearest_typical(flux, ivar, typ[:0], typ_ivar[:0])
    assert idx.tolist() == [-1, -1, -1]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_plot_gallery_writes_one_png_atomically(tmp_path):
    rng = np.random.default_rng(0)
    wl = np.concatenate([np.linspace(15100, 15200, 30), np.linspace(15900, 16000, 30)])
    flux = 1 + 0.01 * rng.standard_normal((2, 60))
    top = pa.table({"rank": [1, 2], "id": ["a", "b"], "percentile": [0.0, 1.0],
                    "log_p_per_dim": [-5.0, -4.0], "flag_names": ["masked", ""],
                    "teff_used": [4400.0, NAN], "logg_used": [2.0, NAN],
                    "feh_used": [0.0, NAN]})  # fmt: skip
    typical = pa.table({"id": ["t"], "percentile": [60.0]})
    out = plot_gallery(top, flux, np.ones_like(flux), typical, np.ones((1, 60)),
                       np.ones((1, 60)), wl, tmp_path / "gallery.png")  # fmt: skip
    width, height = _png_size(out)
    assert width > 600 and height > 2 * 150
    none = np.ones((0, 60))
    empty = plot_gallery(top.slice(0, 0), none, none, typical.slice(0, 0), none, none, wl,
                         tmp_path / "empty.png")  # fmt: skip
    assert _png_size(empty)[0] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.png", "gallery.png"]


def test_make_gallery_reads_spectra_from_shards(tmp_path):
    from mendis_ray.spectra.grid import get_grid
    from mendis_ray.spectra.shards import make_table, write_shard

    grid = get_grid("paper")
    flux = np.stack([np.full(grid.n_pix, v, np.float32) for v in (0.9, 1.0, 1.1)])
    table = make_table(["a", "b", "c"], flux, np.ones_like(flux))
    shard = write_shard(tmp_path / "s.parquet", table, grid)
    rows = pa.table({"id": ["c", "zz"], "path": [str(shard), str(shard)]})
    got, got_ivar = read_spectra(rows, [shard], grid.n_pix)
    np.testing.assert_allclose(got[0], 1.1, rtol=1e-6)
    assert np.isnan(got[1]).all() and (got_ivar[1] == 0).all()  # not found: NaN, ivar 0
    top = pa.table({"rank": [1], "id": ["c"], "path": [str(shard)], "percentile": [0.0]})
    typical = pa.table({"id": ["a", "b"], "path": [str(shard)] * 2, "percentile": [50.0, 60.0]})
    png = make_gallery(top, typical, [shard], grid.n_pix, tmp_path / "g.png")
    assert _png_size(png)[0] > 600


def test_shard_spectra_reads_each_shard_once_and_looks_rows_up(tmp_path, monkeypatch):
    """The catalog outputs' explanations and gallery need the same top and typical rows:
    ShardSpectra reads every shard holding any of them once (a read decompresses the whole
    shard), and gives each table's rows as read_spectra would, NaN/0 where not found."""
    import mendis_ray.science.gallery as gallery
    from mendis_ray.spectra.grid import get_grid
    from mendis_ray.spectra.shards import make_table, write_shard

    grid = get_grid("paper")
    shards = []
    for s, values in enumerate(((0.9, 1.0), (1.1, 1.2))):
        flux = np.stack([np.full(grid.n_pix, v, np.float32) for v in values])
        ids = [f"s{s}-{j}" for j in range(2)]
        shards.append(write_shard(tmp_path / f"{s}.parquet", make_table(ids, flux,
                                  np.ones_like(flux)), grid))  # fmt: skip
    path = [str(f) for f in shards]
    top = pa.table({"id": ["s1-1", "s0-0", "zz"], "path": [path[1], path[0], path[0]]})
    typical = pa.table({"id": ["s0-1", "s1-1"], "path": [path[0], path[1]]})
    reads = []
    real = gallery.pq.read_table
    monkeypatch.setattr(gallery.pq, "read_table", lambda f, **kw: reads.append(f) or real(f, **kw))
    spectra = ShardSpectra.read([top, typical], shards, grid.n_pix)
    assert sorted(map(str, reads)) == sorted(path)  # one read per shard, not one per table
    for rows in (top, typical, top.slice(0, 1)):
        want, want_ivar = read_spectra(rows, shards, grid.n_pix)
        got, got_ivar = spectra.of(rows)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got_ivar, want_ivar)
    got, got_ivar = spectra.of(top)
    np.testing.assert_allclose(got[:2, 0], [1.2, 0.9], rtol=1e-6)
    assert np.isnan(got[2]).all() and (got_ivar[2] == 0).all()
    other = pa.table({"id": ["s0-1"], "path": [path[1]]})  # an id read, but not from there
    assert np.isnan(spectra.of(other)[0]).all()


def test_split_inputs_and_common_columns(tmp_path):
    fits_dir = tmp_path / "fits"
    fits_dir.mkdir()
    for name in ("apStar-1.fits", "apStar-2.FITS.gz", "notes.txt"):
        (fits_dir / name).write_bytes(b"")
    single = tmp_path / "aspcapStar-3.fit"
    single.write_bytes(b"")
    shard = tmp_path / "s.parquet"
    parquet, fits_files = split_inputs([shard, single, fits_dir])
    assert parquet == [shard]
    assert [p.name for p in fits_files] == ["aspcapStar-3.fit", "apStar-1.fits", "apStar-2.FITS.gz"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ShardError, match=r"empty: folder holds no \.parquet or FITS"):
        split_inputs([empty])
    f1, f2 = tmp_path / "1.parquet", tmp_path / "2.parquet"
    pq.write_table(pa.table({"id": ["a"], "flux": [[1.0]], "truth_class": ["x"], "k": [1]}), f1)
    pq.write_table(pa.table({"id": ["b"], "truth_class": ["y"], "path": ["p"]}), f2)
    assert common_scalar_columns([f1, f2]) == ["truth_class"]


def test_only_columns_every_output_holds_are_carried(tmp_path, caplog):
    """Numbers, booleans, text, dates, categories and half floats are carried into the
    scores; a struct, bytes and a name longer than a FITS column's 68 characters are left
    out with one warning naming each (they failed the run after scoring, in the CSV or
    FITS writer)."""
    long = "n" * 69
    cols = {"id": ["a"], "mag": [1.5], "n": [3], "ok": [True], "note": ["é"],
            "nested": [{"a": 1}], "raw": [b"\x00\xff"], "when": [dt.date(2026, 1, 1)],
            "half": pa.array([1.0], pa.float16()), long: [1.0], "m" * 68: [2.0],
            "kind": pa.array(["giant"]).dictionary_encode()}  # fmt: skip
    f = tmp_path / "x.parquet"
    pq.write_table(pa.table(cols), f)
    with caplog.at_level("WARNING", logger="mendis_ray.spectra.catalog"):
        got = common_scalar_columns([f])
    assert got == ["mag", "n", "ok", "note", "when", "half", "m" * 68, "kind"]
    (msg,) = [r.getMessage() for r in caplog.records]
    for name in ("nested", "raw", long):
        assert repr(name) in msg, name
    assert "a name of 69 characters; FITS holds 68" in msg


def test_remove_stale_dirs_keeps_live_processes(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead = int(done.stdout)
    pattern = re.compile(r"^\.scores\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")
    stale = tmp_path / f".scores.tmp-{dead}-abcd1234"
    live = tmp_path / f".scores.old-{os.getppid()}-abcd1234"
    other = tmp_path / "scores"
    for p in (stale, live, other):
        p.mkdir()
    assert remove_stale_dirs(tmp_path, pattern) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def test_an_unscorable_rows_minus_infinity_prints_as_such() -> None:
    from mendis_ray.science.gallery import fmt

    assert fmt(float("-inf"), ".2f") == "-inf" and fmt(-1.234, ".2f") == "-1.23"
    assert fmt(None, ".1f") == "nan" and fmt(float("nan"), ".1f") == "nan"
