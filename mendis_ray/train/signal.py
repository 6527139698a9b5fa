"""Training the signal-space model without Ray: fit the linear stage, then the conditional
flow with the generic loop (:func:`mendis_ray.train.loop.fit`: Adam, gradient clipping,
early stopping on the validation log-likelihood, best weights restored)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mendis_ray.config import SignalConfig, TrainConfig
from mendis_ray.flow.signal import SignalCoordinates, SignalSpaceModel
from mendis_ray.flow.signal_basis import MIN_GOOD_FRACTION, SignalBasis
from mendis_ray.spectra.grid import grid_text, same_grid
from mendis_ray.train.loop import History, array_batches, fit

__all__ = [
    "NoiseAugmenter",
    "SignalTrainResult",
    "augment_draws",
    "augment_factor",
    "load_reference_shards",
    "load_training_shards",
    "train_signal_checkpoint",
    "train_signal_model",
]

log = logging.getLogger(__name__)


@dataclass
class SignalTrainResult:
    model: SignalSpaceModel
    history: History
    val_rows: slice  # rows of the input that validated (the scorer's reference)
    val_coords: SignalCoordinates
    train_coords: SignalCoordinates
    seconds: float
    steps: TrainConfig  # the optimiser's settings used (SignalConfig.train_config)


def _check_inputs(flux: np.ndarray, ivar: np.ndarray, labels: np.ndarray) -> None:
    if flux.ndim != 2 or flux.shape != ivar.shape or labels.shape != (len(flux), 3):
        raise ValueError(
            f"train_signal_model: flux {flux.shape}, ivar {ivar.shape} and labels "
            f"{labels.shape} must be (n, p), (n, p), (n, 3)"
        )
    bad = np.flatnonzero(~np.isfinite(labels).all(axis=1))
    if bad.size:
        raise ValueError(
            f"train_signal_model: {bad.size} training rows have missing labels (first: row "
            f"{bad[0]}); the joint model needs Teff, log g and [Fe/H] for every training star"
        )


#: fewer training spectra: a warning (the held-out tenth that calibrates is too small)
MIN_TRAINING = 3000


class NoiseAugmenter:
    """Noisier copies of training stars, drawn in the signal coordinates.

    Adding pixel noise of covariance (f - 1) / ivar to a spectrum and dividing its ivar by
    f moves its GLS signal coordinates by a draw of (f - 1) times their noise covariance
    and its noise level t by log f.  This is exact when the intrinsic residual variance is
    small against the noise (the projection weights then scale by 1 / f) and close
    otherwise; the validation uses real stars only (the score calibration adds noised
    copies of held-out stars, in pixel space: ``with_noised_copies``).  Each call
    (one per epoch) augments a random ``fraction`` of the stars, f log-uniform in
    [1, ``max_factor``].

    Args:
        c: the training coordinates (y (n, k+3), t (n,), projection with cov (n, k, k)).
        eigenvalues: (k,) the basis variances (y = s / sqrt(eigenvalue)).
    """

    def __init__(self, c: SignalCoordinates, eigenvalues: np.ndarray, max_factor: float,
                 fraction: float, seed: int = 0) -> None:  # fmt: skip
        self.c, self.max_factor, self.fraction, self.seed = c, max_factor, fraction, seed
        w, v = np.linalg.eigh(c.proj.cov)  # (n, k), (n, k, k): a square root of each cov
        root = v * np.sqrt(np.clip(w, 0, None))[:, None, :]
        self.root = (root / np.sqrt(eigenvalues)[None, :, None]).astype(np.float32)

    def noisier(self, rows: np.ndarray, log_f: np.ndarray, rng: np.random.Generator):
        """Coordinates of stars ``rows`` (m,) with their noise variance times exp(log_f)
        (m,): y (m, k+3), t (m,)."""
        k = self.root.shape[1]
        z = rng.standard_normal((rows.size, k, 1)).astype(np.float32)
        noise = (self.root[rows] @ z)[..., 0] * np.sqrt(np.expm1(log_f))[:, None]  # (m, k)
        y = self.c.y[rows].copy()
        y[:, :k] += noise
        return y, self.c.t[rows] + log_f

    def __call__(self, epoch: int) -> SignalCoordinates:
        if self.max_factor <= 1 or self.fraction <= 0:
            return self.c
        rng = np.random.default_rng([self.seed, epoch])
        rows = np.flatnonzero(rng.random(len(self.c.t)) < self.fraction)
        log_f = rng.uniform(0, np.log(self.max_factor), rows.size)
        y, t = self.c.y.copy(), self.c.t.copy()
        y[rows], t[rows] = self.noisier(rows, log_f, rng)
        return SignalCoordinates(y, t, self.c.proj)


def augment_factor(flux: np.ndarray, ivar: np.ndarray, cfg: SignalConfig) -> float:
    """The largest noise-variance factor of the augmentation: ``cfg.noise_augment``, or more
    so that a noisy training star (the 1st percentile of S/N) is taken down to
    ``cfg.min_snr``.  1 (off) stays off.  Noise-free training spectra (ivar ~1e12, no
    S/N) keep ``noise_augment``."""
    from mendis_ray.science.signal_noise import star_snr

    if cfg.noise_augment <= 1 or cfg.augment_fraction <= 0:
        return 1.0
    snr = star_snr(flux, ivar)
    snr = snr[snr > 0]  # 0: noise-free (ivar ~1e12) or no good pixel
    low = np.quantile(snr, 0.01) if snr.size else 0.0  # one odd star does not decide
    need = (low / cfg.min_snr) ** 2 if cfg.min_snr > 0 else 1.0
    return float(max(cfg.noise_augment, need))


def augment_draws(n: int, max_factor: float, cfg: SignalConfig) -> np.ndarray:
    """n noise-variance factors (n,) distributed as :class:`NoiseAugmenter` draws them (1
    for a fraction ``1 - cfg.augment_fraction``, else log-uniform in [1, ``max_factor``]),
    from a fixed seed: the noise levels the flow is trained on, for the choice of k."""
    rng = np.random.default_rng([cfg.seed, 1 << 20])
    log_f = rng.uniform(0, np.log(max(max_factor, 1.0)), n)
    return np.exp(np.where(rng.random(n) < cfg.augment_fraction, log_f, 0.0))


def train_signal_model(
    flux: np.ndarray,
    ivar: np.ndarray,
    labels: np.ndarray,
    cfg: SignalConfig | None = None,
    *,
    val_fraction: float = 0.1,
    time_limit_s: float | None = None,
    show_progress: bool = True,
) -> SignalTrainResult:
    """Fit the model on ``flux``, ``ivar`` (n, p) and ``labels`` (n, 3); the last
    ``val_fraction`` of the rows validate (rows must be in random order)."""
    cfg = cfg or SignalConfig()
    t0 = time.perf_counter()
    labels = np.asarray(labels, np.float64)
    _check_inputs(flux, ivar, labels)
    n_val = max(2, round(val_fraction * len(flux)))
    tr, va = slice(0, len(flux) - n_val), slice(len(flux) - n_val, len(flux))
    factor = augment_factor(flux[tr], ivar[tr], cfg)
    basis = SignalBasis.fit(flux[tr], ivar[tr], cfg.n_signal, k_max=cfg.k_max,
                            snr_ratio=cfg.snr_ratio,
                            noise_factors=augment_draws(tr.stop, factor, cfg))  # fmt: skip
    log.info("signal basis: k = %d directions (%.1f s)", basis.k, time.perf_counter() - t0)
    if basis.n_modelled < flux.shape[1]:
        log.info("%d of %d pixels are good in fewer than %g%% of the training spectra (a "
                 "mask common to all, a region always bad): not modelled, masked in every "
                 "spectrum scored", flux.shape[1] - basis.n_modelled, flux.shape[1],
                 100 * MIN_GOOD_FRACTION)  # fmt: skip
    lab = labels[tr]
    model = SignalSpaceModel(basis, lab.mean(0), lab.std(0) + 1e-12, np.zeros(2), cfg, cfg.seed)
    c_tr = model.coordinates(flux[tr], ivar[tr], labels[tr])
    if factor > cfg.noise_augment:
        log.info("1%% of the training stars have S/N below %.0f: noise augmentation up to "
                 "%.0fx the noise variance, so the model learns (and calibrates) down to S/N %g",
                 cfg.min_snr * np.sqrt(factor), factor, cfg.min_snr)  # fmt: skip
    aug = NoiseAugmenter(c_tr, basis.eigenvalues, factor, cfg.augment_fraction, cfg.seed)
    # the noise levels trained on, the augmented ones included (stars with too few good
    # pixels to project have an absurd noise level: left out of the range)
    t = c_tr.t[c_tr.proj.n_good > basis.k] if (c_tr.proj.n_good > basis.k).any() else c_tr.t
    model.t_range = np.array([t.min(), t.max() + np.log(max(factor, 1))])
    c_va = model.coordinates(flux[va], ivar[va], labels[va])
    x_tr, x_va = model.packed(c_tr), model.packed(c_va)  # (n, k + 3 + 1)
    torch.manual_seed(cfg.seed)
    model.flow.initialize(x_tr)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps = cfg.train_config(n_rows=len(x_tr))  # many training rows: larger steps
    if steps.batch_size != cfg.batch_size:
        log.info("%d training rows: %d per step at lr %g", len(x_tr), steps.batch_size, steps.lr)
    hist = fit(
        model.flow,
        lambda epoch: array_batches(model.packed(aug(epoch)), steps.batch_size, generator=gen),
        lambda: array_batches(x_va, 4096, shuffle=False),
        steps,
        show_progress=show_progress,
        time_limit_s=time_limit_s,
    )
    model.eval()
    dt = time.perf_counter() - t0
    log.info("signal model: best val log q %.2f in %.1f s", hist.best_val_log_prob, dt)
    return SignalTrainResult(model, hist, va, c_va, c_tr, dt, steps)


def load_training_shards(
    paths: Sequence[str | os.PathLike], seed: int = 0, *, with_ids: bool = False,
    kind: str = "training",
):  # fmt: skip
    """Rows of the dataset folders/files ``paths`` (validated by the shard reader) that
    pass the training set's screening (:mod:`mendis_ray.train.screen`: normalized flux,
    S/N of 5 or more, possible labels, one row per id, all three labels), in a seeded
    random order (the last rows validate, so an ordered catalog must be shuffled), and the
    grid (``Grid.describe()`` dict plus ``wavelength``) they share: ``(flux, ivar, labels,
    grid)``, and the rows' ids (n,) after them with ``with_ids``; ``kind`` names the rows
    in the screening's messages.

    The spectra are held once: each file is read into its rows of one array, which is
    then screened and shuffled in place (30,000 x 7,214 pixels, 1.7 GB of flux and ivar:
    peak memory 7.2 -> 2.4 GB against a table, its arrays, their concatenation and
    their shuffle, each a copy)."""
    from mendis_ray.train.screen import row_statistics, screen_rows

    flux, ivar, labels, ids, grid = _read_rows(paths)
    keep, labels = screen_rows(row_statistics(flux, ivar), labels, ids, kind)
    order = np.random.default_rng(seed).permutation(np.flatnonzero(keep))  # new row -> old
    _permute_rows((flux, ivar), np.concatenate([order, np.flatnonzero(~keep)]))
    rows = flux[: len(order)], ivar[: len(order)], labels[order], grid
    return (*rows, ids[order]) if with_ids else rows


def load_reference_shards(
    paths: Sequence[str | os.PathLike],
    grid: dict,
    train: tuple[np.ndarray, np.ndarray],
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``mendis train --reference``: spectra the model does not learn that join the
    validation rows in the scores' reference (their calibration per noise level, the
    structure tests' choice, the percentiles).  flux, ivar (m, p), labels (m, 3) of the
    rows under ``paths`` that pass the training set's screening.  A ValueError names a
    path on another grid than ``grid`` (the training set's), or the spectra that the
    training set ``train`` = (ids (n,), flux (n, p)), its validation rows included, holds
    too (the same flux, under any id): a star the model has learned would calibrate as a
    new one.  An id shared with a different spectrum (another simulation's rows, named by set
    and row) is a different spectrum: kept, with a warning.

    The survey benchmark's 2,000 validation stars leave the signal score's inlier
    percentiles up to 5.8 points from uniform in one S/N bin (12,000 independent
    inliers); three other draws of 2,000 held-out stars gave 6.2, 5.6 and 3.5, so it is
    their sampling, and 4,000 more held-out stars bring it to 3.3 (README: More held-out
    stars for the reference; ``bench/bench_reference.py``)."""
    named = f"--reference {', '.join(map(str, paths))}"
    try:
        flux, ivar, labels, ref_grid, ids = load_training_shards(
            paths, seed, with_ids=True, kind="reference"
        )
    except ValueError as err:  # a set wrong as a whole, or no rows
        raise ValueError(f"{named}: {err}") from err
    if not same_grid(ref_grid, grid):
        raise ValueError(
            f"{named}: grid {grid_text(ref_grid)} differs from the training set's "
            f"{grid_text(grid)}; the reference must be on the same pixels"
        )
    same = _same_spectra(ids, flux, *train)
    if same.size:
        shown = ", ".join(repr(str(i)) for i in same[:3]) + (", ..." if same.size > 3 else "")
        raise ValueError(
            f"{named}: {same.size} of its {len(ids)} spectra are in the training set too "
            f"(the same flux: {shown}); the reference must hold stars the model does "
            "not learn, or their scores would look more typical than new stars'"
        )
    return flux, ivar, labels


