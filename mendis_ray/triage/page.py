"""The triage page of a scored catalog: one self-contained HTML file.

Data come from the scored folder (``mendis score`` writes them): ``top_outliers.parquet``
(ranked rows and their explanation summary), ``triage_spectra.parquet`` (each explained
star's flux and its nearest typical spectrum, wavelengths in the metadata),
``explain_features.parquet`` / ``explain_elements.parquet`` (:mod:`mendis_ray.science.explain`),
``summary.json`` and ``verdicts.parquet``.  :func:`render_page` inlines them as JSON
(escaped so no catalog text can close the script) with the page's JavaScript and CSS from
``static/``: nothing is fetched, so the page opens from disk with no internet.

``api``: the URL the page POSTs verdicts to (``/triage/verdicts`` when Serve serves it);
without one (the static ``triage.html``) verdicts are kept in the browser's local storage
and offered as a ``verdicts.json`` download (see :mod:`mendis_ray.triage.verdicts`).
"""

from __future__ import annotations

import json
import math
import os
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mendis_ray.atomic import write_atomic
from mendis_ray.triage.verdicts import VERDICTS, VERDICTS_FILE, read_verdicts

__all__ = ["SPECTRA_FILE", "load_triage", "render_page", "write_page", "write_triage_spectra"]

SPECTRA_FILE = "triage_spectra.parquet"
_WAVE_KEY = b"mendis_ray.triage.wavelength"
_XLABEL_KEY = b"mendis_ray.triage.xlabel"
#: Columns shown first for each star (the rest under "all columns").
_MAIN = ("percentile", "score", "log_p_per_dim", "signal_percentile", "residual_percentile",
         "flag_names", "teff_used", "logg_used", "feh_used", "snr", "apogee_id", "telescope",
         "field")  # fmt: skip


def write_triage_spectra(
    path: str | os.PathLike,
    top: pa.Table,
    flux: np.ndarray,
    ivar: np.ndarray,
    ref_ids: list[str | None],
    ref_flux: np.ndarray,
    ref_ivar: np.ndarray,
    wavelength: np.ndarray,
    xlabel: str,
) -> Path:
    """Write the page's spectra: per row of ``top`` (``rank``, ``id``) its flux/ivar
    (n, n_pix) and those of its reference (``ref_ids``; None where there is none),
    atomically."""
    n_pix = flux.shape[1]

    def lists(a: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(a.astype(np.float32).ravel()), n_pix)

    t = pa.table({
        "rank": top.column("rank"), "id": top.column("id").cast(pa.string()),
        "ref_id": pa.array(ref_ids, pa.string()), "flux": lists(flux), "ivar": lists(ivar),
        "ref_flux": lists(ref_flux), "ref_ivar": lists(ref_ivar),
    })  # fmt: skip
    meta = {_WAVE_KEY: np.asarray(wavelength, "<f8").tobytes(), _XLABEL_KEY: xlabel.encode()}
    t = t.replace_schema_metadata(meta)
    return write_atomic(Path(path), lambda tmp: pq.write_table(t, tmp))


def _good(flux: np.ndarray, ivar: np.ndarray, digits: int = 4) -> list:
    """Flux rounded for the page, None at bad pixels (ivar <= 0 or not finite)."""
    ok = (ivar > 0) & np.isfinite(ivar) & np.isfinite(flux)
    return [round(float(f), digits) if g else None for f, g in zip(flux, ok, strict=True)]


def _jsonable(v: object) -> object:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if v is None or isinstance(v, bool | int | float | str):
        return v
    return str(v)


def _rows_by(table: pa.Table | None, key: str = "id") -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in [] if table is None else table.to_pylist():
        out.setdefault(str(row[key]), []).append({k: _jsonable(v) for k, v in row.items()})
    return out


def _read(path: Path) -> pa.Table | None:
    return pq.read_table(path) if path.exists() else None


