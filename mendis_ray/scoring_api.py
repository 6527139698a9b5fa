"""The scoring endpoint's request schema, body parsers and response rows (no Ray here).

:mod:`mendis_ray.distributed.serving` wraps these in a Ray Serve application; everything
that can be checked without a server lives here and is unit-tested on its own.

Request forms (``POST /score``), chosen by the ``Content-Type`` header:

``application/json``
    ``{"spectra": [SPECTRUM, ...], "marginal": "none", "grid": "HASH-or-NAME"}`` or one
    bare ``SPECTRUM``; a SPECTRUM is ``{"id": ..., "flux": [n_pix finite numbers],
    "ivar": [n_pix finite numbers >= 0], "teff": K, "logg": dex, "feh": dex}`` with
    ``id``, ``ivar`` (default: every pixel good) and the labels optional.  Validated by
    the pydantic models of :func:`request_models`, whose lengths are the served model's
    ``n_pix``.
``application/vnd.apache.arrow.stream``, ``application/vnd.apache.arrow.file``,
``application/vnd.apache.parquet`` (or ``application/x-parquet``)
    A table with the columns of a Parquet shard (:mod:`mendis_ray.spectra.shards`):
    ``flux`` (required; fixed-size or variable list of numbers), ``ivar``, ``teff``,
    ``logg``, ``feh``, ``id`` (optional); other columns are ignored, so a shard can be
    posted as it is.  When the schema metadata carries the shard metadata its grid must be
    the model's.  ``marginal`` and ``grid`` come from the query string.

Rules common to both forms: flux and ivar values are finite and within the float32 range,
ivar >= 0 (0 marks a bad pixel; its flux is a finite placeholder), labels are finite; a
spectrum is *labelled* only when all of teff, logg and feh are given, otherwise it is
scored label-free or not at all (see ``marginal``).  JSON numbers are strict (no strings,
no booleans).  Values that pass these rules but that the model cannot score (flux of
+-3e38, integers near 2^64, every pixel masked) are scored and flagged ``unscorable``
(see :mod:`mendis_ray.science.ood`), never a server error.  Binary bodies are bounded
before decoding (rows, decompressed bytes: :mod:`mendis_ray.parquet_guard`).

``marginal``
    ``"none"`` (default): labelled spectra get their exact log p(flux, labels); unlabelled
    ones get only flags and ``masked_fraction`` (their scores are null).  ``"unlabelled"``:
    unlabelled spectra also get the label-free score log p(flux) (Laplace approximation
    around the best labels, :class:`mendis_ray.science.ood.Scorer`).  That costs an
    optimisation per spectrum (up to 200 Adam steps of the flow: about 100-1000x the cost
    of a labelled score), so a request may ask for it for at most ``max_marginal``
    spectra.
    A signal-space checkpoint scores unlabelled spectra label-free in every case (the
    labels are integrated out by importance sampling, about the cost of a labelled
    score); ``marginal`` is accepted and bounded the same way, and changes nothing there.

Errors are :class:`RequestError` (HTTP status, the offending field, a short message that
never echoes the input): 400 unreadable body, 413 too large, 415 unknown content type,
422 well-formed but invalid (wrong length, non-finite values, missing fields, wrong grid,
too many spectra).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

from mendis_ray.parquet_guard import Flatbuffer, ipc_message_bounds, parquet_bounds
from mendis_ray.science.flags import flag_list
from mendis_ray.spectra.grid import grid_text, same_grid
from mendis_ray.spectra.shards import META_KEY, ShardError, schema_metadata

__all__ = [
    "ARROW_FILE",
    "ARROW_STREAM",
    "BODY_KINDS",
    "DEFAULT_MAX_MARGINAL",
    "DEFAULT_MAX_SPECTRA",
    "JSON",
    "PARQUET",
    "ErrorResponse",
    "ParsedRequest",
    "RequestError",
    "RequestModels",
    "ScoreResponse",
    "ScoreResult",
    "body_kind",
    "check_grid",
    "dumps",
    "format_validation_errors",
    "openapi_request_body",
    "parse_arrow",
    "parse_body",
    "parse_json",
    "request_models",
    "results_to_json",
    "table_request",
]

log = logging.getLogger(__name__)

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
MAX_PIX = 100_000  # longest flux list the generic (model-independent) schema admits
MAX_ID_LENGTH = 256
F32_MAX = float(np.finfo(np.float32).max)
LABELS = ("teff", "logg", "feh")
#: Arrow columns the parser reads (everything else in a body is ignored)
ARROW_COLUMNS = ("id", "flux", "ivar", *LABELS)
#: float score columns copied into each result row: those of ``Scorer.score`` (full-space
#: flow) and of ``SignalScorer.score`` (signal-space model); a column the served model
#: does not compute is null
SCORE_FIELDS = (
    "log_p",
    "log_p_marginal",
    "log_p_per_dim",
    "percentile",
    "signal_score",
    "signal_percentile",
    "log_ratio_gaussian",
    "masked_fraction",
    "score",
    "residual_score",
    "residual_percentile",
    "chi2_dof",
    "noise_level",
)
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


# ---------------------------------------------------------------------- request schema

# strict: JSON numbers only (no "1.0" strings, no true/false)
FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0.0)]


def _int_to_str(v: Any) -> Any:
    return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


#: a spectrum's id: a string (an integer is accepted and returned as its string)
SpectrumId = Annotated[
    str, BeforeValidator(_int_to_str), StringConstraints(max_length=MAX_ID_LENGTH)
]
Marginal = Literal["none", "unlabelled"]
GridName = Annotated[str, StringConstraints(min_length=1, max_length=64)]


@dataclass(frozen=True)
class RequestModels:
    """The pydantic models of one served model (``n_pix``) and request limit."""

    Spectrum: type[BaseModel]
    ScoreRequest: type[BaseModel]
    SingleScoreRequest: type[BaseModel]


@functools.lru_cache(maxsize=16)
def request_models(
    n_pix: int | None = None, max_spectra: int = DEFAULT_MAX_SPECTRA
) -> RequestModels:
    """Request models whose ``flux``/``ivar`` lists have exactly ``n_pix`` entries (or,
    with ``n_pix=None``, 1 to ``MAX_PIX``: the model-independent schema of the docs) and
    whose ``spectra`` list has 1 to ``max_spectra`` entries."""
    lo, hi = (n_pix, n_pix) if n_pix else (1, MAX_PIX)
    size = f"exactly n_pix = {n_pix}" if n_pix else "exactly n_pix (see GET /model)"
    flux_t = Annotated[
        list[FiniteFloat],
        Field(min_length=lo, max_length=hi, description=f"continuum-normalized flux, {size}"),
    ]
    ivar_t = Annotated[
        list[NonNegFloat],
        Field(
            min_length=lo,
            max_length=hi,
            description=f"inverse variance, {size} values >= 0 (0 = bad pixel); "
            "omitted = every pixel good",
        ),
    ]

    class Spectrum(BaseModel):
        """One spectrum on the model's pixel grid."""

        model_config = ConfigDict(extra="forbid", title="Spectrum")
        id: SpectrumId | None = Field(None, description="echoed back in the result")
        flux: flux_t
        ivar: ivar_t | None = None
        teff: FiniteFloat | None = Field(None, description="effective temperature (K)")
        logg: FiniteFloat | None = Field(None, description="surface gravity log g (cgs)")
        feh: FiniteFloat | None = Field(None, description="metallicity [Fe/H] (dex)")

    class ScoreRequest(BaseModel):
        """Several spectra in one request."""

        model_config = ConfigDict(extra="forbid", title="ScoreRequest")
        spectra: Annotated[list[Spectrum], Field(min_length=1, max_length=max_spectra)]
        marginal: Marginal = Field(
            "none", description="'unlabelled': label-free score of unlabelled spectra (slow)"
        )
        grid: GridName | None = Field(None, description="grid hash or name; must be the model's")

    class SingleScoreRequest(Spectrum):
        """One spectrum, at the top level of the body."""

        model_config = ConfigDict(extra="forbid", title="SingleScoreRequest")
        marginal: Marginal = "none"
        grid: GridName | None = None

    return RequestModels(Spectrum, ScoreRequest, SingleScoreRequest)


