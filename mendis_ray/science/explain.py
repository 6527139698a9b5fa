"""Why is a spectrum an outlier?  Pixels, features, lines and elements (no Ray, no torch).

An outlier is compared with a *reference*: its nearest typical spectrum from the same
catalog (what ``mendis score`` uses; see :func:`mendis_ray.science.gallery.nearest_typical`)
or any model reconstruction on the same pixels.  The comparison is made in standardized
residuals::

    r = flux - ref,        z = r / sqrt(1/ivar + 1/ref_ivar)     (pixels good in both)

and explained in three ways:

* **Features**: runs of adjacent pixels with ``|z| >= threshold`` (default 4), never across
  a chip gap, a one-pixel dip below the threshold bridged; ranked by their chi^2
  (sum of z^2).  Each feature gives its wavelength range, the peak pixel's wavelength,
  ``depth`` (the residual flux ``r`` at the peak: negative means *more* absorption than the
  reference, positive weaker absorption or emission), ``z_peak``, and the nearest
  identifiable line of the simulator's line list (:mod:`mendis_ray.spectra.linelist`)
  within ``tol_pix`` pixels (default 2) of the peak: the named laboratory lines,
  hydrogen Brackett lines and CO / OH band lines.  The list's seeded pseudo-lines (random
  wavelengths that give every element many pixels in the simulator) are never used to
  identify a feature, so an empty identification means "no known line within 2 pixels".
* **Element of a feature**: the identified line's element (its molecule for CO / OH), and
  ``response_element``: the element whose abundance moves the feature's pixels most in the
  simulator's element-response map at the star's labels (where one is available).
* **Per-element totals** (where a response map is available): for each element e with
  response R_e (flux per dex, :func:`mendis_ray.spectra.simulate.element_response`) the
  single-element least-squares fit of the residual, ``offset_dex = sum(w R r) / sum(w R^2)``
  (w = 1 / (1/ivar + 1/ref_ivar)) clipped to +-2 dex (the response is linear), the chi^2
  it removes at that offset (``delta_chi2``; ``sum(w R r)^2 / sum(w R^2)`` unclipped) and
  its share of the total chi^2; plus the chi^2 of the pixels that element
  dominates (``chi2_pixels``).  An element that explains most of the chi^2 with a
  plausible offset is the likely cause (e.g. C and N in a CEMP star); if no element explains
  much, the difference is not an abundance pattern (a line the list lacks, an artefact, a
  different star type).

Outputs are plain dicts / arrow tables so they go to CSV, Parquet and FITS alike.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from mendis_ray.science.ranking import SUMMARY_COLUMNS
from mendis_ray.spectra.linelist import CO, ELEMENTS, HYDROGEN, OH, SPECIES_NAMES, LineList

__all__ = [
    "Explanation",
    "element_totals",
    "explain_outliers",
    "explain_spectrum",
    "explanation_tables",
    "find_features",
    "identify_line",
    "line_strengths",
    "standardized_residual",
]

#: Species whose wavelengths in the line list are physical (not seeded pseudo-lines).
_IDENTIFIABLE_MOLECULES = (CO, OH)


@dataclass
class Explanation:
    """The explanation of one spectrum against its reference.

    Attributes:
        chi2: total chi^2 (sum of z^2 over pixels good in both).
        n_good: pixels good in both.
        features: dicts (see :func:`explain_spectrum`), largest chi^2 first.
        elements: dicts (see :func:`element_totals`), largest delta_chi2 first; empty
            without a response map.
    """

    chi2: float
    n_good: int
    features: list[dict] = field(default_factory=list)
    elements: list[dict] = field(default_factory=list)

    def summary(self, n: int = 3) -> str:
        """One line: the ``n`` strongest features and the leading element, e.g.
        ``"15770.6 A Mg I 15774.9 -0.21 (z -14); ...; elements: C 62%, N 20%"``."""
        parts = []
        for f in self.features[:n]:
            ident = f["line"] or f["response_element"] or "unidentified"
            if f["kind"] == "emission":
                ident = f"emission (near {f['line']})" if f["line"] else "emission"
            parts.append(
                f"{f['wavelength']:.1f} A {ident} {f['depth']:+.3f} (z {f['z_peak']:+.0f})"
            )
        if not parts and not self.n_good:
            return "no typical spectrum to compare with"
        if not parts:
            parts.append(f"no pixel beyond the threshold (chi2/pixel {self.chi2_per_pixel:.2f})")
        lead = [e for e in self.elements if e["share"] >= 0.05][:3]
        if lead:
            parts.append("elements: " + ", ".join(f"{e['element']} {e['share']:.0%}" for e in lead))
        return "; ".join(parts)

    @property
    def chi2_per_pixel(self) -> float:
        return self.chi2 / self.n_good if self.n_good else float("nan")


def standardized_residual(
    flux: np.ndarray, ivar: np.ndarray, ref: np.ndarray, ref_ivar: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Residual against a reference, standardized by both noise levels.

    Args:
        flux, ivar: (n_pix,) the spectrum.  ref: (n_pix,) the reference; ref_ivar (n_pix,)
            its inverse variance (None: a noise-free reference, e.g. a model).

    Returns:
        (r, z, w) each (n_pix,): r = flux - ref, z = r sqrt(w), w = 1 / (1/ivar +
        1/ref_ivar); all 0 where a pixel is bad (ivar <= 0, +inf or NaN, or a
        non-finite flux) in either.
    """
    flux, ivar, ref = (np.asarray(a, np.float64) for a in (flux, ivar, ref))
    good = (ivar > 0) & np.isfinite(ivar) & np.isfinite(flux) & np.isfinite(ref)
    var = 1.0 / np.where(good, ivar, 1.0)
    if ref_ivar is not None:  # +inf ivar is a masked pixel, as in the shards
        ref_ivar = np.asarray(ref_ivar, np.float64)
        good &= (ref_ivar > 0) & np.isfinite(ref_ivar)
        var = var + 1.0 / np.where(good, ref_ivar, 1.0)
    w = np.where(good, 1.0 / var, 0.0)
    r = np.where(good, flux - ref, 0.0)
    return r, r * np.sqrt(w), w


