import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mendis_ray.spectra import shards
from mendis_ray.spectra.grid import aspcap_grid, paper_grid
from mendis_ray.spectra.schema import WAVE_KEY
from mendis_ray.spectra.shards import ShardError


def _table(n=5, n_pix=2405, seed=0):
    rng = np.random.default_rng(seed)
    flux = rng.random((n, n_pix)).astype(np.float32)
    ivar = np.full((n, n_pix), 9e4, np.float32)
    teff = np.linspace(4300, 4500, n)
    teff[1] = np.nan  # unlabelled
    return shards.make_table(
        [f"s{i}" for i in range(n)],
        flux,
        ivar,
        teff=teff,
        logg=np.full(n, 2.0),
        feh=np.zeros(n),
        snr=np.full(n, 300.0),
        source="test",
        extra={"truth_class": np.array(["train"] * n), "truth_teff": teff},
    )


def test_roundtrip_and_labels(tmp_path):
    g = paper_grid()
    t = _table()
    files = shards.write_dataset(tmp_path / "d", [t.slice(0, 3), t.slice(3)], 2, g, {"name": "t"})
    assert [f.name for f in files] == ["part-00000-of-00002.parquet", "part-00001-of-00002.parquet"]
    back = shards.read_dataset(tmp_path / "d", g)
    a = shards.table_arrays(back)
    src = shards.table_arrays(shards._with_metadata(t, g, {}))
    np.testing.assert_array_equal(a.flux, src.flux)
    assert np.isnan(a.labels[1, 0]) and a.labels[0, 0] == 4300
    meta = shards.shard_metadata(files[0])
    assert meta["grid"]["n_pix"] == 2405 and meta["generator"] == {"name": "t"}
    manifest = json.loads((tmp_path / "d" / "_manifest.json").read_text())
    assert manifest["total_rows"] == 5
    assert not list((tmp_path / "d").glob(".*"))  # no temp files left


def test_readable_by_other_arrow_tools(tmp_path):
    pd = pytest.importorskip("pandas")
    duckdb = pytest.importorskip("duckdb")
    path = shards.write_shard(tmp_path / "x.parquet", _table(), paper_grid())
    df = pd.read_parquet(path)
    assert len(df) == 5 and len(df.flux.iloc[0]) == 2405
    n, mean_len = duckdb.sql(f"select count(*), avg(len(flux)) from '{path}'").fetchall()[0]
    assert n == 5 and mean_len == 2405
    wl = np.frombuffer(pq.read_schema(path).metadata[b"mendis_ray.wavelength"], "<f8")
    np.testing.assert_allclose(wl, paper_grid().wavelength)


def test_rewrite_removes_stale_shards_and_keeps_old_file_on_failure(tmp_path, monkeypatch):
    g = paper_grid()
    t = _table(6)
    shards.write_dataset(tmp_path, [t.slice(0, 2), t.slice(2, 2), t.slice(4)], 3, g)
    shards.write_dataset(tmp_path, [t], 1, g)
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == ["part-00000-of-00001.parquet"]
    before = (tmp_path / "part-00000-of-00001.parquet").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(OSError, match="disk full"):
        shards.write_shard(tmp_path / "part-00000-of-00001.parquet", _table(2, seed=3), g)
    assert (tmp_path / "part-00000-of-00001.parquet").read_bytes() == before
    assert not list(tmp_path.glob(".*tmp"))


def test_interrupted_write_is_refused_not_read_in_part(tmp_path):
    g = paper_grid()
    t = _table(6)

    def tables():  # the job dies after writing the first of three shards
        yield t.slice(0, 2)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        shards.write_dataset(tmp_path / "d", tables(), 3, g)
    assert [p.name for p in (tmp_path / "d").glob("*.parquet")] == ["part-00000-of-00003.parquet"]
    with pytest.raises(ShardError, match=r"_writing marker.*interrupted"):
        shards.dataset_files(tmp_path / "d")
    shards.write_dataset(tmp_path / "d", [t.slice(0, 2), t.slice(2, 2), t.slice(4)], 3, g)
    assert len(shards.dataset_files(tmp_path / "d")) == 3  # the rewrite is whole again
    assert not (tmp_path / "d" / "_writing").exists()

    # an interrupted REwrite: the old manifest still names all three files, one is new
    with pytest.raises(KeyboardInterrupt):
        shards.write_dataset(tmp_path / "d", tables(), 3, g)
    assert (tmp_path / "d" / "_manifest.json").exists()
    with pytest.raises(ShardError, match=r"_writing marker"):
        shards.dataset_files(tmp_path / "d")