class ScoreResult(BaseModel):
    """Scores of one spectrum, null where not computed or where the served model kind has
    none (see ``model_kind`` in the response): a full-space flow (mendis_ray.science.ood)
    or a signal-space model (mendis_ray.science.signal_scores).  Higher = more typical."""

    index: int = Field(description="position of the spectrum in the request")
    id: str | None = None
    labelled: bool = Field(description="teff, logg and feh were all given")
    log_p: float | None = Field(
        description="log p(flux, labels) in physical units (nats); signal model: the total "
        "density, labels integrated out for an unlabelled spectrum"
    )
    log_p_marginal: float | None = Field(
        description="flow: label-free log p(flux) (marginal); signal model: null"
    )
    log_p_per_dim: float | None = Field(
        description="flow: the normalised score, log p / dimension; signal model: null"
    )
    percentile: float | None = Field(
        description="% of held-out training spectra whose primary score (flow: log p; "
        "signal model: score) is <= this one's"
    )
    signal_score: float | None = Field(
        description="flow: projected log-likelihood (subtle outliers); signal model: "
        "calibrated log tail probability of the signal coordinates"
    )
    signal_percentile: float | None = None
    log_ratio_gaussian: float | None = Field(
        description="flow: log p_flow - log p_gaussian; signal model: null"
    )
    masked_fraction: float | None = None
    score: float | None = Field(
        None, description="signal model: the triage score (log tail probability, 0 = "
        "typical), signal and residual combined; flow: null"
    )  # fmt: skip
    residual_score: float | None = Field(
        None, description="signal model: log tail probability of the residual outside the "
        "signal space (lines, artefacts); flow: null"
    )  # fmt: skip
    residual_percentile: float | None = Field(None, description="signal model; flow: null")
    chi2_dof: float | None = Field(
        None, description="signal model: residual chi^2 per degree of freedom; flow: null"
    )
    noise_level: float | None = Field(
        None, description="signal model: the noise level the flow is conditioned on; flow: null"
    )
    labels_used: dict[str, float | None] = Field(description="given labels, or the best-fit")
    flags: list[str] = Field(
        description="nonfinite, masked, flux_range, label_range, unscorable (the model "
        "could not score it: scores null, percentile 0)"
    )
    flag_bits: int


