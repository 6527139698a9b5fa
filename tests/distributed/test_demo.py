"""``mendis demo --quick`` end to end on the shared local Ray: every stage runs, the
report names real numbers and figures, and the far outliers are found."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_quick_demo_end_to_end(ray_session, tmp_path):
    from mendis_ray.distributed.demo import DemoConfig, run_demo

    cfg = DemoConfig.quick_config(out=str(tmp_path / "demo"), n_train=400, n_test=200,
                                  n_outlier=60, n_subtle=60, epochs=1)  # fmt: skip
    res = run_demo(cfg)
    out = tmp_path / "demo"
    report = (out / "report.md").read_text()
    for fig in ("training", "scores", "correlation", "reconstruction"):
        png = out / "figures" / f"{fig}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert f"figures/{fig}.png" in report
    auroc = {(r["outliers"], r["score"]): r["auroc"] for r in res["auroc"]}
    for cls in ("cemp", "stripped"):  # far outside the training set: found by the flow
        assert auroc[(cls, "flow_log_p")] > 0.95
    assert json.loads((out / "results.json").read_text())["training"]["epochs_run"] == 1
    assert "| flow |" in report and "AUROC" in report
    assert (out / "checkpoint" / "model.safetensors").is_file()
    # stage 4b: the signal-space model beside the flow, with its own checkpoint
    assert auroc[("stripped", "signal_model")] > 0.95
    assert "signal-space model beside the flow" in report and "signal_model" in report
    from mendis_ray.science.signal_scores import load_scorer

    assert load_scorer(out / "checkpoint_signal").model.basis.k >= 2