def _segments(wavelength: np.ndarray) -> np.ndarray:
    """(n_pix,) segment number: it grows after every chip gap (step > 3x the median)."""
    step = np.diff(wavelength)
    if step.size == 0:
        return np.zeros(wavelength.size, np.int64)
    gap = step > 3 * np.median(step)
    return np.concatenate([[0], np.cumsum(gap)])


def find_features(
    z: np.ndarray, wavelength: np.ndarray, threshold: float = 4.0, bridge: int = 1
) -> list[tuple[int, int, int]]:
    """Runs of pixels with ``|z| >= threshold``, gaps of up to ``bridge`` pixels bridged,
    never across a chip gap; sorted by chi^2 (sum z^2), largest first.

    Returns:
        [(lo, hi, peak)]: pixel range [lo, hi] (inclusive) and the peak pixel (max |z|)."""
    hot = np.flatnonzero(np.abs(z) >= threshold)
    if hot.size == 0:
        return []
    seg = _segments(np.asarray(wavelength, np.float64))
    runs, start = [], hot[0]
    for a, b in itertools.pairwise(hot):
        if b - a > bridge + 1 or seg[a] != seg[b]:
            runs.append((start, a))
            start = b
    runs.append((start, hot[-1]))
    out = []
    for lo, hi in runs:
        peak = lo + int(np.argmax(np.abs(z[lo : hi + 1])))
        out.append((int(lo), int(hi), int(peak), float(np.sum(z[lo : hi + 1] ** 2))))
    out.sort(key=lambda t: -t[3])
    return [t[:3] for t in out]


def identify_line(
    wl: float,
    pix_width: float,
    lines: LineList,
    tol_pix: float = 2.0,
    strength: np.ndarray | None = None,
) -> tuple[str, float, str]:
    """The identifiable line at ``wl`` (Angstrom): among the lines within ``tol_pix`` pixels
    of width ``pix_width``, the strongest by ``strength`` (n_lines,) (e.g. log tau0 at the
    star's labels) when given, else a named atomic line before a hydrogen line before a
    CO / OH line, the nearest first.

    Returns:
        (label e.g. ``"Mg I 15770.2"``, its wavelength, element or molecule), or
        ``("", nan, "")`` when no identifiable line is that close."""
    sp = lines.species
    ok = lines.strong | np.isin(sp, _IDENTIFIABLE_MOLECULES) | (sp == HYDROGEN)
    d = np.abs(lines.wavelength - wl)
    cand = np.flatnonzero(ok & (d <= tol_pix * pix_width))
    if cand.size == 0:
        return "", float("nan"), ""
    if strength is not None:
        i = int(cand[np.argmax(np.asarray(strength)[cand])])
    else:
        prio = np.where(sp[cand] == HYDROGEN, 1, np.where(lines.strong[cand], 0, 2))
        i = int(cand[np.lexsort((d[cand], prio))[0]])
    if sp[i] == HYDROGEN:
        element = "H"
    else:
        element = (
            ELEMENTS[int(lines.element[i])] if lines.element[i] >= 0 else SPECIES_NAMES[int(sp[i])]
        )
    return lines.label(i), float(lines.wavelength[i]), element


