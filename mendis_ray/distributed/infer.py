"""Batch scoring of survey catalogs with Ray Data on an autoscaling actor pool.

The pipeline of :func:`score_catalog` (what ``mendis score`` and ``jobs/score_catalog.py``
run)::

    inputs (Parquet shards, or APOGEE apStar/aspcapStar FITS -> out/_ingested/ first)
      -> check_shards(files, grid=<checkpoint's grid>)     footers only; names a bad shard
      -> read_spectra: read_parquet -> validate_batch      every row checked as it streams
      -> repartition(target_num_rows_per_block=batch_size) blocks small enough to spread
      -> map_batches(CatalogScorer, compute=ActorPoolStrategy(min_size, max_size),
                     num_cpus=<fraction>, num_gpus=...)    model loaded once per actor
      -> write_parquet(out/.scores.tmp-*) -> renamed to out/scores  (replaces an old run)
      -> out/top_outliers.{csv,parquet}, out/gallery.png, out/summary.json  (atomic writes)

Output (``out/``):

``scores/``
    One row per input spectrum: ``id``, ``path`` (the shard it came from), the input's
    scalar columns (``teff``, ``logg``, ``feh``, ``snr`` and, by default, every other
    non-list column common to all shards, e.g. ``truth_class``), then the
    :meth:`~mendis_ray.science.ood.Scorer.score` outputs: ``log_p``, ``log_p_marginal``,
    ``teff_used``/``logg_used``/``feh_used`` (the ``labels_used`` columns: the given labels,
    or the profile maximum where a label-free score was computed), ``log_p_per_dim``,
    ``signal_score``, ``percentile``, ``signal_percentile``, ``log_ratio_gaussian``,
    ``masked_fraction``, ``flags`` (bit field) and ``flag_*`` booleans.
``top_outliers.csv`` / ``top_outliers.parquet``
    The ``top_n`` most outlying rows, ``rank`` 1 = most outlying, plus ``flag_names``.
``gallery.png``
    The first ``gallery_n`` of them, each beside its nearest typical spectrum, with the
    residual.
``summary.json``
    Rows, seconds, spectra/s, actor pool, input and output files, stage timings.

**Ranking** (``rank_by``, ``flags_first``) is :mod:`mendis_ray.science.ranking`'s, the
gallery and its **typical neighbours** (among the ``n_typical`` most typical unflagged
rows) :mod:`mendis_ray.science.gallery`'s; both run on the driver after the scores are
written, and need no Ray.  Input sorting and FITS ingest are
:mod:`mendis_ray.spectra.catalog`'s.

**Rerunning** into the same ``out`` is safe: the scores are written to a temporary folder
beside ``out/scores`` and renamed into place (the old folder is removed only after), and
every table, figure and summary is written under a temporary name and renamed, so ``out``
never holds duplicated or half-written files.  Two runs *at the same time* into one
``out`` are not supported.

**Cluster use.**  The checkpoint, the input shards and ``out`` must be readable (and
``out`` writable) from every node: shared storage (NFS) on a multi-node cluster.

**Errors.**  A bad shard or row (unreadable file, wrong schema, non-finite flux, negative
ivar) raises :class:`~mendis_ray.spectra.shards.ShardError` naming the file (and the
spectrum id and pixel); so do a spectrum id that occurs twice in the catalog and a
catalog on another grid than the checkpoint, before any data are read; a bad checkpoint
raises :class:`~mendis_ray.flow.checkpoint.CheckpointError`.  Both are ``ValueError``: the CLI
prints them without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mendis_ray.atomic import (
    remove_stale_dirs,
    replace_dir,
    write_json_atomic,
)
from mendis_ray.science.explained import write_outputs
from mendis_ray.science.gallery import (
    explain_against_typical,
    fmt,
    make_gallery,
    shard_wavelength,
)
from mendis_ray.science.ranking import (
    RANK_KEYS,
    USED_COLUMNS,
    rank_outliers,
    read_ranking,
    top_table,
    typical_rows,
)
from mendis_ray.spectra.batches import spectra_of
from mendis_ray.spectra.catalog import (
    common_scalar_columns,
    find_duplicate_ids,
    ingest_fits,
    split_inputs,
)
from mendis_ray.spectra.shards import ShardError

__all__ = [
    "CatalogResult",
    "CatalogScorer",
    "actor_pool_options",
    "build_pipeline",
    "main_score",
    "score_catalog",
]

log = logging.getLogger(__name__)

SPECTRUM_COLUMNS = ("flux", "ivar")
_TMP_RE = re.compile(r"^\.scores\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")


# ----------------------------------------------------------------------------- the actor


class CatalogScorer:
    """Callable class for ``Dataset.map_batches``: one instance per actor, the checkpoint
    loaded once in ``__init__``; every call scores one batch.

    Args:
        checkpoint: checkpoint folder (readable from the actor's node).
        grid: the catalog's ``Grid.describe()`` dict; the checkpoint must match it.
        marginal: which rows get the label-free score (see ``Scorer.score``).
        num_threads: torch threads of this actor (Ray sets ``OMP_NUM_THREADS=1`` in workers,
            so without this torch would use one thread whatever the actor's CPU share).
        device: ``"cuda"``, ``"cpu"`` or None: cuda when Ray gave this actor a GPU.
    """

    def __init__(
        self,
        checkpoint: str,
        grid: dict,
        marginal: str = "unlabelled",
        num_threads: int = 1,
        device: str | None = None,
    ) -> None:
        import torch

        from mendis_ray.science.signal_scores import load_scorer

        t0 = time.perf_counter()
        torch.set_num_threads(max(1, int(num_threads)))
        if device is None:
            device = "cuda" if _has_gpu() and torch.cuda.is_available() else "cpu"
        self.device = device
        self.n_pix = int(grid["n_pix"])
        self.marginal = marginal
        self.scorer = load_scorer(checkpoint, device=device, expect_grid=grid)
        self.load_seconds = time.perf_counter() - t0
        log.info(
            "actor %d: loaded %s on %s (%d torch threads) in %.1f s",
            os.getpid(), checkpoint, device, torch.get_num_threads(), self.load_seconds,
        )  # fmt: skip

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Scores of one batch of spectra (a table with the shard columns and ``path``):
        the batch's scalar columns plus one column per score (see the module doc)."""
        flux, ivar, labels = spectra_of(batch, self.n_pix)  # (n, n_pix), (n, n_pix), (n, 3)
        scores = self.scorer.score(
            flux, ivar, labels, marginal=self.marginal, batch_size=max(1, batch.num_rows)
        )
        return scores_table(batch, scores)


def _has_gpu() -> bool:
    import ray

    try:
        return bool(ray.get_gpu_ids())
    except Exception:  # outside a Ray worker
        return False


def scores_table(batch: pa.Table, scores: dict[str, np.ndarray]) -> pa.Table:
    """``batch`` without its spectrum columns, plus the ``Scorer.score`` dict as columns
    (``labels_used`` (n, 3) split into ``teff_used``, ``logg_used``, ``feh_used``)."""
    keep = [c for c in batch.column_names if c not in SPECTRUM_COLUMNS]
    out = batch.select(keep)
    for name, values in scores.items():
        values = np.asarray(values)
        if name == "labels_used":
            for j, col in enumerate(USED_COLUMNS):
                out = out.append_column(col, pa.array(values[:, j].astype(np.float64)))
        else:
            out = out.append_column(name, pa.array(values))
    return out


# ----------------------------------------------------------------------------- pipeline


@dataclass
class CatalogResult:
    """What :func:`score_catalog` wrote (paths) and its ``summary.json`` content."""

    out: Path
    scores: Path
    top_csv: Path
    top_parquet: Path
    gallery: Path | None
    summary_path: Path
    summary: dict = field(default_factory=dict)


def actor_pool_options(
    *,
    min_actors: int,
    max_actors: int,
    num_cpus_per_actor: float,
    num_gpus_per_actor: float,
    batch_size: int,
) -> dict:
    """The ``map_batches`` keyword arguments of the scoring step: an autoscaling actor pool
    of ``min_actors``..``max_actors`` actors, each with a (fractional) CPU share and
    ``num_gpus_per_actor`` GPUs, fed pyarrow batches of ``batch_size`` rows."""
    import ray

    if not 1 <= min_actors <= max_actors:
        raise ValueError(f"need 1 <= min_actors <= max_actors, got {min_actors}, {max_actors}")
    if not num_cpus_per_actor > 0 or num_gpus_per_actor < 0:
        raise ValueError(
            f"num_cpus_per_actor must be > 0 and num_gpus_per_actor >= 0, got "
            f"{num_cpus_per_actor}, {num_gpus_per_actor}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    opts: dict = {
        "compute": ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors),
        "batch_format": "pyarrow",
        "batch_size": batch_size,
        "num_cpus": num_cpus_per_actor,
    }
    if num_gpus_per_actor:
        opts["num_gpus"] = num_gpus_per_actor
    return opts


def default_actor_threads(num_cpus_per_actor: float) -> int:
    """torch threads of an actor with this CPU share: its whole CPUs, at least 1."""
    return max(1, int(num_cpus_per_actor))


def default_max_actors(resources: dict, num_cpus: float, num_gpus: float) -> int:
    """As many actors as the GPUs allow, or the CPUs less one (left to read tasks)."""
    if num_gpus > 0:
        return max(1, int(resources.get("GPU", 0) // num_gpus))
    return max(1, int((resources.get("CPU", 1) - 1) // num_cpus))


def build_pipeline(
    checkpoint: str | os.PathLike,
    shards,
    *,
    batch_size: int = 256,
    min_actors: int = 1,
    max_actors: int = 2,
    num_cpus_per_actor: float = 1.0,
    num_gpus_per_actor: float = 0.0,
    threads_per_actor: int | None = None,
    marginal: str = "unlabelled",
    carry_columns: Sequence[str] = (),
    scorer_cls: type = CatalogScorer,
):
    """The lazy Ray Dataset of scores of the checked ``shards``
    (:class:`~mendis_ray.distributed.data.ShardSet`); nothing runs until it is consumed
    (written, or iterated as the benchmark does).  ``scorer_cls``: :class:`CatalogScorer`
    or a subclass (the benchmark's adds timing columns)."""
    from mendis_ray.distributed.data import read_spectra

    if marginal not in ("unlabelled", "all", "none"):
        raise ValueError(f"marginal must be unlabelled, all or none, got {marginal!r}")
    opts = actor_pool_options(
        min_actors=min_actors,
        max_actors=max_actors,
        num_cpus_per_actor=num_cpus_per_actor,
        num_gpus_per_actor=num_gpus_per_actor,
        batch_size=batch_size,
    )
    ds = read_spectra(shards, extra_columns=tuple(carry_columns))
    # One block per shard file otherwise: a 1,000-row shard would go to a single actor.
    ds = ds.repartition(target_num_rows_per_block=batch_size)
    return ds.map_batches(
        scorer_cls,
        fn_constructor_kwargs={
            "checkpoint": str(checkpoint),
            "grid": dict(shards.grid),
            "marginal": marginal,
            "num_threads": threads_per_actor or default_actor_threads(num_cpus_per_actor),
            "device": "cuda" if num_gpus_per_actor else "cpu",
        },
        **opts,
    )


def score_catalog(
    checkpoint: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    batch_size: int = 256,
    min_actors: int = 1,
    max_actors: int | None = None,
    num_cpus_per_actor: float = 1.0,
    num_gpus_per_actor: float | None = None,
    threads_per_actor: int | None = None,
    top_n: int = 100,
    gallery_n: int = 12,
    n_typical: int = 200,
    marginal: str = "unlabelled",
    rank_by: str = "percentile",
    flags_first: bool = False,
    carry_columns: Sequence[str] | None = None,
    labels_path: str | os.PathLike | None = None,
    ingest_shards: int | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    html: bool = False,
    verdicts: str | os.PathLike | None = None,
) -> CatalogResult:
    """Score every spectrum of a catalog with a checkpoint on a Ray actor pool.

    ``out`` must be a folder or not exist; a run that fails (or is interrupted) removes
    the folder if it made it, and the embedded Ray it started.

    Args:
        checkpoint: checkpoint folder (flow + scoring reference), see
            :func:`~mendis_ray.flow.checkpoint.save_checkpoint`.
        inputs: shard files or dataset folders, and/or apStar/aspcapStar FITS files (or
            folders of them), ingested onto the checkpoint's grid into ``out/_ingested``.
        out: output folder (see the module doc for what goes in it).
        batch_size: spectra per ``map_batches`` call (and per flow evaluation).
        min_actors, max_actors: the autoscaling actor pool's bounds (default max: as many
            actors as the cluster's GPUs, or CPUs less one, allow).
        num_cpus_per_actor: CPUs reserved per actor (fractions allowed: a pool holding
            every CPU starves the read tasks, see ray-notes.md).
        num_gpus_per_actor: GPUs per actor (default 1 if the cluster has GPUs, else 0).
        threads_per_actor: torch threads per actor (default: its whole CPUs, at least 1).
        top_n, gallery_n: rows of the outlier table, and of them in the gallery (0: none).
        n_typical: the most typical rows among which the gallery finds neighbours.
        marginal: label-free scores for ``unlabelled`` rows, ``all`` or ``none``.
        rank_by, flags_first: the ranking (see the module doc).
        carry_columns: scalar input columns copied to the scores (default: every non-list
            column common to all shards).
        labels_path: allStar-like table of labels for FITS inputs.
        ingest_shards: shards of the ingested FITS (default: about 1,000 spectra each).
        address, num_cpus: the Ray cluster to join, or the local one's logical CPUs.
        html: also write the triage page ``triage.html`` (:mod:`mendis_ray.triage`).
        verdicts: a verdicts file (e.g. the page's ``verdicts.json`` download) merged into
            ``out/verdicts.parquet``; the stored verdicts go into the outputs' ``verdict``
            and ``verdict_note`` columns.

    Returns:
        a :class:`CatalogResult`.

    Raises:
        ShardError naming the bad shard (and row); CheckpointError; ValueError for bad
        arguments.
    """
    from mendis_ray.distributed.session import ensure_ray

    _check_args(rank_by, top_n, gallery_n, n_typical)
    checkpoint, out = Path(checkpoint), Path(out)
    with _removed_on_failure(out):
        t_start, timings = time.perf_counter(), {}
        ckpt = _prepare_out(checkpoint, out)
        from mendis_ray.triage.verdicts import verdicts_for_run

        stored_verdicts = verdicts_for_run(out, verdicts)  # a bad file fails before scoring
        shards, fits_files = _gather_shards(ckpt, inputs, out, labels_path, ingest_shards,
                                            timings)  # fmt: skip
        if carry_columns is None:
            carry_columns = common_scalar_columns(shards.files)
        resources = ensure_ray(address, num_cpus=num_cpus)
        pool = _actor_pool(resources, min_actors, max_actors, num_cpus_per_actor,
                           num_gpus_per_actor, threads_per_actor)  # fmt: skip
        log.info(
            "scoring %d spectra from %d shard(s) with %s: actor pool %d-%d x (%.2g CPU, %.2g "
            "GPU, %d torch thread(s)), batches of %d, label-free scores for %s rows",
            shards.n_rows, len(shards.files), checkpoint, pool["min"], pool["max"],
            pool["num_cpus"], pool["num_gpus"], pool["torch_threads"], batch_size, marginal,
        )  # fmt: skip
        ds = build_pipeline(
            checkpoint, shards, batch_size=batch_size, min_actors=pool["min"],
            max_actors=pool["max"], num_cpus_per_actor=pool["num_cpus"],
            num_gpus_per_actor=pool["num_gpus"], threads_per_actor=pool["torch_threads"],
            marginal=marginal, carry_columns=carry_columns,
        )  # fmt: skip
        scores_dir = _write_scores(ds, shards.n_rows, out, batch_size, timings)
        run = {"checkpoint": str(checkpoint), "grid": shards.grid, "rank_by": rank_by,
               "rows": shards.n_rows}  # fmt: skip
        ranking, top, typical, files = _write_outliers(
            scores_dir, out, shards, rank_by=rank_by, flags_first=flags_first, top_n=top_n,
            gallery_n=gallery_n, n_typical=n_typical, timings=timings, run=run,
            verdicts=stored_verdicts, html=html,
        )  # fmt: skip
        gallery = _write_gallery(top, typical, shards, out, gallery_n, timings)
        summary = _summary(
            checkpoint, shards, fits_files, out, scores_dir, ranking, top, gallery, resources,
            time.perf_counter() - t_start, timings, files, actors=pool, batch_size=batch_size,
            marginal=marginal, rank_by=rank_by, flags_first=flags_first,
        )  # fmt: skip
        summary["verdicts"] = len(stored_verdicts)
        summary_path = write_json_atomic(summary, out / "summary.json")
    log.info("wrote %s, %s, %s in %.1f s", scores_dir, out / "top_outliers.csv", summary_path,
             summary["seconds"])  # fmt: skip
    return CatalogResult(
        out, scores_dir, out / "top_outliers.csv", out / "top_outliers.parquet", gallery,
        summary_path, summary,
    )  # fmt: skip


@contextlib.contextmanager
def _removed_on_failure(out: Path) -> Iterator[None]:
    """Run the body with ``out`` (a folder, or not there yet); if it fails or is
    interrupted, remove ``out`` where this run made it (a rerun into an existing folder
    keeps the earlier results: every write there is atomic), and on Ctrl-C stop the
    embedded Ray now."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    created = not out.exists()
    try:
        yield
    except BaseException as err:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(err, KeyboardInterrupt):
            from mendis_ray.distributed.session import shutdown_embedded_ray

            shutdown_embedded_ray()
        raise


def _actor_pool(
    resources: dict, min_actors: int, max_actors: int | None, num_cpus: float,
    num_gpus: float | None, threads: int | None,
) -> dict:  # fmt: skip
    """The actor pool of a run (``summary.json``'s ``actors``): defaults filled from the
    cluster's ``resources`` (one GPU per actor where it has GPUs)."""
    if num_gpus is None:
        num_gpus = 1.0 if resources.get("GPU", 0) > 0 else 0.0
    if max_actors is None:
        max_actors = max(min_actors, default_max_actors(resources, num_cpus, num_gpus))
    threads = threads or default_actor_threads(num_cpus)
    return {"min": min_actors, "max": max_actors, "num_cpus": num_cpus, "num_gpus": num_gpus,
            "torch_threads": threads}  # fmt: skip


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


def _check_args(rank_by: str, top_n: int, gallery_n: int, n_typical: int) -> None:
    if rank_by not in RANK_KEYS:
        raise ValueError(f"rank_by must be one of {sorted(RANK_KEYS)}, got {rank_by!r}")
    if top_n < 1 or gallery_n < 0 or n_typical < 1:
        raise ValueError(f"need top_n >= 1, gallery_n >= 0, n_typical >= 1 (got {top_n}, "
                         f"{gallery_n}, {n_typical})")  # fmt: skip


def _prepare_out(checkpoint: Path, out: Path):
    """The checkpoint's :class:`~mendis_ray.flow.checkpoint.CheckpointInfo` (a
    CheckpointError for a bad one), with ``out`` made and cleared of stale temporaries."""
    from mendis_ray.flow.checkpoint import checkpoint_info

    ckpt = checkpoint_info(checkpoint)
    ckpt.require_grid()
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_dirs(out, _TMP_RE)
    return ckpt


def _gather_shards(ckpt, inputs, out: Path, labels_path, ingest_shards, timings: dict):
    """(checked ShardSet on the checkpoint's grid, FITS files ingested into
    ``out/_ingested``) of the inputs; a ShardError names a shard on another grid or a
    spectrum id that occurs twice, before any data are read."""
    from mendis_ray.distributed.data import check_shards, list_shards

    parquet_inputs, fits_files = split_inputs(inputs)
    files = list_shards(parquet_inputs) if parquet_inputs else []
    if fits_files:
        t0 = time.perf_counter()
        files += ingest_fits(
            fits_files, out / "_ingested", ckpt.grid_object(),
            labels_path=labels_path, n_shards=ingest_shards,
        )  # fmt: skip
        timings["ingest_s"] = time.perf_counter() - t0
    if not files:
        raise ShardError(f"no input shards in {[str(p) for p in inputs]}")
    shards = check_shards(files, grid=ckpt.require_grid())  # the model's grid
    find_duplicate_ids(shards.files)  # the outputs are keyed by id: refuse ambiguity now
    return shards, fits_files


def _write_scores(ds, n_rows: int, out: Path, batch_size: int, timings: dict) -> Path:
    """Run the pipeline ``ds`` into a temporary folder, check every row came back, and
    rename it to ``out/scores`` (replacing an earlier run's)."""
    scores_dir = out / "scores"
    tmp = out / f".scores.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    try:
        try:
            ds.write_parquet(str(tmp), min_rows_per_file=max(batch_size, 100_000))
        except Exception as err:
            _raise_clean(err)
            raise
        n_written = pq.ParquetDataset(tmp).read(columns=["id"]).num_rows if tmp.exists() else 0
        if n_written != n_rows:
            raise RuntimeError(f"scored {n_written} rows but the shards hold {n_rows}; {tmp} kept")
        replace_dir(tmp, scores_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    timings["score_s"] = time.perf_counter() - t0
    log.info(
        "scored %d spectra in %.1f s (%.1f spectra/s) -> %s",
        n_rows, timings["score_s"], n_rows / timings["score_s"], scores_dir,
    )  # fmt: skip
    return scores_dir


def _write_outliers(
    scores_dir: Path, out: Path, shards, *, rank_by: str, flags_first: bool, top_n: int,
    gallery_n: int, n_typical: int, timings: dict, run: dict, verdicts: dict, html: bool,
) -> tuple[pa.Table, pa.Table, pa.Table, dict]:  # fmt: skip
    """Rank the scores, explain the top rows against their nearest typical spectra and
    write the explained outputs (:func:`~mendis_ray.science.explained.write_outputs`:
    ``top_outliers.*`` with explanations and ``verdicts``, ``scores.fits``, ...) and, with
    ``html``, the triage page (else remove an earlier run's).  Returns (ranking columns,
    top table, typical rows, the written files plus ``explained``: their row count)."""
    t0 = time.perf_counter()
    ranking = read_ranking(scores_dir, rank_by)
    top_idx = rank_outliers(ranking, rank_by=rank_by, flags_first=flags_first)[:top_n]
    top = top_table(scores_dir, ranking, top_idx)
    timings["rank_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    typical_idx = typical_rows(ranking, n_typical, exclude=top_idx[:gallery_n])
    typical = ranking.take(pa.array(typical_idx, pa.int64()))
    explained = explain_against_typical(top, typical, shards.files, shards.n_pix, shards.grid)
    wl, xlabel = shard_wavelength(shards.files, shards.n_pix)
    files = write_outputs(out, explained, pq.read_table(scores_dir), wl, xlabel, run, verdicts)
    top = pq.read_table(out / "top_outliers.parquet")  # with explanations and verdicts
    timings["explain_s"] = time.perf_counter() - t0
    page = None
    if html:
        from mendis_ray.triage.page import write_page

        page = write_page(out)
    else:
        (out / "triage.html").unlink(missing_ok=True)  # an earlier run's would not match
    files |= {"triage_html": None if page is None else str(page)}
    return ranking, top, typical, {**files, "explained": explained.top.num_rows}


def _write_gallery(
    top: pa.Table, typical: pa.Table, shards, out: Path, gallery_n: int, timings: dict
) -> Path | None:
    """``out/gallery.png`` of the first ``gallery_n`` top rows (or remove an earlier
    run's where none is asked for)."""
    if gallery_n == 0 or not top.num_rows:
        (out / "gallery.png").unlink(missing_ok=True)  # an earlier run's would not match
        return None
    t0 = time.perf_counter()
    gallery = make_gallery(
        top.slice(0, gallery_n), typical, shards.files, shards.n_pix, out / "gallery.png"
    )
    timings["gallery_s"] = time.perf_counter() - t0
    return gallery


_KNOWN_ERRORS = ("ShardError", "CheckpointError", "FitsInputError")


def _raise_clean(err: BaseException) -> None:
    """Re-raise a ShardError/CheckpointError raised inside a Ray task or actor (Ray Data
    wraps it in ``UserCodeException`` and keeps only its text) as itself, so the caller
    gets a clear ``ValueError`` naming the bad shard and row."""
    from mendis_ray.flow.checkpoint import CheckpointError

    text = str(err)
    found = None
    for m in re.finditer(
        r"^(?:[\w.]+\.)?(" + "|".join(_KNOWN_ERRORS) + r"): (.+)$", text, flags=re.M
    ):
        found = m
    if found is None:
        return
    cls = {"ShardError": ShardError, "CheckpointError": CheckpointError}.get(found[1], ShardError)
    raise cls(found[2].strip()) from err


# ----------------------------------------------------------------------------- CLI


def main_score(args: argparse.Namespace) -> int:
    """``mendis score CHECKPOINT INPUTS... --out DIR [options]``: score, print what was
    written where."""
    kw = {
        "batch_size": getattr(args, "batch_size", 256),
        "min_actors": getattr(args, "min_actors", 1),
        "max_actors": getattr(args, "max_actors", None),
        "num_cpus_per_actor": getattr(args, "cpus_per_actor", 1.0),
        "num_gpus_per_actor": getattr(args, "gpus_per_actor", None),
        "threads_per_actor": getattr(args, "threads_per_actor", None),
        "top_n": getattr(args, "top_n", 100),
        "gallery_n": getattr(args, "gallery_n", 12),
        "marginal": getattr(args, "marginal", "unlabelled"),
        "rank_by": getattr(args, "rank_by", "percentile"),
        "flags_first": getattr(args, "flags_first", False),
        "labels_path": getattr(args, "labels", None),
        "address": getattr(args, "address", None),
        "num_cpus": getattr(args, "num_cpus", None),
        "html": getattr(args, "html", False),
        "verdicts": getattr(args, "verdicts", None),
    }
    res = score_catalog(args.checkpoint, args.inputs, args.out, **kw)
    s = res.summary
    print(
        f"\nScored {s['rows']} spectra in {s['seconds']:.1f} s ({s['spectra_per_s']:.1f} "
        f"spectra/s overall, {s['scoring_spectra_per_s']:.1f} in the scoring step) on "
        f"{s['actors']['min']}-{s['actors']['max']} actor(s)"
    )
    print(f"scores:       {res.scores} ({len(s['files']['scores'])} file(s))")
    print(f"top outliers: {res.top_csv}  ({s['top_n']} rows; also {res.top_parquet.name})")
    files = s["files"]
    print(f"FITS:         {files['scores.fits']} (every spectrum), {files['top_outliers.fits']}")
    print(f"explanations: {files['explain_features.csv']} ({s['explained']} outliers), "
          f"{Path(files['explain_elements.csv']).name}")  # fmt: skip
    if res.gallery is not None:
        print(f"gallery:      {res.gallery}")
    if files.get("triage_html"):
        print(f"triage page:  {files['triage_html']} (open it in a browser)")
    if s["verdicts"]:
        print(f"verdicts:     {s['verdicts']} carried from {Path(args.out) / 'verdicts.parquet'}")
    print(f"summary:      {res.summary_path}")
    _print_top(res.top_parquet)
    return 0


def _print_top(top_parquet: Path, n: int = 10) -> None:
    """Print the ``n`` most outlying rows of an outlier table."""
    top = pq.read_table(top_parquet).slice(0, n).to_pylist()
    if not top:
        return
    print("\nmost outlying:")
    for r in top:
        if "score" in r:  # a signal-space checkpoint
            detail = (f"score {fmt(r.get('score'), '.2f')}  signal "
                      f"{fmt(r.get('signal_score'), '.2f')}  residual "
                      f"{fmt(r.get('residual_score'), '.2f')}")  # fmt: skip
        else:
            detail = f"log p/dim {fmt(r.get('log_p_per_dim'), '.3f')}"
        print(
            f"  {r['rank']:>3}  {r['id']}  percentile {fmt(r.get('percentile'), '.1f')}  "
            f"{detail}  flags {r['flag_names'] or '-'}"
        )
        if r.get("explanation"):
            print(f"       why: {r['explanation']}")
