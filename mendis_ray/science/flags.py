"""The quality flags of a score: one bit each in the ``flags`` column, one home.

Every scorer (:mod:`~mendis_ray.science.ood`, :mod:`~mendis_ray.science.signal_scores`),
the HTTP API (:mod:`~mendis_ray.scoring_api`) and the catalog outputs
(:mod:`~mendis_ray.science.ranking`) take the bits and their names from :class:`Flag`.
"""

from __future__ import annotations

import enum

import numpy as np

__all__ = ["FLAG_COLUMNS", "Flag", "flag_columns", "flag_list", "flag_names"]


class Flag(enum.IntFlag):
    """Bits of the ``flags`` column (see :mod:`mendis_ray.science.ood` for their tests)."""

    #: NaN/inf flux at pixels with ivar > 0, infinite ivar, or infinite labels (NaN ivar is a
    #: masked pixel).
    NONFINITE = 1
    #: more than ``max_masked_fraction`` of the pixels masked.
    MASKED = 2
    #: too many good pixels outside the training flux range: the signal model, over 0.5% of
    #: them by more than 4 times their own noise; the flow, over 1% (range widened by
    #: ``range_sigma`` training standard deviations).
    FLUX_RANGE = 4
    #: given labels outside the training range; impossible ones (log g 50, Teff in kK) are
    #: also read as missing, so the spectrum is scored without labels.
    LABEL_RANGE = 8
    #: the model cannot score the spectrum (every pixel masked, or non-finite input).
    UNSCORABLE = 16
    #: noisier than the signal-space model's calibrated range (about S/N ``min_snr``,
    #: or the training stars' noise levels in older checkpoints): the signal score's
    #: calibration is extrapolated there.
    NOISE_RANGE = 32

    @property
    def label(self) -> str:
        """The flag's lower-case name (``"flux_range"``), as in ``flag_<label>`` columns."""
        return str(self.name).lower()

    @property
    def meaning(self) -> str:
        """One line saying what the flag means (FITS header comments, docs)."""
        return _MEANINGS[self]


_MEANINGS = {
    Flag.NONFINITE: "NaN/inf flux at a good pixel, bad ivar or inf label",
    Flag.MASKED: "more than the allowed fraction of pixels masked",
    Flag.FLUX_RANGE: "too many good pixels past the training flux range",
    Flag.LABEL_RANGE: "given labels outside training range or impossible",
    Flag.UNSCORABLE: "the model cannot score it: ranked most outlying",
    Flag.NOISE_RANGE: "noisier than the calibrated range: extrapolated",
}


def flag_list(flags: int) -> list[str]:
    """``["masked", "flux_range"]`` for a flag bit field (empty for 0), in bit order."""
    return [f.label for f in Flag if int(flags) & f]


def flag_names(flags: int) -> str:
    """``"masked|flux_range"`` for a flag bit field (empty string for 0)."""
    return "|".join(flag_list(flags))


def flag_columns(flags: np.ndarray) -> dict[str, np.ndarray]:
    """One boolean column ``flag_<label>`` (n,) per flag of the bit fields ``flags`` (n,)."""
    flags = np.asarray(flags)
    return {col: (flags & int(f)) > 0 for col, f in zip(FLAG_COLUMNS, Flag, strict=True)}


#: The boolean columns of a score table, one per flag, in bit order.
FLAG_COLUMNS = tuple(f"flag_{f.label}" for f in Flag)
