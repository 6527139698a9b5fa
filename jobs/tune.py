"""Search learning rate x depth with Ray Tune (ASHA), each trial a TorchTrainer run.

Local:   python jobs/tune.py --config jobs/configs/local.yaml
Cluster: ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/paper.yaml

Writes the trial table, the best configuration and the best checkpoint to ``out``.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run(["tune"], "tune", __doc__))
