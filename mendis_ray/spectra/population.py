"""A survey-like population of red giants and the outlier sets that every model is judged on.

The paper's training box (Teff 4300-4500 K, log g 1.9-2.2, independent uniform abundances,
one S/N) is nearly linear, so every model separates its outliers.  Survey catalogs are not
like that.  :class:`SurveyPopulation` draws stars the way APOGEE-like surveys see the disc
giants; the numbers below are the recipe (all fields of the dataclass, so a user can change
them).

Labels
    * Two disc components.  Low-alpha ("thin", weight 0.7): [Fe/H] ~ N(0.0, 0.2) cut to
      [-0.7, 0.4], [alpha/Fe] = 0.02 - 0.06 [Fe/H].  High-alpha ("thick", 0.3):
      [Fe/H] ~ N(-0.45, 0.22) cut to [-1.0, 0.1], [alpha/Fe] = 0.25 - 0.10 ([Fe/H] + 0.5).
      Each sequence has an intrinsic scatter of 0.025 dex; at [Fe/H] = -0.4 they are
      0.20 dex apart (as APOGEE's disc sequences, e.g. Hayden et al. 2015), so an almost
      empty valley separates them wherever both are populated.
    * The alpha elements O Mg Si S Ca Ti share the star's [alpha/Fe] (plus 0.02 dex each);
      the others scatter around their own means with their own spreads
      (:data:`ELEMENT_SPREAD`: C -0.05 +- 0.06, N +0.20 +- 0.08 after first dredge-up,
      others 0 +- 0.03..0.05).  [X/H] = [Fe/H] + [X/Fe].
    * The giant branch (weight 0.75): log g = 1.0 + 2.5 u^0.7 (u uniform: more stars low on
      the branch), Teff = 4680 + 330 (g - 2.5) - 60 (g - 2.5)^2 - 280 [Fe/H] + N(0, 50 K):
      curved, and metal-poor giants are hotter at fixed log g.  The red clump (0.25):
      log g ~ N(2.45, 0.06) cut to [2.3, 2.65], Teff = 4760 - 250 [Fe/H] + N(0, 50 K).
    * Macroturbulence from Teff and log g: vmacro = 4.5 + 1.2 (2.5 - log g) +
      0.0015 (Teff - 4700) km/s, cut to [2, 10] and rounded to 0.1 km/s (one broadening
      kernel per value).  No rotation.
Observations
    * S/N per star: 90% log-uniform in [50, 500], 10% log-uniform in [500, 1000].
    * Observed labels = true + Gaussian errors that grow as S/N falls:
      sigma_Teff = 20 + 30 (100 / S/N) K, sigma_logg = 0.04 + 0.06 (100 / S/N),
      sigma_[Fe/H] = 0.015 + 0.02 (100 / S/N)  (at S/N 50: 80 K, 0.16, 0.055).
    * Bad pixels: 30% of stars have one run of 5-40 masked pixels (ivar = 0), like bad
      detector columns or persistence.

The outlier sets (:data:`SURVEY_SETS`) are built so that every single observed label stays
inside the training ranges unless the set says otherwise; each stores its ground truth in
``truth_kind`` / ``truth_size`` and set-specific ``truth_*`` columns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from mendis_ray.spectra.grid import ASPCAP_CHIPS, C_KMS
from mendis_ray.spectra.simulate import ELEMENTS, Simulator, StellarLabels

__all__ = [
    "ELEMENT_SPREAD",
    "SKY_LINES",
    "SURVEY_SETS",
    "Realized",
    "SetContext",
    "SurveyPopulation",
    "apply_masks",
    "inliers",
    "observe_labels",
]

_EL = {e: i for i, e in enumerate(ELEMENTS)}
_ALPHA = [_EL[e] for e in ("O", "Mg", "Si", "S", "Ca", "Ti")]
_FE = _EL["Fe"]

#: Mean and spread of [X/Fe] for the non-alpha elements (Fe itself: 0).
ELEMENT_SPREAD: dict[str, tuple[float, float]] = {
    "C": (-0.05, 0.06), "N": (0.20, 0.08), "Na": (0.0, 0.05), "Al": (0.0, 0.04),
    "P": (0.0, 0.05), "K": (0.0, 0.05), "V": (0.0, 0.04), "Cr": (0.0, 0.03),
    "Mn": (0.0, 0.04), "Co": (0.0, 0.04), "Ni": (0.0, 0.03), "Cu": (0.0, 0.05),
}  # fmt: skip

#: Bright OH night-sky lines in the APOGEE band (vacuum, A): where sky residuals appear.
SKY_LINES = np.array([15187.1, 15240.0, 15332.4, 15395.3, 15597.6, 15972.6, 16128.6,
                      16235.4, 16502.4, 16553.8, 16904.7])  # fmt: skip


@dataclass(frozen=True)
class SurveyPopulation:
    """The survey-like giant population (see the module doc for the recipe)."""

    thin_weight: float = 0.7
    thin_feh: tuple[float, float, float, float] = (0.0, 0.2, -0.7, 0.4)  # mean, sd, lo, hi
    thick_feh: tuple[float, float, float, float] = (-0.45, 0.22, -1.0, 0.1)
    thin_alpha: tuple[float, float] = (0.02, -0.06)  # [a/Fe] = a + b [Fe/H]
    thick_alpha: tuple[float, float] = (0.25, -0.10)  # [a/Fe] = a + b ([Fe/H] + 0.5)
    alpha_scatter: float = 0.025
    alpha_element_scatter: float = 0.02
    clump_weight: float = 0.25
    branch_scatter: float = 50.0  # K
    logg_range: tuple[float, float] = (1.0, 3.5)
    snr_range: tuple[float, float] = (50.0, 500.0)
    snr_tail: tuple[float, float, float] = (0.1, 500.0, 1000.0)  # fraction, lo, hi
    mask_fraction: float = 0.3  # stars with one masked run
    mask_run: tuple[int, int] = (5, 40)
    element_spread: dict[str, tuple[float, float]] = field(
        default_factory=lambda: dict(ELEMENT_SPREAD)
    )

    # -- relations ----------------------------------------------------------------------

    def branch_teff(self, logg: np.ndarray, feh: np.ndarray) -> np.ndarray:
        """Mean Teff (K) of the giant branch at ``logg`` and ``feh``."""
        g = np.asarray(logg) - 2.5
        return 4680.0 + 330.0 * g - 60.0 * g**2 - 280.0 * np.asarray(feh)

    def clump_teff(self, feh: np.ndarray) -> np.ndarray:
        return 4760.0 - 250.0 * np.asarray(feh)

    def alpha_sequences(self, feh: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean [alpha/Fe] of the low- and high-alpha sequences at ``feh``."""
        feh = np.asarray(feh, dtype=np.float64)
        low = self.thin_alpha[0] + self.thin_alpha[1] * feh
        high = self.thick_alpha[0] + self.thick_alpha[1] * (feh + 0.5)
        return low, high

    def vmacro(self, teff: np.ndarray, logg: np.ndarray) -> np.ndarray:
        v = 4.5 + 1.2 * (2.5 - np.asarray(logg)) + 0.0015 * (np.asarray(teff) - 4700.0)
        return np.round(np.clip(v, 2.0, 10.0), 1)

    def label_sigma(self, snr: np.ndarray) -> np.ndarray:
        """Observed-label errors (n, 3) (Teff K, log g, [Fe/H]) at S/N ``snr`` (n,)."""
        r = 100.0 / np.asarray(snr, dtype=np.float64)
        return np.stack([20.0 + 30.0 * r, 0.04 + 0.06 * r, 0.015 + 0.02 * r], axis=1)

    # -- draws --------------------------------------------------------------------------

    def sample_feh_alpha(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """[Fe/H] (n,), [alpha/Fe] (n,) and the component (n,) (0 thin, 1 thick)."""
        thick = rng.random(n) >= self.thin_weight
        feh = np.where(
            thick, _cut_normal(rng, self.thick_feh, n), _cut_normal(rng, self.thin_feh, n)
        )
        low, high = self.alpha_sequences(feh)
        alpha = np.where(thick, high, low) + self.alpha_scatter * rng.standard_normal(n)
        return feh, alpha, thick.astype(np.int8)

    def sample_giants(
        self, n: int, rng: np.random.Generator, feh: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """log g (n,), Teff (n,) and clump membership (n,) bool on the branch / clump."""
        feh = np.zeros(n) if feh is None else feh
        clump = rng.random(n) < self.clump_weight
        lo, hi = self.logg_range
        g_rgb = lo + (hi - lo) * rng.random(n) ** 0.7
        g_rc = np.clip(2.45 + 0.06 * rng.standard_normal(n), 2.3, 2.65)
        logg = np.where(clump, g_rc, g_rgb)
        mean = np.where(clump, self.clump_teff(feh), self.branch_teff(logg, feh))
        teff = mean + self.branch_scatter * rng.standard_normal(n)
        return logg, teff, clump

    def abundances(
        self, feh: np.ndarray, alpha: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        """[X/H] (n, 19) from [Fe/H], [alpha/Fe] and the element spreads."""
        n = feh.shape[0]
        x_fe = np.zeros((n, len(ELEMENTS)))
        x_fe[:, _ALPHA] = alpha[:, None] + self.alpha_element_scatter * rng.standard_normal(
            (n, len(_ALPHA))
        )
        for el, (mu, sd) in self.element_spread.items():
            x_fe[:, _EL[el]] = mu + sd * rng.standard_normal(n)
        return feh[:, None] + x_fe

    def sample(self, n: int, rng: np.random.Generator) -> tuple[StellarLabels, dict]:
        """n stars: labels and their truth columns (alpha_fe, component, clump, branch)."""
        feh, alpha, comp = self.sample_feh_alpha(n, rng)
        logg, teff, clump = self.sample_giants(n, rng, feh)
        lab = StellarLabels(
            teff, logg, self.abundances(feh, alpha, rng), self.vmacro(teff, logg), np.zeros(n)
        )
        truth = {"truth_alpha_fe": alpha, "truth_thick": comp, "truth_clump": clump}
        return lab, truth

    def sample_snr(self, n: int, rng: np.random.Generator) -> np.ndarray:
        frac, lo_t, hi_t = self.snr_tail
        tail = rng.random(n) < frac
        lo, hi = self.snr_range
        u = rng.random(n)
        main = np.exp(np.log(lo) + u * np.log(hi / lo))
        high = np.exp(np.log(lo_t) + u * np.log(hi_t / lo_t))
        return np.where(tail, high, main)

    def training_ranges(self) -> dict[str, tuple[float, float]]:
        """Ranges that the outlier generators keep their labels inside (true labels)."""
        return {"teff": (3950.0, 5250.0), "logg": self.logg_range, "feh": (-1.0, 0.4)}


def _cut_normal(rng: np.random.Generator, p: tuple[float, float, float, float], n: int):
    mean, sd, lo, hi = p
    x = mean + sd * rng.standard_normal(n)
    bad = (x < lo) | (x > hi)
    while bad.any():  # redraw (a truncated normal)
        x[bad] = mean + sd * rng.standard_normal(int(bad.sum()))
        bad = (x < lo) | (x > hi)
    return x


def observe_labels(
    pop: SurveyPopulation, true: np.ndarray, snr: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Observed (Teff, log g, [Fe/H]) (n, 3): ``true`` plus errors that grow as S/N falls."""
    return true + pop.label_sigma(snr) * rng.standard_normal(true.shape)


def apply_masks(pop: SurveyPopulation, ivar: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mask one run of pixels (ivar = 0) in a ``pop.mask_fraction`` of the rows (in place)."""
    n, n_pix = ivar.shape
    hit = np.flatnonzero(rng.random(n) < pop.mask_fraction)
    length = rng.integers(pop.mask_run[0], pop.mask_run[1] + 1, size=hit.size)
    start = rng.integers(0, n_pix - length)
    for i, a, k in zip(hit, start, length, strict=True):
        ivar[i, a : a + k] = 0.0
    return ivar


# --- realized sets --------------------------------------------------------------------


@dataclass
class Realized:
    """A simulated set before noise: true labels, noise-free flux and truth columns."""

    labels: StellarLabels  # (n) the (primary) star's true labels
    flux: np.ndarray  # (n, n_pix) noise-free continuum-normalized flux
    snr: np.ndarray  # (n,) S/N to observe at
    truth: dict[str, np.ndarray]  # truth_* columns (kind, size, ...)


@dataclass(frozen=True)
class SetContext:
    """What a set generator needs: the population, the simulator and the run's seed."""

    pop: SurveyPopulation
    sim: Simulator
    seed: int


def _base(ctx: SetContext, n: int, rng: np.random.Generator, kind: str) -> Realized:
    lab, truth = ctx.pop.sample(n, rng)
    truth |= {"truth_kind": np.array([kind] * n), "truth_size": np.zeros(n)}
    return Realized(lab, np.empty((n, 0), np.float32), ctx.pop.sample_snr(n, rng), truth)


def _simulated(ctx: SetContext, r: Realized) -> Realized:
    r.flux = ctx.sim(r.labels)
    return r


def inliers(ctx: SetContext, n: int, rng: np.random.Generator) -> Realized:
    """Typical stars of the population (training, validation and test sets)."""
    return _simulated(ctx, _base(ctx, n, rng, "inlier"))


def _fixed_snr(snr: float) -> Callable[[SetContext, int, np.random.Generator], Realized]:
    def make(ctx: SetContext, n: int, rng: np.random.Generator) -> Realized:
        # the same stars for every S/N: labels from a seed of their own
        r = inliers(ctx, n, np.random.default_rng(np.random.SeedSequence([ctx.seed, 90210])))
        r.snr = np.full(n, float(snr))
        r.truth["truth_size"] = r.snr.copy()
        return r

    make.__doc__ = f"The same inliers (one fixed draw) observed at S/N {snr:g}."
    return make


def between_alpha(ctx: SetContext, n: int, rng: np.random.Generator) -> Realized:
    """Stars in the valley between the two alpha sequences, where both are populated
    ([Fe/H] -0.7..-0.15): [alpha/Fe] at the midpoint of the sequences +- 0.01."""
    r = _base(ctx, n, rng, "between_alpha")
    feh = rng.uniform(-0.7, -0.15, n)
    low, high = ctx.pop.alpha_sequences(feh)
    alpha = 0.5 * (low + high) + 0.01 * rng.standard_normal(n)
    logg, teff, _ = ctx.pop.sample_giants(n, rng, feh)
    x_h = ctx.pop.abundances(feh, alpha, rng)
    r.labels = StellarLabels(teff, logg, x_h, ctx.pop.vmacro(teff, logg), np.zeros(n))
    r.truth["truth_alpha_fe"] = alpha
    r.truth["truth_size"] = np.minimum(alpha - low, high - alpha) / ctx.pop.alpha_scatter
    return _simulated(ctx, r)


def off_branch(ctx: SetContext, n: int, rng: np.random.Generator) -> Realized:
    """Giant-branch stars moved 4-5 branch scatters hotter or cooler at their log g (Teff
    stays inside the training range)."""
    r = _base(ctx, n, rng, "off_branch")
    lab = r.labels
    g = rng.uniform(1.3, 3.3, n)
    mean = ctx.pop.branch_teff(g, lab.feh)
    k = rng.uniform(4.0, 5.0, n) * np.where(rng.random(n) < 0.5, -1.0, 1.0)
    teff = mean + k * ctx.pop.branch_scatter
    lo, hi = ctx.pop.training_ranges()["teff"]
    k = np.where((teff < lo) | (teff > hi), -k, k)  # flip to stay inside the range
    teff = mean + k * ctx.pop.branch_scatter
    r.labels = replace(lab, teff=teff, logg=g, vmacro=ctx.pop.vmacro(teff, g))
    r.truth["truth_size"] = k
    return _simulated(ctx, r)


def second_population(ctx: SetContext, n: int, rng: np.random.Generator) -> Realized:
    """Globular-cluster-like second-population giants: [N/Fe] +0.5..+1.0, [C/Fe] -0.3,
    [Al/Fe] +0.3..+0.6, [Mg/Fe] 0.1 below the star's sequence; all else typical."""
    r = _base(ctx, n, rng, "second_population")
    x = r.labels.x_h.copy()
    feh = r.labels.feh
    dn = rng.uniform(0.5, 1.0, n)
    x[:, _EL["N"]] = feh + dn
    x[:, _EL["C"]] = feh - 0.3
    x[:, _EL["Al"]] = feh + rng.uniform(0.3, 0.6, n)
    x[:, _EL["Mg"]] -= 0.1
    r.labels = replace(r.labels, x_h=x)
    r.truth["truth_size"] = dn
    return _simulated(ctx, r)


def single_element(ctx: SetContext, n: int, rng: np.random.Generator) -> Realized:
    """One element anomalous: [Mg/Fe] (half the stars) or [Mn/Fe] (the other half)
    0.2-0.3 dex above its typical value; all else typical."""
    r = _base(ctx, n, rng, "single_element")
    mg = rng.random(n) < 0.5
    dx = rng.uniform(0.2, 0.3, n)
    x = r.labels.x_h.copy()
    x[mg, _EL["Mg"]] += dx[mg]
    x[~mg, _EL["Mn"]] += dx[~mg]
    r.labels = replace(r.labels, x_h=x)
    r.truth["truth_kind"] = np.where(mg, "single_element_mg", "single_element_mn")
    r.truth["truth_size"] = dx
    return _simulated(ctx, r)


def binary(ctx: SetContext, n: int, rng: np.random.Generator) -> Realized:
    """Double-lined binaries: a giant plus a second giant (half) or a dwarf (Teff
    4500-5800 K, log g 4.3-4.7), same composition, radial-velocity offset 10-60 km/s (either
    sign), flux ratio q = F2 / F1 of 0.2-1: F = (F1 + q F2(v)) / (1 + q).  The observed
    labels are the primary's."""
    r = _base(ctx, n, rng, "binary")
    p = r.labels
    dwarf = rng.random(n) < 0.5
    g2, t2, _ = ctx.pop.sample_giants(n, rng, p.feh)
    t2 = np.where(dwarf, rng.uniform(4500, 5800, n), t2)
    g2 = np.where(dwarf, rng.uniform(4.3, 4.7, n), g2)
    sec = StellarLabels(t2, g2, p.x_h, np.where(dwarf, 3.0, ctx.pop.vmacro(t2, g2)), np.zeros(n))
    dv = rng.uniform(10.0, 60.0, n) * np.where(rng.random(n) < 0.5, -1.0, 1.0)
    q = rng.uniform(0.2, 1.0, n)
    f1 = ctx.sim(p)
    f2 = ctx.sim(sec, rv=dv)
    r.flux = ((f1 + q[:, None] * f2) / (1 + q[:, None])).astype(np.float32)
    r.truth |= {"truth_kind": np.where(dwarf, "binary_dwarf", "binary_giant"),
                "truth_size": dv, "truth_rv2": dv, "truth_q": q, "truth_teff2": t2,
                "truth_logg2": g2}  # fmt: skip
    return r


def unknown_line(ctx: SetContext, n: int, rng: np.random.Generator) -> Realized:
    """One absorption line that is not in the line list, depth 2-10% of the local flux,
    centred on a random model pixel, width of the instrument's line-spread function."""
    r = _simulated(ctx, _base(ctx, n, rng, "unknown_line"))
    wl = ctx.sim.grid.wavelength
    centre = rng.integers(5, wl.size - 5, n)
    depth = rng.uniform(0.02, 0.10, n)
    sigma_v = np.hypot(C_KMS / ctx.sim.config.resolution / 2.3548, 2.0)  # km/s
    dv = (wl[None, :] / wl[centre][:, None] - 1.0) * C_KMS  # (n, n_pix)
    r.flux = (r.flux * (1 - depth[:, None] * np.exp(-0.5 * (dv / sigma_v) ** 2))).astype(np.float32)
    r.truth |= {"truth_size": depth, "truth_line_wl": wl[centre], "truth_line_pixel": centre}
    return r


def _chip_of(ctx: SetContext, rng: np.random.Generator, n: int):
    wl = ctx.sim.grid.wavelength
    chip = rng.integers(0, len(ASPCAP_CHIPS), n)
    edges = np.array([[wl[ctx.sim.grid.chip == c].min(), wl[ctx.sim.grid.chip == c].max()]
                      for c in range(len(ASPCAP_CHIPS))])  # fmt: skip
    return wl, chip, edges[chip]


def artefact_bump(ctx: SetContext, n: int, rng: np.random.Generator) -> Realized:
    """A smooth bump or dip (2-5%, Gaussian sigma 15-50 A) over part of one detector chip."""
    r = _simulated(ctx, _base(ctx, n, rng, "artefact_bump"))
    wl, chip, edges = _chip_of(ctx, rng, n)
    lo, hi = edges.T
    centre = rng.uniform(lo, hi)
    width = rng.uniform(15.0, 50.0, n)
    amp = rng.uniform(0.02, 0.05, n) * np.where(rng.random(n) < 0.5, -1.0, 1.0)
    inside = (wl[None, :] >= lo[:, None]) & (wl[None, :] <= hi[:, None])
    bump = amp[:, None] * np.exp(-0.5 * ((wl[None, :] - centre[:, None]) / width[:, None]) ** 2)
    r.flux = (r.flux * (1 + bump * inside)).astype(np.float32)
    r.truth |= {"truth_size": amp, "truth_centre_wl": centre, "truth_chip": chip}
    return r


def artefact_sky(ctx: SetContext, n: int, rng: np.random.Generator) -> Realized:
    """Sky-line residuals: 1-3 bright OH lines left in the spectrum with +-5-30% of the
    continuum (imperfect sky subtraction), one instrumental line width."""
    r = _simulated(ctx, _base(ctx, n, rng, "artefact_sky"))
    wl = ctx.sim.grid.wavelength
    sigma = C_KMS / ctx.sim.config.resolution / 2.3548
    amp_max = np.zeros(n)
    for i in range(n):
        k = rng.integers(1, 4)
        lines = rng.choice(SKY_LINES, size=k, replace=False)
        amps = rng.uniform(0.05, 0.30, k) * np.where(rng.random(k) < 0.7, 1.0, -1.0)
        dv = (wl[None, :] / lines[:, None] - 1.0) * C_KMS  # (k, n_pix)
        r.flux[i] += (amps[:, None] * np.exp(-0.5 * (dv / sigma) ** 2)).sum(axis=0)
        amp_max[i] = np.abs(amps).max()
    r.truth["truth_size"] = amp_max
    return r


def artefact_continuum(ctx: SetContext, n: int, rng: np.random.Generator) -> Realized:
    """Continuum-normalisation error: one chip tilted linearly by +-2-5% edge to edge."""
    r = _simulated(ctx, _base(ctx, n, rng, "artefact_continuum"))
    wl, chip, edges = _chip_of(ctx, rng, n)
    lo, hi = edges.T
    slope = rng.uniform(0.02, 0.05, n) * np.where(rng.random(n) < 0.5, -1.0, 1.0)
    t = (wl[None, :] - 0.5 * (lo + hi)[:, None]) / (hi - lo)[:, None]  # -0.5..0.5 in the chip
    inside = (wl[None, :] >= lo[:, None]) & (wl[None, :] <= hi[:, None])
    r.flux = (r.flux * (1 + slope[:, None] * t * inside)).astype(np.float32)
    r.truth |= {"truth_size": slope, "truth_chip": chip}
    return r


def cemp(ctx: SetContext, n: int, rng: np.random.Generator) -> Realized:
    """The paper's CEMP class from the survey parents: [Fe/H] -2..-1.5 (outside the
    training range by design), [C/Fe] +1..+2, [alpha/Fe] +0.3, on the branch at their
    metallicity."""
    r = _base(ctx, n, rng, "cemp")
    feh = rng.uniform(-2.0, -1.5, n)
    logg, teff, _ = ctx.pop.sample_giants(n, rng, feh)
    x = ctx.pop.abundances(feh, np.full(n, 0.3), rng)
    cfe = rng.uniform(1.0, 2.0, n)
    x[:, _EL["C"]] = feh + cfe
    r.labels = StellarLabels(teff, logg, x, ctx.pop.vmacro(teff, logg), np.zeros(n))
    r.truth["truth_size"] = cfe
    return _simulated(ctx, r)


def rotator(ctx: SetContext, n: int, rng: np.random.Generator) -> Realized:
    """The paper's rapid rotators from the survey parents: macroturbulence 20-40 km/s."""
    r = _base(ctx, n, rng, "rotator")
    v = np.round(rng.uniform(20.0, 40.0, n), 1)
    r.labels = replace(r.labels, vmacro=v)
    r.truth["truth_size"] = v
    return _simulated(ctx, r)


def stripped(ctx: SetContext, n: int, rng: np.random.Generator) -> Realized:
    """The paper's stripped stars from the survey parents: Teff 4500-7000 K, log g 4.5-6
    (outside the training range by design), survey abundances."""
    r = _base(ctx, n, rng, "stripped")
    teff = rng.uniform(4500.0, 7000.0, n)
    r.labels = replace(r.labels, teff=teff, logg=rng.uniform(4.5, 6.0, n), vmacro=np.full(n, 3.0))
    r.truth["truth_size"] = teff
    return _simulated(ctx, r)


#: Outlier (and S/N-pair) sets of the survey population, by set name.
SURVEY_SETS: dict[str, Callable[[SetContext, int, np.random.Generator], Realized]] = {
    "between_alpha": between_alpha,
    "off_branch": off_branch,
    "second_population": second_population,
    "single_element": single_element,
    "binary": binary,
    "unknown_line": unknown_line,
    "artefact_bump": artefact_bump,
    "artefact_sky": artefact_sky,
    "artefact_continuum": artefact_continuum,
    "snr300": _fixed_snr(300.0),
    "snr1000": _fixed_snr(1000.0),
    "cemp": cemp,
    "rotator": rotator,
    "stripped": stripped,
}