def element_totals(
    r: np.ndarray,
    w: np.ndarray,
    response: np.ndarray,
    chi2_total: float,
    min_response: float = 0.01,
    max_offset: float = 2.0,
) -> list[dict]:
    """Per-element explanation of a residual (see the module doc).

    Args:
        r, w: (n_pix,) residual and weights from :func:`standardized_residual`.
        response: (19, n_pix) d flux / d[X/H] at the star's labels, ELEMENTS order.
        chi2_total: sum of z^2 (the share's denominator).
        min_response: flux per dex below which no element dominates a pixel.
        max_offset: the linear response is trusted to this many dex: a larger fitted
            offset is clipped (``clipped`` True) and ``delta_chi2`` is the chi^2 removed at
            the clipped offset (a tiny response must not "explain" a residual with 30 dex).

    Returns:
        dicts with element, offset_dex, clipped, delta_chi2, share, n_pix (pixels it dominates),
        chi2_pixels; elements with no response at all are left out; largest delta_chi2 first.
    """
    response = np.asarray(response, np.float64)
    mag = np.abs(response)
    dom = np.where(mag.max(axis=0) >= min_response, mag.argmax(axis=0), -1)
    out = []
    for e, name in enumerate(ELEMENTS):
        rr = response[e]
        den = float(np.sum(w * rr * rr))
        if not den > 0:  # no response (or none computed: NaN)
            continue
        num = float(np.sum(w * rr * r))
        offset = float(np.clip(num / den, -max_offset, max_offset))
        gain = 2 * offset * num - offset * offset * den  # chi^2 removed by this offset
        mine = dom == e
        out.append({
            "element": name,
            "offset_dex": offset,
            "clipped": abs(num / den) > max_offset,
            "delta_chi2": gain,
            "share": gain / chi2_total if chi2_total > 0 else 0.0,
            "n_pix": int(mine.sum()),
            "chi2_pixels": float(np.sum(w[mine] * r[mine] ** 2)),
        })  # fmt: skip
    out.sort(key=lambda d: -d["delta_chi2"])
    return out


def explain_spectrum(
    flux: np.ndarray,
    ivar: np.ndarray,
    ref: np.ndarray,
    ref_ivar: np.ndarray | None,
    wavelength: np.ndarray,
    lines: LineList,
    *,
    response: np.ndarray | None = None,
    threshold: float = 4.0,
    max_features: int = 10,
    tol_pix: float = 2.0,
    line_strength: np.ndarray | None = None,
) -> Explanation:
    """Explain one spectrum (n_pix,) against its reference (see the module doc).

    Each feature dict: ``feature`` (1 = largest chi^2), ``wavelength`` (peak pixel,
    Angstrom), ``wl_lo``, ``wl_hi``, ``n_pix``, ``depth`` (residual flux at the peak),
    ``z_peak``, ``chi2``, ``line`` (label or ""), ``line_wavelength`` (NaN if none),
    ``element`` (of the line, or ""), ``response_element`` (element moving the feature's
    pixels most, "" without a response map or where none moves them), ``kind``
    (``absorption``: deeper than the reference; ``weaker``: shallower; ``emission``:
    above the continuum beyond 3 sigma, which no weakened line gives: a spike, sky or
    emission line; its ``line`` is then only what lies nearby).  ``line_strength``
    (n_lines,): see :func:`identify_line` (:func:`line_strengths` gives it)."""
    wl = np.asarray(wavelength, np.float64)
    r, z, w = standardized_residual(flux, ivar, ref, ref_ivar)
    chi2 = float(np.sum(z * z))
    ex = Explanation(chi2=chi2, n_good=int(np.count_nonzero(w > 0)))
    width = np.gradient(wl) if wl.size > 1 else np.ones(1)
    seg = _segments(wl)
    for k, (lo, hi, peak) in enumerate(find_features(z, wl, threshold)[:max_features]):
        # pixel width within the chip (np.gradient spans the gap at a chip edge)
        same = [j for j in (peak - 1, peak + 1) if 0 <= j < wl.size and seg[j] == seg[peak]]
        pw = min(abs(wl[j] - wl[peak]) for j in same) if same else float(width[peak])
        line, line_wl, element = identify_line(float(wl[peak]), pw, lines, tol_pix, line_strength)
        kind = _kind(float(r[peak]), float(np.asarray(ref)[peak]), float(w[peak]))
        ex.features.append({
            "feature": k + 1, "wavelength": float(wl[peak]), "wl_lo": float(wl[lo]),
            "wl_hi": float(wl[hi]), "n_pix": hi - lo + 1, "depth": float(r[peak]),
            "z_peak": float(z[peak]), "chi2": float(np.sum(z[lo : hi + 1] ** 2)),
            "line": line, "line_wavelength": line_wl, "element": element,
            "response_element": _dominant(response, lo, hi), "kind": kind,
        })  # fmt: skip
    if response is not None:
        ex.elements = element_totals(r, w, response, chi2)
    return ex


