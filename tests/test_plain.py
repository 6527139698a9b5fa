"""Plain Parquet files (mendis_ray.spectra.plain): what users write with pandas or pyarrow
reads as the shard it stands for, on ``mendis train``'s reader and on the Ray Data batches
of ``mendis score`` (``validate_batch``), or is refused naming the file."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mendis_ray.spectra import shards
from mendis_ray.spectra.batches import validate_batch
from mendis_ray.spectra.grid import aspcap_grid, paper_grid
from mendis_ray.spectra.schema import ShardError, impossible_labels, possible_labels

N, P = 6, 2405


def _shard(seed=0) -> pa.Table:
    """A shard table (with metadata) of N stars; pixels 7 and 9 of star 2 masked."""
    rng = np.random.default_rng(seed)
    flux = (1 - 0.3 * rng.random((N, P))).astype(np.float32)
    ivar = np.full((N, P), 1e4, np.float32)
    ivar[2, [7, 9]] = 0
    t = shards.make_table([str(1000 * (seed + 1) + i) for i in range(N)], flux, ivar,
                          teff=np.linspace(4300, 4800, N), logg=np.full(N, 2.5),
                          feh=np.linspace(-0.5, 0.2, N), snr=np.full(N, 100.0))  # fmt: skip
    return shards._with_metadata(t, paper_grid(), {})


def _lists(m: np.ndarray) -> pa.Array:
    return pa.array([row.tolist() for row in m], pa.list_(pa.float64()))


def _user(t: pa.Table, variant: str) -> pa.Table:
    """``t`` as a user's file: no metadata, ids as integers, and the variant's quirk."""
    a = shards.table_arrays(t)
    cols = {"id": pa.array([int(i) for i in a.ids]), "flux": _lists(a.flux),
            "ivar": _lists(a.ivar), "teff": a.labels[:, 0], "logg": a.labels[:, 1],
            "feh": a.labels[:, 2], "snr": a.snr, "ra": np.arange(N, dtype=float)}  # fmt: skip
    if variant == "apogee names":  # an allStar's upper-case names, FE_H for [Fe/H]
        cols = {k.upper() if k != "feh" else "FE_H": v for k, v in cols.items()}
    elif variant == "text labels, null snr":
        cols["teff"] = pa.array([str(v) for v in a.labels[:, 0]])
        cols["snr"] = pa.nulls(N)
    elif variant == "NaN marks masked pixels":
        flux, ivar = a.flux.copy(), a.ivar.copy()
        flux[2, [7, 9]], ivar[2, [7, 9]] = np.nan, np.nan
        cols["flux"], cols["ivar"] = _lists(flux), _lists(ivar)
    elif variant == "large strings":  # pandas with pyarrow strings
        cols["id"] = pa.array([str(i) for i in a.ids], pa.large_string())
        cols["source"] = pa.array(["mine"] * N, pa.large_string())
    return pa.table(cols)


@pytest.mark.parametrize(
    "variant", ["plain", "apogee names", "text labels, null snr", "NaN marks masked pixels",
                "large strings"],
)  # fmt: skip
def test_a_users_plain_file_reads_as_its_shard(tmp_path, variant):
    t = _shard()
    want = shards.table_arrays(t)
    pq.write_table(_user(t, variant), tmp_path / "mine.parquet")
    got = shards.table_arrays(shards.read_shard(tmp_path / "mine.parquet", paper_grid()))
    batch = validate_batch(pq.read_table(tmp_path / "mine.parquet"), P)  # mendis score's path
    for a in (got, shards.table_arrays(shards._with_metadata(batch, paper_grid(), {}))):
        assert a.ids.tolist() == want.ids.tolist()
        np.testing.assert_array_equal(a.ivar, want.ivar)
        good = want.ivar > 0
        np.testing.assert_array_equal(a.flux[good], want.flux[good])
        assert np.isfinite(a.flux).all()
        np.testing.assert_allclose(a.labels, want.labels, rtol=1e-6)
        if variant == "text labels, null snr":
            assert np.isnan(a.snr).all()
        else:
            np.testing.assert_array_equal(a.snr, want.snr)
    assert "ra" in [c.lower() for c in batch.column_names]  # carried as it is
    assert batch.schema.field("id").type == pa.string()


def test_a_null_flux_row_is_a_spectrum_without_data(tmp_path):
    a = shards.table_arrays(_shard())
    flux = pa.array([None if i == 0 else row.tolist() for i, row in enumerate(a.flux)],
                    pa.list_(pa.float32()))  # fmt: skip
    t = pa.table({"id": list(a.ids), "flux": flux, "ivar": _lists(a.ivar)})
    pq.write_table(t, tmp_path / "null.parquet")
    got = shards.table_arrays(shards.read_shard(tmp_path / "null.parquet"))
    assert (got.ivar[0] == 0).all() and np.isfinite(got.flux[0]).all()
    np.testing.assert_array_equal(got.flux[1:], a.flux[1:])
    assert np.isnan(got.labels).all()  # no label columns: unknown


def test_a_folder_of_plain_files_and_shards_reads_as_one_and_names_a_stranger(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    pq.write_table(_user(_shard(1), "large strings"), folder / "a.parquet")
    shards.write_shard(folder / "b.parquet", _shard(2), paper_grid())
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "flux": _lists(np.zeros((0, P))),
                             "ivar": _lists(np.zeros((0, P)))}), folder / "c.parquet")  # fmt: skip
    t = shards.read_dataset(folder)  # c.parquet: no rows, left out
    assert t.num_rows == 2 * N and t.schema.field("flux").type == pa.list_(pa.float32(), P)
    rng = np.random.default_rng(0)
    odd = pa.table({"id": ["x"], "flux": _lists(rng.random((1, 7214))),
                    "ivar": _lists(np.ones((1, 7214)))})  # fmt: skip
    pq.write_table(odd, folder / "d.parquet")
    with pytest.raises(ShardError, match=r"d\.parquet: shard grid 'aspcap'.*'paper'"):
        shards.read_dataset(folder)
    assert shards.shard_metadata(folder / "d.parquet")["grid"] == aspcap_grid().describe()


@pytest.mark.parametrize(
    ("values", "match"),
    [([["a"] * P], "'flux'.*float"), ("labels", r"column 'teff' must hold numbers")],
)
def test_what_cannot_be_read_is_named(tmp_path, values, match):
    a = shards.table_arrays(_shard())
    if values == "labels":
        t = pa.table({"id": list(a.ids), "flux": _lists(a.flux), "ivar": _lists(a.ivar),
                      "teff": ["hot"] * N})  # fmt: skip
    else:
        t = pa.table({"id": ["s"], "flux": pa.array(values), "ivar": _lists(np.ones((1, P)))})
    pq.write_table(t, tmp_path / "bad.parquet")
    with pytest.raises(ShardError, match=rf"bad\.parquet.*{match}"):
        shards.read_shard(tmp_path / "bad.parquet")


def test_impossible_labels_are_missing():
    labels = np.array([[4500, 2.5, -0.1], [-9999, 2.5, 0.0], [4500, np.inf, 0], [4.5, 2.0, 0.0]])
    got = possible_labels(labels)
    np.testing.assert_array_equal(got[0], labels[0])
    assert np.isnan(got[1, 0]) and np.isnan(got[2, 1]) and np.isnan(got[3, 0])  # kK is no K
    np.testing.assert_array_equal(got[1:, 2], labels[1:, 2])
    # flagged: a value outside the limits; not flagged: the catalogue's mark, inf (NONFINITE)
    np.testing.assert_array_equal(impossible_labels(labels), [False, False, False, True])
