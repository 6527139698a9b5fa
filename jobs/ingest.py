"""Read APOGEE apStar / aspcapStar FITS files onto the model grid as Parquet shards.

Local:   python jobs/ingest.py --config jobs/configs/local.yaml
Cluster: ray job submit --working-dir . -- python jobs/ingest.py --config jobs/configs/paper.yaml

The ``ingest:`` section lists the FITS files (``args``), ``out`` and optionally ``labels``
(an allStar-like table); see ``mendis ingest apogee --help``.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run(["ingest", "apogee"], "ingest", __doc__))