def load_triage(out_dir: str | os.PathLike, folder: str | os.PathLike | None = None) -> dict:
    """The page's data from a scored catalog folder (``folder``: the folder the page is
    for, its name and its verdicts, where ``out_dir`` stages its outputs; default
    ``out_dir``).

    Raises:
        FileNotFoundError naming the missing file (the folder was not scored with a
        version that writes the triage data)."""
    out = Path(out_dir)
    need = [out / "top_outliers.parquet", out / SPECTRA_FILE]
    missing = [str(p) for p in need if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{out}: not a scored catalog folder ({', '.join(missing)} missing;"
                                " run `mendis score ... --out` on it)")  # fmt: skip
    top = pq.read_table(need[0])
    spec = pq.read_table(need[1])
    meta = spec.schema.metadata or {}
    wl = np.frombuffer(meta.get(_WAVE_KEY, b""), "<f8")
    feats = _rows_by(_read(out / "explain_features.parquet"))
    elems = _rows_by(_read(out / "explain_elements.parquet"))
    rows = {str(r["id"]): r for r in top.to_pylist()}
    stars = []
    for s in spec.to_pylist():
        sid = str(s["id"])
        row = {k: _jsonable(v) for k, v in rows.get(sid, {}).items()}
        flux, ivar = np.asarray(s["flux"], np.float64), np.asarray(s["ivar"], np.float64)
        ref, ref_ivar = np.asarray(s["ref_flux"], np.float64), np.asarray(s["ref_ivar"], np.float64)
        stars.append({
            "rank": int(s["rank"]), "id": sid, "ref_id": s["ref_id"],
            "main": {k: row[k] for k in _MAIN if k in row},
            "row": row, "explanation": row.get("explanation") or "",
            "flux": _good(flux, ivar), "ref": _good(ref, ref_ivar) if s["ref_id"] else None,
            "features": feats.get(sid, []), "elements": elems.get(sid, []),
        })  # fmt: skip
    summary = {}
    if (out / "summary.json").exists():
        summary = json.loads((out / "summary.json").read_text())
    shown = out if folder is None else Path(folder)
    return {
        "title": f"mendis triage: {shown.resolve().name}",
        "catalog": str(shown.resolve()),
        "checkpoint": summary.get("checkpoint", ""),
        "rows": summary.get("rows"),
        "rank_by": summary.get("rank_by", ""),
        "xlabel": meta.get(_XLABEL_KEY, b"wavelength (Angstrom)").decode(),
        "wavelength": [round(float(x), 3) for x in wl],
        "stars": stars,
        "verdict_names": list(VERDICTS),
        "verdicts": read_verdicts(shown / VERDICTS_FILE),
    }


def _asset(name: str) -> str:
    return resources.files("mendis_ray.triage").joinpath("static", name).read_text()


def _script_json(obj: object) -> str:
    """JSON safe inside a <script> element: no '<', '>' or '&' survive as such."""
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_page(data: dict, api: str | None = None) -> str:
    """The self-contained HTML page (``api``: where verdicts are POSTed, or None)."""
    import html

    parts = {
        "TITLE": html.escape(data.get("title", "mendis triage")),
        "CSS": _asset("triage.css"),
        "API": html.escape(api or "", quote=True),
        "DATA": _script_json(data),
        "JS": _asset("triage.js"),
    }
    # one pass: text put in never gets its own {{...}} replaced
    return re.sub(r"\{\{(TITLE|CSS|API|DATA|JS)\}\}", lambda m: parts[m[1]], _asset("triage.html"))


def write_page(
    out_dir: str | os.PathLike, path: str | os.PathLike | None = None,
    folder: str | os.PathLike | None = None,
) -> Path:  # fmt: skip
    """Write the static page of a scored folder (default ``out_dir/triage.html``;
    ``folder``: :func:`load_triage`'s)."""
    text = render_page(load_triage(out_dir, folder))
    path = Path(path) if path else Path(out_dir) / "triage.html"
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
