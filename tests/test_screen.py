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


@pytest.mark.parametrize(
    "corrupt", [_zero_flux, _counts, _no_good_pixel, _sentinel, _repeated_id, _missing_label]
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
         r"200 of the 200 training spectra have no finite Teff, log g and \[Fe/H\]"),
    ],
)  # fmt: skip
def test_a_set_wrong_as_a_whole_stops_with_what_to_fix(change, message) -> None:
    flux, ivar, labels, ids = _clean()
    change(flux, ivar, labels)
    with pytest.raises(ValueError, match=message):
        screen_training_set(flux, ivar, labels, ids)
