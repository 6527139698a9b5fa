"""A physically-motivated forward model of continuum-normalized APOGEE H-band spectra of
cool giants, the paper's training set, the outlier classes, and ground truth.

The forward model (per star, vectorised over a batch):

1. Line strengths ``tau0`` from the labels (:func:`mendis_ray.spectra.linelist.log_tau0`):
   abundances, excitation (Boltzmann), ionisation (Saha), molecular equilibrium,
   continuous opacity, and pressure-dependent damping.
2. Optical depth on a fine log-lambda grid (the apStar grid oversampled ``oversample``
   times): ``tau = sum_i tau0_i [G_i(v) + a_i L_i(v)]`` with pixel-averaged Gaussian cores
   (thermal + microturbulent Doppler width) and Lorentzian damping wings.  Two sparse
   matrix products.
3. Emergent flux ``F = 1 - D_max (1 - exp(-tau))``: saturation gives the flat and damping
   parts of the curve of growth (a line's depth stops growing with abundance while its
   wings keep growing); ``D_max`` mimics the non-zero source function at the surface.
4. Broadening by one kernel per star, the product of transfer functions: the instrument
   (Gaussian, R = 22,500), macroturbulence (Gaussian ``exp(-(v/vmacro)^2)``), rotation
   (Gray's limb-darkened profile, epsilon = 0.6) and the apStar pixel (box), sampled at
   the model grid's pixels.  The grid is uniform in log-lambda, so one kernel in velocity
   serves every pixel.

Ground truth for scoring later analyses: :func:`element_response` (d flux / d[X/H] per
pixel, by central differences of the noise-free model) and :func:`dominant_element`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.sparse as sp
from scipy.special import j1

from mendis_ray.spectra.grid import (
    APSTAR_CDELT1,
    APSTAR_CRVAL1,
    C_KMS,
    Grid,
    paper_grid,
)
from mendis_ray.spectra.linelist import ELEMENTS, LineList, default_linelist, log_tau0

__all__ = [
    "ELEMENTS",
    "OUTLIER_CLASSES",
    "Simulator",
    "SimulatorConfig",
    "StellarLabels",
    "cemp_labels",
    "dominant_element",
    "element_response",
    "paper_training_labels",
    "rapid_rotator_labels",
    "stripped_star_labels",
]

log = logging.getLogger(__name__)
_FE = ELEMENTS.index("Fe")
_K_B = 1.380649e-23
_AMU = 1.66053907e-27


@dataclass(frozen=True)
class StellarLabels:
    """Physical labels of n stars.

    Attributes:
        teff: (n,) K.   logg: (n,) cgs.
        x_h: (n, 19) [X/H] in :data:`ELEMENTS` order.
        vmacro: (n,) km/s, macroturbulence 1/e half-width.
        vsini: (n,) km/s, projected rotation.
    """

    teff: np.ndarray
    logg: np.ndarray
    x_h: np.ndarray
    vmacro: np.ndarray
    vsini: np.ndarray

    def __post_init__(self) -> None:
        n = np.asarray(self.teff).shape[0]
        for name in ("teff", "logg", "vmacro", "vsini"):
            v = np.asarray(getattr(self, name), dtype=np.float64).reshape(-1)
            if v.shape != (n,):
                raise ValueError(f"StellarLabels.{name}: {v.shape[0]} values, expected {n}")
            if not np.all(np.isfinite(v)):
                raise ValueError(f"StellarLabels.{name}: non-finite values")
            object.__setattr__(self, name, v)
        x = np.asarray(self.x_h, dtype=np.float64)
        if x.shape != (n, len(ELEMENTS)) or not np.all(np.isfinite(x)):
            raise ValueError(
                f"StellarLabels.x_h: expected finite ({n}, {len(ELEMENTS)}), got {x.shape}"
            )
        object.__setattr__(self, "x_h", x)
        if np.any(self.teff <= 0) or np.any(self.vmacro < 0) or np.any(self.vsini < 0):
            raise ValueError("StellarLabels: teff must be > 0 and vmacro, vsini >= 0")

    def __len__(self) -> int:
        return int(self.teff.shape[0])

    @property
    def feh(self) -> np.ndarray:
        return self.x_h[:, _FE]

    def __getitem__(self, idx: slice | np.ndarray) -> StellarLabels:
        return StellarLabels(
            self.teff[idx], self.logg[idx], self.x_h[idx], self.vmacro[idx], self.vsini[idx]
        )

    @classmethod
    def solar_giant(
        cls, n: int = 1, teff: float = 4400.0, logg: float = 2.05, vmacro: float = 6.0
    ) -> StellarLabels:
        """n copies of a solar-composition giant."""
        return cls(
            np.full(n, teff),
            np.full(n, logg),
            np.zeros((n, len(ELEMENTS))),
            np.full(n, vmacro),
            np.zeros(n),
        )

    @classmethod
    def concat(cls, parts: list[StellarLabels]) -> StellarLabels:
        return cls(
            *(
                np.concatenate([getattr(p, f) for p in parts])
                for f in ("teff", "logg", "x_h", "vmacro", "vsini")
            )
        )

    def truth_columns(self) -> dict[str, np.ndarray]:
        """``truth_*`` shard columns."""
        cols = {
            "truth_teff": self.teff,
            "truth_logg": self.logg,
            "truth_vmacro": self.vmacro,
            "truth_vsini": self.vsini,
        }
        for i, el in enumerate(ELEMENTS):
            cols[f"truth_{el.lower()}_h"] = self.x_h[:, i]
        return cols


@dataclass(frozen=True)
class SimulatorConfig:
    """Settings of the forward model (fixed per simulator instance)."""

    resolution: float = 22_500.0  # instrument R = lambda / FWHM
    microturbulence: float = 1.5  # km/s, enters the intrinsic Doppler width
    reference_teff: float = 4400.0  # K, temperature of the thermal Doppler width
    oversample: int = 3  # fine-grid points per apStar pixel (odd: pixel centres on it)
    max_depth: float = 0.8  # D_max
    limb_darkening: float = 0.6  # epsilon of the rotation profile
    metal_wing_kms: float = 150.0  # extent of metal-line damping wings
    hydrogen_wing_kms: float = 600.0  # extent of hydrogen Stark wings
    linelist_seed: int = 20240521
    batch_size: int = 256


@dataclass
class Simulator:
    """Noise-free continuum-normalized spectra on ``grid`` (any subset of apStar pixels).

    Example:
        >>> sim = Simulator()                     # paper grid, 2405 px
        >>> flux = sim(StellarLabels.solar_giant(3))  # (3, 2405) float32
    """

    grid: Grid = field(default_factory=paper_grid)
    config: SimulatorConfig = field(default_factory=SimulatorConfig)
    lines: LineList | None = None

    def __post_init__(self) -> None:
        cfg = self.config
        if self.grid.apstar_index is None:
            raise ValueError(f"Simulator: grid {self.grid.name!r} is not a subset of apStar pixels")
        if cfg.oversample < 1 or cfg.oversample % 2 == 0:
            raise ValueError("SimulatorConfig.oversample must be a positive odd integer")
        if self.lines is None:
            self.lines = default_linelist(cfg.linelist_seed)
        os_ = cfg.oversample
        self.dv = C_KMS * np.log(10) * APSTAR_CDELT1 / os_  # fine step, km/s
        margin = int(np.ceil(cfg.hydrogen_wing_kms / (self.dv * os_))) + 2  # apStar pixels
        k0 = int(self.grid.apstar_index.min()) - margin
        k1 = int(self.grid.apstar_index.max()) + margin
        self._fine_log = APSTAR_CRVAL1 + APSTAR_CDELT1 * (k0 + np.arange((k1 - k0) * os_ + 1) / os_)
        self._centres = (self.grid.apstar_index - k0) * os_  # fine index of each pixel
        lines = self.lines
        inside = (np.log10(lines.wavelength) > self._fine_log[0]) & (
            np.log10(lines.wavelength) < self._fine_log[-1]
        )
        self.lines = lines = lines.select(inside)
        self._phi_g, self._phi_l, self._damped = self._profiles(lines)
        self._kernel_cache: dict[tuple[float, float], np.ndarray] = {}

    # -- construction ------------------------------------------------------------------

    def _profiles(self, lines: LineList) -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray]:
        """Pixel-averaged, peak-normalised Gaussian cores (n_fine, n_lines) and Lorentz
        wings (n_fine, n_damped) on the fine grid."""
        from scipy.special import erf

        cfg = self.config
        n_fine = self._fine_log.size
        dv = self.dv
        b = np.sqrt(
            2 * _K_B * cfg.reference_teff / (lines.mass * _AMU) / 1e6 + cfg.microturbulence**2
        )
        pos = (
            (np.log10(lines.wavelength) - self._fine_log[0]) * C_KMS * np.log(10) / dv
        )  # fine units
        # Gaussian cores
        w = int(np.ceil(5 * b.max() / dv)) + 1
        offs = np.arange(-w, w + 1)
        idx = np.round(pos).astype(np.int64)[:, None] + offs[None, :]  # (n_lines, 2w+1)
        lo = (idx - 0.5 - pos[:, None]) * dv
        hi = (idx + 0.5 - pos[:, None]) * dv
        val = (np.sqrt(np.pi) / 2 * b[:, None] * (erf(hi / b[:, None]) - erf(lo / b[:, None]))) / dv
        phi_g = self._sparse(idx, val, n_fine)
        # Lorentz damping wings (peak-normalised, HWHM gamma)
        damped = np.flatnonzero(lines.damping > 0)
        hyd = lines.species[damped] == 4
        gamma = np.where(hyd, 10.0, 2.0)
        ext = np.where(hyd, cfg.hydrogen_wing_kms, cfg.metal_wing_kms)
        wl_max = int(np.ceil(ext.max() / dv))
        offs = np.arange(-wl_max, wl_max + 1)
        p = pos[damped]
        idx = np.round(p).astype(np.int64)[:, None] + offs[None, :]
        lo = (idx - 0.5 - p[:, None]) * dv
        hi = (idx + 0.5 - p[:, None]) * dv
        g = gamma[:, None]
        val = g * (np.arctan(hi / g) - np.arctan(lo / g)) / dv
        val = np.where(np.abs(offs)[None, :] * dv <= ext[:, None], val, 0.0)
        phi_l = self._sparse(idx, val, n_fine)
        return phi_g, phi_l, damped

    @staticmethod
    def _sparse(idx: np.ndarray, val: np.ndarray, n_fine: int) -> sp.csr_matrix:
        rows = idx.ravel()
        cols = np.repeat(np.arange(idx.shape[0]), idx.shape[1])
        v = val.ravel()
        ok = (rows >= 0) & (rows < n_fine) & (v > 1e-7)
        return sp.csr_matrix(
            (v[ok].astype(np.float32), (rows[ok], cols[ok])), shape=(n_fine, idx.shape[0])
        )

    def kernel(self, vmacro: float, vsini: float) -> np.ndarray:
        """Broadening kernel (odd length, sums to 1) on the fine grid: instrument x
        macroturbulence x rotation x apStar pixel box, from their transfer functions."""
        key = (round(float(vmacro), 4), round(float(vsini), 4))
        if key in self._kernel_cache:
            return self._kernel_cache[key]
        cfg = self.config
        sigma = np.hypot(C_KMS / cfg.resolution / (2 * np.sqrt(2 * np.log(2))), vmacro / np.sqrt(2))
        pix = self.dv * cfg.oversample
        half = int(np.ceil((5 * sigma + vsini + pix) / self.dv))
        n = 1 << int(np.ceil(np.log2(16 * (2 * half + 1))))
        f = np.fft.rfftfreq(n, d=self.dv)  # cycles per km/s
        h = np.exp(-2 * (np.pi * sigma * f) ** 2) * np.sinc(f * pix)
        if vsini > 0:
            h = h * _rotation_transfer(2 * np.pi * f * vsini, cfg.limb_darkening)
        k = np.fft.irfft(h, n)
        k = np.concatenate([k[-half:], k[: half + 1]])
        k = (k / k.sum()).astype(np.float32)
        if len(self._kernel_cache) < 4096:
            self._kernel_cache[key] = k
        return k

    # -- forward model ------------------------------------------------------------------

    def __call__(
        self, labels: StellarLabels, dtype: type = np.float32, rv: np.ndarray | None = None
    ) -> np.ndarray:
        """Noise-free flux (n, n_pix) for ``labels``, Doppler-shifted by ``rv`` (n,) km/s
        (positive: redshift) when given."""
        out = np.empty((len(labels), self.grid.n_pix), dtype=dtype)
        bs = self.config.batch_size
        if rv is not None:
            rv = np.asarray(rv, dtype=np.float64).reshape(-1)
            if rv.shape != (len(labels),) or not np.all(np.isfinite(rv)):
                raise ValueError(f"Simulator: rv must be {len(labels)} finite values")
        for a in range(0, len(labels), bs):
            out[a : a + bs] = self._batch(
                labels[a : a + bs], None if rv is None else rv[a : a + bs]
            )
        return out

    def _shifted_rows(self, rv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fine-grid rows (n_pix, b) and linear-interpolation weights (b,) of each pixel
        centre seen at radial velocity ``rv`` (b,) km/s: flux observed at lambda is the
        rest-frame flux at lambda / (1 + v/c), i.e. ``v / dv`` fine pixels bluewards."""
        shift = -np.asarray(rv) / self.dv  # (b,) fine pixels
        base = np.floor(shift).astype(np.int64)
        return self._centres[:, None] + base[None, :], (shift - base).astype(np.float32)

    def _batch(self, lab: StellarLabels, rv: np.ndarray | None = None) -> np.ndarray:
        ltau, damp = log_tau0(self.lines, lab.teff, lab.logg, lab.x_h)
        tau0 = np.power(10.0, np.minimum(ltau, 8.0)).astype(np.float32)  # (b, n_lines)
        tau = self._phi_g @ tau0.T  # (n_fine, b)
        if self._damped.size:
            tau += (
                self._phi_l @ (tau0[:, self._damped] * damp[:, self._damped].astype(np.float32)).T
            )
        d = np.float32(self.config.max_depth)
        depth = d * (1 - np.exp(-tau))  # (n_fine, b), 1 - flux
        kernels = [self.kernel(vm, vs) for vm, vs in zip(lab.vmacro, lab.vsini, strict=True)]
        half = max(k.size for k in kernels) // 2
        kmat = np.zeros((2 * half + 1, len(lab)), dtype=np.float32)
        for j, k in enumerate(kernels):
            h = k.size // 2
            kmat[half - h : half + h + 1, j] = k
        conv = np.zeros((self.grid.n_pix, len(lab)), dtype=np.float32)
        if rv is None:
            for t in range(2 * half + 1):
                if np.any(kmat[t]):
                    conv += depth[self._centres + (t - half)] * kmat[t]
            return 1.0 - conv.T
        rows, frac = self._shifted_rows(rv)  # (n_pix, b), (b,)
        cols = np.arange(len(lab))[None, :]
        for t in range(2 * half + 1):
            if np.any(kmat[t]):
                r = rows + (t - half)
                conv += (depth[r, cols] * (1 - frac) + depth[r + 1, cols] * frac) * kmat[t]
        return 1.0 - conv.T


