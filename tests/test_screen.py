"""The training set's screening (mendis_ray/train/screen.py): rows a model must not learn
are left out with a warning naming them, and a set that is wrong as a whole stops with a
message naming the column or the check."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from mendis_ray.train.screen import screen_training_set


def _clean(n: int = 200, p: int = 50, seed: int = 0):
    rng = np.random.default_rng(seed)
    flux = (1 - 0.1 * rng.random((n, p))).astype(np.float32)  # normalized, absorption lines
    ivar = np.full((n, p), 1e4, np.float32)
    labels = np.c_[rng.uniform(4300, 4500, n), rng.uniform(1.9, 2.2, n), rng.normal(0, 0.1, n)]
    ids = np.array([f"s-{i}" for i in range(n)], dtype=object)
    return flux, ivar, labels, ids


def _zero_flux(f, v, lab, ids):
    f[:5] = 0.0  # dead fibres


def _counts(f, v, lab, ids):
    f[:5] *= 1e4  # not continuum-normalized
    v[:5] /= 1e8


def _no_good_pixel(f, v, lab, ids):
    v[:5] = 0.0


def _sentinel(f, v, lab, ids):
    lab[:5] = -9999.0  # a catalogue's "no value"


def _repeated_id(f, v, lab, ids):
    ids[:5] = ids[5:10]  # rows 0-4 repeat rows 5-9: the first of each id is kept


def _missing_label(f, v, lab, ids):
    lab[:5, 1] = np.nan


def _no_signal(f, v, lab, ids):
    v[:2] = 1e-30  # S/N 1e-15: took k from 6 to 2 in a 1,500-star training
    v[2:5] = 1e-2  # S/N 0.1


@pytest.mark.parametrize(
    "corrupt",
    [_zero_flux, _counts, _no_good_pixel, _sentinel, _repeated_id, _missing_label, _no_signal],
)
def test_rows_a_model_must_not_learn_are_left_out_and_named(corrupt, caplog) -> None:
    flux, ivar, labels, ids = _clean()
    corrupt(flux, ivar, labels, ids)
    with caplog.at_level(logging.WARNING, logger="mendis_ray.train.screen"):
        keep, out = screen_training_set(flux, ivar, labels, ids)
    expect = np.arange(len(flux)) >= 5
    if corrupt is _repeated_id:  # the first row of each repeated id is row 0-4's
        expect = (np.arange(len(flux)) < 5) | (np.arange(len(flux)) >= 10)
    np.testing.assert_array_equal(keep, expect)
    assert "left out" in caplog.text and repr(str(ids[np.flatnonzero(~keep)[0]])) in caplog.text
    np.testing.assert_array_equal(out[keep], labels[keep])  # kept rows' labels untouched


def test_a_clean_set_is_kept_whole_without_a_word(caplog) -> None:
    flux, ivar, labels, ids = _clean()
    with caplog.at_level(logging.WARNING, logger="mendis_ray.train.screen"):
        keep, out = screen_training_set(flux, ivar, labels, ids)
    assert keep.all() and caplog.text == ""
    np.testing.assert_array_equal(out, labels)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f, v, lab: lab.__setitem__((slice(None), 0), lab[:, 0] / 1000),
         r"column 'teff'.*outside 1000 to 100000 K.*teff must be in K"),
        (lambda f, v, lab: lab.__setitem__((slice(None), 2), 0.0),
         r"column 'feh' has one value \(0 dex\)"),
        (lambda f, v, lab: f.__imul__(1e4), r"median flux outside.*continuum-normalized"),
        (lambda f, v, lab: lab.__setitem__((slice(None), 1), np.nan),
         r"200 of the 200 training spectra that pass the checks have no finite Teff"),
        (lambda f, v, lab: v.__setitem__(slice(None), 1 / v),  # the variance
         r"200 of 200 training spectra have a median S/N.*below 5.*inverse variance"),
        (lambda f, v, lab: v.__setitem__(slice(None), 1 / np.sqrt(v)),  # sigma
         r"have a median S/N.*a column holding the variance or sigma"),
    ],
)  # fmt: skip
def test_a_set_wrong_as_a_whole_stops_with_what_to_fix(change, message) -> None:
    flux, ivar, labels, ids = _clean()
    change(flux, ivar, labels)
    with pytest.raises(ValueError, match=message):
        screen_training_set(flux, ivar, labels, ids)


@pytest.mark.parametrize("kind", ["identity", "one cycle", "random", "swaps"])
def test_rows_permuted_in_place_are_the_gathered_rows(kind) -> None:
    """``_permute_rows`` (the loader's shuffle without a copy) gives what ``a[perm]``
    gives, for every shape of permutation, on every array it is handed."""
    from mendis_ray.train.signal import _permute_rows

    n, rng = 97, np.random.default_rng(1)
    perm = {"identity": np.arange(n), "one cycle": np.roll(np.arange(n), 1),
            "random": rng.permutation(n),
            "swaps": np.arange(n).reshape(-1, 1)[::-1].ravel() if n % 2 == 0
            else np.r_[np.arange(n - 1).reshape(-1, 2)[:, ::-1].ravel(), n - 1]}[kind]  # fmt: skip
    a, b = rng.standard_normal((n, 5)).astype(np.float32), rng.standard_normal((n, 3))
    want = a[perm], b[perm]
    _permute_rows((a, b), perm)
    np.testing.assert_array_equal(a, want[0])
    np.testing.assert_array_equal(b, want[1])


def test_training_rows_read_a_file_at_a_time_are_the_screened_shuffled_set(tmp_path) -> None:
    """``load_training_shards`` on two folders (three files, ids repeated across files,
    rows a model must not learn, masked pixels) returns exactly the rows, order and labels
    of the whole set read at once, screened, then shuffled with the same seed."""
    from mendis_ray.spectra import shards
    from mendis_ray.spectra.grid import paper_grid
    from mendis_ray.train.signal import load_training_shards

    flux, ivar, labels, ids = _clean(n=90, p=2405, seed=3)
    ivar[4, 100:140] = 0.0  # a masked run
    flux[10:12] = 0.0  # dead fibres: left out
    labels[20, 0] = -9999.0  # a sentinel: missing, so the row is left out
    ids[60] = ids[5]  # a repeat across files: the first is kept
    for folder, rows in (("a", [slice(0, 30), slice(30, 50)]), ("b", [slice(50, 90)])):
        tables = [shards.make_table(ids[r], flux[r], ivar[r], teff=labels[r, 0],
                                    logg=labels[r, 1], feh=labels[r, 2]) for r in rows]  # fmt: skip
        shards.write_dataset(tmp_path / folder, tables, len(tables), paper_grid())
    f, v, lab, grid = load_training_shards([tmp_path / "a", tmp_path / "b"], seed=7)
    keep, screened = screen_training_set(flux, ivar, labels.astype(np.float32), ids)
    order = np.random.default_rng(7).permutation(np.flatnonzero(keep))
    assert len(order) == 90 - 4 and grid["n_pix"] == 2405
    np.testing.assert_array_equal(f, flux[order])
    np.testing.assert_array_equal(v, ivar[order])
    np.testing.assert_array_equal(lab, screened[order])


def test_a_shard_changed_after_its_set_was_written_is_named(tmp_path) -> None:
    """The manifest records each shard's rows: a shard emptied or replaced since the set
    was written stops the training naming it (it trained on the rest without a word)."""
    from mendis_ray.spectra import shards
    from mendis_ray.spectra.grid import paper_grid
    from mendis_ray.train.signal import load_training_shards

    flux, ivar, labels, ids = _clean(n=40, p=2405)
    tables = [shards.make_table(ids[r], flux[r], ivar[r], teff=labels[r, 0],
                                logg=labels[r, 1], feh=labels[r, 2])
              for r in (slice(0, 20), slice(20, 40))]  # fmt: skip
    _, second = shards.write_dataset(tmp_path / "d", tables, 2, paper_grid())
    assert len(load_training_shards([tmp_path / "d"])[0]) == 40
    shards.write_shard(second, tables[1].slice(0, 0), paper_grid())  # emptied in place
    with pytest.raises(ValueError, match=rf"{second.name}: holds 0 rows, .* manifest recorded 20"):
        load_training_shards([tmp_path / "d"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "-1"], "argument --epochs: '-1': must be a finite number, at least 1"),
        (["--batch-size", "0"], "argument --batch-size: '0'"),
        (["--lr", "0"], "argument --lr: '0': must be a finite number, above 0"),
        (["--lr", "nan"], "argument --lr: 'nan'"),
        (["--k", "0"], "argument --k: '0'"),
        (["--snr", "100"], "--snr: option(s) of the full-space flow"),
        (["--gpu", "--workers", "4"], "--workers, --gpu: option(s) of the full-space flow"),
        (["--resume", "x"], "--resume: option(s) of the full-space flow"),
    ],
)
def test_train_options_out_of_range_or_for_another_model_stop_it(
    argv, message, tmp_path, capsys
) -> None:
    """``mendis train`` with 0 or negative counts and scales (an untrained checkpoint and
    exit 0 before, or a traceback) or the full-space flow's options given to the signal
    model (silently ignored before): exit status 2 with the option named, nothing read
    or written."""
    from mendis_ray.cli import main

    args = ["train", str(tmp_path / "no-data"), "--out", str(tmp_path / "out"), *argv]
    try:
        rc = main(args)
    except SystemExit as stop:  # argparse's errors
        rc = stop.code
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_one_spectrum_under_two_ids_is_kept_once(caplog) -> None:
    """A spectrum repeated under another id (a catalogue joined twice) is left out with a
    warning naming it; the first is kept, and so are spectra that differ in one pixel."""
    flux, ivar, labels, ids = _clean()
    flux[10:15] = flux[0:5]  # rows 10-14 repeat rows 0-4 under their own ids
    flux[20] = flux[21]
    flux[20, 7] += np.float32(1e-6)  # another spectrum, by one pixel
    with caplog.at_level(logging.WARNING, logger="mendis_ray.train.screen"):
        keep, _ = screen_training_set(flux, ivar, labels, ids)
    np.testing.assert_array_equal(np.flatnonzero(~keep), np.arange(10, 15))
    assert "5 training rows repeat an earlier row's spectrum under another id" in caplog.text
    assert "'s-10'" in caplog.text


def test_too_few_rows_left_names_the_checks_not_the_labels() -> None:
    """A set that the checks leave with fewer than MIN_LABELLED rows says so (it blamed the
    labels: "0 of the 1 training spectra have no finite Teff ...")."""
    flux, ivar, labels, ids = _clean(n=12)
    ivar[:5] = 0.0  # no good pixel: 7 rows left
    with pytest.raises(
        ValueError, match=r"^7 of the 12 training spectra pass the checks; .* at least 10"
    ):
        screen_training_set(flux, ivar, labels, ids)
