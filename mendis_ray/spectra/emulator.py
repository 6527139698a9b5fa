"""Payne-format spectral emulators: stellar labels -> continuum-normalized APOGEE flux.

Two network formats from The Payne (Ting et al. 2019, github tingyuansen/The_Payne), both
stored as ``.npz`` files of weight arrays and both evaluated here in float64 numpy:

* :class:`PayneEmulator2018` -- one tiny network per pixel (``w_array_0`` is
  (n_pix, n_hidden, n_labels)), sigmoid hidden layer::

      s       = (labels - x_min) / (x_max - x_min) - 0.5
      flux[i] = sum_j w1[i, j] * sigmoid(sum_k w0[i, j, k] s[k] + b0[i, j]) + b1[i]

* :class:`PayneMLP` -- the 2019+ format, one MLP for all pixels with two leaky-ReLU
  (slope 0.01) hidden layers; ``w_array_k`` is (n_out, n_in)::

      flux = w2 @ lrelu(w1 @ lrelu(w0 @ s + b0) + b1) + b2

The output lives on the emulator's ``grid`` (the 7214-pixel ASPCAP grid by default);
:func:`to_model_grid` maps it onto any other grid (an exact pick for subsets such as
``paper_grid()``, flux-conserving resampling otherwise) and :func:`emulate_dataset` turns a
label table into a noisy training set.  :func:`load_emulator` picks the format from the keys.

The emulators extrapolate silently outside ``[x_min, x_max]``; use ``in_range`` to check.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Self

import numpy as np

from mendis_ray.spectra.grid import Grid, aspcap_grid, grid_from_wavelength, resample

__all__ = [
    "LABELS_2018",
    "X_MAX_2018",
    "X_MIN_2018",
    "PayneEmulator2018",
    "PayneMLP",
    "emulate_dataset",
    "leaky_relu",
    "load_emulator",
    "sigmoid",
    "to_model_grid",
]

#: Labels of ``NN_normalized_spectra_2018.npz`` (a data-driven model of APOGEE dwarfs).
LABELS_2018 = ("teff", "logg", "feh", "mgfe", "vmacro")
#: Documented label ranges of the 2018 network, used when a file does not store them.
X_MIN_2018 = np.array([4200.5, 4.000, -0.786, -0.298, -2.79])
X_MAX_2018 = np.array([6995.7, 4.985, 0.378, 0.500, 44.99])

_CHUNK_BYTES = 32 * 2**20  # bound on the largest intermediate array in __call__


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic function ``1 / (1 + exp(-z))`` (exp overflow for z < -709 correctly gives 0)."""
    out = np.array(z, dtype=np.float64)
    np.negative(out, out=out)
    with np.errstate(over="ignore"):
        np.exp(out, out=out)
    out += 1.0
    return np.reciprocal(out, out=out)


def leaky_relu(z: np.ndarray, slope: float = 0.01) -> np.ndarray:
    """Leaky ReLU with The Payne's negative slope 0.01."""
    return np.where(z > 0, z, slope * z)


def _as_grid(grid: Grid | np.ndarray | None) -> Grid:
    """A Grid from a Grid, pixel-centre wavelengths (Angstrom) or None (ASPCAP)."""
    if grid is None:
        return aspcap_grid()
    if isinstance(grid, Grid):
        return grid
    wave = np.asarray(grid, dtype=np.float64)
    aspcap = aspcap_grid()
    if wave.shape == (aspcap.n_pix,) and np.allclose(wave, aspcap.wavelength, rtol=1e-9, atol=0):
        return aspcap
    return grid_from_wavelength(wave, name="emulator")


def _shape_error(name: str, arr: np.ndarray, expected: tuple) -> ValueError:
    return ValueError(f"{name} has shape {arr.shape}, expected {expected}")


