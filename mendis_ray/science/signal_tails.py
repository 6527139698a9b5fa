"""The calibrated tails the signal-space model's scores are made of, and their fits.

Each score is a log tail probability against held-out training stars at the same noise
level (:class:`~mendis_ray.science.noise_calibration.NoiseCalibration` on a signal
fraction: :func:`rho_sig` for the signal side, :func:`rho_res` for the residual side):
the flow's tail (with the label density), the residual statistics' tails and their most
significant, the structure tests' calibration, and the Gaussian-copula dependence of two
tails (:func:`copula_correlation`, :func:`min_tail`).  :class:`SignalScorer` in
:mod:`mendis_ray.science.signal_scores` fits and reads them.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
from scipy import stats
from scipy.special import log_ndtr, ndtri, owens_t

from mendis_ray.flow.signal import SignalCoordinates, SignalSpaceModel
from mendis_ray.flow.signal_basis import SignalBasis, chunk_rows
from mendis_ray.science.noise_calibration import NoiseCalibration
from mendis_ray.science.signal_noise import SCALES, residual_statistics
from mendis_ray.science.structure import StructureTests
from mendis_ray.spectra.linelist import ELEMENTS

log = logging.getLogger(__name__)

LABELS_CAL = "cal.signal_labels"  # the calibration of -(log q + w x the label log density)


def rho_res(c: SignalCoordinates) -> np.ndarray:
    """How much of the residual variance is intrinsic rather than noise, (n,) in [0, 1]:
    the variable the residual statistics are calibrated on (it saturates as S/N grows, so
    a star cleaner than every reference star is compared with the cleanest ones)."""
    return c.proj.intrinsic_fraction


def rho_sig(c: SignalCoordinates, model: SignalSpaceModel) -> np.ndarray:
    """How signal-dominated the signal coordinates are, (n,) in [0, 1]: the mean over the
    k directions of eigenvalue / (eigenvalue + noise variance); the signal score's
    calibration variable."""
    noise = np.diagonal(c.proj.cov, axis1=1, axis2=2)
    lam = model.basis.eigenvalues
    return (lam / (lam + noise)).mean(axis=1)


def stat_names(ref: dict | None = None) -> list[str]:
    """The residual statistics' names: chi^2, the scans, and ``elem.<X>`` for each element
    template in ``ref`` (none in checkpoints written before the element tests)."""
    elements = [ELEMENTS[int(i)] for i in np.ravel(ref.get("elements.index", []))] if ref else []
    return ["chi2"] + [f"scan{s}" for s in SCALES] + [f"elem.{e}" for e in elements]


def stat_tails(ref: dict, rho: np.ndarray, stats: np.ndarray) -> list[np.ndarray]:
    """The calibrated log tail (n,) of each residual statistic (columns of ``stats``)."""
    cals = [NoiseCalibration.from_arrays(ref, f"cal.{name}") for name in stat_names(ref)]
    return NoiseCalibration.log_tails(cals, rho, stats)


def residual_tails(
    ref: dict, rho: np.ndarray, stats: np.ndarray, tails: list[np.ndarray] | None = None
) -> list[np.ndarray]:
    """The tails the residual score takes the most significant of: chi^2, each scan, and
    the elements as one family (their most significant, calibrated again: one more test
    for the scans to share, not nineteen).  ``tails``: :func:`stat_tails`, if at hand."""
    tails = stat_tails(ref, rho, stats) if tails is None else tails
    n_base = 1 + len(SCALES)
    if len(tails) > n_base:
        worst = -np.min(tails[n_base:], axis=0)
        tails = [
            *tails[:n_base],
            NoiseCalibration.from_arrays(ref, "cal.elements").log_tail(rho, worst),
        ]
    return tails


def residual_test(ref: dict, tails: list[np.ndarray], each: list[np.ndarray]) -> np.ndarray:
    """The residual test with the smallest tail (n,) str: ``"residual:chi2"``,
    ``"residual:scan<s>"`` (the matched filter of width s pixels) or
    ``"residual:elem.<X>"`` (one element's line pattern); ``tails``: the families of
    :func:`residual_tails`, ``each``: :func:`stat_tails`."""
    names = np.array([f"residual:{n}" for n in stat_names(ref)], dtype=object)
    which = np.argmin(tails, axis=0)  # (n,) a family: chi^2, the scans, the elements
    n_base = 1 + len(SCALES)
    if len(each) > n_base:  # the elements' family: its most significant element
        which = np.where(which == n_base, n_base + np.argmin(each[n_base:], axis=0), which)
    return names[which]


def cross_fitted(
    model: SignalSpaceModel, flux, ivar, labels, templates, folds: int
) -> list[SignalCoordinates]:
    """Coordinates with residuals of the stars that calibrate the residual score, fold by
    fold (n rows in all, in order; one part when not cross-fitted), each of ``folds`` folds
    projected on a basis of the same k fitted to the other folds (0 or 1: the model's own
    basis).  Kept as parts: their (n, p) residuals are then held once, not concatenated.

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
        return [own()]
    k, cfg, rows = model.basis.k, model.cfg, np.arange(len(flux))
    parts = []
    step = chunk_rows(flux.shape[1])
    for held in np.array_split(rows, folds):
        rest = np.setdiff1d(rows, held)
        held = slice(held[0], held[-1] + 1)  # a fold is a run of rows: a view, not a copy

        def batches(rest=rest, step=step):  # the other folds, a chunk at a time
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
                        held.stop - held.start, err)  # fmt: skip
            return [own()]
        parts.append(fold.coordinates(flux[held], ivar[held], labels[held],
                                      keep_residual=True, templates=templates))  # fmt: skip
    return parts