def _rotation_transfer(omega: np.ndarray, eps: float) -> np.ndarray:
    """Fourier transform of Gray's rotation profile, normalised to 1 at omega = 0."""
    small = np.abs(omega) < 1e-3
    w = np.where(small, 1.0, omega)
    t1 = 2 * j1(w) / w
    t2 = 3 * (np.sin(w) - w * np.cos(w)) / w**3
    g = (1 - eps) * t1 + (2 * eps / 3) * t2
    g = g / (1 - eps / 3)
    return np.where(small, 1.0, g)


# --- Label samplers: the paper's training set and the outlier classes -----------------


def paper_training_labels(
    n: int,
    rng: np.random.Generator,
    teff: tuple[float, float] = (4300.0, 4500.0),
    logg: tuple[float, float] = (1.9, 2.2),
    x_h: tuple[float, float] = (-0.1, 0.05),
    n_h: tuple[float, float] = (0.0, 0.15),
    vmacro: float = 6.0,
) -> StellarLabels:
    """The paper's training distribution: every label independent and uniform."""
    ab = rng.uniform(*x_h, size=(n, len(ELEMENTS)))
    ab[:, ELEMENTS.index("N")] = rng.uniform(*n_h, size=n)
    return StellarLabels(
        rng.uniform(*teff, size=n), rng.uniform(*logg, size=n), ab, np.full(n, vmacro), np.zeros(n)
    )


