"""``mendis simulate``, ``mendis ingest`` and ``mendis inspect``: the data commands
(no Ray).  Each command is a ``cmd_*`` function and an ``add_*_parser`` that declares its
options; :mod:`mendis_ray.cli` assembles them."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from mendis_ray.atomic import check_out_folder
from mendis_ray.cli_options import at_least

__all__ = ["add_ingest_parser", "add_inspect_parser", "add_simulate_parser", "print_table"]

log = logging.getLogger("mendis_ray")


def print_table(rows: list[dict], cols: list[str]) -> None:
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

    check_out_folder(args.out)
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
    print_table(rows, ["set", "rows", "shards", "megabytes", "seconds", "path"])
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
    print_table(rows, ["set", "rows", "shards", "megabytes", "seconds", "path"])
    for f in figures:
        print(f"figure: {f}")
    print(f"summary: {out / 'summary.json'}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from mendis_ray.spectra.grid import get_grid
    from mendis_ray.spectra.ingest import ingest_apogee

    check_out_folder(args.out)
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


def add_simulate_parser(sub: argparse._SubParsersAction) -> None:
    """``mendis simulate``: the paper's (or a survey-like) training and outlier sets."""
    s = sub.add_parser("simulate", help="write the paper's training set and outlier sets as shards")
    s.add_argument("--out", default="mendis_out/simulated", help="output folder")
    count = at_least(int, 1)
    s.add_argument("--n-train", type=count, default=20_000)
    s.add_argument("--n-test", type=count, default=2_000, help="held-out inliers")
    s.add_argument("--n-outlier", type=count, default=1_000, help="spectra per outlier class")
    s.add_argument("--shards", type=count, default=8, help="shards of the training set")
    s.add_argument(
        "--snr", type=at_least(float, 0), default=300.0,
        help="S/N of the written spectra; 0 writes noise-free spectra with true labels "
        "(to be degraded by the Ray Data pipeline)",
    )  # fmt: skip
    s.add_argument(
        "--train-snr", type=at_least(float, 0), default=None,
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


def add_ingest_parser(sub: argparse._SubParsersAction) -> None:
    """``mendis ingest apogee FILE... --out DIR``."""
    i = sub.add_parser("ingest", help="read survey FITS files into shards")
    isub = i.add_subparsers(dest="survey", required=True)
    a = isub.add_parser("apogee", help="APOGEE apStar / aspcapStar files")
    a.add_argument("files", nargs="+")
    a.add_argument("--out", required=True, help="output dataset folder")
    a.add_argument("--labels", help="allStar-like FITS table with APOGEE_ID, TEFF, LOGG, FE_H")
    a.add_argument("--grid", default="paper", choices=["paper", "aspcap", "apstar"])
    a.add_argument("--shards", type=at_least(int, 1), default=1)
    a.set_defaults(func=cmd_ingest)


def add_inspect_parser(sub: argparse._SubParsersAction) -> None:
    """``mendis inspect PATH``."""
    n = sub.add_parser("inspect", help="validate and summarise a shard or dataset folder")
    n.add_argument("path")
    n.set_defaults(func=cmd_inspect)
