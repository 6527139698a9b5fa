"""The paper's analysis of a trained checkpoint: held-out likelihood and AUROC against the
baselines, conditional pixel correlations, reconstruction, and a Markdown report.

Local:   python jobs/analyze.py --config jobs/configs/local.yaml
Cluster: ray job submit --working-dir . -- python jobs/analyze.py --config jobs/configs/paper.yaml
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run(["analyze"], "analyze", __doc__))
