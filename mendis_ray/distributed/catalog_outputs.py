"""The driver-side outputs of a catalog run (no Ray here): ranking, explained outlier
tables, triage page, gallery and ``summary.json``.

:func:`mendis_ray.distributed.infer.score_catalog` writes ``out/scores/`` on its actor
pool, then calls :func:`write_catalog_outputs`, which reads the scores back and writes::

    out/top_outliers.{csv,parquet}   the ``top_n`` most outlying rows, ``rank`` 1 first,
                                     with ``flag_names``, explanations and verdicts
    out/scores.fits, out/top_outliers.fits, out/explain_*.csv   (science.explained)
    out/triage.html                  with ``html`` (an earlier run's is removed otherwise)
    out/gallery.png                  the first ``gallery_n`` outliers beside their nearest
                                     typical spectra (among the ``n_typical`` most typical
                                     unflagged rows), with the residual
    out/summary.json                 rows, seconds, spectra/s, actor pool, files, timings

**Ranking** (``rank_by``, ``flags_first``) is :mod:`mendis_ray.science.ranking`'s, the
gallery and its typical neighbours :mod:`mendis_ray.science.gallery`'s.  Every file is
written under a temporary name and renamed (:mod:`mendis_ray.atomic`); ``score_catalog``
writes them all into a staging folder first and moves them in with
:func:`commit_outputs`, so a run into an earlier run's folder replaces its outputs all
together or not at all.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mendis_ray.atomic import write_json_atomic
from mendis_ray.config import ScoreConfig
from mendis_ray.science.explained import write_outputs
from mendis_ray.science.flags import Flag
from mendis_ray.science.gallery import (
    ShardSpectra,
    explain_against_typical,
    make_gallery,
    shard_wavelength,
)
from mendis_ray.science.ranking import rank_outliers, read_ranking, top_table, typical_rows

__all__ = ["commit_outputs", "write_catalog_outputs"]

log = logging.getLogger(__name__)

#: outputs a run makes only with some settings: an earlier run's is removed by a run that
#: does not make it (it would not match the other outputs)
OPTIONAL_OUTPUTS = ("triage.html", "gallery.png")


def write_catalog_outputs(
    scores_dir: Path, out: Path, shards, cfg: ScoreConfig, *, checkpoint: Path,
    fits_files: list, pool: dict, resources: dict, verdicts: dict, t_start: float,
    timings: dict, final: Path | None = None,
) -> dict:  # fmt: skip
    """Rank the scores in ``scores_dir`` (every row of the checked ``shards``), write the
    outlier tables, triage page and gallery of ``cfg`` into ``out``, then
    ``out/summary.json``; returns the summary (its ``seconds`` counted from ``t_start``;
    ``pool``: the actor pool, ``resources``: the cluster's, ``verdicts``: the stored
    verdicts carried into the tables; ``final``: the folder the outputs are for, where
    ``out`` stages them: the paths the summary and the page record, and the folder of the
    page's verdicts; default ``out``)."""
    final = out if final is None else Path(final)
    run = {"checkpoint": str(checkpoint), "grid": shards.grid, "rank_by": cfg.rank_by,
           "rows": shards.n_rows}  # fmt: skip
    ranking, top, typical, files, spectra = _write_outliers(
        scores_dir, out, shards, cfg, timings, run, verdicts
    )
    gallery = _write_gallery(top, typical, shards, out, cfg.gallery_n, timings, spectra)
    summary = _summary(
        checkpoint, shards, fits_files, out, scores_dir, ranking, top, gallery, resources,
        time.perf_counter() - t_start, timings, files, actors=pool, batch_size=cfg.batch_size,
        marginal=cfg.marginal, rank_by=cfg.rank_by, flags_first=cfg.flags_first,
    )  # fmt: skip
    summary["verdicts"] = len(verdicts)
    if summary["rows"] and summary["unscorable"] == summary["rows"]:
        log.warning(
            "every one of the %d spectra is unscorable (flag unscorable): the checkpoint %s "
            "or the catalog is broken (spectra not continuum-normalized, ivar in other units?)",
            summary["rows"], checkpoint,
        )  # fmt: skip
    summary["files"] = _relocated(summary["files"], out, final)
    write_json_atomic(summary, out / "summary.json")
    if cfg.html:  # after the summary: the page's header shows the run
        from mendis_ray.triage.page import write_page

        write_page(out, folder=final)
    else:
        (out / "triage.html").unlink(missing_ok=True)  # an earlier run's would not match
    return summary


def commit_outputs(stage: Path, out: Path) -> None:
    """Move the outputs written into the folder ``stage`` into ``out``, replacing an
    earlier run's (and removing its ``OPTIONAL_OUTPUTS`` that ``stage`` does not hold).
    Renames only: the earlier outputs are first moved aside into ``out/.run.old-*``
    (``summary.json`` first), then the new ones in (``summary.json`` last); any error or
    Ctrl-C on the way moves them all back.  The earlier outputs are deleted once every new
    one is in place (a folder left by a killed run is removed by the next one)."""
    names = sorted(p.name for p in stage.iterdir() if not p.name.startswith("."))
    new = sorted(names, key=lambda n: n == "summary.json")  # summary.json last
    earlier = {n for n in (*names, *OPTIONAL_OUTPUTS) if os.path.lexists(out / n)}
    earlier = sorted(earlier, key=lambda n: n != "summary.json")  # summary.json first
    old = out / f".run.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    old.mkdir()
    aside, moved = [], []
    try:
        for n in earlier:
            os.replace(out / n, old / n)
            aside.append(n)
        for n in new:
            os.replace(stage / n, out / n)
            moved.append(n)
    except BaseException:
        for n in reversed(moved):
            os.replace(out / n, stage / n)
        for n in reversed(aside):
            os.replace(old / n, out / n)
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


def _relocated(obj, stage: Path, final: Path):
    """``obj`` (str, list or dict of them) with paths under ``stage`` moved to ``final``."""
    if isinstance(obj, dict):
        return {k: _relocated(v, stage, final) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relocated(v, stage, final) for v in obj]
    if isinstance(obj, str) and stage != final:
        p = Path(obj)
        if p == stage or stage in p.parents:
            return str(final / p.relative_to(stage))
    return obj


def _write_outliers(
    scores_dir: Path, out: Path, shards, cfg: ScoreConfig, timings: dict, run: dict,
    verdicts: dict,
) -> tuple[pa.Table, pa.Table, pa.Table, dict, ShardSpectra]:  # fmt: skip
    """Rank the scores, explain the top rows against their nearest typical spectra and
    write the explained outputs (:func:`~mendis_ray.science.explained.write_outputs`:
    ``top_outliers.*`` with explanations and ``verdicts``, ``scores.fits``, ...); the
    files name the triage page too where ``cfg.html`` asks for one (it is written after
    the summary, which it shows).  Returns (ranking columns,
    top table, typical rows, the written files plus ``explained``: their row count, the
    spectra of the top and typical rows, read once from the shards for this and the
    gallery)."""
    t0 = time.perf_counter()
    ranking = read_ranking(scores_dir, cfg.rank_by)
    top_idx = rank_outliers(ranking, rank_by=cfg.rank_by, flags_first=cfg.flags_first)
    top_idx = top_idx[: cfg.top_n]
    top = top_table(scores_dir, ranking, top_idx)
    timings["rank_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    typical_idx = typical_rows(ranking, cfg.n_typical, exclude=top_idx[: cfg.gallery_n])
    typical = ranking.take(pa.array(typical_idx, pa.int64()))
    spectra = ShardSpectra.read([top, typical], shards.files, shards.n_pix)
    explained = explain_against_typical(top, typical, shards.files, shards.n_pix, shards.grid,
                                        spectra)  # fmt: skip
    wl, xlabel = shard_wavelength(shards.files, shards.n_pix)
    files = write_outputs(out, explained, pq.read_table(scores_dir), wl, xlabel, run, verdicts)
    top = pq.read_table(out / "top_outliers.parquet")  # with explanations and verdicts
    timings["explain_s"] = time.perf_counter() - t0
    files |= {"triage_html": str(out / "triage.html") if cfg.html else None}  # written last
    return ranking, top, typical, {**files, "explained": explained.top.num_rows}, spectra


def _write_gallery(
    top: pa.Table, typical: pa.Table, shards, out: Path, gallery_n: int, timings: dict,
    spectra: ShardSpectra | None = None,
) -> Path | None:  # fmt: skip
    """``out/gallery.png`` of the first ``gallery_n`` top rows (or remove an earlier
    run's where none is asked for)."""
    if gallery_n == 0 or not top.num_rows:
        (out / "gallery.png").unlink(missing_ok=True)  # an earlier run's would not match
        return None
    t0 = time.perf_counter()
    gallery = make_gallery(
        top.slice(0, gallery_n), typical, shards.files, shards.n_pix, out / "gallery.png",
        spectra,
    )  # fmt: skip
    timings["gallery_s"] = time.perf_counter() - t0
    return gallery


def _summary(
    checkpoint, shards, fits_files, out, scores_dir, ranking, top, gallery, resources,
    seconds: float, timings: dict, explained_files: dict, **settings,
) -> dict:  # fmt: skip
    """The ``summary.json`` content of a run (``settings``: the pool and ranking options;
    ``explained_files``: the explained outputs' paths, ``explained``: their row count)."""
    explained_files = dict(explained_files)
    n_explained = explained_files.pop("explained")
    return {
        "checkpoint": str(checkpoint),
        "grid": {k: v for k, v in shards.grid.items() if k != "wavelength"},
        "rows": shards.n_rows,
        "distinct_ids": int(pc.count_distinct(ranking.column("id")).as_py()),
        "flagged": int(pc.sum(pc.not_equal(ranking.column("flags"), 0)).as_py() or 0),
        "unscorable": int(
            pc.sum(
                pc.not_equal(pc.bit_wise_and(ranking.column("flags"), int(Flag.UNSCORABLE)), 0)
            ).as_py()
            or 0
        ),
        "seconds": seconds,
        "spectra_per_s": shards.n_rows / seconds,
        "scoring_spectra_per_s": shards.n_rows / timings["score_s"],
        "timings": timings,
        **settings,
        "top_n": top.num_rows,
        "cluster_resources": {k: v for k, v in resources.items() if k in ("CPU", "GPU")},
        "files": {
            "inputs": [str(f) for f in shards.files],
            "fits": [str(f) for f in fits_files],
            "scores": sorted(str(p) for p in scores_dir.glob("*.parquet")),
            "top_csv": str(out / "top_outliers.csv"),
            "top_parquet": str(out / "top_outliers.parquet"),
            "gallery": None if gallery is None else str(gallery),
            **explained_files,
        },
        "explained": n_explained,
    }
