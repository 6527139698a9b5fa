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
    density dilutes), for their dependence (:func:`min_tail`, as ``score`` below).  Then,
    the same way, the more significant of that and the flow's steepest compression at the
    star (the smallest log-derivative of any of its splines there, each in units of its
    spread among held-out stars: where the flow has learned a gap, a star in it sits on a
    flat stretch of one spline, which log q's sum over every feature and layer hides; a
    Gaussian's map has no such stretch).
    Finds unusual combinations: between
    the alpha sequences, off the giant branch, odd abundance patterns, labels that do not
    match the spectrum.  Without labels (NaN), the labels are integrated out by importance
    sampling (32 draws from a linear regression of labels on the signal coordinates), and
    the structure and compression tests, which need the labels, are left out.
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
    coordinates) or ``signal:compression`` (the flow's steepest compression); on the
    residual side ``residual:chi2`` (the whole residual),
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
(:func:`with_noised_copies`).  Noisier spectra are flagged ``noise_range``.

A spectrum whose score cannot be computed (no good pixel, non-finite result) gets -inf
and a flag: it ranks as the most outlying, never NaN.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from scipy import stats
from scipy.special import logsumexp

from mendis_ray.config import SignalConfig
from mendis_ray.flow.signal import SignalCoordinates, SignalSpaceModel
from mendis_ray.flow.signal_basis import Projection, SignalBasis
from mendis_ray.science.flags import Flag, flag_columns
from mendis_ray.science.metrics import percentile_rank
from mendis_ray.science.noise_calibration import NoiseCalibration
from mendis_ray.science.signal_noise import (
    BEYOND,
    flux_range_limits,
    match_noise,
    one_blas_thread,
    outside_flux_range,
    residual_statistics,
    star_snr,
    with_noised_copies,
)
from mendis_ray.science.signal_tails import (
    COMPRESSION_RAW,
    COMPRESSION_STANDARDIZED,
    FAR_IQR,
    LABELS_CAL,
    compression_calibration,
    copula_correlation,
    cross_fitted,
    derivative_scales,
    element_templates,
    far_out,
    flow_statistic,
    flow_tail,
    label_weight,
    min_tail,
    residual_calibration,
    residual_tails,
    residual_test,
    rho_res,
    rho_sig,
    stat_tails,
    structure_calibration,
)
from mendis_ray.science.structure import StructureTests
from mendis_ray.spectra.schema import impossible_labels, possible_labels

__all__ = ["NoiseCalibration", "SignalScorer", "load_scorer", "match_noise",
           "residual_statistics", "star_snr"]  # fmt: skip

log = logging.getLogger(__name__)

MODEL_KIND = "signal"
#: each score's percentile column (:meth:`SignalScorer._percentile`)
PERCENTILE_OF = {"score": "percentile", "signal_score": "signal_percentile",
                 "residual_score": "residual_percentile"}  # fmt: skip


@dataclass
class _Pixels:
    """What :meth:`SignalScorer.score` keeps of the pixels of n spectra (n-sized arrays)."""

    c: SignalCoordinates  # signal coordinates and projection (no residual vector)
    stats: np.ndarray  # (n, 1 + len(SCALES)) residual statistics
    labels: np.ndarray  # (n, 3) cleaned labels (NaN: label-free)
    labelled: np.ndarray  # (n,) bool
    nonfinite: np.ndarray  # (n,) bool: a non-finite pixel or label in the input
    impossible: np.ndarray  # (n,) bool: a given label outside what is possible (read as
    # missing: the row is scored label-free, and flagged LABEL_RANGE)
    flux_range: np.ndarray  # (n,) bool: > 0.5% of good pixels outside the training range by
    # more than 4 times their own noise (:func:`outside_flux_range`)

    @classmethod
    def concat(cls, parts: list[_Pixels]) -> _Pixels:
        if len(parts) == 1:
            return parts[0]
        c = SignalCoordinates(
            np.concatenate([p.c.y for p in parts]), np.concatenate([p.c.t for p in parts]),
            Projection.concat([p.c.proj for p in parts]),
        )  # fmt: skip
        cat = {f: np.concatenate([getattr(p, f) for p in parts])
               for f in ("stats", "labels", "labelled", "nonfinite", "impossible",
                         "flux_range")}  # fmt: skip
        return cls(c, **cat)


@dataclass
class SignalScorer:
    """Scores for new spectra from a :class:`SignalSpaceModel` and its reference."""

    model: SignalSpaceModel
    ref: dict[str, np.ndarray] = field(default_factory=dict)  # calibrations, ranges, sorted scores
    grid: dict = field(default_factory=dict)
    max_masked_fraction: float = 0.2
    n_importance: int = 32
    # held-out stars far out when the reference was fitted (not saved: the checkpoint's
    # metrics hold mendis train's val_far_out)
    held_out_far: int = field(default=0, compare=False, repr=False)
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
        far_iqr: float | None = None,
    ) -> SignalScorer:
        """Reference from held-out training stars ``flux``, ``ivar`` (m, p), ``labels``
        (m, 3): percentiles, the flow's noise calibration, flux and label ranges; the label
        regression (label-free scores) from ``train_coords``; the residual calibration and
        the flux ranges from ``train`` = (flux, ivar, labels) of the training stars when
        given (else from the held-out ones); the structure tests' densities from
        ``train_coords``, their calibration from the held-out stars.  Held-out stars far
        outside the rest (:func:`far_out` with ``far_iqr``, e.g. ``FAR_IQR``) are left out;
        by default (None) none is: after a short training (the README's walk: 3,000 stars, 5
        epochs) it left out 4 of 300 clean held-out stars, and the test inliers below the
        1st percentile went 1.3% -> 2.7%.
        Noised copies of the held-out stars (:func:`with_noised_copies`) join every
        calibration (signal, label-free, structure, residual, the two tails' dependence),
        out to the noisiest level the flow was trained on; the choice of the structure
        tests and the label density's weight use the real held-out stars.  The flux range
        is the stars' own (:func:`outside_flux_range` allows each pixel its noise).
        Without ``far_iqr`` the stars beyond ``FAR_IQR`` are counted (``held_out_far``) and
        kept."""
        if far_iqr is not None and not 1 <= far_iqr < np.inf:  # inside the IQR: inliers
            raise ValueError(f"far_iqr {far_iqr!r}: a finite number of at least 1, or None")
        cut = FAR_IQR if far_iqr is None else far_iqr
        far = far_out(model.flow_log_prob(model.coordinates(flux, ivar, labels)), cut)
        n_far = int(far.sum())
        if n_far:  # kept: said once, by the caller (mendis train's summary), at debug here
            kept = far_iqr is None
            log.log(logging.DEBUG if kept else logging.INFO, "%d of %d held-out spectra lie "
                    "far outside the rest (flow log q more than %g interquartile ranges below "
                    "the median, or none): %s the scores' reference", n_far, len(far), cut,
                    "kept in" if kept else "left out of")  # fmt: skip
        if far_iqr is not None and n_far:  # a catalogue's CEMP stars ...: not an inlier's tail
            flux, ivar, labels = flux[~far], ivar[~far], labels[~far]
        # the training stars when given: the linear stage has k << n parameters, so they
        # are as good as held-out ones for the residual, and many more
        cal_flux, cal_ivar, cal_labels = (flux, ivar, labels) if train is None else train
        k = model.basis.k
        xs = np.c_[train_coords.y[:, :k], np.ones(len(train_coords.y))]
        coef = np.linalg.lstsq(xs, train_coords.y[:, k:], rcond=None)[0]  # (k + 1, 3)
        res = train_coords.y[:, k:] - xs @ coef
        chol = np.linalg.cholesky(np.cov(res.T) * 1.5**2 + 1e-6 * np.eye(3))
        ref = {"label_coef": coef, "label_chol": chol,
               **flux_range_limits(model, cal_flux, cal_ivar),
               "label_lo": labels.min(0) - 5 * labels.std(0),
               "label_hi": labels.max(0) + 5 * labels.std(0),
               "snr_max": np.quantile(star_snr(cal_flux, cal_ivar), [0.995])}  # fmt: skip
        found = element_templates(grid or {}, cal_labels) if model.cfg.element_tests else None
        if found is not None:
            ref |= {"elements.templates": found[0], "elements.index": found[1]}
        scorer = cls(model, ref, grid or {}, held_out_far=n_far)
        folds = model.cfg.residual_folds if train is not None else 0  # held-out: as they are
        parts = cross_fitted(model, cal_flux, cal_ivar, cal_labels, scorer._templates(), folds)
        # the held-out stars, and noised copies of them out to the noisiest level the flow
        # was trained on (beyond the real stars' noise: calibrated, not extrapolated)
        m = len(flux)
        real = SignalCoordinates.concat(parts) if train is None else model.coordinates(
            flux, ivar, labels
        )  # fmt: skip
        t_max = model.t_range[1] + BEYOND  # past the flow's range: the edge is not extrapolated
        flux, ivar, labels = with_noised_copies(flux, ivar, labels, real.t, t_max)
        c, noised = real, []
        if len(flux) > m:  # the copies calibrate the residual too (the basis never saw them)
            noised = [model.coordinates(flux[m:], ivar[m:], labels[m:], keep_residual=True,
                                        templates=scorer._templates())]  # fmt: skip
        ref |= residual_calibration(ref, parts + noised)
        for part in (real, *parts, *noised):  # the signal side needs no (n, p) residuals
            part.proj.wres = part.proj.template_z = None
        if noised:
            c = SignalCoordinates.concat([real, *noised])
        del parts, noised
        rho = rho_sig(c, model)
        if model.cfg.compression_test:  # each spline's log-derivative in units of its spread
            ref |= derivative_scales(model.flow_log_prob_and_derivatives(real)[1])  # (held out)
            lq, steepest = scorer._steepest(c, standardized=True)  # as scoring computes them
        else:
            lq = model.flow_log_prob(c)
        ref |= NoiseCalibration.fit(rho, -scorer._label_free(c)[0]).arrays("cal.signal_free")
        tests = None
        if model.cfg.structure_tests:  # densities of training stars; the choice: held-out
            tests = StructureTests.select(train_coords.y, c.y[:m], k)
        ref |= NoiseCalibration.fit(rho, -lq).arrays("cal.signal")  # the flow alone
        ref["noise_rho_min"] = ref["cal.signal.centers"][:1]  # noisier: extrapolated
        if tests is not None and tests.label_density.size:  # log q + weighted label density
            weight = label_weight(lq[:m], tests.label_log_density(c.y[:m]))
            u = flow_statistic(lq, c.y, tests, weight)
            ref |= NoiseCalibration.fit(rho, u).arrays(LABELS_CAL)
            ref[f"{LABELS_CAL}.weight"] = np.array([weight])
        signal = flow_tail(ref, lq, c.y, rho, tests)
        if tests is not None:
            ref |= structure_calibration(tests, c.y, rho, signal)
            signal = scorer._with_structure(c, rho, signal)[0]
        if model.cfg.compression_test:  # after the tests: its dependence on their tail
            ref |= compression_calibration(rho, signal, steepest)
        first = scorer.score(flux, ivar, labels)  # the two tails' dependence, per noise level
        ref |= copula_correlation(rho, first["signal_score"], first["residual_score"])
        out = scorer.score(flux[:m], ivar[:m], labels[:m])  # the real held-out stars
        for key in ("score", "signal_score", "residual_score"):
            ref[f"sorted.{key}"] = np.sort(out[key])
        return scorer

    def _tests(self) -> StructureTests | None:
        """The reference's structure tests (loaded once), or None."""
        key = tuple(
            self.ref.get(f"structure.{f}")
            for f in ("unmix", "label_density", "label_ratio", "label_white")
        )
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

    def _with_compression(
        self, rho: np.ndarray, signal: np.ndarray, which: np.ndarray, steepest: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The signal tail (n,) with the compression test: the more significant of
        ``signal`` and the calibrated tail of the flow's steepest compression ``steepest``
        (n,), for their dependence (:func:`min_tail`, like the structure tests), and which
        test set it (n,): ``which`` or ``"compression"``."""
        r = self.ref
        cal, pre = self._compression_keys()
        tail = NoiseCalibration.from_arrays(r, cal).log_tail(rho, -steepest)
        corr = np.interp(rho, r[f"{pre}.centers"], r[f"{pre}.corr"])
        which = np.where(tail < signal, "compression", which)
        return min_tail(np.minimum(signal, tail), corr), which

    def _compression_keys(self) -> tuple[str, str] | None:
        """The reference's compression-test key prefixes (calibration, correlation):
        ``COMPRESSION_STANDARDIZED``, ``COMPRESSION_RAW`` (written before the
        standardization), or None (no test)."""
        for keys in (COMPRESSION_STANDARDIZED, COMPRESSION_RAW):
            if f"{keys[1]}.corr" in self.ref:
                return keys
        return None

    def _steepest(self, c: SignalCoordinates, standardized: bool) -> tuple[np.ndarray, ...]:
        """log q (n,) and the flow's steepest compression (n,): each spline's
        log-derivative standardized by the reference's ``compression.loc`` and ``.scale``
        (:func:`derivative_scales`), or the raw minimum (references written before)."""
        r = self.ref
        std = {k: r[f"compression.{k}"] for k in ("loc", "scale")} if standardized else {}
        return self.model.flow_log_prob_and_compression(c, **std)

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
        """Masks for non-finite input: bad pixels become masked (NaN ivar is one), inf and
        impossible labels missing (and marked: the last value returned).  The usual all-finite
        chunk skips the repairs (each is a pass over (n, p))."""
        flux = np.asarray(flux, np.float32)  # the projection works in float32
        n = len(flux)
        ivar = np.ones_like(flux) if ivar is None else np.asarray(ivar, np.float32)
        labels = np.full((n, 3), np.nan) if labels is None else np.asarray(labels, np.float64)
        nonfinite = np.isinf(labels).any(axis=1)
        if not (np.isfinite(flux).all() and np.isfinite(ivar).all()):
            ivar = np.where(np.isnan(ivar), np.float32(0), ivar)  # NaN ivar marks a masked pixel
            bad_pix = (~np.isfinite(flux) & (ivar != 0)) | np.isinf(ivar)
            nonfinite |= bad_pix.any(axis=1)
            ivar = np.where(bad_pix | (ivar < 0), 0.0, ivar)
        elif (ivar < 0).any():
            ivar = np.where(ivar < 0, 0.0, ivar)
        ivar = self.model.basis.drop_unmodelled(ivar)  # pixels the training set never saw
        if not (ivar > 0).all():
            flux = np.where(ivar > 0, flux, self.model.basis._float32("mean"))
        impossible = impossible_labels(labels)  # logg 50, Teff in kK: flagged
        labels = possible_labels(labels)  # inf, -9999, impossible: missing
        return flux, ivar, labels, nonfinite, impossible

    def _pixel_pass(self, flux, ivar, labels) -> _Pixels:
        """Everything that reads the (n, p) pixels, for one chunk of spectra: cleaning,
        noise matching, projection, residual statistics, the flux-range test."""
        flux, ivar, labels, nonfinite, impossible = self._clean(flux, ivar, labels)
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
        flux_range = outside_flux_range(flux, ivar, r)
        return _Pixels(c, stats, labels, labelled, nonfinite, impossible, flux_range)

    def _pixel_passes(self, flux, ivar, labels, spans: list[slice]) -> list[_Pixels]:
        """:meth:`_pixel_pass` of each chunk, on as many threads as torch may use (numpy
        releases the GIL in its array loops).  numpy's BLAS runs one thread meanwhile: its
        own threads on top of ours oversubscribed the cores (20,000 spectra on 2 cores:
        1.16 s, against 0.62 s), and a fixed BLAS thread count keeps the float32 sums, so
        the scores, independent of the thread count (the chunking moves them by float32
        rounding only: a row's sums depend on its place in a batch)."""
        workers = min(torch.get_num_threads(), len(spans))
        with one_blas_thread():
            if workers <= 1:
                return [self._pixel_pass(flux[i], ivar[i], labels[i]) for i in spans]
            with ThreadPoolExecutor(workers, thread_name_prefix="mendis-pixels") as pool:
                return list(
                    pool.map(lambda i: self._pixel_pass(flux[i], ivar[i], labels[i]), spans)
                )

    def _tails(self, px: _Pixels) -> tuple[np.ndarray, ...]:
        """log q, label estimates (label-free rows), signal / residual / combined tails."""
        m, r, c, labelled = self.model, self.ref, px.c, px.labelled
        keys = self._compression_keys()
        lq, steepest = (m.flow_log_prob(c), None) if keys is None else self._steepest(
            c, standardized=keys == COMPRESSION_STANDARDIZED)  # fmt: skip
        est = np.zeros((len(lq), 3))  # standardized label estimates (label-free rows)
        if (~labelled).any():
            sub = SignalCoordinates(c.y[~labelled], c.t[~labelled], c.proj)
            lq[~labelled], est[~labelled] = self._label_free(sub)
        rho = rho_sig(c, m)
        with_tests = "signal_tests.corr" in r or "cal.signal_tests.centers" in r
        tests = self._tests() if with_tests else None
        flow = flow_tail(r, lq, c.y, rho, tests)
        sig_test = np.full(len(lq), "flow", dtype=object)
        if tests is not None:  # with the structure tests (labelled rows)
            flow, sig_test = self._with_structure(c, rho, flow)
        if steepest is not None:  # with the compression test (labelled rows)
            flow, sig_test = self._with_compression(rho, flow, sig_test, steepest)
        sig = np.where(
            labelled, flow, NoiseCalibration.from_arrays(r, "cal.signal_free").log_tail(rho, -lq)
        )
        sig_test[~labelled] = "flow"
        rr = rho_res(c)
        each = stat_tails(r, rr, px.stats)
        tails = residual_tails(r, rr, px.stats, each)
        res = NoiseCalibration.from_arrays(r, "cal.residual").log_tail(rr, -np.min(tails, 0))
        test = np.where(sig <= res, "signal:" + sig_test, residual_test(r, tails, each))
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
        label_range |= px.impossible
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
            rho = np.nan_to_num(rho_sig(c, self.model), nan=np.inf)
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
        from mendis_ray.flow.checkpoint import (
            CheckpointError,
            check_grid,
            read_config,
            verify_tensors,
        )

        path = Path(path)
        info, ten_path = read_config(path)
        check_grid(path, info.get("grid", {}), expect_grid)
        verify_tensors(path, info, ten_path)
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
            lines = str(err).splitlines()  # torch lists every mismatched tensor: the first 3
            text = "\n".join(lines[:3] + [f"... {len(lines) - 3} more"] * (len(lines) > 3))
            raise CheckpointError(f"{path}: not a usable signal-model checkpoint ({text})") from err
        _check_finite(ten_path, a)
        if not (np.all(np.isfinite(basis.scale)) and np.all(basis.scale > 0)):
            raise CheckpointError(f"{path}: basis.scale must be finite and > 0")
        model.eval()
        grid = dict(info.get("grid", {}))
        if "grid.wavelength" in a:
            grid["wavelength"] = a["grid.wavelength"]
        ref = {k.removeprefix("score."): v for k, v in a.items() if k.startswith("score.")}
        if f"{COMPRESSION_STANDARDIZED[1]}.corr" in ref:  # the standardized compression test
            _check_derivative_scales(path, ref, model.flow.n_spline_features)
        return cls(model, ref, grid)


def _check_finite(ten_path: Path, arrays: dict[str, np.ndarray]) -> None:
    """A CheckpointError naming the file and the first bad array unless the model's arrays
    are finite and the reference's hold no NaN (the reference keeps +-inf where it means
    it: a tied bin's pooled-tail threshold, an unscorable held-out star's score)."""
    from mendis_ray.flow.checkpoint import CheckpointError

    for key, v in arrays.items():
        if v.dtype.kind != "f":
            continue
        ref = key.startswith("score.")
        bad = np.isnan(v) if ref else ~np.isfinite(v)
        if bad.any():
            what = "NaN" if ref else "non-finite"
            raise CheckpointError(
                f"{ten_path}: {key} holds {int(bad.sum())} {what} value(s) of {v.size}: the "
                "checkpoint is damaged (retrain, or copy it again)"
            )


def _check_derivative_scales(path: Path, ref: dict, n_features: int) -> None:
    """A CheckpointError naming the file and key unless the reference's
    ``compression.loc`` and ``.scale`` hold one finite value per spline feature (scales
    > 0): a mismatch would otherwise surface at scoring, as a broadcasting error."""
    from mendis_ray.flow.checkpoint import CheckpointError

    for key in ("compression.loc", "compression.scale"):
        v = ref.get(key)
        ok = v is not None and v.shape == (n_features,) and np.all(np.isfinite(v))
        if not (ok and (key.endswith("loc") or np.all(v > 0))):
            raise CheckpointError(
                f"{path}: {key} must hold {n_features} finite values (one per spline "
                "feature; scales > 0) for the compression test"
            )


def load_scorer(path: str | os.PathLike, **kwargs: object):
    """The scorer of any checkpoint: :class:`SignalScorer` for a signal-space model,
    :class:`~mendis_ray.science.ood.Scorer` for a full-space flow (``kwargs``: ``device``,
    ``expect_grid``)."""
    from mendis_ray.flow.checkpoint import checkpoint_kind

    if checkpoint_kind(path) == MODEL_KIND:
        return SignalScorer.from_checkpoint(path, expect_grid=kwargs.get("expect_grid"))
    from mendis_ray.science.ood import Scorer

    return Scorer.from_checkpoint(str(path), **kwargs)
