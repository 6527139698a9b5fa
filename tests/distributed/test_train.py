"""Ray Data ingest and Ray Train on a local Ray: validation errors name the shard, the
degrade step is right and reproducible, DDP keeps the replicas identical, a killed
worker is replaced and the run resumes, explicit resume continues a run, Tune runs
trials and picks the best (full-space flow and signal-space model)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from mendis_ray.config import FlowConfig, TrainConfig
from mendis_ray.spectra.shards import ShardError, read_dataset, table_arrays

FLOW = FlowConfig(name="test", n_units=1, hidden=16, n_blocks=1, n_bins=4)
TRAIN = TrainConfig(lr=1e-3, batch_size=64, epochs=2, linear_lr_scale=0.0, patience=10)


def _sorted(a: dict) -> dict:
    order = np.argsort(a["ids"])
    return {k: v[order] for k, v in a.items()}


def test_degrade_noise_level_and_reproducibility(ray_session, sim_sets):
    from mendis_ray.distributed import data as D

    shards = D.check_shards(D.list_shards(sim_sets / "train"))
    clean = _sorted(D.to_numpy(D.read_spectra(shards), shards.n_pix))
    cfg = D.DegradeConfig(snr=100.0, fresh_noise=False, seed=7)
    ds = D.degrade(D.read_spectra(shards), shards.n_pix, cfg)
    a, b = _sorted(D.to_numpy(ds, shards.n_pix)), _sorted(D.to_numpy(ds, shards.n_pix))
    assert np.array_equal(a["flux"], b["flux"]) and np.array_equal(a["labels"], b["labels"])
    z = (a["flux"] - clean["flux"]) * 100.0 / np.sqrt(np.clip(clean["flux"], 1e-3, None))
    assert abs(z.std() - 1.0) < 0.01 and abs(z.mean()) < 0.01
    np.testing.assert_allclose(a["ivar"], 100.0**2 / np.clip(clean["flux"], 1e-3, None), rtol=1e-3)
    dl = (a["labels"] - clean["labels"]) / np.array([25.0, 0.1, 0.01])
    assert np.all(np.abs(dl.std(axis=0) - 1.0) < 0.15)
    assert np.all(a["snr"] == 100.0)
    fresh = D.degrade(
        D.read_spectra(shards), shards.n_pix, dataclasses.replace(cfg, fresh_noise=True)
    )
    c, e = _sorted(D.to_numpy(fresh, shards.n_pix)), _sorted(D.to_numpy(fresh, shards.n_pix))
    assert not np.array_equal(c["flux"], e["flux"])
    zc = (c["flux"] - clean["flux"]) * 100.0 / np.sqrt(np.clip(clean["flux"], 1e-3, None))
    assert abs(zc.std() - 1.0) < 0.01


def test_noisy_input_is_only_topped_up(ray_session, sim_sets):
    """S/N-300 shards degraded to S/N 300 stay as they are; to S/N 100 get the rest."""
    from mendis_ray.distributed import data as D

    shards = D.check_shards(D.list_shards(sim_sets / "test"))
    raw = _sorted(D.to_numpy(D.read_spectra(shards), shards.n_pix))
    same = D.degrade(
        D.read_spectra(shards), shards.n_pix, D.DegradeConfig(snr=300.0, label_scatter=None)
    )
    out = _sorted(D.to_numpy(same, shards.n_pix))
    assert np.max(np.abs(out["flux"] - raw["flux"])) < 1e-3 * 0.05  # float rounding of var_t
    assert np.array_equal(out["labels"], raw["labels"])


def test_moments_match_numpy(ray_session, sim_sets):
    from mendis_ray.distributed import data as D
    from mendis_ray.flow.density import Standardizer

    shards = D.check_shards(D.list_shards(sim_sets / "test"))
    m = D.compute_moments(D.read_spectra(shards), shards.n_pix, batch_size=50)
    t = table_arrays(read_dataset(sim_sets / "test"))
    st = Standardizer.fit(t.flux, t.labels)
    np.testing.assert_allclose(m.standardizer.mean, st.mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m.standardizer.std, st.std, rtol=1e-4)
    x = st.transform(t.flux, t.labels).astype(np.float64)
    np.testing.assert_allclose(m.cov, np.cov(x, rowvar=False, bias=True), atol=2e-4)
    assert m.n == len(x)


def test_moments_name_pixels_no_training_spectrum_has(ray_session, sim_sets, tmp_path):
    """A mask common to every training spectrum: the full-space flow models every pixel,
    so its moments refuse them by number and point to the signal-space model."""
    from mendis_ray.distributed import data as D
    from mendis_ray.spectra.shards import matrix_column

    for f in sorted((sim_sets / "test").glob("*.parquet")):
        table = pq.read_table(f)
        ivar = table_arrays(table).ivar.copy()
        ivar[:, 10:13] = 0.0
        table = table.set_column(table.column_names.index("ivar"), "ivar", matrix_column(ivar))
        pq.write_table(table, tmp_path / f.name)
    shards = D.check_shards(D.list_shards(tmp_path))
    with pytest.raises(ShardError, match=r"3 pixel\(s\) \(first: \[10, 11, 12\]\).*signal"):
        D.compute_moments(D.read_spectra(shards), shards.n_pix, batch_size=50)


def _write_like(src, dst, flux_fix=None, metadata=None):
    table = pq.read_table(src)
    if flux_fix is not None:
        flux = table_arrays(table).flux.copy()
        flux_fix(flux)
        from mendis_ray.spectra.shards import matrix_column

        table = table.set_column(table.column_names.index("flux"), "flux", matrix_column(flux))
    if metadata is not None:
        table = table.replace_schema_metadata(metadata)
    pq.write_table(table, dst)


def test_bad_shards_are_named(ray_session, sim_sets, tmp_path):
    from mendis_ray.distributed import data as D

    good = sorted((sim_sets / "test").glob("*.parquet"))[0]
    bad_dir = tmp_path / "nan"
    bad_dir.mkdir()
    shutil.copy(good, bad_dir / "a.parquet")
    bad = bad_dir / "b.parquet"

    def poison(f):
        f[3, 17] = np.nan

    _write_like(good, bad, flux_fix=poison, metadata=pq.read_schema(good).metadata)
    shards = D.check_shards(D.list_shards(bad_dir))  # footers are fine
    with pytest.raises(Exception, match=r"b\.parquet.*pixel 17") as err:
        D.to_numpy(D.read_spectra(shards), shards.n_pix)
    assert "non-finite flux" in str(err.value)
    # a shard on another grid, and a file that is not Parquet, fail before any read
    meta = dict(pq.read_schema(good).metadata)
    info = json.loads(meta[b"mendis_ray"])
    info["grid"]["hash"] = "0" * 16
    meta[b"mendis_ray"] = json.dumps(info).encode()
    other = tmp_path / "grid"
    other.mkdir()
    shutil.copy(good, other / "a.parquet")
    _write_like(good, other / "c.parquet", metadata=meta)
    with pytest.raises(ShardError, match=r"c\.parquet: shard grid"):
        D.check_shards(D.list_shards(other))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(ShardError, match=r"x\.parquet: not a readable Parquet"):
        D.check_shards(D.list_shards(junk))


@pytest.fixture(scope="module")
def ddp_run(ray_session, sim_sets, tmp_path_factory):
    from mendis_ray.distributed.train import RayTrainConfig, train_distributed

    tmp = tmp_path_factory.mktemp("ddp")
    cfg = RayTrainConfig(
        num_workers=2, cpus_per_worker=1, storage_path=str(tmp / "runs"),
        dump_params_dir=str(tmp / "params"), checkpoint_every=1,
    )  # fmt: skip
    res = train_distributed(sim_sets / "train", tmp / "out", FLOW, TRAIN, cfg)
    return res, tmp


def test_too_few_rows_per_worker_is_refused(ray_session, sim_sets, tmp_path):
    """drop_last with fewer rows per worker than a batch would train nothing: refused."""
    from mendis_ray.distributed.train import RayTrainConfig, train_distributed

    cfg = RayTrainConfig(num_workers=2, storage_path=str(tmp_path / "runs"))
    with pytest.raises(ValueError, match=r"per worker per epoch, fewer than batch_size 512"):
        train_distributed(sim_sets / "train", tmp_path, FLOW, TRAIN.replace(batch_size=512), cfg)
    assert not (tmp_path / "init_checkpoint").exists()


@pytest.mark.parametrize("damage", ["page", "labels"])
def test_bad_training_shards_stop_it_in_one_line_naming_the_file(
    ray_session, sim_sets, tmp_path, capfd, damage
):
    """``mendis train --model flow``: a shard with a bit flipped in a page (its CRC fails
    in a Ray read task, which does not know the file) or a row without labels stops the
    run before any worker starts, with the file named, and without Ray Data's report of
    the failed task (about 300 lines and three tracebacks before)."""
    import pyarrow as pa

    from mendis_ray.distributed.train import RayTrainConfig, train_distributed
    from mendis_ray.spectra.grid import paper_grid
    from mendis_ray.spectra.shards import write_dataset

    tables = [pq.read_table(f) for f in sorted((sim_sets / "train").glob("*.parquet"))]
    if damage == "labels":
        teff = tables[1].column("teff").to_numpy().copy()
        teff[3] = np.nan
        tables[1] = tables[1].set_column(tables[1].schema.get_field_index("teff"), "teff",
                                         pa.array(teff, mask=np.isnan(teff)))  # fmt: skip
    write_dataset(tmp_path / "d", tables, len(tables), paper_grid())
    bad = sorted((tmp_path / "d").glob("*.parquet"))[1]
    if damage == "page":
        data = bytearray(bad.read_bytes())
        data[len(data) // 3] ^= 0x01
        bad.write_bytes(bytes(data))
    cfg = RayTrainConfig(num_workers=1, storage_path=str(tmp_path / "runs"))
    capfd.readouterr()
    match = "damaged: a page's bytes" if damage == "page" else "has no finite Teff"
    with pytest.raises(ShardError, match=rf"{bad.name}.*{match}"):
        train_distributed(tmp_path / "d", tmp_path / "out", FLOW, TRAIN, cfg)
    err = capfd.readouterr().err
    assert "Exception occurred in Ray Data" not in err and "Traceback" not in err


def test_ddp_replicas_stay_identical(ddp_run):
    from mendis_ray.flow.checkpoint import load_checkpoint

    res, tmp = ddp_run
    p0 = load_file(str(tmp / "params" / "rank0.safetensors"))
    p1 = load_file(str(tmp / "params" / "rank1.safetensors"))
    init, _ = load_checkpoint(res.init_checkpoint)
    start = init.flow.state_dict()
    moved = max(float((p0[k].double() - start[k].double()).abs().max()) for k in p0)
    assert moved > 1e-5, "training did not change the weights"
    for k in p0:  # each rank saw a different half of the data, yet the weights agree
        assert np.array_equal(p0[k].numpy(), p1[k].numpy()), k
    assert [h["epoch"] for h in res.history] == [0, 1]
    assert res.history[0]["rows"] >= 256  # both ranks' rows counted
    assert res.info["world_size"] == 2
    # the standardization computed once on the driver is the one in the final checkpoint
    np.testing.assert_array_equal(res.density.standardizer.mean, init.standardizer.mean)


def test_train_actors_stop_after_fit(ddp_run):
    """Before: Ray Train's SIGINT handler kept the TrainController's handle, so the
    controller, its DatasetManager and SplitCoordinators stayed alive (and used CPU)
    after fit, through every later stage of the process (issue 12)."""
    import os

    from mendis_ray.distributed.session import process_tree

    names = (b"ray::TrainController", b"ray::SplitCoordinator", b"ray::DatasetManager")

    def left() -> list[bytes]:
        out = []
        for pid in process_tree(os.getpid())[1:]:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            out += [n for n in names if cmd.startswith(n)]
        return out

    deadline = time.monotonic() + 20
    while left() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left() == []


def test_explicit_resume_continues(ddp_run, sim_sets):
    from mendis_ray.distributed.train import RayTrainConfig, latest_checkpoint, train_distributed

    res, tmp = ddp_run
    ckpt = latest_checkpoint(res.run_dir)
    assert json.loads((ckpt / "state.json").read_text())["epoch"] == 1
    cfg = RayTrainConfig(num_workers=1, storage_path=str(tmp / "runs"),
                         resume_from=str(res.run_dir))  # fmt: skip
    more = train_distributed(sim_sets / "train", tmp / "out2", FLOW, TRAIN.replace(epochs=3), cfg)
    assert [h["epoch"] for h in more.history] == [0, 1, 2]
    assert more.info["resumed_at"] == 2
    assert more.history[:2] == res.history


def test_killed_worker_is_replaced_and_run_finishes(ray_session, sim_sets, tmp_path):
    from mendis_ray.distributed.train import RayTrainConfig, train_distributed

    marker = tmp_path / "killed"
    cfg = RayTrainConfig(
        num_workers=2, cpus_per_worker=1, storage_path=str(tmp_path / "runs"),
        max_failures=1, fail_at_epoch=1, fail_marker=str(marker),
    )  # fmt: skip
    res = train_distributed(
        sim_sets / "train", tmp_path / "out", FLOW, TRAIN.replace(epochs=3), cfg
    )
    assert marker.exists(), "the worker was never killed"
    assert [h["epoch"] for h in res.history] == [0, 1, 2]
    assert res.info["resumed_at"] == 1  # restarted from the epoch-0 checkpoint


def test_tune_runs_trials_and_writes_best(ray_session, sim_sets, tmp_path):
    from mendis_ray.distributed.train import RayTrainConfig
    from mendis_ray.distributed.tune import TuneConfig, tune_flow
    from mendis_ray.flow.checkpoint import load_checkpoint

    res = tune_flow(
        sim_sets / "train", tmp_path / "tune", FLOW, TRAIN.replace(epochs=1),
        RayTrainConfig(num_workers=1, storage_path=str(tmp_path / "runs")),
        TuneConfig(lr=(1e-4, 1e-3), n_units=(1,)),
    )  # fmt: skip
    assert len(res.trials) == 2
    assert {t["lr"] for t in res.trials} == {1e-4, 1e-3}
    assert all(t["status"] == "completed" for t in res.trials)
    assert res.best["best_val_log_prob"] == max(t["best_val_log_prob"] for t in res.trials)
    best_cfg = json.loads((tmp_path / "tune" / "best_config.json").read_text())
    assert best_cfg["train_config"]["lr"] == res.best["lr"]
    assert (tmp_path / "tune" / "trials.csv").read_text().count("\n") == 3
    density, _ = load_checkpoint(res.best_checkpoint)
    assert density.config.n_units == res.best["n_units"]
    # the best checkpoint carries the scorer's reference (issue 12): finite percentiles
    from mendis_ray.science.ood import Scorer

    scorer = Scorer.from_checkpoint(str(res.best_checkpoint))
    assert scorer.reference is not None and len(scorer.reference.ref_log_p) > 0
    test = table_arrays(read_dataset(sim_sets / "test"))
    out = scorer.score(test.flux[:20], test.ivar[:20], test.labels[:20], marginal="none")
    assert np.isfinite(out["percentile"]).all() and np.isfinite(out["signal_percentile"]).all()


@pytest.mark.slow
def test_tune_signal_grid_over_k_ranks_by_total_log_p(ray_session, survey_sets, tmp_path):
    """Two trials (k 4 and 6) on 1500 survey spectra: a complete table, the best trial by
    the validation log p of the total model (which the best checkpoint reproduces on the
    same validation rows), its config, and a loadable, scoring signal checkpoint."""
    from mendis_ray.config import SignalConfig
    from mendis_ray.distributed.tune import SignalTuneConfig, tune_signal, validation_log_p
    from mendis_ray.science.signal_scores import SignalScorer, load_scorer
    from mendis_ray.train.signal import load_training_shards

    cfg = SignalConfig(hidden=32, epochs=2)
    grid = SignalTuneConfig(ks=(4, 6), n_units=(2,), max_concurrent_trials=2,
                            storage_path=str(tmp_path / "runs"))  # fmt: skip
    res = tune_signal(survey_sets / "train", tmp_path / "tune", cfg, grid)
    assert sorted(t["k"] for t in res.trials) == [4, 6] and len(res.trials) == 2
    assert all(t["status"] == "completed" and t["k_used"] == t["k"] for t in res.trials)
    assert all(np.isfinite(t["val_log_p"]) and t["val_finite"] == 1.0 for t in res.trials)
    assert res.best["val_log_p"] == max(t["val_log_p"] for t in res.trials)
    out = tmp_path / "tune"
    best_cfg = json.loads((out / "best_config.json").read_text())
    assert best_cfg["signal_config"]["n_signal"] == res.best["k"]
    assert best_cfg["signal_config"]["n_units"] == 2 and best_cfg["trial"] == res.best
    assert all(t["lr"] == cfg.lr for t in res.trials)  # not searched: the config's
    table = (out / "trials.csv").read_text().splitlines()
    assert len(table) == 3 and "val_log_p" in table[0].split(",")
    assert json.loads((out / "trials.json").read_text()) == res.trials
    scorer = load_scorer(res.best_checkpoint)
    assert isinstance(scorer, SignalScorer) and scorer.model.basis.k == res.best["k"]
    # the reported metric is the checkpoint's total log p on the shared validation rows
    flux, ivar, labels, _ = load_training_shards([survey_sets / "train"], cfg.seed)
    va = slice(len(flux) - round(0.1 * len(flux)), len(flux))
    coords = scorer.model.coordinates(flux[va], ivar[va], labels[va])
    val_log_p, finite = validation_log_p(scorer.model, coords)
    assert finite == 1.0 and val_log_p == pytest.approx(res.best["val_log_p"], abs=1e-2)
    test = table_arrays(read_dataset(survey_sets / "test"))
    scores = scorer.score(test.flux, test.ivar, test.labels)
    assert np.isfinite(scores["score"]).all() and np.isfinite(scores["percentile"]).all()
