"""APOGEE wavelength grids and flux-conserving resampling.

Three grids matter (all vacuum wavelengths, Angstrom):

* ``APSTAR``  -- the apStar log-lambda grid, pixel ``i`` at ``10**(4.179 + 6e-6 i)``,
  8575 pixels (15100.8-16999.8 A).
* ``ASPCAP``  -- the DR12 ASPCAP grid: apStar pixels ``[322:3242] + [3648:6048] +
  [6412:8306]`` (7214 pixels, the three detector chips with the gaps removed).
* ``PAPER``   -- the Mendis paper's grid, every third ASPCAP pixel (2405 pixels).

Every grid here carries explicit pixel edges in log10(wavelength).  A model-grid pixel is
*one apStar pixel wide* (the paper sub-samples, it does not bin), so resampling an apStar
spectrum onto ``PAPER`` picks every third pixel exactly, and resampling from any other
grid (an apVisit, a different log-lambda start) integrates the input over that pixel.

Resampling is a sparse linear operator ``W`` (n_out, n_in): ``flux_out = W @ flux_in``
with rows that average the input over the output pixel (flux density is conserved), and
``var_out = W**2 @ var_in`` (independent input pixels).  Bad input pixels (``ivar == 0``)
are left out and the row renormalised over the good coverage; an output pixel with less
than ``min_coverage`` good coverage gets ``ivar = 0`` and the placeholder flux ``fill``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import scipy.sparse as sp

__all__ = [
    "APSTAR_CDELT1",
    "APSTAR_CRVAL1",
    "APSTAR_NPIX",
    "ASPCAP_CHIPS",
    "GRID_NAMES",
    "Grid",
    "apstar_grid",
    "apstar_subset",
    "aspcap_grid",
    "chip_of_index",
    "get_grid",
    "grid_from_wavelength",
    "grid_text",
    "log_lambda_grid",
    "paper_grid",
    "resample",
    "resampling_matrix",
    "same_grid",
    "wavelength_hash",
]

APSTAR_CRVAL1 = 4.179
APSTAR_CDELT1 = 6e-6
APSTAR_NPIX = 8575
#: apStar pixel ranges kept by ASPCAP (blue, green, red chip), half-open.
ASPCAP_CHIPS: tuple[tuple[int, int], ...] = ((322, 3242), (3648, 6048), (6412, 8306))
C_KMS = 299_792.458


@dataclass(frozen=True, eq=False)
class Grid:
    """A wavelength grid with explicit pixel edges.

    Attributes:
        name: short name stored in shard metadata and checkpoints.
        log_lo, log_hi: (n_pix,) log10 of each pixel's lower and upper edge (Angstrom).
        apstar_index: (n_pix,) apStar pixel index of each pixel, or ``None`` when the grid
            is not a subset of the apStar grid.
        chip: (n_pix,) detector chip (0, 1, 2) of each pixel, or ``None``.
    """

    name: str
    log_lo: np.ndarray
    log_hi: np.ndarray
    apstar_index: np.ndarray | None = None
    chip: np.ndarray | None = None
    _hash: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        lo = np.asarray(self.log_lo, dtype=np.float64)
        hi = np.asarray(self.log_hi, dtype=np.float64)
        if lo.ndim != 1 or lo.shape != hi.shape or lo.size == 0:
            raise ValueError(f"grid {self.name!r}: edges must be equal-length 1-d arrays")
        if not (np.all(hi > lo) and np.all(np.diff(lo) > 0)):
            raise ValueError(f"grid {self.name!r}: pixels must be increasing and non-empty")
        for arr in (lo, hi):
            arr.setflags(write=False)
        object.__setattr__(self, "log_lo", lo)
        object.__setattr__(self, "log_hi", hi)
        object.__setattr__(self, "_hash", wavelength_hash(self.wavelength))

    @property
    def n_pix(self) -> int:
        return int(self.log_lo.size)

    @property
    def wavelength(self) -> np.ndarray:
        """(n_pix,) pixel centres in vacuum Angstrom (geometric centre of the edges)."""
        return 10 ** (0.5 * (self.log_lo + self.log_hi))

    @property
    def hash(self) -> str:
        """16 hex digits identifying the pixel centres (rounded to 1e-6 A)."""
        return self._hash

    def __len__(self) -> int:
        return self.n_pix

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Grid) and other.n_pix == self.n_pix and other.hash == self.hash

    def __hash__(self) -> int:
        return hash(self._hash)

    def describe(self) -> dict:
        """Metadata stored with shards and checkpoints."""
        wl = self.wavelength
        return {
            "name": self.name,
            "n_pix": self.n_pix,
            "hash": self.hash,
            "wavelength_min": float(wl[0]),
            "wavelength_max": float(wl[-1]),
        }


def wavelength_hash(wavelength: np.ndarray) -> str:
    """16 hex digits identifying pixel centres ``wavelength`` (n_pix,) (rounded to 1e-6 A):
    a grid's :attr:`Grid.hash`."""
    rounded = np.round(np.asarray(wavelength, dtype=np.float64), 6)
    return hashlib.sha256(rounded.tobytes()).hexdigest()[:16]


