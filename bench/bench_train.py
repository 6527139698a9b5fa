"""Ray Train throughput: TorchTrainer with 1 and 2 workers vs the no-Ray loop, same
model, same data, same CPUs.

    python bench/bench_train.py           # compact preset (38M parameters), ~6 min
    python bench/bench_train.py --quick   # a small flow

The no-Ray baseline runs :func:`mendis_ray.train.loop.train_epoch` in this process with
2 torch threads over pre-degraded, pre-standardized rows in memory.  The Ray runs stream
the same shards through Ray Data (degrade + standardize, fresh noise) into DDP workers:
1 worker x 2 threads, and 2 workers x 1 thread.  Reported: spectra/s of the training
pass (Ray Data feed + steps; the no-Ray loop's is steps alone) in the epochs after the
first (the first includes process start, the data pipeline's start and DDP setup,
reported separately), each as a ratio to the no-Ray loop, and spectra/s of the whole
epoch including the validation pass.

Writes bench/results/train.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report

for key, value in {
    "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
}.items():  # fmt: skip
    os.environ.setdefault(key, value)

log = logging.getLogger("bench_train")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--work", type=Path, default=Path("mendis_out/bench_train"))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--gpu", action="store_true", help="also 1 worker with use_gpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from mendis_ray.config import get_preset
    from mendis_ray.distributed import data as D
    from mendis_ray.distributed.session import ensure_ray
    from mendis_ray.distributed.train import RayTrainConfig, prepare_data, train_distributed
    from mendis_ray.flow.checkpoint import load_checkpoint
    from mendis_ray.spectra.datasets import SetSpec, write_simulated_set
    from mendis_ray.spectra.simulate import Simulator, paper_training_labels
    from mendis_ray.train.loop import array_batches, make_optimizer, train_epoch

    n = 1200 if args.quick else 3000
    data = args.work / f"data{n}"
    if not (data / "train" / "_manifest.json").exists():  # a whole set, not an interrupted one
        write_simulated_set(data, SetSpec("train", n, paper_training_labels, 10), Simulator(),
                            snr=0, seed=0)  # fmt: skip
    flow_cfg, train_cfg = get_preset("compact")
    if args.quick:
        flow_cfg = flow_cfg.replace(name="bench-quick", n_units=2, hidden=32)
    train_cfg = train_cfg.replace(lr=3e-4, linear_lr_scale=0.0, batch_size=128,
                                  epochs=args.epochs, patience=100)  # fmt: skip
    ensure_ray(num_cpus=4)
    base = RayTrainConfig(storage_path=str(args.work / "runs"), max_failures=0,
                          degrade=D.DegradeConfig(snr=300.0, fresh_noise=True))  # fmt: skip
    prep = prepare_data(data / "train", base)

    # no-Ray loop on the same rows (degraded once with a fixed draw), 2 threads
    torch.set_num_threads(2)
    from mendis_ray.distributed.train import prepare_training

    init = prepare_training(prep, args.work / "init", flow_cfg, train_cfg, base)
    density, _ = load_checkpoint(init.init_checkpoint)
    flow = density.flow.train()
    fixed = D.DegradeConfig(snr=300.0, fresh_noise=False)
    train_files, _ = D.split_files(D.list_shards(data / "train"), base.val_fraction)
    shards = D.check_shards(train_files)
    tr_ds = D.standardize(D.degrade(D.read_spectra(shards), shards.n_pix, fixed), shards.n_pix,
                          prep.moments.standardizer)  # fmt: skip
    x = torch.from_numpy(np.concatenate([b["x"] for b in tr_ds.iter_batches(batch_size=None)]))
    opt = make_optimizer(flow, train_cfg)
    gen = torch.Generator().manual_seed(0)
    train_epoch(flow, array_batches(x[:256], 128, generator=gen), opt)  # warm
    rates = []
    for _ in range(max(args.epochs - 1, 1)):
        t0 = time.perf_counter()
        out = train_epoch(flow, array_batches(x, 128, generator=gen), opt)
        rates.append(out["rows"] / (time.perf_counter() - t0))
    no_ray = float(np.median(rates))
    log.info("no-Ray loop: %.1f spectra/s", no_ray)
    rows = [{"run": "no-Ray loop (2 threads)", "workers": 0, "spectra_per_s": no_ray,
             "ratio": 1.0, "with_validation_per_s": float("nan"), "first_epoch_s": float("nan"),
             "total_s": float("nan")}]  # fmt: skip
    configs = [("TorchTrainer 1 worker x 2 threads", 1, 2.0, False),
               ("TorchTrainer 2 workers x 1 thread", 2, 1.0, False)]  # fmt: skip
    if args.gpu and torch.cuda.is_available():
        configs.append(("TorchTrainer 1 worker, GPU", 1, 2.0, True))
    for name, workers, cpus, gpu in configs:
        cfg = RayTrainConfig(**{**base.__dict__, "num_workers": workers,
                                "cpus_per_worker": cpus, "use_gpu": gpu})  # fmt: skip
        t0 = time.perf_counter()
        res = train_distributed(prep, args.work / "out", flow_cfg, train_cfg, cfg)
        total = time.perf_counter() - t0
        hist = res.history[1:] or res.history  # epochs after the first
        rate = float(np.median([h["train_samples_per_s"] for h in hist]))
        epoch_rate = float(np.median([h["samples_per_s"] for h in hist]))
        rows.append({"run": name, "workers": workers, "spectra_per_s": rate,
                     "ratio": rate / no_ray, "with_validation_per_s": epoch_rate,
                     "first_epoch_s": res.history[0]["seconds"], "total_s": total})  # fmt: skip
        log.info("%s: %.1f spectra/s (%.2fx the no-Ray loop)", name, rate, rate / no_ray)
    report("train", rows, extra={"preset": flow_cfg.to_dict(), "n_train": prep.n_train,
                                 "batch_size": train_cfg.batch_size})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
