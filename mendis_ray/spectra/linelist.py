"""The simulator's H-band line list and how each line's strength responds to the labels.

This is *not* Kurucz/SYNTHE.  It is a compact, physically-motivated stand-in, built so
that the Mendis paper's science has something true to find:

* **Atomic lines** of the 19 elements (C N O Na Mg Al Si P S K Ca Ti V Cr Mn Fe Co Ni Cu):
  the strong, well-known APOGEE lines at their (approximate, +-1 A) laboratory
  wavelengths, plus seeded pseudo-lines so that every element touches many pixels at
  widely separated wavelengths (as Fe, Ni, Si, Ti... do in real spectra).
* **Molecular lines**: CO second-overtone bands (3-0 ... 8-5, real band heads from Dunham
  constants), OH Meinel Delta-v = 2 bands (rotor model with spin splitting), and CN red
  system pseudo-lines.  Their number densities come from a simplified molecular
  equilibrium, so CO tracks C (or O when C > O), OH tracks the O left over from CO, and CN
  tracks C_free * N, i.e. roughly C * N / O: C, N and O pixels correlate as in giants.
* **Hydrogen Brackett lines** (n = 4 <- 11..21): invisible in cool giants, strong with
  Stark wings in hot dwarfs (the stripped-star outliers).

Line strength (central optical depth of the Gaussian core) follows Gray's treatment of
weak-line formation in an H- dominated photosphere:

    log tau0 = log gf + A(X) - 12 + [X/H] + log f_stage(T, Pe) - theta * chi
               - log kappa_c(T, Pe) + const,        theta = 5040 / Teff

with the Saha ionisation fraction ``f_stage``, an electron pressure that grows with
log g, [M/H] and Teff, and an H- continuum opacity ``kappa_c ~ Pe theta^2.5 10^(0.754
theta)``.  The ``log gf`` values are *astrophysical*: calibrated so that each line has a
chosen central optical depth in a reference giant (4400 K, log g 2.05, solar), the way
real H-band line lists are calibrated on Arcturus.  Wavelengths are vacuum Angstrom.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = [
    "ELEMENTS",
    "REFERENCE_LABELS",
    "SOLAR_ABUNDANCE",
    "LineList",
    "air_to_vacuum",
    "build_linelist",
    "default_linelist",
    "electron_pressure",
    "gas_pressure",
    "log_tau0",
    "molecular_densities",
]

#: The 19 elements of the paper, in the order used for abundance arrays.
ELEMENTS: tuple[str, ...] = (
    "C", "N", "O", "Na", "Mg", "Al", "Si", "P", "S", "K",
    "Ca", "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu",
)  # fmt: skip
_EI = {e: i for i, e in enumerate(ELEMENTS)}

#: Asplund et al. (2009) solar abundances A(X) = log(N_X / N_H) + 12.
SOLAR_ABUNDANCE = np.array(
    [8.43, 7.83, 8.69, 6.24, 7.60, 6.45, 7.51, 5.41, 7.12, 5.03,
     6.34, 4.95, 3.93, 5.64, 5.43, 7.50, 4.99, 6.22, 4.19]
)  # fmt: skip
#: First ionisation potentials (eV).
IONIZATION_EV = np.array(
    [11.26, 14.53, 13.62, 5.14, 7.65, 5.99, 8.15, 10.49, 10.36, 4.34,
     6.11, 6.83, 6.75, 6.77, 7.43, 7.90, 7.88, 7.64, 7.73]
)  # fmt: skip
#: Atomic masses (amu).
MASS_AMU = np.array(
    [12.01, 14.01, 16.00, 22.99, 24.31, 26.98, 28.09, 30.97, 32.06, 39.10,
     40.08, 47.87, 50.94, 52.00, 54.94, 55.85, 58.93, 58.69, 63.55]
)  # fmt: skip

#: Reference giant on which the astrophysical log gf are calibrated.
REFERENCE_LABELS = {"teff": 4400.0, "logg": 2.05}
#: Hydrogen lines are calibrated on a hot dwarf (they vanish in the reference giant).
HYDROGEN_REFERENCE = {"teff": 6500.0, "logg": 4.5}

# Species codes.
ATOM, CO, OH, CN, HYDROGEN = 0, 1, 2, 3, 4
SPECIES_NAMES = {ATOM: "atom", CO: "CO", OH: "OH", CN: "CN", HYDROGEN: "H I"}
# Dissociation energies (eV) that set the temperature dependence of molecule formation.
D0 = {CO: 11.09, OH: 4.39, CN: 7.72}


def air_to_vacuum(wl_air: np.ndarray) -> np.ndarray:
    """Air -> vacuum wavelength (Angstrom), Ciddor/Morton refractive index, one iteration."""
    wl = np.asarray(wl_air, dtype=np.float64)
    s2 = (1e4 / wl) ** 2
    n = 1 + 8.34254e-5 + 2.406147e-2 / (130 - s2) + 1.5998e-4 / (38.9 - s2)
    return wl * n


@dataclass(frozen=True)
class LineList:
    """Arrays of length n_lines.

    Attributes:
        wavelength: vacuum Angstrom.
        species: ATOM, CO, OH, CN or HYDROGEN.
        element: element index into ELEMENTS for atoms (-1 otherwise).
        ion: 0 neutral, 1 singly ionised (atoms only).
        chi: lower-level excitation energy (eV).
        log_gf: astrophysical oscillator strength (calibrated, see module docstring).
        damping: Lorentz-to-Gaussian peak ratio of the damping wing in the reference
            star (0 = pure Doppler core).
        mass: absorber mass (amu), sets the thermal Doppler width.
        strong: True for the named laboratory lines (the rest are pseudo-lines).
    """

    wavelength: np.ndarray
    species: np.ndarray
    element: np.ndarray
    ion: np.ndarray
    chi: np.ndarray
    log_gf: np.ndarray
    damping: np.ndarray
    mass: np.ndarray
    strong: np.ndarray

    def __len__(self) -> int:
        return int(self.wavelength.size)

    def select(self, mask: np.ndarray) -> LineList:
        return LineList(**{k: getattr(self, k)[mask] for k in self.__dataclass_fields__})

    def label(self, i: int) -> str:
        """Human-readable name of line ``i`` (e.g. 'Fe I 15651.2')."""
        sp = int(self.species[i])
        if sp == ATOM:
            name = f"{ELEMENTS[self.element[i]]} {'I' * (1 + int(self.ion[i]))}"
        else:
            name = SPECIES_NAMES[sp]
        return f"{name} {self.wavelength[i]:.1f}"


# --- Physics of line strengths ----------------------------------------------------------


def electron_pressure(teff: np.ndarray, logg: np.ndarray, mh: np.ndarray) -> np.ndarray:
    """log10 electron pressure (dyn cm^-2) near tau ~ 2/3; a fit to the behaviour of
    cool-star model atmospheres: Pe ~ g^0.5, grows with metals (electron donors) and
    steeply with Teff (-0.2 for a 4400 K giant, ~1.7 for the Sun)."""
    theta = 5040.0 / teff
    return -0.8 + 0.5 * logg + 2.5 * (1.0 - theta) + 0.5 * mh


def gas_pressure(logg: np.ndarray, mh: np.ndarray) -> np.ndarray:
    """log10 gas pressure (dyn cm^-2): P ~ g^0.6, higher at low metallicity (lower
    opacity); ~1e4 in a log g = 2 giant."""
    return 4.0 + 0.6 * (np.asarray(logg) - 2.0) - 0.3 * np.asarray(mh)


def _log_kappa_c(teff: np.ndarray, log_pe: np.ndarray) -> np.ndarray:
    theta = 5040.0 / teff
    return log_pe + 2.5 * np.log10(theta) + 0.754 * theta


def _log_saha_ratio(teff: np.ndarray, log_pe: np.ndarray, chi_ion: np.ndarray) -> np.ndarray:
    """log10 N_II / N_I (Saha, with log(2 U_II / U_I) ~ 0.3)."""
    theta = 5040.0 / teff
    return 0.3 + 2.5 * np.log10(teff) - theta * chi_ion - 0.1762 - log_pe


def molecular_densities(
    teff: np.ndarray, logg: np.ndarray, x_h: np.ndarray
) -> dict[int, np.ndarray]:
    """log10 number densities per H of CO, OH and CN from a simplified equilibrium.

    CO forms first and is nearly complete in cool giants, ``n_CO = K (n_C - n_CO)(n_O - n_CO)``
    (solved exactly); OH and CN form from what is left:
    ``n_OH = K_OH n_O,free``, ``n_CN = K_CN n_C,free n_N``.  K ~ 10^(D0 theta) P_gas.

    Args:
        teff, logg: (n,). x_h: (n, 19) [X/H].
    """
    theta = 5040.0 / teff
    mh = x_h[:, _EI["Fe"]]
    lp = gas_pressure(logg, mh) - 4.0
    n_c = 10 ** (SOLAR_ABUNDANCE[_EI["C"]] - 12 + x_h[:, _EI["C"]])
    n_n = 10 ** (SOLAR_ABUNDANCE[_EI["N"]] - 12 + x_h[:, _EI["N"]])
    n_o = 10 ** (SOLAR_ABUNDANCE[_EI["O"]] - 12 + x_h[:, _EI["O"]])
    k_co = 10 ** (D0[CO] * theta - 8.1 + lp)
    b = k_co * (n_c + n_o) + 1.0
    n_co = 2 * k_co * n_c * n_o / (b + np.sqrt(np.maximum(b * b - 4 * k_co**2 * n_c * n_o, 0.0)))
    c_free = np.maximum(n_c - n_co, 1e-30)
    o_free = np.maximum(n_o - n_co, 1e-30)
    k_oh = 10 ** (D0[OH] * theta - 7.0 + lp)
    k_cn = 10 ** (D0[CN] * theta - 5.5 + lp)
    return {
        CO: np.log10(n_co),
        OH: np.log10(k_oh * o_free),
        CN: np.log10(k_cn * c_free * n_n),
    }


def log_tau0(
    lines: LineList,
    teff: np.ndarray,
    logg: np.ndarray,
    x_h: np.ndarray,
    log_gf: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Central optical depth (log10) of every line's Gaussian core and the damping ratio.

    Args:
        lines: the line list.
        teff, logg: (n,). x_h: (n, 19) [X/H] in ELEMENTS order.
        log_gf: override of ``lines.log_gf`` (used for calibration).

    Returns:
        log_tau: (n, n_lines); damping: (n, n_lines) Lorentz/Gauss peak ratio, which grows
        with pressure (van der Waals for metals ~ P_gas^0.4, Stark for H ~ Pe^0.7).
    """
    teff = np.asarray(teff, dtype=np.float64)[:, None]
    logg = np.asarray(logg, dtype=np.float64)[:, None]
    x_h = np.asarray(x_h, dtype=np.float64)
    theta = 5040.0 / teff
    mh = x_h[:, _EI["Fe"], None]
    log_pe = electron_pressure(teff, logg, mh)
    log_kc = _log_kappa_c(teff, log_pe)
    gf = lines.log_gf if log_gf is None else log_gf
    sp = lines.species
    out = np.empty((teff.shape[0], len(lines)))

    atom = sp == ATOM
    el = lines.element[atom]
    chi_ion = IONIZATION_EV[el][None, :]
    log_phi = _log_saha_ratio(teff, log_pe, chi_ion)  # (n, n_atom)
    # log f_I = -log(1 + Phi); log f_II = log Phi - log(1 + Phi)
    log_1p = np.logaddexp(0.0, log_phi * np.log(10)) / np.log(10)
    log_stage = np.where(lines.ion[atom][None, :] == 1, log_phi - log_1p, -log_1p)
    out[:, atom] = (
        gf[atom] + SOLAR_ABUNDANCE[el] - 12 + x_h[:, el] + log_stage
        - theta * lines.chi[atom] - log_kc
    )  # fmt: skip

    mol = molecular_densities(teff[:, 0], logg[:, 0], x_h)
    for code in (CO, OH, CN):
        m = sp == code
        if m.any():
            # Rotational partition function ~ T: strengths per molecule fall as 1/T.
            out[:, m] = (
                gf[m] + mol[code][:, None] - theta * lines.chi[m] - np.log10(teff / 4400.0)
                - log_kc
            )  # fmt: skip

    h = sp == HYDROGEN
    if h.any():
        log_phi_h = _log_saha_ratio(teff, log_pe, np.array([[13.6]]))
        log_fh = -np.logaddexp(0.0, log_phi_h * np.log(10)) / np.log(10)
        out[:, h] = gf[h] + log_fh - theta * lines.chi[h] - log_kc

    lpg = gas_pressure(logg, mh) - gas_pressure(REFERENCE_LABELS["logg"], 0.0)
    damp = np.broadcast_to(lines.damping, out.shape) * 10 ** (0.4 * lpg)
    if h.any():
        ref_pe = electron_pressure(
            np.array(HYDROGEN_REFERENCE["teff"]), np.array(HYDROGEN_REFERENCE["logg"]), 0.0
        )
        damp = damp.copy()
        damp[:, h] = lines.damping[h] * 10 ** (0.7 * (log_pe - ref_pe))
    return out, damp


