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

**Ranking.**  ``rank_by="percentile"`` (default) sorts by the primary score's percentile
against the checkpoint's held-out reference spectra (joint log p where labels are given,
label-free log p otherwise, so labelled and unlabelled rows are comparable), ascending;
ties -- every spectrum below the whole reference has percentile 0 -- are broken by
``log_p_per_dim`` ascending (without a reference in the checkpoint, that is the only key).
``rank_by="signal"`` uses ``signal_percentile`` then ``signal_score`` (subtle outliers,
insensitive to S/N).  Rows without a score (NaN) come last.  **Flags do not change the
order** unless ``flags_first=True``: a flagged spectrum (masked, non-finite or out-of-range
flux or labels) is often a data problem rather than an astrophysical outlier, so flags are
shown instead -- the ``flags``/``flag_names`` columns and the gallery titles -- and
``flags_first`` lists every flagged row before the unflagged ones (each group ranked as
above) for a data-quality pass.

**Typical neighbour.**  The gallery compares each outlier with the most similar of the
``n_typical`` most typical unflagged spectra (highest percentile, then log p per
dimension): the one with the smallest mean squared flux difference over the pixels good
(ivar > 0) in both spectra.

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
raises
:class:`~mendis_ray.flow.checkpoint.CheckpointError`.  Both are ``ValueError``: the CLI
prints them without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mendis_ray.atomic import replace_dir, write_atomic, write_json_atomic
from mendis_ray.science.explained import ExplainedTop, explain_top, write_outputs
from mendis_ray.spectra.batches import list_matrix, spectra_of
from mendis_ray.spectra.shards import LABEL_COLUMNS, ShardError

__all__ = [
    "CatalogResult",
    "CatalogScorer",
    "actor_pool_options",
    "find_duplicate_ids",
    "flag_names",
    "main_score",
    "nearest_typical",
    "plot_gallery",
    "rank_outliers",
    "score_catalog",
]

log = logging.getLogger(__name__)

