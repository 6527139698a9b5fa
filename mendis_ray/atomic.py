"""Atomic file and folder writes: write under a temporary name beside the target, then
rename (``os.replace`` within one folder is atomic), so a reader sees the old file or the
new one, never half of one."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = [
    "check_out_folder",
    "json_default",
    "remove_stale_dirs",
    "replace_dir",
    "save_figure_atomic",
    "temp_beside",
    "write_atomic",
    "write_csv_atomic",
    "write_json_atomic",
    "write_table_atomic",
]

log = logging.getLogger(__name__)


def json_default(o: object) -> object:
    """``json.dumps(default=...)`` for numpy scalars and arrays (anything else: str)."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def check_out_folder(out: str | os.PathLike, option: str = "--out") -> None:
    """A ValueError naming ``out`` unless it is a folder this process can write in, or
    could make: checked before a command's work, not when its results are written.  A
    folder it makes here is removed again (the command makes it when it writes)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{option} {str(out)!r} exists and is not a folder")
    made = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-check.{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{option} {str(out)!r} is not writable: {err.strerror}") from err
    finally:
        for p in made:  # innermost first
            if p.is_dir():
                try:
                    p.rmdir()
                except OSError:
                    break


def temp_beside(path: Path) -> Path:
    """A fresh hidden name beside ``path`` (same folder, so ``os.replace`` is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` then rename ``tmp`` to ``path``; the temporary is removed on error."""
    path = Path(path)
    tmp = temp_beside(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(obj: object, path: str | os.PathLike) -> Path:
    """JSON (indented, numpy-aware) written atomically."""
    text = json.dumps(obj, indent=1, default=json_default) + "\n"
    return write_atomic(path, lambda t: t.write_text(text))


def write_table_atomic(table, path: str | os.PathLike) -> Path:
    """A pyarrow table as Parquet, written atomically."""
    import pyarrow.parquet as pq

    return write_atomic(path, lambda t: pq.write_table(table, t))


def write_csv_atomic(table, path: str | os.PathLike) -> Path:
    """A pyarrow table as CSV (with a header row), written atomically."""
    import pyarrow.csv as pacsv

    return write_atomic(path, lambda t: pacsv.write_csv(table, t))


def save_figure_atomic(fig, path: str | os.PathLike, **savefig_kwargs: object) -> Path:
    """A matplotlib figure written atomically, in the format of ``path``'s suffix."""
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    return write_atomic(path, lambda t: fig.savefig(t, format=fmt, **savefig_kwargs))


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (this process counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return pid != os.getpid()


def remove_stale_dirs(folder: Path, pattern: re.Pattern) -> list[Path]:
    """Remove the sub-folders of ``folder`` whose name matches ``pattern`` (which has a
    ``pid`` group) and whose process no longer exists on this machine: temporaries left
    by runs that died.  Returns the removed paths."""
    removed = []
    for p in folder.iterdir():
        m = pattern.match(p.name)
        if m and p.is_dir() and not _pid_alive(int(m["pid"])):
            log.info("removing %s left by an earlier run", p)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the folder ``tmp`` to ``final``, replacing an existing ``final``.

    POSIX cannot swap two folders atomically: the old ``final`` is renamed aside first,
    so for the instant between the two renames ``final`` is absent (a reader sees the old
    folder, the new one, or none, never a mix).  If the second rename fails the old folder
    is put back and ``tmp`` removed; the old folder is deleted only once the new one is
    in place."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
