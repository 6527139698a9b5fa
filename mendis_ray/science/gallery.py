"""The outlier gallery: each outlier's spectrum over its nearest typical spectrum, with
the residual below (pure numpy/pyarrow/matplotlib; no Ray).

**Typical neighbour.**  Each outlier is compared with the most similar of a set of typical
spectra (the catalog's most typical unflagged rows, see
:func:`~mendis_ray.science.ranking.typical_rows`): the one with the smallest mean squared
flux difference over the pixels good (ivar > 0) in both spectra.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mendis_ray.atomic import save_figure_atomic
from mendis_ray.science.explained import ExplainedTop, explain_top
from mendis_ray.science.ranking import USED_COLUMNS
from mendis_ray.spectra.plain import column_map, known_grid, matrices, normalize_columns

__all__ = [
    "ShardSpectra",
    "explain_against_typical",
    "fmt",
    "make_gallery",
    "nearest_typical",
    "plot_gallery",
    "read_spectra",
    "shard_wavelength",
]


def read_spectra(rows: pa.Table, files: Sequence[Path], n_pix: int) -> tuple[np.ndarray, ...]:
    """(flux, ivar) (n, n_pix) of the rows (``id``, ``path``) of a scores table, read from
    their shards; NaN rows where a spectrum is not found."""
    by_path: dict[str, list[int]] = {}
    for k, p in enumerate(rows.column("path").to_pylist()):
        by_path.setdefault(p, []).append(k)
    resolved = {str(Path(f).resolve()): Path(f) for f in files}
    ids = rows.column("id").to_pylist()
    flux = np.full((rows.num_rows, n_pix), np.nan, np.float32)
    ivar = np.zeros((rows.num_rows, n_pix), np.float32)
    for p, ks in by_path.items():
        f = resolved.get(str(Path(p).resolve()), Path(p))
        have = column_map(pq.read_schema(f).names)  # a plain file's names for the columns
        t = pq.read_table(f, columns=[have[c] for c in ("id", "flux", "ivar")])
        t = normalize_columns(t, str(f), warn=False)  # ids as text, as the scores hold them
        keep = pc.is_in(t.column("id"), value_set=pa.array([str(ids[k]) for k in ks]))
        t = t.filter(keep)
        where = {i: j for j, i in enumerate(t.column("id").to_pylist())}
        _, fl, iv = matrices(t, n_pix, str(f))  # null rows, NaN marks: masked pixels
        fl = np.where(np.isfinite(fl) & np.isfinite(iv), fl, np.nan)  # the scorer's bad pixels
        iv = np.where(np.isfinite(fl), iv, 0)
        for k in ks:
            j = where.get(ids[k])
            if j is not None:
                flux[k], ivar[k] = fl[j], iv[j]
    return flux, ivar


@dataclass(frozen=True)
class ShardSpectra:
    """The spectra of some score rows, read from their shards once (one read per shard
    that holds any of them) and looked up by (``path``, ``id``) as often as needed: the
    explanations and the gallery of a catalog run need the same top and typical rows, and
    each read of a shard decompresses its whole flux and ivar columns."""

    index: dict[tuple[str, str], int]
    flux: np.ndarray  # (m, n_pix)
    ivar: np.ndarray  # (m, n_pix)

    @classmethod
    def read(cls, tables: Sequence[pa.Table], files: Sequence[Path], n_pix: int) -> ShardSpectra:
        """The spectra of every row (``id``, ``path``) of ``tables``."""
        ids = [i for t in tables for i in t.column("id").to_pylist()]
        paths = [p for t in tables for p in t.column("path").to_pylist()]
        flux, ivar = read_spectra(pa.table({"id": ids, "path": paths}), files, n_pix)
        index = {(str(p), str(i)): k for k, (p, i) in enumerate(zip(paths, ids, strict=True))}
        return cls(index, flux, ivar)

    def of(self, rows: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """(flux, ivar) (n, n_pix) of ``rows`` (``id``, ``path``); as :func:`read_spectra`,
        NaN flux and ivar 0 where a row was not read or not found."""
        ids, paths = rows.column("id").to_pylist(), rows.column("path").to_pylist()
        keys = zip(map(str, paths), map(str, ids), strict=True)
        at = np.array([self.index.get(key, -1) for key in keys], np.int64)
        n_pix = self.flux.shape[1]
        flux = np.full((len(at), n_pix), np.nan, np.float32)
        ivar = np.zeros((len(at), n_pix), np.float32)
        found = at >= 0
        flux[found], ivar[found] = self.flux[at[found]], self.ivar[at[found]]
        return flux, ivar


def nearest_typical(
    flux: np.ndarray, ivar: np.ndarray, typ_flux: np.ndarray, typ_ivar: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each spectrum (n, n_pix) the index of the closest of ``m`` typical spectra
    (m, n_pix): smallest mean squared flux difference over pixels good in both.

    Returns:
        (index (n,) int, mean squared difference (n,)); index -1 where none compares."""
    idx = np.full(len(flux), -1, np.int64)
    dist = np.full(len(flux), np.nan)
    if len(typ_flux) == 0:
        return idx, dist
    tgood = (typ_ivar > 0) & np.isfinite(typ_flux)
    for k in range(len(flux)):
        good = tgood & ((ivar[k] > 0) & np.isfinite(flux[k]))[None, :]  # (m, n_pix)
        diff = np.where(good, typ_flux - flux[k], 0.0)
        cnt = good.sum(axis=1)
        d = np.where(cnt > 0, (diff * diff).sum(axis=1) / np.maximum(cnt, 1), np.inf)
        if np.isfinite(d).any():
            idx[k] = int(np.argmin(d))
            dist[k] = float(d[idx[k]])
    return idx, dist