# --- Building the list ------------------------------------------------------------------

# Strong, well-known H-band lines: (element, ion, air wavelength A, chi eV, log tau_ref,
# damping).  log tau_ref is the central optical depth in the reference giant.
_STRONG_AIR: tuple[tuple[str, int, float, float, float, float], ...] = (
    ("Mg", 0, 15740.7, 5.93, 1.9, 0.05), ("Mg", 0, 15748.9, 5.93, 2.0, 0.05),
    ("Mg", 0, 15765.8, 5.93, 2.1, 0.05), ("Mg", 0, 15879.5, 5.95, 1.2, 0.02),
    ("Mg", 0, 15886.2, 5.95, 1.3, 0.02), ("Mg", 0, 15954.5, 6.59, 1.2, 0.02),
    ("Mg", 0, 16364.8, 5.93, 0.6, 0.0), ("Mg", 0, 17108.6, 5.39, 1.5, 0.03),
    ("Al", 0, 16718.9, 4.09, 1.8, 0.04), ("Al", 0, 16750.6, 4.09, 2.0, 0.04),
    ("Al", 0, 16763.4, 4.09, 1.2, 0.02), ("Al", 0, 15956.7, 4.09, 0.3, 0.0),
    ("Si", 0, 15376.8, 6.22, 0.9, 0.01), ("Si", 0, 15557.8, 5.96, 0.8, 0.01),
    ("Si", 0, 15888.4, 5.08, 1.3, 0.02), ("Si", 0, 15960.1, 5.98, 1.5, 0.02),
    ("Si", 0, 16060.0, 5.95, 1.0, 0.01), ("Si", 0, 16094.8, 5.96, 1.1, 0.01),
    ("Si", 0, 16215.7, 5.95, 0.9, 0.01), ("Si", 0, 16680.8, 5.98, 1.2, 0.02),
    ("Si", 0, 16828.2, 5.98, 0.7, 0.0),
    ("Fe", 0, 15207.5, 5.39, 1.0, 0.01), ("Fe", 0, 15294.6, 5.31, 1.1, 0.01),
    ("Fe", 0, 15395.7, 5.62, 0.6, 0.0), ("Fe", 0, 15490.3, 2.20, 0.8, 0.0),
    ("Fe", 0, 15534.3, 5.64, 0.6, 0.0), ("Fe", 0, 15591.5, 6.36, 1.0, 0.01),
    ("Fe", 0, 15621.7, 5.54, 1.1, 0.01), ("Fe", 0, 15631.9, 5.35, 0.9, 0.0),
    ("Fe", 0, 15648.5, 5.43, 0.9, 0.0), ("Fe", 0, 15662.0, 5.83, 1.0, 0.01),
    ("Fe", 0, 15692.8, 5.39, 0.8, 0.0), ("Fe", 0, 15723.6, 5.62, 0.6, 0.0),
    ("Fe", 0, 15769.4, 5.54, 0.7, 0.0), ("Fe", 0, 15798.6, 5.95, 0.6, 0.0),
    ("Fe", 0, 15821.7, 5.64, 0.6, 0.0), ("Fe", 0, 15837.6, 6.32, 0.6, 0.0),
    ("Fe", 0, 15891.2, 6.26, 0.8, 0.0), ("Fe", 0, 15964.9, 5.92, 0.8, 0.0),
    ("Fe", 0, 16009.6, 5.43, 0.9, 0.0), ("Fe", 0, 16040.7, 5.87, 0.7, 0.0),
    ("Fe", 0, 16071.4, 6.26, 0.6, 0.0), ("Fe", 0, 16153.2, 5.35, 0.9, 0.0),
    ("Fe", 0, 16165.0, 6.32, 0.7, 0.0), ("Fe", 0, 16198.5, 5.41, 0.7, 0.0),
    ("Fe", 0, 16207.7, 6.32, 0.5, 0.0), ("Fe", 0, 16231.6, 6.38, 0.8, 0.0),
    ("Fe", 0, 16284.8, 6.40, 0.6, 0.0), ("Fe", 0, 16316.3, 6.28, 0.7, 0.0),
    ("Fe", 0, 16394.4, 5.96, 0.6, 0.0), ("Fe", 0, 16440.4, 6.29, 0.6, 0.0),
    ("Fe", 0, 16486.7, 5.83, 0.7, 0.0), ("Fe", 0, 16517.2, 6.29, 0.8, 0.0),
    ("Fe", 0, 16645.9, 5.96, 0.6, 0.0), ("Fe", 0, 16753.1, 6.38, 0.5, 0.0),
    ("Ca", 0, 16136.8, 4.53, 0.8, 0.0), ("Ca", 0, 16150.8, 4.53, 1.0, 0.01),
    ("Ca", 0, 16155.2, 4.53, 0.9, 0.0), ("Ca", 0, 16157.4, 4.55, 0.8, 0.0),
    ("Ca", 0, 16197.1, 4.54, 0.9, 0.0),
    ("K", 0, 15163.1, 2.67, 0.3, 0.0), ("K", 0, 15168.4, 2.67, 0.5, 0.0),
    ("Ti", 0, 15543.8, 1.88, 0.5, 0.0), ("Ti", 0, 15602.8, 2.27, 0.3, 0.0),
    ("Ti", 0, 15698.9, 1.89, 0.4, 0.0), ("Ti", 0, 15715.6, 1.87, 0.6, 0.0),
    ("Ti", 0, 16635.2, 2.34, 0.3, 0.0), ("Ti", 1, 15873.8, 3.12, -0.3, 0.0),
    ("Mn", 0, 15159.2, 4.89, 0.5, 0.0), ("Mn", 0, 15217.7, 4.89, 0.6, 0.0),
    ("Mn", 0, 15262.4, 4.89, 0.4, 0.0),
    ("Na", 0, 16373.9, 3.75, 0.3, 0.0), ("Na", 0, 16388.9, 3.75, 0.1, 0.0),
    ("Ni", 0, 15605.7, 5.30, 0.3, 0.0), ("Ni", 0, 16584.4, 5.49, 0.3, 0.0),
    ("Ni", 0, 16589.3, 5.47, 0.4, 0.0), ("Ni", 0, 16673.7, 6.03, 0.6, 0.0),
    ("Ni", 0, 16815.5, 5.30, 0.4, 0.0), ("Ni", 0, 16818.8, 6.04, 0.3, 0.0),
    ("Co", 0, 16757.7, 3.41, 0.1, 0.0), ("Co", 0, 15454.1, 4.15, -0.2, 0.0),
    ("Cr", 0, 15680.1, 4.70, 0.0, 0.0), ("Cr", 0, 15860.2, 4.70, -0.2, 0.0),
    ("V", 0, 15924.8, 2.14, -0.1, 0.0), ("V", 0, 16800.6, 2.14, -0.3, 0.0),
    ("Cu", 0, 16005.7, 5.39, -0.3, 0.0), ("Cu", 0, 16639.7, 5.39, -0.5, 0.0),
    ("P", 0, 15711.5, 7.18, -0.6, 0.0), ("P", 0, 16482.9, 7.21, -0.7, 0.0),
    ("S", 0, 15469.8, 8.05, -0.1, 0.0), ("S", 0, 15475.6, 8.05, -0.3, 0.0),
    ("S", 0, 15478.5, 8.05, 0.0, 0.0), ("S", 0, 15422.3, 8.05, -0.4, 0.0),
    ("C", 0, 16890.4, 9.00, 0.2, 0.0), ("C", 0, 16021.7, 9.63, -0.4, 0.0),
    ("C", 0, 16004.9, 9.63, -0.2, 0.0),
    ("N", 0, 15314.0, 11.76, -1.5, 0.0), ("O", 0, 15665.0, 12.09, -1.2, 0.0),
)  # fmt: skip

