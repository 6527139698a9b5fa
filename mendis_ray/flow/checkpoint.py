"""Checkpoints without pickle: a folder with ``config.json`` and ``model.safetensors``.

``config.json``: format version, the flow's FlowConfig, the TrainConfig, the grid
(name, n_pix, hash, wavelength range), training metrics and free-form extras.
``model.safetensors``: the flow's state_dict (``flow.*``), the standardization
(``standardizer.mean``, ``standardizer.std``, float64) and the grid wavelengths
(``grid.wavelength``).  A checkpoint alone is enough to score new spectra.

Writes are atomic: the folder is written under a temporary name beside the target and
renamed into place (an existing checkpoint is replaced only once the new one is complete).
``config.json`` records the SHA-256 of a tensor file of at most ``HASH_CHECK_BYTES``
(``tensors_sha256``, since 2026-12-01) and loading checks it: a checkpoint whose bytes
were damaged after it was written is refused, not scored into nonsense.  Larger files
(the paper preset's 4 GB) and older checkpoints are checked for their header and size.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mendis_ray.atomic import replace_dir
from mendis_ray.config import FlowConfig, TrainConfig
from mendis_ray.flow.density import SpectrumDensity, Standardizer
from mendis_ray.spectra.grid import grid_text, same_grid

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointInfo",
    "check_grid",
    "checkpoint_info",
    "checkpoint_kind",
    "load_checkpoint",
    "read_config",
    "save_checkpoint",
    "verify_tensors",
    "write_checkpoint_dir",
]

FORMAT_VERSION = 1
CONFIG = "config.json"
TENSORS = "model.safetensors"
KINDS = ("flow", "signal")  # the model kinds this version reads (config.json's model_kind)
HASH_CHECK_BYTES = 256 * 2**20  # tensor files up to this size have their SHA-256 checked


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the path and the reason."""


