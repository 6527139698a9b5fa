"""The ``mendis`` command line.

mendis simulate [--out DIR] [--n-train N] ...   paper training set + outlier sets
mendis ingest apogee FILE... --out DIR [--labels allStar.fits]
mendis inspect PATH                               summary of a shard or dataset folder
mendis demo [--quick]                             the whole experiment on a local Ray
mendis train DATA --out DIR                       Ray Train (TorchTrainer) on shards
mendis tune DATA --out DIR                        Ray Tune: k x depth (signal) or lr x depth
mendis serve CHECKPOINT                           Ray Serve HTTP scoring (127.0.0.1)
mendis score CHECKPOINT INPUTS... --out DIR       batch scoring of a catalog (Ray Data)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("mendis_ray")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _print_table(rows: list[dict], cols: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r[c]).ljust(widths[c]) for c in cols))


def _fmt(v: object) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def cmd_simulate(args: argparse.Namespace) -> int:
    from mendis_ray.spectra.datasets import paper_sets, write_simulated_set
    from mendis_ray.spectra.grid import get_grid
    from mendis_ray.spectra.simulate import Simulator

    out = Path(args.out)
    sim = Simulator(grid=get_grid(args.grid))
    if args.population == "survey":
        return _simulate_survey(args, sim, out)
    specs = paper_sets(args.n_train, args.n_test, args.n_outlier, args.shards)
    log.info(
        "simulating %d sets into %s (grid %s, %d px, S/N %g, seed %d)",
        len(specs),
        out,
        sim.grid.name,
        sim.grid.n_pix,
        args.snr,
        args.seed,
    )
    t0 = time.perf_counter()
    rows = [
        write_simulated_set(
            out,
            spec,
            sim,
            seed=args.seed,
            set_index=k,
            noise=args.noise,
            snr=args.train_snr if spec.name == "train" and args.train_snr is not None else args.snr,
        )
        for k, spec in enumerate(specs)
    ]
    total = time.perf_counter() - t0
    figures = []
    if not args.no_figures:
        from mendis_ray.spectra.plots import plot_element_response, plot_examples

        figures.append(plot_examples(sim, out / "figures" / "example_spectra.png", seed=args.seed))
        figures.append(plot_element_response(sim, out / "figures" / "element_response.png"))
    summary = {
        "out": str(out),
        "grid": sim.grid.describe(),
        "sets": rows,
        "seconds": total,
        "figures": [str(f) for f in figures],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(
        f"\nWrote {sum(r['rows'] for r in rows)} spectra on the {sim.grid.name} grid "
        f"({sim.grid.n_pix} px) in {total:.1f} s:"
    )
    _print_table(rows, ["set", "rows", "shards", "megabytes", "seconds", "path"])
    for f in figures:
        print(f"figure: {f}")
    print(f"summary: {out / 'summary.json'}")
    return 0


def _simulate_survey(args: argparse.Namespace, sim, out: Path) -> int:
    """``mendis simulate --population survey``: the survey population and its outlier sets
    (per-star S/N, so ``--snr`` / ``--train-snr`` / ``--noise`` do not apply)."""
    from mendis_ray.spectra.datasets import survey_sets, write_survey_set

    specs = survey_sets(args.n_train, args.n_test, args.n_outlier, args.shards)
    log.info("simulating %d survey sets into %s (seed %d)", len(specs), out, args.seed)
    t0 = time.perf_counter()
    rows = [write_survey_set(out, spec, sim, seed=args.seed, set_index=k)
            for k, spec in enumerate(specs)]  # fmt: skip
    total = time.perf_counter() - t0
    figures = []
    if not args.no_figures:
        from mendis_ray.spectra.plots import plot_population

        figures.append(plot_population(out / "train", out / "figures" / "population.png"))
    summary = {"out": str(out), "population": "survey", "grid": sim.grid.describe(),
               "sets": rows, "seconds": total, "figures": [str(f) for f in figures]}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nWrote {sum(r['rows'] for r in rows)} survey spectra in {total:.1f} s:")
    _print_table(rows, ["set", "rows", "shards", "megabytes", "seconds", "path"])
    for f in figures:
        print(f"figure: {f}")
    print(f"summary: {out / 'summary.json'}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from mendis_ray.spectra.grid import get_grid
    from mendis_ray.spectra.ingest import ingest_apogee

    files = ingest_apogee(
        [Path(p) for p in args.files],
        Path(args.out),
        grid=get_grid(args.grid),
        labels_path=Path(args.labels) if args.labels else None,
        n_shards=args.shards,
    )
    for f in files:
        print(f"wrote {f}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import numpy as np

    from mendis_ray.spectra.shards import dataset_files, read_shard, shard_metadata, table_arrays

    files = dataset_files(args.path)
    meta = shard_metadata(files[0])
    n = 0
    for f in files:
        a = table_arrays(read_shard(f))
        n += a.flux.shape[0]
        good = a.ivar > 0
        median = float(np.median(a.flux[good])) if good.any() else float("nan")
        print(
            f"{f}: {a.flux.shape[0]} rows, {a.flux.shape[1]} px, "
            f"good pixels {good.mean():.1%}, median flux {median:.3f}"
        )
    print(
        f"total {n} rows; grid {meta['grid']['name']} ({meta['grid']['n_pix']} px); "
        f"generator {meta.get('generator', {}).get('name', '?')}"
    )
    return 0


def _ray_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="compact", choices=["tiny", "compact", "paper"])
    p.add_argument("--n-units", type=int, default=None, help="flow units (default: preset's)")
    p.add_argument("--hidden", type=int, default=None, help="conditioner width (preset's)")
    p.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    p.add_argument("--lr", type=float, default=None, help="default: the preset's")
    p.add_argument("--linear-lr-scale", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=2, help="TorchTrainer workers (DDP ranks)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--snr", type=float, default=300.0, help="degrade the shards to this S/N")
    p.add_argument(
        "--no-label-scatter",
        action="store_true",
        help="keep the shards' labels (they are already observed labels)",
    )
    p.add_argument("--fixed-noise", action="store_true", help="the same noise every epoch")
    p.add_argument("--storage", default=None, help="Ray Train / Tune storage path (default: "
                   "OUT/ray_runs; s3:// or gs:// or NFS on a multi-node cluster)")  # fmt: skip
    p.add_argument("--resume", default=None, help="run or checkpoint folder to resume from")
    p.add_argument("--checkpoint-every", type=int, default=1)
    p.add_argument("--max-failures", type=int, default=2)
    p.add_argument("--minutes", type=float, default=None, help="training time limit")
    p.add_argument("--address", default=None, help="Ray cluster address (default: local)")


def _ray_train_configs(args: argparse.Namespace):
    from mendis_ray.config import get_preset
    from mendis_ray.distributed.data import DegradeConfig
    from mendis_ray.distributed.train import RayTrainConfig

    flow_cfg, train_cfg = get_preset(args.preset)
    changes = {
        k: v
        for k, v in {
            "epochs": args.epochs, "lr": args.lr, "linear_lr_scale": args.linear_lr_scale,
            "batch_size": args.batch_size,
        }.items()
        if v is not None
    }  # fmt: skip
    train_cfg = train_cfg.replace(**changes)
    arch = {k: v for k, v in {"n_units": args.n_units, "hidden": args.hidden}.items() if v}
    if arch:
        flow_cfg = flow_cfg.replace(name=f"{flow_cfg.name}-custom", **arch)
    ray_cfg = RayTrainConfig(
        num_workers=args.workers,
        use_gpu=args.gpu,
        cpus_per_worker=args.cpus_per_worker,
        storage_path=args.storage or str(Path(args.out) / "ray_runs"),
        resume_from=args.resume,
        checkpoint_every=args.checkpoint_every,
        max_failures=args.max_failures,
        degrade=DegradeConfig(
            snr=args.snr,
            label_scatter=None if args.no_label_scatter else DegradeConfig().label_scatter,
            fresh_noise=not args.fixed_noise,
        ),
        time_limit_s=None if args.minutes is None else 60 * args.minutes,
    )
    return flow_cfg, train_cfg, ray_cfg


def cmd_train(args: argparse.Namespace) -> int:
    if args.model == "signal":
        return cmd_train_signal(args)
    from mendis_ray.distributed.session import ensure_ray
    from mendis_ray.distributed.train import fit_reference, train_distributed, training_verdict
    from mendis_ray.flow.checkpoint import save_checkpoint

    flow_cfg, train_cfg, ray_cfg = _ray_train_configs(args)
    ensure_ray(args.address)
    res = train_distributed(args.data, args.out, flow_cfg, train_cfg, ray_cfg)
    scorer = fit_reference(res.density, res.val_x, res.start_models.get("gaussian"))
    start_val = res.start_val_log_prob.get(res.start, float("nan"))
    verdict = training_verdict(res.history, start_val)
    best = save_checkpoint(
        Path(args.out) / "checkpoint", res.density, train_cfg,
        metrics={"history": res.history, "start": res.start, **verdict}, extra=res.info,
        extra_arrays=scorer.checkpoint_arrays(),
    )  # fmt: skip
    for h in res.history:
        print(f"epoch {h['epoch']}: train log p {h['train_log_prob']:.1f}, "
              f"val log p {h['val_log_prob']:.1f}, {h['samples_per_s']:.0f} spectra/s")  # fmt: skip
    print(f"best checkpoint: {best}")
    print(f"Ray Train run (resume with --resume): {res.run_dir}")
    return _report_verdict(verdict, res.start, train_cfg)


def _report_verdict(verdict: dict, start: str, train_cfg) -> int:
    """Say plainly when the flow kept its Gaussian start, loudly when training diverged;
    the exit status: 3 when it diverged and nothing improved on the start, else 0."""
    if verdict["improved"]:
        return 0
    start_val = verdict["start_val_log_prob"]
    kept = (f"the flow did not improve on its Gaussian start ({start}, validation log p "
            f"{start_val:.1f}): the checkpoint holds that start")  # fmt: skip
    if not verdict["diverged"]:
        log.warning("%s", kept)
        print(f"note: {kept}; it scores as that Gaussian (train longer, or use the default "
              "signal-space model)")  # fmt: skip
        return 0
    log.warning("TRAINING DIVERGED: %s", kept)
    print(
        f"error: training diverged (the log p of the epochs above fell far below the start, "
        f"lr {train_cfg.lr:g}, linear-lr-scale {train_cfg.linear_lr_scale:g}); {kept}. "
        "Lower --lr or --linear-lr-scale and train again.", file=sys.stderr,
    )  # fmt: skip
    return 3


def cmd_train_signal(args: argparse.Namespace) -> int:
    """``mendis train --model signal``: the signal-space model, trained in this process
    (a small flow on k + 3 dimensions; no Ray needed)."""
    from mendis_ray.config import SignalConfig
    from mendis_ray.train.signal import train_signal_checkpoint

    changes = {
        k: v
        for k, v in {
            "n_signal": args.k, "n_units": args.n_units, "hidden": args.hidden,
            "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
            "seed": args.seed,
        }.items()
        if v is not None
    }  # fmt: skip
    cfg = SignalConfig().replace(**changes)
    minutes = args.minutes
    s = train_signal_checkpoint(
        args.data if isinstance(args.data, list) else [args.data], args.out, cfg,
        time_limit_s=None if minutes is None else 60 * minutes, show_progress=not args.quiet,
    )  # fmt: skip
    print(
        f"\nsignal-space model: k = {s['k']} signal directions + 3 labels, {s['train_rows']} "
        f"training / {s['val_rows']} validation spectra, {s['epochs']} epochs "
        f"(best {s['best_epoch']}) in {s['seconds']:.1f} s"
    )
    print(
        f"validation log q (flow coordinates): {s['initial_val_log_q']:.2f} at the start -> "
        f"{s['best_val_log_q']:.2f}; mean total log p {s['val_log_p']:.1f} nats per spectrum"
    )
    print(f"checkpoint: {s['checkpoint']}")
    return 0


def _csv(text: str | None, kind: type, default: str | None = None) -> tuple | None:
    """``"1,2"`` -> (1, 2) of ``kind`` (``default`` when ``text`` is None; None if both are)."""
    text = default if text is None else text
    return None if text is None else tuple(kind(x) for x in text.split(",") if x.strip())


def cmd_tune(args: argparse.Namespace) -> int:
    if args.model == "signal":
        return cmd_tune_signal(args)
    from mendis_ray.distributed.session import ensure_ray
    from mendis_ray.distributed.tune import TuneConfig, tune_flow

    flow_cfg, train_cfg, ray_cfg = _ray_train_configs(args)
    tune_cfg = TuneConfig(
        lr=_csv(args.lrs, float, "1e-4,3e-4"),
        n_units=_csv(args.units, int, "2,4"),
        max_concurrent_trials=args.concurrent,
    )
    ensure_ray(args.address)
    res = tune_flow(args.data, args.out, flow_cfg, train_cfg, ray_cfg, tune_cfg)
    _print_table(res.trials, ["lr", "n_units", "best_val_log_prob", "epochs", "status"])
    print(f"best: lr {res.best['lr']:g}, {res.best['n_units']} units")
    print(f"trials: {res.out / 'trials.csv'}")
    print(f"best checkpoint: {res.best_checkpoint}")
    return 0


def cmd_tune_signal(args: argparse.Namespace) -> int:
    """``mendis tune --model signal``: a Ray Tune grid over k x depth (x lr) of the
    signal-space model, ranked by the validation log p of the total model."""
    from mendis_ray.config import SignalConfig
    from mendis_ray.distributed.session import ensure_ray
    from mendis_ray.distributed.tune import SignalTuneConfig, tune_signal

    changes = {
        k: v
        for k, v in {
            "hidden": args.hidden, "epochs": args.epochs, "lr": args.lr,
            "batch_size": args.batch_size,
        }.items()
        if v is not None
    }  # fmt: skip
    cfg = SignalConfig().replace(**changes)
    tune_cfg = SignalTuneConfig(
        ks=_csv(args.ks, int), n_units=_csv(args.units, int, "4,6"), lr=_csv(args.lrs, float),
        cpus_per_trial=args.cpus_per_trial, max_concurrent_trials=args.concurrent,
        time_limit_s=None if args.minutes is None else 60 * args.minutes,
        storage_path=args.storage or str(Path(args.out) / "ray_runs"),
    )  # fmt: skip
    ensure_ray(args.address)
    res = tune_signal(args.data, args.out, cfg, tune_cfg)
    rows = [{**t, "lr": f"{t['lr']:g}"} for t in res.trials]
    _print_table(rows, ["k", "n_units", "lr", "val_log_p", "val_log_q", "epochs", "status"])
    b = res.best
    print(f"best: k {b['k']}, {b['n_units']} units, lr {b['lr']:g}: validation log p "
          f"{b['val_log_p']:.1f} nats per spectrum (total model)")  # fmt: skip
    print(f"trials: {res.out / 'trials.csv'}")
    print(f"best checkpoint: {res.best_checkpoint}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from mendis_ray.distributed.demo import DemoConfig, analyze_checkpoint
    from mendis_ray.science.report import auroc_table

    cfg = DemoConfig(out=args.out, address=args.address, conditional=not args.no_conditional)
    res = analyze_checkpoint(args.checkpoint, args.data, cfg)
    print(auroc_table(res["auroc"]))
    print(f"report: {res['report']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mendis_ray.distributed.demo import DemoConfig, run_demo

    kw = {
        "out": args.out, "preset": args.preset, "workers": args.workers,
        "address": args.address, "conditional": not args.no_conditional,
    }  # fmt: skip
    if args.quick:
        cfg = DemoConfig.quick_config(**kw)
    else:
        cfg = DemoConfig(n_train=args.n_train, epochs=args.epochs, minutes=args.minutes, **kw)
    res = run_demo(cfg)
    print("\nAUROC (outliers vs inliers; 1 = perfect, 0.5 = blind):")
    from mendis_ray.science.report import auroc_table

    print(auroc_table(res["auroc"]))
    print(f"\nfinished in {res['wall_seconds'] / 60:.1f} min")
    print(f"report: {res['report']}")
    print(f"checkpoint: {res['checkpoint']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mendis", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="write the paper's training set and outlier sets as shards")
    s.add_argument("--out", default="mendis_out/simulated", help="output folder")
    s.add_argument("--n-train", type=int, default=20_000)
    s.add_argument("--n-test", type=int, default=2_000, help="held-out inliers")
    s.add_argument("--n-outlier", type=int, default=1_000, help="spectra per outlier class")
    s.add_argument("--shards", type=int, default=8, help="shards of the training set")
    s.add_argument(
        "--snr", type=float, default=300.0,
        help="S/N of the written spectra; 0 writes noise-free spectra with true labels "
        "(to be degraded by the Ray Data pipeline)",
    )  # fmt: skip
    s.add_argument(
        "--train-snr", type=float, default=None,
        help="S/N of the training set only (default: --snr; 0 = noise-free, for jobs/train.py "
        "whose Ray Data pipeline adds fresh noise every epoch)",
    )  # fmt: skip
    s.add_argument("--noise", choices=["photon", "flat"], default="photon")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--population", choices=["paper", "survey"], default="paper",
        help="paper: the paper's box and its three outlier classes; survey: a survey-like "
        "giant population (curved branch, two alpha sequences, S/N 50-1000, masks) and its "
        "outlier sets (mendis_ray.spectra.population)",
    )  # fmt: skip
    s.add_argument("--grid", default="paper", choices=["paper", "aspcap", "apstar"])
    s.add_argument("--no-figures", action="store_true")
    s.set_defaults(func=cmd_simulate)

    i = sub.add_parser("ingest", help="read survey FITS files into shards")
    isub = i.add_subparsers(dest="survey", required=True)
    a = isub.add_parser("apogee", help="APOGEE apStar / aspcapStar files")
    a.add_argument("files", nargs="+")
    a.add_argument("--out", required=True, help="output dataset folder")
    a.add_argument("--labels", help="allStar-like FITS table with APOGEE_ID, TEFF, LOGG, FE_H")
    a.add_argument("--grid", default="paper", choices=["paper", "aspcap", "apstar"])
    a.add_argument("--shards", type=int, default=1)
    a.set_defaults(func=cmd_ingest)

    n = sub.add_parser("inspect", help="validate and summarise a shard or dataset folder")
    n.add_argument("path")
    n.set_defaults(func=cmd_inspect)

    # --- Ray: demo, train, tune (mendis_ray.distributed) -----------------------------
    d = sub.add_parser(
        "demo", help="the paper's experiment end to end on a local Ray; writes a report"
    )
    d.add_argument("--out", default="mendis_out/demo")
    d.add_argument("--n-train", type=int, default=4000)
    d.add_argument("--epochs", type=int, default=8)
    d.add_argument("--minutes", type=float, default=5.0, help="training time limit")
    d.add_argument("--workers", type=int, default=2, help="TorchTrainer workers")
    d.add_argument("--preset", default="compact", choices=["tiny", "compact", "paper"])
    d.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    d.add_argument("--no-conditional", action="store_true", help="skip the MCMC stage")
    d.add_argument("--quick", action="store_true", help="a few-minute smoke run")
    d.set_defaults(func=cmd_demo)

    a = sub.add_parser(
        "analyze", help="the demo's analysis (scores vs baselines, correlations, "
        "reconstruction, report) for a trained checkpoint"
    )  # fmt: skip
    a.add_argument("checkpoint")
    a.add_argument("--data", required=True, help="simulated sets (train, test, cemp, ...)")
    a.add_argument("--out", required=True)
    a.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    a.add_argument("--no-conditional", action="store_true", help="skip the MCMC stage")
    a.set_defaults(func=cmd_analyze)

    t = sub.add_parser(
        "train", help="train a model on shards: the signal-space model (default, in-process) "
        "or the paper's full-space flow (--model flow, Ray Train)",
    )  # fmt: skip
    t.add_argument("data", help="training shards (a folder; for --model flow the last shards "
                   "validate, for --model signal a seeded random 10%%)")  # fmt: skip
    t.add_argument("--out", required=True, help="output folder (checkpoint, init checkpoint)")
    t.add_argument(
        "--model", choices=["signal", "flow"], default="signal",
        help="signal: flow on the signal coordinates + calibrated residual (the benchmark's "
        "best); flow: the paper's flow on all pixels with Ray Train",
    )  # fmt: skip
    t.add_argument("--k", type=int, default=None, help="signal directions (default: automatic)")
    t.add_argument("--seed", type=int, default=None, help="signal model: seed (0)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    _ray_train_args(t)
    t.set_defaults(func=cmd_train)

    u = sub.add_parser(
        "tune", help="Ray Tune: signal directions k x depth of the signal-space model "
        "(default), or learning rate x depth of the full-space flow with ASHA (--model flow)",
    )  # fmt: skip
    u.add_argument("data", help="training shards")
    u.add_argument("--out", required=True, help="output folder (trial table, best checkpoint)")
    u.add_argument(
        "--model", choices=["signal", "flow"], default="signal",
        help="signal: grid over --ks x --units (x --lrs), trials ranked by the validation log "
        "p of the total model; flow: the full-space flow, --lrs x --units with ASHA",
    )  # fmt: skip
    _ray_train_args(u)
    u.add_argument("--ks", default="5,10,20", help="signal: comma-separated numbers of signal "
                   "directions k")  # fmt: skip
    u.add_argument("--lrs", default=None, help="comma-separated learning rates (flow: default "
                   "1e-4,3e-4; signal: default not searched, --lr or 1e-3)")  # fmt: skip
    u.add_argument("--units", default=None, help="comma-separated numbers of flow units "
                   "(default: flow 2,4; signal 4,6)")  # fmt: skip
    u.add_argument("--cpus-per-trial", type=float, default=0.5, help="signal: CPUs per trial")
    u.add_argument("--concurrent", type=int, default=1, help="trials at once")
    u.set_defaults(func=cmd_tune)

    # --- serve (mendis_ray.distributed.serving) -------------------------------------
    v = sub.add_parser("serve", help="serve a checkpoint over HTTP with Ray Serve (local)")
    v.add_argument("checkpoint", help="checkpoint folder")
    v.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--batch-size", type=int, default=None, help="spectra per model batch (64)")
    v.add_argument("--batch-wait-timeout-s", type=float, default=None, help="default 0.01")
    v.add_argument("--num-cpus", type=float, default=None, help="per replica (all cores)")
    v.add_argument("--num-gpus", type=float, default=None, help="per replica (0)")
    v.add_argument("--num-replicas", type=int, default=None, help="fixed count (1)")
    v.add_argument("--max-request-bytes", type=int, default=None, help="413 above (64 MiB)")
    v.add_argument("--max-marginal", type=int, default=None, help="label-free spectra (8)")
    v.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    v.add_argument(
        "--triage", default=None, metavar="DIR",
        help="also serve the triage page of a scored catalog (mendis score --out DIR) at "
        "/triage; verdicts clicked there are saved to DIR/verdicts.parquet",
    )  # fmt: skip
    v.set_defaults(func=lambda a: _lazy("mendis_ray.distributed.serving", "main_serve")(a))

    # --- score (mendis_ray.distributed.infer) -----------------------------------------
    c = sub.add_parser("score", help="score a catalog of shards (or APOGEE FITS) with Ray Data")
    c.add_argument("checkpoint", help="checkpoint folder")
    c.add_argument("inputs", nargs="+", help="shard folders/files, or apStar/aspcapStar FITS")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--batch-size", type=int, default=256, help="spectra per actor call")
    c.add_argument("--min-actors", type=int, default=1, help="smallest actor pool")
    c.add_argument(
        "--max-actors", type=int, default=None,
        help="largest actor pool (default: as many as the cluster's GPUs or CPUs - 1 allow)",
    )  # fmt: skip
    c.add_argument("--cpus-per-actor", type=float, default=1.0, help="fractions allowed")
    c.add_argument(
        "--gpus-per-actor", type=float, default=None,
        help="default: 1 if the cluster has GPUs, else 0",
    )  # fmt: skip
    c.add_argument(
        "--threads-per-actor", type=int, default=None,
        help="torch threads per actor (default: its whole CPUs, at least 1)",
    )  # fmt: skip
    c.add_argument("--top-n", type=int, default=100, help="rows of top_outliers.csv")
    c.add_argument("--gallery-n", type=int, default=12, help="outliers in gallery.png (0: none)")
    c.add_argument(
        "--marginal", choices=["unlabelled", "all", "none"], default="unlabelled",
        help="rows that get the (slow) label-free score",
    )  # fmt: skip
    c.add_argument(
        "--rank-by", choices=["percentile", "signal"], default="percentile",
        help="percentile: primary score (log p); signal: projected signal score",
    )  # fmt: skip
    c.add_argument(
        "--flags-first", action="store_true", help="rank flagged spectra before unflagged ones"
    )
    c.add_argument(
        "--html", action="store_true",
        help="also write OUT/triage.html: the ranked outliers with their explanations and "
        "verdict buttons, a self-contained page that opens with no internet",
    )  # fmt: skip
    c.add_argument(
        "--verdicts", default=None, metavar="FILE",
        help="verdicts to carry into the outputs, e.g. the verdicts.json downloaded from "
        "triage.html; merged into OUT/verdicts.parquet (always read when present)",
    )  # fmt: skip
    c.add_argument("--labels", help="allStar-like FITS table of labels for FITS inputs")
    c.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    c.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a local Ray")
    c.set_defaults(func=lambda a: _lazy("mendis_ray.distributed.infer", "main_score")(a))
    return p


def _lazy(module: str, name: str):
    """A command implemented in ``module`` (imported only when the command runs)."""
    import importlib

    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except ValueError as err:  # bad input: a clear message, no traceback
        log.debug("details", exc_info=True)
        print(f"mendis {args.command}: error: {err}", file=sys.stderr)
        _stop_embedded_ray()
        return 2
    except KeyboardInterrupt:  # Ctrl-C: stop the embedded Ray (agents included) now
        print(f"mendis {args.command}: interrupted", file=sys.stderr)
        _stop_embedded_ray()
        return 130


def _stop_embedded_ray() -> None:
    """Stop a Ray this process started or joined (nothing if Ray was never imported)."""
    if "ray" in sys.modules:
        from mendis_ray.distributed.session import shutdown_embedded_ray

        shutdown_embedded_ray()


if __name__ == "__main__":
    sys.exit(main())