_ALPHA = [ELEMENTS.index(e) for e in ("O", "Mg", "Si", "S", "Ca", "Ti")]


def cemp_labels(
    n: int,
    rng: np.random.Generator,
    feh: tuple[float, float] = (-2.0, -1.5),
    cfe: tuple[float, float] = (1.0, 2.0),
    alpha_fe: float = 0.3,
    **base: tuple[float, float],
) -> StellarLabels:
    """Carbon-enhanced metal-poor giants: [Fe/H] in ``feh``, [C/Fe] in ``cfe``, alpha
    elements (O Mg Si S Ca Ti) at +``alpha_fe``, other [X/Fe] = 0; Teff/logg as training."""
    lab = paper_training_labels(n, rng, **base)
    fe = rng.uniform(*feh, size=n)
    x = np.repeat(fe[:, None], len(ELEMENTS), axis=1)
    x[:, _ALPHA] += alpha_fe
    x[:, ELEMENTS.index("C")] = fe + rng.uniform(*cfe, size=n)
    return replace(lab, x_h=x)


def rapid_rotator_labels(
    n: int,
    rng: np.random.Generator,
    vbroad: tuple[float, float] = (20.0, 40.0),
    kind: str = "vmacro",
    **base: tuple[float, float],
) -> StellarLabels:
    """Training-like giants broadened by ``vbroad`` km/s, as macroturbulence (the
    paper's 'vmacro > 20 km/s') or as rotation (``kind='vsini'``)."""
    lab = paper_training_labels(n, rng, **base)
    v = rng.uniform(*vbroad, size=n)
    if kind == "vmacro":
        return replace(lab, vmacro=v)
    if kind == "vsini":
        return replace(lab, vsini=v)
    raise ValueError(f"rapid_rotator_labels: kind must be 'vmacro' or 'vsini', got {kind!r}")