def shard_wavelength(files: Sequence[Path], n_pix: int) -> tuple[np.ndarray, str]:
    """Pixel wavelengths from the first shard's metadata (a plain file's: the known grid of
    ``n_pix`` pixels), else the pixel index."""
    from mendis_ray.spectra.shards import WAVE_KEY

    for f in files[:1]:
        kv = pq.read_schema(f).metadata or {}
        grid = known_grid(n_pix)
        wl = np.frombuffer(kv[WAVE_KEY], dtype="<f8") if WAVE_KEY in kv else None
        wl = grid.wavelength if wl is None and grid is not None else wl
        if wl is not None and wl.size == n_pix:
            return wl, "wavelength (Angstrom, vacuum)"
    return np.arange(n_pix, dtype=np.float64), "pixel"


def _masked(x: np.ndarray, good: np.ndarray, wl: np.ndarray) -> np.ndarray:
    """Float copy of ``x`` with NaN at bad pixels and after chip gaps (no line across)."""
    y = np.where(good, x, np.nan).astype(np.float64)
    step = np.diff(wl)
    if step.size:
        y[1:][step > 3 * np.median(step)] = np.nan
    return y


def _title(row: dict, neighbour: str) -> str:
    flags = row.get("flag_names") or "none"
    used = [row.get(c) for c in USED_COLUMNS]
    lab = ""
    if all(v is not None and np.isfinite(v) for v in used):
        lab = f"  Teff {used[0]:.0f} logg {used[1]:.2f} [Fe/H] {used[2]:+.2f}"
    if "score" in row:  # signal-space checkpoint: log tail probabilities
        scores = (f"{row.get('strongest_test')}, signal pct "
                  f"{fmt(row.get('signal_percentile'), '.1f')}, residual pct "
                  f"{fmt(row.get('residual_percentile'), '.1f')}, chi2/dof "
                  f"{fmt(row.get('chi2_dof'), '.2f')}")  # fmt: skip
    else:
        scores = (f"log p/dim {fmt(row.get('log_p_per_dim'), '.3f')}, signal pct "
                  f"{fmt(row.get('signal_percentile'), '.1f')}, log ratio gauss "
                  f"{fmt(row.get('log_ratio_gaussian'), '.1f')}")  # fmt: skip
    why = f"\nwhy: {row['explanation']}" if row.get("explanation") else ""
    return (
        f"#{row['rank']} {row['id']}: percentile {fmt(row.get('percentile'), '.1f')}, "
        f"{scores}, flags {flags}\n{lab.strip()}{'; ' if lab else ''}{neighbour}{why}"
    )


def fmt(v: object, spec: str) -> str:
    """``format(v, spec)`` (an unscorable row's -inf prints as ``-inf``), or ``"nan"``
    for None and NaN."""
    return "nan" if v is None or np.isnan(float(v)) else format(float(v), spec)


def _panel(ax, res, wavelength, flux, ivar, typ_flux, typ_ivar, j: int) -> bool:
    """Draw one outlier (``flux``/``ivar`` (n_pix,)) and, where ``j >= 0``, the typical
    spectrum ``j`` over it and their residual; True where the neighbour was drawn."""
    good = (ivar > 0) & np.isfinite(flux)
    ax.plot(wavelength, _masked(flux, good, wavelength), "k-", lw=0.5, label="outlier")
    if j >= 0:
        tgood = (typ_ivar[j] > 0) & np.isfinite(typ_flux[j])
        ax.plot(
            wavelength, _masked(typ_flux[j], tgood, wavelength), "-", color="tab:orange",
            lw=0.5, alpha=0.85, label="nearest typical",
        )  # fmt: skip
        r = _masked(flux - typ_flux[j], good & tgood, wavelength)
        res.plot(wavelength, r, "-", color="tab:blue", lw=0.5)
    res.axhline(0.0, color="0.5", lw=0.5)
    ax.legend(loc="lower left", fontsize=7, framealpha=0.8)
    ax.set_ylabel("flux", fontsize=8)
    res.set_ylabel("resid.", fontsize=8)
    ax.tick_params(labelbottom=False, labelsize=7)
    res.tick_params(labelsize=7)
    return j >= 0