def test_partial_copy_without_manifest_is_refused(tmp_path):
    g = paper_grid()
    t = _table(6)
    shards.write_dataset(tmp_path / "d", [t.slice(0, 2), t.slice(2, 2), t.slice(4)], 3, g)
    (tmp_path / "e").mkdir()
    part = tmp_path / "e" / "part-00000-of-00003.parquet"
    part.write_bytes((tmp_path / "d" / part.name).read_bytes())  # one of three, no manifest
    with pytest.raises(ShardError, match=r"incomplete dataset, 1 of 3 'part' shards.*\[1, 2\]"):
        shards.dataset_files(tmp_path / "e")
    assert shards.dataset_files(part) == [part]  # a file named on purpose is fine


def _write_raw(path, table, grid):
    pq.write_table(shards._with_metadata(table, grid, {}), path)
    return path


def test_wrong_grid_is_refused(tmp_path):
    p = shards.write_shard(tmp_path / "a.parquet", _table(), paper_grid())
    with pytest.raises(ShardError, match=r"a\.parquet.*grid 'paper'.*aspcap"):
        shards.read_shard(p, aspcap_grid())


def test_wrong_length_names_file(tmp_path):
    t = _table(n_pix=2400)
    p = _write_raw(tmp_path / "short.parquet", t, paper_grid())
    with pytest.raises(ShardError, match=r"short\.parquet.*2400 pixels.*2405"):
        shards.read_shard(p)


def test_variable_length_list_names_row(tmp_path):
    t = _table(3)
    rows = [np.ones(2405, np.float32).tolist()] * 3
    rows[2] = rows[2][:100]
    t = t.set_column(t.column_names.index("flux"), "flux", pa.array(rows, pa.list_(pa.float32())))
    p = _write_raw(tmp_path / "ragged.parquet", t, paper_grid())
    with pytest.raises(ShardError, match=r"ragged\.parquet.*row 2 \(id 's2'\) has 100 pixels"):
        shards.read_shard(p)


@pytest.mark.parametrize(
    ("column", "value", "match"),
    [
        ("flux", np.nan, "a non-finite"),
        ("flux", np.inf, "a non-finite"),
        ("ivar", -1.0, "a negative"),
    ],
)
def test_bad_values_name_file_and_row(tmp_path, column, value, match):
    g = paper_grid()
    t = _table()
    a = shards.table_arrays(shards._with_metadata(t, g, {}))
    arr = getattr(a, column).copy()
    arr[3, 17] = value
    t = t.set_column(t.column_names.index(column), column, shards.matrix_column(arr))
    p = _write_raw(tmp_path / "bad.parquet", t, g)
    with pytest.raises(ShardError, match=rf"bad\.parquet: row 3 \(id 's3'\) has {match}.*pixel 17"):
        shards.read_shard(p)
    with pytest.raises(ShardError, match="row 3"):  # the writer refuses it too
        shards.write_shard(tmp_path / "w.parquet", t, g)
    assert not (tmp_path / "w.parquet").exists()


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_flux_at_a_masked_pixel_reads_and_writes_as_a_placeholder(tmp_path, value):
    """NaN is a common mark of a bad pixel: at ivar 0 it carries no information, so the
    readers and the writer take it (as 1); at a good pixel it is still refused."""
    g = paper_grid()
    t = shards._with_metadata(_table(), g, {})
    a = shards.table_arrays(t)
    flux, ivar = a.flux.copy(), a.ivar.copy()
    flux[2, [7, 9]], ivar[2, [7, 9]] = value, 0.0
    t = t.set_column(t.column_names.index("flux"), "flux", shards.matrix_column(flux))
    t = t.set_column(t.column_names.index("ivar"), "ivar", shards.matrix_column(ivar))
    want = np.where(ivar == 0, 1.0, flux)
    raw = _write_raw(tmp_path / "raw.parquet", t, g)
    for p in (raw, shards.write_shard(tmp_path / "w.parquet", t, g)):
        back = shards.table_arrays(shards.read_shard(p))
        np.testing.assert_array_equal(back.flux, want)
        np.testing.assert_array_equal(back.ivar, ivar)
    assert np.isfinite(shards.table_arrays(pq.read_table(tmp_path / "w.parquet")).flux).all()
    ivar[2, 9] = 1.0
    t = t.set_column(t.column_names.index("ivar"), "ivar", shards.matrix_column(ivar))
    with pytest.raises(ShardError, match=r"bad\.parquet: row 2 \(id 's2'\) has a non-finite"):
        shards.read_shard(_write_raw(tmp_path / "bad.parquet", t, g))