def _describe(grid: Grid | Mapping) -> Mapping:
    return grid.describe() if isinstance(grid, Grid) else grid


def same_grid(a: Grid | Mapping, b: Grid | Mapping) -> bool:
    """Whether two grids (:class:`Grid` or ``describe()`` dicts) are the same: equal pixel
    hash and size.  The one test of grid compatibility (shards, checkpoints, requests)."""
    a, b = _describe(a), _describe(b)
    return a.get("hash") == b.get("hash") and a.get("n_pix") == b.get("n_pix")


def grid_text(grid: Grid | Mapping) -> str:
    """``"'paper' (2405 px, hash 1a2b...)"``: a grid as error messages name it."""
    g = _describe(grid)
    return f"{g.get('name')!r} ({g.get('n_pix')} px, hash {g.get('hash')})"


def chip_of_index(index: np.ndarray, chips: Sequence[tuple[int, int]] = ASPCAP_CHIPS) -> np.ndarray:
    """(n,) int8 detector chip of apStar pixel indices (n,): the position in ``chips``
    (half-open apStar pixel ranges, blue to red) of the range holding each; -1 outside."""
    index = np.asarray(index)
    chip = np.full(index.shape, -1, dtype=np.int8)
    for c, (a, b) in enumerate(chips):
        chip[(index >= a) & (index < b)] = c
    return chip


def apstar_subset(
    name: str, index: np.ndarray, chips: Sequence[tuple[int, int]] = ASPCAP_CHIPS
) -> Grid:
    """A grid of whole apStar pixels ``index`` (n,), their chips numbered by ``chips``."""
    index = np.asarray(index, dtype=np.int64)
    centre = APSTAR_CRVAL1 + APSTAR_CDELT1 * index
    return Grid(
        name=name,
        log_lo=centre - APSTAR_CDELT1 / 2,
        log_hi=centre + APSTAR_CDELT1 / 2,
        apstar_index=index,
        chip=chip_of_index(index, chips),
    )


@cache
def apstar_grid() -> Grid:
    """The 8575-pixel apStar log-lambda grid."""
    return apstar_subset("apstar", np.arange(APSTAR_NPIX))


@cache
def aspcap_grid() -> Grid:
    """The 7214-pixel DR12 ASPCAP grid (chip gaps removed)."""
    return apstar_subset("aspcap", np.concatenate([np.arange(a, b) for a, b in ASPCAP_CHIPS]))


@cache
def paper_grid() -> Grid:
    """The Mendis paper's 2405-pixel grid: every third ASPCAP pixel."""
    return apstar_subset("paper", aspcap_grid().apstar_index[::3])


GRID_NAMES = {"apstar": apstar_grid, "aspcap": aspcap_grid, "paper": paper_grid}


def get_grid(name: str) -> Grid:
    """A named grid: ``'apstar'``, ``'aspcap'`` or ``'paper'``."""
    try:
        return GRID_NAMES[name]()
    except KeyError:
        raise ValueError(f"unknown grid {name!r}; expected one of {sorted(GRID_NAMES)}") from None


def log_lambda_grid(crval1: float, cdelt1: float, n_pix: int, name: str = "log-lambda") -> Grid:
    """A grid uniform in log10(wavelength), pixel ``i`` centred on ``crval1 + cdelt1 * i``
    (the FITS header convention of apStar / aspcapStar files)."""
    centre = crval1 + cdelt1 * np.arange(n_pix)
    return Grid(name=name, log_lo=centre - cdelt1 / 2, log_hi=centre + cdelt1 / 2)


