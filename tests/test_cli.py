"""`mendis simulate` / `mendis inspect` end to end on a small set."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mendis_ray.cli import main
from mendis_ray.spectra.grid import paper_grid
from mendis_ray.spectra.shards import dataset_files, read_dataset, table_arrays

ARGS = ["--n-train", "120", "--n-test", "40", "--n-outlier", "30", "--shards", "2", "--seed", "7"]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "run"
    assert main(["simulate", "--out", str(out), *ARGS]) == 0
    return out


def test_simulate_writes_every_set_with_truth(simulated):
    summary = json.loads((simulated / "summary.json").read_text())
    assert [r["set"] for r in summary["sets"]] == ["train", "test", "cemp", "rotator", "stripped"]
    train = read_dataset(simulated / "train", paper_grid())
    assert train.num_rows == 120 and len(dataset_files(simulated / "train")) == 2
    a = table_arrays(train)
    assert a.flux.shape == (120, 2405) and np.all(a.ivar > 0)
    # Observed labels are the true ones plus the paper's scatter.
    dt = a.labels[:, 0] - train.column("truth_teff").to_numpy()
    assert 10 < np.std(dt) < 45
    assert set(train.column("truth_class").to_pylist()) == {"train"}
    cemp = read_dataset(simulated / "cemp")
    feh = cemp.column("truth_fe_h").to_numpy()
    assert feh.max() <= -1.5
    assert len(summary["figures"]) == 2
    for f in summary["figures"]:
        assert Path(f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(f).stat().st_size > 20_000


def test_simulate_is_deterministic_and_rerun_is_clean(simulated, tmp_path):
    out = tmp_path / "again"
    assert main(["simulate", "--out", str(out), *ARGS, "--no-figures"]) == 0
    a = table_arrays(read_dataset(simulated / "train"))
    b = table_arrays(read_dataset(out / "train"))
    np.testing.assert_array_equal(a.flux, b.flux)
    np.testing.assert_array_equal(a.labels, b.labels)
    # Rerun into the same folder with fewer shards: no stale shards, same rows.
    args = [a if a != "2" else "1" for a in ARGS]
    assert main(["simulate", "--out", str(out), *args, "--no-figures"]) == 0
    assert len(dataset_files(out / "train")) == 1
    assert len(list((out / "train").glob("*.parquet"))) == 1


def test_inspect_and_clear_errors(simulated, capsys):
    assert main(["inspect", str(simulated / "test")]) == 0
    assert "40 rows" in capsys.readouterr().out
    assert main(["inspect", str(simulated / "nowhere")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_console_script_entry_point():
    r = subprocess.run(
        [sys.executable, "-m", "mendis_ray.cli", "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "simulate" in r.stdout


JOBS = {"simulate": ["simulate"], "train": ["train"], "tune": ["tune"], "analyze": ["analyze"],
        "demo": ["demo"], "score_catalog": ["score"]}  # fmt: skip


@pytest.mark.parametrize("preset", ["local", "paper"])
def test_job_configs_parse_and_keep_their_models(preset):
    """Every section of jobs/configs/PRESET.yaml is a valid ``mendis`` command line (the
    jobs run exactly that), and the train and tune sections pick the full-space flow
    (their flow options would be ignored by the signal-space default)."""
    import importlib.util

    from mendis_ray.cli import build_parser

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("jobs_entry", root / "jobs" / "_entry.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    path = root / "jobs" / "configs" / f"{preset}.yaml"
    parsed = {
        section: build_parser().parse_args([*command, *entry.section_args(path, section)])
        for section, command in JOBS.items()
    }
    assert parsed["train"].model == "flow" and parsed["tune"].model == "flow"
    assert parsed["tune"].lrs and parsed["tune"].units


def test_demo_offers_only_presets_that_fit_its_spectra(capsys):
    """The demo's spectra have 2,405 pixels; the 16-pixel test preset is refused by the
    parser (before Ray starts), the others are offered."""
    from mendis_ray.cli import build_parser
    from mendis_ray.config import get_preset

    parser = build_parser()
    with pytest.raises(SystemExit) as err:
        parser.parse_args(["demo", "--preset", "tiny"])
    assert err.value.code == 2 and "invalid choice: 'tiny'" in capsys.readouterr().err
    for name in ("compact", "paper"):
        assert parser.parse_args(["demo", "--preset", name]).preset == name
        assert get_preset(name)[0].n_pix == 2405


def test_a_flow_preset_that_does_not_fit_the_shards_stops_before_ray(simulated, tmp_path, capsys):
    """``mendis train --model flow --preset tiny`` on 2,405-pixel shards: refused with the
    sizes of the presets before Ray starts (the workers' error came after 13 s)."""
    out = tmp_path / "run"
    argv = ["train", str(simulated / "train"), "--out", str(out), "--model", "flow",
            "--preset", "tiny"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--preset tiny: its flow takes 16 pixels" in err and "have 2405" in err
    assert "starting a local Ray" not in err and not out.exists()