def test_missing_columns_and_unreadable_files(tmp_path):
    g = paper_grid()
    p = _write_raw(tmp_path / "m.parquet", _table().drop_columns(["snr", "feh"]), g)
    a = shards.table_arrays(shards.read_shard(p))  # optional columns read as unknown
    assert np.isnan(a.snr).all() and np.isnan(a.labels[:, 2]).all()
    assert a.labels[0, 0] == 4300
    p = _write_raw(tmp_path / "f.parquet", _table().drop_columns(["flux"]), g)
    with pytest.raises(ShardError, match=r"f\.parquet: missing required column\(s\) \['flux'\]"):
        shards.read_shard(p)
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ShardError, match=r"junk\.parquet: not a readable Parquet"):
        shards.read_shard(tmp_path / "junk.parquet")
    with pytest.raises(ShardError, match="no such file"):
        shards.dataset_files(tmp_path / "nowhere")


def _plain(table, variable):
    """``table`` as a user's plain file: no metadata, float64 labels, integer ids, and
    (``variable``) flux and ivar as variable-length lists."""
    t = table.replace_schema_metadata(None).drop_columns(["snr"])
    t = t.set_column(0, "id", pa.array(np.arange(t.num_rows) + 10**15))
    t = t.set_column(t.schema.get_field_index("teff"), "teff", t["teff"].cast(pa.float64()))
    if variable:
        for name in ("flux", "ivar"):
            col = t[name].combine_chunks()
            offsets = pa.array(np.arange(len(col) + 1, dtype=np.int32) * col.type.list_size)
            t = t.set_column(
                t.schema.get_field_index(name), name,
                pa.ListArray.from_arrays(offsets, col.flatten()),
            )  # fmt: skip
    return t


@pytest.mark.parametrize("variable", [False, True])
@pytest.mark.parametrize("grid", [paper_grid(), aspcap_grid()], ids=lambda g: g.name)
def test_plain_parquet_is_read_as_the_grid_of_its_row_length(tmp_path, grid, variable):
    t = _table(n_pix=grid.n_pix)
    p = tmp_path / "plain.parquet"
    pq.write_table(_plain(t, variable), p)
    assert shards.shard_metadata(p)["grid"] == grid.describe()
    back = shards.read_shard(p, grid)
    a, want = shards.table_arrays(back), shards.table_arrays(shards._with_metadata(t, grid, {}))
    np.testing.assert_array_equal(a.flux, want.flux)
    np.testing.assert_array_equal(a.labels, want.labels)
    assert a.ids[0] == str(10**15) and np.isnan(a.snr).all()
    assert shards.schema_metadata(back.schema, "read")["grid"]["hash"] == grid.hash
    with pytest.raises(ShardError, match=r"plain\.parquet.*grid 'paper'"):
        shards.read_shard(p, paper_grid() if grid.n_pix != 2405 else aspcap_grid())


def test_plain_parquet_of_an_unknown_length_is_refused_naming_the_file(tmp_path):
    p = tmp_path / "odd.parquet"
    pq.write_table(_plain(_table(n_pix=1000), variable=True), p)
    for read in (shards.shard_metadata, shards.read_shard):
        with pytest.raises(ShardError, match=r"odd\.parquet: no 'mendis_ray' file metadata.*"
                           r"rows of 1000 pixels match no grid"):  # fmt: skip
            read(p)


def test_matrix_column_and_list_matrix_round_trip_and_name_bad_rows():
    m = np.arange(12, dtype=np.float64).reshape(3, 4)
    col = shards.matrix_column(m)
    assert col.type == pa.list_(pa.float32(), 4)
    back = shards.list_matrix(col, 4)
    assert back.dtype == np.float32 and np.array_equal(back, m)
    assert shards.list_matrix(shards.matrix_column(np.zeros((0, 4))), 4).shape == (0, 4)
    with pytest.raises(ShardError, match="rows have 4 pixels, the grid has 5"):
        shards.list_matrix(col, 5)
    ragged = pa.array([[1.0, 2.0], [3.0]], pa.list_(pa.float32()))
    with pytest.raises(ShardError, match=r"flux: row 1 \(id 'b'\) has 1 pixels"):
        shards.list_matrix(ragged, 2, "flux", pa.array(["a", "b"]))
    with pytest.raises(ShardError, match="list column: row 1 has 1 pixels"):
        shards.list_matrix(ragged, 2)
    with pytest.raises(ShardError, match="expected float values"):
        shards.list_matrix(pa.array([[1, 2]], pa.list_(pa.int32(), 2)), 2)


def test_a_shard_given_twice_is_read_once(tmp_path, caplog):
    """A folder given twice, or with one of its own files: each file once, with a warning
    (before: "id 's0' occurs twice", as if two different spectra shared an id)."""
    from mendis_ray.distributed.data import list_shards

    t = _table()
    files = shards.write_dataset(tmp_path / "d", [t.slice(0, 3), t.slice(3)], 2, paper_grid(), {})
    with caplog.at_level("WARNING", logger="mendis_ray"):
        got = list_shards([tmp_path / "d", files[1], tmp_path / "d"])
    assert got == [f.resolve() for f in files]
    assert "2 shard file(s) given more than once" in caplog.text