def _same_spectra(ids, flux, train_ids, train_flux) -> np.ndarray:
    """The ids (sorted) of the reference spectra (``ids``, ``flux``) whose flux a training
    spectrum has too, under any id (:func:`~mendis_ray.train.screen.row_digests`); an id
    that names different spectra in the two is said once (a warning)."""
    from mendis_ray.train.screen import row_digests

    ids, train_ids = np.asarray(ids).astype(str), np.asarray(train_ids).astype(str)
    digest, train_digest = row_digests(flux), row_digests(train_flux)
    same = np.isin(digest, train_digest)
    shared, at, _ = np.intersect1d(ids, train_ids, return_indices=True)
    other = ~same[at]  # the same id, another spectrum
    if other.any():
        log.warning("%d reference ids also name training spectra with other flux (e.g. %r): "
                    "kept as different spectra", other.sum(), shared[other][0])  # fmt: skip
    return np.sort(ids[same])


def _read_rows(paths: Sequence[str | os.PathLike]):
    """flux, ivar (n, p) float32, labels (n, 3) float64, ids (n,) of every file under
    ``paths`` in order, and the grid they share; a ValueError names a path on another
    grid, or says that none has rows."""
    import pyarrow.parquet as pq

    from mendis_ray.spectra.shards import (
        WAVE_KEY,
        dataset_files,
        iter_dataset,
        manifest_rows,
        table_arrays,
    )

    def rows(f: Path, written: dict[Path, int]) -> int:  # from the footer (an unreadable
        try:  # file is named by its reader), checked against the manifest
            n = pq.ParquetFile(f).metadata.num_rows
        except Exception:
            return 0
        if f in written and written[f] != n:
            raise ValueError(f"{f}: holds {n} rows, its folder's manifest recorded "
                             f"{written[f]}: the file or the manifest changed after the set was "
                             "written (write the set again)")  # fmt: skip
        return n

    n = sum(rows(f, manifest_rows(p)) for p in paths for f in dataset_files(p))
    flux = ivar = None
    labels, ids, grid, at, empty = [], [], None, 0, []
    for p in paths:
        start = at
        for table in iter_dataset(p):
            g = _table_grid(table, WAVE_KEY)
            grid = grid or g
            if g["hash"] != grid["hash"]:
                raise ValueError(f"{p}: grid {g.get('name')!r} differs from {paths[0]}'s")
            a = table_arrays(table)
            if at + len(a.flux) > n:  # a file rewritten while it was read
                raise ValueError(f"{p}: more rows than its files' footers said ({n} in all)")
            if flux is None:  # pages are taken as rows are written
                flux, ivar = (np.empty((n, a.flux.shape[1]), np.float32) for _ in range(2))
            flux[at : at + len(a.flux)], ivar[at : at + len(a.flux)] = a.flux, a.ivar
            labels.append(a.labels)
            ids.append(a.ids)
            at += len(a.flux)
            del table, a
        if at == start:
            empty.append(str(p))
    if len(empty) == len(paths):
        raise ValueError(f"no training spectra in {', '.join(empty)}: no rows")
    labels = np.concatenate(labels).astype(np.float64)
    return flux[:at], ivar[:at], labels, np.concatenate(ids), grid


