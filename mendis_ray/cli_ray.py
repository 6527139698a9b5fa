"""``mendis demo``, ``mendis analyze``, ``mendis serve`` and ``mendis score``: the
commands that run on a Ray cluster (:mod:`mendis_ray.distributed`, imported only when a
command runs).  The options of ``mendis score`` (and Serve's scoring options) are
generated from :class:`~mendis_ray.config.ScoreConfig`."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from mendis_ray.cli_options import SERVE_SCORE_FIELDS, add_config_options, config_from_args
from mendis_ray.config import ScoreConfig

__all__ = [
    "add_analyze_parser",
    "add_demo_parser",
    "add_score_parser",
    "add_serve_parser",
    "cmd_score",
]


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


def cmd_score(args: argparse.Namespace) -> int:
    """``mendis score CHECKPOINT INPUTS... --out DIR [options]``: score (the settings are
    the ScoreConfig the options were generated from), print what was written where."""
    from mendis_ray.distributed.infer import score_catalog

    res = score_catalog(
        args.checkpoint, args.inputs, args.out, config_from_args(ScoreConfig, args),
        labels_path=args.labels, address=args.address, num_cpus=args.num_cpus,
        verdicts=args.verdicts,
    )  # fmt: skip
    s = res.summary
    print(
        f"\nScored {s['rows']} spectra in {s['seconds']:.1f} s ({s['spectra_per_s']:.1f} "
        f"spectra/s overall, {s['scoring_spectra_per_s']:.1f} in the scoring step) on "
        f"{s['actors']['min']}-{s['actors']['max']} actor(s)"
    )
    print(f"scores:       {res.scores} ({len(s['files']['scores'])} file(s))")
    print(f"top outliers: {res.top_csv}  ({s['top_n']} rows; also {res.top_parquet.name})")
    files = s["files"]
    print(f"FITS:         {files['scores.fits']} (every spectrum), {files['top_outliers.fits']}")
    print(f"explanations: {files['explain_features.csv']} ({s['explained']} outliers), "
          f"{Path(files['explain_elements.csv']).name}")  # fmt: skip
    if res.gallery is not None:
        print(f"gallery:      {res.gallery}")
    if files.get("triage_html"):
        print(f"triage page:  {files['triage_html']} (open it in a browser)")
    if s["verdicts"]:
        print(f"verdicts:     {s['verdicts']} carried from {Path(args.out) / 'verdicts.parquet'}")
    print(f"summary:      {res.summary_path}")
    _print_top(res.top_parquet)
    return 0


def _print_top(top_parquet: Path, n: int = 10) -> None:
    """Print the ``n`` most outlying rows of an outlier table."""
    import pyarrow.parquet as pq

    from mendis_ray.science.gallery import fmt

    top = pq.read_table(top_parquet).slice(0, n).to_pylist()
    if not top:
        return
    print("\nmost outlying:")
    for r in top:
        if "score" in r:  # a signal-space checkpoint
            detail = (f"score {fmt(r.get('score'), '.2f')} ({r.get('strongest_test')})  "
                      f"signal {fmt(r.get('signal_score'), '.2f')}  residual "
                      f"{fmt(r.get('residual_score'), '.2f')}")  # fmt: skip
        else:
            detail = f"log p/dim {fmt(r.get('log_p_per_dim'), '.3f')}"
        print(
            f"  {r['rank']:>3}  {r['id']}  percentile {fmt(r.get('percentile'), '.1f')}  "
            f"{detail}  flags {r['flag_names'] or '-'}"
        )
        if r.get("explanation"):
            print(f"       why: {r['explanation']}")


def _lazy(module: str, name: str):
    """A command implemented in ``module`` (imported only when the command runs)."""
    return getattr(importlib.import_module(module), name)


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    """``mendis demo``: the paper's experiment end to end on a local Ray."""
    d = sub.add_parser(
        "demo", help="the paper's experiment end to end on a local Ray; writes a report"
    )
    d.add_argument("--out", default="mendis_out/demo")
    d.add_argument("--n-train", type=int, default=4000)
    d.add_argument("--epochs", type=int, default=8)
    d.add_argument("--minutes", type=float, default=5.0, help="training time limit")
    d.add_argument("--workers", type=int, default=2, help="TorchTrainer workers")
    # the demo's spectra are on the 2,405-pixel paper grid: the 16-pixel test preset
    # ("tiny") cannot model them, so it is not offered here
    d.add_argument(
        "--preset", default="compact", choices=["compact", "paper"],
        help="full-space flow preset (the demo's data: 2,405 pixels)",
    )  # fmt: skip
    d.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    d.add_argument("--no-conditional", action="store_true", help="skip the MCMC stage")
    d.add_argument("--quick", action="store_true", help="a few-minute smoke run")
    d.set_defaults(func=cmd_demo)


def add_analyze_parser(sub: argparse._SubParsersAction) -> None:
    """``mendis analyze CHECKPOINT --data DIR --out DIR``."""
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


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    """``mendis serve CHECKPOINT``: Ray Serve HTTP scoring."""
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
    # the score settings Serve shares (default: ServeArgs', i.e. ScoreConfig's)
    add_config_options(v, ScoreConfig, only=SERVE_SCORE_FIELDS, keep_defaults=False)
    v.set_defaults(func=lambda a: _lazy("mendis_ray.distributed.serve_local", "main_serve")(a))


def add_score_parser(sub: argparse._SubParsersAction) -> None:
    """``mendis score CHECKPOINT INPUTS... --out DIR``: batch scoring with Ray Data."""
    c = sub.add_parser("score", help="score a catalog of shards (or APOGEE FITS) with Ray Data")
    c.add_argument("checkpoint", help="checkpoint folder")
    c.add_argument("inputs", nargs="+", help="shard folders/files, or apStar/aspcapStar FITS")
    c.add_argument("--out", required=True, help="output folder")
    add_config_options(c, ScoreConfig)  # every score setting, generated
    c.add_argument(
        "--verdicts", default=None, metavar="FILE",
        help="verdicts to carry into the outputs, e.g. the verdicts.json downloaded from "
        "triage.html; merged into OUT/verdicts.parquet (always read when present)",
    )  # fmt: skip
    c.add_argument("--labels", help="allStar-like FITS table of labels for FITS inputs")
    c.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    c.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a local Ray")
    c.set_defaults(func=cmd_score)