def residual_calibration(ref: dict, parts: list[SignalCoordinates]) -> dict[str, np.ndarray]:
    """The residual score's calibrations (``cal.*`` arrays) from the reference stars of
    ``parts`` (projected with the residual and ``ref``'s element templates): each
    statistic, the element family, then the most significant tail."""
    stats = np.concatenate([residual_statistics(c) for c in parts])  # (n, n_stats)
    rho = np.concatenate([rho_res(c) for c in parts])
    cal = dict(ref)
    for j, name in enumerate(stat_names(ref)):
        cal |= NoiseCalibration.fit(rho, stats[:, j]).arrays(f"cal.{name}")
    tails = stat_tails(cal, rho, stats)
    if len(tails) > 1 + len(SCALES):  # the most significant element, calibrated again
        worst = -np.min(tails[1 + len(SCALES) :], axis=0)
        cal |= NoiseCalibration.fit(rho, worst).arrays("cal.elements")
    worst = -np.min(residual_tails(cal, rho, stats, tails), axis=0)  # large = unusual
    cal |= NoiseCalibration.fit(rho, worst).arrays("cal.residual")
    return {key: v for key, v in cal.items() if key.startswith("cal.")}


def flow_statistic(
    lq: np.ndarray, y: np.ndarray, tests: StructureTests | None, weight: float = 1.0
) -> np.ndarray:
    """What the flow's tail is calibrated on (n,), large = unusual: -log q, minus
    ``weight`` x the log density of the star's denoised labels where ``tests`` has one
    (the flow's own label density blurs narrow sequences, which a kernel over the 3
    labels resolves; see :func:`label_weight`)."""
    label = None if tests is None else tests.label_log_density(y)
    return -lq if label is None else -(lq + weight * label)


def _spread(v: np.ndarray) -> float:
    """A robust standard deviation of the finite values of ``v``: IQR / 1.349."""
    v = v[np.isfinite(v)]
    return float(np.subtract(*np.quantile(v, [0.75, 0.25])) / 1.349) if v.size else 0.0


#: a held-out star whose flow log q lies more than this many interquartile ranges below
#: the held-out stars' median is left out of the scorer's reference (:func:`far_out`)
FAR_IQR = 6.0


def far_out(lq: np.ndarray, multiple: float = FAR_IQR) -> np.ndarray:
    """(n,) bool: the log q ``lq`` (n,) more than ``multiple`` interquartile ranges below
    their median, or not finite.  A training set holds a survey's binaries, CEMP stars and
    rotators: among the held-out stars that calibrate the scores they set where an
    inlier's tail ends (the structure tests' calibration and choice, and the label
    density's weight and calibration, are empirical tails).  With 56 rotators and
    stripped stars among the survey benchmark's 2,048 held-out stars, the clean model's
    scorer read 0.835 between the alpha sequences and 0.947 off the giant branch, against
    0.900 and 0.983 without them; this rule left out those 56 and no other star, and read
    0.900 and 0.983 again (measured at 5 IQRs; at 6 the same stars: every one of them lies
    below -44 nats, every clean held-out star above -27.3).  Far means log q tens of nats
    below the rest: on the survey benchmark the median is -3.3 nats, the IQR 5.0, the cut
    -33.6; CEMP stars -612, rotators -160, binaries -79 (medians).  No more than a
    quarter (below the lower quartile) is ever far; none where the quartiles coincide."""
    ok = np.isfinite(lq)
    if ok.sum() < 4:
        return ~ok
    q1, med, q3 = np.quantile(lq[ok], [0.25, 0.5, 0.75])
    if q3 <= q1:
        return ~ok
    return ~(lq >= med - multiple * (q3 - q1))  # NaN: far