FITS_SUFFIXES = (".fits", ".fit", ".fits.gz", ".fit.gz")
SPECTRUM_COLUMNS = ("flux", "ivar")
USED_COLUMNS = tuple(f"{c}_used" for c in LABEL_COLUMNS)
RANK_KEYS = {
    "percentile": ("percentile", "log_p_per_dim"),
    "signal": ("signal_percentile", "signal_score"),
    "residual": ("residual_percentile", "residual_score"),
}
#: The tie-break of the primary percentile for a signal-space checkpoint (which has no
#: per-dimension log p: its primary score is the combined tail probability ``score``).
SIGNAL_PRIMARY = ("percentile", "score")
FLAG_BITS = {1: "nonfinite", 2: "masked", 4: "flux_range", 8: "label_range", 16: "unscorable"}
#: The leading columns of the outlier table (the scores, then the input's other columns).
TOP_COLUMNS = (
    "rank", "id", "percentile", "score", "signal_score", "residual_score", "residual_percentile",
    "chi2_dof", "log_p_per_dim", "signal_percentile", "log_ratio_gaussian",
    "flags", "flag_names", "log_p", "log_p_marginal", *USED_COLUMNS,
    *LABEL_COLUMNS, "snr", "masked_fraction", "flag_nonfinite", "flag_masked",
    "flag_flux_range", "flag_label_range", "flag_unscorable", "path",
)  # fmt: skip
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
    the folder if it made it, and the embedded Ray it started.  See
    :func:`_score_catalog` for the arguments."""
    kwargs = {k: v for k, v in locals().items() if k not in ("checkpoint", "inputs", "out")}
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    created = not out.exists()
    try:
        return _score_catalog(checkpoint, inputs, out, **kwargs)
    except BaseException as err:
        # nothing left behind where this run made the folder (a rerun into an existing
        # folder keeps the earlier results: every write there is atomic)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(err, KeyboardInterrupt):  # Ctrl-C: stop the embedded Ray now
            from mendis_ray.distributed.session import shutdown_embedded_ray

            shutdown_embedded_ray()
        raise


def _score_catalog(
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
    from mendis_ray.distributed.data import check_shards, list_shards
    from mendis_ray.distributed.session import ensure_ray

    t_start = time.perf_counter()
    if rank_by not in RANK_KEYS:
        raise ValueError(f"rank_by must be one of {sorted(RANK_KEYS)}, got {rank_by!r}")
    if top_n < 1 or gallery_n < 0 or n_typical < 1:
        raise ValueError(f"need top_n >= 1, gallery_n >= 0, n_typical >= 1 (got {top_n}, "
                         f"{gallery_n}, {n_typical})")  # fmt: skip
    checkpoint = Path(checkpoint)
    out = Path(out)
    ckpt_grid = checkpoint_grid(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp(out)
    timings: dict[str, float] = {}
    from mendis_ray.triage.verdicts import verdicts_for_run

    stored_verdicts = verdicts_for_run(out, verdicts)  # a bad file fails before scoring

    parquet_inputs, fits_files = split_inputs(inputs)
    files = list_shards(parquet_inputs) if parquet_inputs else []
    if fits_files:
        t0 = time.perf_counter()
        files += ingest_fits(
            fits_files, out / "_ingested", checkpoint, ckpt_grid,
            labels_path=labels_path, n_shards=ingest_shards,
        )  # fmt: skip
        timings["ingest_s"] = time.perf_counter() - t0
    if not files:
        raise ShardError(f"no input shards in {[str(p) for p in inputs]}")
    shards = check_shards(files, grid=ckpt_grid)  # the model's grid: names a mismatching shard
    find_duplicate_ids(shards.files)  # the outputs are keyed by id: refuse ambiguity now
    if carry_columns is None:
        carry_columns = common_scalar_columns(shards.files)

    resources = ensure_ray(address, num_cpus=num_cpus)
    if num_gpus_per_actor is None:
        num_gpus_per_actor = 1.0 if resources.get("GPU", 0) > 0 else 0.0
    if max_actors is None:
        max_actors = max(
            min_actors, default_max_actors(resources, num_cpus_per_actor, num_gpus_per_actor)
        )
    threads = threads_per_actor or default_actor_threads(num_cpus_per_actor)
    log.info(
        "scoring %d spectra from %d shard(s) with %s: actor pool %d-%d x (%.2g CPU, %.2g GPU, "
        "%d torch thread(s)), batches of %d, label-free scores for %s rows",
        shards.n_rows, len(shards.files), checkpoint, min_actors, max_actors,
        num_cpus_per_actor, num_gpus_per_actor, threads, batch_size, marginal,
    )  # fmt: skip
    ds = build_pipeline(
        checkpoint,
        shards,
        batch_size=batch_size,
        min_actors=min_actors,
        max_actors=max_actors,
        num_cpus_per_actor=num_cpus_per_actor,
        num_gpus_per_actor=num_gpus_per_actor,
        threads_per_actor=threads,
        marginal=marginal,
        carry_columns=carry_columns,
    )

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
        if n_written != shards.n_rows:
            raise RuntimeError(
                f"scored {n_written} rows but the shards hold {shards.n_rows}; {tmp} kept"
            )
        replace_dir(tmp, scores_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    timings["score_s"] = time.perf_counter() - t0
    log.info(
        "scored %d spectra in %.1f s (%.1f spectra/s) -> %s",
        shards.n_rows, timings["score_s"], shards.n_rows / timings["score_s"], scores_dir,
    )  # fmt: skip

    t0 = time.perf_counter()
    names = set(pq.read_schema(next(iter(sorted(scores_dir.glob("*.parquet"))))).names)
    wanted = {"id", "path", "flags", *RANK_KEYS["percentile"], *RANK_KEYS[rank_by], "score"}
    ranking = pq.read_table(scores_dir, columns=sorted(wanted & names))
    n_unique = pc.count_distinct(ranking.column("id")).as_py()
    order = rank_outliers(ranking, rank_by=rank_by, flags_first=flags_first)
    top_idx = order[:top_n]
    top = _top_table(scores_dir, ranking, top_idx)
    top_csv = out / "top_outliers.csv"
    top_parquet = out / "top_outliers.parquet"
    timings["rank_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    typical_idx = _typical_rows(ranking, n_typical, exclude=top_idx[:gallery_n])
    typical = ranking.take(pa.array(typical_idx, pa.int64()))
    explained = _explain_top(top, typical, shards)
    run = {"checkpoint": str(checkpoint), "grid": shards.grid, "rank_by": rank_by,
           "rows": shards.n_rows}  # fmt: skip
    wl, xlabel = _wavelength(shards.files, shards.n_pix)
    explained_files = write_outputs(out, explained, pq.read_table(scores_dir), wl, xlabel, run,
                                    stored_verdicts)  # fmt: skip
    top = pq.read_table(top_parquet)  # with explanations and verdicts
    timings["explain_s"] = time.perf_counter() - t0
    page = None
    if html:
        from mendis_ray.triage.page import write_page

        page = write_page(out)
    else:
        (out / "triage.html").unlink(missing_ok=True)  # an earlier run's would not match

    gallery = None
    if gallery_n > 0 and top.num_rows:
        t0 = time.perf_counter()
        gallery = make_gallery(top.slice(0, gallery_n), typical, shards, out / "gallery.png")
        timings["gallery_s"] = time.perf_counter() - t0
    else:
        (out / "gallery.png").unlink(missing_ok=True)  # an earlier run's would not match

    seconds = time.perf_counter() - t_start
    summary = {
        "checkpoint": str(checkpoint),
        "grid": {k: v for k, v in shards.grid.items() if k != "wavelength"},
        "rows": shards.n_rows,
        "distinct_ids": int(n_unique),
        "flagged": int(pc.sum(pc.not_equal(ranking.column("flags"), 0)).as_py() or 0),
        "seconds": seconds,
        "spectra_per_s": shards.n_rows / seconds,
        "scoring_spectra_per_s": shards.n_rows / timings["score_s"],
        "timings": timings,
        "actors": {
            "min": min_actors,
            "max": max_actors,
            "num_cpus": num_cpus_per_actor,
            "num_gpus": num_gpus_per_actor,
            "torch_threads": threads,
        },
        "batch_size": batch_size,
        "marginal": marginal,
        "rank_by": rank_by,
        "flags_first": flags_first,
        "top_n": top.num_rows,
        "cluster_resources": {k: v for k, v in resources.items() if k in ("CPU", "GPU")},
        "files": {
            "inputs": [str(f) for f in shards.files],
            "fits": [str(f) for f in fits_files],
            "scores": sorted(str(p) for p in scores_dir.glob("*.parquet")),
            "top_csv": str(top_csv),
            "top_parquet": str(top_parquet),
            "gallery": None if gallery is None else str(gallery),
            **explained_files,
            "triage_html": None if page is None else str(page),
        },
        "explained": explained.top.num_rows,
        "verdicts": len(stored_verdicts),
    }
    summary_path = write_json_atomic(summary, out / "summary.json")
    log.info("wrote %s, %s, %s in %.1f s", scores_dir, top_csv, summary_path, seconds)
    return CatalogResult(out, scores_dir, top_csv, top_parquet, gallery, summary_path, summary)


def default_max_actors(resources: dict, num_cpus: float, num_gpus: float) -> int:
    """As many actors as the GPUs allow, or the CPUs less one (left to read tasks)."""
    if num_gpus > 0:
        return max(1, int(resources.get("GPU", 0) // num_gpus))
    return max(1, int((resources.get("CPU", 1) - 1) // num_cpus))


# ----------------------------------------------------------------------------- inputs


def checkpoint_grid(path: str | os.PathLike) -> dict:
    """The grid (``Grid.describe()`` dict) a checkpoint was trained on, from its
    ``config.json`` only (the weights are loaded by the actors)."""
    from mendis_ray.flow.checkpoint import CONFIG, CheckpointError

    cfg = Path(path) / CONFIG
    if not cfg.is_file():
        raise CheckpointError(f"{path}: not a mendis_ray checkpoint ({CONFIG} is missing)")
    try:
        grid = json.loads(cfg.read_text()).get("grid") or {}
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{cfg}: not valid JSON ({err})") from err
    if "hash" not in grid or "n_pix" not in grid:
        raise CheckpointError(f"{cfg}: no grid (hash, n_pix) recorded; cannot check the catalog")
    return grid


def _is_fits(p: Path) -> bool:
    return p.name.lower().endswith(FITS_SUFFIXES)


def split_inputs(inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[Path]]:
    """(Parquet files/folders, FITS files) of the inputs; a folder holding FITS files and
    no Parquet counts as its FITS files."""
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    parquet, fits_files = [], []
    for p in map(Path, inputs):
        if p.is_file() and _is_fits(p):
            fits_files.append(p)
        elif p.is_dir() and not any(p.glob("*.parquet")) and not (p / "_manifest.json").exists():
            found = sorted(f for f in p.iterdir() if f.is_file() and _is_fits(f))
            if not found:
                raise ShardError(f"{p}: folder holds no .parquet or FITS files")
            fits_files += found
        else:
            parquet.append(p)  # list_shards names what is missing or wrong
    return parquet, fits_files


def _grid_of(checkpoint: Path, grid: dict):
    """The :class:`~mendis_ray.spectra.grid.Grid` of a checkpoint (for FITS ingest): a
    named grid with the same hash, else one rebuilt from the stored wavelengths."""
    from mendis_ray.flow.checkpoint import TENSORS, CheckpointError
    from mendis_ray.spectra.grid import GRID_NAMES, get_grid, grid_from_wavelength

    if grid.get("name") in GRID_NAMES:
        g = get_grid(grid["name"])
        if g.hash == grid["hash"]:
            return g
    from safetensors import safe_open

    try:
        with safe_open(str(checkpoint / TENSORS), framework="np") as f:
            wl = f.get_tensor("grid.wavelength")
    except Exception as err:
        raise CheckpointError(
            f"{checkpoint}: grid {grid.get('name')!r} is not a named grid and its wavelengths "
            f"are not stored ({err}); ingest the FITS files with `mendis ingest apogee` first"
        ) from err
    g = grid_from_wavelength(np.asarray(wl, np.float64), name=str(grid.get("name", "custom")))
    if g.hash != grid["hash"]:
        raise CheckpointError(f"{checkpoint}: cannot rebuild grid {grid.get('name')!r} exactly")
    return g


def ingest_fits(
    fits_files: Sequence[Path],
    out_dir: Path,
    checkpoint: Path,
    grid: dict,
    *,
    labels_path: str | os.PathLike | None = None,
    n_shards: int | None = None,
) -> list[Path]:
    """APOGEE FITS -> shards on the checkpoint's grid in ``out_dir`` (replacing an earlier
    ingest there; see :func:`~mendis_ray.spectra.fits.ingest_apogee`)."""
    from mendis_ray.spectra.fits import ingest_apogee

    n = len(fits_files)
    n_shards = min(n, max(1, n_shards or math.ceil(n / 1000)))
    log.info("ingesting %d FITS file(s) into %s (%d shard(s))", n, out_dir, n_shards)
    return ingest_apogee(
        list(fits_files), out_dir, grid=_grid_of(checkpoint, grid),
        labels_path=labels_path, n_shards=n_shards,
    )  # fmt: skip


def find_duplicate_ids(files: Sequence[Path]) -> None:
    """Raise :class:`ShardError` naming the file (and the earlier file) and the id of the
    first spectrum id that occurs twice in ``files`` (the ``id`` columns only are read):
    every output row, the outlier table and the gallery are keyed by id."""
    seen: dict[str, Path] = {}
    for f in map(Path, files):
        for i in pq.read_table(f, columns=["id"]).column("id").to_pylist():
            key = str(i)
            if key in seen:
                where = "earlier in the same file" if seen[key] == f else f"also in {seen[key]}"
                raise ShardError(
                    f"{f}: spectrum id {key!r} occurs twice ({where}); ids must be unique "
                    "within a catalog (the scores, outlier table and gallery are keyed by id)"
                )
            seen[key] = f


def common_scalar_columns(files: Sequence[Path]) -> list[str]:
    """Non-list columns present in every shard, other than the required ones (footers)."""
    from mendis_ray.spectra.shards import REQUIRED_COLUMNS

    common: list[str] | None = None
    for f in files:
        schema = pq.read_schema(f)
        names = [
            fld.name for fld in schema
            if not (pa.types.is_list(fld.type) or pa.types.is_fixed_size_list(fld.type)
                    or pa.types.is_large_list(fld.type))
        ]  # fmt: skip
        common = names if common is None else [c for c in common if c in names]
    return [c for c in common or [] if c not in REQUIRED_COLUMNS and c != "path"]


# ----------------------------------------------------------------------------- ranking


def flag_names(flags: int) -> str:
    """``"masked|flux_range"`` for a flag bit field (empty string for 0)."""
    return "|".join(name for bit, name in FLAG_BITS.items() if int(flags) & bit)


def rank_outliers(
    table: pa.Table, *, rank_by: str = "percentile", flags_first: bool = False
) -> np.ndarray:
    """Row indices of ``table`` from most to least outlying (see the module doc).

    ``table`` needs the ``RANK_KEYS[rank_by]`` columns (and ``flags`` with
    ``flags_first``).  +-inf scores sort first (impossible spectra), NaN scores last."""
    keys = []
    for k in rank_keys(table, rank_by):
        # +-inf is an impossible score: the most outlying (NaN, no score, stays last)
        col = table.column(k)
        if pa.types.is_floating(col.type):
            col = pc.if_else(pc.equal(col, np.inf), -np.inf, col)
        table = table.append_column(f"_key_{k}", col)
        keys.append((f"_key_{k}", "ascending"))
    if flags_first:
        flagged = pc.not_equal(table.column("flags"), 0)
        table = table.append_column("_flagged", flagged)
        keys = [("_flagged", "descending"), *keys]
    table = table.append_column("_row", pa.array(np.arange(table.num_rows)))
    keys.append(("_row", "ascending"))  # deterministic order of exact ties
    return pc.sort_indices(table, sort_keys=keys).to_numpy()  # NaN and null sort last


def rank_keys(table: pa.Table, rank_by: str) -> tuple[str, ...]:
    """The columns that rank ``table`` for ``rank_by`` (the primary percentile of a
    signal-space checkpoint's scores is tie-broken by ``score``)."""
    if rank_by not in RANK_KEYS:
        raise ValueError(f"rank_by must be one of {sorted(RANK_KEYS)}, got {rank_by!r}")
    if rank_by == "percentile" and "log_p_per_dim" not in table.column_names:
        return SIGNAL_PRIMARY
    return RANK_KEYS[rank_by]


def _typical_rows(ranking: pa.Table, n: int, exclude: np.ndarray) -> np.ndarray:
    """Indices of the ``n`` most typical unflagged rows (highest percentile, then its
    tie-break score), not in ``exclude``."""
    order = rank_outliers(ranking)[::-1]
    flags = ranking.column("flags").to_numpy()
    lp = ranking.column(rank_keys(ranking, "percentile")[1]).to_numpy(zero_copy_only=False)
    keep = (flags[order] == 0) & np.isfinite(lp[order]) & ~np.isin(order, exclude)
    return order[keep][:n]


def _top_table(scores_dir: Path, ranking: pa.Table, top_idx: np.ndarray) -> pa.Table:
    """The full score rows of ``top_idx`` (in that order) with ``rank`` and
    ``flag_names`` first."""
    ids = ranking.column("id").take(pa.array(top_idx, pa.int64()))
    full = pq.read_table(scores_dir, filters=pc.field("id").isin(ids))
    # map each top row to the full table row of the same (id, path)
    pos = {
        (i, p): k
        for k, (i, p) in enumerate(
            zip(full.column("id").to_pylist(), full.column("path").to_pylist(), strict=True)
        )
    }
    paths = ranking.column("path").take(pa.array(top_idx, pa.int64())).to_pylist()
    take = [pos[(i, p)] for i, p in zip(ids.to_pylist(), paths, strict=True)]
    top = full.take(pa.array(take, pa.int64()))
    names = [flag_names(f) for f in top.column("flags").to_pylist()]
    top = top.append_column("flag_names", pa.array(names, pa.string()))
    top = top.append_column("rank", pa.array(np.arange(1, top.num_rows + 1), pa.int64()))
    first = [c for c in TOP_COLUMNS if c in top.column_names]
    return top.select([*first, *(c for c in top.column_names if c not in first)])


# ----------------------------------------------------------------------------- gallery


def _read_spectra(rows: pa.Table, files: Sequence[Path], n_pix: int) -> tuple[np.ndarray, ...]:
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
        want = [ids[k] for k in ks]
        t = pq.read_table(f, columns=["id", "flux", "ivar"], filters=pc.field("id").isin(want))
        where = {i: j for j, i in enumerate(t.column("id").to_pylist())}
        fl, iv = list_matrix(t.column("flux"), n_pix), list_matrix(t.column("ivar"), n_pix)
        for k in ks:
            j = where.get(ids[k])
            if j is not None:
                flux[k], ivar[k] = fl[j], iv[j]
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


def _wavelength(files: Sequence[Path], n_pix: int) -> tuple[np.ndarray, str]:
    """Pixel wavelengths from a shard's metadata, else the pixel index."""
    from mendis_ray.spectra.shards import WAVE_KEY

    for f in files[:1]:
        kv = pq.read_schema(f).metadata or {}
        if WAVE_KEY in kv:
            wl = np.frombuffer(kv[WAVE_KEY], dtype="<f8")
            if wl.size == n_pix:
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
        scores = (f"signal pct {_num(row.get('signal_percentile'), '.1f')}, residual pct "
                  f"{_num(row.get('residual_percentile'), '.1f')}, chi2/dof "
                  f"{_num(row.get('chi2_dof'), '.2f')}")  # fmt: skip
    else:
        scores = (f"log p/dim {_num(row.get('log_p_per_dim'), '.3f')}, signal pct "
                  f"{_num(row.get('signal_percentile'), '.1f')}, log ratio gauss "
                  f"{_num(row.get('log_ratio_gaussian'), '.1f')}")  # fmt: skip
    why = f"\nwhy: {row['explanation']}" if row.get("explanation") else ""
    return (
        f"#{row['rank']} {row['id']}: percentile {_num(row.get('percentile'), '.1f')}, "
        f"{scores}, flags {flags}\n{lab.strip()}{'; ' if lab else ''}{neighbour}{why}"
    )


def _num(v: object, fmt: str) -> str:
    return "nan" if v is None or not np.isfinite(float(v)) else format(float(v), fmt)


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
    ``typ_ivar`` (m, n_pix) of the ``typical`` rows), and the residual below.  Atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = top.num_rows
    nn, dist = nearest_typical(flux, ivar, typ_flux, typ_ivar)
    rows = top.to_pylist()
    typ_ids = typical.column("id").to_pylist() if typical.num_rows else []
    typ_pct = (
        typical.column("percentile").to_numpy(zero_copy_only=False)
        if typical.num_rows else np.zeros(0)
    )  # fmt: skip
    m = max(n, 1)
    fig = plt.figure(figsize=(13, 3.6 * m))
    # per spectrum: flux (2), residual (1), spacer for the next (three-line) title (1.0)
    gs = fig.add_gridspec(3 * m, 1, height_ratios=[2.0, 1.0, 1.0] * m, hspace=0.0)
    for k in range(n):
        ax = fig.add_subplot(gs[3 * k, 0])
        res = fig.add_subplot(gs[3 * k + 1, 0], sharex=ax)
        good = (ivar[k] > 0) & np.isfinite(flux[k])
        ax.plot(wavelength, _masked(flux[k], good, wavelength), "k-", lw=0.5, label="outlier")
        neighbour = "no typical spectrum to compare"
        if nn[k] >= 0:
            j = nn[k]
            tgood = (typ_ivar[j] > 0) & np.isfinite(typ_flux[j])
            ax.plot(
                wavelength, _masked(typ_flux[j], tgood, wavelength), "-", color="tab:orange",
                lw=0.5, alpha=0.85, label="nearest typical",
            )  # fmt: skip
            r = _masked(flux[k] - typ_flux[j], good & tgood, wavelength)
            res.plot(wavelength, r, "-", color="tab:blue", lw=0.5)
            neighbour = (
                f"nearest typical (orange): {typ_ids[j]}, percentile "
                f"{_num(typ_pct[j], '.0f')}, rms flux difference {np.sqrt(dist[k]):.3f}"
            )
        else:
            res.text(0.5, 0.5, neighbour, transform=res.transAxes, ha="center", va="center",
                     fontsize=8)  # fmt: skip
        res.axhline(0.0, color="0.5", lw=0.5)
        ax.set_title(_title(rows[k], neighbour), fontsize=8, loc="left")
        ax.legend(loc="lower left", fontsize=7, framealpha=0.8)
        ax.set_ylabel("flux", fontsize=8)
        res.set_ylabel("resid.", fontsize=8)
        ax.tick_params(labelbottom=False, labelsize=7)
        res.tick_params(labelsize=7)
        if k == n - 1:
            res.set_xlabel(xlabel, fontsize=8)
    if n == 0:
        fig.text(0.5, 0.5, "no outliers to show", ha="center")
    fig.subplots_adjust(left=0.06, right=0.99, top=1 - 0.6 / (3.6 * m), bottom=0.0)
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=80)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def _explain_top(top: pa.Table, typical: pa.Table, shards) -> ExplainedTop:
    """Explain every ``top`` row against its nearest ``typical`` spectrum (never itself)."""
    n_pix = shards.n_pix
    flux, ivar = _read_spectra(top, shards.files, n_pix)
    typ_flux, typ_ivar = _read_spectra(typical, shards.files, n_pix)
    typ_ids = [str(i) for i in typical.column("id").to_pylist()]
    ids = [str(i) for i in top.column("id").to_pylist()]
    nn = np.full(len(ids), -1, np.int64)
    for k, sid in enumerate(ids):  # a star in the typical set is not its own reference
        keep = np.flatnonzero(np.asarray(typ_ids) != sid) if typ_ids else np.zeros(0, int)
        j, _ = nearest_typical(flux[k : k + 1], ivar[k : k + 1], typ_flux[keep], typ_ivar[keep])
        nn[k] = keep[j[0]] if j[0] >= 0 else -1
    wl, _ = _wavelength(shards.files, n_pix)
    return explain_top(top, flux, ivar, typ_ids, typ_flux, typ_ivar, nn, wl, dict(shards.grid))


