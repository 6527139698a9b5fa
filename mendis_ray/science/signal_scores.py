"""Scores of the signal-space model, calibrated across S/N, and its checkpoint.

Which score answers which question (all "higher = more typical"; ``*_score`` are natural
logs of tail probabilities, 0 = perfectly typical, -inf = impossible):

``signal_score``
    Is the star's *stellar signal* typical?  The conditional flow's log q(signal
    coordinates, labels | noise level), as the fraction of held-out training stars at the
    same noise level whose log q is as low (:class:`NoiseCalibration`).  With the
    structure tests (:mod:`mendis_ray.science.structure`), log q plus the log density of
    the star's denoised labels (a 3-D kernel density: where the star sits in the Kiel
    diagram at its metallicity; each of the two scaled by its spread among held-out
    stars), and the more significant of that tail and the tests'
    (a gap in one of the 2-D projections label x independent component, which a joint
    density dilutes), for their dependence (:func:`min_tail`, as ``score`` below).
    Finds unusual combinations: between
    the alpha sequences, off the giant branch, odd abundance patterns, labels that do not
    match the spectrum.  Without labels (NaN), the labels are integrated out by importance
    sampling (32 draws from a linear regression of labels on the signal coordinates), and
    the structure tests, which need the labels, are left out.
``residual_score``
    Is there anything *outside* the signal space?  The residual after the star's own
    noise-weighted projection, scanned at 1, 4, 16 and 64 pixels (the largest |window sum|
    of the standardized residual, a matched filter for lines, spikes, bumps and continuum
    errors) and as a whole (chi^2 / dof); each statistic is calibrated against training
    stars at the same noise level and the most significant one wins (calibrated again).
    On the simulator's grids (paper, aspcap, apstar) the residual is also tested along each
    element's line pattern (d flux / d[X/H] of the simulator at the training stars' median
    labels, a matched filter for one element's lines, each calibrated the same way).
    Finds unknown lines, sky residuals, instrument bumps, normalisation errors, the
    second star of a binary, one element out of step with the others.
``score`` (with ``percentile``)
    The primary triage score: the more significant of the two tails, as the probability
    that an inlier's more significant tail is at least as small.  The two tails'
    dependence is a Gaussian copula whose correlation (from Kendall's tau) is measured on
    the held-out stars per noise level (4 bins: it grows from about 0.1 at S/N 50 to 0.4
    at S/N 1000, where one intrinsic quirk shows in both), so ``score = log(1 - Phi2(-c,
    -c; r))`` with ``c = Phi^-1(p)`` and ``p = exp(min(signal_score, residual_score))``
    (:func:`min_tail`): ``log(2p - p^2)`` for independent tails, closer to ``log p`` the
    more they move together.  Most anomalies show in one of the two
    only, and there the minimum loses less than Fisher's combination, which averages in
    the blind score (survey benchmark, same model: between the alpha sequences 0.863 ->
    0.883, single-element anomalies 0.965 -> 0.969, unknown lines 0.901 -> 0.906, no set
    lower).  A full calibration of the minimum on the held-out stars learned their
    in-sample noise (they also calibrate the signal score: inlier percentiles 7.8 points
    off at S/N 50-100); the dependence as one number per noise bin does not (4.5 points
    at most, in any S/N bin, then; 5.2 with the weighted label density since, target 5;
    a fixed correlation: 6.4, at S/N 500-1000).  Checkpoints
    written before (no ``combine.corr`` in the reference) keep Fisher's combination,
    ``log P(chi^2_4 > -2 (signal + residual))``, calibrated on the held-out stars.
``log_p``
    The exact total log p(good pixels, labels | noise) in physical units: a density, for
    comparisons with other density models, *not* a triage score (it rewards clean spectra).
``strongest_test``
    Which test set ``score``: the one with the smallest calibrated tail.  On the signal
    side ``signal:flow`` (the flow's density with the label density; always for
    label-free rows) or ``signal:structure:<label>,ic<j>`` (a gap in the 2-D projection
    of a denoised label against the j-th independent component of the signal
    coordinates); on the residual side ``residual:chi2`` (the whole residual),
    ``residual:scan<s>`` (the largest window sum over s pixels: 1 a spike or narrow
    line, 4 a line, 16 a blend or band, 64 a bump or continuum error) or
    ``residual:elem.<X>`` (element X's line pattern); ``unscorable``.  For an outlier it
    names the kind of anomaly (survey benchmark: between the alpha sequences the
    [Fe/H] x alpha component pair, unknown lines the 1- and 4-pixel scans, bumps the
    64-pixel scan, binaries chi^2); for an inlier it is whichever test fluctuated most.
``percentile``, ``signal_percentile``, ``residual_percentile``
    100 x exp(score): the calibrated probability, in percent, that an inlier at the same
    noise level scores as low or lower (checkpoints written before ``combine.corr``: the
    percentage of held-out training stars scoring <= this one).

The scores are calibrated over the training stars' S/N range: a spectrum cleaner than
every training star (above the 99.5th percentile of their S/N) is first noised down to it
(:func:`match_noise`, seeded by the spectrum itself), so it is compared like for like.
Below it the range reaches S/N ``SignalConfig.min_snr`` (25) at least, whatever the
training S/N: the flow learns those noise levels from the noise augmentation and the
signal score is calibrated there on noised copies of held-out stars
(:func:`_with_noised_copies`).  Noisier spectra are flagged ``noise_range``.

A spectrum whose score cannot be computed (no good pixel, non-finite result) gets -inf
and a flag: it ranks as the most outlying, never NaN.
"""

from __future__ import annotations

import copy
import logging
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from scipy import stats
from scipy.special import log_ndtr, logsumexp, ndtri, owens_t
from threadpoolctl import ThreadpoolController

from mendis_ray.config import SignalConfig
from mendis_ray.flow.signal import SignalCoordinates, SignalSpaceModel
from mendis_ray.flow.signal_basis import Projection, SignalBasis
from mendis_ray.science.flags import Flag, flag_columns
from mendis_ray.science.metrics import percentile_rank
from mendis_ray.science.noise_calibration import NoiseCalibration
from mendis_ray.science.structure import StructureTests
from mendis_ray.spectra.linelist import ELEMENTS

__all__ = ["NoiseCalibration", "SignalScorer", "residual_statistics"]

log = logging.getLogger(__name__)

SCALES = (1, 4, 16, 64)  # powers of two: the window sums double in width (_window_maxima)
assert all(s & (s - 1) == 0 for s in SCALES), "SCALES must be powers of two"
MODEL_KIND = "signal"
#: each score's percentile column (:meth:`SignalScorer._percentile`)
PERCENTILE_OF = {"score": "percentile", "signal_score": "signal_percentile",
                 "residual_score": "residual_percentile"}  # fmt: skip
