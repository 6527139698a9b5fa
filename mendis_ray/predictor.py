"""One loaded checkpoint of either model kind behind one interface (no Ray here).

The Serve replica (:mod:`mendis_ray.distributed.serving`) scores through a
:class:`Predictor`, whatever :func:`~mendis_ray.science.signal_scores.load_scorer` returns
for the checkpoint:

``flow`` (:class:`mendis_ray.science.ood.Scorer`, the full-space flow)
    ``log_p`` (joint, labelled rows), ``log_p_marginal`` (label-free, only where asked:
    an optimisation per spectrum), ``log_p_per_dim``, ``percentile``, ``signal_score``,
    ``signal_percentile``, ``log_ratio_gaussian``, ``masked_fraction``.
``signal`` (:class:`mendis_ray.science.signal_scores.SignalScorer`)
    ``score`` (the primary triage score) with ``percentile``, ``signal_score``,
    ``residual_score`` with their percentiles, ``log_p`` (total density; labels integrated
    out for unlabelled rows), ``chi2_dof``, ``noise_level``, ``masked_fraction``,
    ``strongest_test`` (the test with the smallest tail).  Unlabelled spectra are always
    scored label-free (importance sampling over the labels: cheap), whatever the
    request's ``marginal``.

:meth:`Predictor.score` returns exactly the keys of :attr:`Predictor.keys` (a scorer that
stops returning one fails at load, in the warm-up, not per request), and
:meth:`Predictor.unscorable` the same keys for rows whose model call raised, so results of
retried parts can always be concatenated.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from mendis_ray.science.flags import FLAG_COLUMNS, Flag, flag_columns

__all__ = ["FLOW_KEYS", "SIGNAL_KEYS", "Predictor", "flow_unscorable", "signal_unscorable"]

log = logging.getLogger(__name__)

#: the keys of ``Scorer.score`` (full-space flow)
FLOW_KEYS = (
    "log_p", "log_p_marginal", "labels_used", "log_p_per_dim", "signal_score", "percentile",
    "signal_percentile", "log_ratio_gaussian", "masked_fraction", "flags", *FLAG_COLUMNS,
)  # fmt: skip
#: the keys of ``SignalScorer.score`` served (signal-space model)
SIGNAL_KEYS = (
    "score", "signal_score", "residual_score", "log_p", "percentile", "signal_percentile",
    "residual_percentile", "chi2_dof", "noise_level", "labelled", "labels_used",
    "masked_fraction", "flags", *FLAG_COLUMNS, "strongest_test",
)  # fmt: skip


def _flag_columns(n: int) -> dict[str, np.ndarray]:
    flags = np.full(n, int(Flag.UNSCORABLE), dtype=np.int64)
    return {"flags": flags, **flag_columns(flags)}


def flow_unscorable(n: int, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Full-space flow scores of ``n`` spectra the model could not score (labels (n, 3)):
    flagged ``unscorable``, -inf scores and percentile 0 (the most outlying rank) where a
    labelled score was due, NaN where none was (see ``Flag.UNSCORABLE`` in
    :mod:`mendis_ray.science.flags`)."""
    labelled = np.isfinite(labels).all(axis=1)
    out = {k: np.full(n, np.nan) for k in ("log_p_marginal", "log_ratio_gaussian",
                                           "masked_fraction")}  # fmt: skip
    for k in ("log_p", "log_p_per_dim", "signal_score"):
        out[k] = np.where(labelled, -np.inf, np.nan)
    for k in ("percentile", "signal_percentile"):
        out[k] = np.where(labelled, 0.0, np.nan)
    out["labels_used"] = np.where(labelled[:, None], labels, np.nan)
    return out | _flag_columns(n)


