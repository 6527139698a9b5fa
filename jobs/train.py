"""Train the Mendis flow with Ray Train (TorchTrainer, DDP) on Parquet shards.

Local:   python jobs/train.py --config jobs/configs/local.yaml
Cluster: ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/paper.yaml

Ray Data degrades the shards (noise to S/N, label scatter, fresh every epoch) and streams
them to the workers; checkpoints go to ``storage``; ``--resume RUN_DIR`` continues a run.
Under ``ray job submit`` the job joins the cluster (RAY_ADDRESS); locally it starts one.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run(["train"], "train", __doc__))
