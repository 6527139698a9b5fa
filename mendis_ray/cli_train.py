"""``mendis train`` and ``mendis tune``: the signal-space model (in-process, or a Ray Tune
grid) and the paper's full-space flow (Ray Train, Ray Tune with ASHA).  Each command is a
``cmd_*`` function and an ``add_*_parser``; :mod:`mendis_ray.cli` assembles them."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mendis_ray.atomic import check_out_folder
from mendis_ray.cli_data import print_table
from mendis_ray.cli_options import at_least

__all__ = ["add_train_parser", "add_tune_parser"]

log = logging.getLogger("mendis_ray")


_COUNT, _SCALE = at_least(int, 1), at_least(float, 0, equal=False)
#: options of the full-space flow (Ray Train) that the signal-space model does not read, and
#: their defaults: given to it, they stop ``mendis train`` (they were silently ignored)
FLOW_ONLY = {"preset": "compact", "linear_lr_scale": None, "workers": 2, "gpu": False,
             "cpus_per_worker": 1.0, "snr": 300.0, "no_label_scatter": False,
             "fixed_noise": False, "storage": None, "resume": None, "checkpoint_every": 1,
             "max_failures": 2, "address": None}  # fmt: skip


def _ray_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="compact", choices=["tiny", "compact", "paper"],
                   help="full-space flow: its size (tiny: a 16-pixel test model)")  # fmt: skip
    p.add_argument("--n-units", type=_COUNT, default=None, help="flow units (default: preset's)")
    p.add_argument("--hidden", type=_COUNT, default=None, help="conditioner width (preset's)")
    p.add_argument("--epochs", type=_COUNT, default=None, help="default: the preset's")
    p.add_argument("--lr", type=_SCALE, default=None, help="default: the preset's (signal model: "
                   "2e-3, x1.5 from 16,384 training rows; given, exactly this)")  # fmt: skip
    p.add_argument(
        "--linear-lr-scale",
        type=at_least(float, 0),
        default=None,
        help="lr factor of the linear layers (0: they keep their Gaussian start)",
    )
    p.add_argument("--batch-size", type=_COUNT, default=None, help="rows per step (signal "
                   "model: 256, 512 from 16,384 training rows; given, exactly this)")  # fmt: skip
    p.add_argument("--workers", type=_COUNT, default=2, help="TorchTrainer workers (DDP ranks)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--cpus-per-worker", type=_SCALE, default=1.0)
    p.add_argument("--snr", type=_SCALE, default=300.0, help="degrade the shards to this S/N")
    p.add_argument(
        "--no-label-scatter",
        action="store_true",
        help="keep the shards' labels (they are already observed labels)",
    )
    p.add_argument("--fixed-noise", action="store_true", help="the same noise every epoch")
    p.add_argument("--storage", default=None, help="Ray Train / Tune storage path (default: "
                   "OUT/ray_runs; s3:// or gs:// or NFS on a multi-node cluster)")  # fmt: skip
    p.add_argument("--resume", default=None, help="run or checkpoint folder to resume from")
    p.add_argument("--checkpoint-every", type=_COUNT, default=1)
    p.add_argument("--max-failures", type=int, default=2)
    p.add_argument("--minutes", type=_SCALE, default=None, help="training time limit")
    p.add_argument("--address", default=None, help="Ray cluster address (default: local)")


def _given(args: argparse.Namespace, **fields: str) -> dict:
    """{config field: option value} for the options the user gave (``fields`` maps a
    config field to its argparse attribute; options left at None are not overrides)."""
    return {f: getattr(args, a) for f, a in fields.items() if getattr(args, a) is not None}


def _ray_train_configs(args: argparse.Namespace):
    from mendis_ray.config import get_preset
    from mendis_ray.distributed.data import DegradeConfig
    from mendis_ray.distributed.train import RayTrainConfig

    flow_cfg, train_cfg = get_preset(args.preset)
    changes = _given(args, epochs="epochs", lr="lr", linear_lr_scale="linear_lr_scale",
                     batch_size="batch_size")  # fmt: skip
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
    _check_preset_fits(flow_cfg, args.data, args.preset)
    return flow_cfg, train_cfg, ray_cfg


def _check_preset_fits(flow_cfg, data: str, preset: str) -> None:
    """A ValueError unless the flow takes as many pixels as the local shards ``data``
    hold: before Ray starts (the workers' error came after 13 s of Ray and a data pass)."""
    from mendis_ray.config import PRESETS
    from mendis_ray.spectra.shards import dataset_files, shard_metadata

    if not Path(data).exists():  # named by the reader, or on a cluster's storage
        return
    n_pix = int(shard_metadata(dataset_files(data)[0])["grid"]["n_pix"])
    if n_pix != flow_cfg.n_pix:
        sizes = ", ".join(f"{name} {cfg[0].n_pix}" for name, cfg in PRESETS.items())
        raise ValueError(f"--preset {preset}: its flow takes {flow_cfg.n_pix} pixels, the "
                         f"shards in {data} have {n_pix} (pixels per preset: {sizes})")  # fmt: skip


def cmd_train(args: argparse.Namespace) -> int:
    check_out_folder(args.out)  # before the training, not when the checkpoint is written
    if args.model == "signal":
        return cmd_train_signal(args)
    if args.reference:
        print("mendis train: error: --reference calibrates the signal-space model's scores "
              "(--model signal); the full-space flow's reference is its validation shards",
              file=sys.stderr)  # fmt: skip
        return 2
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

    given = [k for k, default in FLOW_ONLY.items() if getattr(args, k) != default]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ValueError(
            f"{flags}: option(s) of the full-space flow (--model flow, Ray Train); the "
            "signal-space model trains in this process, on the spectra as they are"
        )

    changes = _given(args, n_signal="k", n_units="n_units", hidden="hidden", epochs="epochs",
                     lr="lr", batch_size="batch_size", seed="seed",
                     min_snr="min_snr", far_iqr="far_iqr")  # fmt: skip
    cfg = SignalConfig().with_given(**changes)
    minutes = args.minutes
    try:
        s = train_signal_checkpoint(
            args.data if isinstance(args.data, list) else [args.data], args.out, cfg,
            reference=args.reference, time_limit_s=None if minutes is None else 60 * minutes,
            show_progress=not args.quiet,
        )  # fmt: skip
    except FloatingPointError as err:  # the loss overflowed: a step too large
        raise ValueError(f"{err}: the training diverged (lr {cfg.lr:g}); give a lower --lr "
                         "(the default adapts it to the training set)") from err  # fmt: skip
    print(
        f"\nsignal-space model: k = {s['k']} signal directions + 3 labels, {s['train_rows']} "
        f"training / {s['val_rows']} validation spectra, {s['epochs']} epochs "
        f"(best {s['best_epoch']}) in {s['seconds']:.1f} s"
    )
    print(
        f"validation log q (flow coordinates): {s['initial_val_log_q']:.2f} at the start -> "
        f"{s['best_val_log_q']:.2f}; mean total log p {s['val_log_p']:.1f} nats per spectrum"
    )
    if s.get("reference_rows"):
        print(f"scores' reference: the {s['val_rows']} validation spectra and "
              f"{s['reference_rows']} from --reference")  # fmt: skip
    if s.get("val_far_out"):
        print(_far_out_line(s))
    if s.get("percentile_points") is not None:
        print(_precision_line(s))
    print(f"checkpoint: {s['checkpoint']}")
    return 0


def _precision_line(s: dict) -> str:
    """How precise the percentiles are, from the number of held-out spectra that
    calibrate them (:func:`~mendis_ray.science.noise_calibration.percentile_precision`)."""
    from mendis_ray.science.noise_calibration import percentile_precision

    n = s["val_rows"] + s.get("reference_rows", 0)
    line = (f"percentiles: {n} held-out spectra calibrate them, about {round(n / 10)} in each "
            f"tenth of their noise range: good to about {s['percentile_points']:.0f} points "
            "there")  # fmt: skip
    if s["percentile_points"] > percentile_precision(6000) + 0.5:
        line += (" (with 6,000: about 4; mendis train --reference adds held-out spectra of the "
                 "same population)")  # fmt: skip
    return line


def _far_out_line(s: dict) -> str:
    """What ``mendis train`` says of validation spectra far outside the rest."""
    from mendis_ray.science.signal_tails import FAR_IQR

    n, m = s["val_far_out"], s["val_rows"] + s.get("reference_rows", 0)
    held = "held-out (validation and --reference)" if s.get("reference_rows") else "validation"
    if s["far_iqr"] is not None:
        return (
            f"{n} of {m} {held} spectra lie more than {s['far_iqr']:g} interquartile "
            "ranges below the rest in log q, or have none: left out of the scores' reference"
        )
    return (
        f"{n} of {m} {held} spectra lie more than {FAR_IQR:g} interquartile ranges "
        "below the rest in log q, or have none: kept in the scores' reference. If they are "
        f"peculiar stars of the catalogue, --far-iqr {FAR_IQR:g} leaves them out; after a "
        "short training they can be clean stars at the population's edges, which it "
        "should keep (README: 'A catalogue that holds the stars you search for')"
    )


def _csv(text: str | None, kind: type, default: str | None = None) -> tuple | None:
    """``"1,2"`` -> (1, 2) of ``kind`` (``default`` when ``text`` is None; None if both are)."""
    text = default if text is None else text
    return None if text is None else tuple(kind(x) for x in text.split(",") if x.strip())


def cmd_tune(args: argparse.Namespace) -> int:
    check_out_folder(args.out)
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
    print_table(res.trials, ["lr", "n_units", "best_val_log_prob", "epochs", "status"])
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

    changes = _given(args, hidden="hidden", epochs="epochs", lr="lr", batch_size="batch_size",
                     far_iqr="far_iqr")  # fmt: skip
    cfg = SignalConfig().with_given(**changes)
    tune_cfg = SignalTuneConfig(
        ks=_csv(args.ks, int), n_units=_csv(args.units, int, "4,6"), lr=_csv(args.lrs, float),
        cpus_per_trial=args.cpus_per_trial, max_concurrent_trials=args.concurrent,
        time_limit_s=None if args.minutes is None else 60 * args.minutes,
        storage_path=args.storage or str(Path(args.out) / "ray_runs"),
    )  # fmt: skip
    ensure_ray(args.address)
    res = tune_signal(args.data, args.out, cfg, tune_cfg)
    rows = [{**t, "lr": f"{t['lr']:g}"} for t in res.trials]
    print_table(rows, ["k", "n_units", "lr", "val_log_p", "val_log_q", "epochs", "status"])
    b = res.best
    print(f"best: k {b['k']}, {b['n_units']} units, lr {b['lr']:g}: validation log p "
          f"{b['val_log_p']:.1f} nats per spectrum (total model)")  # fmt: skip
    print(f"trials: {res.out / 'trials.csv'}")
    print(f"best checkpoint: {res.best_checkpoint}")
    return 0


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    """``mendis train DATA --out DIR``: the signal-space model or the full-space flow."""
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
    t.add_argument("--k", type=_COUNT, default=None, help="signal directions (default: automatic)")
    t.add_argument("--seed", type=int, default=None, help="signal model: seed (0)")
    t.add_argument("--min-snr", type=_SCALE, default=None, metavar="SNR",
                   help="signal model: train and calibrate it down to at least this S/N, "
                   "whatever the training S/N (noise augmentation, noised copies of held-out "
                   "stars); noisier spectra are flagged noise_range (default 25)")  # fmt: skip
    t.add_argument("--reference", action="append", default=None, metavar="SHARDS",
                   help="signal model: more spectra of the same population that the model "
                   "does not learn (a folder or file, not in DATA; repeat the option for "
                   "more): they join the validation spectra in the scores' calibration, "
                   "whose sampling sets how uniform an inlier's percentile is at each "
                   "S/N")  # fmt: skip
    _far_iqr_arg(t)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    _ray_train_args(t)
    t.set_defaults(func=cmd_train)


def add_tune_parser(sub: argparse._SubParsersAction) -> None:
    """``mendis tune DATA --out DIR``: Ray Tune over the signal-space model or the flow."""
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
    _far_iqr_arg(u)
    u.set_defaults(func=cmd_tune)


def _at_least_one(text: str) -> float:
    """A finite number >= 1 (argparse type of ``--far-iqr``)."""
    value = float(text)
    if not value >= 1 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: a finite number of at least 1 (e.g. 6)")
    return value


def _far_iqr_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--far-iqr", type=_at_least_one, default=None, metavar="IQRS",
                   help="signal model: leave out of the scores' reference the validation "
                   "spectra whose log q lies more than IQRS interquartile ranges below the "
                   "median (a catalogue's CEMP stars, rotators; e.g. 6); default: keep "
                   "every one")  # fmt: skip