def signal_unscorable(n: int, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Signal-space model scores of ``n`` spectra the model could not score (labels
    (n, 3)): as ``SignalScorer.score`` marks them, labelled or not: -inf scores,
    percentiles 0, flagged ``unscorable``; the diagnostics NaN."""
    labelled = np.isfinite(labels).all(axis=1)
    out = {k: np.full(n, -np.inf) for k in ("score", "signal_score", "residual_score", "log_p")}
    out |= {k: np.zeros(n) for k in ("percentile", "signal_percentile", "residual_percentile")}
    out |= {k: np.full(n, np.nan) for k in ("chi2_dof", "noise_level", "masked_fraction")}
    out["labelled"] = labelled
    out["labels_used"] = np.where(labelled[:, None], labels, np.nan)
    out["strongest_test"] = np.full(n, "unscorable", dtype=object)
    return out | _flag_columns(n)


@dataclass
class Predictor:
    """A checkpoint's scorer (``kind`` ``"flow"`` or ``"signal"``) with what the serving
    replica needs: pixel count, grid (without the wavelengths; ``n_pix`` always set), the
    model-specific part of ``GET /model`` (``info``) and the device it runs on."""

    kind: str
    scorer: Any
    n_pix: int
    grid: dict
    info: dict
    device: str

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: str = "cpu", scorer_kwargs: dict | None = None
    ) -> Predictor:
        """The checkpoint folder ``path`` (either kind) on ``device``; a signal-space model
        always runs on the CPU.  ``scorer_kwargs``: the Scorer knobs of a full-space flow
        (``ScoreConfig.scorer_kwargs()``; None: the Scorer's defaults).  Raises
        ``CheckpointError`` (a ValueError)."""
        from mendis_ray.flow.checkpoint import checkpoint_info
        from mendis_ray.science.signal_scores import SignalScorer, load_scorer

        scorer = load_scorer(str(path), device=device, **(scorer_kwargs or {}))
        config = checkpoint_info(path).config
        info = {"metrics": config.get("metrics", {}), "created": config.get("created")}
        if isinstance(scorer, SignalScorer):
            if device != "cpu":
                log.warning("a signal-space model runs on the CPU (device %s ignored)", device)
            kind, device = "signal", "cpu"
            model = scorer.model
            n_pix = int(model.basis.mean.shape[0])
            flow = model.flow
            info |= {
                "preset": None, "signal_config": config.get("signal_config"),
                "k": int(model.basis.k), "has_reference": "sorted.score" in scorer.ref,
            }  # fmt: skip
        else:
            kind = "flow"
            density = scorer.density
            n_pix = int(density.standardizer.n_features - density.config.n_labels)
            flow = density.flow
            info |= {
                "preset": config.get("flow_config", {}).get("name"),
                "flow_config": config.get("flow_config"),
                "train_config": config.get("train_config"),
                "has_reference": scorer.reference is not None,
            }  # fmt: skip
        info["n_parameters"] = int(sum(p.numel() for p in flow.parameters()))
        grid = {k: v for k, v in config.get("grid", {}).items() if k != "wavelength"}
        grid.setdefault("n_pix", n_pix)
        return cls(kind, scorer, n_pix, grid, {"model_kind": kind, **info}, device)

    @property
    def keys(self) -> tuple[str, ...]:
        return SIGNAL_KEYS if self.kind == "signal" else FLOW_KEYS

    def unscorable(self, n: int, labels: np.ndarray) -> dict[str, np.ndarray]:
        """:meth:`score`'s keys for ``n`` rows that could not be scored (labels (n, 3))."""
        fn = signal_unscorable if self.kind == "signal" else flow_unscorable
        return fn(n, np.asarray(labels, np.float64))

    def warm_up(self) -> dict[str, np.ndarray]:
        """Score two copies of the training mean (the first calls build caches); checks
        that the scorer returns every key of :attr:`keys`."""
        if self.kind == "signal":
            m = self.scorer.model
            flux, labels = m.basis.mean, m.label_mean
        else:
            mean = self.scorer.density.standardizer.mean
            flux, labels = mean[: self.n_pix], mean[self.n_pix :]
        return self.score(np.tile(flux, (2, 1)), None, np.tile(labels, (2, 1)),
                          np.zeros(2, bool))  # fmt: skip

    def score(
        self,
        flux: np.ndarray,
        ivar: np.ndarray | None,
        labels: np.ndarray,
        label_free: np.ndarray,
        batch_size: int = 256,
    ) -> dict[str, np.ndarray]:
        """Scores of n spectra: ``flux``, ``ivar`` (n, n_pix) (None: all good), ``labels``
        (n, 3) (NaN rows are unlabelled); ``label_free`` (n,) bool: unlabelled rows that
        asked for the (for the flow: slow) label-free score.  A dict of (n,) arrays
        (``labels_used`` (n, 3)) with exactly the keys of :attr:`keys`."""
        if self.kind == "signal":  # label-free rows are always scored (cheap)
            out = self.scorer.score(flux, ivar, labels)
            return {k: out[k] for k in SIGNAL_KEYS}
        want = np.asarray(label_free, bool) & ~np.isfinite(labels).all(axis=1)
        size = max(int(batch_size), 1)
        if not want.any():
            out = self.scorer.score(flux, ivar, labels, marginal="none", batch_size=size)
            return {k: out[k] for k in FLOW_KEYS}
        out = {}  # label-free rows on their own (their optimisation must not slow the rest)
        for rows, mode in ((~want, "none"), (want, "unlabelled")):
            if not rows.any():
                continue
            part = self.scorer.score(
                flux[rows], None if ivar is None else ivar[rows], labels[rows],
                marginal=mode, batch_size=size,
            )  # fmt: skip
            for k in FLOW_KEYS:
                v = part[k]
                if k not in out:
                    out[k] = np.empty((len(flux), *v.shape[1:]), dtype=v.dtype)
                out[k][rows] = v
        return out
