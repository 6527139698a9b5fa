"""Screening of a training set before the signal-space model learns it.

The model learns whatever the training rows hold: a few spectra with zero flux (a dead
fibre) or in counts (not continuum-normalized) widen its signal space (on 2,000 survey
stars, 10 zero-flux rows took k from 7 to 22, and 100 rows in counts to 32) so that such
spectra then score as typical; two rows of 1,500 with a near-zero ivar (1e-30: S/N 1e-15)
took k from 6 to 2 and made the unknown-line outliers typical; a label that is a
catalogue's sentinel (-9999) widens the label range that the ``label_range`` flag tests
against; an id given twice puts a star in both the training and the validation rows, and
so does one spectrum under two ids (10% of a 1,500-star set repeated under new ids took k
from 6 to 15 and moved the inliers' median percentile from 52 to 59).  These rows are
left out with a warning that names how many and the first ids.  When most
rows fail a check the set itself is wrong (labels in other units, spectra not normalized,
an ivar column that holds the variance): then training stops with a message that says
what to fix.

:func:`screen_training_set` is called by
:func:`~mendis_ray.train.signal.load_training_shards` (``mendis train`` and ``mendis
tune`` with the signal-space model).
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass

import numpy as np

from mendis_ray.flow.signal_basis import chunk_rows
from mendis_ray.spectra.schema import LABEL_LIMITS

__all__ = [
    "FLUX_MEDIAN_LIMITS",
    "LABEL_LIMITS",
    "MIN_LABELLED",
    "MIN_SNR",
    "RowStats",
    "row_digests",
    "row_statistics",
    "screen_rows",
    "screen_training_set",
]

log = logging.getLogger(__name__)

#: a continuum-normalized spectrum's median flux over its good pixels lies in this range
#: (strong molecular bands or emission move it by tens of percent, not by x3)
FLUX_MEDIAN_LIMITS = (0.3, 3.0)
MIN_LABELLED = 10  # fewer labelled rows: training stops
#: a row's median S/N (flux x sqrt(ivar) over its good pixels) below this carries next to
#: no information on its signal: left out (surveys use stars from S/N ~50; the model's
#: noise augmentation learns down to ``SignalConfig.min_snr``)
MIN_SNR = 5.0
_MOST = 0.5  # more than this fraction of the rows failing one check: the set is wrong


def _first(ids: np.ndarray, rows: np.ndarray, n: int = 3) -> str:
    return ", ".join(repr(str(i)) for i in ids[rows[:n]]) + (", ..." if len(rows) > n else "")


def _screen_labels(labels: np.ndarray, ids: np.ndarray, kind: str = "training") -> np.ndarray:
    """``labels`` (n, 3) with impossible values set to NaN (a warning per column); a
    ValueError when most of a column's values are impossible (its unit)."""
    labels = np.array(labels, np.float64)
    for j, (name, unit, lo, hi) in enumerate(LABEL_LIMITS):
        v = labels[:, j]
        bad = np.flatnonzero(np.isfinite(v) & ((v < lo) | (v > hi)))
        if not bad.size:
            continue
        if bad.size > _MOST * np.isfinite(v).sum():
            raise ValueError(
                f"column {name!r}: {bad.size} of {np.isfinite(v).sum()} {kind} values lie "
                f"outside {lo:g} to {hi:g} {unit} (median {np.median(v[bad]):g}; first ids "
                f"{_first(ids, bad)}): {name} must be in {unit}"
            )
        log.warning("column %r: %d %s values outside %g to %g %s (e.g. %g; ids %s) "
                    "count as missing", name, bad.size, kind, lo, hi, unit, v[bad[0]],
                    _first(ids, bad))  # fmt: skip
        labels[bad, j] = np.nan
    return labels


@dataclass
class RowStats:
    """What the screening reads of each row's pixels, (n,) each (:func:`row_statistics`)."""

    median: np.ndarray  # float64: median flux over the good pixels (ivar > 0); NaN: none
    snr: np.ndarray  # float64: median |flux| sqrt(ivar) over the good pixels; NaN: none
    digest: np.ndarray  # uint64: :func:`row_digests` of the flux