class ScoreResponse(BaseModel):
    n: int
    grid: str | None = Field(description="hash of the model's grid")
    model_kind: Literal["flow", "signal"] | None = Field(
        None, description="the served model: full-space flow or signal-space model"
    )
    marginal: Marginal
    results: list[ScoreResult]


class ErrorResponse(BaseModel):
    error: str
    field: str


def openapi_request_body(max_spectra: int = DEFAULT_MAX_SPECTRA) -> dict[str, Any]:
    """OpenAPI ``requestBody`` of ``POST /score`` (every accepted content type)."""
    models = request_models(None, max_spectra)
    many = _inline_refs(models.ScoreRequest.model_json_schema())
    one = _inline_refs(models.SingleScoreRequest.model_json_schema())
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {
        "required": True,
        "description": "JSON (one or many spectra) or a table of spectra in Arrow IPC "
        "(stream or file) or Parquet, with the columns of a shard: flux, ivar, teff, logg, "
        "feh, id (see mendis_ray.scoring_api).",
        "content": {
            JSON: {"schema": {"oneOf": [many, one]}},
            ARROW_STREAM: binary,
            ARROW_FILE: binary,
            PARQUET: binary,
        },
    }


def _inline_refs(schema: dict) -> dict:
    """A JSON schema with its local ``$defs`` references substituted (non-recursive)."""
    defs = schema.pop("$defs", {})

    def sub(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return sub(dict(defs[ref.removeprefix("#/$defs/")]))
            return {k: sub(v) for k, v in node.items()}
        if isinstance(node, list):
            return [sub(v) for v in node]
        return node

    return sub(schema)


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


# ---------------------------------------------------------------------- parsed request


@dataclass
class ParsedRequest:
    """Arrays of one validated request.

    Attributes:
        ids: n ids (str or None). flux, ivar: (n, n_pix) float64 (ivar 1 where not
        given). labels: (n, 3) float64 Teff, log g, [Fe/H], NaN where not given.
        marginal: "none" or "unlabelled". grid: the JSON body's grid hash or name.
    """

    ids: list[Any]
    flux: np.ndarray
    ivar: np.ndarray
    labels: np.ndarray
    marginal: str = "none"
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


def parse_body(
    body: bytes,
    kind: str,
    *,
    n_pix: int,
    model_grid: Mapping[str, Any],
    max_spectra: int = DEFAULT_MAX_SPECTRA,
    max_marginal: int = DEFAULT_MAX_MARGINAL,
    marginal: str | None = None,
    grid: str | None = None,
) -> ParsedRequest:
    """Parse and validate a request body of ``kind`` (see :func:`body_kind`).

    ``marginal`` and ``grid`` are the query-string values (a JSON body's own fields win).
    Raises :class:`RequestError`."""
    if kind == "json":
        req = parse_json(body, n_pix, max_spectra=max_spectra, marginal=marginal)
        check_grid(model_grid, grid, "grid")
        check_grid(model_grid, req.grid, "grid")
    elif kind in ("arrow_stream", "arrow_file", "parquet"):
        req = parse_arrow(body, kind, n_pix, max_spectra=max_spectra, model_grid=model_grid)
        req.marginal = marginal or "none"
        check_grid(model_grid, grid, "grid")
    else:
        raise RequestError(415, "Content-Type", f"unknown body kind {kind!r}")
    if req.marginal not in ("none", "unlabelled"):
        raise RequestError(422, "marginal", "must be 'none' or 'unlabelled'")
    if req.marginal == "unlabelled":
        n_free = int((~req.labelled).sum())
        if n_free > max_marginal:
            raise RequestError(
                422,
                "marginal",
                f"{n_free} unlabelled spectra ask for the label-free score, at most "
                f"{max_marginal} per request (an optimisation per spectrum); send fewer, "
                "give teff/logg/feh, or use marginal='none'",
            )
    return req


def parse_json(
    body: bytes, n_pix: int, *, max_spectra: int = DEFAULT_MAX_SPECTRA, marginal: str | None = None
) -> ParsedRequest:
    """Validate a JSON body (many spectra or one) against :func:`request_models`; the
    body's ``marginal`` wins over the query's ``marginal``.  The body's ``grid`` is
    returned unchecked (:func:`parse_body` checks it)."""
    models = request_models(n_pix, max_spectra)
    try:
        req = models.ScoreRequest.model_validate_json(body)
        spectra = req.spectra
    except ValidationError as err:
        errors = err.errors(include_url=False, include_input=False, include_context=False)
        single = any(
            e["type"] == "extra_forbidden" and tuple(e["loc"]) == ("flux",) for e in errors
        )
        if not single:
            raise format_validation_errors(errors) from None
        try:
            req = models.SingleScoreRequest.model_validate_json(body)
        except ValidationError as err2:
            errors = err2.errors(include_url=False, include_input=False, include_context=False)
            raise format_validation_errors(errors) from None
        spectra = [req]
    n = len(spectra)
    prefix = "spectra" if hasattr(req, "spectra") else ""
    flux = np.array([s.flux for s in spectra], dtype=np.float64).reshape(n, n_pix)
    ivar = np.ones((n, n_pix))
    for i, s in enumerate(spectra):
        if s.ivar is not None:
            ivar[i] = s.ivar
    labels = np.array(
        [[np.nan if v is None else v for v in (s.teff, s.logg, s.feh)] for s in spectra],
        dtype=np.float64,
    ).reshape(n, 3)
    ids = [s.id for s in spectra]
    _check_range(flux, "flux", ids, prefix)
    _check_range(ivar, "ivar", ids, prefix)
    _check_range(labels, "labels", ids, prefix, names=LABELS)
    chosen = req.marginal if "marginal" in req.model_fields_set else (marginal or "none")
    return ParsedRequest(ids, flux, ivar, labels, chosen, req.grid)


def _row_field(prefix: str, r: int, name: str) -> str:
    return f"{prefix}[{r}].{name}" if prefix else name


def _check_range(
    values: np.ndarray,
    name: str,
    ids: Sequence[Any],
    prefix: str,
    names: Sequence[str] | None = None,
) -> None:
    """422 naming the first value outside the float32 range (NaN = missing is allowed)."""
    bad = np.abs(values) > F32_MAX
    if bad.any():
        r, c = (int(i) for i in np.argwhere(bad)[0])
        field = _row_field(prefix, r, names[c] if names else f"{name}[{c}]")
        raise RequestError(
            422, field, f"value outside the float32 range (|x| <= {F32_MAX:.3g}){_id(ids, r)}"
        )


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


# ---------------------------------------------------------------------- binary bodies

_KIND_NAMES = {
    "arrow_stream": "Arrow IPC stream",
    "arrow_file": "Arrow IPC file",
    "parquet": "Parquet file",
}


def parse_arrow(
    body: bytes,
    kind: str,
    n_pix: int,
    *,
    max_spectra: int = DEFAULT_MAX_SPECTRA,
    model_grid: Mapping[str, Any] | None = None,
) -> ParsedRequest:
    """Parse an Arrow IPC (``arrow_stream``/``arrow_file``) or ``parquet`` body.

    The row count is checked before the data are read where the format allows (Parquet:
    the footer, the row groups and every page header of the read columns, see
    :func:`_read_parquet`; IPC batch by batch), and only the columns of ``ARROW_COLUMNS``
    are decoded.
    A body whose schema metadata carries ``mendis_ray`` shard metadata must be on
    ``model_grid``."""
    what = _KIND_NAMES.get(kind, kind)
    buf = pa.py_buffer(body)
    for step in ("schema", "table"):
        try:
            if step == "schema":  # the footer / first message only: the grid comes first
                schema = _read_schema(buf, kind)
            else:
                table = _read_table(buf, kind, max_spectra, n_pix)
        except RequestError:
            raise
        except Exception as err:  # pyarrow raises many types for corrupt input
            # the type only: pyarrow's messages quote column names and metadata
            log.info("unreadable %s body: %s", what, _clip(f"{type(err).__name__}: {err}", 200))
            raise RequestError(
                400, "body", f"not a readable {what} ({type(err).__name__})"
            ) from None
        if step == "schema" and META_KEY in (schema.metadata or {}):
            try:
                meta = schema_metadata(schema, "body")
            except ShardError:
                raise RequestError(422, "metadata", "invalid mendis_ray shard metadata") from None
            if model_grid is not None and isinstance(meta.get("grid"), dict):
                check_grid(model_grid, meta["grid"], "metadata.grid")
    return table_request(table, n_pix, max_spectra=max_spectra)


def _read_schema(buf: pa.Buffer, kind: str) -> pa.Schema:
    """The schema (with metadata) of a binary body, reading no data pages."""
    if kind == "parquet":
        return pq.read_schema(pa.BufferReader(buf))
    opener = pa.ipc.open_stream if kind == "arrow_stream" else pa.ipc.open_file
    return opener(buf).schema


def decoded_limit(max_spectra: int, n_pix: int) -> int:
    """Decompressed page bytes a Parquet body may hold: float64 flux and ivar of
    ``max_spectra`` spectra, ids and labels, plus 4 MiB."""
    return max_spectra * (16 * n_pix + 4096) + (4 << 20)


def _read_parquet(buf: pa.Buffer, max_spectra: int, n_pix: int) -> pa.Table:
    """The wanted columns of a Parquet body, bounded before anything is decoded: the
    footer's row count must equal its row groups' (:func:`parquet_bounds`), the pages'
    own value counts must fit that many rows of at most ``n_pix`` values, and their
    decompressed size :func:`decoded_limit`; then the row groups are read in batches,
    counting rows as they come."""
    limit = decoded_limit(max_spectra, n_pix)
    try:
        bounds = parquet_bounds(
            memoryview(buf), ARROW_COLUMNS, max_rows=max_spectra, max_decoded_bytes=limit
        )
    except ValueError as err:  # our own messages, no input in them
        raise RequestError(400, "body", f"not a readable Parquet file ({err})") from None
    _check_rows(bounds.num_rows, max_spectra)
    if bounds.decoded_bytes > limit:
        raise RequestError(413, "body", f"the Parquet pages decompress to more than {limit} bytes")
    per_row = {"flux": n_pix, "ivar": n_pix}
    for col, n_values in bounds.values.items():
        if n_values > bounds.num_rows * max(per_row.get(col, 1), 1):
            raise RequestError(
                422,
                col,
                f"the pages hold more values than {bounds.num_rows} row(s) of at most "
                f"{per_row.get(col, 1)} (the footer's row count, the model's pixels)",
            )
    pf = pq.ParquetFile(pa.BufferReader(buf))
    schema = pf.schema_arrow
    cols = [c for c in ARROW_COLUMNS if c in schema.names]
    batches: list[pa.RecordBatch] = []
    rows = 0
    for batch in pf.iter_batches(batch_size=1024, columns=cols, use_threads=False):
        rows += batch.num_rows
        _check_rows(rows, max_spectra)
        batches.append(batch)
    if rows != bounds.num_rows:
        raise RequestError(400, "body", "the Parquet pages do not hold the footer's row count")
    return pa.Table.from_batches(batches, schema=pa.schema([schema.field(c) for c in cols]))


def _read_table(buf: pa.Buffer, kind: str, max_spectra: int, n_pix: int) -> pa.Table:
    """The table of the wanted columns of a binary body."""
    if kind == "parquet":
        return _read_parquet(buf, max_spectra, n_pix)
    _check_ipc(buf, kind, max_spectra, n_pix)
    opener = pa.ipc.open_stream if kind == "arrow_stream" else pa.ipc.open_file
    schema = opener(buf).schema
    wanted = [i for i, f in enumerate(schema) if f.name in ARROW_COLUMNS]
    reader = opener(buf, options=pa.ipc.IpcReadOptions(included_fields=wanted))
    batches: list[pa.RecordBatch] = []
    rows = 0
    if kind == "arrow_stream":
        batch_iter = iter(reader)
    else:
        batch_iter = (reader.get_batch(i) for i in range(reader.num_record_batches))
    for batch in batch_iter:
        rows += batch.num_rows
        _check_rows(rows, max_spectra)
        batches.append(batch)
    return pa.Table.from_batches(batches, schema=reader.schema)


def _ipc_messages(buf: pa.Buffer, kind: str):
    """The (metadata, body) of every message of an IPC body, undecoded: the stream's
    messages in order, or the file footer's dictionary and record-batch blocks."""
    if kind == "arrow_stream":
        reader = pa.ipc.MessageReader.open_stream(pa.BufferReader(buf))
        while True:
            try:
                msg = reader.read_next_message()
            except StopIteration:
                return
            yield msg.metadata, msg.body
    data = memoryview(buf)
    n = len(data)
    if n < 18 or bytes(data[:6]) != b"ARROW1" or bytes(data[-6:]) != b"ARROW1":
        raise ValueError("not an Arrow IPC file")
    flen = int.from_bytes(data[n - 10 : n - 6], "little")
    if not 0 < flen <= n - 18:
        raise ValueError("IPC footer length out of range")
    fb = Flatbuffer(bytes(data[n - 10 - flen : n - 10]))
    footer = fb.root()
    for field in (2, 3):  # dictionaries, recordBatches: Block {offset, metaDataLength, body}
        for offset, meta_len, body_len in fb.struct_vector(footer, field, 3):
            size = (meta_len & 0xFFFFFFFF) + body_len
            if offset < 8 or body_len < 0 or offset + size > n:
                raise ValueError("an IPC block outside the file")
            msg = pa.ipc.read_message(buf.slice(offset, size))
            yield msg.metadata, msg.body


def _check_ipc(buf: pa.Buffer, kind: str, max_spectra: int, n_pix: int) -> None:
    """Rows and decompressed bytes of an IPC body from its message metadata, before any
    batch is decoded (a compressed batch is decompressed whole): 422 over
    ``max_spectra`` rows, 413 over :func:`decoded_limit`."""
    limit = decoded_limit(max_spectra, n_pix)
    rows = decoded = 0
    for metadata, body in _ipc_messages(buf, kind):
        r, d = ipc_message_bounds(metadata, body)
        rows, decoded = rows + r, decoded + d
        _check_rows(rows, max_spectra)
        if decoded > limit:
            raise RequestError(413, "body", f"the Arrow batches decode to more than {limit} bytes")


def _check_rows(n: int, max_spectra: int) -> None:
    if n > max_spectra:
        raise RequestError(
            422, "spectra", f"more than {max_spectra} spectra in one request (max_spectra)"
        )


def table_request(table: pa.Table, n_pix: int, *, max_spectra: int) -> ParsedRequest:
    """Arrays of a table with shard columns (``flux`` required); 422 naming the column
    and row of the first problem."""
    n = table.num_rows
    if n == 0:
        raise RequestError(422, "spectra", "the body holds no rows")
    _check_rows(n, max_spectra)
    names = table.column_names
    if "flux" not in names:
        raise RequestError(422, "flux", "missing column 'flux'")
    ids = _ids(table) if "id" in names else [None] * n
    flux = _matrix(table.column("flux"), n_pix, "flux", ids, nullable=False)
    ivar = (
        _matrix(table.column("ivar"), n_pix, "ivar", ids, nullable=True)
        if "ivar" in names
        else np.ones((n, n_pix))
    )
    labels = np.full((n, 3), np.nan)
    for j, name in enumerate(LABELS):
        if name in names:
            labels[:, j] = _vector(table.column(name), name, ids)
    return ParsedRequest(ids, flux, ivar, labels)


def _ids(table: pa.Table) -> list[Any]:
    col = table.column("id")
    t = col.type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)):
        raise RequestError(422, "id", f"column must hold strings or integers, found {_kind(t)}")
    ids = [None if v is None else str(v) for v in col.to_pylist()]
    for r, v in enumerate(ids):
        if v is not None and len(v) > MAX_ID_LENGTH:
            raise RequestError(422, f"id[{r}]", f"longer than {MAX_ID_LENGTH} characters")
    return ids


