"""Which pixels move together: correlation of conditional samples, a thresholded graph,
its connected components, and the matrix re-indexed so that elements show as blocks
(the Mendis paper's Fig. 2, middle and right).

Pipeline: samples of p(spectrum | labels) -> keep pixels with real absorption (mean
depth above ``min_depth``) -> Pearson correlation matrix C -> graph with an edge (i, j)
where C_ij > ``threshold`` -> connected components (scipy.sparse.csgraph) -> permutation
that lists components largest first -> C re-indexed.  With simulated data, components
are scored against the simulator's dominant element per pixel (adjusted Rand index and
purity), and C against the true conditional correlation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

__all__ = ["CorrelationClusters", "absorption_pixels", "correlation_clusters", "matrix_error"]


def absorption_pixels(mean_flux: np.ndarray, min_depth: float = 0.02) -> np.ndarray:
    """Indices of pixels whose mean normalized flux is below ``1 - min_depth``."""
    return np.flatnonzero(np.asarray(mean_flux) < 1.0 - min_depth)


@dataclass
class CorrelationClusters:
    """Result of :func:`correlation_clusters` (indices refer to the pixels kept).

    Attributes:
        pixels: (m,) indices into the full grid of the pixels analysed.
        corr: (m, m) correlation matrix in grid order.
        labels: (m,) connected-component id per pixel (0 = largest component).
        order: (m,) permutation listing components largest first.
        sizes: (n_components,) component sizes, largest first.
        threshold: the edge threshold used.
    """

    pixels: np.ndarray
    corr: np.ndarray
    labels: np.ndarray
    order: np.ndarray
    sizes: np.ndarray
    threshold: float

    @property
    def reindexed(self) -> np.ndarray:
        """The correlation matrix with rows and columns in component order."""
        return self.corr[np.ix_(self.order, self.order)]

    def n_multi(self) -> int:
        """Number of components with more than one pixel."""
        return int((self.sizes > 1).sum())


def correlation_clusters(
    samples: np.ndarray, pixels: np.ndarray, threshold: float = 0.8
) -> CorrelationClusters:
    """Correlation graph analysis of ``samples`` (n, n_pix) over ``pixels``."""
    x = np.asarray(samples, dtype=np.float64)[:, pixels]
    x = x - x.mean(axis=0)
    sd = x.std(axis=0)
    sd[sd == 0] = np.inf  # constant pixels correlate with nothing
    z = x / sd
    corr = (z.T @ z) / x.shape[0]
    np.fill_diagonal(corr, 1.0)
    adj = csr_matrix(np.triu(corr > threshold, k=1))
    _, raw = connected_components(adj, directed=False)
    counts = np.bincount(raw)
    rank = np.empty_like(counts)
    rank[np.argsort(-counts, kind="stable")] = np.arange(counts.size)
    labels = rank[raw]
    order = np.lexsort((np.arange(labels.size), labels))
    return CorrelationClusters(
        pixels=np.asarray(pixels),
        corr=corr,
        labels=labels,
        order=order,
        sizes=np.sort(counts)[::-1],
        threshold=threshold,
    )


def matrix_error(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Agreement of two correlation matrices over their off-diagonal entries."""
    iu = np.triu_indices_from(a, k=1)
    d = a[iu] - b[iu]
    return {
        "rmse": float(np.sqrt(np.mean(d**2))),
        "mean_abs": float(np.mean(np.abs(d))),
        "pearson": float(np.corrcoef(a[iu], b[iu])[0, 1]),
    }