def stripped_star_labels(
    n: int,
    rng: np.random.Generator,
    teff: tuple[float, float] = (4500.0, 7000.0),
    logg: tuple[float, float] = (4.5, 6.0),
) -> StellarLabels:
    """Hot, compact stripped stars: Teff and logg far outside the training range,
    abundances as in training."""
    return paper_training_labels(n, rng, teff=teff, logg=logg)


OUTLIER_CLASSES: dict[str, Callable[..., StellarLabels]] = {
    "cemp": cemp_labels,
    "rotator": rapid_rotator_labels,
    "stripped": stripped_star_labels,
}


# --- Ground truth --------------------------------------------------------------------


def element_response(sim: Simulator, labels: StellarLabels, step: float = 0.02) -> np.ndarray:
    """d flux / d[X/H] (per dex) at every pixel for each element, by central differences
    of the noise-free model at each star of ``labels``.

    Returns:
        (n_stars, 19, n_pix) float64.
    """
    n, n_el = len(labels), len(ELEMENTS)
    rows = []
    for s in (+1, -1):
        x = np.repeat(labels.x_h[:, None, :], n_el, axis=1)  # (n, 19, 19)
        x[:, np.arange(n_el), np.arange(n_el)] += s * step
        rows.append(
            StellarLabels(
                np.repeat(labels.teff, n_el),
                np.repeat(labels.logg, n_el),
                x.reshape(-1, n_el),
                np.repeat(labels.vmacro, n_el),
                np.repeat(labels.vsini, n_el),
            )
        )
    plus = sim(rows[0], dtype=np.float64).reshape(n, n_el, -1)
    minus = sim(rows[1], dtype=np.float64).reshape(n, n_el, -1)
    return (plus - minus) / (2 * step)


