"""Batch scoring of catalogs with Ray Data (mendis_ray.distributed.infer).

One scoring run of ``test`` + ``cemp`` (module fixture ``scored``) is checked from several
sides; reruns, bad input and FITS input get their own small runs.  Actors take half a CPU
so the pool fits beside other tests in the shared session (4 logical CPUs)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from mendis_ray.distributed import infer
from mendis_ray.science.ranking import USED_COLUMNS, rank_outliers
from mendis_ray.spectra.shards import ShardError

DR17 = Path(__file__).resolve().parents[3] / "shared" / "data" / "apogee_dr17"
RUN = {"batch_size": 64, "min_actors": 1, "max_actors": 2, "num_cpus_per_actor": 0.5}


@pytest.fixture(scope="module")
def scored(ray_session, checkpoint, sim_sets, tmp_path_factory):
    out = tmp_path_factory.mktemp("score") / "out"
    return infer.score_catalog(
        checkpoint, [sim_sets / "test", sim_sets / "cemp"], out, top_n=40, gallery_n=4, **RUN
    )


def _read_inputs(sim_sets: Path) -> pa.Table:
    from mendis_ray.spectra.shards import read_dataset

    tables = [read_dataset(sim_sets / name) for name in ("test", "cemp")]
    return pa.concat_tables(tables, promote_options="default")


def _hidden(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".")]


def test_scores_equal_in_process_scorer(scored, checkpoint, sim_sets):
    """Every score column of the Ray pipeline equals Scorer.score on the same rows."""
    from mendis_ray.science.ood import Scorer
    from mendis_ray.spectra.shards import table_arrays

    inputs = _read_inputs(sim_sets)
    a = table_arrays(inputs)
    want = Scorer.from_checkpoint(str(checkpoint)).score(a.flux, a.ivar, a.labels)
    got = pq.read_table(scored.scores)
    pos = {rid: k for k, rid in enumerate(got.column("id").to_pylist())}
    order = np.array([pos[rid] for rid in inputs.column("id").to_pylist()])
    for name, values in want.items():
        if name == "labels_used":
            cols = [got.column(c).to_numpy()[order] for c in USED_COLUMNS]
            np.testing.assert_allclose(np.stack(cols, 1), values, rtol=1e-9, equal_nan=True)
            continue
        col = got.column(name).to_numpy(zero_copy_only=False)[order]
        if values.dtype.kind == "f":  # float32 sums: rounding with a row's place in a batch
            np.testing.assert_allclose(col, values, rtol=1e-6, atol=1e-9, equal_nan=True,
                                       err_msg=name)  # fmt: skip
        else:
            np.testing.assert_array_equal(col, values, err_msg=name)
    assert np.isfinite(want["log_p"]).all()  # labelled rows: the joint score everywhere


def test_every_input_id_exactly_once(scored, sim_sets):
    ids = pq.read_table(scored.scores, columns=["id"]).column("id").to_pylist()
    inputs = _read_inputs(sim_sets).column("id").to_pylist()
    assert len(ids) == len(inputs) == 240
    assert sorted(ids) == sorted(inputs)
    paths = pq.read_table(scored.scores, columns=["id", "path"]).to_pylist()
    assert all(Path(r["path"]).parent.name == r["id"].split("-")[0] for r in paths)
    assert scored.summary["rows"] == scored.summary["distinct_ids"] == 240


def test_top_outliers_rank_cemp_above_inliers(scored):
    top = pq.read_table(scored.top_parquet)
    csv = pacsv.read_csv(scored.top_csv)
    assert top.num_rows == 40
    assert top.column("rank").to_pylist() == list(range(1, 41))
    assert all(rid.startswith("cemp-") for rid in top.column("id").to_pylist())
    # the ranking key is monotone: percentile, then log p per dimension
    key = list(zip(top.column("percentile").to_pylist(), top.column("log_p_per_dim").to_pylist(),
                   strict=True))  # fmt: skip
    assert key == sorted(key)
    assert csv.column("id").to_pylist() == top.column("id").to_pylist()
    # over the whole catalog every CEMP star ranks above every test inlier
    full = pq.read_table(scored.scores)
    order = rank_outliers(full)
    ranked = [full.column("id")[int(i)].as_py() for i in order]
    assert all(rid.startswith("cemp-") for rid in ranked[:80])
    flagged = top.column("flag_names").to_pylist()
    assert all(
        (f == "") == (n == 0) for f, n in zip(flagged, top.column("flags").to_pylist(), strict=True)
    )


def test_gallery_is_a_sane_png(scored):
    data = scored.gallery.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert 600 <= width <= 3000 and 4 * 150 <= height <= 6000
    assert 20_000 < len(data) < 5_000_000


def test_summary_json(scored):
    s = json.loads((scored.out / "summary.json").read_text())
    assert s["rows"] == 240 and s["seconds"] > 0 and s["spectra_per_s"] > 0
    assert s["actors"]["min"] == 1 and s["actors"]["max"] == 2
    assert s["actors"]["num_cpus"] == 0.5 and s["actors"]["num_gpus"] == 0
    assert len(s["files"]["inputs"]) == 3
    assert all(Path(f).exists() for f in s["files"]["scores"])
    assert s["files"]["gallery"] == str(scored.gallery)


def test_explained_outputs(scored):
    """FITS tables, explanations and the triage data of a run (see also test_triage.py)."""
    from astropy.io import fits

    with fits.open(scored.out / "scores.fits") as h:
        assert len(h["SCORES"].data) == 240 and h["SCORES"].header["FLAGBIT4"] == "UNSCORABLE"
        assert {"ID", "PERCENTILE", "FLAGS", "VERDICT"} <= set(h["SCORES"].columns.names)
    top = pq.read_table(scored.top_parquet).to_pylist()
    assert all(r["explanation"] and r["ref_id"] and r["ref_id"] != r["id"] for r in top)
    feats = pq.read_table(scored.out / "explain_features.parquet")
    assert set(feats.column("id").to_pylist()) <= {r["id"] for r in top}
    with fits.open(scored.out / "top_outliers.fits") as h:
        assert len(h["TOP_OUTLIERS"].data) == len(top) and len(h["FEATURES"].data) == len(feats)
    spectra = pq.read_table(scored.out / "triage_spectra.parquet")
    assert spectra.column("id").to_pylist() == [r["id"] for r in top]


def test_rerun_into_same_out_replaces_cleanly(scored, checkpoint, sim_sets, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(scored.out, out)
    first = pq.read_table(scored.top_parquet).column("id").to_pylist()
    downloaded = tmp_path / "verdicts.json"  # as the static triage page downloads it
    downloaded.write_text(json.dumps({"format": "mendis-verdicts-1", "verdicts": [
        {"id": first[0], "verdict": "interesting", "note": "look again",
         "updated": "2030-01-01T00:00:00Z"}]}))  # fmt: skip
    res = infer.score_catalog(
        checkpoint, [sim_sets / "test", sim_sets / "cemp"], out, top_n=10, gallery_n=0,
        html=True, verdicts=downloaded, **{**RUN, "max_actors": 1},
    )  # fmt: skip
    top = pq.read_table(res.top_parquet)
    got = dict(zip(top.column("id").to_pylist(), top.column("verdict").to_pylist(), strict=True))
    assert got[first[0]] == "interesting"  # carried into the outputs
    assert sum(v is not None for v in got.values()) == 1
    assert "look again" in (out / "triage.html").read_text()
    ids = pq.read_table(res.scores, columns=["id"]).column("id")
    assert len(ids) == 240 and pc.count_distinct(ids).as_py() == 240
    assert pq.read_table(res.top_parquet).num_rows == 10
    assert not _hidden(out), f"temporary files left: {_hidden(out)}"
    assert not (out / "gallery.png").exists()  # no gallery asked: the old one is gone
    assert sorted(p.name for p in out.iterdir()) == [
        "explain_elements.csv", "explain_elements.parquet", "explain_features.csv",
        "explain_features.parquet", "scores", "scores.fits", "summary.json",
        "top_outliers.csv", "top_outliers.fits", "top_outliers.parquet", "triage.html",
        "triage_spectra.parquet", "verdicts.parquet", "verdicts.parquet.lock",
    ]  # fmt: skip


def _digest(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def test_a_rerun_that_fails_after_scoring_leaves_the_earlier_outputs(
    scored, checkpoint, sim_sets, tmp_path, monkeypatch
):
    """A rerun into an earlier run's folder that fails after its spectra are scored (here
    in the gallery, the last figure) leaves every earlier output byte for byte: the run
    writes into a staging folder and moves its outputs in only when all are written
    (before, ``scores/`` and the tables were the new run's, ``summary.json`` and the FITS
    the old one's).  Nothing temporary is left."""
    from mendis_ray.distributed import catalog_outputs

    out = tmp_path / "out"
    shutil.copytree(scored.out, out)
    before = _digest(out)

    def broken(*args, **kwargs):
        raise RuntimeError("the gallery failed")

    monkeypatch.setattr(catalog_outputs, "make_gallery", broken)
    with pytest.raises(RuntimeError, match="the gallery failed"):
        infer.score_catalog(checkpoint, [sim_sets / "test"], out, top_n=7, gallery_n=2, **RUN)
    assert _digest(out) == before
    assert not _hidden(out), f"temporary files left: {_hidden(out)}"


def test_odd_input_columns_are_carried_safely_and_out_is_not_an_input(
    checkpoint, sim_sets, tmp_path, caplog
):
    """Input columns named as scores (a catalog's own ``score`` and ``flags``) are copied
    as ``input_score`` and ``input_flags`` beside the model's (they failed the run after
    scoring: a field twice in the schema); a struct column and one whose name is longer
    than a FITS column's are left out with a warning (they failed in the CSV and FITS
    writers).  An --out that is the input folder is refused before anything runs: its
    outputs would be read as spectra the next time."""
    src = sorted((sim_sets / "cemp").glob("*.parquet"))[0]
    t = pq.read_table(src)
    n = t.num_rows
    extra = {"score": pa.array(np.arange(n, dtype=np.float32)), "flags": pa.array(["q"] * n),
             "nested": pa.array([{"a": 1}] * n), "x" * 80: pa.array(np.ones(n)),
             "seen": pa.array(np.full(n, np.datetime64("2026-01-02", "D"))),
             "kind": pa.array(["giant"] * n).dictionary_encode()}  # fmt: skip
    for name, col in extra.items():
        t = t.append_column(name, col)
    (tmp_path / "odd").mkdir()
    pq.write_table(t, tmp_path / "odd" / "a.parquet")
    for given in (tmp_path / "odd", tmp_path / "odd" / "a.parquet"):  # its folder, its file
        with pytest.raises(ValueError, match=r"--out '.*odd' is the folder of the input"):
            infer.score_catalog(checkpoint, [given], tmp_path / "odd")
    assert sorted(p.name for p in (tmp_path / "odd").iterdir()) == ["a.parquet"]
    with caplog.at_level("WARNING"):
        got = infer.score_catalog(checkpoint, [tmp_path / "odd"], tmp_path / "out", top_n=5,
                                  gallery_n=0, **RUN)  # fmt: skip
    scores = pq.read_table(got.scores)
    assert sorted(scores.column("input_score").to_pylist()) == list(range(n))
    assert set(scores.column("input_flags").to_pylist()) == {"q"}
    assert pa.types.is_integer(scores.schema.field("flags").type)  # the model's
    assert "nested" not in scores.column_names and "x" * 80 not in scores.column_names
    assert "copied as ['input_score', 'input_flags']" in caplog.text
    assert "'nested' (type struct<a: int64>" in caplog.text and "80 characters" in caplog.text
    assert set(scores.column("kind").to_pylist()) == {"giant"} and "seen" in scores.column_names
    for name in ("scores.fits", "top_outliers.fits", "top_outliers.csv"):
        assert (got.out / name).is_file(), name


def test_a_damaged_shard_is_named_in_one_line(checkpoint, sim_sets, tmp_path, capfd):
    """A shard with a bit flipped in a page after it was written: its CRC fails in a Ray
    read task, which does not know the file; the run stops with a ShardError naming it,
    and Ray Data's own report of the failed task (about 300 lines) stays in its log
    file."""
    from mendis_ray.spectra.grid import paper_grid
    from mendis_ray.spectra.shards import write_dataset

    (tmp_path / "d").mkdir()
    table = pq.read_table(sorted((sim_sets / "cemp").glob("*.parquet"))[0])
    write_dataset(tmp_path / "d", [table], 1, paper_grid())
    (shard,) = sorted((tmp_path / "d").glob("*.parquet"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    capfd.readouterr()
    with pytest.raises(ShardError, match=rf"{shard.name}: damaged: a page's bytes do not match"):
        infer.score_catalog(checkpoint, [tmp_path / "d"], tmp_path / "out", gallery_n=0, **RUN)
    err = capfd.readouterr().err
    assert "Exception occurred in Ray Data" not in err and "Traceback" not in err


def _set_pixels(table: pa.Table, name: str, cells: dict[tuple[int, int], float]) -> pa.Table:
    col = table.column(name).combine_chunks()
    values = col.flatten().to_numpy(zero_copy_only=False).copy()
    for (row, pix), v in cells.items():
        values[row * col.type.list_size + pix] = v
    new = pa.FixedSizeListArray.from_arrays(pa.array(values, pa.float32()), col.type.list_size)
    return table.set_column(table.column_names.index(name), name, new)


def test_a_bad_pixel_is_flagged_not_fatal_and_a_negative_ivar_names_its_row(
    scored, checkpoint, sim_sets, tmp_path
):
    """NaN flux at a good pixel (row 5): the spectrum is scored and flagged ``nonfinite``,
    the run goes on (one bad pixel stopped a whole catalog); NaN flux at a masked pixel
    (row 6, ivar 0; a common mark of a bad pixel): nothing changes; a negative ivar is a
    broken file: the run stops naming the file, the row's id and the pixel."""
    good = sorted((sim_sets / "test").glob("*.parquet"))[0]
    table = pq.read_table(good)  # keeps the schema metadata: check_shards passes
    table = _set_pixels(table, "flux", {(5, 100): np.nan, (6, 200): np.nan})
    table = _set_pixels(table, "ivar", {(6, 200): 0.0})
    (tmp_path / "nan").mkdir()
    pq.write_table(table, tmp_path / "nan" / "a.parquet")
    got = infer.score_catalog(checkpoint, [tmp_path / "nan"], tmp_path / "o1", top_n=5,
                              gallery_n=0, **RUN)  # fmt: skip
    mine = pq.read_table(got.scores).to_pandas().set_index("id")
    ids = table.column("id").to_pylist()
    assert len(mine) == table.num_rows and mine.loc[ids[5], "flag_nonfinite"]
    assert mine["flag_nonfinite"].sum() == 1
    assert np.isfinite(mine.loc[ids[5], "log_p"])  # the rest of its pixels are scored
    want = pq.read_table(scored.scores, columns=["id", "log_p"]).to_pandas().set_index("id")
    others = [i for k, i in enumerate(ids) if k not in (5, 6)]
    np.testing.assert_allclose(mine.loc[others, "log_p"], want.loc[others, "log_p"], rtol=1e-6)
    assert np.isfinite(mine.loc[ids[6], "log_p"])  # one masked pixel more than in `scored`

    bad = tmp_path / "bad.parquet"
    pq.write_table(_set_pixels(pq.read_table(good), "ivar", {(5, 100): -1.0}), bad)
    out = tmp_path / "out"
    with pytest.raises(ShardError, match=rf"bad\.parquet.*{ids[5]}.*negative ivar at pixel 100"):
        infer.score_catalog(checkpoint, [bad], out, top_n=5, gallery_n=0, **RUN)
    assert not (out / "scores").exists() and not _hidden(out)


def test_wrong_grid_is_named_before_scoring(checkpoint, sim_sets, tmp_path):
    from mendis_ray.spectra.grid import get_grid
    from mendis_ray.spectra.shards import make_table, write_shard

    grid = get_grid("aspcap")
    rng = np.random.default_rng(0)
    flux = (1 + 0.01 * rng.standard_normal((3, grid.n_pix))).astype(np.float32)
    table = make_table(["w-0", "w-1", "w-2"], flux, np.ones_like(flux), teff=np.full(3, 4500.0),
                       logg=np.full(3, 2.0), feh=np.zeros(3), snr=np.full(3, 100.0))  # fmt: skip
    wrong = write_shard(tmp_path / "wrong.parquet", table, grid)
    with pytest.raises(ShardError, match=r"wrong\.parquet.*aspcap.*does not match the model"):
        infer.score_catalog(checkpoint, [sim_sets / "test", wrong], tmp_path / "out")
    with pytest.raises(ShardError, match=r"wrong\.parquet.*7214 px"):
        infer.score_catalog(checkpoint, [wrong], tmp_path / "out")


def test_no_rows_or_an_unwritable_out_is_named_before_scoring(checkpoint, sim_sets, tmp_path):
    """An input of 0 rows and an --out that cannot be written: one clear error each, before
    Ray is needed, and no folder left behind (before: a FileNotFoundError traceback from
    renaming a result folder Ray never wrote)."""
    import pyarrow.parquet as pq

    first = sorted((sim_sets / "test").glob("*.parquet"))[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    pq.write_table(pq.read_table(first).slice(0, 0), empty / "part-0.parquet")
    with pytest.raises(ShardError, match=r"no spectra to score.*empty.*hold no rows"):
        infer.score_catalog(checkpoint, [empty], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"file/sub' is not writable"):
        infer.score_catalog(checkpoint, [sim_sets / "test"], tmp_path / "file" / "sub")


def test_variable_length_lists_score_as_fixed_size_ones(scored, checkpoint, sim_sets, tmp_path):
    """flux and ivar as variable-length lists (pyarrow's default for a list of arrays):
    read as the shard reader reads them (``mendis train`` did; ``mendis score`` refused
    them, saying that each row needed the 2,405 values it had)."""
    cemp = tmp_path / "cemp"
    cemp.mkdir()
    for f in sorted((sim_sets / "cemp").glob("*.parquet")):
        t = pq.read_table(f)
        for name in ("flux", "ivar"):
            col = t.column(name).combine_chunks()
            flat = pa.ListArray.from_arrays(
                pa.array(np.arange(len(col) + 1, dtype=np.int32) * col.type.list_size),
                col.flatten(),
            )
            t = t.set_column(t.schema.get_field_index(name), name, flat)
        pq.write_table(t, cemp / f.name)
    got = infer.score_catalog(checkpoint, [cemp], tmp_path / "out", top_n=5, gallery_n=0, **RUN)
    want = pq.read_table(scored.scores, columns=["id", "log_p"]).to_pandas().set_index("id")
    mine = pq.read_table(got.scores, columns=["id", "log_p"]).to_pandas().set_index("id")
    assert len(mine) == sum(pq.read_metadata(f).num_rows for f in cemp.glob("*.parquet"))
    np.testing.assert_allclose(mine["log_p"], want.loc[mine.index, "log_p"], rtol=1e-6)


def test_plain_parquet_files_score_as_shards(scored, checkpoint, sim_sets, tmp_path):
    """Plain Parquet (no mendis_ray metadata, no snr column, float64 labels) is read as
    the grid of its row length, and a set without label columns beside it reads them as
    unknown: one run over both, the labelled rows scored as their shards are."""
    plain, unlabelled = tmp_path / "plain", tmp_path / "unlabelled"
    for folder in (plain, unlabelled):
        folder.mkdir()
    for f in sorted((sim_sets / "cemp").glob("*.parquet")):
        t = pq.read_table(f).replace_schema_metadata(None).drop_columns(["snr"])
        for name in ("teff", "logg", "feh"):
            t = t.set_column(t.schema.get_field_index(name), name, t[name].cast(pa.float64()))
        pq.write_table(t, plain / f.name)
    for f in sorted((sim_sets / "test").glob("*.parquet"))[:1]:
        t = pq.read_table(f).replace_schema_metadata(None)
        pq.write_table(t.drop_columns(["teff", "logg", "feh", "snr"]), unlabelled / "a.parquet")
    assert pq.read_schema(next(plain.glob("*.parquet"))).metadata is None
    got = infer.score_catalog(
        checkpoint, [plain, unlabelled], tmp_path / "out", top_n=5, gallery_n=0, **RUN
    )
    mine = pq.read_table(got.scores).to_pandas().set_index("id")
    n_plain = sum(pq.read_metadata(f).num_rows for f in plain.glob("*.parquet"))
    n_unlab = sum(pq.read_metadata(f).num_rows for f in unlabelled.glob("*.parquet"))
    assert len(mine) == n_plain + n_unlab
    want = pq.read_table(scored.scores, columns=["id", "log_p"]).to_pandas().set_index("id")
    cemp = [i for i in mine.index if i in want.index and mine.loc[i, "teff"] == mine.loc[i, "teff"]]
    assert len(cemp) == n_plain
    np.testing.assert_allclose(mine.loc[cemp, "log_p"], want.loc[cemp, "log_p"], rtol=1e-6)
    assert mine.drop(index=cemp)[["teff", "logg", "feh", "snr"]].isna().all().all()


def test_actor_pool_autoscaling_config(monkeypatch, checkpoint, sim_sets):
    import ray

    from mendis_ray.distributed.data import check_shards, list_shards

    opts = infer.actor_pool_options(
        min_actors=2, max_actors=5, num_cpus_per_actor=0.5, num_gpus_per_actor=0, batch_size=32
    )
    assert isinstance(opts["compute"], ray.data.ActorPoolStrategy)
    assert (opts["compute"].min_size, opts["compute"].max_size) == (2, 5)
    assert opts["num_cpus"] == 0.5 and "num_gpus" not in opts and opts["batch_size"] == 32
    gpu = infer.actor_pool_options(
        min_actors=1, max_actors=4, num_cpus_per_actor=1, num_gpus_per_actor=1, batch_size=8
    )
    assert gpu["num_gpus"] == 1
    with pytest.raises(ValueError, match="min_actors"):
        infer.actor_pool_options(
            min_actors=3, max_actors=2, num_cpus_per_actor=1, num_gpus_per_actor=0, batch_size=8
        )
    # build_pipeline passes the bounds through (the dataset is lazy: nothing runs here)
    seen = {}
    real = infer.actor_pool_options
    monkeypatch.setattr(infer, "actor_pool_options", lambda **kw: seen.update(kw) or real(**kw))
    shards = check_shards(list_shards(sim_sets / "test"))
    infer.build_pipeline(checkpoint, shards, min_actors=1, max_actors=3, num_cpus_per_actor=0.25)
    assert seen["min_actors"] == 1 and seen["max_actors"] == 3
    assert seen["num_cpus_per_actor"] == 0.25
    # defaults: a GPU cluster gets one actor per GPU, a CPU one keeps a CPU for reads
    assert infer.default_max_actors({"CPU": 16, "GPU": 4}, 1.0, 1.0) == 4
    assert infer.default_max_actors({"CPU": 4}, 1.0, 0.0) == 3
    assert infer.default_actor_threads(0.5) == 1 and infer.default_actor_threads(2.0) == 2


@pytest.mark.skipif(not DR17.is_dir(), reason=f"APOGEE DR17 files not found at {DR17}")
def test_cli_scores_apogee_fits(ray_session, checkpoint, tmp_path, capsys):
    """FITS inputs are ingested into out/_ingested and scored label-free (no labels)."""
    from mendis_ray.cli import main

    files = sorted(str(p) for p in DR17.glob("apStar-*.fits"))
    out = tmp_path / "out"
    rc = main(["score", str(checkpoint), *files, "--out", str(out), "--batch-size", "8",
               "--max-actors", "1", "--cpus-per-actor", "0.5", "--top-n", "5",
               "--gallery-n", "2"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert str(out / "scores") in printed and str(out / "top_outliers.csv") in printed
    assert sorted(p.suffix for p in (out / "_ingested").glob("*.parquet")) == [".parquet"]
    scores = pq.read_table(out / "scores")
    assert scores.num_rows == len(files)
    assert np.isnan(scores.column("log_p").to_numpy()).all()  # no labels: label-free score
    assert np.isfinite(scores.column("log_p_marginal").to_numpy()).all()
    assert np.isfinite(scores.column("teff_used").to_numpy()).all()
    assert (out / "gallery.png").exists()


def test_signal_checkpoint_scores_in_batches_of_its_kind(
    ray_session, signal_checkpoint, survey_sets, tmp_path
):
    """A signal-space checkpoint through ``score_catalog``: batches of the kind's default
    size (ScoreConfig.batch_size unset: 1,024, not the flow's 256; recorded in
    summary.json) and every score equal to SignalScorer.score on the same rows."""
    from mendis_ray.config import SCORE_BATCH_SIZE, ScoreConfig
    from mendis_ray.science.signal_scores import load_scorer
    from mendis_ray.spectra.shards import read_dataset, table_arrays

    cfg = ScoreConfig(max_actors=1, num_cpus_per_actor=0.5, top_n=5, gallery_n=1)
    res = infer.score_catalog(signal_checkpoint, [survey_sets / "test"], tmp_path / "out", cfg)
    assert res.summary["batch_size"] == SCORE_BATCH_SIZE["signal"] == 1024
    assert ScoreConfig(batch_size=64).batch_size_for("signal") == 64  # a setting wins
    inputs = read_dataset(survey_sets / "test")
    a = table_arrays(inputs)
    want = load_scorer(signal_checkpoint).score(a.flux, a.ivar, a.labels)
    got = pq.read_table(res.scores)
    pos = {rid: k for k, rid in enumerate(got.column("id").to_pylist())}
    order = np.array([pos[rid] for rid in inputs.column("id").to_pylist()])
    for name, values in want.items():
        cols = USED_COLUMNS if name == "labels_used" else [name]
        col = np.stack([got.column(c).to_numpy(zero_copy_only=False)[order] for c in cols], 1)
        col = col.reshape(np.shape(values))
        if np.asarray(values).dtype.kind == "f":
            # the flow runs in float32: rows batched differently (actor batches per shard,
            # one thread vs the test's two) differ in the last bits, ~2e-6 here; the
            # documented bound for batch companions is ood.BATCH_TOLERANCE (2e-3)
            np.testing.assert_allclose(col, values, rtol=1e-6, atol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(col, values, err_msg=name)


def test_only_shards_larger_than_a_batch_are_repartitioned(ray_session, checkpoint, sim_sets,
                                                           capsys):  # fmt: skip
    """The repartition splits a shard among actors; shards that fit in one batch skip it
    (its tasks copy every block and took the reads' CPU: the feed halved at 100,000
    spectra).  The lazy plans say which."""
    from mendis_ray.distributed.data import check_shards, list_shards

    shards = check_shards(list_shards(sim_sets / "test"))
    largest = max(shards.rows)
    assert largest > 1
    infer.build_pipeline(checkpoint, shards, batch_size=largest).explain()
    assert "Repartition" not in capsys.readouterr().out
    infer.build_pipeline(checkpoint, shards, batch_size=largest - 1).explain()
    assert "Repartition" in capsys.readouterr().out