# Pseudo-lines per element: (count, chi range eV, mean log tau_ref, spread).
_PSEUDO: dict[str, tuple[int, tuple[float, float], float, float]] = {
    "Fe": (420, (2.0, 6.8), -1.2, 0.6), "Ni": (70, (3.5, 6.5), -1.3, 0.5),
    "Si": (55, (5.0, 7.0), -1.2, 0.5), "Ti": (60, (0.8, 3.0), -1.4, 0.5),
    "Ca": (30, (2.5, 5.5), -1.3, 0.5), "Cr": (35, (2.5, 5.5), -1.5, 0.5),
    "Mn": (25, (3.0, 6.0), -1.5, 0.5), "Co": (28, (2.0, 5.0), -1.6, 0.5),
    "V": (30, (1.0, 3.0), -1.6, 0.5), "Mg": (25, (5.0, 7.0), -1.0, 0.5),
    "Al": (14, (3.0, 5.0), -1.2, 0.5), "Na": (12, (3.0, 5.0), -1.5, 0.4),
    "K": (8, (2.5, 4.0), -1.6, 0.4), "S": (20, (7.5, 9.0), -1.6, 0.4),
    "P": (12, (6.5, 8.5), -1.8, 0.4), "Cu": (12, (3.5, 6.0), -1.8, 0.4),
    "C": (22, (7.5, 10.0), -1.4, 0.5), "N": (10, (10.0, 12.0), -2.0, 0.4),
    "O": (10, (9.0, 12.5), -1.9, 0.4),
}  # fmt: skip