def dominant_element(response: np.ndarray, threshold: float = 0.01) -> np.ndarray:
    """Index (into ELEMENTS) of the element that moves each pixel most, -1 where no
    element moves it by more than ``threshold`` flux per dex.

    Args:
        response: (19, n_pix) from :func:`element_response` (one star).
    """
    mag = np.abs(response)
    best = mag.argmax(axis=0)
    return np.where(mag.max(axis=0) >= threshold, best, -1)


def iter_batches(labels: StellarLabels, size: int) -> Iterator[StellarLabels]:
    for a in range(0, len(labels), size):
        yield labels[a : a + size]


def conditional_training_labels(
    n: int,
    rng: np.random.Generator,
    observed: tuple[float, float, float] = (4300.0, 2.1, 0.0),
    scatter: tuple[float, float, float] = (25.0, 0.1, 0.01),
    teff: tuple[float, float] = (4300.0, 4500.0),
    logg: tuple[float, float] = (1.9, 2.2),
    x_h: tuple[float, float] = (-0.1, 0.05),
    n_h: tuple[float, float] = (0.0, 0.15),
    vmacro: float = 6.0,
) -> StellarLabels:
    """True labels of training-set stars whose *observed* (Teff, log g, [Fe/H]) equal
    ``observed``: the uniform training prior times the Gaussian label scatter, i.e.
    truncated normals, with every other abundance drawn from its prior.  Simulating these
    (plus noise) samples the true conditional p(spectrum | observed labels), the ground
    truth for the flow's conditional correlation matrix."""
    from scipy.stats import truncnorm

    def tn(mu: float, sd: float, lo: float, hi: float) -> np.ndarray:
        a, b = (lo - mu) / sd, (hi - mu) / sd
        return truncnorm.rvs(a, b, loc=mu, scale=sd, size=n, random_state=rng)

    lab = paper_training_labels(n, rng, teff=teff, logg=logg, x_h=x_h, n_h=n_h, vmacro=vmacro)
    x = lab.x_h.copy()
    x[:, _FE] = tn(observed[2], scatter[2], *x_h)
    return StellarLabels(
        tn(observed[0], scatter[0], *teff), tn(observed[1], scatter[1], *logg), x,
        lab.vmacro, lab.vsini,
    )  # fmt: skip
