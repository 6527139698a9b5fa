"""Why the stars between the alpha sequences stay hard: two measurements on a trained model.

    python bench/bench_ood.py --save-signal mendis_out/bench_ood/signal
    python bench/bench_alpha_valley.py --checkpoint mendis_out/bench_ood/signal

1. Does the flow have the valley?  Along the direction in which [alpha/Fe] moves at fixed
   labels (a least-squares fit of the signal coordinates on the labels and the simulator's
   true [alpha/Fe]: an oracle direction), the flow's own 1-D density through each star is
   evaluated on a grid; the star's highest-density-region level in that 1-D profile (the
   probability mass of the profile above the star's density) is a valley detector that no
   other direction can dilute.
2. Does a joint density dilute it?  The signal coordinates are sheared by a quadratic
   regression on the labels and rotated to the generalized eigenvectors of (residual
   covariance, mean noise covariance); a 2-D kernel density of ([Fe/H], the rotated
   coordinate most correlated with the true [alpha/Fe]) scores the set, then the same plus
   a full-covariance Gaussian log density of the other coordinates (13 dimensions in all).

AUROC of ``between_alpha`` (and three other sets) against the held-out inliers; writes
``bench/results/alpha_valley.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import scipy.linalg as sl
import torch
from scipy.stats import gaussian_kde, multivariate_normal

from mendis_ray.science.metrics import auroc
from mendis_ray.science.signal_scores import load_scorer
from mendis_ray.spectra.shards import read_dataset, table_arrays

RESULTS = Path(__file__).resolve().parent / "results"
SETS = ("test", "between_alpha", "off_branch", "single_element", "second_population")


def load(model, folder: Path, n: int):
    """Signal coordinates of the first n stars of a set and their true [alpha/Fe]."""
    t = read_dataset(folder)
    a = table_arrays(t)
    c = model.coordinates(a.flux[:n], a.ivar[:n], a.labels[:n])
    return c, t.column("truth_alpha_fe").to_numpy()[:n]


@torch.no_grad()
def profile_hdr(model, c, v: np.ndarray, n_grid: int = 96, half: float = 4.0) -> np.ndarray:
    """(n,) mass of the flow's 1-D density along direction v (k+3,) above the star's own."""
    x = model.packed(c)  # (n, k + 3 + 1): coordinates, noise context
    own = model.flow(x).double().numpy()
    steps = torch.from_numpy(np.linspace(-half, half, n_grid)[:, None] * v[None]).float()
    xx = x[:, None, :].repeat(1, n_grid, 1)
    xx[:, :, :-1] += steps  # (n, grid, k + 4)
    lp = model.flow(xx.reshape(-1, x.shape[1])).double().numpy().reshape(len(x), n_grid)
    top = lp.max(1, keepdims=True)
    p, p_own = np.exp(lp - top), np.exp(own[:, None] - top)
    return ((p / p.sum(1, keepdims=True)) * (p > p_own)).sum(1)


def quad(labels: np.ndarray) -> np.ndarray:
    """(n, 10) constant, linear and quadratic terms of the standardized labels."""
    cols = [np.ones(len(labels))] + [labels[:, i] for i in range(3)]
    cols += [labels[:, i] * labels[:, j] for i in range(3) for j in range(i, 3)]
    return np.column_stack(cols)


def rotated(model, c_train):
    """A function: coordinates -> (n, k+3) label-sheared, noise-whitened coordinates."""
    k, y = model.basis.k, c_train.y
    coef = np.linalg.lstsq(quad(y[:, k:]), y[:, :k], rcond=None)[0]
    r = y[:, :k] - quad(y[:, k:]) @ coef
    lam = model.basis.eigenvalues
    noise = (c_train.proj.cov / np.sqrt(lam[:, None] * lam[None, :])).mean(0)
    _, vec = sl.eigh(np.cov(r.T), noise)
    vec = vec[:, ::-1] / np.std(r @ vec[:, ::-1], axis=0)
    return lambda c: np.column_stack([(c.y[:, :k] - quad(c.y[:, k:]) @ coef) @ vec, c.y[:, k:]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a signal model trained on --data")
    p.add_argument("--data", default="mendis_out/bench_ood/data")
    p.add_argument("--n", type=int, default=1000, help="stars per set")
    args = p.parse_args()
    model, data = load_scorer(args.checkpoint).model, Path(args.data)
    c_tr, a_tr = load(model, data / "train", 20_000)
    sets = {s: load(model, data / s, args.n)[0] for s in SETS}
    k = model.basis.k
    design = np.column_stack([np.ones(len(a_tr)), c_tr.y[:, k:], a_tr])
    v = np.r_[np.linalg.lstsq(design, c_tr.y[:, :k], rcond=None)[0][-1], np.zeros(3)]
    v /= np.linalg.norm(v)
    rot = rotated(model, c_tr)
    y_tr = rot(c_tr)
    j = int(np.argmax([abs(np.corrcoef(y_tr[:, i], a_tr)[0, 1]) for i in range(k)]))
    rest = [i for i in range(k + 3) if i not in (j, k + 2)]
    kde = gaussian_kde(y_tr[:8000][:, [k + 2, j]].T, bw_method=0.08)
    gauss = multivariate_normal(y_tr[:, rest].mean(0), np.cov(y_tr[:, rest].T))
    scores = {
        "flow_log_q": lambda c: model.flow_log_prob(c),
        "flow_profile_along_alpha": lambda c: -profile_hdr(model, c, v),
        "kde_feh_alpha_coordinate": lambda c: kde.logpdf(rot(c)[:, [k + 2, j]].T),
        "kde_plus_gaussian_rest": lambda c: (
            kde.logpdf(rot(c)[:, [k + 2, j]].T) + gauss.logpdf(rot(c)[:, rest])
        ),
    }
    out = {}
    for name, f in scores.items():
        s = {n: f(c) for n, c in sets.items()}
        out[name] = {n: round(auroc(s["test"], s[n]), 3) for n in SETS[1:]}
        print(f"{name:26s}", "  ".join(f"{n} {a:.3f}" for n, a in out[name].items()))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "alpha_valley.json").write_text(json.dumps({"auroc": out, "k": k}, indent=1))


if __name__ == "__main__":
    main()