def _kind(r: float, ref: float, w: float) -> str:
    """``absorption`` (more than the reference), ``weaker`` (a shallower line), or
    ``emission``: above the continuum (1) by more than 3 sigma, which no weakened line
    can give (a spike, a sky or emission line)."""
    if r < 0:
        return "absorption"
    sigma = 1.0 / np.sqrt(w) if w > 0 else np.inf
    return "emission" if ref + r > 1.0 + 3 * sigma else "weaker"


def _dominant(response: np.ndarray | None, lo: int, hi: int, floor: float = 0.01) -> str:
    """Element with the largest summed |response| over pixels lo..hi ("" if none >= floor)."""
    if response is None:
        return ""
    mag = np.abs(np.asarray(response)[:, lo : hi + 1]).sum(axis=1)
    e = int(np.argmax(mag))
    return ELEMENTS[e] if mag[e] >= floor else ""


_FEATURE_TYPES = {
    "feature": pa.int32(), "wavelength": pa.float64(), "wl_lo": pa.float64(),
    "wl_hi": pa.float64(), "n_pix": pa.int32(), "depth": pa.float64(), "z_peak": pa.float64(),
    "chi2": pa.float64(), "line": pa.string(), "line_wavelength": pa.float64(),
    "element": pa.string(), "response_element": pa.string(), "kind": pa.string(),
}  # fmt: skip
_ELEMENT_TYPES = {
    "element": pa.string(), "offset_dex": pa.float64(), "clipped": pa.bool_(),
    "delta_chi2": pa.float64(),
    "share": pa.float64(), "n_pix": pa.int32(), "chi2_pixels": pa.float64(),
}  # fmt: skip


def explanation_tables(
    ranks: list[int], ids: list[str], explanations: list[Explanation]
) -> tuple[pa.Table, pa.Table, dict[str, list]]:
    """Long tables of many explanations and the per-star summary columns.

    Returns:
        (features: one row per feature with ``rank``, ``id`` first; elements: one row per
        (star, element) with ``rank``, ``id`` first; summary: columns for the outlier
        table, ``explanation`` (str), ``resid_chi2_per_pix``, ``n_features``,
        ``top_feature_wl``, ``top_feature_line``, ``top_element``, ``top_element_share``,
        ``top_element_offset``), all in the order of ``ranks``."""
    feats: dict[str, list] = {"rank": [], "id": [], **{k: [] for k in _FEATURE_TYPES}}
    elems: dict[str, list] = {"rank": [], "id": [], **{k: [] for k in _ELEMENT_TYPES}}
    summ: dict[str, list] = {k: [] for k in SUMMARY_COLUMNS}
    for rank, sid, ex in zip(ranks, ids, explanations, strict=True):
        for rows, out in ((ex.features, feats), (ex.elements, elems)):
            for row in rows:
                out["rank"].append(int(rank))
                out["id"].append(str(sid))
                for k in out:
                    if k not in ("rank", "id"):
                        out[k].append(row[k])
        f0 = ex.features[0] if ex.features else {}
        e0 = ex.elements[0] if ex.elements else {}
        vals = (ex.summary(), ex.chi2_per_pixel, len(ex.features), f0.get("wavelength"),
                f0.get("line") or f0.get("response_element") or "", e0.get("element", ""),
                e0.get("share"), e0.get("offset_dex"))  # fmt: skip
        for k, v in zip(summ, vals, strict=True):
            summ[k].append(v)
    key = {"rank": pa.int64(), "id": pa.string()}
    ft = pa.table({k: pa.array(v, type={**key, **_FEATURE_TYPES}[k]) for k, v in feats.items()})
    et = pa.table({k: pa.array(v, type={**key, **_ELEMENT_TYPES}[k]) for k, v in elems.items()})
    return ft, et, summ


