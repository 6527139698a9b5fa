"""The arguments of the Serve scoring application (no Ray here): :class:`ServeArgs` (the
``args:`` of ``serve/config.yaml``, ``build_app``'s dict, ``mendis serve``'s options) and
:func:`validate_args`.

The score settings Serve shares with ``mendis score`` (``marginal``, the default of a
request that does not say, and the Scorer knobs ``range_sigma``, ``max_masked_fraction``,
``profile_steps``; :data:`mendis_ray.cli_options.SERVE_SCORE_FIELDS`) take their defaults
and help from :class:`mendis_ray.config.ScoreConfig`.  ``batch_size`` here is a serving
knob (spectra per ``@serve.batch`` model call, a latency trade-off), not ScoreConfig's
batch size of the catalog pipeline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mendis_ray.cli_options import SERVE_SCORE_FIELDS
from mendis_ray.config import ScoreConfig
from mendis_ray.predictor import Predictor
from mendis_ray.scoring_api import DEFAULT_MAX_MARGINAL, DEFAULT_MAX_SPECTRA

__all__ = ["ServeArgs", "validate_args"]

_SCORE = ScoreConfig()
_FIELDS = {f.name: f for f in dataclasses.fields(ScoreConfig)}


def _help(name: str) -> str:
    """ScoreConfig's help of the field ``name``."""
    return _FIELDS[name].metadata["help"]


class ServeArgs(BaseModel):
    """Arguments of :func:`build_app` (the ``args:`` of a Serve config file)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(description="checkpoint folder (config.json + model.safetensors)")
    batch_size: int = Field(64, ge=1, le=65536, description="spectra per scoring batch")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0.0, le=10.0, description="how long a batch waits to fill"
    )
    device: str | None = Field(
        None, pattern=r"^(cpu|cuda(:\d+)?)$", description="default: cuda if num_gpus > 0"
    )
    num_cpus: float = Field(1.0, gt=0.0, description="CPUs per replica (sets torch threads)")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per replica")
    num_threads: int | None = Field(None, ge=1, description="torch threads; default num_cpus")
    num_replicas: int | None = Field(None, ge=1, description="fixed count (no autoscaling)")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(32.0, gt=0.0)
    max_ongoing_requests: int = Field(128, ge=1)
    max_request_bytes: int = Field(64 << 20, ge=1024, description="413 above this")
    max_spectra: int = Field(DEFAULT_MAX_SPECTRA, ge=1, description="spectra per request")
    max_marginal: int = Field(
        DEFAULT_MAX_MARGINAL, ge=0, description="label-free (slow) spectra per request"
    )
    triage: str | None = Field(
        None, description="scored catalog folder (mendis score --out) served at /triage"
    )
    # --- score settings shared with `mendis score`: defaults and help from ScoreConfig
    marginal: Literal["none", "unlabelled"] = Field(
        _SCORE.marginal, description=_help("marginal") + " when a request does not say "
        "(its 'marginal' wins); 'all' is not a per-request mode",
    )  # fmt: skip
    range_sigma: float = Field(_SCORE.range_sigma, gt=0.0, description=_help("range_sigma"))
    max_masked_fraction: float = Field(
        _SCORE.max_masked_fraction, ge=0.0, le=1.0, description=_help("max_masked_fraction")
    )
    profile_steps: int = Field(
        _SCORE.profile_steps, ge=1, le=100_000, description=_help("profile_steps")
    )

    @model_validator(mode="after")
    def _consistent(self) -> ServeArgs:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})"
            )
        if self.device and self.device.startswith("cuda") and self.num_gpus <= 0:
            raise ValueError(f"device {self.device!r} needs num_gpus > 0")
        return self

    @property
    def resolved_device(self) -> str:
        return self.device or ("cuda" if self.num_gpus > 0 else "cpu")

    @property
    def threads(self) -> int:
        return self.num_threads or max(1, int(self.num_cpus))

    def score_config(self) -> ScoreConfig:
        """The ScoreConfig of the shared score settings (the rest at their defaults)."""
        return ScoreConfig().replace(**{k: getattr(self, k) for k in SERVE_SCORE_FIELDS})


def validate_args(args: Mapping[str, Any]) -> ServeArgs:
    """:class:`ServeArgs` from a dict, or a ValueError naming every bad argument.  The
    checkpoint folder must exist here (the driver, or the Serve controller for ``serve
    deploy``) and at the same path on every node that runs a replica; a relative path is
    resolved here."""
    if not isinstance(args, Mapping):
        raise ValueError(f"build_app: args must be a mapping, got {type(args).__name__}")
    try:
        s = ServeArgs.model_validate(dict(args))
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'args'}: {e['msg']}"
            for e in err.errors(include_url=False, include_input=False)
        )
        known = ", ".join(ServeArgs.model_fields)
        raise ValueError(f"build_app: bad args ({problems}); known args: {known}") from None
    from mendis_ray.flow.checkpoint import CheckpointError, checkpoint_info

    ckpt = Path(s.checkpoint)
    try:
        checkpoint_info(ckpt)
    except CheckpointError as err:
        raise ValueError(
            f"build_app: checkpoint {str(ckpt)!r} is not a checkpoint folder ({err})"
        ) from None
    # Load it once here: a truncated or invalid checkpoint fails now with its own error,
    # instead of replicas failing and being restarted by Serve for a minute.
    Predictor.load(ckpt)  # either model kind; raises CheckpointError (a ValueError)
    update = {"checkpoint": str(ckpt.resolve())}
    if s.triage is not None:
        from mendis_ray.triage.page import load_triage

        try:
            load_triage(s.triage)  # names what is missing
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"build_app: triage: {err}") from None
        update["triage"] = str(Path(s.triage).resolve())
    # replicas may start in another working directory: pass absolute paths
    return s.model_copy(update=update)