def _permute_rows(arrays: Sequence[np.ndarray], perm: np.ndarray) -> None:
    """Row ``j`` of each array becomes its row ``perm[j]``, in place (``perm`` a
    permutation of the rows), following the permutation's cycles: one row's copy at a
    time, where ``a[perm]`` would copy the whole array."""
    done = perm == np.arange(len(perm))
    for s in np.flatnonzero(~done):
        if done[s]:
            continue
        held, j = [a[s].copy() for a in arrays], s
        while perm[j] != s:
            for a in arrays:
                a[j] = a[perm[j]]
            done[j], j = True, perm[j]
        for a, row in zip(arrays, held, strict=True):
            a[j] = row
        done[j] = True


def _table_grid(table, wave_key: bytes) -> dict:
    import json

    meta = json.loads(table.schema.metadata[b"mendis_ray"])
    grid = dict(meta["grid"])
    if wave_key in table.schema.metadata:
        grid["wavelength"] = np.frombuffer(table.schema.metadata[wave_key], "<f8").copy()
    return grid


def train_signal_checkpoint(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    cfg: SignalConfig | None = None,
    *,
    reference: Sequence[str | os.PathLike] | None = None,
    time_limit_s: float | None = None,
    show_progress: bool = True,
) -> dict:
    """``mendis train --model signal``: train on the shards under ``paths``, fit the
    scorer's reference on the validation rows and on the held-out spectra under
    ``reference`` (:func:`load_reference_shards`; read and checked before the training),
    write ``out/checkpoint``; a summary."""
    from mendis_ray.science.noise_calibration import percentile_precision
    from mendis_ray.science.signal_scores import SignalScorer

    cfg = cfg or SignalConfig()
    t0 = time.perf_counter()
    flux, ivar, labels, grid, ids = load_training_shards(paths, cfg.seed, with_ids=True)
    held = None  # the reference's spectra: flux, ivar, labels (held through the training:
    # a reference that cannot be used stops the command before it trains)
    if reference:
        held = load_reference_shards(reference, grid, (ids, flux), cfg.seed)
        log.info("read %d reference spectra for the scores' reference", len(held[0]))
    del ids
    n_ref = 0 if held is None else len(held[0])
    some = ivar[:: max(1, len(ivar) // 1000)]  # ~1,000 of the shuffled rows: not a copy of all
    if np.median(some[some > 0]) > 1e11:  # NOISE_FREE_IVAR: simulated with --train-snr 0
        log.warning(
            "the training spectra are noise-free (ivar ~1e12): the signal-space model learns "
            "each star's noise from its ivar, so train it on observed (noisy) spectra, or "
            "use --model flow, whose Ray Data pipeline adds noise"
        )
    log.info("read %d training spectra (%d px) in %.1f s", len(flux), flux.shape[1],
             time.perf_counter() - t0)  # fmt: skip
    n_cal = round(0.1 * len(flux)) + n_ref  # the held-out spectra that calibrate
    if len(flux) < MIN_TRAINING and n_cal < round(0.1 * MIN_TRAINING):
        log.warning(
            "%d training spectra: the last 10%% and any --reference spectra (%d) calibrate "
            "the signal score per noise level, too few for calibrated percentiles (600 "
            "emulated dwarfs on 7,214 pixels: inliers' mean percentile 40 at low S/N and 69 "
            "at high S/N, against 50); train on at least %d, or give more held-out spectra "
            "with --reference", len(flux), n_cal, MIN_TRAINING,
        )  # fmt: skip
    res = train_signal_model(flux, ivar, labels, cfg, time_limit_s=time_limit_s,
                             show_progress=show_progress)  # fmt: skip
    va, tr = res.val_rows, slice(0, res.val_rows.start)
    t1 = time.perf_counter()
    out_of_sample = (flux[va], ivar[va], labels[va])  # (m, p), (m, p), (m, 3)
    if held is not None:  # the validation rows, then the reference's
        out_of_sample = tuple(np.concatenate(ab) for ab in zip(out_of_sample, held, strict=True))
    del held
    scorer = SignalScorer.fit(res.model, *out_of_sample, res.train_coords, grid=grid,
                              train=(flux[tr], ivar[tr], labels[tr]),
                              far_iqr=cfg.far_iqr)  # fmt: skip
    del out_of_sample
    log.info("scores calibrated on the %d validation, %d reference and %d training "
             "spectra in %.1f s", len(flux) - tr.stop, n_ref, tr.stop,
             time.perf_counter() - t1)  # fmt: skip
    hist = res.history
    val_log_p = scorer.score(flux[va], ivar[va], labels[va])["log_p"]
    gain = hist.best_val_log_prob - hist.initial_val_log_prob
    summary = {
        "model": "signal", "rows": len(flux), "train_rows": tr.stop,
        "val_rows": len(flux) - tr.stop, "reference_rows": n_ref,
        "reference": [str(r) for r in reference or ()],
        "k": res.model.basis.k, "epochs": len(hist.epochs), "best_epoch": hist.best_epoch,
        "batch_size": res.steps.batch_size, "lr": res.steps.lr,
        "initial_val_log_q": hist.initial_val_log_prob, "best_val_log_q": hist.best_val_log_prob,
        "val_log_p": float(np.mean(val_log_p[np.isfinite(val_log_p)])),
        "val_far_out": scorer.held_out_far,  # of the validation and reference spectra
        "far_iqr": cfg.far_iqr,
        "percentile_points": percentile_precision(len(scorer.ref["sorted.score"])),
        "seconds": time.perf_counter() - t0, "signal_config": cfg.to_dict(),
    }  # fmt: skip
    if not np.isfinite(hist.best_val_log_prob) or gain <= 0:
        log.warning(
            "the flow did not improve on its starting point (validation log q %.2f -> %.2f): "
            "the checkpoint holds the start (an ActNorm-standardized Gaussian)",
            hist.initial_val_log_prob, hist.best_val_log_prob,
        )  # fmt: skip
    summary["checkpoint"] = str(scorer.save(Path(out) / "checkpoint", metrics=summary))
    return summary
