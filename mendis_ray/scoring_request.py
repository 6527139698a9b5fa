"""The common ground of the scoring endpoint's parsers (no Ray here): media types and
limits, :class:`RequestError` (status, field, a message that never echoes the input),
:class:`ParsedRequest` (the arrays of a validated request), the Content-Type dispatch
and the grid check.  :mod:`mendis_ray.scoring_api` parses JSON bodies and builds the
responses, :mod:`mendis_ray.scoring_tables` parses Arrow/Parquet bodies; both re-export
from here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mendis_ray.config import ScoreConfig
from mendis_ray.spectra.grid import grid_text, same_grid

__all__ = [
    "ARROW_FILE",
    "ARROW_STREAM",
    "BODY_KINDS",
    "DEFAULT_MARGINAL",
    "DEFAULT_MAX_MARGINAL",
    "DEFAULT_MAX_SPECTRA",
    "JSON",
    "PARQUET",
    "ParsedRequest",
    "RequestError",
    "body_kind",
    "check_grid",
    "format_validation_errors",
]

JSON = "application/json"
ARROW_STREAM = "application/vnd.apache.arrow.stream"
ARROW_FILE = "application/vnd.apache.arrow.file"
PARQUET = "application/vnd.apache.parquet"
#: media type -> body kind
BODY_KINDS: dict[str, str] = {
    JSON: "json",
    ARROW_STREAM: "arrow_stream",
    ARROW_FILE: "arrow_file",
    PARQUET: "parquet",
    "application/x-parquet": "parquet",
}
DEFAULT_MAX_SPECTRA = 4096
DEFAULT_MAX_MARGINAL = 8
#: the label-free mode of a request that does not say (ScoreConfig's, as ``mendis score``)
DEFAULT_MARGINAL = ScoreConfig.marginal
MAX_ID_LENGTH = 256
F32_MAX = float(np.finfo(np.float32).max)
LABELS = ("teff", "logg", "feh")
#: Arrow columns the parser reads (everything else in a body is ignored)
ARROW_COLUMNS = ("id", "flux", "ivar", *LABELS)
_MAX_MESSAGE = 300


class RequestError(ValueError):
    """A request the server refuses: HTTP ``status``, the offending ``field`` (e.g.
    ``spectra[3].flux[17]``, ``Content-Type``, ``body``) and a short ``message``."""

    def __init__(self, status: int, field: str, message: str) -> None:
        self.status = int(status)
        self.field = field
        self.message = _clip(message)
        super().__init__(f"{field}: {self.message}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON error body: ``{"error": "FIELD: MESSAGE", "field": FIELD}``."""
        return {"error": f"{self.field}: {self.message}", "field": self.field}


def _clip(text: str, n: int = _MAX_MESSAGE) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def format_validation_errors(errors: Sequence[Mapping[str, Any]]) -> RequestError:
    """A :class:`RequestError` from pydantic/FastAPI errors: the first error's location
    (``spectra[3].flux``) and message, plus how many more there are.  The input values are
    never echoed.  Invalid JSON gives 400, anything else 422."""
    if not errors:
        return RequestError(422, "body", "invalid request")
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    if first.get("type") == "extra_forbidden" and loc:
        loc = (*loc[:-1], "(unknown field)")  # never reflect the client's key
    field = _loc(loc)
    msg = str(first.get("msg", "invalid value"))
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more error(s))"
    status = 400 if first.get("type") == "json_invalid" else 422
    return RequestError(status, field, msg)


def _loc(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = _clip(str(part), 40)
            out += f".{text}" if out else text
    return out or "body"


@dataclass
class ParsedRequest:
    """Arrays of one validated request.

    Attributes:
        ids: n ids (str or None). flux, ivar: (n, n_pix) float64 (ivar 1 where not
        given). labels: (n, 3) float64 Teff, log g, [Fe/H], NaN where not given.
        marginal: "unlabelled" or "none". grid: the JSON body's grid hash or name.
    """

    ids: list[Any]
    flux: np.ndarray
    ivar: np.ndarray
    labels: np.ndarray
    marginal: str = DEFAULT_MARGINAL
    grid: str | None = None

    def __len__(self) -> int:
        return len(self.flux)

    @property
    def labelled(self) -> np.ndarray:
        """(n,) bool: all three labels given."""
        return np.isfinite(self.labels).all(axis=1)


def body_kind(content_type: str | None) -> str:
    """``json`` / ``arrow_stream`` / ``arrow_file`` / ``parquet`` for a Content-Type
    header (parameters such as ``charset`` ignored); 415 otherwise."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media in BODY_KINDS:
        return BODY_KINDS[media]
    accepted = ", ".join(BODY_KINDS)
    what = "not supported" if media else "header missing"
    raise RequestError(415, "Content-Type", f"{what}; send one of {accepted}")


def _id(ids: Sequence[Any], r: int) -> str:
    """Nothing: the field path names the row, and ids are client input (never echoed)."""
    return ""


def check_grid(
    model_grid: Mapping[str, Any], given: str | Mapping[str, Any] | None, field: str
) -> None:
    """422 unless ``given`` (a grid hash or name, or a grid dict with ``hash``/``n_pix``)
    is the model's grid; ``None`` passes."""
    if given is None:
        return
    want = f"the model's grid {grid_text(model_grid)}"
    if isinstance(given, str):
        if given not in (model_grid.get("hash"), model_grid.get("name")):
            raise RequestError(422, field, f"not {want} (see GET /model)")
        return
    if not same_grid(given, model_grid):
        raise RequestError(422, field, f"the spectra are on another grid, not {want}")


def _check_rows(n: int, max_spectra: int) -> None:
    if n > max_spectra:
        raise RequestError(
            422, "spectra", f"more than {max_spectra} spectra in one request (max_spectra)"
        )
