"""The API the classical baselines share, and what their fits and scores have in common.

:class:`Baseline` is the scoring API shared by the baselines and the flow: ``fit(x) ->
self``, ``log_prob(x) -> (m,)`` in nats, ``score(x) -> (m,)`` where HIGHER means MORE
TYPICAL, and ``to_state() / from_state()`` to a flat dict of arrays and scalars.  Here too:
:class:`NotFittedError`, the ``__repr__`` / not-fitted checks every model shares
(:class:`_Fitted`), the input check (:func:`_check_x`, finite real ``(n, d)``), the streamed
row chunks and moments, and the state-dict readers.  The models are in
:mod:`.gaussian_baselines` (Gaussian, factor analysis) and :mod:`.subspace_baselines`
(PPCA, Hotelling T^2); :mod:`.baselines` is their one public entry point.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, Protocol, Self, runtime_checkable

import numpy as np

__all__ = ["Baseline", "NotFittedError", "StateValue"]

#: A value in a baseline's state dict: arrays and plain scalars only (no pickle needed).
StateValue = np.ndarray | float | int | str

_LOG_2PI = math.log(2.0 * math.pi)
#: float64 elements per streamed row chunk (32 MiB).
_CHUNK_ELEMENTS = 1 << 22


class NotFittedError(ValueError):
    """A baseline was used (scored, saved) before :meth:`fit` or :meth:`from_state`."""


class _Fitted:
    """What every baseline shares: ``n_features``, the not-fitted error and ``__repr__``.

    A subclass defines ``is_fitted``, ``mean_`` (None until fitted) and
    :meth:`_repr_items` (its arguments, then, when fitted, what fitting found)."""

    mean_: np.ndarray | None

    @property
    def is_fitted(self) -> bool:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    def _repr_items(self) -> list[tuple[str, str]]:
        return []

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v}" for k, v in self._repr_items())
        return f"{type(self).__name__}({items})"

    @property
    def n_features(self) -> int:
        self._require_fitted("n_features")
        assert self.mean_ is not None
        return int(self.mean_.size)

    def _require_fitted(self, what: str) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                f"{type(self).__name__}.{what}: the model is not fitted; "
                "call fit(x) or from_state()"
            )


@runtime_checkable
class Baseline(Protocol):
    """The scoring API shared by the baselines and the flow.

    ``x`` is always ``(n, d)`` real; outputs are ``(n,)`` float64.
    """

    name: str

    def fit(self, x: np.ndarray) -> Self:
        """Fit on ``x`` (n, d); returns ``self``."""
        ...

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        """Log density (nats) of each row of ``x`` (n, d) -> (n,)."""
        ...

    def score(self, x: np.ndarray) -> np.ndarray:
        """Typicality of each row of ``x`` (n, d) -> (n,): higher = more inlier-like."""
        ...

    def to_state(self) -> dict[str, StateValue]:
        """The fitted model as a flat dict of arrays and scalars."""
        ...

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Self:
        """Rebuild a fitted model from :meth:`to_state` output (or ``np.load`` of it)."""
        ...


# ----------------------------------------------------------------------------- helpers


def _row_chunks(n: int, d: int) -> Iterator[slice]:
    """Row slices of at most ``_CHUNK_ELEMENTS`` float64 elements each."""
    step = max(1, _CHUNK_ELEMENTS // max(d, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _check_x(
    x: np.ndarray,
    where: str,
    n_features: int | None = None,
    min_rows: int = 0,
) -> np.ndarray:
    """Validate ``x`` as a finite real ``(n, d)`` array (not copied); clear errors otherwise.

    Raises:
        ValueError: wrong dtype or rank, ``d != n_features``, fewer than ``min_rows`` rows,
            or a non-finite value (the message names the first bad row and column).
    """
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{where}: x must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(
            f"{where}: x must be 2-D (n_samples, n_features), got shape {arr.shape}"
            + ("; pass x[None, :] for a single sample" if arr.ndim == 1 else "")
        )
    n, d = arr.shape
    if n_features is not None and d != n_features:
        raise ValueError(
            f"{where}: x has {d} features (columns) but the model was fitted on {n_features}"
        )
    if n < min_rows:
        raise ValueError(f"{where}: need at least {min_rows} samples (rows), got {n}")
    if arr.dtype.kind == "f":
        for sl in _row_chunks(n, d):
            ok = np.isfinite(arr[sl])
            if not ok.all():
                bad_rows = sl.start + np.flatnonzero(~ok.all(axis=1))
                row = int(bad_rows[0])
                col = int(np.flatnonzero(~np.isfinite(arr[row]))[0])
                every = np.flatnonzero(~np.isfinite(arr).all(axis=1))
                more = (
                    f"; {every.size} non-finite rows in all, the first: {every[:10].tolist()}"
                    if every.size > 1
                    else ""
                )
                raise ValueError(
                    f"{where}: row {row} of x is not finite ({arr[row, col]!r} in column "
                    f"{col}){more}"
                )
    return arr


def _centered_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Two-pass streamed moments of ``x`` (n, d).

    Returns:
        mean (d,), scatter ``Xc^T Xc`` (d, d) and ``sum_k |xc_k|^4`` (the fourth-moment
        term of the Ledoit-Wolf estimator), all float64, with ``Xc = x - mean``.
    """
    n, d = x.shape
    mean = np.mean(x, axis=0, dtype=np.float64)
    scatter = np.zeros((d, d))
    norm4 = 0.0
    for sl in _row_chunks(n, d):
        c = np.asarray(x[sl], dtype=np.float64) - mean
        scatter += c.T @ c
        sq = np.einsum("ij,ij->i", c, c)
        norm4 += float(sq @ sq)
    return mean, scatter, norm4


def _state_get(state: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in state:
        raise ValueError(f"{where}: state has no {key!r} entry (keys: {sorted(state)})")
    return state[key]


def _state_array(state: Mapping[str, Any], key: str, where: str, ndim: int) -> np.ndarray:
    arr = np.array(_state_get(state, key, where), dtype=np.float64, copy=True)
    if arr.ndim != ndim:
        raise ValueError(f"{where}: state[{key!r}] must be {ndim}-D, got shape {arr.shape}")
    return arr


def _state_check_kind(state: Mapping[str, Any], expected: str, where: str) -> None:
    kind = str(_state_get(state, "baseline", where))
    if kind != expected:
        raise ValueError(f"{where}: state is for baseline {kind!r}, not {expected!r}")