def grid_from_wavelength(wavelength: np.ndarray, name: str = "custom") -> Grid:
    """A grid from increasing pixel centres; edges are the log-midpoints between centres."""
    lw = np.log10(np.asarray(wavelength, dtype=np.float64))
    if lw.ndim != 1 or lw.size < 2 or not np.all(np.diff(lw) > 0):
        raise ValueError(f"grid {name!r}: wavelengths must be a strictly increasing 1-d array")
    mid = 0.5 * (lw[1:] + lw[:-1])
    lo = np.concatenate([[lw[0] - (mid[0] - lw[0])], mid])
    hi = np.concatenate([mid, [lw[-1] + (lw[-1] - mid[-1])]])
    return Grid(name=name, log_lo=lo, log_hi=hi)


def resampling_matrix(src: Grid, dst: Grid) -> sp.csr_matrix:
    """Overlap matrix ``O`` (dst.n_pix, src.n_pix): ``O[j, i]`` is the fraction of output
    pixel ``j`` (in log-lambda) covered by input pixel ``i``.  Rows sum to the covered
    fraction (1 where the input fully covers the output pixel)."""
    width = dst.log_hi - dst.log_lo
    # Candidate input pixels for each output pixel: those whose edges can overlap.
    first = np.searchsorted(src.log_hi, dst.log_lo, side="right")
    last = np.searchsorted(src.log_lo, dst.log_hi, side="left")  # exclusive
    counts = np.maximum(last - first, 0)
    rows = np.repeat(np.arange(dst.n_pix), counts)
    cols = (
        np.concatenate([np.arange(a, b) for a, b in zip(first, last, strict=True)])
        if rows.size
        else rows
    )
    overlap = np.minimum(dst.log_hi[rows], src.log_hi[cols]) - np.maximum(
        dst.log_lo[rows], src.log_lo[cols]
    )
    frac = np.clip(overlap / width[rows], 0.0, None)
    keep = frac > 1e-9
    frac = np.where(frac > 1 - 1e-9, 1.0, frac)  # exact picks stay exact
    return sp.csr_matrix(
        (frac[keep], (rows[keep], cols[keep])), shape=(dst.n_pix, src.n_pix), dtype=np.float64
    )


def resample(
    flux: np.ndarray,
    ivar: np.ndarray,
    src: Grid,
    dst: Grid,
    *,
    min_coverage: float = 0.5,
    fill: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Flux-conserving resampling of spectra from ``src`` onto ``dst``.

    Args:
        flux: (n_src,) or (n_spec, n_src) flux density.
        ivar: same shape, inverse variance; 0 marks a bad pixel (its flux is ignored,
            NaN/inf allowed there).
        src, dst: input and output grids.
        min_coverage: an output pixel whose good input coverage is below this fraction of
            its width gets ``ivar = 0`` and ``flux = fill``.
        fill: placeholder flux for output pixels without data (carries no information).

    Returns:
        (flux, ivar) on ``dst``, float64, same leading shape as the input.
    """
    flux = np.asarray(flux, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    if flux.shape != ivar.shape or flux.shape[-1] != src.n_pix:
        raise ValueError(
            f"resample: flux {flux.shape} and ivar {ivar.shape} must both end in "
            f"{src.n_pix} pixels (grid {src.name!r})"
        )
    if np.any(ivar < 0) or np.any(~np.isfinite(ivar)):
        raise ValueError("resample: ivar must be finite and >= 0")
    one = flux.ndim == 1
    f2 = np.atleast_2d(flux)
    good = (np.atleast_2d(ivar) > 0) & np.isfinite(f2)
    f_clean = np.where(good, f2, 0.0)
    var = np.where(good, 1.0 / np.where(good, np.atleast_2d(ivar), 1.0), 0.0)
    o = resampling_matrix(src, dst)
    cover = (o @ good.T.astype(np.float64)).T  # (n_spec, n_dst)
    num = (o @ f_clean.T).T
    num_var = ((o.multiply(o)) @ var.T).T
    ok = cover >= min_coverage - 1e-6  # edges are floats: allow rounding
    safe = np.where(ok, cover, 1.0)
    out_flux = np.where(ok, num / safe, fill)
    out_var = np.where(ok, num_var / safe**2, np.inf)
    out_ivar = np.where(ok & (out_var > 0), 1.0 / np.where(out_var > 0, out_var, 1.0), 0.0)
    if one:
        return out_flux[0], out_ivar[0]
    return out_flux, out_ivar
