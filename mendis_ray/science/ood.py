"""Scoring spectra with the flow: which ones do not belong?

:class:`Scorer` turns a :class:`~mendis_ray.flow.density.SpectrumDensity` plus a
:class:`ScoreReference` (statistics of held-out training spectra, storable in a
checkpoint) into the scores a survey astronomer triages with, all "higher = more typical":

``log_p``
    Exact log p(flux, Teff, log g, [Fe/H]) in physical units when labels are given.
``log_p_marginal``
    Label-free: log p(flux) = log of the integral of p(flux, y) over the labels y, by the
    Laplace approximation around the profile maximum y* (gradient ascent in standardized
    label space): ``log p(flux, y*) + (k/2) log 2 pi - (1/2) log det H`` with H the negative
    Hessian of log p in y (k = 3 labels).  Exact when p(flux, y) is Gaussian in y, which the
    tests check against a closed form.  Computed for unlabelled spectra (or all, on
    request); ``labels_used`` holds y* there.
``log_p_per_dim``
    The primary score (``log_p``, or ``log_p_marginal`` without labels) per dimension.
``signal_score``
    The **projected log-likelihood**, for subtle outliers.  With ~2400 noisy pixels the
    full log p of an inlier scatters by about sqrt(2 n_pix)/2 nats from the noise chi^2
    alone, which hides small departures in the few directions where the stellar signal
    lives, and a cleaner (higher-S/N) spectrum gets a *higher* log p.  The signal score
    evaluates the flow at the projection of the standardized point x = (spectrum, labels)
    onto the top ``n_signal`` principal directions B (k, d) of the training features,

        signal_score(x) = log p_flow(c + B^T B (x - c))    (nats, standardized units),

    which removes the noise outside the signal subspace (every spectrum gets the same,
    perfectly typical, zero residual there) and keeps the flow's non-Gaussian density of
    the signal coordinates.  For a Gaussian flow whose covariance has B among its
    eigenvectors it is ``const - T^2 / 2``, Hotelling's T^2 in those k directions; a
    higher S/N barely moves it as long as the k directions are signal-dominated (at
    S/N 300 on the simulator: the first ~5-10; ``n_signal="auto"`` keeps the directions
    whose variance exceeds 10x the Marchenko-Pastur edge of pure noise).  One flow
    evaluation per spectrum.  Departures *outside* the subspace are left to ``log_p``
    and the flux-range flag.
``percentile``, ``signal_percentile``
    Percentage of held-out training spectra whose score is <= this one (0 = less typical
    than every reference spectrum), against the reference of the same score (joint,
    label-free or signal).
``log_ratio_gaussian``
    ``log p_flow - log p_gaussian`` at the same standardized point (given labels, or y*):
    the noise term is nearly the same for both models and cancels, so the ratio isolates
    what the flow knows beyond a shrunk full-covariance Gaussian.

Flags (bit field ``flags`` plus boolean ``flag_*`` columns; the bits are
:class:`~mendis_ray.science.flags.Flag`):

* ``NONFINITE`` -- NaN/inf flux at pixels with ivar > 0, non-finite ivar, or inf
  labels (such pixels are treated as masked; the spectrum's score is not trustworthy);
* ``MASKED`` -- more than ``max_masked_fraction`` of pixels masked;
* ``FLUX_RANGE`` -- more than 1% of good pixels outside the training flux range
  widened by ``range_sigma`` training standard deviations;
* ``LABEL_RANGE`` -- given labels outside the training range widened the same way;
* ``UNSCORABLE`` -- the model cannot score the spectrum: every pixel masked, or
  values whose standardized form (or whose flow / Gaussian density) is not finite, e.g.
  flux of +-3e38.  Such a row never raises and never looks typical: its log p,
  label-free log p, per-dimension and signal scores are -inf, its percentiles 0 (the most
  outlying rank) and its likelihood ratio NaN.  The other rows of the call are unaffected.

Scores are computed row by row in float32 batches: the same spectrum scored in batches
of different sizes or with different companions differs only by float rounding of the
reductions (measured: at most about 5e-4 nats of log p on a 2408-dimensional flow, i.e.
1e-7 relative), never by more than ``BATCH_TOLERANCE`` nats.

Masked pixels (ivar = 0, or non-finite flux) are filled with the training mean flux at
that pixel before scoring: the score then measures the good pixels plus a perfectly
typical value at the masked ones, i.e. a masked pixel can never make a spectrum look
*less* typical, and heavily masked spectra are flagged.

The label profile is :mod:`mendis_ray.science.label_profile`; the reference statistics,
the signal subspace and the masked-pixel fill are :mod:`mendis_ray.science.score_reference`
(both re-exported here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mendis_ray.flow.density import SpectrumDensity
from mendis_ray.science.baselines import GaussianBaseline
from mendis_ray.science.flags import Flag, flag_columns
from mendis_ray.science.label_profile import frozen_parameters, profile_labels
from mendis_ray.science.metrics import percentile_rank
from mendis_ray.science.score_reference import (
    ScoreReference,
    _good_range,
    _reference_rows,
    fill_masked,
    signal_subspace,
)
from mendis_ray.spectra.schema import impossible_labels, possible_labels

__all__ = [
    "ScoreReference",
    "Scorer",
    "fill_masked",
    "frozen_parameters",
    "profile_labels",
    "signal_subspace",
]

#: bound on how much a spectrum's log p (nats) may change with its batch companions
BATCH_TOLERANCE = 2e-3


@dataclass
class Scorer:
    """Scores for new spectra from a trained density and its :class:`ScoreReference`.

    Args:
        density: the trained flow with its standardization.
        reference: statistics of held-out training spectra (see :meth:`fit`).
        range_sigma: widening of the training ranges, in training standard deviations.
        max_masked_fraction: above this masked fraction a spectrum is flagged.
        profile_steps: Adam steps of the label profile (label-free score).
    """

    density: SpectrumDensity
    reference: ScoreReference | None = None
    range_sigma: float = 5.0
    max_masked_fraction: float = 0.2
    profile_steps: int = 200

    @classmethod
    def fit(
        cls,
        density: SpectrumDensity,
        flux: np.ndarray,
        labels: np.ndarray,
        *,
        n_signal: int | str = "auto",
        n_marginal: int = 64,
        gaussian: GaussianBaseline | bool = True,
        basis_flux: np.ndarray | None = None,
        basis_labels: np.ndarray | None = None,
        ivar: np.ndarray | None = None,
        basis_ivar: np.ndarray | None = None,
        **kwargs: float,
    ) -> Scorer:
        """A scorer whose reference is the held-out training spectra ``flux`` (m, n_pix)
        with ``labels`` (m, 3) and ``ivar`` (m, n_pix; None: every pixel good): ranges,
        signal subspace, reference scores (label-free ones on the first ``n_marginal``),
        and a Gaussian baseline.  Masked pixels (ivar 0 or not finite) are treated as
        :meth:`score` treats them (filled with the training mean) and stay out of the flux
        ranges; their flux may be any placeholder.

        ``gaussian`` may be a Gaussian already fitted on the standardized *training*
        features (better than one fitted on the reference); ``basis_flux`` (n, n_pix) and
        ``basis_labels`` (n, 3) (and ``basis_ivar``) are the (training) spectra the signal
        subspace is computed from (default: the reference)."""
        std = density.standardizer
        n_pix = std.n_features - density.config.n_labels
        flux, labels, good = _reference_rows(flux, labels, ivar, "flux")
        filled = np.where(good, flux, std.mean[:n_pix])
        x = std.transform(filled, labels).astype(np.float64)  # (m, d)
        if basis_flux is None:
            xs = x
        else:
            if basis_labels is None or len(basis_labels) != len(basis_flux):
                raise ValueError("Scorer.fit: basis_flux needs basis_labels of the same length")
            bf, bl, bgood = _reference_rows(basis_flux, basis_labels, basis_ivar, "basis_flux")
            xs = std.transform(np.where(bgood, bf, std.mean[:n_pix]), bl).astype(np.float64)
        center = xs.mean(axis=0)
        basis = signal_subspace(xs, n_signal)
        if gaussian is True:
            gaussian = GaussianBaseline().fit(x)
        ref = ScoreReference(
            flux_range=_good_range(flux, good, std.mean[:n_pix]),
            label_range=np.stack([labels.min(axis=0), labels.max(axis=0)]),
            center=center,
            basis=basis,
            gaussian=gaussian or None,
        )
        scorer = cls(density, ref, **kwargs)
        iv = good.astype(np.float64)
        out = scorer.score(filled, iv, labels=labels, marginal="none")
        ref.ref_log_p = np.sort(out["log_p"])
        ref.ref_signal = np.sort(out["signal_score"])
        if n_marginal > 0:
            sub = scorer.score(filled[:n_marginal], iv[:n_marginal], marginal="all")
            ref.ref_log_p_marginal = np.sort(sub["log_p_marginal"])
        return scorer

    def checkpoint_arrays(self) -> dict[str, np.ndarray]:
        """The reference as ``score.*`` arrays for ``save_checkpoint(extra_arrays=...)``."""
        if self.reference is None:
            return {}
        return {f"score.{k}": v for k, v in self.reference.to_arrays().items()}

    @classmethod
    def from_checkpoint(
        cls, path: str, *, device: str = "cpu", expect_grid: dict | None = None, **kwargs: float
    ) -> Scorer:
        """A scorer from a checkpoint folder alone (flow, standardization, reference)."""
        from mendis_ray.flow.checkpoint import load_checkpoint

        density, info = load_checkpoint(path, device=device, expect_grid=expect_grid)
        arrays = {
            k.removeprefix("score."): v
            for k, v in info.get("extra_arrays", {}).items()
            if k.startswith("score.")
        }
        ref = ScoreReference.from_arrays(arrays, where=str(path)) if arrays else None
        return cls(density, ref, **kwargs)

    def score(
        self,
        flux: np.ndarray,
        ivar: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        *,
        marginal: str = "unlabelled",
        batch_size: int = 256,
    ) -> dict[str, np.ndarray]:
        """Scores of n spectra.

        Args:
            flux: (n, n_pix). ivar: (n, n_pix) or None (all good).
            labels: (n, 3) Teff, log g, [Fe/H]; rows with a NaN (or None) are unlabelled.
            marginal: which rows get the label-free score: "unlabelled", "all" or "none".

        Returns:
            dict of (n,) arrays: log_p (NaN where unlabelled), log_p_marginal (NaN where not
            computed), labels_used (n, 3), log_p_per_dim, signal_score, percentile,
            signal_percentile, log_ratio_gaussian, masked_fraction, flags and one boolean
            column per flag.
        """
        if marginal not in ("unlabelled", "all", "none"):
            raise ValueError(
                f"Scorer.score: marginal must be unlabelled/all/none, got {marginal!r}"
            )
        flux, ivar, labels = self._checked(flux, ivar, labels)
        n, n_pix = flux.shape
        std = self.density.standardizer
        flags, filled, masked_fraction, labels = self._input_flags(flux, ivar, labels)
        has_labels = np.isfinite(labels).all(axis=1)
        want_marg = {"all": np.ones(n, bool), "none": np.zeros(n, bool)}.get(marginal, ~has_labels)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow: marked below
            x_all = std.transform(filled, np.where(has_labels[:, None], labels, std.mean[n_pix:]))
        # Rows the model cannot score (no good pixel, or values that overflow once
        # standardized) are evaluated at the training mean and marked; see Flag.UNSCORABLE.
        unscorable = (masked_fraction >= 1.0) | ~np.isfinite(x_all).all(axis=1)
        x_all[unscorable] = 0.0
        used = np.where(has_labels[:, None], labels, np.nan)
        raw = self._evaluate(x_all, want_marg, has_labels, used, batch_size)
        for key in ("flow_lp", "signal", "gauss"):  # a non-finite density: unscorable
            if key == "flow_lp" or self._has(key):
                unscorable |= ~np.isfinite(raw[key])
        # a label-free score that came out NaN or +-inf: impossible, not typical
        unscorable |= want_marg & ~np.isfinite(raw["log_p_marg"])
        flags[unscorable] |= Flag.UNSCORABLE
        used[unscorable & ~has_labels] = np.nan
        out = self._final_scores(raw, has_labels, want_marg, unscorable)
        return {
            "log_p": out.pop("log_p"),
            "log_p_marginal": out.pop("log_p_marginal"),
            "labels_used": used,
            **out,
            "masked_fraction": masked_fraction,
            "flags": flags,
            **flag_columns(flags),
        }

    def _checked(
        self, flux: np.ndarray, ivar: np.ndarray | None, labels: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """float64 (flux (n, n_pix), ivar (n, n_pix), labels (n, 3)) or a ValueError naming
        the shape that does not fit the model (ivar None: all good; labels None: none)."""
        std, n_lab = self.density.standardizer, self.density.config.n_labels
        flux = np.asarray(flux, dtype=np.float64)
        if flux.ndim != 2:
            raise ValueError(f"Scorer: flux must be 2-D (n, n_pix), got shape {flux.shape}")
        n, n_pix = flux.shape
        if n_pix != std.n_features - n_lab:
            raise ValueError(
                f"Scorer: spectra have {n_pix} pixels, the model {std.n_features - n_lab}"
            )
        ivar = np.ones_like(flux) if ivar is None else np.asarray(ivar, dtype=np.float64)
        if ivar.shape != flux.shape:
            raise ValueError(f"Scorer: ivar {ivar.shape} does not match flux {flux.shape}")
        labels = np.full((n, n_lab), np.nan) if labels is None else np.asarray(labels, np.float64)
        if labels.shape != (n, n_lab):
            raise ValueError(f"Scorer: labels must be ({n}, {n_lab}), got {labels.shape}")
        return flux, ivar, labels

    def _input_flags(
        self, flux: np.ndarray, ivar: np.ndarray, labels: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The flags the inputs alone decide (all but UNSCORABLE) (n,), the flux with masked
        pixels filled (n, n_pix), the masked fraction (n,) and the labels with inf -> NaN."""
        std, ref = self.density.standardizer, self.reference
        n_pix = flux.shape[1]
        flags = np.zeros(len(flux), dtype=np.int64)
        bad_value = (~np.isfinite(flux) & (ivar > 0)) | np.isinf(ivar)  # NaN ivar: masked
        bad_label = np.isinf(labels).any(axis=1)
        flags[bad_value.any(axis=1) | bad_label] |= Flag.NONFINITE
        filled, masked = fill_masked(flux, ivar, std.mean[:n_pix])
        masked_fraction = masked.mean(axis=1)
        flags[masked_fraction > self.max_masked_fraction] |= Flag.MASKED
        flags[impossible_labels(labels)] |= Flag.LABEL_RANGE  # read as missing below
        labels = possible_labels(labels)  # inf, -9999, impossible: missing
        has_labels = np.isfinite(labels).all(axis=1)
        if ref is not None:
            width = self.range_sigma * std.std[:n_pix]
            out = (filled < ref.flux_range[0] - width) | (filled > ref.flux_range[1] + width)
            n_good = np.maximum((~masked).sum(axis=1), 1)
            flags[(out & ~masked).sum(axis=1) / n_good > 0.01] |= Flag.FLUX_RANGE
            width = self.range_sigma * std.std[n_pix:]
            lab_out = (labels < ref.label_range[0] - width) | (labels > ref.label_range[1] + width)
            flags[has_labels & lab_out.any(axis=1)] |= Flag.LABEL_RANGE
        return flags, filled, masked_fraction, labels

    def _has(self, key: str) -> bool:
        """Whether this scorer computes the ``signal`` / ``gauss`` score at all."""
        ref = self.reference
        return ref is not None and (key == "signal" or ref.gaussian is not None)

    def _evaluate(
        self, x_all: np.ndarray, want_marg: np.ndarray, has_labels: np.ndarray,
        used: np.ndarray, batch_size: int,
    ) -> dict[str, np.ndarray]:  # fmt: skip
        """The densities of the standardized rows ``x_all`` (n, d), batch by batch: the
        flow's ``flow_lp``, the label-free ``log_p_marg`` (where ``want_marg``),
        ``signal`` and ``gauss`` (NaN where not computed), each (n,).  The profile's labels
        replace those of unlabelled rows in ``x_all`` and ``used`` (n, 3) (in place)."""
        n = len(x_all)
        raw = {k: np.full(n, np.nan) for k in ("flow_lp", "log_p_marg", "signal", "gauss")}
        ref = self.reference
        for a in range(0, n, batch_size):
            sl = slice(a, a + batch_size)
            idx = np.flatnonzero(want_marg[sl])
            if idx.size:
                self._profile(x_all, a, idx, has_labels, used, raw["log_p_marg"])
            with torch.no_grad():
                lp = self.density.flow.log_prob(self._tensor(x_all[sl]))
            raw["flow_lp"][sl] = lp.double().cpu().numpy()
            if self._has("signal"):
                raw["signal"][sl] = self._signal(x_all[sl])
            if self._has("gauss"):
                raw["gauss"][sl] = ref.gaussian.log_prob(x_all[sl].astype(np.float64))
        return raw

    def _profile(
        self, x_all: np.ndarray, a: int, idx: np.ndarray, has_labels: np.ndarray,
        used: np.ndarray, log_p_marg: np.ndarray,
    ) -> None:  # fmt: skip
        """Label-free log p of the rows ``a + idx`` by the Laplace approximation about the
        profile maximum (into ``log_p_marg``); unlabelled rows take the profile's labels in
        ``x_all`` (standardized) and ``used`` (physical)."""
        std, n_lab = self.density.standardizer, self.density.config.n_labels
        x0 = self._tensor(x_all[a + idx]).clone()
        x0[:, -n_lab:] = 0.0  # start the profile at the training mean
        y, lpy, logdet = profile_labels(self.density, x0, n_lab, steps=self.profile_steps)
        # Laplace in standardized labels, then back to physical units.
        log_p_marg[a + idx] = (
            lpy.double().cpu().numpy() + 0.5 * n_lab * math.log(2 * math.pi)
            - 0.5 * logdet.double().cpu().numpy() + std.log_abs_det
            + float(np.log(std.std[-n_lab:]).sum())
        )  # fmt: skip
        y_np = y.double().cpu().numpy()
        pos = np.flatnonzero(~has_labels[a + idx])
        fill = idx[pos]  # unlabelled rows take y*
        x_all[a + fill, -n_lab:] = y_np[pos]
        used[a + fill] = y_np[pos] * std.std[-n_lab:] + std.mean[-n_lab:]

    def _final_scores(
        self, raw: dict[str, np.ndarray], has_labels: np.ndarray, want_marg: np.ndarray,
        unscorable: np.ndarray,
    ) -> dict[str, np.ndarray]:  # fmt: skip
        """The scores from the densities ``raw`` (see :meth:`_evaluate`): -inf and
        percentile 0 for unscorable rows wherever a score was asked for, NaN where none
        was; the percentiles against the reference."""
        std, ref = self.density.standardizer, self.reference
        d, n_lab = std.n_features, self.density.config.n_labels
        flow_lp, gauss = raw["flow_lp"], raw["gauss"]
        log_p_marg = np.where(unscorable & want_marg, -np.inf, raw["log_p_marg"])
        log_p = np.where(has_labels, flow_lp + std.log_abs_det, np.nan)
        log_p[unscorable & has_labels] = -np.inf
        known = has_labels | np.isfinite(log_p_marg) | (unscorable & want_marg)
        signal = np.where(known, np.where(unscorable, -np.inf, raw["signal"]), np.nan)
        primary = np.where(has_labels, log_p, log_p_marg)
        pct = np.full(len(flow_lp), np.nan)
        if ref is not None:
            pct = np.where(
                has_labels,
                _percentile(ref.ref_log_p, primary),
                _percentile(ref.ref_log_p_marginal, primary),
            )
        signal_pct = _percentile(ref.ref_signal if ref else None, signal)
        if ref is not None:  # the most outlying rank, wherever a score was asked for
            pct[unscorable & known] = 0.0
            signal_pct[unscorable & known] = 0.0
        return {
            "log_p": log_p,
            "log_p_marginal": log_p_marg,
            "log_p_per_dim": primary / np.where(has_labels, d, d - n_lab),
            "signal_score": signal,
            "percentile": pct,
            "signal_percentile": signal_pct,
            "log_ratio_gaussian": np.where(known & ~unscorable, flow_lp - gauss, np.nan),
        }

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        p = next(self.density.flow.parameters())
        return torch.as_tensor(np.asarray(x), dtype=p.dtype, device=p.device)

    @torch.no_grad()
    def _signal(self, x: np.ndarray) -> np.ndarray:
        """Projected log-likelihood of standardized rows ``x`` (b, d) -> (b,)."""
        ref = self.reference
        assert ref is not None
        coords = (np.asarray(x, np.float64) - ref.center) @ ref.basis.T  # (b, k)
        x_proj = ref.center + coords @ ref.basis  # (b, d) on the signal subspace
        return self.density.flow.log_prob(self._tensor(x_proj)).double().cpu().numpy()


def _percentile(reference: np.ndarray | None, scores: np.ndarray) -> np.ndarray:
    """:func:`~mendis_ray.science.metrics.percentile_rank` of ``scores`` (NaN where there
    is no reference; -inf, the score of an unscorable spectrum, ranks 0)."""
    if reference is None or len(reference) == 0:
        return np.full(np.shape(scores), np.nan)
    return percentile_rank(reference, scores)