#: at most this many noised copies per held-out star (and MAX_COPIES in all: memory, time)
#: calibrate beyond the real noise levels, out to twice the noise variance of the flow's
#: noisiest training level (BEYOND, in t)
COPIES = 3
MAX_COPIES = 8000
BEYOND = float(np.log(2.0))
FLUX_RANGE_Z = 4.0  # a pixel is outside the training flux range by more than this x its noise
FLUX_RANGE_FRACTION = 0.005  # flux_range: more than this fraction of the good pixels outside
LABELS_CAL = "cal.signal_labels"  # the calibration of -(log q + w x the label log density)


def residual_statistics(c: SignalCoordinates, rows: int = 128) -> np.ndarray:
    """(n, 1 + len(SCALES) [+ m]): chi^2/dof, then per scale s the largest |sum of w over s
    consecutive pixels| / sqrt(good pixels among them), with w the standardized residual
    ``c.proj.wres`` (0 at masked pixels): a matched filter for features of width s; then,
    where the projection tested m templates, each one's z^2 (``c.proj.template_z``).

    Works through ``rows`` spectra at a time so that the window sums stay in the CPU's
    cache (5-10x faster than whole-array passes at 20,000 x 2,405).  Spectra without a
    masked pixel are scanned together and divide by sqrt(s) once, after the maximum (the
    same float32 result); the others count their good pixels per window."""
    w_all, tz = c.proj.wres, c.proj.template_z
    out = np.empty((len(w_all), 1 + len(SCALES) + (0 if tz is None else tz.shape[1])))
    out[:, 0] = c.proj.chi2 / c.proj.dof
    if tz is not None:  # each template's z^2
        out[:, 1 + len(SCALES) :] = tz**2
    complete = np.count_nonzero(w_all, axis=1) == w_all.shape[1]
    for idx, full in ((np.flatnonzero(complete), True), (np.flatnonzero(~complete), False)):
        for a in range(0, len(idx), rows):
            part = idx[a : a + rows]
            out[part, 1 : 1 + len(SCALES)] = _window_maxima(w_all[part], full)
    return out


def _window_maxima(w: np.ndarray, full: bool) -> np.ndarray:
    """Per row of ``w`` (m, p), for each scale s: max |window sum| / sqrt(good count).

    The window sums double in width by adding each to its copy h pixels on (sums of 2h =
    sums of h + the next h): two additions per scale, against a cumulative sum along the
    rows (a dependent chain per row) and a difference, 2.4x faster at 128 x 2,405."""
    m = len(w)
    out = np.empty((m, len(SCALES)))
    sums, width = w, 1  # (m, p + 1 - width): sums of ``width`` consecutive pixels
    cnt = None if full else (w != 0).astype(np.float32)  # good pixels per window
    for j, s in enumerate(SCALES):
        while width < s:
            sums = sums[:, :-width] + sums[:, width:]
            if cnt is not None:
                cnt = cnt[:, :-width] + cnt[:, width:]
            width *= 2
        if full:  # max |x| as max(max x, -min x): two reads, no |x| array written
            top = np.maximum(sums.max(axis=1), -sums.min(axis=1))
            out[:, j] = top / np.sqrt(np.float32(s))
        else:
            out[:, j] = np.abs(sums / np.sqrt(np.maximum(cnt, 1))).max(axis=1)
    return out


_BLAS: ThreadpoolController | None = None


def _one_blas_thread():
    """Context: numpy's BLAS on one thread (the controller is made once: 6 us a use)."""
    global _BLAS
    if _BLAS is None:
        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


def _snr_pixels(ivar: np.ndarray) -> np.ndarray:
    """The pixels a star's S/N is measured on (n, p): noisy and good (ivar 1e12 marks a
    noise-free simulation; NaN and inf compare False)."""
    return (ivar > 0) & (ivar < 1e11)


