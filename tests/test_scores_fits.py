"""FITS score tables (mendis_ray.scores_fits) and the APOGEE identifiers of ingested files."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from astropy.io import fits
from astropy.table import Table

from mendis_ray.scores_fits import FLAG_DOC, flag_header_cards, write_fits_tables
from mendis_ray.spectra.ingest import ingest_apogee
from mendis_ray.spectra.shards import read_dataset

DR17 = Path(__file__).resolve().parents[2] / "shared" / "data" / "apogee_dr17"


def _scores() -> pa.Table:
    return pa.table({
        "id": ["a", "bb", "c"],
        "sdss_id": pa.array([(1 << 60) + 1, None, 3], pa.int64()),  # > 2**53: exact
        "gaia_dr3_source_id": pa.array([4295806720, 38655544960, 1], pa.int64()),
        "field": pa.array(["000+02", None, "K04_083+13"]),
        "percentile": pa.array([0.5, None, 2.0]),
        "log_p": pa.array([-np.inf, 1.0, 2.0]),
        "flag_masked": [True, False, None],
        "flags": pa.array([2, 0, 16], pa.int64()),
        "flux": pa.array([[1.0], [2.0], [3.0]]),  # nested: left out
    })  # fmt: skip


def test_fits_table_keeps_ids_types_and_nulls(tmp_path):
    path = write_fits_tables(tmp_path / "scores.fits", {"SCORES": _scores()})
    assert [p.name for p in tmp_path.iterdir()] == ["scores.fits"]  # no temporary left
    t = Table.read(path, hdu="SCORES")
    assert t.colnames == ["ID", "SDSS_ID", "GAIA_DR3_SOURCE_ID", "FIELD", "PERCENTILE",
                          "LOG_P", "FLAG_MASKED", "FLAGS"]  # fmt: skip
    assert (
        t["SDSS_ID"].dtype.kind == "i"
        and t["SDSS_ID"].dtype.itemsize == 8
        and t["SDSS_ID"][0] == (1 << 60) + 1
    )
    assert t["SDSS_ID"].mask.tolist() == [False, True, False]  # TNULL
    assert t["GAIA_DR3_SOURCE_ID"].tolist() == [4295806720, 38655544960, 1]
    assert fits.getdata(path, "SCORES")["FIELD"].tolist() == ["000+02", "", "K04_083+13"]
    pct = np.ma.filled(t["PERCENTILE"], np.nan)
    assert pct[0] == 0.5 and np.isnan(pct[1])
    assert np.isneginf(t["LOG_P"][0])
    assert t["FLAG_MASKED"].tolist() == [True, False, False]
    assert t["FLAGS"].tolist() == [2, 0, 16]


def test_header_documents_every_flag_bit(tmp_path):
    cards = [("CHECKPT", "ckpt/x", "checkpoint"), *flag_header_cards()]
    path = write_fits_tables(tmp_path / "s.fits", {"SCORES": _scores()}, cards)
    with fits.open(path) as hdul:
        for h in (hdul[0].header, hdul["SCORES"].header):
            assert h["CHECKPT"] == "ckpt/x"
            comments = [str(c) for c in h["COMMENT"]]
            for bit, (name, meaning) in FLAG_DOC.items():
                n = int(np.log2(bit))
                assert h[f"FLAGBIT{n}"] == name.upper()
                assert f"bit {n}={bit} {name.upper()}: {meaning}" in comments  # one card


def test_long_path_card_is_kept_whole_without_warning(tmp_path):
    """A checkpoint path that leaves no room for its comment drops the comment rather than
    astropy truncating it with a console warning; a longer one continues on CONTINUE
    cards; the values stay whole."""
    mid, long = "/data/runs/" + "x" * 40 + "/ckpt", "/data/runs/" + "x" * 120 + "/ckpt"
    cards = [("CHECKPT", mid, "checkpoint that scored the catalog"),
             ("CHECKPT2", long, "checkpoint"), ("GRID", "apogee", "grid")]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = write_fits_tables(tmp_path / "s.fits", {"SCORES": _scores()}, cards)
    with fits.open(path) as hdul:
        h = hdul["SCORES"].header
        assert h["CHECKPT"] == mid and h.comments["CHECKPT"] == ""
        assert h["CHECKPT2"] == long and h.comments["GRID"] == "grid"


def test_a_case_clash_gets_a_suffix_not_a_lost_run(tmp_path, caplog):
    """An input's ``TEFF`` carried beside our ``teff`` (and its ``TEFF_2``): both kept,
    the run does not die at its last step."""
    t = pa.table({"id": [1], "ID": [2], "ID_2": [3], "teff": [4.0], "TEFF": [5.0]})
    write_fits_tables(tmp_path / "s.fits", {"S": t})
    with fits.open(tmp_path / "s.fits") as hdul:
        got = {c.name: hdul["S"].data[c.name][0] for c in hdul["S"].columns}
    assert got == {"ID": 1, "ID_3": 2, "ID_2": 3, "TEFF": 4.0, "TEFF_2": 5.0}
    assert "'TEFF' and 'teff'" in caplog.text or "'teff' and 'TEFF'" in caplog.text


@pytest.mark.shared
@pytest.mark.skipif(not DR17.is_dir(), reason=f"{DR17} absent (../shared)")
def test_ingested_apstar_carries_apogee_id_telescope_field(tmp_path):
    # the SAS layout stars/TELESCOPE/FIELD/ gives the telescope (DR17 headers lack it)
    sas = tmp_path / "stars" / "apo25m" / "000+02"
    sas.mkdir(parents=True)
    src = DR17 / "apStar-dr17-2M17335483-2753043.fits"
    (sas / src.name).symlink_to(src)
    other = DR17 / "apStar-dr17-2M19485057+5005279.fits"
    ingest_apogee([sas / src.name, other], tmp_path / "ds")
    t = read_dataset(tmp_path / "ds").to_pydict()
    rows = {i: (a, tel, f) for i, a, tel, f in
            zip(t["id"], t["apogee_id"], t["telescope"], t["field"], strict=True)}  # fmt: skip
    assert rows["2M17335483-2753043"] == ("2M17335483-2753043", "apo25m", "000+02")
    assert rows["2M19485057+5005279"] == ("2M19485057+5005279", "", "K04_083+13")