def row_digests(flux: np.ndarray) -> np.ndarray:
    """(n,) uint64: a hash of each row's flux bytes (equal rows: equal digests; two
    different rows collide with probability 2^-64)."""
    digest = np.empty(len(flux), np.uint64)
    for i, row in enumerate(flux):
        digest[i] = int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little")
    return digest


def row_statistics(flux: np.ndarray, ivar: np.ndarray) -> RowStats:
    """:class:`RowStats` of ``flux``, ``ivar`` (n, p), a block of :func:`chunk_rows` rows
    at a time (nanmedian copies what it reads).  The S/N is the median over every 4th
    pixel (a screen needs its order of magnitude; all of them tripled the time)."""
    med, snr, chunk = np.empty(len(flux)), np.empty(len(flux)), chunk_rows(flux.shape[1])
    for a in range(0, len(flux), chunk):
        f, v = flux[a : a + chunk], ivar[a : a + chunk]
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: NaN
            med[a : a + chunk] = _good_median(f, v)
            f, v = f[:, ::4], v[:, ::4]
            snr[a : a + chunk] = _good_median(np.abs(f) * np.sqrt(np.maximum(v, 0)), v)
    return RowStats(med, snr, row_digests(flux))


def _good_median(x: np.ndarray, ivar: np.ndarray) -> np.ndarray:
    """(n,) median of each row of ``x`` (n, p) over its pixels with ``ivar`` > 0 (NaN if
    none): nanmedian only for the rows that have masked pixels (5x slower)."""
    out, masked = np.empty(len(x)), (ivar <= 0).any(axis=1)
    out[~masked] = np.median(x[~masked], axis=1)
    out[masked] = np.nanmedian(np.where(ivar[masked] > 0, x[masked], np.nan), axis=1)
    return out


def _noise(snr: np.ndarray, ids: np.ndarray, kind: str = "training") -> np.ndarray:
    """(n,) bool: the rows whose median S/N ``snr`` (:class:`RowStats`) reaches
    :data:`MIN_SNR` (rows without a good pixel pass: :func:`_normalized` names them); a
    ValueError when most do not (an ivar column that is not 1 / sigma^2)."""
    low = np.flatnonzero(snr < MIN_SNR)
    if low.size > _MOST * np.isfinite(snr).sum():
        raise ValueError(
            f"{low.size} of {np.isfinite(snr).sum()} {kind} spectra have a median S/N "
            f"(flux x sqrt(ivar)) below {MIN_SNR:g} (median {np.median(snr[low]):.3g}; first "
            f"ids {_first(ids, low)}): ivar must be the inverse variance 1 / sigma^2 of each "
            "pixel (a column holding the variance or sigma gives this)"
        )
    if low.size:
        log.warning("%d of %d %s spectra have a median S/N below %g (e.g. %.3g, ids %s): "
                    "left out", low.size, len(snr), kind, MIN_SNR, snr[low[0]],
                    _first(ids, low))  # fmt: skip
    return ~(snr < MIN_SNR)


def _normalized(med: np.ndarray, ids: np.ndarray, kind: str = "training") -> np.ndarray:
    """(n,) bool: the rows whose median good-pixel flux ``med`` (:class:`RowStats`) is
    that of a continuum-normalized spectrum; a ValueError when most are not."""
    lo, hi = FLUX_MEDIAN_LIMITS
    empty = np.flatnonzero(np.isnan(med))
    if empty.size:
        log.warning("%d %s spectra have no good pixel (ivar 0 everywhere; ids %s): "
                    "left out", empty.size, kind, _first(ids, empty))  # fmt: skip
    ok = (med >= lo) & (med <= hi)
    bad = np.flatnonzero(~ok & np.isfinite(med))
    if bad.size > _MOST * len(med):
        raise ValueError(
            f"{bad.size} of {len(med)} {kind} spectra have a median flux outside "
            f"{lo:g}-{hi:g} (median {np.median(med[bad]):g}; first ids {_first(ids, bad)}): "
            "the model expects continuum-normalized flux (about 1 in the continuum)"
        )
    if bad.size:
        log.warning("%d of %d %s spectra have a median flux outside %g-%g (not "
                    "continuum-normalized, or no signal: e.g. %g, ids %s): left out",
                    bad.size, len(med), kind, lo, hi, med[bad[0]], _first(ids, bad))  # fmt: skip
    return ok