def save_checkpoint(
    path: str | os.PathLike,
    density: SpectrumDensity,
    train_config: TrainConfig | None = None,
    metrics: dict | None = None,
    extra: dict | None = None,
    extra_arrays: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write ``density`` to the folder ``path`` atomically; return the path.

    ``extra_arrays`` (e.g. a scorer's reference statistics) are stored as ``extra.<name>``
    tensors and come back from :func:`load_checkpoint` in ``info["extra_arrays"]``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"flow.{k}": v.detach().cpu().contiguous() for k, v in density.flow.state_dict().items()
    }
    tensors["standardizer.mean"] = torch.from_numpy(np.ascontiguousarray(density.standardizer.mean))
    tensors["standardizer.std"] = torch.from_numpy(np.ascontiguousarray(density.standardizer.std))
    if "wavelength" in density.grid:
        tensors["grid.wavelength"] = torch.as_tensor(np.asarray(density.grid["wavelength"]))
    for name, arr in (extra_arrays or {}).items():
        tensors[f"extra.{name}"] = torch.from_numpy(np.ascontiguousarray(arr))
    grid = {k: v for k, v in density.grid.items() if k != "wavelength"}
    config = {
        "format_version": FORMAT_VERSION,
        "flow_config": density.config.to_dict(),
        "train_config": asdict(train_config) if train_config else None,
        "grid": grid,
        "metrics": metrics or {},
        "extra": extra or {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return write_checkpoint_dir(path, config, lambda f: save_file(tensors, f))


def write_checkpoint_dir(
    path: str | os.PathLike, config: dict, save_tensors: Callable[[str], None]
) -> Path:
    """Write a checkpoint folder atomically: ``save_tensors(file)`` writes the safetensors
    file and ``config`` becomes ``config.json``, under a temporary name beside ``path``
    that replaces ``path`` only once both are complete.  Every model kind saves this way."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        try:
            save_tensors(str(tmp / TENSORS))
        except Exception as err:  # safetensors' own error type: say what it is
            if isinstance(err, OSError) or "No space left" not in str(err):
                raise
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err
        if (tmp / TENSORS).stat().st_size <= HASH_CHECK_BYTES:  # what loading checks
            config = {**config, "tensors_sha256": _sha256(tmp / TENSORS)}
        (tmp / CONFIG).write_text(json.dumps(config, indent=1, default=float))
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**22), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_tensors(path: str | os.PathLike, info: dict, ten_path: Path) -> None:
    """A CheckpointError naming the file unless the checkpoint ``path``'s tensor file
    ``ten_path`` has a readable header that covers the file (safetensors checks a
    truncated or extended file) and, where ``info`` (its config.json) records
    ``tensors_sha256`` and the file is at most ``HASH_CHECK_BYTES``, that SHA-256."""
    from safetensors import safe_open

    try:
        with safe_open(str(ten_path), framework="np") as f:
            f.keys()
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{ten_path}: unreadable tensors ({err})") from err
    want = info.get("tensors_sha256")
    if want is not None and ten_path.stat().st_size <= HASH_CHECK_BYTES:
        if _sha256(ten_path) != want:
            raise CheckpointError(
                f"{ten_path}: damaged: its SHA-256 differs from the one {Path(path) / CONFIG} "
                "recorded when it was written (copy the checkpoint again, or retrain)"
            )


def _check_standardizer(std: Standardizer, where: Path) -> None:
    """Refuse a standardization that would fail (or silently poison) every score later:
    non-finite means, or standard deviations that are not finite and positive."""
    mean, sd = np.asarray(std.mean), np.asarray(std.std)
    if mean.shape != sd.shape or mean.ndim != 1:
        raise CheckpointError(f"{where}: standardizer.mean and .std differ in shape")
    if not np.isfinite(mean).all():
        raise CheckpointError(f"{where}: standardizer.mean has non-finite values")
    bad = ~(np.isfinite(sd) & (sd > 0))
    if bad.any():
        raise CheckpointError(
            f"{where}: standardizer.std must be finite and > 0 ({int(bad.sum())} of "
            f"{sd.size} features are not, e.g. feature {int(np.flatnonzero(bad)[0])})"
        )


def load_checkpoint(
    path: str | os.PathLike,
    *,
    expect_grid: dict | None = None,
    expect_preset: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[SpectrumDensity, dict]:
    """Load a checkpoint folder (no pickle).

    Args:
        path: the folder written by :func:`save_checkpoint`.
        expect_grid: a ``Grid.describe()`` dict the checkpoint must match (hash and size).
        expect_preset: a preset name the checkpoint's FlowConfig must carry.

    Returns:
        (density in eval mode, the parsed config.json).
    """
    path = Path(path)
    info, ten_path = read_config(path)
    cfg_path = path / CONFIG
    if checkpoint_kind(path, info) != "flow":
        raise CheckpointError(
            f"{path}: a {info.get('model_kind')!r} checkpoint, not a full-space flow "
            "(load it with mendis_ray.science.signal_scores.load_scorer)"
        )
    try:
        flow_cfg = FlowConfig.from_dict(info["flow_config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{cfg_path}: bad flow_config ({err})") from err
    grid = info.get("grid", {})
    check_grid(path, grid, expect_grid)
    verify_tensors(path, info, ten_path)
    if expect_preset is not None and flow_cfg.name != expect_preset:
        raise CheckpointError(
            f"{path}: checkpoint is preset {flow_cfg.name!r}, expected {expect_preset!r}"
        )
    try:
        tensors = load_file(str(ten_path), device="cpu")
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{ten_path}: unreadable tensors ({err})") from err
    state = {k.removeprefix("flow."): v for k, v in tensors.items() if k.startswith("flow.")}
    flow = _flow_from_state(flow_cfg, state, path)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{ten_path}: non-finite weights in {bad[:3]}")
    try:
        std = Standardizer(
            tensors["standardizer.mean"].double().numpy(),
            tensors["standardizer.std"].double().numpy(),
        )
    except KeyError as err:
        raise CheckpointError(f"{ten_path}: missing tensor {err}") from err
    _check_standardizer(std, ten_path)
    if "grid.wavelength" in tensors:
        grid = {**grid, "wavelength": tensors["grid.wavelength"].double().numpy()}
    info["extra_arrays"] = {
        k.removeprefix("extra."): v.numpy() for k, v in tensors.items() if k.startswith("extra.")
    }
    density = SpectrumDensity(flow, std, flow_cfg, grid).to(device)
    density.eval()
    return density, info


def _flow_from_state(flow_cfg: FlowConfig, state: dict[str, torch.Tensor], path: Path):
    """The flow of ``flow_cfg`` holding the weights ``state``, in the precision they were
    saved in.  Built on the meta device and given uninitialised (aligned) storage before
    the weights are copied in: no random initialisation (seconds for a large preset) that
    every weight would overwrite."""
    from mendis_ray.flow.model import MendisFlow

    with torch.device("meta"):
        flow = MendisFlow(flow_cfg)
    saved = next((v for v in state.values() if v.is_floating_point()), None)
    if saved is not None:
        flow = flow.to(saved.dtype)  # keep the precision the weights were saved in
    flow = flow.to_empty(device="cpu")
    try:
        flow.load_state_dict(state, strict=True)  # strict: every tensor is overwritten
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: weights do not fit the {flow_cfg.name!r} flow ({err})"
        ) from err
    return flow


def read_config(path: str | os.PathLike) -> tuple[dict, Path]:
    """The parsed ``config.json`` of a checkpoint folder and the path of its tensors;
    a :class:`CheckpointError` naming the file when either is missing or unreadable."""
    path = Path(path)
    cfg_path, ten_path = path / CONFIG, path / TENSORS
    for p in (cfg_path, ten_path):
        if not p.is_file():
            raise CheckpointError(f"{path}: not a mendis_ray checkpoint ({p.name} is missing)")
    try:
        info = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({err})") from err
    if not isinstance(info, dict) or info.get("format_version") != FORMAT_VERSION:
        got = info.get("format_version") if isinstance(info, dict) else None
        raise CheckpointError(
            f"{path}: checkpoint format {got!r}, this version reads {FORMAT_VERSION}"
        )
    return info, ten_path


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint folder holds, read without building its model: the parsed
    ``config.json`` (``config``) and the path of its tensors (``tensors``)."""

    path: Path
    config: dict
    tensors: Path

    @property
    def kind(self) -> str:
        """``"flow"`` or ``"signal"`` (see :func:`checkpoint_kind`)."""
        return checkpoint_kind(self.path, self.config)

    @property
    def grid(self) -> dict:
        """The grid it was trained on (``Grid.describe()`` less the wavelengths); may be
        empty in a hand-made checkpoint."""
        return dict(self.config.get("grid") or {})

    def require_grid(self) -> dict:
        """:attr:`grid`, or a CheckpointError where it records no hash and size."""
        grid = self.grid
        if "hash" not in grid or "n_pix" not in grid:
            raise CheckpointError(
                f"{self.path / CONFIG}: no grid (hash, n_pix) recorded; cannot check the catalog"
            )
        return grid

    def wavelength(self) -> np.ndarray:
        """The stored grid wavelengths (n_pix,) float64 (only that tensor is read)."""
        from safetensors import safe_open

        try:
            with safe_open(str(self.tensors), framework="np") as f:
                return np.asarray(f.get_tensor("grid.wavelength"), np.float64)
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{self.tensors}: no grid wavelengths ({err})") from err

    def grid_object(self):
        """The :class:`~mendis_ray.spectra.grid.Grid` of the checkpoint: the named grid
        with the same hash, else one rebuilt from the stored wavelengths."""
        from mendis_ray.spectra.grid import GRID_NAMES, get_grid, grid_from_wavelength

        grid = self.require_grid()
        name = str(grid.get("name", "custom"))
        if name in GRID_NAMES and get_grid(name).hash == grid["hash"]:
            return get_grid(name)
        try:
            g = grid_from_wavelength(self.wavelength(), name=name)
        except CheckpointError as err:
            raise CheckpointError(
                f"{self.path}: grid {name!r} is not a named grid and its wavelengths are not "
                f"stored ({err}); ingest the FITS files with `mendis ingest apogee` first"
            ) from err
        if g.hash != grid["hash"]:
            raise CheckpointError(f"{self.path}: cannot rebuild grid {name!r} exactly")
        return g


def checkpoint_info(path: str | os.PathLike) -> CheckpointInfo:
    """The metadata of a checkpoint folder (config, kind, grid) without loading its
    weights; a :class:`CheckpointError` naming the file when it is not a checkpoint."""
    info, tensors = read_config(path)
    return CheckpointInfo(Path(path), info, tensors)


def checkpoint_kind(path: str | os.PathLike, info: dict | None = None) -> str:
    """``"flow"`` (the full-space Mendis flow; every checkpoint before the signal model)
    or ``"signal"`` (:mod:`mendis_ray.flow.signal`)."""
    info = info if info is not None else read_config(path)[0]
    kind = str(info.get("model_kind", "flow"))
    if kind not in KINDS:
        raise CheckpointError(
            f"{Path(path) / CONFIG}: model_kind {kind!r} is not one this version reads "
            f"({', '.join(map(repr, KINDS))})"
        )
    return kind


def check_grid(path: str | os.PathLike, grid: dict, expect_grid: dict | None) -> None:
    """Refuse a checkpoint trained on another grid than ``expect_grid`` (hash and size)."""
    if expect_grid is not None and not same_grid(grid, expect_grid):
        raise CheckpointError(
            f"{path}: checkpoint was trained on grid {grid_text(grid)}, but the data are on "
            f"grid {grid_text(expect_grid)}"
        )
