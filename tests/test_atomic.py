"""Atomic writes: a reader sees the old file or folder or the new one, never a mix, and
a failed write leaves the old one in place and no temporaries behind."""

import json
import os

import numpy as np
import pytest

from mendis_ray import atomic


def test_write_atomic_keeps_old_file_and_no_temp_on_error(tmp_path):
    path = tmp_path / "a.json"
    atomic.write_json_atomic({"x": np.float32(1.5), "v": np.arange(3)}, path)
    assert json.loads(path.read_text()) == {"x": 1.5, "v": [0, 1, 2]}

    def half(tmp):
        tmp.write_text('{"x": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.write_atomic(path, half)
    assert json.loads(path.read_text())["x"] == 1.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def _folder(path, text):
    path.mkdir()
    (path / "f.txt").write_text(text)
    return path


def test_replace_dir_swaps_and_restores_old_on_failure(tmp_path, monkeypatch):
    final = _folder(tmp_path / "ckpt", "old")
    atomic.replace_dir(_folder(tmp_path / ".new1", "new"), final)
    assert (final / "f.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

    real, calls = os.replace, []

    def second_fails(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("rename failed")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(OSError, match="rename failed"):
        atomic.replace_dir(_folder(tmp_path / ".new2", "newer"), final)
    monkeypatch.undo()
    assert (final / "f.txt").read_text() == "new"  # the old folder is back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp, no .old


def test_figure_and_npz_writes_leave_exactly_the_target(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mendis_ray.experiment import save_npz

    fig = plt.figure()
    try:
        png = atomic.save_figure_atomic(fig, tmp_path / "sub" / "f.png", dpi=20)
        pdf = atomic.save_figure_atomic(fig, tmp_path / "sub" / "f.pdf")
    finally:
        plt.close(fig)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.read_bytes()[:4] == b"%PDF"
    save_npz(tmp_path / "sub" / "a.npz", x=np.arange(3))
    assert np.load(tmp_path / "sub" / "a.npz")["x"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["a.npz", "f.pdf", "f.png"]


def test_out_folder_is_checked_before_the_work(tmp_path) -> None:
    atomic.check_out_folder(tmp_path / "a" / "b")  # makeable: fine, and nothing left behind
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"file' exists and is not a folder"):
        atomic.check_out_folder(tmp_path / "file")
    with pytest.raises(ValueError, match=r"file/sub' is not writable"):
        atomic.check_out_folder(tmp_path / "file" / "sub")


@pytest.mark.parametrize("fail_at", [0, 2, 5, None])
def test_commit_outputs_moves_a_run_in_whole_or_not_at_all(tmp_path, monkeypatch, fail_at):
    """``commit_outputs`` (``mendis score``'s last step): the staged outputs replace the
    earlier run's, whose optional page it does not make is removed; a failure at any
    rename (the ``fail_at``-th) puts every earlier output back as it was and leaves the new
    ones staged; nothing hidden is left behind either way."""
    from mendis_ray.distributed import catalog_outputs

    out, stage = tmp_path / "out", tmp_path / "out" / ".run.tmp-1-ab"
    stage.mkdir(parents=True)
    earlier = {"summary.json": "old", "top_outliers.csv": "old", "triage.html": "old",
               "verdicts.parquet": "kept", "scores/part-0.parquet": "old"}  # fmt: skip
    staged = {"summary.json": "new", "top_outliers.csv": "new", "gallery.png": "new",
              "scores/part-0.parquet": "new", "scores/part-1.parquet": "new"}  # fmt: skip
    for root, files in ((out, earlier), (stage, staged)):
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)

    def tree(root):
        return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*"))
                if p.is_file() and not p.relative_to(root).parts[0].startswith(".")}  # fmt: skip

    calls, real = [], os.replace

    def replace(src, dst):
        calls.append(src)
        if fail_at is not None and len(calls) == fail_at + 1:
            raise OSError("disk gone")
        real(src, dst)

    monkeypatch.setattr(catalog_outputs.os, "replace", replace)
    if fail_at is None:
        catalog_outputs.commit_outputs(stage, out)
        assert tree(out) == {**staged, "verdicts.parquet": "kept"}  # no triage.html: removed
        stage.rmdir()  # emptied; score_catalog removes its stage
    else:
        with pytest.raises(OSError, match="disk gone"):
            catalog_outputs.commit_outputs(stage, out)
        assert tree(out) == earlier and tree(stage) == staged
        stage.rename(tmp_path / "staged")  # score_catalog removes its stage
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