def _first_of_each_id(ids: np.ndarray, kind: str = "training") -> np.ndarray:
    """(n,) bool: the first row of each id (a repeat would train and validate one star)."""
    keep = np.zeros(len(ids), bool)
    keep[np.unique(ids.astype(str), return_index=True)[1]] = True
    if not keep.all():
        rep = np.flatnonzero(~keep)
        log.warning("%d %s rows repeat an earlier row's id (ids %s): left out",
                    rep.size, kind, _first(ids, rep))  # fmt: skip
    return keep


def _first_of_each_spectrum(digest: np.ndarray, ids: np.ndarray, kind: str) -> np.ndarray:
    """(n,) bool: the first row of each flux (``digest``, :func:`row_digests`): a spectrum
    repeated under another id would train and validate one star."""
    keep = np.zeros(len(digest), bool)
    keep[np.unique(digest, return_index=True)[1]] = True
    if not keep.all():
        rep = np.flatnonzero(~keep)
        log.warning("%d %s rows repeat an earlier row's spectrum under another id (ids %s): "
                    "left out", rep.size, kind, _first(ids, rep))  # fmt: skip
    return keep


def screen_training_set(
    flux: np.ndarray, ivar: np.ndarray, labels: np.ndarray, ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The training rows to keep (n,) bool, for ``flux``, ``ivar`` (n, p), ``labels``
    (n, 3) and ``ids`` (n,), after the checks of the module doc; ``labels`` is returned
    with impossible values as NaN: ``(keep, labels)``.  Raises ValueError, naming the
    column or the check, when the set as a whole is wrong."""
    return screen_rows(row_statistics(flux, ivar), labels, ids)


def screen_rows(
    stats: RowStats, labels: np.ndarray, ids: np.ndarray, kind: str = "training"
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`screen_training_set` from each row's :class:`RowStats`, so that a set read
    a file at a time need not be held twice to be screened.  ``kind`` names the rows in
    the messages (``mendis train --reference``: "reference")."""
    labels = _screen_labels(labels, ids, kind)
    keep = _first_of_each_id(ids, kind) & _normalized(stats.median, ids, kind)
    keep &= _noise(stats.snr, ids, kind)
    keep[keep] = _first_of_each_spectrum(stats.digest[keep], ids[keep], kind)
    unlabelled = keep & ~np.isfinite(labels).all(axis=1)
    if keep.sum() - unlabelled.sum() < MIN_LABELLED:
        why = (f"{unlabelled.sum()} of the {keep.sum()} {kind} spectra that pass the checks "
               "have no finite Teff, log g and [Fe/H]" if unlabelled.any() else
               f"{keep.sum()} of the {len(keep)} {kind} spectra pass the checks")  # fmt: skip
        raise ValueError(
            f"{why}; the signal-space model learns the spectra with their labels and needs "
            f"at least {MIN_LABELLED} labelled spectra (columns teff, logg, feh)"
        )
    if unlabelled.any():  # a survey's catalog: some stars have no labels
        log.warning("%d of %d %s spectra have no finite Teff, log g and [Fe/H] (ids "
                    "%s): left out (the joint model needs all three)",
                    unlabelled.sum(), keep.sum(), kind,
                    _first(ids, np.flatnonzero(unlabelled)))  # fmt: skip
    keep &= ~unlabelled
    for j, (name, unit, _, _) in enumerate(LABEL_LIMITS if kind == "training" else ()):
        v = labels[keep, j]
        if np.ptp(v) <= 1e-9 * max(1.0, abs(v[0])):
            raise ValueError(
                f"column {name!r} has one value ({v[0]:g} {unit}) in every {kind} "
                "spectrum: the model learns how the spectra vary with each label, so each "
                "needs a spread (simulate or select a set where it varies)"
            )
    return keep, labels
