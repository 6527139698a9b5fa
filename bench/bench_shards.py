"""Shard write and read throughput (MB/s of flux + ivar payload), side by side with plain
pyarrow, for zstd and uncompressed shards.

    python bench/bench_shards.py [--n 4000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import best_of, report, single_thread

single_thread()

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from mendis_ray.spectra import shards  # noqa: E402
from mendis_ray.spectra.degrade import add_noise  # noqa: E402
from mendis_ray.spectra.grid import paper_grid  # noqa: E402
from mendis_ray.spectra.simulate import Simulator, paper_training_labels  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4000)
    n = p.parse_args().n
    grid = paper_grid()
    lab = paper_training_labels(n, np.random.default_rng(0))
    flux, ivar = add_noise(Simulator(grid=grid)(lab), 300.0, np.random.default_rng(1))
    table = shards.make_table(
        [f"s{i}" for i in range(n)], flux, ivar, teff=lab.teff, logg=lab.logg, feh=lab.feh,
        snr=np.full(n, 300.0), extra=lab.truth_columns(),
    )  # fmt: skip
    payload_mb = (flux.nbytes + ivar.nbytes) / 1e6
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for comp in ("zstd", "none"):
            path = Path(d) / f"x-{comp}.parquet"
            t_w = best_of(lambda: shards.write_shard(path, table, grid, compression=comp))  # noqa: B023
            t_r = best_of(lambda: shards.table_arrays(shards.read_shard(path, grid)))  # noqa: B023
            t_raw = best_of(lambda: pq.read_table(path))  # noqa: B023
            t_rw = best_of(lambda: pq.write_table(table, path, compression=comp))  # noqa: B023
            rows.append({
                "compression": comp, "spectra": n, "payload_MB": payload_mb,
                "file_MB": path.stat().st_size / 1e6,
                "write_MB_s": payload_mb / t_w, "pyarrow_write_MB_s": payload_mb / t_rw,
                "read_validate_MB_s": payload_mb / t_r, "pyarrow_read_MB_s": payload_mb / t_raw,
                "spectra_read_per_s": n / t_r,
            })  # fmt: skip
    report("shards", rows, {"threads": 1})


if __name__ == "__main__":
    main()
