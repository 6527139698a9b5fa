"""Simulate the paper's training set and outlier sets as Parquet shards.

Local:   python jobs/simulate.py --config jobs/configs/local.yaml
Cluster: ray job submit --working-dir . -- python jobs/simulate.py --config jobs/configs/paper.yaml

The simulator is numpy-only (~1,300 spectra/s on one core), so this job runs on the driver.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run(["simulate"], "simulate", __doc__))