_WL_RANGE = (15120.0, 16990.0)


def _co_lines(rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """CO X1Sigma+ second overtone (Delta v = 3): (vacuum A, chi eV, log tau_ref)."""
    we, wexe, be, ae = 2169.81, 13.29, 1.9313, 0.01750
    out = []
    for v_lo in range(0, 6):
        v_hi = v_lo + 3

        def g(v: int) -> float:
            return we * (v + 0.5) - wexe * (v + 0.5) ** 2

        nu0 = g(v_hi) - g(v_lo)
        b_hi, b_lo = be - ae * (v_hi + 0.5), be - ae * (v_lo + 0.5)
        for j in range(0, 90):
            e_lo = (g(v_lo) - g(0) + b_lo * j * (j + 1)) * 1.23984e-4  # cm^-1 -> eV
            for nu, hl in (
                (nu0 + b_hi * (j + 1) * (j + 2) - b_lo * j * (j + 1), j + 1),  # R(J)
                (nu0 + b_hi * (j - 1) * j - b_lo * j * (j + 1), j),  # P(J)
            ):
                if hl == 0:
                    continue
                wl = 1e8 / nu
                strength = -0.55 + np.log10(hl / 30.0) - 0.25 * v_lo
                out.append((wl, e_lo, strength))
    return out


def _oh_lines(rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """OH X2Pi Meinel Delta v = 2 bands as a rotor with spin splitting."""
    we, wexe, be, ae, de = 3737.76, 84.88, 18.91, 0.724, 1.94e-3
    out = []
    for v_lo in range(0, 5):
        v_hi = v_lo + 2

        def g(v: int) -> float:
            return we * (v + 0.5) - wexe * (v + 0.5) ** 2

        nu0 = g(v_hi) - g(v_lo)
        b_hi, b_lo = be - ae * (v_hi + 0.5), be - ae * (v_lo + 0.5)
        for j in range(1, 30):
            f_lo = b_lo * j * (j + 1) - de * (j * (j + 1)) ** 2
            e_lo = (g(v_lo) - g(0) + f_lo) * 1.23984e-4
            for nu in (
                nu0 + b_hi * (j - 1) * j - de * ((j - 1) * j) ** 2 - f_lo,  # P(J)
                nu0 + b_hi * (j + 1) * (j + 2) - de * ((j + 1) * (j + 2)) ** 2 - f_lo,  # R(J)
            ):
                for spin in (-1, 1):  # the two spin-orbit ladders, Lambda doublets
                    for lam in (-0.35, 0.35):
                        nu_l = nu + spin * (4.0 + 0.15 * j) + lam * 0.05 * j
                        strength = -0.45 + 0.3 * np.log10(j) - 0.2 * v_lo
                        out.append((1e8 / nu_l, e_lo, strength))
    return out


def build_linelist(seed: int = 20240521) -> LineList:
    """Build the deterministic line list (``seed`` fixes the pseudo-lines).

    Each line gets a reference central optical depth ``tau_ref`` in the reference giant;
    its astrophysical ``log gf`` is solved from the strength model so that
    ``log_tau0(reference) == log tau_ref``.
    """
    rng = np.random.default_rng(seed)
    rows: list[tuple] = []  # (wl_vac, species, element, ion, chi, log_tau_ref, damping, strong)
    strong_air = np.array([r[2] for r in _STRONG_AIR])
    for (el, ion, _, chi, ltau, damp), wl in zip(
        _STRONG_AIR, air_to_vacuum(strong_air), strict=True
    ):
        rows.append((wl, ATOM, _EI[el], ion, chi, ltau, damp, True))
    for el, (count, (c0, c1), mu, sd) in _PSEUDO.items():
        wl = rng.uniform(*_WL_RANGE, size=count)
        chi = rng.uniform(c0, c1, size=count)
        ltau = np.clip(rng.normal(mu, sd, size=count), -3.0, 0.8)
        ion = (rng.random(count) < (0.08 if el in ("Fe", "Ti", "Cr") else 0.0)).astype(int)
        for k in range(count):
            rows.append((wl[k], ATOM, _EI[el], ion[k], chi[k], ltau[k], 0.0, False))
    for wl, chi, ltau in _co_lines(rng):
        rows.append((wl, CO, -1, 0, chi, ltau, 0.0, False))
    for wl, chi, ltau in _oh_lines(rng):
        rows.append((wl, OH, -1, 0, chi, ltau, 0.0, False))
    n_cn = 900
    wl = rng.uniform(*_WL_RANGE, size=n_cn)
    chi = rng.uniform(0.1, 2.5, size=n_cn)
    ltau = np.clip(rng.normal(-1.7, 0.5, size=n_cn), -3.0, 0.3)
    for k in range(n_cn):
        rows.append((wl[k], CN, -1, 0, chi[k], ltau[k], 0.0, False))
    r_h = 109677.58
    for n_up in range(11, 22):
        wl_h = 1e8 / (r_h * (1 / 16 - 1 / n_up**2))
        # Higher series members are weaker (gf ~ n^-3) and more crowded.
        rows.append((wl_h, HYDROGEN, -1, 0, 12.75, 1.2 - 3 * np.log10(n_up / 11), 0.3, True))

    arr = list(zip(*rows, strict=True))
    wl = np.asarray(arr[0], dtype=np.float64)
    keep = (wl > _WL_RANGE[0] - 20) & (wl < _WL_RANGE[1] + 20)
    species = np.asarray(arr[1], dtype=np.int8)
    element = np.asarray(arr[2], dtype=np.int16)
    mass = np.where(
        species == ATOM,
        MASS_AMU[np.maximum(element, 0)],
        np.select([species == CO, species == OH, species == CN], [28.0, 17.0, 26.0], 1.008),
    )
    lines = LineList(
        wavelength=wl,
        species=species,
        element=element,
        ion=np.asarray(arr[3], dtype=np.int8),
        chi=np.asarray(arr[4], dtype=np.float64),
        log_gf=np.zeros(wl.size),
        damping=np.asarray(arr[6], dtype=np.float64),
        mass=mass,
        strong=np.asarray(arr[7], dtype=bool),
    ).select(keep)
    ltau_ref = np.asarray(arr[5], dtype=np.float64)[keep]
    # Calibrate: log gf = log tau_ref - log_tau0(reference star | log gf = 0).
    zero = np.zeros(len(lines))
    ref, _ = log_tau0(
        lines, np.array([REFERENCE_LABELS["teff"]]), np.array([REFERENCE_LABELS["logg"]]),
        np.zeros((1, len(ELEMENTS))), log_gf=zero,
    )  # fmt: skip
    href, _ = log_tau0(
        lines, np.array([HYDROGEN_REFERENCE["teff"]]), np.array([HYDROGEN_REFERENCE["logg"]]),
        np.zeros((1, len(ELEMENTS))), log_gf=zero,
    )  # fmt: skip
    base = np.where(lines.species == HYDROGEN, href[0], ref[0])
    order = np.argsort(lines.wavelength, kind="stable")
    calibrated = LineList(
        **{k: getattr(lines, k) for k in lines.__dataclass_fields__ if k != "log_gf"},
        log_gf=ltau_ref - base,
    )
    return calibrated.select(order)


@lru_cache(maxsize=4)
def default_linelist(seed: int = 20240521) -> LineList:
    """The cached line list used by the simulator."""
    return build_linelist(seed)
