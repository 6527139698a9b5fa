"""Tests of mendis_ray.spectra.fits: APOGEE FITS readers, pseudo-continuum, ingest."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from astropy.io import fits

from mendis_ray.spectra.continuum import chip_of_pixels, normalize, pseudo_continuum
from mendis_ray.spectra.fits import (
    DR13_CHIPS,
    FitsInputError,
    detect_apogee_type,
    prepare_spectrum,
    read_apogee,
    read_apstar,
    read_aspcapstar,
)
from mendis_ray.spectra.grid import (
    APSTAR_CDELT1,
    APSTAR_CRVAL1,
    APSTAR_NPIX,
    apstar_grid,
    aspcap_grid,
    log_lambda_grid,
    paper_grid,
    resample,
)
from mendis_ray.spectra.ingest import ingest_apogee, read_label_table
from mendis_ray.spectra.shards import read_dataset, table_arrays

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DR17 = SHARED / "apogee_dr17"
DR14_EXAMPLE = SHARED / "payne_zero" / "apogee_dr14_example.npz"
needs_dr17 = pytest.mark.skipif(
    not DR17.is_dir(), reason=f"real APOGEE DR17 files not found at {DR17} (../shared absent)"
)

# --------------------------------------------------------------------------------------
# Synthetic files in the apStar / aspcapStar layouts
# --------------------------------------------------------------------------------------

N_ROWS = 3


def true_continuum() -> np.ndarray:
    """(8575,) a slow cubic in pixel index, about 700-1000."""
    t = np.arange(APSTAR_NPIX) / APSTAR_NPIX - 0.5
    return 850.0 + 150.0 * t - 200.0 * t**2 + 300.0 * t**3


def line_profile(rng: np.random.Generator, n_lines: int = 250) -> np.ndarray:
    """(8575,) product of Gaussian absorption lines (depth 0.05-0.6, sigma 1-3 px)."""
    x = np.arange(APSTAR_NPIX, dtype=np.float64)
    profile = np.ones(APSTAR_NPIX)
    for c, d, s in zip(
        rng.uniform(0, APSTAR_NPIX, n_lines),
        rng.uniform(0.05, 0.6, n_lines),
        rng.uniform(1.0, 3.0, n_lines),
        strict=True,
    ):
        lo, hi = int(max(c - 8 * s, 0)), int(min(c + 8 * s, APSTAR_NPIX))
        profile[lo:hi] *= 1 - d * np.exp(-0.5 * ((x[lo:hi] - c) / s) ** 2)
    return profile


def synth_apstar(seed: int = 0, snr: float = 200.0) -> dict[str, np.ndarray]:
    """Arrays (N_ROWS, 8575) of a synthetic apStar file plus the truth."""
    rng = np.random.default_rng(seed)
    cont = true_continuum()
    lines = line_profile(rng)
    clean = cont * lines
    err = np.tile(cont / snr, (N_ROWS, 1))
    flux = clean + rng.normal(size=(N_ROWS, APSTAR_NPIX)) * err
    mask = np.zeros((N_ROWS, APSTAR_NPIX), dtype=np.int64)
    return {"flux": flux, "err": err, "mask": mask, "cont": cont, "lines": lines}


def write_apstar(
    path: Path,
    flux: np.ndarray,
    err: np.ndarray,
    mask: np.ndarray,
    objid: str | None = "2M00000000+0000001",
    header: dict | None = None,
    n_hdu: int = 4,
) -> Path:
    """Write an apStar-layout file: HDU0 header only, HDU1 flux, HDU2 err, HDU3 bitmask."""
    h0 = fits.PrimaryHDU()
    cards = {
        "CRVAL1": APSTAR_CRVAL1,
        "CDELT1": APSTAR_CDELT1,
        "CRPIX1": 1,
        "CTYPE1": "LOG-LINEAR",
        "NWAVE": APSTAR_NPIX,
        "SNR": 200.0,
        "NVISITS": N_ROWS - 2,
        "VHELIO": 12.5,
        "RV_TEFF": 4750.0,
        "RV_LOGG": 2.5,
        "RV_FEH": -0.25,
    }
    if objid is not None:
        cards["OBJID"] = objid
    cards.update(header or {})
    for k, v in cards.items():
        if v is None:
            h0.header.remove(k, ignore_missing=True)
        else:
            h0.header[k] = v
    hdus = [h0, fits.ImageHDU(flux), fits.ImageHDU(err), fits.ImageHDU(mask)][:n_hdu]
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return path


def write_aspcapstar(
    path: Path, flux: np.ndarray, err: np.ndarray, crval1: float, cdelt1: float = APSTAR_CDELT1
) -> Path:
    """Write an aspcapStar-layout file: HDU1 normalized flux, HDU2 error (1-d)."""
    h1 = fits.ImageHDU(flux)
    h1.header["CRVAL1"] = crval1
    h1.header["CDELT1"] = cdelt1
    h1.header["CRPIX1"] = 1
    h2 = fits.ImageHDU(err)
    fits.HDUList([fits.PrimaryHDU(), h1, h2, fits.ImageHDU(np.ones_like(flux))]).writeto(path)
    return path


@pytest.fixture(scope="module")
def synth() -> dict[str, np.ndarray]:
    return synth_apstar()


@pytest.fixture
def good_apstar(tmp_path: Path, synth: dict[str, np.ndarray]) -> Path:
    return write_apstar(
        tmp_path / "apStar-dr17-2M00000000+0000001.fits",
        synth["flux"],
        synth["err"],
        synth["mask"],
    )


def write_labels(path: Path, columns: dict[str, object]) -> Path:
    cols = []
    for name, values in columns.items():
        arr = np.asarray(values)
        fmt = "30A" if arr.dtype.kind in "US" else "E"
        cols.append(fits.Column(name=name, format=fmt, array=arr))
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols)]).writeto(path)
    return path


def assert_names_file(excinfo: pytest.ExceptionInfo, path: Path) -> None:
    assert path.name in str(excinfo.value), str(excinfo.value)


# --------------------------------------------------------------------------------------
# Real DR17 files
# --------------------------------------------------------------------------------------


def real_apstar_files() -> list[Path]:
    return sorted(DR17.glob("apStar-dr17-*.fits"))


@pytest.mark.shared
@needs_dr17
def test_real_apstar_read_grid_and_mask() -> None:
    files = real_apstar_files()
    assert len(files) == 2
    n_masked = 0
    for f in files:
        spec = read_apstar(f)
        assert f.name == f"apStar-dr17-{spec.id}.fits"
        assert spec.grid == apstar_grid() and spec.grid.hash == apstar_grid().hash
        assert spec.flux.shape == spec.err.shape == spec.bitmask.shape == (APSTAR_NPIX,)
        assert spec.snr > 50 and np.isfinite(spec.rv_teff) and np.isfinite(spec.vhelio)
        bad_bits = (spec.bitmask & 0xFF) != 0
        assert np.all(spec.ivar[bad_bits] == 0)
        assert np.all(spec.ivar[~np.isfinite(spec.flux)] == 0)
        n_masked += int(bad_bits.sum())
        # sky-line residuals (SIG_SKYLINE, bit 12; 131 and 172 pixels in these files,
        # all but 5 of them good before) are masked as the APOGEE abundances mask them
        sky = (spec.bitmask & (1 << 12)) != 0
        assert sky.sum() > 100 and np.all(spec.ivar[sky] == 0)
        warn_only = ((spec.bitmask & ((1 << 11) | (1 << 13))) != 0) & ~bad_bits & ~sky
        assert (spec.ivar[warn_only] > 0).mean() > 0.9  # warning bits keep the pixel
    assert n_masked > 0  # the real files do have bits 0-7 set somewhere


@pytest.mark.shared
@needs_dr17
def test_real_apstar_normalized_on_paper_grid() -> None:
    for f in real_apstar_files():
        spec = read_apogee(f)
        flux, ivar = prepare_spectrum(spec, paper_grid())
        good = ivar > 0
        assert good.mean() > 0.8, f"{f.name}: {good.mean():.3f} good"
        assert 0.95 < np.median(flux[good]) < 1.02, f"{f.name}: {np.median(flux[good]):.3f}"
        assert np.all(np.isfinite(flux))
        # masked apStar pixels stay masked on the paper grid (it picks apStar pixels)
        bad = (spec.bitmask[paper_grid().apstar_index] & (0xFF | 1 << 12)) != 0
        assert np.all(ivar[bad] == 0)


@pytest.mark.shared
@needs_dr17
def test_real_single_visit_second_row_is_empty() -> None:
    f = DR17 / "apStar-dr17-2M19485057+5005279.fits"
    with pytest.raises(FitsInputError, match="all 8575 pixels of row 1 are bad") as e:
        read_apstar(f, row=1)
    assert_names_file(e, f)


@pytest.mark.shared
@needs_dr17
def test_real_apvisit_is_refused() -> None:
    f = sorted(DR17.glob("apVisit-*.fits"))[0]
    with pytest.raises(FitsInputError, match="apVisit") as e:
        read_apogee(f)
    assert_names_file(e, f)


@pytest.mark.shared
@needs_dr17
def test_real_ingest_round_trip(tmp_path: Path) -> None:
    files = real_apstar_files()
    out = tmp_path / "ds"
    written = ingest_apogee(files, out)
    assert len(written) == 1
    table = read_dataset(out, paper_grid())
    assert table.num_rows == 2
    arr = table_arrays(table)
    assert sorted(arr.ids) == sorted(read_apstar(f).id for f in files)
    assert np.all(np.isnan(arr.labels))  # no label table: null labels
    assert table.column("source").to_pylist() == ["apStar", "apStar"]
    assert np.all(np.isfinite(table.column("rv_teff").to_numpy()))
    assert np.all(arr.snr > 50)


@pytest.mark.shared
@pytest.mark.skipif(not DR14_EXAMPLE.is_file(), reason=f"{DR14_EXAMPLE} not found")
def test_real_dr14_7514_pixel_layout(tmp_path: Path) -> None:
    """A DR14 aspcapStar spectrum (7514 px, chip gaps removed, header CRVAL1 = 4.180476)
    lands on the right apStar pixels."""
    d = np.load(DR14_EXAMPLE)
    flux = np.where(d["good_pixel_mask"], d["normalized_flux"], 0.0)
    path = write_aspcapstar(
        tmp_path / "aspcapStar-r8-l31c.2-2M08002084+4044415.fits",
        flux,
        d["normalized_error"],
        crval1=APSTAR_CRVAL1 + APSTAR_CDELT1 * DR13_CHIPS[0][0],
    )
    spec = read_aspcapstar(path)
    assert spec.id == "2M08002084+4044415"
    np.testing.assert_array_equal(spec.grid.apstar_index, d["apstar_pixel"])
    np.testing.assert_allclose(spec.grid.wavelength, d["wavelength_nm"] * 10, rtol=1e-12)
    out_flux, out_ivar = prepare_spectrum(spec, paper_grid())
    where = np.searchsorted(d["apstar_pixel"], paper_grid().apstar_index)
    good = out_ivar > 0
    assert good.mean() > 0.8
    np.testing.assert_allclose(out_flux[good], d["normalized_flux"][where][good], rtol=1e-12)


# --------------------------------------------------------------------------------------
# Synthetic files
# --------------------------------------------------------------------------------------


def test_synthetic_apstar_read(good_apstar: Path, synth: dict[str, np.ndarray]) -> None:
    spec = read_apstar(good_apstar)
    assert spec.id == "2M00000000+0000001"
    assert spec.source == "apStar" and not spec.normalized
    assert spec.grid == apstar_grid()
    np.testing.assert_array_equal(spec.flux, synth["flux"][0])
    np.testing.assert_allclose(spec.ivar, 1 / synth["err"][0] ** 2)
    assert spec.snr == 200.0 and spec.rv_teff == 4750.0 and spec.n_visits == 1
    assert detect_apogee_type(good_apstar) == "apStar"
    np.testing.assert_array_equal(read_apstar(good_apstar, row=2).flux, synth["flux"][2])


def test_id_from_file_name_and_content_detection(
    tmp_path: Path, synth: dict[str, np.ndarray]
) -> None:
    named = write_apstar(
        tmp_path / "apStar-dr17-2M12345678-1234567.fits",
        synth["flux"],
        synth["err"],
        synth["mask"],
        objid=None,
    )
    assert read_apogee(named).id == "2M12345678-1234567"
    anon = write_apstar(
        tmp_path / "star.fits", synth["flux"], synth["err"], synth["mask"], header={"NWAVE": None}
    )
    assert detect_apogee_type(anon) == "apStar"
    asp = write_aspcapstar(
        tmp_path / "spec.fits",
        np.ones(APSTAR_NPIX),
        np.full(APSTAR_NPIX, 0.01),
        crval1=APSTAR_CRVAL1,
    )
    assert detect_apogee_type(asp) == "aspcapStar"
    assert read_apogee(asp).grid == apstar_grid()


def test_one_dimensional_apstar(tmp_path: Path, synth: dict[str, np.ndarray]) -> None:
    path = write_apstar(
        tmp_path / "apStar-dr17-2M00000000+0000002.fits",
        synth["flux"][0],
        synth["err"][0],
        synth["mask"][0],
    )
    spec = read_apstar(path)
    assert spec.flux.shape == (APSTAR_NPIX,)
    with pytest.raises(FitsInputError, match="row 1") as e:
        read_apstar(path, row=1)
    assert_names_file(e, path)


def test_pseudo_continuum_recovers_known_continuum(synth: dict[str, np.ndarray]) -> None:
    grid = apstar_grid()
    flux, err = synth["flux"][0], synth["err"][0]
    ivar = 1 / err**2
    cont = pseudo_continuum(flux, ivar, grid)
    chip = chip_of_pixels(grid)
    assert np.all(np.isnan(cont[chip < 0]))
    line_free = (chip >= 0) & (synth["lines"] > 0.999)
    assert line_free.sum() > 2000
    rel = np.abs(cont[line_free] / synth["cont"][line_free] - 1)
    assert rel.max() < 0.01, rel.max()
    flux_n, ivar_n, _ = normalize(flux, ivar, grid)
    assert np.all(ivar_n[chip < 0] == 0) and np.all(flux_n[chip < 0] == 1.0)
    ok = ivar_n > 0
    np.testing.assert_allclose(ivar_n[ok], ivar[ok] * cont[ok] ** 2)
    assert abs(np.median(flux_n[line_free]) - 1) < 0.005


def test_pseudo_continuum_ignores_masked_pixels(synth: dict[str, np.ndarray]) -> None:
    """Garbage flux (spikes, NaN) in masked pixels does not move the continuum."""
    grid = apstar_grid()
    flux, ivar = synth["flux"][0].copy(), 1 / synth["err"][0] ** 2
    ref = pseudo_continuum(flux, ivar, grid)
    rng = np.random.default_rng(1)
    bad = rng.choice(APSTAR_NPIX, 1500, replace=False)
    flux[bad[:1000]] = 1e6
    flux[bad[1000:]] = np.nan
    ivar = ivar.copy()
    ivar[bad] = 0
    cont = pseudo_continuum(flux, ivar, grid)
    chip = chip_of_pixels(grid)
    assert np.nanmax(np.abs(cont[chip >= 0] / ref[chip >= 0] - 1)) < 0.003


def test_masked_pixels_get_zero_ivar(tmp_path: Path, synth: dict[str, np.ndarray]) -> None:
    flux, err, mask = synth["flux"].copy(), synth["err"].copy(), synth["mask"].copy()
    for bit, pix in enumerate(range(1000, 1080, 10)):  # bits 0-7 on pixels 1000..1070
        mask[0, pix] |= 1 << bit
    mask[0, 2000] |= 1 << 9  # bit 9 (PERSIST_HIGH) is not "bad"
    mask[0, 2001] |= 1 << 13  # bit 13 (SIG_TELLURIC) is not "bad" either
    mask[0, 2500] |= 1 << 12  # bit 12 (SIG_SKYLINE) is: a sky residual, not the star
    flux[0, 2500] *= 3.0  # ... such as this emission-like spike
    flux[0, 3000] = np.nan
    err[0, 3001] = 0.0
    err[0, 3002] = 1e10  # the pipeline's BADERR
    path = write_apstar(tmp_path / "apStar-dr17-2M00000000+0000003.fits", flux, err, mask)
    spec = read_apstar(path)
    assert np.all(spec.ivar[1000:1080:10] == 0)
    assert spec.ivar[2000] > 0 and spec.ivar[2001] > 0
    assert spec.ivar[2500] == 0
    assert np.all(spec.ivar[3000:3003] == 0)
    assert np.count_nonzero(spec.ivar == 0) == 8 + 1 + 3
    out_flux, out_ivar = prepare_spectrum(spec, apstar_grid())
    assert np.all(out_ivar[1000:1080:10] == 0) and np.all(out_flux[1000:1080:10] == 1.0)
    assert np.all(out_ivar[3000:3003] == 0)


def test_aspcapstar_7514_pixels_other_start(tmp_path: Path) -> None:
    """A contiguous 7514-pixel log-lambda grid starting half a pixel off the apStar grid
    resamples onto the paper grid as the known input function."""
    crval1 = APSTAR_CRVAL1 + APSTAR_CDELT1 * 200.5
    n_pix = 7514
    loglam = crval1 + APSTAR_CDELT1 * np.arange(n_pix)

    def truth(ll: np.ndarray) -> np.ndarray:
        return 1.0 - 0.2 * np.sin(2 * np.pi * (ll - crval1) / (APSTAR_CDELT1 * 120.0))

    flux = truth(loglam)
    err = np.full(n_pix, 0.01)
    flux[500] = 0.0  # a masked pixel as aspcapStar files store it
    path = write_aspcapstar(tmp_path / "aspcapStar-dr17-2M00000000+0000004.fits", flux, err, crval1)
    spec = read_aspcapstar(path)
    assert spec.source == "aspcapStar" and spec.normalized and spec.grid.n_pix == n_pix
    assert spec.grid == log_lambda_grid(crval1, APSTAR_CDELT1, n_pix)
    assert spec.ivar[500] == 0 and np.count_nonzero(spec.ivar == 0) == 1
    out_flux, out_ivar = prepare_spectrum(spec, paper_grid())
    out_loglam = np.log10(paper_grid().wavelength)
    covered = out_loglam < loglam[-1]
    far = np.abs(out_loglam - loglam[500]) > 2 * APSTAR_CDELT1  # not next to the masked pixel
    good = out_ivar > 0
    assert np.all(good[covered & far]) and not np.any(good[~covered])
    # piecewise-constant integration of a smooth function: exact up to its curvature
    np.testing.assert_allclose(out_flux[good & far], truth(out_loglam)[good & far], atol=1e-3)
    # each output pixel straddles two input pixels: the variance halves
    np.testing.assert_allclose(np.median(out_ivar[good]), 2 / 0.01**2, rtol=1e-6)


def test_aspcapstar_known_layouts(tmp_path: Path) -> None:
    for n_pix, start, expect in ((7214, 322, aspcap_grid()), (8575, 0, apstar_grid())):
        path = write_aspcapstar(
            tmp_path / f"aspcapStar-{n_pix}.fits",
            np.ones(n_pix),
            np.full(n_pix, 0.01),
            crval1=APSTAR_CRVAL1 + APSTAR_CDELT1 * start,
        )
        assert read_aspcapstar(path).grid == expect


def test_ingest_attaches_labels(
    tmp_path: Path, synth: dict[str, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    ids = ["2M00000000+0000011", "2M00000000+0000012", "2M00000000+0000013"]
    paths = [
        write_apstar(
            tmp_path / f"apStar-dr17-{i}.fits", synth["flux"], synth["err"], synth["mask"], objid=i
        )
        for i in ids
    ]
    labels = write_labels(
        tmp_path / "allStar.fits",
        {
            "APOGEE_ID": [ids[0], ids[1], ids[1], "2M99999999+9999999"],
            "TEFF": [4500.0, -9999.0, 5100.0, 6000.0],
            "LOGG": [2.1, -9999.0, 4.4, 4.0],
            "FE_H": [-0.5, np.nan, 0.1, 0.0],
        },
    )
    table_map = read_label_table(labels)
    assert table_map[ids[1]] == pytest.approx((5100.0, 4.4, 0.1))  # first finite row wins
    out = tmp_path / "ds"
    with caplog.at_level(logging.INFO, logger="mendis_ray.spectra.ingest"):
        written = ingest_apogee(paths, out, labels_path=labels, n_shards=2)
    assert len(written) == 2
    per_file = [r for r in caplog.records if r.getMessage().startswith("read apStar-")]
    assert len(per_file) == 3
    arr = table_arrays(read_dataset(out, paper_grid()))
    by_id = dict(zip(arr.ids, arr.labels, strict=True))
    np.testing.assert_allclose(by_id[ids[0]], [4500.0, 2.1, -0.5], rtol=1e-6)
    np.testing.assert_allclose(by_id[ids[1]], [5100.0, 4.4, 0.1], rtol=1e-6)
    assert np.all(np.isnan(by_id[ids[2]]))  # not in the table: null labels
    table = read_dataset(out, paper_grid())
    assert table.column("rv_teff").to_pylist() == [4750.0] * 3
    assert table.column("source").to_pylist() == ["apStar"] * 3
    assert np.all(arr.snr == 200.0)
    good = arr.ivar > 0
    assert good.mean() > 0.99 and abs(np.median(arr.flux[good]) - 1) < 0.05


def test_ingest_carries_label_table_ids(tmp_path: Path, synth: dict[str, np.ndarray]) -> None:
    """The label table's identifier columns reach the shards untouched: a 64-bit Gaia id
    stays an exact int64, text ids stay text, a star absent from the table gets nulls."""
    ids = ["2M00000000+0000021", "2M00000000+0000022"]
    paths = [write_apstar(tmp_path / f"apStar-dr17-{i}.fits", synth["flux"], synth["err"],
                          synth["mask"], objid=i) for i in ids]  # fmt: skip
    gaia = np.array([4295806720123456789, 1], dtype=np.int64)  # beyond float precision
    cols = [fits.Column(name="APOGEE_ID", format="30A", array=np.array([ids[0], "2Mother"])),
            fits.Column(name="TEFF", format="E", array=np.array([4500.0, 4600.0])),
            fits.Column(name="LOGG", format="E", array=np.array([2.0, 2.1])),
            fits.Column(name="FE_H", format="E", array=np.array([0.0, 0.1])),
            fits.Column(name="GAIAEDR3_SOURCE_ID", format="K", array=gaia),
            fits.Column(name="SDSS_ID", format="K", array=np.array([77, 78])),
            fits.Column(name="TARGET_ID", format="20A",
                        array=np.array(["apo25m.x", "y"]))]  # fmt: skip
    labels = tmp_path / "allStar.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols)]).writeto(labels)
    ingest_apogee(paths, tmp_path / "ds", labels_path=labels)
    table = read_dataset(tmp_path / "ds", paper_grid())
    assert table.schema.field("gaiaedr3_source_id").type == pa.int64()
    rows = {r["id"]: r for r in table.select(
        ["id", "gaiaedr3_source_id", "sdss_id", "target_id"]).to_pylist()}  # fmt: skip
    assert rows[ids[0]] == {"id": ids[0], "gaiaedr3_source_id": 4295806720123456789,
                            "sdss_id": 77, "target_id": "apo25m.x"}  # fmt: skip
    assert rows[ids[1]]["gaiaedr3_source_id"] is None and rows[ids[1]]["target_id"] is None


def test_label_table_m_h_fallback_and_missing_column(tmp_path: Path) -> None:
    mh = write_labels(
        tmp_path / "mh.fits",
        {"APOGEE_ID": ["a"], "TEFF": [4000.0], "LOGG": [1.0], "M_H": [-1.0]},
    )
    assert read_label_table(mh)["a"] == pytest.approx((4000.0, 1.0, -1.0))
    no_logg = write_labels(tmp_path / "nologg.fits", {"APOGEE_ID": ["a"], "TEFF": [4000.0]})
    with pytest.raises(FitsInputError, match="LOGG") as e:
        read_label_table(no_logg)
    assert_names_file(e, no_logg)
    no_feh = write_labels(
        tmp_path / "nofeh.fits", {"APOGEE_ID": ["a"], "TEFF": [4000.0], "LOGG": [1.0]}
    )
    with pytest.raises(FitsInputError, match="FE_H or M_H") as e:
        read_label_table(no_feh)
    assert_names_file(e, no_feh)


# --------------------------------------------------------------------------------------
# Broken files
# --------------------------------------------------------------------------------------


def test_truncated_file(tmp_path: Path, good_apstar: Path) -> None:
    data = good_apstar.read_bytes()
    for n in (len(data) // 2, 5000, 100):
        bad = tmp_path / f"apStar-dr17-truncated-{n}.fits"
        bad.write_bytes(data[:n])
        with pytest.raises(FitsInputError, match="truncated") as e:
            read_apogee(bad)
        assert_names_file(e, bad)


def test_text_file_named_fits(tmp_path: Path) -> None:
    bad = tmp_path / "apStar-dr17-2M00000000+0000005.fits"
    bad.write_text("this is not a FITS file\n" * 20)
    with pytest.raises(FitsInputError, match="not a readable FITS") as e:
        read_apogee(bad)
    assert_names_file(e, bad)
    missing = tmp_path / "nope.fits"
    with pytest.raises(FitsInputError, match="no such file") as e:
        read_apogee(missing)
    assert_names_file(e, missing)


def test_missing_hdus(tmp_path: Path, synth: dict[str, np.ndarray]) -> None:
    bad = write_apstar(
        tmp_path / "apStar-dr17-2hdu.fits", synth["flux"], synth["err"], synth["mask"], n_hdu=2
    )
    with pytest.raises(FitsInputError, match="has 2 HDU") as e:
        read_apstar(bad)
    assert_names_file(e, bad)


@pytest.mark.parametrize(
    ("what", "match"),
    [
        ("err_shape", "HDU shapes differ"),
        ("three_d", "expected \\(n_pix,\\) or \\(n, n_pix\\)"),
        ("nwave", "NWAVE"),
    ],
)
def test_wrong_shapes(tmp_path: Path, synth: dict[str, np.ndarray], what: str, match: str) -> None:
    flux, err, mask = synth["flux"], synth["err"], synth["mask"]
    if what == "err_shape":
        err = err[:, :-1]
    elif what == "three_d":
        flux, err, mask = (a.reshape(N_ROWS, 5, -1) for a in (flux, err, mask))
    else:
        flux, err, mask = flux[:, :8000], err[:, :8000], mask[:, :8000]
    bad = write_apstar(tmp_path / f"apStar-dr17-{what}.fits", flux, err, mask)
    with pytest.raises(FitsInputError, match=match) as e:
        read_apstar(bad)
    assert_names_file(e, bad)


def test_missing_crval1(tmp_path: Path, synth: dict[str, np.ndarray]) -> None:
    bad = write_apstar(
        tmp_path / "apStar-dr17-nocrval.fits",
        synth["flux"],
        synth["err"],
        synth["mask"],
        header={"CRVAL1": None},
    )
    with pytest.raises(FitsInputError, match="CRVAL1 missing") as e:
        read_apstar(bad)
    assert_names_file(e, bad)


def test_all_pixels_bad(tmp_path: Path, synth: dict[str, np.ndarray]) -> None:
    bad = write_apstar(
        tmp_path / "apStar-dr17-allbad.fits", synth["flux"], synth["err"], synth["mask"] | 1
    )
    with pytest.raises(FitsInputError, match="all 8575 pixels") as e:
        read_apstar(bad)
    assert_names_file(e, bad)


def test_ingest_with_broken_files_writes_nothing(
    tmp_path: Path, synth: dict[str, np.ndarray], good_apstar: Path
) -> None:
    other = write_apstar(
        tmp_path / "apStar-dr17-2M00000000+0000020.fits",
        synth["flux"],
        synth["err"],
        synth["mask"],
        objid="2M00000000+0000020",
    )
    truncated = tmp_path / "apStar-dr17-2M00000000+0000021.fits"
    truncated.write_bytes(good_apstar.read_bytes()[:30000])
    text = tmp_path / "apStar-dr17-2M00000000+0000022.fits"
    text.write_text("not fits")
    out = tmp_path / "ds"
    with pytest.raises(FitsInputError) as e:
        ingest_apogee([good_apstar, truncated, other, text], out)
    msg = str(e.value)
    assert truncated.name in msg and text.name in msg
    assert good_apstar.name not in msg and other.name not in msg
    assert "2 of 4" in msg
    assert not out.exists() or not list(out.glob("*.parquet"))


def test_ingest_rejects_duplicate_ids_and_bad_shards(tmp_path: Path, good_apstar: Path) -> None:
    copy = tmp_path / "copy.fits"
    copy.write_bytes(good_apstar.read_bytes())
    with pytest.raises(FitsInputError, match="already read"):
        ingest_apogee([good_apstar, copy], tmp_path / "ds")
    with pytest.raises(ValueError, match="n_shards"):
        ingest_apogee([good_apstar], tmp_path / "ds", n_shards=2)
    assert not (tmp_path / "ds").exists()


def test_resample_matches_direct_call(good_apstar: Path) -> None:
    """prepare_spectrum = normalize + grid.resample with placeholder flux 1.0."""
    spec = read_apstar(good_apstar)
    flux_n, ivar_n, _ = normalize(spec.flux, spec.ivar, spec.grid)
    expect = resample(flux_n, ivar_n, spec.grid, paper_grid(), fill=1.0)
    got = prepare_spectrum(spec, paper_grid())
    np.testing.assert_array_equal(got[0], expect[0])
    np.testing.assert_array_equal(got[1], expect[1])
