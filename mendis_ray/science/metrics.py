"""Metrics for outlier scores and for clusterings (numpy and scipy only).

Score convention (shared with :mod:`mendis_ray.science.baselines` and the flow): a HIGHER
score means MORE TYPICAL (inlier-like).  So :func:`auroc` is the probability that a random
inlier outscores a random outlier, and :func:`roc_curve` sweeps an acceptance threshold
``score >= t``.

Cluster metrics compare two labelings of the same items through their contingency table:
:func:`adjusted_rand_index` (Hubert & Arabie 1985) and :func:`purity` (Manning, Raghavan &
Schuetze 2008, sec. 16.3).

References:
    H. B. Mann & D. R. Whitney (1947), Ann. Math. Stat. 18, 50; D. J. Hand & R. J. Till
    (2001), Machine Learning 45, 171 (AUC as the Mann-Whitney statistic).
    T. Fawcett (2006), "An introduction to ROC analysis", Pattern Recogn. Lett. 27, 861.
    L. Hubert & P. Arabie (1985), "Comparing partitions", J. Classification 2, 193.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

__all__ = [
    "adjusted_rand_index",
    "auroc",
    "contingency_table",
    "percentile_rank",
    "purity",
    "roc_curve",
]


def _scores_1d(x: np.ndarray, what: str, where: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{where}: {what} must be real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False).ravel()
    if arr.size == 0:
        raise ValueError(f"{where}: {what} is empty")
    if np.isnan(arr).any():
        raise ValueError(f"{where}: {what} contains NaN (first at index {np.isnan(arr).argmax()})")
    return arr


def auroc(score_in: np.ndarray, score_out: np.ndarray) -> float:
    """Area under the ROC curve: P(random inlier scores higher than random outlier).

    Ties count 1/2: ``AUROC = (#{s_in > s_out} + #{s_in == s_out} / 2) / (n_in n_out)``,
    computed from the Mann-Whitney U statistic on mid-ranks, ``U = R_in - n_in (n_in + 1)/2``
    (O(n log n)).  0.5 = no separation, 1 = every inlier above every outlier, 0 = reversed.

    Args:
        score_in: (n_in,) scores of inliers (higher = more typical); +-inf allowed.
        score_out: (n_out,) scores of outliers.

    Raises:
        ValueError: an empty input or a NaN score.
    """
    s_in = _scores_1d(score_in, "score_in", "auroc")
    s_out = _scores_1d(score_out, "score_out", "auroc")
    n_in, n_out = s_in.size, s_out.size
    ranks = stats.rankdata(np.concatenate([s_in, s_out]), method="average")
    u = float(np.sum(ranks[:n_in])) - n_in * (n_in + 1) / 2.0
    return u / (float(n_in) * float(n_out))


def roc_curve(
    score_in: np.ndarray, score_out: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of the rule "accept as typical when ``score >= t``".

    Args:
        score_in: (n_in,) inlier scores (the positives).
        score_out: (n_out,) outlier scores.

    Returns:
        fpr (m,): fraction of outliers accepted (score >= t);
        tpr (m,): fraction of inliers accepted;
        thresholds (m,): decreasing, the first ``+inf`` (nothing accepted, the point (0, 0)),
        then every distinct score, the last the minimum score (everything accepted, (1, 1)).
        ``np.trapezoid(tpr, fpr) == auroc(score_in, score_out)``, ties included.  For the
        outlier-detection view (flag when ``score < t``), detection rate = ``1 - fpr`` and
        false-alarm rate = ``1 - tpr``.
    """
    s_in = np.sort(_scores_1d(score_in, "score_in", "roc_curve"))
    s_out = np.sort(_scores_1d(score_out, "score_out", "roc_curve"))
    thr = np.unique(np.concatenate([s_in, s_out]))[::-1]
    tpr = (s_in.size - np.searchsorted(s_in, thr, side="left")) / s_in.size
    fpr = (s_out.size - np.searchsorted(s_out, thr, side="left")) / s_out.size
    return (
        np.concatenate([[0.0], fpr]),
        np.concatenate([[0.0], tpr]),
        np.concatenate([[np.inf], thr]),
    )


def percentile_rank(reference_scores: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Percentage of ``reference_scores`` that are <= each of ``scores``: the one
    percentile of every scorer (:mod:`~mendis_ray.science.ood`,
    :mod:`~mendis_ray.science.signal_scores`).

    With higher = more typical, 0 means less typical than every reference (for example
    every held-out training spectrum) and 100 means at least as typical as all of them.
    A score of -inf (what a scorer gives an impossible or unscorable spectrum) ranks 0,
    the most outlying rank; +inf ranks 100; NaN ("no score was computed") stays NaN.

    Args:
        reference_scores: (m,) finite-or-inf reference scores (no NaN), m >= 1.
        scores: (n,) (any shape) scores to rank; NaN gives NaN.

    Returns:
        (n,) float64 percentages in [0, 100], the shape of ``scores``.
    """
    ref = np.sort(_scores_1d(reference_scores, "reference_scores", "percentile_rank"))
    s = np.asarray(scores, dtype=np.float64)
    out = 100.0 * np.searchsorted(ref, s, side="right") / ref.size
    return np.where(np.isnan(s), np.nan, out)


def contingency_table(labels_a: np.ndarray, labels_b: np.ndarray) -> np.ndarray:
    """Counts ``C[i, j]`` of items with the i-th distinct label of ``labels_a`` and the j-th
    of ``labels_b`` (distinct labels in sorted order); both (n,) of any sortable dtype.
    Returns (n_labels_a, n_labels_b) int64."""
    a = np.asarray(labels_a).ravel()
    b = np.asarray(labels_b).ravel()
    if a.size != b.size:
        raise ValueError(f"contingency_table: {a.size} labels in labels_a but {b.size} in labels_b")
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    na = int(ia.max()) + 1 if a.size else 0
    nb = int(ib.max()) + 1 if b.size else 0
    return np.bincount(ia.ravel() * nb + ib.ravel(), minlength=na * nb).reshape(na, nb)


def _pairs(counts: np.ndarray) -> float:
    c = counts.astype(np.float64)
    return float(np.sum(c * (c - 1.0)) / 2.0)


def adjusted_rand_index(labels_a: np.ndarray, labels_b: np.ndarray) -> float:
    """Adjusted Rand index (Hubert & Arabie 1985) between two labelings of the same n items.

    From the contingency table ``n_ij`` with row sums ``a_i`` and column sums ``b_j``:
    ``ARI = (sum C(n_ij,2) - E) / ((sum C(a_i,2) + sum C(b_j,2)) / 2 - E)``,
    ``E = sum C(a_i,2) sum C(b_j,2) / C(n,2)``.  1 = identical partitions (label names do not
    matter), about 0 for independent random labelings, negative below chance (>= -1/2).
    When both labelings put everything in one cluster, or both make every item a singleton
    (the denominator is 0), or n <= 1, the partitions are identical and 1.0 is returned.
    """
    table = contingency_table(labels_a, labels_b)
    n = float(table.sum())
    if n <= 1:
        return 1.0
    sum_ij = _pairs(table)
    sum_a = _pairs(table.sum(axis=1))
    sum_b = _pairs(table.sum(axis=0))
    expected = sum_a * sum_b / (n * (n - 1.0) / 2.0)
    denom = 0.5 * (sum_a + sum_b) - expected
    if denom == 0.0:
        return 1.0
    return float((sum_ij - expected) / denom)


def purity(pred: np.ndarray, truth: np.ndarray) -> float:
    """Cluster purity: the fraction of items in the majority true class of their predicted
    cluster, ``sum_k max_j n_kj / n`` (in (0, 1]; 1 when every cluster is pure, trivially so
    for all singletons -- read it with the number of clusters or with the ARI)."""
    table = contingency_table(pred, truth)
    if table.size == 0:
        raise ValueError("purity: no items")
    return float(table.max(axis=1).sum() / table.sum())
