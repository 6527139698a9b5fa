"""The signal model's flow against the best Gaussian in the same signal coordinates.

    python bench/bench_signal_gaussian.py [--checkpoint DIR]   # after bench_ood.py's data

Trains the signal-space model on the survey benchmark's training rows (or loads
``--checkpoint``, which must have been trained on them: the last 10% validate), then
compares on the held-out validation rows the flow's log q(y | noise) with a full-covariance
Gaussian in the same coordinates, deconvolved: N(y; mu, Sigma + C_i) with C_i each star's
projected noise covariance and Sigma = cov(y) - mean(C_i) from the training rows.  Also the
AUROC per outlier set of three calibrated signal statistics: the flow's -log q, the
Gaussian's, and their ratio; and the margin per S/N bin of the validation stars.  Writes
``bench/results/signal_gaussian.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from mendis_ray.config import SignalConfig
from mendis_ray.science.benchmark import SNR_BINS
from mendis_ray.science.metrics import auroc
from mendis_ray.science.signal_scores import (
    NoiseCalibration,
    SignalScorer,
    load_scorer,
    match_noise,
)
from mendis_ray.science.signal_tails import rho_sig
from mendis_ray.train.signal import train_signal_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ood import load

RESULTS = Path(__file__).resolve().parent / "results"


def scorer_for(data, checkpoint: Path | None) -> SignalScorer:
    tr = data.train
    if checkpoint is not None and (checkpoint / "config.json").is_file():
        return load_scorer(checkpoint)
    res = train_signal_model(tr.flux, tr.ivar, tr.labels, SignalConfig(), show_progress=False)
    va = res.val_rows
    sc = SignalScorer.fit(res.model, tr.flux[va], tr.ivar[va], tr.labels[va], res.train_coords,
                          train=(tr.flux[: va.start], tr.ivar[: va.start],
                                 tr.labels[: va.start]), far_iqr=res.model.cfg.far_iqr)  # fmt: skip
    if checkpoint is not None:
        sc.save(checkpoint)
    return sc


def noise_y(m, c) -> np.ndarray:
    """(n, k+3, k+3) noise covariance of the coordinates y (labels: none)."""
    k = m.basis.k
    s = 1 / np.sqrt(m.basis.eigenvalues)
    out = np.zeros((len(c.y), k + 3, k + 3))
    out[:, :k, :k] = c.proj.cov * s[None, :, None] * s[None, None, :]
    return out


def gaussian(m, c_train):
    mu = c_train.y.mean(0)
    sig = np.cov(c_train.y.T) - noise_y(m, c_train).mean(0)
    w, v = np.linalg.eigh(sig)
    sig = (v * np.clip(w, 1e-4, None)) @ v.T

    def log_q(c) -> np.ndarray:
        chol = np.linalg.cholesky(sig[None] + noise_y(m, c))
        z = np.linalg.solve(chol, (c.y - mu)[..., None])[..., 0]
        logdet = np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(1)
        return -0.5 * (z**2).sum(1) - logdet - 0.5 * c.y.shape[1] * np.log(2 * np.pi)

    return log_q


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="mendis_out/bench_ood/data")
    p.add_argument("--checkpoint", default=None, help="reuse (or save) the trained scorer")
    args = p.parse_args()
    data = load(Path(args.data))
    sc = scorer_for(data, Path(args.checkpoint) if args.checkpoint else None)
    m, tr = sc.model, data.train
    n_val = max(2, round(0.1 * len(tr.flux)))
    a0 = len(tr.flux) - n_val
    log_g = gaussian(m, m.coordinates(tr.flux[:a0], tr.ivar[:a0], tr.labels[:a0]))
    snr_max = float(np.ravel(sc.ref["snr_max"])[0])
    sets = {"val": (tr.flux[a0:], tr.ivar[a0:], tr.labels[a0:])}
    sets |= {n: (a.flux, a.ivar, a.labels) for n, a in {"test": data.test, **data.sets}.items()}
    stats = {}
    for name, (f, iv, lab) in sets.items():
        if name != "val":
            f, iv = match_noise(np.asarray(f, np.float32), np.asarray(iv, np.float32), snr_max)
        c = m.coordinates(f, iv, lab)
        lq, lg = m.flow_log_prob(c), log_g(c)
        stats[name] = {"rho": rho_sig(c, m), "flow": -lq, "gaussian": -lg, "ratio": lg - lq}
    val = stats["val"]
    res = {"val_log_q_flow": float(-val["flow"].mean()),
           "val_log_q_gaussian": float(-val["gaussian"].mean())}  # fmt: skip
    res["flow_minus_gaussian"] = res["val_log_q_flow"] - res["val_log_q_gaussian"]
    # per S/N bin: the flow's margin grows with S/N, as the stars' structure is resolved
    snr, margin = tr.snr[a0:], val["gaussian"] - val["flow"]
    bins = {f"{lo:g}-{min(hi, 1000):g}": (snr >= lo) & (snr < hi) for lo, hi in SNR_BINS}
    by_snr = {k: float(margin[b].mean()) for k, b in bins.items() if b.any()}
    res["flow_minus_gaussian_by_snr"] = by_snr
    kinds = ("flow", "gaussian", "ratio")
    cal = {s: NoiseCalibration.fit(val["rho"], val[s]) for s in kinds}
    tails = {n: {s: cal[s].log_tail(d["rho"], d[s]) for s in kinds} for n, d in stats.items()}
    res["auroc"] = {n: {s: auroc(tails["snr300" if n == "snr1000" else "test"][s], tails[n][s])
                        for s in kinds} for n in data.sets if n != "snr300"}  # fmt: skip
    print(json.dumps(res, indent=1, default=float))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "signal_gaussian.json").write_text(json.dumps(res, indent=1, default=float))


if __name__ == "__main__":
    main()
