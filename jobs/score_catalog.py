"""Score a catalog (Parquet shards or APOGEE FITS) with a checkpoint on a Ray actor pool.

Local:   python jobs/score_catalog.py --config jobs/configs/local.yaml
Cluster: ray job submit --working-dir . --
             python jobs/score_catalog.py --config jobs/configs/paper.yaml

The ``score_catalog:`` section's ``args`` are the checkpoint and the inputs; its other
keys are ``mendis score`` flags (``max_actors: 4`` -> ``--max-actors 4``), i.e. the
fields of ``mendis_ray.config.ScoreConfig`` (the settings and their defaults) plus
``out``, ``labels``, ``verdicts``, ``address``; flags on the command line win.  Writes
``out/scores/``, ``out/top_outliers.{csv,parquet}``, ``out/gallery.png`` and
``out/summary.json`` (see mendis_ray.distributed.infer).  Under ``ray job submit`` the
job joins the cluster (RAY_ADDRESS); locally it starts one.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run(["score"], "score_catalog", __doc__))
