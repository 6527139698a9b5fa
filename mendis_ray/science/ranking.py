"""Rank a catalog's scores from most to least outlying and build its outlier table.

Pure pyarrow/numpy (no Ray, no torch): :mod:`mendis_ray.distributed.infer` writes the
scores of a catalog as Parquet and calls these on them; a notebook can call them on any
table with the same columns.

**Ranking.**  ``rank_by="percentile"`` (default) sorts by the primary score's percentile,
ascending (full-space flow: against the checkpoint's held-out reference spectra;
signal-space model: 100 x exp(score)); ties -- every spectrum below the whole reference
has percentile 0, and exp(score) underflows below score -745 -- are broken by
``log_p_per_dim`` ascending (``score`` for a signal-space checkpoint, which has no
per-dimension log p).
``rank_by="signal"`` uses ``signal_percentile`` then ``signal_score``; ``"residual"``
``residual_percentile`` then ``residual_score``.  A score of +-inf (an impossible
spectrum) ranks first, rows without a score (NaN) come last.
Flags do not change the order unless ``flags_first=True``, which lists every flagged row
before the unflagged ones (each group ranked as above).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mendis_ray.science.flags import flag_names
from mendis_ray.spectra.shards import LABEL_COLUMNS

__all__ = [
    "RANK_KEYS",
    "TOP_COLUMNS",
    "USED_COLUMNS",
    "rank_keys",
    "rank_outliers",
    "read_ranking",
    "top_table",
    "typical_rows",
]

#: ``Scorer.score``'s ``labels_used`` (n, 3) as one column per label.
USED_COLUMNS = tuple(f"{c}_used" for c in LABEL_COLUMNS)
RANK_KEYS = {
    "percentile": ("percentile", "log_p_per_dim"),
    "signal": ("signal_percentile", "signal_score"),
    "residual": ("residual_percentile", "residual_score"),
}
#: The tie-break of the primary percentile for a signal-space checkpoint (which has no
#: per-dimension log p: its primary score is the combined tail probability ``score``).
SIGNAL_PRIMARY = ("percentile", "score")
#: The leading columns of the outlier table (the scores, then the input's other columns).
TOP_COLUMNS = (
    "rank", "id", "percentile", "score", "strongest_test", "signal_score", "residual_score",
    "residual_percentile", "chi2_dof", "log_p_per_dim", "signal_percentile", "log_ratio_gaussian",
    "flags", "flag_names", "log_p", "log_p_marginal", *USED_COLUMNS,
    *LABEL_COLUMNS, "snr", "masked_fraction", "flag_nonfinite", "flag_masked",
    "flag_flux_range", "flag_label_range", "flag_unscorable", "flag_noise_range", "path",
)  # fmt: skip
#: The columns the explanations add to the outlier table (science.explain).
SUMMARY_COLUMNS = (
    "explanation", "resid_chi2_per_pix", "n_features", "top_feature_wl", "top_feature_line",
    "top_element", "top_element_share", "top_element_offset",
)  # fmt: skip
#: The names the outputs give their own columns, whatever the model kind: an input column
#: named so is copied as ``input_<name>`` (``distributed.infer.scores_table``).
OUTPUT_COLUMNS = (
    *(c for c in TOP_COLUMNS if c not in ("id", "snr", "path", *LABEL_COLUMNS)),
    "ref_id", "verdict", "verdict_note", *SUMMARY_COLUMNS,
)  # fmt: skip


def rank_keys(table: pa.Table, rank_by: str) -> tuple[str, ...]:
    """The columns that rank ``table`` for ``rank_by`` (the primary percentile of a
    signal-space checkpoint's scores is tie-broken by ``score``)."""
    if rank_by not in RANK_KEYS:
        raise ValueError(f"rank_by must be one of {sorted(RANK_KEYS)}, got {rank_by!r}")
    if rank_by == "percentile" and "log_p_per_dim" not in table.column_names:
        return SIGNAL_PRIMARY
    return RANK_KEYS[rank_by]


def rank_outliers(
    table: pa.Table, *, rank_by: str = "percentile", flags_first: bool = False
) -> np.ndarray:
    """Row indices (n,) of ``table`` from most to least outlying (see the module doc).

    ``table`` needs the ``rank_keys(table, rank_by)`` columns (and ``flags`` with
    ``flags_first``).  +-inf scores sort first (impossible spectra), NaN scores ("no
    score") last; exact ties keep the table's order."""
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


def read_ranking(scores_dir: str | os.PathLike, rank_by: str) -> pa.Table:
    """The columns of a folder of score shards that rank it (``id``, ``path``, ``flags``,
    the ``rank_by`` and primary keys, ``score`` where present), every row."""
    scores_dir = Path(scores_dir)
    if rank_by not in RANK_KEYS:
        raise ValueError(f"rank_by must be one of {sorted(RANK_KEYS)}, got {rank_by!r}")
    names = set(pq.read_schema(next(iter(sorted(scores_dir.glob("*.parquet"))))).names)
    wanted = {"id", "path", "flags", *RANK_KEYS["percentile"], *RANK_KEYS[rank_by], "score"}
    return pq.read_table(scores_dir, columns=sorted(wanted & names))


def typical_rows(ranking: pa.Table, n: int, exclude: np.ndarray) -> np.ndarray:
    """Indices of the ``n`` most typical unflagged rows of ``ranking`` (highest percentile,
    then its tie-break score) that are not in ``exclude``; rows without a finite
    tie-break score are never typical."""
    order = rank_outliers(ranking)[::-1]
    flags = ranking.column("flags").to_numpy()
    lp = ranking.column(rank_keys(ranking, "percentile")[1]).to_numpy(zero_copy_only=False)
    keep = (flags[order] == 0) & np.isfinite(lp[order]) & ~np.isin(order, exclude)
    return order[keep][:n]


def top_table(scores_dir: str | os.PathLike, ranking: pa.Table, top_idx: np.ndarray) -> pa.Table:
    """The full score rows (read from ``scores_dir``) of the ``ranking`` rows ``top_idx``,
    in that order, with ``rank`` (1 = first) and ``flag_names`` and the
    :data:`TOP_COLUMNS` first.  A row is matched on (``id``, ``path``)."""
    ids = ranking.column("id").take(pa.array(top_idx, pa.int64()))
    full = pq.read_table(scores_dir, filters=pc.field("id").isin(ids))
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
