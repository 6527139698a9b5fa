"""Science methods on top of a fitted density: out-of-distribution scoring and its metrics,
the classical baselines that share the flow's scoring API (a shrinkage full-covariance
Gaussian, probabilistic PCA and Hotelling T^2 in ``baselines``; AUROC, ROC curves,
percentile ranks and cluster scores in ``metrics``), conditional correlations, clustering,
reconstruction and figures.  ``baselines`` and ``metrics`` use numpy and scipy only."""
