"""The paper's experiment end to end (simulate, Ray Data, Ray Train, scoring against
baselines, conditional correlations, reconstruction) with a Markdown report.

Local:   python jobs/demo.py --config jobs/configs/local.yaml
Cluster: ray job submit --working-dir . -- python jobs/demo.py --config jobs/configs/paper.yaml
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run(["demo"], "demo", __doc__))