class _Payne:
    """Shared label handling, chunked evaluation, grid mapping and npz loading."""

    kind: ClassVar[str] = ""
    required_keys: ClassVar[tuple[str, ...]] = ()
    optional_keys: ClassVar[tuple[str, ...]] = ("x_min", "x_max", "label_names")

    def _init_common(
        self,
        arrays: dict[str, np.ndarray],
        n_labels: int,
        n_pix: int,
        x_min: np.ndarray,
        x_max: np.ndarray,
        label_names: tuple[str, ...] | list[str] | None,
        grid: Grid | np.ndarray | None,
    ) -> None:
        for name, arr in arrays.items():
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{name} contains non-finite values")
        self.grid = _as_grid(grid)
        if n_pix != self.grid.n_pix:
            raise ValueError(
                f"network outputs {n_pix} pixels but grid {self.grid.name!r} has "
                f"{self.grid.n_pix}; expected the last layer to have {self.grid.n_pix} outputs"
            )
        x_min = np.asarray(x_min, dtype=np.float64)
        x_max = np.asarray(x_max, dtype=np.float64)
        for name, x in (("x_min", x_min), ("x_max", x_max)):
            if x.shape != (n_labels,):
                raise _shape_error(name, x, (n_labels,))
        if not (
            np.all(np.isfinite(x_min)) and np.all(np.isfinite(x_max)) and np.all(x_max > x_min)
        ):
            raise ValueError("x_min and x_max must be finite with x_max > x_min for every label")
        self.x_min, self.x_max = x_min, x_max
        if label_names is None:
            label_names = tuple(f"label_{i}" for i in range(n_labels))
        self.label_names = tuple(str(n) for n in label_names)
        if len(self.label_names) != n_labels:
            raise ValueError(f"got {len(self.label_names)} label_names for {n_labels} labels")

    @property
    def n_labels(self) -> int:
        return int(self.x_min.size)

    @property
    def n_pix(self) -> int:
        return self.grid.n_pix

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(labels={list(self.label_names)}, "
            f"grid={self.grid.name!r}, n_pix={self.n_pix})"
        )

    def _check_labels(self, labels: np.ndarray) -> np.ndarray:
        """(n, n_labels) float64 labels, or a ValueError saying what was expected."""
        labels = np.asarray(labels, dtype=np.float64)
        if labels.ndim not in (1, 2) or labels.shape[-1] != self.n_labels:
            raise ValueError(
                f"labels must have shape (n, {self.n_labels}) or ({self.n_labels},) with "
                f"columns {list(self.label_names)}; got shape {labels.shape}"
            )
        bad = np.flatnonzero(~np.all(np.isfinite(np.atleast_2d(labels)), axis=1))
        if bad.size:
            raise ValueError(
                f"labels must be finite ({list(self.label_names)}); non-finite values in "
                f"row(s) {bad[:10].tolist()}"
            )
        return labels

    def scale(self, labels: np.ndarray) -> np.ndarray:
        """Scaled labels ``(labels - x_min) / (x_max - x_min) - 0.5``, same shape."""
        return (self._check_labels(labels) - self.x_min) / (self.x_max - self.x_min) - 0.5

    def in_range(self, labels: np.ndarray) -> np.ndarray:
        """(n,) bool (or a bool for one label vector): every label inside [x_min, x_max]."""
        labels = self._check_labels(labels)
        return np.all((labels >= self.x_min) & (labels <= self.x_max), axis=-1)

    def _forward(self, s: np.ndarray) -> np.ndarray:
        """(m, n_labels) scaled labels -> (m, n_pix) flux."""
        raise NotImplementedError

    def _row_bytes(self) -> int:
        """Bytes of the largest intermediate per label vector."""
        raise NotImplementedError

    def __call__(self, labels: np.ndarray) -> np.ndarray:
        """Flux on ``self.grid``: (n, n_labels) -> (n, n_pix) or (n_labels,) -> (n_pix,)."""
        s = self.scale(labels)
        one = s.ndim == 1
        s = np.atleast_2d(s)
        out = np.empty((s.shape[0], self.n_pix))
        step = max(1, _CHUNK_BYTES // self._row_bytes())
        for a in range(0, s.shape[0], step):
            out[a : a + step] = self._forward(s[a : a + step])
        return out[0] if one else out

    def on_grid(self, flux: np.ndarray, grid: Grid) -> np.ndarray:
        """Map flux (..., n_pix) from ``self.grid`` onto ``grid``; see :func:`to_model_grid`."""
        return to_model_grid(flux, grid, src=self.grid)

    @classmethod
    def from_npz(
        cls,
        path: str | Path,
        *,
        label_names: tuple[str, ...] | list[str] | None = None,
        grid: Grid | np.ndarray | None = None,
    ) -> Self:
        """Load a network from a Payne ``.npz``; errors name the file and the bad key."""
        path = Path(path)
        with np.load(path, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise ValueError(f"{path}: not an .npz archive of {cls.kind} network arrays")
            missing = [k for k in cls.required_keys if k not in npz.files]
            if missing:
                raise ValueError(
                    f"{path}: missing key(s) {missing} for a {cls.kind} network "
                    f"(file has {sorted(npz.files)})"
                )
            keys = [k for k in cls.required_keys + cls.optional_keys if k in npz.files]
            try:
                arrays = {k: npz[k] for k in keys}
            except ValueError as err:  # e.g. an object array (we never unpickle)
                raise ValueError(f"{path}: {err}") from None
        stored_names = arrays.pop("label_names", None)
        if label_names is None and stored_names is not None:
            label_names = [str(n) for n in np.atleast_1d(stored_names)]
        try:
            return cls(**arrays, label_names=label_names, grid=grid)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


class PayneEmulator2018(_Payne):
    """The Payne's 2018 per-pixel networks (one sigmoid hidden layer per pixel).

    Args:
        w_array_0: (n_pix, n_hidden, n_labels) first-layer weights.
        b_array_0: (n_pix, n_hidden) first-layer biases.
        w_array_1: (n_pix, n_hidden) output weights.
        b_array_1: (n_pix,) output biases.
        x_min, x_max: (n_labels,) label scaling; default the documented 2018 ranges
            (only for 5 labels).
        label_names: default :data:`LABELS_2018` for 5 labels.
        grid: output grid (a Grid or pixel-centre wavelengths); default ASPCAP (7214).
    """

    kind = "2018 per-pixel"
    required_keys = ("w_array_0", "b_array_0", "w_array_1", "b_array_1")

    def __init__(
        self,
        w_array_0: np.ndarray,
        b_array_0: np.ndarray,
        w_array_1: np.ndarray,
        b_array_1: np.ndarray,
        x_min: np.ndarray | None = None,
        x_max: np.ndarray | None = None,
        label_names: tuple[str, ...] | list[str] | None = None,
        grid: Grid | np.ndarray | None = None,
    ) -> None:
        w0, b0, w1, b1 = (
            np.asarray(a, dtype=np.float64) for a in (w_array_0, b_array_0, w_array_1, b_array_1)
        )
        if w0.ndim != 3:
            raise _shape_error("w_array_0", w0, ("n_pix", "n_hidden", "n_labels"))
        n_pix, n_hidden, n_labels = w0.shape
        for name, arr, shape in (
            ("b_array_0", b0, (n_pix, n_hidden)),
            ("w_array_1", w1, (n_pix, n_hidden)),
            ("b_array_1", b1, (n_pix,)),
        ):
            if arr.shape != shape:
                raise _shape_error(name, arr, shape)
        if n_labels == len(LABELS_2018):
            x_min = X_MIN_2018 if x_min is None else x_min
            x_max = X_MAX_2018 if x_max is None else x_max
            label_names = LABELS_2018 if label_names is None else label_names
        if x_min is None or x_max is None:
            raise ValueError(f"x_min and x_max are required for {n_labels} labels")
        arrays = {"w_array_0": w0, "b_array_0": b0, "w_array_1": w1, "b_array_1": b1}
        self._init_common(arrays, n_labels, n_pix, x_min, x_max, label_names, grid)
        self.w_array_0, self.b_array_0, self.w_array_1, self.b_array_1 = w0, b0, w1, b1

    def _row_bytes(self) -> int:
        return 8 * self.b_array_0.size

    def _forward(self, s: np.ndarray) -> np.ndarray:
        n_pix, n_hidden, n_labels = self.w_array_0.shape
        inner = s @ self.w_array_0.reshape(-1, n_labels).T  # (m, n_pix * n_hidden)
        hidden = sigmoid(inner.reshape(-1, n_pix, n_hidden) + self.b_array_0)
        return np.einsum("mij,ij->mi", hidden, self.w_array_1) + self.b_array_1


class PayneMLP(_Payne):
    """The Payne 2019+ MLP: two leaky-ReLU hidden layers shared by all pixels.

    Args:
        w_array_0: (n_hidden_0, n_labels); b_array_0: (n_hidden_0,).
        w_array_1: (n_hidden_1, n_hidden_0); b_array_1: (n_hidden_1,).
        w_array_2: (n_pix, n_hidden_1); b_array_2: (n_pix,).
        x_min, x_max: (n_labels,) label scaling (required).
        label_names: optional names of the labels (default ``label_0``, ...).
        grid: output grid (a Grid or pixel-centre wavelengths); default ASPCAP (7214).
    """

    kind = "2019 MLP"
    required_keys = (
        *("w_array_0", "b_array_0", "w_array_1", "b_array_1", "w_array_2", "b_array_2"),
        *("x_min", "x_max"),
    )

    def __init__(
        self,
        w_array_0: np.ndarray,
        b_array_0: np.ndarray,
        w_array_1: np.ndarray,
        b_array_1: np.ndarray,
        w_array_2: np.ndarray,
        b_array_2: np.ndarray,
        x_min: np.ndarray,
        x_max: np.ndarray,
        label_names: tuple[str, ...] | list[str] | None = None,
        grid: Grid | np.ndarray | None = None,
    ) -> None:
        names = ("w_array_0", "b_array_0", "w_array_1", "b_array_1", "w_array_2", "b_array_2")
        given = (w_array_0, b_array_0, w_array_1, b_array_1, w_array_2, b_array_2)
        arrays = {k: np.asarray(a, dtype=np.float64) for k, a in zip(names, given, strict=True)}
        n_in = int(np.asarray(x_min).size)
        for layer in range(3):
            w, b = arrays[f"w_array_{layer}"], arrays[f"b_array_{layer}"]
            if w.ndim != 2 or w.shape[1] != n_in:
                raise _shape_error(f"w_array_{layer}", w, ("n_out", n_in))
            if b.shape != (w.shape[0],):
                raise _shape_error(f"b_array_{layer}", b, (w.shape[0],))
            n_in = w.shape[0]
        self._init_common(
            arrays, arrays["w_array_0"].shape[1], n_in, x_min, x_max, label_names, grid
        )
        self.weights = [arrays[f"w_array_{k}"] for k in range(3)]
        self.biases = [arrays[f"b_array_{k}"] for k in range(3)]

    def _row_bytes(self) -> int:
        return 8 * max(b.size for b in self.biases)

    def _forward(self, s: np.ndarray) -> np.ndarray:
        h = s
        for k, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = h @ w.T + b
            if k < 2:
                h = leaky_relu(h)
        return h


def load_emulator(path: str | Path, **kwargs) -> PayneEmulator2018 | PayneMLP:
    """Load a Payne ``.npz``: :class:`PayneMLP` if it has ``w_array_2``, else the 2018 format.

    Keyword arguments (``label_names``, ``grid``) go to ``from_npz``.
    """
    with np.load(path, allow_pickle=False) as npz:
        keys = set(getattr(npz, "files", ()))
    if "w_array_3" in keys:
        raise ValueError(f"{path}: has w_array_3; only 2-hidden-layer Payne MLPs are supported")
    cls = PayneMLP if "w_array_2" in keys else PayneEmulator2018
    return cls.from_npz(path, **kwargs)


def _subset_index(src: Grid, dst: Grid) -> np.ndarray | None:
    """Indices of ``dst``'s pixels in ``src`` when every one is a pixel of ``src``, else None."""
    if src.apstar_index is None or dst.apstar_index is None:
        return None
    pos = np.searchsorted(src.apstar_index, dst.apstar_index).clip(0, src.n_pix - 1)
    same = src.apstar_index[pos] == dst.apstar_index
    if not (np.all(same) and np.allclose(src.log_lo[pos], dst.log_lo, rtol=0, atol=1e-12)):
        return None
    return pos


def _map_to_grid(flux: np.ndarray, src: Grid, dst: Grid) -> tuple[np.ndarray, np.ndarray]:
    """(flux on ``dst``, covered): ``covered`` is False where ``src`` does not reach."""
    flux = np.asarray(flux, dtype=np.float64)
    if flux.shape[-1:] != (src.n_pix,):
        raise ValueError(
            f"flux has shape {flux.shape}; expected (..., {src.n_pix}) on grid {src.name!r}"
        )
    index = np.arange(src.n_pix) if dst == src else _subset_index(src, dst)
    if index is not None:
        return flux[..., index], np.ones((*flux.shape[:-1], dst.n_pix), dtype=bool)
    out, ivar = resample(flux, np.ones_like(flux), src, dst)
    return out, ivar > 0


def to_model_grid(flux: np.ndarray, grid: Grid, src: Grid | None = None) -> np.ndarray:
    """Map emulator flux (..., src.n_pix) onto ``grid`` -> (..., grid.n_pix).

    A grid whose pixels are all pixels of ``src`` (default ASPCAP), e.g. ``paper_grid()``, is
    an exact pick by apStar index; any other grid is resampled (flux-conserving, see
    :func:`~mendis_ray.spectra.grid.resample`), and its pixels that ``src`` does not cover
    get the continuum value 1.0.
    """
    return _map_to_grid(flux, aspcap_grid() if src is None else src, grid)[0]


def emulate_dataset(
    emulator: PayneEmulator2018 | PayneMLP,
    labels: np.ndarray,
    grid: Grid | None,
    snr: float | np.ndarray,
    rng: np.random.Generator | int | None = None,
    chunk: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """A noisy training set: labels (n, n_labels) -> (flux, ivar), each (n, grid.n_pix) float32.

    The emulator flux is mapped onto ``grid`` (default: the emulator's grid) and Gaussian noise
    of sigma ``1 / snr`` is added (flat noise, as for continuum-normalized flux), so
    ``ivar = snr**2``; pixels of ``grid`` outside the emulator's coverage get flux 1.0 and
    ivar 0.  ``snr`` is a scalar or (n,) per spectrum; ``rng`` a Generator or a seed.
    """
    labels = np.atleast_2d(np.asarray(labels, dtype=np.float64))
    grid = emulator.grid if grid is None else grid
    n = labels.shape[0]
    snr = np.asarray(snr, dtype=np.float64)
    if snr.shape not in ((), (n,)):
        raise ValueError(f"snr has shape {snr.shape}, expected () or ({n},)")
    snr = np.broadcast_to(snr, (n,))
    if not np.all(np.isfinite(snr) & (snr > 0)):
        raise ValueError("snr must be finite and > 0 (a scalar or one value per spectrum)")
    rng = np.random.default_rng(rng)
    flux = np.empty((n, grid.n_pix), dtype=np.float32)
    ivar = np.empty((n, grid.n_pix), dtype=np.float32)
    for a in range(0, n, chunk):
        f, good = _map_to_grid(emulator(labels[a : a + chunk]), emulator.grid, grid)
        s = snr[a : a + chunk, None]
        noise = rng.standard_normal(f.shape) / s
        flux[a : a + chunk] = np.where(good, f + noise, 1.0)
        ivar[a : a + chunk] = np.where(good, s**2, 0.0)
    return flux, ivar
