"""Simulate the paper's training set and outlier sets as Parquet shards.

Local:   python jobs/simulate.py --config jobs/configs/local.yaml
Cluster: ray job submit --working-dir . -- python jobs/simulate.py --config jobs/configs/paper.yaml

The simulator is numpy-only and fast (~1,300 spectra/s on one core), so this job runs on
the driver; the Ray issue turns the larger steps (ingest, train, score) into Ray work.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a working dir

from mendis_ray.cli import main


def _config_args(path: str) -> list[str]:
    """Map the ``simulate:`` section of a YAML config onto ``mendis simulate`` flags."""
    import yaml

    cfg = (yaml.safe_load(Path(path).read_text()) or {}).get("simulate", {})
    args: list[str] = []
    for key, value in cfg.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False and value is not None:
            args += [flag, str(value)]
    return args


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(Path(__file__).parent / "configs" / "local.yaml"))
    known, rest = p.parse_known_args()
    sys.exit(main(["simulate", *_config_args(known.config), *rest]))