def make_gallery(top: pa.Table, typical: pa.Table, shards, path: Path) -> Path:
    """Read the spectra of the ``top`` and ``typical`` score rows and plot the gallery."""
    n_pix = shards.n_pix
    flux, ivar = _read_spectra(top, shards.files, n_pix)
    typ_flux, typ_ivar = _read_spectra(typical, shards.files, n_pix)
    wl, xlabel = _wavelength(shards.files, n_pix)
    return plot_gallery(top, flux, ivar, typical, typ_flux, typ_ivar, wl, path, xlabel=xlabel)


# ----------------------------------------------------------------------------- atomic files


def write_table_atomic(table: pa.Table, path: Path) -> Path:
    return write_atomic(path, lambda t: pq.write_table(table, t))


def write_csv_atomic(table: pa.Table, path: Path) -> Path:
    import pyarrow.csv as pacsv

    return write_atomic(path, lambda t: pacsv.write_csv(table, t))


def _remove_stale_temp(out: Path) -> None:
    """Remove temporary score folders left in ``out`` by runs that died (their process no
    longer exists on this machine)."""
    for p in out.iterdir():
        m = _TMP_RE.match(p.name)
        if not m or not p.is_dir():
            continue
        pid = int(m["pid"])
        try:
            os.kill(pid, 0)
            alive = pid != os.getpid()
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            log.info("removing %s left by an earlier run", p)
            shutil.rmtree(p, ignore_errors=True)


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
    top = pq.read_table(res.top_parquet).slice(0, 10).to_pylist()
    if top:
        print("\nmost outlying:")
        for r in top:
            if "score" in r:  # a signal-space checkpoint
                detail = (f"score {_num(r.get('score'), '.2f')}  signal "
                          f"{_num(r.get('signal_score'), '.2f')}  residual "
                          f"{_num(r.get('residual_score'), '.2f')}")  # fmt: skip
            else:
                detail = f"log p/dim {_num(r.get('log_p_per_dim'), '.3f')}"
            print(
                f"  {r['rank']:>3}  {r['id']}  percentile {_num(r.get('percentile'), '.1f')}  "
                f"{detail}  flags {r['flag_names'] or '-'}"
            )
            if r.get("explanation"):
                print(f"       why: {r['explanation']}")
    return 0