def _simulated_teff(teff: np.ndarray) -> np.ndarray:
    """Where the simulator's line physics is used (2,500-10,000 K; outside it, e.g. a Teff
    in kK, its Boltzmann factors overflow): no response map or line strength elsewhere."""
    return (teff >= 2500.0) & (teff <= 10_000.0)


def response_maps(grid: dict, labels: np.ndarray) -> np.ndarray | None:
    """The simulator's element-response maps (n, 19, n_pix) at ``labels`` (n, 3) (Teff,
    log g, [Fe/H]; solar-scaled abundances, vmacro 6 km/s), or None where the simulator
    cannot make spectra on ``grid`` (a ``Grid.describe()`` dict): only on the named grids
    (paper, aspcap, apstar) with the same hash.  Rows with a non-finite label are NaN."""
    from mendis_ray.spectra.grid import GRID_NAMES, get_grid
    from mendis_ray.spectra.simulate import Simulator, StellarLabels, element_response

    name = grid.get("name")
    if name not in GRID_NAMES or get_grid(name).hash != grid.get("hash"):
        return None
    labels = np.asarray(labels, np.float64).reshape(-1, 3)
    out = np.full((len(labels), len(ELEMENTS), int(grid["n_pix"])), np.nan)
    ok = np.flatnonzero(np.all(np.isfinite(labels), axis=1) & _simulated_teff(labels[:, 0]))
    if ok.size:
        lab = labels[ok]
        stars = StellarLabels(
            lab[:, 0], lab[:, 1], np.repeat(lab[:, 2:3], len(ELEMENTS), axis=1),
            np.full(len(ok), 6.0), np.zeros(len(ok)),
        )  # fmt: skip
        out[ok] = element_response(Simulator(grid=get_grid(name)), stars)
    return out


def line_strengths(lines: LineList, labels: np.ndarray) -> np.ndarray | None:
    """log10 central optical depth (n_lines,) of every line at ``labels`` (Teff, log g,
    [Fe/H]; solar-scaled abundances), or None where a label is not finite."""
    from mendis_ray.spectra.linelist import log_tau0

    lab = np.asarray(labels, np.float64).reshape(3)
    if not np.all(np.isfinite(lab)) or not _simulated_teff(lab[0]):
        return None
    x_h = np.full((1, len(ELEMENTS)), lab[2])
    return log_tau0(lines, lab[:1], lab[1:2], x_h)[0][0]


def explain_outliers(
    flux: np.ndarray,
    ivar: np.ndarray,
    ref_flux: np.ndarray,
    ref_ivar: np.ndarray,
    labels: np.ndarray,
    wavelength: np.ndarray,
    grid: dict | None = None,
    **kwargs: object,
) -> list[Explanation]:
    """Explanations of n spectra (n, n_pix) against their references (n, n_pix; a row of
    NaN where a spectrum has none: an empty explanation), with the response maps and
    line strengths at ``labels`` (n, 3) where ``grid`` (``Grid.describe()``) is one the
    simulator makes.  ``kwargs`` go to :func:`explain_spectrum`."""
    from mendis_ray.spectra.linelist import default_linelist

    lines = default_linelist()
    labels = np.asarray(labels, np.float64).reshape(-1, 3)
    maps = response_maps(grid, labels) if grid else None
    out = []
    for k in range(len(flux)):
        if not np.isfinite(ref_flux[k]).any():
            out.append(Explanation(chi2=float("nan"), n_good=0))
            continue
        resp = None if maps is None or np.isnan(maps[k]).all() else maps[k]
        out.append(explain_spectrum(
            flux[k], ivar[k], ref_flux[k], ref_ivar[k], wavelength, lines, response=resp,
            line_strength=line_strengths(lines, labels[k]), **kwargs,
        ))  # fmt: skip
    return out