def _matrix(
    col: pa.ChunkedArray, n_pix: int, name: str, ids: Sequence[Any], *, nullable: bool
) -> np.ndarray:
    """(n, n_pix) float64 from a list column; null rows are 1 (``nullable``, i.e. ivar
    not given for that spectrum) or an error."""
    arr = col.combine_chunks()
    t = arr.type
    if not (pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t)):
        raise RequestError(422, name, f"expected a list of numbers per row, found {_kind(t)}")
    vt = t.value_type
    if not (pa.types.is_floating(vt) or pa.types.is_integer(vt)):
        raise RequestError(422, name, f"expected numbers in the lists, found {_kind(vt)}")
    n = len(arr)
    null = arr.is_null().to_numpy(zero_copy_only=False)
    if null.any() and not nullable:
        r = int(np.flatnonzero(null)[0])
        raise RequestError(422, f"{name}[{r}]", f"row is null{_id(ids, r)}")
    if pa.types.is_fixed_size_list(t):
        if t.list_size != n_pix:
            raise RequestError(
                422, name, f"rows have {t.list_size} values, the model's grid has {n_pix} pixels"
            )
    else:
        lengths = arr.value_lengths().fill_null(n_pix).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(lengths != n_pix)
        if bad.size:
            r = int(bad[0])
            raise RequestError(
                422,
                f"{name}[{r}]",
                f"{lengths[r]} values, the model's grid has {n_pix} pixels{_id(ids, r)}",
            )
    keep = ~null
    sub = arr.filter(pa.array(keep)) if null.any() else arr
    values = _to_float64(sub.flatten(), name).to_numpy(zero_copy_only=False)
    out = np.ones((n, n_pix))
    out[keep] = values.reshape(-1, n_pix)
    bad = ~np.isfinite(out) | (np.abs(out) > F32_MAX)
    if name == "ivar":
        bad |= out < 0
    if bad.any():
        r, p = (int(i) for i in np.argwhere(bad)[0])
        what = "null, non-finite, negative or beyond float32" if name == "ivar" else (
            "null, non-finite or beyond float32"
        )  # fmt: skip
        raise RequestError(
            422,
            f"{name}[{r}][{p}]",
            f"{what} value{_id(ids, r)}; {int(bad.any(axis=1).sum())} bad row(s) in all",
        )
    return out