def _neighbour_text(typical: pa.Table, j: int, dist: float) -> str:
    """The title's second half: which typical spectrum is drawn, and how far it is."""
    if j < 0:
        return "no typical spectrum to compare"
    tid = typical.column("id")[j].as_py()
    pct = typical.column("percentile")[j].as_py()
    return (
        f"nearest typical (orange): {tid}, percentile {fmt(pct, '.0f')}, "
        f"rms flux difference {np.sqrt(dist):.3f}"
    )


def plot_gallery(
    top: pa.Table,
    flux: np.ndarray,
    ivar: np.ndarray,
    typical: pa.Table,
    typ_flux: np.ndarray,
    typ_ivar: np.ndarray,
    wavelength: np.ndarray,
    path: str | os.PathLike,
    *,
    xlabel: str = "wavelength (Angstrom)",
) -> Path:
    """PNG of the ``top`` rows (n, with ``rank``, ``id``, scores): each spectrum
    (``flux``/``ivar`` (n, n_pix)) over its nearest typical spectrum (``typ_flux``/
    ``typ_ivar`` (m, n_pix) of the ``typical`` rows, which need ``id`` and
    ``percentile``), and the residual below.  Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = top.num_rows
    nn, dist = nearest_typical(flux, ivar, typ_flux, typ_ivar)
    rows = top.to_pylist()
    m = max(n, 1)
    fig = plt.figure(figsize=(13, 3.6 * m))
    # per spectrum: flux (2), residual (1), spacer for the next (three-line) title (1.0)
    gs = fig.add_gridspec(3 * m, 1, height_ratios=[2.0, 1.0, 1.0] * m, hspace=0.0)
    for k in range(n):
        ax = fig.add_subplot(gs[3 * k, 0])
        res = fig.add_subplot(gs[3 * k + 1, 0], sharex=ax)
        neighbour = _neighbour_text(typical, int(nn[k]), dist[k])
        if not _panel(ax, res, wavelength, flux[k], ivar[k], typ_flux, typ_ivar, int(nn[k])):
            res.text(0.5, 0.5, neighbour, transform=res.transAxes, ha="center", va="center",
                     fontsize=8)  # fmt: skip
        ax.set_title(_title(rows[k], neighbour), fontsize=8, loc="left")
        if k == n - 1:
            res.set_xlabel(xlabel, fontsize=8)
    if n == 0:
        fig.text(0.5, 0.5, "no outliers to show", ha="center")
    fig.subplots_adjust(left=0.06, right=0.99, top=1 - 0.6 / (3.6 * m), bottom=0.0)
    try:
        return save_figure_atomic(fig, path, dpi=80)
    finally:
        plt.close(fig)


def _spectra(top, typical, files, n_pix, spectra: ShardSpectra | None) -> tuple[np.ndarray, ...]:
    """(flux, ivar, typical flux, typical ivar) of the ``top`` and ``typical`` rows: from
    ``spectra`` where given, else read from the shards in one pass."""
    spectra = spectra or ShardSpectra.read([top, typical], files, n_pix)
    return (*spectra.of(top), *spectra.of(typical))


def explain_against_typical(
    top: pa.Table, typical: pa.Table, files: Sequence[Path], n_pix: int, grid: dict,
    spectra: ShardSpectra | None = None,
) -> ExplainedTop:  # fmt: skip
    """Explain every ``top`` row against its nearest ``typical`` spectrum (never itself),
    reading both from the shards ``files`` (n_pix pixels on ``grid``), or taking them from
    ``spectra`` (read once for the explanations and the gallery); see
    :func:`~mendis_ray.science.explained.explain_top`."""
    flux, ivar, typ_flux, typ_ivar = _spectra(top, typical, files, n_pix, spectra)
    typ_ids = [str(i) for i in typical.column("id").to_pylist()]
    ids = [str(i) for i in top.column("id").to_pylist()]
    nn = np.full(len(ids), -1, np.int64)
    for k, sid in enumerate(ids):  # a star in the typical set is not its own reference
        keep = np.flatnonzero(np.asarray(typ_ids) != sid) if typ_ids else np.zeros(0, int)
        j, _ = nearest_typical(flux[k : k + 1], ivar[k : k + 1], typ_flux[keep], typ_ivar[keep])
        nn[k] = keep[j[0]] if j[0] >= 0 else -1
    wl, _ = shard_wavelength(files, n_pix)
    return explain_top(top, flux, ivar, typ_ids, typ_flux, typ_ivar, nn, wl, dict(grid))


def make_gallery(
    top: pa.Table, typical: pa.Table, files: Sequence[Path], n_pix: int,
    path: str | os.PathLike, spectra: ShardSpectra | None = None,
) -> Path:  # fmt: skip
    """Read the spectra of the ``top`` and ``typical`` score rows (``id``, ``path``) from
    the shards ``files`` (n_pix pixels), or take them from ``spectra``, and plot the
    gallery to ``path``."""
    flux, ivar, typ_flux, typ_ivar = _spectra(top, typical, files, n_pix, spectra)
    wl, xlabel = shard_wavelength(files, n_pix)
    return plot_gallery(top, flux, ivar, typical, typ_flux, typ_ivar, wl, path, xlabel=xlabel)
