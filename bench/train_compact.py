"""Train the `compact` flow on the simulated paper training set (CPU, no Ray) and compare
it, side by side in one run, with the Gaussian and PCA baselines and Hotelling's T^2.

    python bench/train_compact.py                 # ~15 min on 2 cores
    python bench/train_compact.py --quick         # a few minutes, small sets (smoke test)

Stages (each logs its progress):
1. speed: our flow vs stock nflows of the same architecture and the machine's measured
   FP32 matmul peak (``bench/bench_flow.py``, same process, same weights);
2. data: the paper's sets from ``mendis simulate`` shards (written if absent) plus, in
   memory, the hard cases: training-like stars at S/N 1000 and an abundance just outside
   the training range;
3. training with the no-Ray loop (Gaussian-whitened start, early stopping on validation);
4. held-out log-likelihood and AUROC of every score for every outlier class;
5. conditional p(spectrum | 4300 K, 2.1, 0.0) by MALA, correlation clusters vs the
   simulator's truth; 6. reconstruction.

Writes ``bench/results/train_compact.json`` and figures beside it, and a checkpoint
(with the scorer's reference) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, report

from mendis_ray import experiment as ex
from mendis_ray.config import get_preset
from mendis_ray.flow.checkpoint import save_checkpoint
from mendis_ray.flow.coupling import compiled_splines
from mendis_ray.science import figures
from mendis_ray.science.ood import Scorer
from mendis_ray.spectra.datasets import paper_sets, write_simulated_set
from mendis_ray.spectra.shards import read_dataset, table_arrays
from mendis_ray.spectra.simulate import Simulator

log = logging.getLogger("train_compact")


def load_sets(data: Path, sim: Simulator, quick: bool) -> dict[str, ex.Arrays]:
    specs = paper_sets(*((3000, 600, 300) if quick else (20_000, 2_000, 1_000)))
    out = {}
    for i, spec in enumerate(specs):
        path = data / spec.name
        if not path.exists():
            log.info("simulating %s (%d spectra) into %s", spec.name, spec.n, path)
            write_simulated_set(data, spec, sim, set_index=i)
        a = table_arrays(read_dataset(path, sim.grid))
        out[spec.name] = ex.Arrays(a.flux, a.ivar, a.labels)
        log.info("read %s: %d spectra", spec.name, len(a.flux))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sets and short training")
    p.add_argument("--data", type=Path, default=None, help="shard folder (default per mode)")
    p.add_argument("--out", type=Path, default=Path("mendis_out/compact"))
    p.add_argument("--minutes", type=float, default=None, help="training time limit")
    p.add_argument("--lr", type=float, default=3e-4, help="Adam lr of the couplings")
    p.add_argument(
        "--linear-lr-scale", type=float, default=0.0,
        help="lr multiplier of ActNorm/LU (0: they stay at the Gaussian start)",
    )  # fmt: skip
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument(
        "--no-compile", action="store_true",
        help="train with eager splines (default: torch.compile'd splines while training)",
    )  # fmt: skip
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t_all = time.perf_counter()
    flow_cfg, train_cfg = get_preset("compact")
    minutes = args.minutes if args.minutes is not None else (1.5 if args.quick else 20.0)
    train_cfg = train_cfg.replace(
        lr=args.lr,
        linear_lr_scale=args.linear_lr_scale,
        epochs=args.epochs or (3 if args.quick else 40),
        patience=4,
    )
    data = args.data or Path("mendis_out/simulated_quick" if args.quick else "mendis_out/simulated")
    args.out.mkdir(parents=True, exist_ok=True)
    fig_dir = RESULTS / "train_compact"
    fig_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"preset": flow_cfg.to_dict(), "train_config": train_cfg.__dict__}

    # 1. speed, side by side with stock nflows and the measured matmul peak
    if not args.skip_speed:
        import bench_flow

        log.info("stage 1/6: flow speed vs stock nflows")
        bench_flow.main(["--compile"] + (["--quick"] if args.quick else []))
    if (RESULTS / "flow.json").exists():  # this run's, or the latest separate speed run
        result["speed"] = json.loads((RESULTS / "flow.json").read_text())
        if args.skip_speed:
            result["speed"]["note"] = "from bench/results/flow.json (--skip-speed)"

    # 2. data
    log.info("stage 2/6: data")
    sim = Simulator()
    sets = load_sets(data, sim, args.quick)
    subtle = ex.subtle_sets(sim, 300 if args.quick else 1000)

    # 3. training
    log.info("stage 3/6: training %s for at most %.1f min", flow_cfg.name, minutes)
    with compiled_splines(not args.no_compile):  # training only: measured no gain in eval
        res = ex.train_flow(
            sets["train"],
            flow_cfg,
            train_cfg,
            {**sim.grid.describe(), "wavelength": sim.grid.wavelength},
            time_limit_s=60 * minutes,
        )
    hist = res.history
    result["training"] = {
        "compiled_splines": not args.no_compile,
        "seconds": res.seconds,
        "epochs_run": len(hist.epochs),
        "initial_val_log_prob": hist.initial_val_log_prob,
        "best_epoch": hist.best_epoch,
        "best_val_log_prob": hist.best_val_log_prob,
        "history": hist.epochs,
        "n_parameters": res.density.flow.n_parameters(),
    }
    figures.training_curve(hist, fig_dir / "training.png")

    # 4. likelihood and OOD
    log.info("stage 4/6: held-out likelihood and outlier scores")
    std = res.density.standardizer
    # the Ledoit-Wolf Gaussian and factor analysis fitted in train_flow (one is the start)
    baselines = ex.baseline_scores(
        std, sets["train"], n_t2=(5, 20), n_pca=20, fitted=res.start_models
    )
    result["training"]["start"] = res.start
    result["training"]["start_val_log_prob"] = res.start_val_log_prob
    result["held_out_log_likelihood"] = ex.held_out_log_likelihood(
        res.density, baselines, sets["test"]
    )
    n_ref = len(sets["test"]) // 2
    tst = sets["test"]
    ref = ex.Arrays(tst.flux[:n_ref], tst.ivar[:n_ref], tst.labels[:n_ref])
    test = ex.Arrays(tst.flux[n_ref:], tst.ivar[n_ref:], tst.labels[n_ref:])
    scorers = {}
    for k in (5, "auto"):
        scorers[k] = Scorer.fit(
            res.density, ref.flux, ref.labels, n_signal=k, n_marginal=0,
            gaussian=res.gaussian, basis_flux=sets["train"].flux[:5000],
            basis_labels=sets["train"].labels[:5000],
        )  # fmt: skip
    scorer = scorers["auto"]
    result["n_signal_auto"] = int(scorer.reference.basis.shape[0])
    log.info("signal subspace: auto keeps %d directions", result["n_signal_auto"])
    eval_sets = {
        "test": test, "cemp": sets["cemp"], "rotator": sets["rotator"],
        "stripped": sets["stripped"], **subtle,
    }  # fmt: skip
    pairs = {
        "cemp": "test", "rotator": "test", "stripped": "test",
        "mg_edge": "inliers", "inliers_snr1000": "inliers",
    }  # fmt: skip
    rows, scores = ex.ood_table(scorer, baselines, eval_sets, pairs)
    # the k = 5 signal score beside the automatic one
    for name in ("mg_edge", "inliers", "inliers_snr1000", "test", "cemp", "rotator", "stripped"):
        arr = eval_sets[name]
        scores[name]["flow_signal_5"] = scorers[5].score(arr.flux, arr.ivar, arr.labels)[
            "signal_score"
        ]
    from mendis_ray.science.metrics import auroc

    for out_name, in_name in pairs.items():
        rows.append(
            {
                "outliers": out_name, "inliers": in_name, "score": "flow_signal_5",
                "auroc": auroc(scores[in_name]["flow_signal_5"], scores[out_name]["flow_signal_5"]),
            }
        )  # fmt: skip
    result["auroc"] = rows
    # S/N test: the share of S/N-1000 inliers ranked more typical than every S/N-300 one
    snr = {}
    for s in scores["inliers"]:
        lo, hi = scores["inliers"][s], scores["inliers_snr1000"][s]
        snr[s] = float(np.mean(hi > np.nanmax(lo)))
    result["snr1000_above_all_snr300"] = snr
    figures.score_histograms(scores, pairs, fig_dir / "scores.png")
    ex.save_npz(
        args.out / "scores.npz",
        **{f"{s}.{k}": v for s, d in scores.items() for k, v in d.items()},
    )
    save_checkpoint(
        args.out / "checkpoint", res.density, train_cfg,
        metrics={"best_val_log_prob": hist.best_val_log_prob},
        extra_arrays=scorer.checkpoint_arrays(),
    )  # fmt: skip

    # 5. conditional sampling and correlation structure
    log.info("stage 5/6: conditional p(spectrum | 4300 K, 2.1, 0.0) by MALA")
    cond = ex.conditional_analysis(
        res.density, res.gaussian, sim,
        n_true=1000 if args.quick else 4000,
        n_chains=32 if args.quick else 64,
        n_warmup=100 if args.quick else 300,
        n_keep=50 if args.quick else 150,
    )  # fmt: skip
    result["conditional"] = cond.metrics
    figures.correlation_panels(cond, sim.grid.wavelength, fig_dir / "correlation.png")

    # 6. reconstruction
    log.info("stage 6/6: reconstruction")
    rec = ex.reconstruction_analysis(res.density, test, n=8, steps=150 if args.quick else 400)
    result["reconstruction"] = rec["metrics"]
    figures.reconstruction(rec, sim.grid.wavelength, fig_dir / "reconstruction.png")

    result["wall_seconds"] = time.perf_counter() - t_all
    table = _summary_rows(result)
    report("train_compact", table, extra=result)
    print(f"figures: {fig_dir}")
    print(f"checkpoint: {args.out / 'checkpoint'}")
    return 0


def _summary_rows(result: dict) -> list[dict]:
    rows = []
    ll = result["held_out_log_likelihood"]
    for model, v in ll.items():
        rows.append({"what": "held-out mean log p (nats)", "model": model, "value": v})
    for r in result["auroc"]:
        rows.append(
            {"what": f"AUROC {r['outliers']} vs {r['inliers']}", "model": r["score"],
             "value": r["auroc"]}
        )  # fmt: skip
    for s, v in result["snr1000_above_all_snr300"].items():
        rows.append({"what": "frac S/N1000 above all S/N300", "model": s, "value": v})
    c = result["conditional"]
    for name in ("flow", "gaussian", "true"):
        cl = c[f"{name}_clusters"]
        rows.append(
            {"what": "cluster ARI vs dominant element", "model": name,
             "value": cl["ari_vs_dominant_element"]}
        )  # fmt: skip
    for name in ("flow", "gaussian"):
        rows.append(
            {"what": "corr matrix RMSE vs true", "model": name,
             "value": c[f"{name}_vs_true"]["rmse"]}
        )  # fmt: skip
    rows.append(
        {"what": "reconstruction RMS / noise", "model": "flow",
         "value": result["reconstruction"]["rms_over_noise"]}
    )  # fmt: skip
    return rows


if __name__ == "__main__":
    sys.exit(main())