def label_weight(lq: np.ndarray, label: np.ndarray) -> float:
    """The label density's weight beside the flow's log q: the ratio of their spreads among
    held-out stars, so that the two log densities count alike (each standardized, then
    summed).  log q over k + 3 dimensions spreads several times wider than a density over
    3 (4.5 against 0.9 nats on the survey benchmark), and at weight 1 it drowns the label
    density: off the giant branch 0.978 (weight 1) -> 0.987 (the spreads' ratio, 5.6) for
    the flow's tail, every other set as good or better.  1 where either spread is 0."""
    a, b = _spread(lq), _spread(label)
    return a / b if a > 0 and b > 0 else 1.0


def flow_tail(
    ref: dict, lq: np.ndarray, y: np.ndarray, rho: np.ndarray, tests: StructureTests | None
) -> np.ndarray:
    """The flow's calibrated log tail (n,): of log q plus the weighted label log density
    where the reference has its calibration (``cal.signal_labels``, weight 1 if it has
    no ``.weight``) and ``tests`` its density, else of log q alone (``cal.signal``;
    references written before the label density)."""
    if tests is not None and tests.label_density.size and f"{LABELS_CAL}.centers" in ref:
        weight = float(np.ravel(ref.get(f"{LABELS_CAL}.weight", 1.0))[0])
        u = flow_statistic(lq, y, tests, weight)
        return NoiseCalibration.from_arrays(ref, LABELS_CAL).log_tail(rho, u)
    return NoiseCalibration.from_arrays(ref, "cal.signal").log_tail(rho, -lq)


def structure_calibration(
    tests: StructureTests, y: np.ndarray, rho: np.ndarray, flow: np.ndarray
) -> dict[str, np.ndarray]:
    """The structure tests' arrays and calibrations from held-out stars (coordinates
    ``y``, noise levels ``rho``, the flow's calibrated tails ``flow``): their statistic
    (``cal.structure``), then the Gaussian-copula correlation of its tail and the flow's
    per noise level (``signal_tests.*``), for the more significant of the two
    (:meth:`SignalScorer._with_structure`)."""
    u = tests.statistic(y)
    cal = NoiseCalibration.fit(rho, u, tail_from=None)  # per bin (NoiseCalibration doc)
    out = tests.arrays() | cal.arrays("cal.structure")
    tail = NoiseCalibration.from_arrays(out, "cal.structure").log_tail(rho, u)
    return out | copula_correlation(rho, flow, tail, prefix="signal_tests")


SLOPE_FLOOR = 0.01  # the smallest spread of a spline's log-derivative (derivative_scales)


def derivative_scales(deriv: np.ndarray, floor: float = SLOPE_FLOOR) -> dict[str, np.ndarray]:
    """Each spline log-derivative's median and robust spread among held-out stars
    ``deriv`` (m, f) (:meth:`SignalSpaceModel.flow_log_prob_and_derivatives`; rows with a
    non-finite value left out): ``compression.loc`` and ``compression.scale`` (f,), the
    spread 1.4826 x MAD and at least ``floor`` (a spline straight across the data).  The
    compression test standardizes each feature's log-derivative by them before taking the
    smallest: raw, the features whose derivatives vary most set the minimum (their spread
    among held-out stars 0.06-0.64 on the survey benchmark) and the one where the flow
    learned a gap is lost among them."""
    ok = np.isfinite(deriv).all(axis=1)
    loc = np.median(deriv[ok], axis=0)
    scale = np.maximum(1.4826 * np.median(np.abs(deriv[ok] - loc), axis=0), floor)
    return {"compression.loc": loc, "compression.scale": scale}


#: the compression test's (calibration, correlation) key prefixes: of the standardized
#: statistic (derivative_scales), and of the raw minimum that references written before
#: it carry (a copy of mendis_ray from before reads only the latter: a reference with the
#: former scores there without the test, not with a calibration of another statistic)
COMPRESSION_STANDARDIZED = ("cal.compression_z", "signal_compression_z")
COMPRESSION_RAW = ("cal.compression", "signal_compression")


def compression_calibration(
    rho: np.ndarray, signal: np.ndarray, steepest: np.ndarray
) -> dict[str, np.ndarray]:
    """The compression test's arrays from held-out stars (noise levels ``rho``, the signal
    tail without the test ``signal``, the flow's standardized steepest compression
    ``steepest``, all (n,)): the calibration of -steepest and the Gaussian-copula
    correlation of its tail with ``signal`` per noise level, under the
    ``COMPRESSION_STANDARDIZED`` prefixes, for the more significant of the two
    (:meth:`SignalScorer._with_compression`)."""
    cal, corr = COMPRESSION_STANDARDIZED
    out = NoiseCalibration.fit(rho, -steepest).arrays(cal)
    tail = NoiseCalibration.from_arrays(out, cal).log_tail(rho, -steepest)
    return out | copula_correlation(rho, signal, tail, prefix=corr)


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


def copula_correlation(
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
