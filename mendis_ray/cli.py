"""The ``mendis`` command line.

mendis simulate [--out DIR] [--n-train N] ...   paper training set + outlier sets
mendis ingest apogee FILE... --out DIR [--labels allStar.fits]
mendis inspect PATH                               summary of a shard or dataset folder
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
            out, spec, sim, snr=args.snr, seed=args.seed, set_index=k, noise=args.noise
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


def cmd_ingest(args: argparse.Namespace) -> int:
    from mendis_ray.spectra.fits import ingest_apogee
    from mendis_ray.spectra.grid import get_grid

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
    s.add_argument("--snr", type=float, default=300.0)
    s.add_argument("--noise", choices=["photon", "flat"], default="photon")
    s.add_argument("--seed", type=int, default=0)
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except ValueError as err:  # bad input: a clear message, no traceback
        log.debug("details", exc_info=True)
        print(f"mendis {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
