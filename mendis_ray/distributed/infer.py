"""Batch scoring of survey catalogs with Ray Data on an autoscaling actor pool.

The pipeline of :func:`score_catalog` (what ``mendis score`` and ``jobs/score_catalog.py``
run)::

    inputs (Parquet shards, or APOGEE apStar/aspcapStar FITS -> out/_ingested/ first)
      -> check_shards(files, grid=<checkpoint's grid>)     footers only; names a bad shard
      -> read_spectra: read_parquet -> validate_batch      every row checked as it streams
      -> repartition(target_num_rows_per_block=batch_size) blocks small enough to spread
      -> map_batches(CatalogScorer, compute=ActorPoolStrategy(min_size, max_size),
                     num_cpus=<fraction>, num_gpus=...)    model loaded once per actor
      -> write_parquet(<stage>/scores)        <stage> = out/.run.tmp-*, this run's outputs
      -> catalog_outputs.write_catalog_outputs: <stage>/top_outliers.{csv,parquet}, FITS,
         explanations, gallery.png, triage.html, summary.json  (driver, atomic writes)
      -> catalog_outputs.commit_outputs: moved into out  (replacing an earlier run's)

The settings are a :class:`~mendis_ray.config.ScoreConfig` (``mendis score``'s options
are generated from it).  ``out/scores/`` holds one row per input spectrum: ``id``,
``path`` (the shard it came from), the input's scalar columns (``teff``, ``logg``,
``feh``, ``snr`` and, by default, every other non-list column common to all shards that
the outputs can hold, e.g. ``truth_class``: ``spectra.catalog.common_scalar_columns``;
one named as an output column is copied as ``input_<name>``), then the scorer's
outputs (full-space flow: ``log_p``,
``log_p_marginal``, ``teff_used``/``logg_used``/``feh_used`` (the given labels, or the
profile maximum where a label-free score was computed), ``log_p_per_dim``,
``signal_score``, ``percentile``, ``signal_percentile``, ``log_ratio_gaussian``,
``masked_fraction``, ``flags`` (bit field) and ``flag_*`` booleans).  The other outputs,
the ranking and the gallery: :mod:`mendis_ray.distributed.catalog_outputs` (no Ray).
Input sorting and FITS ingest are :mod:`mendis_ray.spectra.catalog`'s.

**Rerunning** into the same ``out`` is safe: a run writes every output (scores, tables,
figures, page, summary) into a staging folder ``out/.run.tmp-*`` and moves them into
``out`` only once all are written (``summary.json`` last; an earlier run's page or gallery
that this run does not make is removed then; ``catalog_outputs.commit_outputs`` moves
the earlier outputs aside first and back on any error).  A run that fails or is
interrupted, even after scoring, leaves the earlier run's outputs as they were; a
staging folder left by a killed run is removed by the next.  Not staged: a run with FITS
inputs rewrites ``out/_ingested/`` (their shards) before it scores, and ``--verdicts``
merges into ``out/verdicts.parquet`` before it scores.  Two runs *at the same time* into
one ``out`` are not supported.

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
import pyarrow.parquet as pq

from mendis_ray import interrupt
from mendis_ray.atomic import check_out_folder, remove_stale_dirs, replace_dir
from mendis_ray.config import MARGINAL_MODES, ScoreConfig
from mendis_ray.distributed.actor_pool import (
    actor_pool_options,
    default_actor_threads,
    default_max_actors,
)
from mendis_ray.distributed.data import named_errors
from mendis_ray.science.ranking import OUTPUT_COLUMNS, USED_COLUMNS
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
_TMP_RE = re.compile(r"^\.(?:scores|run)\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")


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
        scorer_kwargs: the Scorer knobs (``ScoreConfig.scorer_kwargs()``: a full-space
            flow's; a signal-space model has none); None: the Scorer's defaults.
    """

    def __init__(
        self,
        checkpoint: str,
        grid: dict,
        marginal: str = ScoreConfig.marginal,
        num_threads: int = 1,
        device: str | None = None,
        scorer_kwargs: dict | None = None,
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
        self.scorer = load_scorer(
            checkpoint, device=device, expect_grid=grid, **(scorer_kwargs or {})
        )
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
    (``labels_used`` (n, 3) split into ``teff_used``, ``logg_used``, ``feh_used``).  An
    input column named as a score or as a column the outputs add (a catalog's own
    ``flags``, ``score`` or ``rank``: ``OUTPUT_COLUMNS``) is kept as ``input_<name>``."""
    keep = [c for c in batch.column_names if c not in SPECTRUM_COLUMNS]
    out = batch.select(keep)
    taken = {*scores, *USED_COLUMNS, *OUTPUT_COLUMNS}
    if taken & set(keep):
        names = [_input_name(c, taken | set(keep)) if c in taken else c for c in keep]
        # (the driver's warning, _score_shards, names them with the same rule)
        out = out.rename_columns(names)
    for name, values in scores.items():
        values = np.asarray(values)
        if name == "labels_used":
            for j, col in enumerate(USED_COLUMNS):
                out = out.append_column(col, pa.array(values[:, j].astype(np.float64)))
        else:
            out = out.append_column(name, pa.array(values))
    return out


def _input_name(name: str, taken: set[str]) -> str:
    """``input_<name>`` (``input_input_<name>`` ... where that is in ``taken`` too)."""
    name = f"input_{name}"
    while name in taken:
        name = f"input_{name}"
    return name


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
    marginal: str = ScoreConfig.marginal,
    carry_columns: Sequence[str] = (),
    scorer_cls: type = CatalogScorer,
    scorer_kwargs: dict | None = None,
):
    """The lazy Ray Dataset of scores of the checked ``shards``
    (:class:`~mendis_ray.distributed.data.ShardSet`); nothing runs until it is consumed
    (written, or iterated as the benchmark does).  ``scorer_cls``: :class:`CatalogScorer`
    or a subclass (the benchmark's adds timing columns); ``scorer_kwargs``: the Scorer
    knobs (:meth:`~mendis_ray.config.ScoreConfig.scorer_kwargs`)."""
    from mendis_ray.distributed.data import read_spectra

    if marginal not in MARGINAL_MODES:
        raise ValueError(f"marginal must be unlabelled, all or none, got {marginal!r}")
    opts = actor_pool_options(
        min_actors=min_actors,
        max_actors=max_actors,
        num_cpus_per_actor=num_cpus_per_actor,
        num_gpus_per_actor=num_gpus_per_actor,
        batch_size=batch_size,
    )
    # one bad pixel must not stop a catalog: the scorer flags it (nonfinite)
    ds = read_spectra(shards, extra_columns=tuple(carry_columns), strict=False)
    if max(shards.rows, default=0) > batch_size:
        # One block per shard file otherwise: a 1,000-row shard would go to a single actor.
        # Shards that fit in a batch need no split, and the repartition costs: its tasks
        # copy every block and take CPU slots from the reads (at 100,000 spectra in
        # 1,000-row shards it halved the feed, and 2 signal-model actors idled half the
        # time; bench/bench_infer.py --model signal).
        ds = ds.repartition(target_num_rows_per_block=batch_size)
    return ds.map_batches(
        scorer_cls,
        fn_constructor_kwargs={
            "checkpoint": str(checkpoint),
            "grid": dict(shards.grid),
            "marginal": marginal,
            "num_threads": threads_per_actor or default_actor_threads(num_cpus_per_actor),
            "device": "cuda" if num_gpus_per_actor else "cpu",
            "scorer_kwargs": scorer_kwargs,
        },
        **opts,
    )


def score_catalog(
    checkpoint: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    config: ScoreConfig | None = None,
    *,
    carry_columns: Sequence[str] | None = None,
    labels_path: str | os.PathLike | None = None,
    ingest_shards: int | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    verdicts: str | os.PathLike | None = None,
    **settings: object,
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
        config: the score settings (:class:`~mendis_ray.config.ScoreConfig`: label-free
            rows, batch size (default: the checkpoint kind's), actor pool, ranking,
            outputs, Scorer knobs); default ``ScoreConfig()``.
        carry_columns: scalar input columns copied to the scores (default: every non-list
            column common to all shards that the outputs can hold; one named as an output
            column is copied as ``input_<name>``).
        labels_path: allStar-like table of labels for FITS inputs.
        ingest_shards: shards of the ingested FITS (default: about 1,000 spectra each).
        address, num_cpus: the Ray cluster to join, or the local one's logical CPUs.
        verdicts: a verdicts file (e.g. the page's ``verdicts.json`` download) merged into
            ``out/verdicts.parquet``; the stored verdicts go into the outputs' ``verdict``
            and ``verdict_note`` columns.
        settings: ScoreConfig fields that replace ``config``'s (``top_n=10``, ...).

    Returns:
        a :class:`CatalogResult`.

    Raises:
        ShardError naming the bad shard (and row); CheckpointError; ValueError for bad
        settings.
    """
    # imported here, not at the top: the actors import this module, and the outputs'
    # modules (astropy, the explanations) would add to every actor's start
    from mendis_ray.distributed.catalog_outputs import commit_outputs, write_catalog_outputs
    from mendis_ray.distributed.session import ensure_ray
    from mendis_ray.triage.verdicts import verdicts_for_run

    cfg = (config or ScoreConfig()).replace(**settings)  # validates
    checkpoint, out = Path(checkpoint), Path(out)
    check_out_folder(out)
    _check_out_is_not_an_input(out, inputs)
    with _removed_on_failure(out):
        t_start, timings = time.perf_counter(), {}
        ckpt = _prepare_out(checkpoint, out)
        cfg = cfg.replace(batch_size=cfg.batch_size_for(ckpt.kind))  # the model's default
        stored_verdicts = verdicts_for_run(out, verdicts)  # a bad file fails before scoring
        shards, fits_files = _gather_shards(ckpt, inputs, out, labels_path, ingest_shards,
                                            timings)  # fmt: skip
        if carry_columns is None:
            carry_columns = common_scalar_columns(shards.files)
        resources = ensure_ray(address, num_cpus=num_cpus)
        pool = _actor_pool(resources, cfg)
        stage = out / f".run.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # this run's outputs
        try:
            stage.mkdir()
            staged = _score_shards(checkpoint, shards, cfg, pool, carry_columns, stage, timings)
            summary = write_catalog_outputs(
                staged, stage, shards, cfg, checkpoint=checkpoint, fits_files=fits_files,
                pool=pool, resources=resources, verdicts=stored_verdicts, t_start=t_start,
                timings=timings, final=out,
            )  # fmt: skip
            if interrupt.pending():  # Ctrl-C while writing: the earlier run's outputs stay
                raise KeyboardInterrupt
            commit_outputs(stage, out)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    scores_dir = out / "scores"
    log.info("wrote %s, %s, %s in %.1f s", scores_dir, out / "top_outliers.csv",
             out / "summary.json", summary["seconds"])  # fmt: skip
    gallery = summary["files"]["gallery"]
    return CatalogResult(
        out, scores_dir, out / "top_outliers.csv", out / "top_outliers.parquet",
        None if gallery is None else Path(gallery), out / "summary.json", summary,
    )  # fmt: skip


def _check_out_is_not_an_input(out: Path, inputs: Sequence[str | os.PathLike]) -> None:
    """A ValueError if ``out`` is an input folder or the folder of an input Parquet file:
    the outputs' Parquet tables would be read as spectra when it is scored again (a
    subfolder is not read)."""
    if not out.exists():
        return
    for p in map(Path, inputs):
        folder = p if p.is_dir() else p.parent if p.suffix.lower() == ".parquet" else None
        if folder is not None and folder.resolve() == out.resolve():
            raise ValueError(
                f"--out {str(out)!r} is the folder of the input {str(p)!r}: the outputs' "
                "Parquet tables would be read as spectra when it is scored again; choose "
                "another --out (a subfolder will do)"
            )


@contextlib.contextmanager
def _removed_on_failure(out: Path) -> Iterator[None]:
    """Run the body with ``out`` (a folder, or not there yet); if it fails or is
    interrupted, remove ``out`` where this run made it (a rerun into an existing folder
    keeps the earlier results: the outputs are staged and moved in at the end), and on
    Ctrl-C stop the embedded Ray now."""
    created = not out.exists()  # a file there: refused before, by check_out_folder
    try:
        yield
        if interrupt.pending():  # Ctrl-C swallowed on the way: the run does not count
            raise KeyboardInterrupt
    except BaseException as err:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(err, KeyboardInterrupt):
            from mendis_ray.distributed.session import shutdown_embedded_ray

            shutdown_embedded_ray()
        raise


def _actor_pool(resources: dict, cfg: ScoreConfig) -> dict:
    """The actor pool of a run (``summary.json``'s ``actors``): ``cfg``'s, with the
    defaults filled from the cluster's ``resources`` (one GPU per actor where it has
    GPUs)."""
    num_cpus, num_gpus = cfg.num_cpus_per_actor, cfg.num_gpus_per_actor
    if num_gpus is None:
        num_gpus = 1.0 if resources.get("GPU", 0) > 0 else 0.0
    max_actors = cfg.max_actors
    if max_actors is None:
        max_actors = max(cfg.min_actors, default_max_actors(resources, num_cpus, num_gpus))
    threads = cfg.threads_per_actor or default_actor_threads(num_cpus)
    return {"min": cfg.min_actors, "max": max_actors, "num_cpus": num_cpus,
            "num_gpus": num_gpus, "torch_threads": threads}  # fmt: skip


def _score_shards(
    checkpoint: Path, shards, cfg: ScoreConfig, pool: dict, carry_columns, out: Path,
    timings: dict,
) -> Path:  # fmt: skip
    """Score the checked ``shards`` on the actor ``pool`` into ``out/scores``."""
    log.info(
        "scoring %d spectra from %d shard(s) with %s: actor pool %d-%d x (%.2g CPU, %.2g "
        "GPU, %d torch thread(s)), batches of %d, label-free scores for %s rows",
        shards.n_rows, len(shards.files), checkpoint, pool["min"], pool["max"],
        pool["num_cpus"], pool["num_gpus"], pool["torch_threads"], cfg.batch_size, cfg.marginal,
    )  # fmt: skip
    ds = build_pipeline(
        checkpoint, shards, batch_size=cfg.batch_size, min_actors=pool["min"],
        max_actors=pool["max"], num_cpus_per_actor=pool["num_cpus"],
        num_gpus_per_actor=pool["num_gpus"], threads_per_actor=pool["torch_threads"],
        marginal=cfg.marginal, carry_columns=carry_columns,
        scorer_kwargs=cfg.scorer_kwargs(),
    )  # fmt: skip
    scores_dir = _write_scores(ds, shards.files, shards.n_rows, out, cfg.batch_size, timings)
    names = set(pq.read_schema(next(iter(sorted(scores_dir.glob("*.parquet"))))).names)
    carried = set(carry_columns)
    renamed = {c: n for c in carry_columns if (n := _input_name(c, carried)) in names}
    if renamed:
        log.warning("input column(s) %s are named as outputs: copied as %s", list(renamed),
                    list(renamed.values()))  # fmt: skip
    return scores_dir


def _prepare_out(checkpoint: Path, out: Path):
    """The checkpoint's :class:`~mendis_ray.flow.checkpoint.CheckpointInfo` (a
    CheckpointError for a bad one), with ``out`` made and cleared of stale temporaries.
    The checkpoint is checked here, before Ray starts, as each actor will load it: a
    signal-space model loaded whole (megabytes), a full-space flow's tensor file checked
    (:func:`~mendis_ray.flow.checkpoint.verify_tensors`; its weights load in the actors).
    A broken one used to surface only in the actors, as pages of Ray tracebacks."""
    from mendis_ray.flow.checkpoint import checkpoint_info, verify_tensors
    from mendis_ray.science.signal_scores import load_scorer

    ckpt = checkpoint_info(checkpoint)
    ckpt.require_grid()
    if ckpt.kind == "signal":
        load_scorer(checkpoint)
    else:
        verify_tensors(checkpoint, ckpt.config, ckpt.tensors)
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
    if shards.n_rows == 0:
        raise ShardError(f"no spectra to score: the {len(shards.files)} input shard(s) in "
                         f"{[str(p) for p in inputs]} hold no rows")  # fmt: skip
    find_duplicate_ids(shards.files)  # the outputs are keyed by id: refuse ambiguity now
    return shards, fits_files


def _write_scores(
    ds, files: Sequence[Path], n_rows: int, out: Path, batch_size: int, timings: dict
) -> Path:
    """Run the pipeline ``ds`` over ``files`` into a temporary folder, check every row
    came back, and rename it to ``out/scores`` (replacing an earlier run's)."""
    scores_dir = out / "scores"
    tmp = out / f".scores.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    try:
        with named_errors(files):  # the error is raised here, named
            ds.write_parquet(str(tmp), min_rows_per_file=max(batch_size, 100_000))
        n_written = pq.ParquetDataset(tmp).read(columns=["id"]).num_rows if tmp.exists() else 0
        if n_written != n_rows:
            raise RuntimeError(f"scored {n_written} rows but the shards hold {n_rows}; {tmp} kept")
        replace_dir(tmp, scores_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    timings["score_s"] = time.perf_counter() - t0
    log.info(
        "scored %d spectra in %.1f s (%.1f spectra/s)",
        n_rows, timings["score_s"], n_rows / timings["score_s"],
    )  # fmt: skip
    return scores_dir


# ----------------------------------------------------------------------------- CLI


def main_score(args) -> int:
    """``mendis score`` (:func:`mendis_ray.cli_ray.cmd_score`; kept at its old path)."""
    from mendis_ray.cli_ray import cmd_score

    return cmd_score(args)