@pytest.mark.parametrize(
    "manifest, match",
    [
        ("[1, 2]", r"no 'files' list of file names"),
        ('{"files": null}', r"no 'files' list of file names"),
        ('{"files": [1, 2]}', r"no 'files' list of file names"),
        ('{"files": "d-00000.parquet"}', r"no 'files' list of file names"),
        (b"\xff\xfe{}", r"unreadable manifest \('utf-8' codec"),
        ('{"files": ["../other/x.parquet"]}', r"lists files outside its folder: \['\.\./other"),
        ('{"files": ["/etc/x.parquet"]}', r"lists files outside its folder"),
        ("directory", r"unreadable manifest \(\[Errno 21\]"),
    ],
    ids=["a list", "null", "numbers", "a string", "not utf-8", "up", "absolute", "a folder"],
)
def test_a_malformed_manifest_is_named_not_a_traceback(tmp_path, manifest, match):
    """A ``_manifest.json`` that is not an object with a list of file names in its own
    folder stops with a ShardError naming it (these raised TypeError or
    IsADirectoryError, or read a file elsewhere, or read a string letter by letter)."""
    shards.write_dataset(tmp_path / "d", [_table()], 1, paper_grid())
    path = tmp_path / "d" / "_manifest.json"
    path.unlink()
    if manifest == "directory":
        path.mkdir()
    elif isinstance(manifest, bytes):
        path.write_bytes(manifest)
    else:
        path.write_text(manifest)
    with pytest.raises(ShardError, match=r"d/_manifest\.json: .*" + match.split(": ")[-1]):
        shards.dataset_files(tmp_path / "d")


def test_a_batch_s_bad_column_names_its_file(tmp_path):
    """A label column of text that is not a number stops validation naming the shard the
    batch came from (its ``path`` column), as a row's bad pixel does."""
    from mendis_ray.spectra.batches import validate_batch

    t = _table(n=3)
    t = t.set_column(t.schema.get_field_index("teff"), "teff", pa.array(["4400", "hot", "4500"]))
    t = t.append_column("path", pa.array(["/data/cat/part-7.parquet"] * 3))
    with pytest.raises(ShardError, match=r"cat/part-7\.parquet: column 'teff' must hold numbers"):
        validate_batch(t, 2405)


def test_a_page_damaged_after_writing_is_named(tmp_path):
    """Shards are written with page CRC checksums and read with them verified: one bit
    flipped in a data page stops the read with a ShardError naming the file (pyarrow read
    it as finite garbage flux before); the undamaged copy reads as written."""
    shards.write_dataset(tmp_path / "d", [_table()], 1, paper_grid())
    (good,) = sorted((tmp_path / "d").glob("*.parquet"))
    data = bytearray(good.read_bytes())
    data[len(data) // 3] ^= 0x01
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"bad\.parquet: damaged: a page's bytes do not match"):
        shards.read_shard(bad)
    assert shards.read_shard(good).num_rows == 5
    err = shards.damaged_error([good, bad], OSError("x"))
    assert str(err).startswith(f"{bad}: damaged")


@pytest.mark.parametrize(
    "edit",
    [lambda w: w[:1000], lambda w: np.full_like(w, np.nan), lambda w: w[::-1]],
    ids=["truncated", "nan", "reversed"],
)
def test_wavelength_metadata_that_is_not_the_grid_s_is_named(tmp_path, edit):
    """A shard's pixel wavelengths (the ``mendis_ray.wavelength`` key) must be its grid's:
    truncated or edited ones were copied into a checkpoint by ``mendis train`` and named the
    wrong lines in every explanation.  Each read names the file; the unedited shard reads."""
    shards.write_dataset(tmp_path / "d", [_table()], 1, paper_grid())
    (good,) = sorted((tmp_path / "d").glob("*.parquet"))
    table = pq.read_table(good)
    kv = dict(table.schema.metadata)
    kv[WAVE_KEY] = edit(np.frombuffer(kv[WAVE_KEY], "<f8")).astype("<f8").tobytes()
    bad = tmp_path / "bad.parquet"
    pq.write_table(table.replace_schema_metadata(kv), bad)
    with pytest.raises(ShardError, match=r"bad\.parquet: its 'mendis_ray.wavelength' metadata"):
        shards.read_shard(bad)
    with pytest.raises(ShardError, match=r"bad\.parquet"):
        shards.shard_metadata(bad)
    assert shards.read_shard(good).num_rows == 5
