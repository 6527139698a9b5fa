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
import errno
import logging
import sys

from mendis_ray import cli_data, cli_ray, cli_train, interrupt

log = logging.getLogger("mendis_ray")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``mendis`` parser: one sub-command per ``add_*_parser`` (in ``cli_data``,
    ``cli_train``, ``cli_ray``), each setting ``func`` to the command it runs."""
    p = argparse.ArgumentParser(prog="mendis", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (
        cli_data.add_simulate_parser, cli_data.add_ingest_parser, cli_data.add_inspect_parser,
        cli_ray.add_demo_parser, cli_ray.add_analyze_parser, cli_train.add_train_parser,
        cli_train.add_tune_parser, cli_ray.add_serve_parser, cli_ray.add_score_parser,
    ):  # fmt: skip
        add(sub)
    return p


#: OSError numbers of a disk that cannot take the outputs: said in one line (a traceback
#: of 25 lines before)
_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        with interrupt.catching():
            rc = args.func(args)
            if interrupt.pending():  # a Ctrl-C swallowed on the way (see mendis_ray.interrupt)
                raise KeyboardInterrupt
        return rc
    except ValueError as err:  # bad input: a clear message, no traceback
        log.debug("details", exc_info=True)
        print(f"mendis {args.command}: error: {err}", file=sys.stderr)
        _stop_embedded_ray()
        return 2
    except OSError as err:  # a full or read-only disk: one line naming the path
        if err.errno not in _DISK_ERRORS:
            raise
        log.debug("details", exc_info=True)
        where = f"{err.filename}: " if err.filename else ""
        print(f"mendis {args.command}: error: {where}{err.strerror}", file=sys.stderr)
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