def star_snr(flux: np.ndarray, ivar: np.ndarray) -> np.ndarray:
    """Each continuum-normalized spectrum's S/N at the continuum, the median of sqrt(ivar)
    over its good pixels, (n,) (from the noise alone: an absurd flux must not make a
    spectrum look noisy; 0 for a row with no good pixel)."""
    good = _snr_pixels(ivar)
    v = np.where(good, ivar, np.inf).astype(np.float32)  # (n, p); masked last
    cnt, rows = good.sum(axis=1), np.arange(len(v))
    lo, hi = np.maximum((cnt - 1) // 2, 0), np.minimum(cnt // 2, v.shape[1] - 1)
    full = cnt == v.shape[1]
    if full.any():  # no masked pixel: the two middle order statistics, O(p) per row
        v[full] = np.partition(v[full], [lo[full][0], hi[full][0]], axis=1)
    if not full.all():  # the others: one vectorized sort (10x faster than a nanmedian loop)
        v[~full] = np.sort(v[~full], axis=1)
    with np.errstate(invalid="ignore"):  # sqrt is monotone: select first, then take roots
        med = 0.5 * (np.sqrt(v[rows, lo]).astype(np.float64) + np.sqrt(v[rows, hi]))
    return np.where(cnt > 0, med, 0.0)


def match_noise(
    flux: np.ndarray, ivar: np.ndarray, snr_max: float
) -> tuple[np.ndarray, np.ndarray]:
    """Spectra cleaner than every training star (S/N above ``snr_max``) get Gaussian noise
    added down to ``snr_max``: the scores are calibrated only up to the training S/N,
    and a cleaner spectrum would otherwise be compared with noisier references.  The noise
    of each row is seeded by a hash of its own flux, so a spectrum scores the same alone
    and in any batch.  Other rows are returned unchanged."""
    # a median of sqrt(ivar) above snr_max needs at least cnt - cnt // 2 good pixels above
    # it: one counting pass rules out most rows before the exact (sorting) median
    good = _snr_pixels(ivar)
    cnt = good.sum(axis=1)
    above = (good & (ivar > (snr_max * (1 - 1e-6)) ** 2)).sum(axis=1)
    cand = np.flatnonzero(above >= cnt - np.minimum(cnt // 2, ivar.shape[1] - 1))
    snr = np.zeros(len(flux))
    snr[cand] = star_snr(flux[cand], ivar[cand])
    rows = np.flatnonzero(snr > snr_max)
    if rows.size == 0:
        return flux, ivar
    flux, ivar = flux.copy(), ivar.copy()
    for i in rows:
        f = (snr[i] / snr_max) ** 2  # noise variance factor
        good = ivar[i] > 0
        rng = np.random.default_rng(zlib.crc32(np.ascontiguousarray(flux[i]).tobytes()))
        sigma_add = np.sqrt((f - 1) / np.where(good, ivar[i], 1.0))
        flux[i] = np.where(good, flux[i] + sigma_add * rng.standard_normal(flux.shape[1]), flux[i])
        ivar[i] = np.where(good, ivar[i] / f, 0.0)
    return flux, ivar


def _flux_range(model: SignalSpaceModel, flux: np.ndarray, ivar: np.ndarray) -> dict:
    """``flux_lo``, ``flux_hi`` (p,): the range of the good flux of these stars, 5 training
    standard deviations wider (+-inf at a pixel none of them has good)."""
    good = model.basis.drop_unmodelled(ivar) > 0
    lo = np.where(good, flux, np.inf).min(0)  # (p,)
    hi = np.where(good, flux, -np.inf).max(0)
    scale = model.basis.scale
    return {"flux_lo": np.where(np.isfinite(lo), lo - 5 * scale, -np.inf),
            "flux_hi": np.where(np.isfinite(hi), hi + 5 * scale, np.inf)}  # fmt: skip


def _with_noised_copies(
    flux: np.ndarray,
    ivar: np.ndarray,
    labels: np.ndarray,
    t: np.ndarray,
    t_max: float,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The held-out stars ``flux``, ``ivar`` (m, p), ``labels`` (m, 3) at noise levels ``t``
    (m,), followed by noised copies of some of them that fill the noise levels from the
    noisiest of them to ``t_max`` (past the noisiest level the flow was trained on), so the
    signal score is calibrated where the flow was trained, not extrapolated.  A copy
    gets pixel noise of variance (f - 1) / ivar and ivar / f (exact for a star whose ivar
    is its noise), f = exp(target - t), targets uniform in t; as many copies as keep the
    density of calibration stars along t (at most ``COPIES`` x m and ``MAX_COPIES``).  The
    ends of the held-out stars' range are their 1st and 99th percentiles of t (one very
    noisy star does not stop the copies).  Unchanged when nothing is beyond."""
    ok = np.isfinite(t)
    if not ok.any():
        return flux, ivar, labels
    lo, hi = np.quantile(t[ok], [0.01, 0.99])  # one odd star moves neither end
    extra = t_max - hi
    n = min(COPIES * ok.sum(), MAX_COPIES, round(ok.sum() * extra / max(hi - lo, 1e-12)))
    if extra <= 0.05 or n < 1:  # 5% more noise variance: nothing to fill
        return flux, ivar, labels
    rng = np.random.default_rng(seed)
    pool = np.flatnonzero(ok & (t <= hi))
    rows = rng.choice(pool, n, replace=n > pool.size)
    f = np.exp(rng.uniform(hi, t_max, n) - t[rows]).astype(np.float32)[:, None]  # (n, 1) >= 1
    iv = np.asarray(ivar[rows], np.float32)  # (n, p)
    good = iv > 0
    sigma = np.sqrt((f - 1) / np.where(good, iv, 1))  # (n, p) float32
    noise = rng.standard_normal(sigma.shape, dtype=np.float32)
    noisy = np.where(good, flux[rows] + sigma * noise, flux[rows])
    return (np.concatenate([flux, noisy.astype(flux.dtype, copy=False)]),
            np.concatenate([ivar, np.where(good, iv / f, 0).astype(ivar.dtype, copy=False)]),
            np.concatenate([labels, labels[rows]]))  # fmt: skip


def _rho_res(c: SignalCoordinates) -> np.ndarray:
    """How much of the residual variance is intrinsic rather than noise, (n,) in [0, 1]:
    the variable the residual statistics are calibrated on (it saturates as S/N grows, so
    a star cleaner than every reference star is compared with the cleanest ones)."""
    return c.proj.intrinsic_fraction


def _rho_sig(c: SignalCoordinates, model: SignalSpaceModel) -> np.ndarray:
    """How signal-dominated the signal coordinates are, (n,) in [0, 1]: the mean over the
    k directions of eigenvalue / (eigenvalue + noise variance); the signal score's
    calibration variable."""
    noise = np.diagonal(c.proj.cov, axis1=1, axis2=2)
    lam = model.basis.eigenvalues
    return (lam / (lam + noise)).mean(axis=1)


def _stat_names(ref: dict | None = None) -> list[str]:
    """The residual statistics' names: chi^2, the scans, and ``elem.<X>`` for each element
    template in ``ref`` (none in checkpoints written before the element tests)."""
    elements = [ELEMENTS[int(i)] for i in np.ravel(ref.get("elements.index", []))] if ref else []
    return ["chi2"] + [f"scan{s}" for s in SCALES] + [f"elem.{e}" for e in elements]


def _stat_tails(ref: dict, rho: np.ndarray, stats: np.ndarray) -> list[np.ndarray]:
    """The calibrated log tail (n,) of each residual statistic (columns of ``stats``)."""
    cals = [NoiseCalibration.from_arrays(ref, f"cal.{name}") for name in _stat_names(ref)]
    return NoiseCalibration.log_tails(cals, rho, stats)


def _residual_tails(
    ref: dict, rho: np.ndarray, stats: np.ndarray, tails: list[np.ndarray] | None = None
) -> list[np.ndarray]:
    """The tails the residual score takes the most significant of: chi^2, each scan, and
    the elements as one family (their most significant, calibrated again: one more test
    for the scans to share, not nineteen).  ``tails``: :func:`_stat_tails`, if at hand."""
    tails = _stat_tails(ref, rho, stats) if tails is None else tails
    n_base = 1 + len(SCALES)
    if len(tails) > n_base:
        worst = -np.min(tails[n_base:], axis=0)
        tails = [
            *tails[:n_base],
            NoiseCalibration.from_arrays(ref, "cal.elements").log_tail(rho, worst),
        ]
    return tails


def _residual_test(ref: dict, tails: list[np.ndarray], each: list[np.ndarray]) -> np.ndarray:
    """The residual test with the smallest tail (n,) str: ``"residual:chi2"``,
    ``"residual:scan<s>"`` (the matched filter of width s pixels) or
    ``"residual:elem.<X>"`` (one element's line pattern); ``tails``: the families of
    :func:`_residual_tails`, ``each``: :func:`_stat_tails`."""
    names = np.array([f"residual:{n}" for n in _stat_names(ref)], dtype=object)
    which = np.argmin(tails, axis=0)  # (n,) a family: chi^2, the scans, the elements
    n_base = 1 + len(SCALES)
    if len(each) > n_base:  # the elements' family: its most significant element
        which = np.where(which == n_base, n_base + np.argmin(each[n_base:], axis=0), which)
    return names[which]


def _cross_fitted(
    model: SignalSpaceModel, flux, ivar, labels, templates, folds: int
) -> SignalCoordinates:
    """Coordinates with residuals (n rows, in order) of the stars that calibrate the
    residual score, each of ``folds`` folds projected on a basis of the same k fitted to
    the other folds (0 or 1: the model's own basis).

    The model's basis was fitted to these stars and has absorbed part of each one's noise
    (its directions, and its intrinsic variance, estimated from their residuals), so their
    residuals are smaller than a new star's: with 2,700 training stars, k = 32 and 7,214
    pixels, held-out inliers' chi^2/dof ran 2% above theirs at S/N 50-100 and 8% of the
    inliers got a residual percentile below 1.  A basis fitted without a star sees it as
    it sees a new one (on (folds - 1) / folds of the stars its residuals run a little
    larger than a new star's on the full basis: a conservative error, of a quarter to a
    half of the in-sample one at 3 folds).  A fold's basis models the model's pixels
    that are good in at least 2 of the other stars; where it cannot be fitted at all (too
    few such pixels), all keep the model's own basis, with a warning."""
    own = lambda: model.coordinates(flux, ivar, labels, keep_residual=True, templates=templates)  # noqa: E731
    if folds < 2 or len(flux) < 4 * folds:
        return own()
    k, cfg, rows = model.basis.k, model.cfg, np.arange(len(flux))
    parts = []
    for held in np.array_split(rows, folds):
        rest = np.setdiff1d(rows, held)

        def batches(rest=rest, step=4096):  # the other folds, a chunk at a time (no copy)
            for a in range(0, len(rest), step):
                yield flux[rest[a : a + step]], ivar[rest[a : a + step]]

        fold = copy.copy(model)  # shares the flow; only the basis differs
        try:
            fold.basis = SignalBasis.fit_batches(batches, k, k_max=max(cfg.k_max, k),
                                                 snr_ratio=cfg.snr_ratio, min_good_fraction=0,
                                                 pixels=model.basis.modelled)  # fmt: skip
        except ValueError as err:  # too few pixels good in 2 stars outside this fold
            log.warning("residual calibration in sample (the model's own basis): a basis "
                        "without %d of the training stars cannot be fitted (%s)",
                        len(held), err)  # fmt: skip
            return own()
        parts.append(fold.coordinates(flux[held], ivar[held], labels[held],
                                      keep_residual=True, templates=templates))  # fmt: skip
    return SignalCoordinates.concat(parts)


def _residual_calibration(ref: dict, parts: list[SignalCoordinates]) -> dict[str, np.ndarray]:
    """The residual score's calibrations (``cal.*`` arrays) from the reference stars of
    ``parts`` (projected with the residual and ``ref``'s element templates): each
    statistic, the element family, then the most significant tail."""
    stats = np.concatenate([residual_statistics(c) for c in parts])  # (n, n_stats)
    rho = np.concatenate([_rho_res(c) for c in parts])
    cal = dict(ref)
    for j, name in enumerate(_stat_names(ref)):
        cal |= NoiseCalibration.fit(rho, stats[:, j]).arrays(f"cal.{name}")
    tails = _stat_tails(cal, rho, stats)
    if len(tails) > 1 + len(SCALES):  # the most significant element, calibrated again
        worst = -np.min(tails[1 + len(SCALES) :], axis=0)
        cal |= NoiseCalibration.fit(rho, worst).arrays("cal.elements")
    worst = -np.min(_residual_tails(cal, rho, stats, tails), axis=0)  # large = unusual
    cal |= NoiseCalibration.fit(rho, worst).arrays("cal.residual")
    return {key: v for key, v in cal.items() if key.startswith("cal.")}


def _flow_statistic(
    lq: np.ndarray, y: np.ndarray, tests: StructureTests | None, weight: float = 1.0
) -> np.ndarray:
    """What the flow's tail is calibrated on (n,), large = unusual: -log q, minus
    ``weight`` x the log density of the star's denoised labels where ``tests`` has one
    (the flow's own label density blurs narrow sequences, which a kernel over the 3
    labels resolves; see :func:`_label_weight`)."""
    label = None if tests is None else tests.label_log_density(y)
    return -lq if label is None else -(lq + weight * label)


def _spread(v: np.ndarray) -> float:
    """A robust standard deviation of the finite values of ``v``: IQR / 1.349."""
    v = v[np.isfinite(v)]
    return float(np.subtract(*np.quantile(v, [0.75, 0.25])) / 1.349) if v.size else 0.0


def _label_weight(lq: np.ndarray, label: np.ndarray) -> float:
    """The label density's weight beside the flow's log q: the ratio of their spreads among
    held-out stars, so that the two log densities count alike (each standardized, then
    summed).  log q over k + 3 dimensions spreads several times wider than a density over
    3 (4.5 against 0.9 nats on the survey benchmark), and at weight 1 it drowns the label
    density: off the giant branch 0.978 (weight 1) -> 0.987 (the spreads' ratio, 5.6) for
    the flow's tail, every other set as good or better.  1 where either spread is 0."""
    a, b = _spread(lq), _spread(label)
    return a / b if a > 0 and b > 0 else 1.0


def _flow_tail(
    ref: dict, lq: np.ndarray, y: np.ndarray, rho: np.ndarray, tests: StructureTests | None
) -> np.ndarray:
    """The flow's calibrated log tail (n,): of log q plus the weighted label log density
    where the reference has its calibration (``cal.signal_labels``, weight 1 if it has
    no ``.weight``) and ``tests`` its density, else of log q alone (``cal.signal``;
    references written before the label density)."""
    if tests is not None and tests.label_density.size and f"{LABELS_CAL}.centers" in ref:
        weight = float(np.ravel(ref.get(f"{LABELS_CAL}.weight", 1.0))[0])
        u = _flow_statistic(lq, y, tests, weight)
        return NoiseCalibration.from_arrays(ref, LABELS_CAL).log_tail(rho, u)
    return NoiseCalibration.from_arrays(ref, "cal.signal").log_tail(rho, -lq)


def _structure_calibration(
    tests: StructureTests, y: np.ndarray, rho: np.ndarray, flow: np.ndarray
) -> dict[str, np.ndarray]:
    """The structure tests' arrays and calibrations from held-out stars (coordinates
    ``y``, noise levels ``rho``, the flow's calibrated tails ``flow``): their statistic
    (``cal.structure``), then the Gaussian-copula correlation of its tail and the flow's
    per noise level (``signal_tests.*``), for the more significant of the two
    (:meth:`SignalScorer._with_structure`)."""
    u = tests.statistic(y)
    out = tests.arrays() | NoiseCalibration.fit(rho, u).arrays("cal.structure")
    tail = NoiseCalibration.from_arrays(out, "cal.structure").log_tail(rho, u)
    return out | _copula_correlation(rho, flow, tail, prefix="signal_tests")


def min_tail(m: np.ndarray, corr: np.ndarray) -> np.ndarray:
    """log P(min(U1, U2) <= exp(m)) (n,) for two uniform tail probabilities whose normal
    scores are bivariate normal with correlation ``corr`` (n,): ``1 - Phi2(-c, -c; r)`` =
    ``Phi(c) + 2 T(c, a)``, c = Phi^-1(exp(m)), a = sqrt((1 - r) / (1 + r)) (Owen's T).
    Written as ``m + log1p(2 T / Phi(c))``, the ratio held at its c = -8 value beyond
    (p < 6e-16), so that a finite or -inf log tail ``m`` <= 0 stays finite or -inf and
    ordered (to rounding), never above 0.  r is held to [-0.9, 0.99] (a NaN correlation:
    0); log(2p - p^2) at r = 0, closer to m as r grows, above log(2p - p^2) for r < 0."""
    r = np.clip(np.nan_to_num(corr, nan=0.0), -0.9, 0.99)
    with np.errstate(all="ignore"):
        c = np.maximum(ndtri(np.exp(np.minimum(m, 0.0))), -8.0)  # exp(-inf) = 0: -8
        ratio = 2.0 * owens_t(c, np.sqrt((1.0 - r) / (1.0 + r))) / np.exp(log_ndtr(c))
        out = m + np.log1p(np.nan_to_num(ratio, nan=0.0))  # c = +inf (m = 0): ratio 0
    return np.minimum(out, 0.0)  # rounding near m = 0 must not make a tail above 1


def _copula_correlation(
    rho: np.ndarray, a: np.ndarray, b: np.ndarray, n_bins: int = 4, prefix: str = "combine"
) -> dict[str, np.ndarray]:
    """The Gaussian-copula correlation of two log tails ``a``, ``b`` (n,) (``score``'s:
    signal and residual; ``signal_score``'s: flow and structure tests) among held-out
    stars in ``n_bins`` equal-count bins of the noise variable ``rho`` (their medians as
    centres; interpolated between, flat beyond): sin(pi tau / 2) of Kendall's tau, exact for a
    Gaussian copula and blind to how extreme a tail is (an unscorable star's -inf, a
    calibration's exponential extrapolation).  Stars without two finite tails are left
    out; under 100 stars in all, one bin.  Keys ``{prefix}.centers``, ``{prefix}.corr``."""
    ok = np.isfinite(rho) & np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 10:  # nothing to measure: independent
        return {f"{prefix}.centers": np.zeros(1), f"{prefix}.corr": np.zeros(1)}
    rho, a, b = rho[ok], a[ok], b[ok]
    parts = np.array_split(np.argsort(rho, kind="stable"), max(1, min(n_bins, len(rho) // 100)))
    centers = np.array([np.median(rho[i]) for i in parts])
    tau = np.array([stats.kendalltau(a[i], b[i]).statistic for i in parts])
    corr = np.sin(0.5 * np.pi * np.nan_to_num(tau, nan=0.0))  # a constant bin: 0
    return {f"{prefix}.centers": centers, f"{prefix}.corr": corr}


def element_templates(
    grid: dict, labels: np.ndarray, floor: float = 0.01
) -> tuple[np.ndarray, np.ndarray] | None:
    """(templates (m, p), their indices into :data:`~mendis_ray.spectra.linelist.ELEMENTS`
    (m,)): d flux / d[X/H] of the simulator at the median of ``labels`` (n, 3), 0 below
    ``floor`` times each one's largest |value| (a giant's line pattern keeps >= 99.8% of
    its sum of squares; the variance terms read only its pixels), elements without lines
    there left out; None where the simulator cannot make spectra on ``grid`` (not one of
    the named grids)."""
    from mendis_ray.science.explain import response_maps

    med = np.median(np.asarray(labels, np.float64), axis=0)
    maps = response_maps(grid, med[None]) if np.all(np.isfinite(med)) else None
    if maps is None or not np.all(np.isfinite(maps)):
        return None
    peak = np.abs(maps[0]).max(axis=1, keepdims=True)  # (19, 1)
    keep = np.flatnonzero(peak[:, 0] > 0)
    t = np.where(np.abs(maps[0]) >= floor * peak, maps[0], 0.0)[keep]
    return (t, keep.astype(np.float64)) if keep.size else None


@dataclass
class _Pixels:
    """What :meth:`SignalScorer.score` keeps of the pixels of n spectra (n-sized arrays)."""

    c: SignalCoordinates  # signal coordinates and projection (no residual vector)
    stats: np.ndarray  # (n, 1 + len(SCALES)) residual statistics
    labels: np.ndarray  # (n, 3) cleaned labels (NaN: label-free)
    labelled: np.ndarray  # (n,) bool
    nonfinite: np.ndarray  # (n,) bool: a non-finite pixel or label in the input
    flux_range: np.ndarray  # (n,) bool: > 0.5% of good pixels outside the training range by
    # more than FLUX_RANGE_Z times their own noise

    @classmethod
    def concat(cls, parts: list[_Pixels]) -> _Pixels:
        if len(parts) == 1:
            return parts[0]
        c = SignalCoordinates(
            np.concatenate([p.c.y for p in parts]), np.concatenate([p.c.t for p in parts]),
            Projection.concat([p.c.proj for p in parts]),
        )  # fmt: skip
        cat = {f: np.concatenate([getattr(p, f) for p in parts])
               for f in ("stats", "labels", "labelled", "nonfinite", "flux_range")}  # fmt: skip
        return cls(c, **cat)


@dataclass
class SignalScorer:
    """Scores for new spectra from a :class:`SignalSpaceModel` and its reference."""

    model: SignalSpaceModel
    ref: dict[str, np.ndarray] = field(default_factory=dict)  # calibrations, ranges, sorted scores
    grid: dict = field(default_factory=dict)
    max_masked_fraction: float = 0.2
    n_importance: int = 32
    _a32: tuple | None = field(default=None, init=False, repr=False, compare=False)
    _structure: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def _templates(self) -> np.ndarray | None:
        """The element templates in standardized units, float32 (m, p), or None."""
        t = self.ref.get("elements.templates")
        if t is None:
            return None
        scale = self.model.basis.scale
        if self._a32 is None or self._a32[0] is not t or self._a32[1] is not scale:
            a = (np.asarray(t, np.float64) / scale).astype(np.float32)
            self._a32 = (t, scale, np.ascontiguousarray(a))
        return self._a32[2]

    # -- building the reference -----------------------------------------------------------

    @classmethod
    def fit(
        cls,
        model: SignalSpaceModel,
        flux: np.ndarray,
        ivar: np.ndarray,
        labels: np.ndarray,
        train_coords: SignalCoordinates,
        grid: dict | None = None,
        train: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> SignalScorer:
        """Reference from held-out training stars ``flux``, ``ivar`` (m, p), ``labels``
        (m, 3): percentiles, the flow's noise calibration, flux and label ranges; the label
        regression (label-free scores) from ``train_coords``; the residual calibration and
        the flux ranges from ``train`` = (flux, ivar, labels) of the training stars when
        given (else from the held-out ones); the structure tests' densities from
        ``train_coords``, their calibration from the held-out stars.  Noised copies of the
        held-out stars (:func:`_with_noised_copies`) join every calibration (signal,
        label-free, structure, residual, the two tails' dependence) and widen the flux
        range, out to the noisiest level the flow was trained on; the choice of the
        structure tests and the label density's weight use the real held-out stars."""
        # the training stars when given: the linear stage has k << n parameters, so they
        # are as good as held-out ones for the residual, and many more
        cal_flux, cal_ivar, cal_labels = (flux, ivar, labels) if train is None else train
        k = model.basis.k
        xs = np.c_[train_coords.y[:, :k], np.ones(len(train_coords.y))]
        coef = np.linalg.lstsq(xs, train_coords.y[:, k:], rcond=None)[0]  # (k + 1, 3)
        res = train_coords.y[:, k:] - xs @ coef
        chol = np.linalg.cholesky(np.cov(res.T) * 1.5**2 + 1e-6 * np.eye(3))
        ref = {"label_coef": coef, "label_chol": chol,
               **_flux_range(model, cal_flux, cal_ivar),
               "label_lo": labels.min(0) - 5 * labels.std(0),
               "label_hi": labels.max(0) + 5 * labels.std(0),
               "snr_max": np.quantile(star_snr(cal_flux, cal_ivar), [0.995])}  # fmt: skip
        found = element_templates(grid or {}, cal_labels) if model.cfg.element_tests else None
        if found is not None:
            ref |= {"elements.templates": found[0], "elements.index": found[1]}
        scorer = cls(model, ref, grid or {})
        folds = model.cfg.residual_folds if train is not None else 0  # held-out: as they are
        cc = _cross_fitted(model, cal_flux, cal_ivar, cal_labels, scorer._templates(), folds)
        # the held-out stars, and noised copies of them out to the noisiest level the flow
        # was trained on (beyond the real stars' noise: calibrated, not extrapolated)
        m = len(flux)
        real = cc if train is None else model.coordinates(flux, ivar, labels)
        t_max = model.t_range[1] + BEYOND  # past the flow's range: the edge is not extrapolated
        flux, ivar, labels = _with_noised_copies(flux, ivar, labels, real.t, t_max)
        c, parts = real, [cc]
        if len(flux) > m:  # the copies calibrate the residual too (the basis never saw them)
            parts.append(model.coordinates(flux[m:], ivar[m:], labels[m:], keep_residual=True,
                                           templates=scorer._templates()))  # fmt: skip
        ref |= _residual_calibration(ref, parts)
        for part in parts:  # the signal side needs no (n, p) residuals
            part.proj.wres = part.proj.template_z = None
        if len(parts) > 1:
            c = SignalCoordinates.concat([real, parts[1]])
        del cc, parts
        rho, lq = _rho_sig(c, model), model.flow_log_prob(c)
        ref |= NoiseCalibration.fit(rho, -scorer._label_free(c)[0]).arrays("cal.signal_free")
        tests = None
        if model.cfg.structure_tests:  # densities of training stars; the choice: held-out
            tests = StructureTests.select(train_coords.y, c.y[:m], k)
        ref |= NoiseCalibration.fit(rho, -lq).arrays("cal.signal")  # the flow alone
        ref["noise_rho_min"] = ref["cal.signal.centers"][:1]  # noisier: extrapolated
        if tests is not None:
            if tests.label_density.size:  # log q plus the weighted label density
                weight = _label_weight(lq[:m], tests.label_log_density(c.y[:m]))
                u = _flow_statistic(lq, c.y, tests, weight)
                ref |= NoiseCalibration.fit(rho, u).arrays(LABELS_CAL)
                ref[f"{LABELS_CAL}.weight"] = np.array([weight])
            ref |= _structure_calibration(tests, c.y, rho, _flow_tail(ref, lq, c.y, rho, tests))
        first = scorer.score(flux, ivar, labels)  # the two tails' dependence, per noise level
        ref |= _copula_correlation(rho, first["signal_score"], first["residual_score"])
        out = scorer.score(flux[:m], ivar[:m], labels[:m])  # the real held-out stars
        for key in ("score", "signal_score", "residual_score"):
            ref[f"sorted.{key}"] = np.sort(out[key])
        return scorer

    def _tests(self) -> StructureTests | None:
        """The reference's structure tests (loaded once), or None."""
        key = (self.ref.get("structure.unmix"), self.ref.get("structure.label_density"))
        cached = self._structure  # keyed on the arrays themselves (held, so never reused)
        if cached is None or any(a is not b for a, b in zip(cached[0], key, strict=True)):
            cached = self._structure = (key, StructureTests.from_arrays(self.ref))
        return cached[1]

    def _with_structure(
        self, c: SignalCoordinates, rho: np.ndarray, flow: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The signal tail with the structure tests (n,), and which test set it (n,) str:
        ``"flow"`` or ``"structure:<label>,ic<j>"`` (:meth:`StructureTests.pair_names`).
        The tail is the more significant of the flow's tail and the structure tests'
        tail, as the probability that an inlier's more significant one is as small
        (:func:`min_tail`, their Gaussian-copula correlation per noise level: about
        0.5-0.65 on the survey benchmark), like ``score``.  An empirical calibration of
        that minimum on the held-out stars, which also calibrate both tails, learned their
        noise: inlier percentiles of ``signal_score`` 4.6 points from uniform in the worst
        S/N bin against 4.3 this way (the same model, AUROCs within 0.002).  References
        written before keep it (``cal.signal_tests``)."""
        tests = self._tests()
        if tests is None:  # calibrations without the tests' arrays: the flow alone
            return flow, np.full(len(flow), "flow", dtype=object)
        u, pair = tests.statistic_and_pair(c.y)
        tail = NoiseCalibration.from_arrays(self.ref, "cal.structure").log_tail(rho, u)
        names = np.array(["flow", *(f"structure:{n}" for n in tests.pair_names())], object)
        which = names[np.where(tail < flow, pair + 1, 0)]
        both, r = np.minimum(flow, tail), self.ref
        if "signal_tests.corr" in r:
            corr = np.interp(rho, r["signal_tests.centers"], r["signal_tests.corr"])
            return min_tail(both, corr), which
        return NoiseCalibration.from_arrays(r, "cal.signal_tests").log_tail(rho, -both), which

    def _label_free(self, c: SignalCoordinates, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """log q(signal coordinates | t) with the labels integrated out (importance
        sampling from the label regression), (n,), and the labels' posterior means in
        standardized units, (n, 3)."""
        k, m = self.model.basis.k, self.n_importance
        mu = np.c_[c.y[:, :k], np.ones(len(c.y))] @ self.ref["label_coef"]  # (n, 3)
        eps = np.random.default_rng(seed).standard_normal((m, 3))  # common draws: deterministic
        chol = self.ref["label_chol"]
        draws = mu[:, None, :] + (eps @ chol.T)[None]  # (n, m, 3)
        log_prop = stats.multivariate_normal(np.zeros(3), chol @ chol.T).logpdf(eps @ chol.T)
        y = np.concatenate([np.repeat(c.y[:, None, :k], m, 1), draws], axis=2).reshape(-1, k + 3)
        cc = SignalCoordinates(y, np.repeat(c.t, m), c.proj)
        lq = self.model.flow_log_prob(cc).reshape(-1, m) - log_prop[None]
        w = np.exp(lq - lq.max(axis=1, keepdims=True))
        posterior = (w[:, :, None] * draws).sum(1) / w.sum(1)[:, None]  # (n, 3)
        return logsumexp(lq, axis=1) - np.log(m), posterior

    # -- scoring ------------------------------------------------------------------------------

    def _clean(self, flux, ivar, labels):
        """Masks for non-finite input: bad pixels become masked, inf labels missing.  The
        usual all-finite chunk skips the repairs (each is a pass over (n, p))."""
        flux = np.asarray(flux, np.float32)  # the projection works in float32
        n = len(flux)
        ivar = np.ones_like(flux) if ivar is None else np.asarray(ivar, np.float32)
        labels = np.full((n, 3), np.nan) if labels is None else np.asarray(labels, np.float64)
        nonfinite = np.isinf(labels).any(axis=1)
        if not (np.isfinite(flux).all() and np.isfinite(ivar).all()):
            bad_pix = (~np.isfinite(flux) | ~np.isfinite(ivar)) & (
                np.nan_to_num(ivar, nan=1.0) != 0
            )
            nonfinite |= bad_pix.any(axis=1)
            ivar = np.where(bad_pix | ~np.isfinite(ivar) | (ivar < 0), 0.0, ivar)
        elif (ivar < 0).any():
            ivar = np.where(ivar < 0, 0.0, ivar)
        ivar = self.model.basis.drop_unmodelled(ivar)  # pixels the training set never saw
        if not (ivar > 0).all():
            flux = np.where(ivar > 0, flux, self.model.basis._float32("mean"))
        labels = np.where(np.isinf(labels), np.nan, labels)
        return flux, ivar, labels, nonfinite

    def _pixel_pass(self, flux, ivar, labels) -> _Pixels:
        """Everything that reads the (n, p) pixels, for one chunk of spectra: cleaning,
        noise matching, projection, residual statistics, the flux-range test."""
        flux, ivar, labels, nonfinite = self._clean(flux, ivar, labels)
        if "snr_max" in self.ref:
            flux, ivar = match_noise(flux, ivar, float(np.ravel(self.ref["snr_max"])[0]))
        m, r = self.model, self.ref
        labelled = np.isfinite(labels).all(axis=1)
        with np.errstate(all="ignore"):
            fill_labels = np.where(labelled[:, None], labels, m.label_mean)
            c = m.coordinates(flux, ivar, fill_labels, keep_residual=True, clean=True,
                              templates=self._templates())  # fmt: skip
            stats = residual_statistics(c)
        c.proj.wres = c.proj.template_z = None  # in ``stats``; (n, p) not kept beyond the chunk
        good = ivar > 0
        tol = FLUX_RANGE_Z / np.sqrt(np.where(good, ivar, 1.0))  # (n, p): the star's own noise
        out_range = good & ((flux + tol < r["flux_lo"]) | (flux - tol > r["flux_hi"]))
        flux_range = out_range.sum(1) > FLUX_RANGE_FRACTION * np.maximum(good.sum(1), 1)
        return _Pixels(c, stats, labels, labelled, nonfinite, flux_range)

    def _pixel_passes(self, flux, ivar, labels, spans: list[slice]) -> list[_Pixels]:
        """:meth:`_pixel_pass` of each chunk, on as many threads as torch may use (numpy
        releases the GIL in its array loops).  numpy's BLAS runs one thread meanwhile: its
        own threads on top of ours oversubscribed the cores (20,000 spectra on 2 cores:
        1.16 s, against 0.62 s), and a fixed BLAS thread count keeps the float32 sums, so
        the scores, independent of the thread count (the chunking moves them by float32
        rounding only: a row's sums depend on its place in a batch)."""
        workers = min(torch.get_num_threads(), len(spans))
        with _one_blas_thread():
            if workers <= 1:
                return [self._pixel_pass(flux[i], ivar[i], labels[i]) for i in spans]
            with ThreadPoolExecutor(workers, thread_name_prefix="mendis-pixels") as pool:
                return list(
                    pool.map(lambda i: self._pixel_pass(flux[i], ivar[i], labels[i]), spans)
                )

    def _tails(self, px: _Pixels) -> tuple[np.ndarray, ...]:
        """log q, label estimates (label-free rows), signal / residual / combined tails."""
        m, r, c, labelled = self.model, self.ref, px.c, px.labelled
        lq = m.flow_log_prob(c)
        est = np.zeros((len(lq), 3))  # standardized label estimates (label-free rows)
        if (~labelled).any():
            sub = SignalCoordinates(c.y[~labelled], c.t[~labelled], c.proj)
            lq[~labelled], est[~labelled] = self._label_free(sub)
        rho = _rho_sig(c, m)
        with_tests = "signal_tests.corr" in r or "cal.signal_tests.centers" in r
        tests = self._tests() if with_tests else None
        flow = _flow_tail(r, lq, c.y, rho, tests)
        sig_test = np.full(len(lq), "flow", dtype=object)
        if tests is not None:  # with the structure tests (labelled rows)
            flow, sig_test = self._with_structure(c, rho, flow)
        sig = np.where(
            labelled, flow, NoiseCalibration.from_arrays(r, "cal.signal_free").log_tail(rho, -lq)
        )
        sig_test[~labelled] = "flow"
        rr = _rho_res(c)
        each = _stat_tails(r, rr, px.stats)
        tails = _residual_tails(r, rr, px.stats, each)
        res = NoiseCalibration.from_arrays(r, "cal.residual").log_tail(rr, -np.min(tails, 0))
        test = np.where(sig <= res, "signal:" + sig_test, _residual_test(r, tails, each))
        if "combine.corr" in r:  # the more significant of the two, for its dependence
            corr = np.interp(rho, r["combine.centers"], r["combine.corr"])
            return lq, est, sig, res, min_tail(np.minimum(sig, res), corr), test
        x = -2 * (sig + res)  # older checkpoints: Fisher's, chi^2 with 4 dof, closed form
        comb = np.minimum(-x / 2 + np.log1p(x / 2), 0.0)
        if "cal.combined.centers" in r:  # the two tails are not independent: calibrate
            comb = NoiseCalibration.from_arrays(r, "cal.combined").log_tail(rho, -comb)
        return lq, est, sig, res, comb, test

    def score(self, flux, ivar=None, labels=None, chunk: int = 1024, **_: object) -> dict:
        """Scores of n spectra: ``flux``, ``ivar`` (n, p), ``labels`` (n, 3) (NaN rows:
        label-free).  Returns (n,) arrays (see the module doc) plus ``labels_used``.  The
        pixels are read ``chunk`` spectra at a time (memory: a few (chunk, p) arrays)."""
        flux = np.asarray(flux)
        ivar = np.ones(flux.shape, np.float32) if ivar is None else np.asarray(ivar)
        labels = np.full((len(flux), 3), np.nan) if labels is None else np.asarray(labels)
        spans = [slice(a, a + chunk) for a in range(0, len(flux), chunk)] or [slice(0, 0)]
        px = _Pixels.concat(self._pixel_passes(flux, ivar, labels, spans))
        m, c, labelled = self.model, px.c, px.labelled
        with np.errstate(all="ignore"):
            lq, est, sig, res, comb, test = self._tails(px)
            log_p = m.total_log_prob(c, lq) + np.where(labelled, 0.0, np.log(m.label_scale).sum())
            labels_used = np.where(labelled[:, None], px.labels, est * m.label_scale + m.label_mean)
        out = {"score": comb, "signal_score": sig, "residual_score": res, "log_p": log_p}
        out = self._finish(out, px, labels_used)
        out["strongest_test"] = np.where(out["flag_unscorable"], "unscorable", test)
        return out

    def _finish(self, out: dict, px: _Pixels, labels_used: np.ndarray) -> dict:
        """-inf for unscorable rows, percentiles, flags and the per-row diagnostics."""
        r, c, labelled = self.ref, px.c, px.labelled
        masked_fraction = 1.0 - c.proj.n_good / self.model.basis.n_modelled
        no_good = c.proj.n_good <= self.model.basis.k
        unscorable = no_good.copy()
        for key in out:  # impossible or unscorable (NaN, +-inf): the most outlying
            v = out[key]
            broken = np.isnan(v) | np.isposinf(v)
            unscorable |= broken
            out[key] = np.where(broken | no_good, -np.inf, v)
        for key, name in PERCENTILE_OF.items():
            out[name] = self._percentile(key, out[key])
        labels = px.labels
        label_range = labelled & ((labels < r["label_lo"]) | (labels > r["label_hi"])).any(1)
        masked = (masked_fraction > self.max_masked_fraction) | no_good
        flags = px.nonfinite * Flag.NONFINITE + masked * Flag.MASKED
        flags += px.flux_range * Flag.FLUX_RANGE + label_range * Flag.LABEL_RANGE
        flags += unscorable * Flag.UNSCORABLE + self._noisier(c) * Flag.NOISE_RANGE
        out |= {
            "chi2_dof": np.nan_to_num(c.proj.chi2 / c.proj.dof, nan=np.inf),
            "noise_level": c.t,
            "labelled": labelled, "labels_used": labels_used,
            "masked_fraction": masked_fraction, "flags": flags.astype(np.int64),
            **flag_columns(flags),
        }  # fmt: skip
        return out

    def _noisier(self, c: SignalCoordinates) -> np.ndarray:
        """(n,) bool: noisier than the noisiest bin of the signal score's calibration
        (``noise_rho_min``, its centre), where the calibration extrapolates.  The held-out
        stars' noised copies reach twice the noise variance of the flow's noisiest level
        (S/N ``min_snr``, or the training set's own if noisier); that bin's centre lies a
        little inside, the closer the more calibration stars there are (on the test
        fixtures: S/N 22 with 150 held-out stars at S/N 300 and 450 copies; S/N 34 with
        150 at S/N 50-1000 and 64 copies, 3 bins).  References written before the copies
        (no ``noise_rho_min``) calibrated on the held-out stars alone: beyond twice the
        noise variance of the noisiest training star (trained at S/N 300 alone and scored
        at 50-500, the inliers' mean signal percentile fell to 1.3 in the noisiest S/N
        quartile)."""
        if "noise_rho_min" in self.ref:
            rho = np.nan_to_num(_rho_sig(c, self.model), nan=np.inf)
            return rho < float(np.ravel(self.ref["noise_rho_min"])[0])
        m = self.model
        noisiest = m.t_range[1] - np.log(max(m.cfg.noise_augment, 1.0))  # real stars only
        return np.nan_to_num(c.t, nan=-np.inf) > noisiest + np.log(2.0)

    def _percentile(self, key: str, score: np.ndarray) -> np.ndarray:
        """A score's percentile (n,): 100 x exp(score), the calibrated probability (in %)
        that an inlier at the same noise level scores as low or lower.  Ranking the score
        among the held-out stars' own scores (``sorted.*``) instead counts the reference's
        sampling noise twice, once in the calibration and once in the ranking: test inliers'
        percentiles 5.2 points from uniform in the worst S/N bin against 3.8 this way
        (survey benchmark, same model).  Checkpoints without ``combine.corr`` (older: a
        Fisher combination whose tail is not calibrated per noise level) keep the ranking."""
        if "combine.corr" in self.ref:
            return np.where(np.isnan(score), np.nan, 100.0 * np.exp(np.minimum(score, 0.0)))
        ref = self.ref.get(f"sorted.{key}")
        return np.full(len(score), np.nan) if ref is None else percentile_rank(ref, score)

    # -- checkpoint ---------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, metrics: dict | None = None) -> Path:
        """Write the model and reference to the folder ``path`` atomically (no pickle)."""
        from mendis_ray.flow.checkpoint import FORMAT_VERSION, write_checkpoint_dir

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        m = self.model
        arrays = {f"basis.{k}": v for k, v in m.basis.arrays().items()}
        arrays |= {"label_mean": m.label_mean, "label_scale": m.label_scale, "t_range": m.t_range}
        arrays |= {f"score.{k}": np.asarray(v, np.float64) for k, v in self.ref.items()}
        arrays |= {f"flow.{k}": v.detach().cpu().numpy() for k, v in m.flow.state_dict().items()}
        if "wavelength" in self.grid:
            arrays["grid.wavelength"] = np.asarray(self.grid["wavelength"], np.float64)
        config = {
            "format_version": FORMAT_VERSION, "model_kind": MODEL_KIND,
            "signal_config": m.cfg.to_dict(), "k": m.basis.k,
            "grid": {k: v for k, v in self.grid.items() if k != "wavelength"},
            "metrics": metrics or {}, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }  # fmt: skip
        arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        return write_checkpoint_dir(path, config, lambda f: save_file(arrays, f))

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, *, expect_grid: dict | None = None, **_: object
    ) -> SignalScorer:
        """Load a signal-model checkpoint written by :meth:`save`."""
        from mendis_ray.flow.checkpoint import CheckpointError, check_grid, read_config

        path = Path(path)
        info, ten_path = read_config(path)
        check_grid(path, info.get("grid", {}), expect_grid)
        try:
            a = load_file(str(ten_path))
            cfg = SignalConfig.from_dict(info["signal_config"])
            fields = ("mean", "scale", "basis", "eigenvalues", "intrinsic")
            basis = SignalBasis(*(a[f"basis.{f}"] for f in fields))
            if "basis.modelled" in a:  # absent: every pixel modelled (and older checkpoints)
                basis.modelled = a["basis.modelled"].astype(bool)
            model = SignalSpaceModel(basis, a["label_mean"], a["label_scale"], a["t_range"], cfg)
            state = {k.removeprefix("flow."): torch.from_numpy(v) for k, v in a.items()
                     if k.startswith("flow.")}  # fmt: skip
            model.flow.load_state_dict(state, strict=True)
        except Exception as err:  # safetensors / shapes / missing keys
            raise CheckpointError(f"{path}: not a usable signal-model checkpoint ({err})") from err
        if not (np.all(np.isfinite(basis.scale)) and np.all(basis.scale > 0)):
            raise CheckpointError(f"{path}: basis.scale must be finite and > 0")
        model.eval()
        grid = dict(info.get("grid", {}))
        if "grid.wavelength" in a:
            grid["wavelength"] = a["grid.wavelength"]
        ref = {k.removeprefix("score."): v for k, v in a.items() if k.startswith("score.")}
        return cls(model, ref, grid)


def load_scorer(path: str | os.PathLike, **kwargs: object):
    """The scorer of any checkpoint: :class:`SignalScorer` for a signal-space model,
    :class:`~mendis_ray.science.ood.Scorer` for a full-space flow (``kwargs``: ``device``,
    ``expect_grid``)."""
    from mendis_ray.flow.checkpoint import checkpoint_kind

    if checkpoint_kind(path) == MODEL_KIND:
        return SignalScorer.from_checkpoint(path, expect_grid=kwargs.get("expect_grid"))
    from mendis_ray.science.ood import Scorer

    return Scorer.from_checkpoint(str(path), **kwargs)