def _kind(t: pa.DataType) -> str:
    """A coarse name of an Arrow type (its str() quotes client-chosen field names)."""
    for test, name in (
        (pa.types.is_floating, "floats"), (pa.types.is_integer, "integers"),
        (pa.types.is_string, "strings"), (pa.types.is_large_string, "strings"),
        (pa.types.is_binary, "binary"), (pa.types.is_boolean, "booleans"),
        (pa.types.is_struct, "structs"), (pa.types.is_list, "lists"),
        (pa.types.is_large_list, "lists"), (pa.types.is_fixed_size_list, "lists"),
        (pa.types.is_null, "nulls"), (pa.types.is_dictionary, "dictionary"),
    ):  # fmt: skip
        if test(t):
            return name
    return "another type"


def _to_float64(arr: pa.Array | pa.ChunkedArray, name: str) -> pa.Array | pa.ChunkedArray:
    """``arr`` as float64.  Integers beyond 2^53 (e.g. uint64 2^64-1) are rounded, not
    refused: they are far outside any flux range and get scored and flagged."""
    try:
        return arr.cast(pa.float64(), safe=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        raise RequestError(422, name, "values not convertible to float64") from None


def _vector(col: pa.ChunkedArray, name: str, ids: Sequence[Any]) -> np.ndarray:
    """(n,) float64 label column; null and NaN mean not given."""
    t = col.type
    if not (pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_null(t)):
        raise RequestError(422, name, f"expected a numeric column, found {_kind(t)}")
    v = _to_float64(col, name).to_numpy(zero_copy_only=False).astype(np.float64)
    bad = np.isinf(v) | (np.abs(np.nan_to_num(v)) > F32_MAX)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise RequestError(422, f"{name}[{r}]", f"infinite or beyond float32{_id(ids, r)}")
    return v


# ---------------------------------------------------------------------- responses


def results_to_json(
    scores: Mapping[str, np.ndarray],
    ids: Sequence[Any] | None = None,
    labelled: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """One JSON-able dict per spectrum (see :class:`ScoreResult`) from the output of
    :meth:`mendis_ray.science.ood.Scorer.score` or
    :meth:`mendis_ray.science.signal_scores.SignalScorer.score` (a dict of (n,) arrays,
    ``labels_used`` (n, 3)); ``labelled`` (n,) bool says which spectra came with all three
    labels.  NaN and infinities become None (JSON null), and so does every column of
    :data:`SCORE_FIELDS` that ``scores`` lacks."""
    n = len(scores["flags"])
    ids = list(ids) if ids is not None else [None] * n
    cols = {k: _nullable(scores[k]) if k in scores else [None] * n for k in SCORE_FIELDS}
    used = [_nullable(np.asarray(scores["labels_used"])[:, j]) for j in range(3)]
    flags = np.asarray(scores["flags"]).astype(np.int64).tolist()
    if labelled is None:  # log_p is NaN exactly where labels were not given (or bad)
        labelled = ~np.isnan(np.asarray(scores["log_p"], dtype=np.float64))
    labelled = np.asarray(labelled, dtype=bool).tolist()
    out = []
    for i in range(n):
        row: dict[str, Any] = {"index": i, "id": ids[i], "labelled": labelled[i]}
        for k in SCORE_FIELDS:
            row[k] = cols[k][i]
        row["labels_used"] = {name: used[j][i] for j, name in enumerate(LABELS)}
        row["flags"] = flag_list(flags[i])
        row["flag_bits"] = flags[i]
        out.append(row)
    return out


def _nullable(values: np.ndarray) -> list[float | None]:
    v = np.asarray(values, dtype=np.float64)
    return [x if np.isfinite(x) else None for x in v.tolist()]


def dumps(payload: Any) -> bytes:
    """Compact JSON bytes (strict: NaN must already be None)."""
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
