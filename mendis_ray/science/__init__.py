"""Science methods on top of a fitted density: out-of-distribution scoring and its metrics,
the classical baselines that share the flow's scoring API (a shrinkage full-covariance
Gaussian, factor analysis, probabilistic PCA and Hotelling T^2 in ``baselines``, which
re-exports them from ``gaussian_baselines`` and ``subspace_baselines``; AUROC, ROC curves,
percentile ranks and cluster scores in ``metrics``), conditional correlations, clustering,
reconstruction and figures.  The baselines and ``metrics`` use numpy and scipy only."""
