"""Label-free scoring with the flow's parameters frozen (issue 12) against the same
scoring with every parameter requiring a gradient (what scoring did before): the label
profile back-propagates only into the 3 labels, and the LU layers use their cached dense
weights.  Same flow, same spectra, same process, the two modes interleaved.

    python bench/bench_freeze.py [--preset compact] [--n 32] [--threads 2] [--rounds 2]

Prints a table and writes bench/results/freeze.json.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import torch
from _common import report

from mendis_ray.config import get_preset
from mendis_ray.flow.density import SpectrumDensity, Standardizer
from mendis_ray.flow.gaussian_init import initialize_whitened
from mendis_ray.flow.model import MendisFlow
from mendis_ray.science import label_profile, ood
from mendis_ray.science.baselines import GaussianBaseline
from mendis_ray.spectra.simulate import Simulator, paper_training_labels


def build(preset: str, n_train: int, seed: int = 0) -> tuple[ood.Scorer, np.ndarray]:
    """A flow of ``preset`` at the Gaussian of simulated S/N-300 spectra, its scorer (no
    reference: the timing is the profile's) and spectra to score."""
    sim = Simulator()
    rng = np.random.default_rng(seed)
    labels = paper_training_labels(n_train, rng)
    flux = sim(labels) + rng.standard_normal((n_train, sim.grid.n_pix)) / 300.0
    obs = np.stack([labels.teff, labels.logg, labels.feh], axis=1)
    std = Standardizer.fit(flux, obs)
    x = std.transform(flux, obs).astype(np.float64)
    flow_cfg, _ = get_preset(preset)
    flow = MendisFlow(flow_cfg, seed=seed)
    initialize_whitened(flow, torch.from_numpy(x).float(), GaussianBaseline().fit(x).covariance_)
    flow.eval()
    grid = sim.grid.describe()
    return ood.Scorer(SpectrumDensity(flow, std, flow_cfg, grid)), flux


def time_mode(scorer: ood.Scorer, flux: np.ndarray, frozen: bool) -> tuple[float, np.ndarray]:
    real = label_profile.frozen_parameters  # what profile_labels calls
    if not frozen:  # what scoring did before: every parameter requires a gradient
        label_profile.frozen_parameters = lambda module: contextlib.nullcontext()
    try:
        t0 = time.perf_counter()
        out = scorer.score(flux, marginal="all", batch_size=len(flux))
        return time.perf_counter() - t0, out["log_p_marginal"]
    finally:
        label_profile.frozen_parameters = real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="compact")
    ap.add_argument("--n", type=int, default=32, help="spectra scored label-free per call")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scorer, flux = build(args.preset, max(600, 4 * args.n))
    batch = flux[: args.n]
    time_mode(scorer, batch[:2], True)  # warm-up (allocations, caches)
    times: dict[bool, list[float]] = {False: [], True: []}
    scores = {}
    for _ in range(args.rounds):
        for frozen in (False, True):
            dt, lp = time_mode(scorer, batch, frozen)
            times[frozen].append(dt)
            scores[frozen] = lp
    best = {k: min(v) for k, v in times.items()}
    rows = [
        {"parameters": "require grad (before)", "seconds": best[False],
         "spectra_per_s": args.n / best[False], "speed_up": 1.0},
        {"parameters": "frozen (now)", "seconds": best[True],
         "spectra_per_s": args.n / best[True], "speed_up": best[False] / best[True]},
    ]  # fmt: skip
    diff = float(np.max(np.abs(scores[True] - scores[False])))
    report("freeze", rows, {"preset": args.preset, "n": args.n, "threads": args.threads,
                            "rounds": args.rounds, "all_times": {str(k): v for k, v in
                            times.items()}, "max_abs_log_p_difference": diff})  # fmt: skip
    print(f"largest |log p_marginal| difference between the modes: {diff:.2e} nats")


if __name__ == "__main__":
    main()
