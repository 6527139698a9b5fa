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
