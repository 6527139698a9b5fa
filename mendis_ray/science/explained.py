"""The explained outlier outputs of a scored catalog (no Ray): what ``mendis score``
writes beside ``scores/`` once it has ranked the spectra.

:func:`explain_top` explains the top outliers against their nearest typical spectra
(:mod:`mendis_ray.science.explain`) and adds the summary columns to the outlier table;
:func:`add_verdicts` carries the triage verdicts (:mod:`mendis_ray.triage.verdicts`) into
any table by id; :func:`write_outputs` writes, atomically::

    top_outliers.{parquet,csv,fits}      ranked rows + explanation summary + verdict
                                         (FITS: HDU1 TOP_OUTLIERS, HDU2 FEATURES,
                                         HDU3 ELEMENTS)
    explain_features.{parquet,csv}       one row per feature (rank, id, wavelength, depth,
                                         z, line, element, ...)
    explain_elements.{parquet,csv}       one row per (star, element)
    triage_spectra.parquet               the explained spectra and their references (page)
    scores.fits                          every spectrum, one row each (allStar-like)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from mendis_ray.atomic import write_csv_atomic, write_table_atomic
from mendis_ray.science.explain import explain_outliers, explanation_tables
from mendis_ray.scores_fits import flag_header_cards, write_fits_tables

__all__ = ["ExplainedTop", "add_verdicts", "explain_top", "header_cards", "write_outputs"]

_USED = ("teff_used", "logg_used", "feh_used")


class ExplainedTop:
    """The explained outlier table and what the page needs (see :func:`explain_top`)."""

    def __init__(self, top, features, elements, ref_ids, ref_flux, ref_ivar, flux, ivar):
        self.top, self.features, self.elements = top, features, elements
        self.ref_ids, self.ref_flux, self.ref_ivar = ref_ids, ref_flux, ref_ivar
        self.flux, self.ivar = flux, ivar


def _labels(top: pa.Table) -> np.ndarray:
    """(n, 3) labels used by the score (NaN where absent)."""
    cols = [
        np.asarray(top.column(c).to_numpy(zero_copy_only=False), np.float64)
        if c in top.column_names else np.full(top.num_rows, np.nan)
        for c in _USED
    ]  # fmt: skip
    return np.stack(cols, axis=1)


def explain_top(
    top: pa.Table,
    flux: np.ndarray,
    ivar: np.ndarray,
    typical_ids: Sequence[str],
    typ_flux: np.ndarray,
    typ_ivar: np.ndarray,
    nearest: np.ndarray,
    wavelength: np.ndarray,
    grid: dict | None,
) -> ExplainedTop:
    """Explain the rows of ``top`` (n, with ``rank``, ``id``, ``*_used``): spectra
    ``flux``/``ivar`` (n, n_pix) against the typical spectra (m, n_pix) at ``nearest``
    (n,) (-1: none); the table gets the summary columns of
    :func:`~mendis_ray.science.explain.explanation_tables` and ``ref_id`` (the typical
    spectrum compared with)."""
    n, n_pix = flux.shape
    has = np.asarray(nearest) >= 0
    ref_flux = np.full((n, n_pix), np.nan, np.float32)
    ref_ivar = np.zeros((n, n_pix), np.float32)
    ref_flux[has] = typ_flux[nearest[has]]
    ref_ivar[has] = typ_ivar[nearest[has]]
    ref_ids = [str(typical_ids[j]) if j >= 0 else None for j in nearest]
    exs = explain_outliers(flux, ivar, ref_flux, ref_ivar, _labels(top), wavelength, grid)
    ranks = top.column("rank").to_pylist()
    ids = [str(i) for i in top.column("id").to_pylist()]
    features, elements, summary = explanation_tables(ranks, ids, exs)
    out = top
    for name, values in {"ref_id": ref_ids, **summary}.items():
        out = _set_column(out, name, pa.array(values))
    return ExplainedTop(out, features, elements, ref_ids, ref_flux, ref_ivar, flux, ivar)


def _set_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


def add_verdicts(table: pa.Table, verdicts: Mapping[str, dict]) -> pa.Table:
    """``table`` with ``verdict`` and ``verdict_note`` columns (null where an id has no
    verdict) from the verdicts by id."""
    ids = [str(i) for i in table.column("id").to_pylist()]
    got = [verdicts.get(i) for i in ids]
    table = _set_column(table, "verdict", pa.array([v and v["verdict"] for v in got], pa.string()))
    notes = [v and v.get("note", "") for v in got]
    return _set_column(table, "verdict_note", pa.array(notes, pa.string()))


def header_cards(summary: Mapping) -> list[tuple[str, object, str]]:
    """FITS header cards of a run: checkpoint, grid, ranking, rows, flag bits."""
    from mendis_ray import __version__

    grid = summary.get("grid", {})
    cards = [
        ("CHECKPT", str(summary.get("checkpoint", "")), "checkpoint that scored the catalog"),
        ("GRID", str(grid.get("name", "")), "pixel grid of the spectra"),
        ("GRIDHASH", str(grid.get("hash", "")), "grid hash"),
        ("NPIX", int(grid.get("n_pix", 0)), "pixels per spectrum"),
        ("RANKBY", str(summary.get("rank_by", "")), "ranking: percentile or signal"),
        ("NSPEC", int(summary.get("rows", 0)), "spectra scored"),
        ("MENDISV", __version__, "mendis_ray version"),
    ]
    return [*cards, *flag_header_cards()]


def _write_table(table: pa.Table, stem: Path) -> None:
    write_table_atomic(table, stem.with_suffix(".parquet"))
    write_csv_atomic(table, stem.with_suffix(".csv"))


def write_outputs(
    out: str | os.PathLike,
    ex: ExplainedTop,
    scores: pa.Table,
    wavelength: np.ndarray,
    xlabel: str,
    summary: Mapping,
    verdicts: Mapping[str, dict],
) -> dict[str, str]:
    """Write every explained output (module doc) into ``out``; returns their paths."""
    from mendis_ray.triage.page import SPECTRA_FILE, write_triage_spectra

    out = Path(out)
    cards = header_cards(summary)
    top = add_verdicts(ex.top, verdicts)
    _write_table(top, out / "top_outliers")
    _write_table(ex.features, out / "explain_features")
    _write_table(ex.elements, out / "explain_elements")
    write_fits_tables(out / "top_outliers.fits", {
        "TOP_OUTLIERS": top, "FEATURES": ex.features, "ELEMENTS": ex.elements}, cards)  # fmt: skip
    write_triage_spectra(out / SPECTRA_FILE, ex.top, ex.flux, ex.ivar, ex.ref_ids,
                         ex.ref_flux, ex.ref_ivar, wavelength, xlabel)  # fmt: skip
    write_fits_tables(out / "scores.fits", {"SCORES": add_verdicts(scores, verdicts)}, cards)
    names = ("top_outliers.parquet", "top_outliers.csv", "top_outliers.fits",
             "explain_features.csv", "explain_elements.csv", SPECTRA_FILE,
             "scores.fits")  # fmt: skip
    return {n: str(out / n) for n in names}
