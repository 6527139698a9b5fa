"""The scoring endpoint's request schema, body parsers and response rows (no Ray here).

:mod:`mendis_ray.distributed.serving` wraps these in a Ray Serve application; everything
that can be checked without a server lives here and is unit-tested on its own.  This
module holds the JSON schema, :func:`parse_body` (the entry point) with the JSON parser,
and the responses; the binary-body parser is :mod:`mendis_ray.scoring_tables`, the
common ground (errors, limits, :class:`ParsedRequest`, grid check)
:mod:`mendis_ray.scoring_request`; every public name is importable from here.

Request forms (``POST /score``), chosen by the ``Content-Type`` header:

``application/json``
    ``{"spectra": [SPECTRUM, ...], "marginal": "unlabelled", "grid": "HASH-or-NAME"}`` or one
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
    Labelled spectra always get their exact log p(flux, labels).  ``"unlabelled"`` (the
    default, :data:`DEFAULT_MARGINAL`: :class:`~mendis_ray.config.ScoreConfig`'s, as for
    ``mendis score``; a server may set another with its ``marginal`` argument):
    unlabelled spectra also get the label-free score log p(flux) (Laplace approximation
    around the best labels, :class:`mendis_ray.science.ood.Scorer`).  For a full-space
    flow that costs an optimisation per spectrum (up to 200 Adam steps of the flow: about
    100-1000x the cost of a labelled score), so a request may hold at most
    ``max_marginal`` unlabelled spectra with it; more get a 422 naming ``marginal``.
    ``"none"``: unlabelled spectra get only flags and ``masked_fraction`` (their scores
    are null).  A signal-space checkpoint scores unlabelled spectra label-free in every
    case (the labels are integrated out by importance sampling, about the cost of a
    labelled score), so ``marginal`` changes nothing there and the server does not bound
    it (``max_marginal`` is then ``max_spectra``).

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
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

from mendis_ray.science.flags import flag_list
from mendis_ray.scoring_request import (
    ARROW_COLUMNS,
    ARROW_FILE,
    ARROW_STREAM,
    BODY_KINDS,
    DEFAULT_MARGINAL,
    DEFAULT_MAX_MARGINAL,
    DEFAULT_MAX_SPECTRA,
    F32_MAX,
    JSON,
    LABELS,
    MAX_ID_LENGTH,
    PARQUET,
    ParsedRequest,
    RequestError,
    _id,
    body_kind,
    check_grid,
    format_validation_errors,
)
from mendis_ray.scoring_tables import decoded_limit, parse_arrow, table_request

__all__ = [
    "ARROW_COLUMNS",
    "ARROW_FILE",
    "ARROW_STREAM",
    "BODY_KINDS",
    "DEFAULT_MARGINAL",
    "DEFAULT_MAX_MARGINAL",
    "DEFAULT_MAX_SPECTRA",
    "F32_MAX",
    "JSON",
    "LABELS",
    "PARQUET",
    "ErrorResponse",
    "ParsedRequest",
    "RequestError",
    "RequestModels",
    "ScoreResponse",
    "ScoreResult",
    "body_kind",
    "check_grid",
    "decoded_limit",
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

MAX_PIX = 100_000  # longest flux list the generic (model-independent) schema admits

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
            DEFAULT_MARGINAL,
            description="'unlabelled': label-free score of unlabelled spectra (slow for a "
            "full-space flow); 'none': flags only for them; default: the server's",
        )
        grid: GridName | None = Field(None, description="grid hash or name; must be the model's")

    class SingleScoreRequest(Spectrum):
        """One spectrum, at the top level of the body."""

        model_config = ConfigDict(extra="forbid", title="SingleScoreRequest")
        marginal: Marginal = DEFAULT_MARGINAL
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
        description="flow: % of held-out training spectra whose log p is <= this one's; "
        "signal model: 100 x exp(score), the calibrated % of inliers at the same noise "
        "level that score as low or lower"
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
    strongest_test: str | None = Field(
        None, description="signal model: the test with the smallest tail, the one behind "
        "score (signal:flow, signal:structure:<label>,ic<j>, signal:compression, residual:chi2, "
        "residual:scan<pixels>, residual:elem.<element>, unscorable); flow: null"
    )  # fmt: skip
    labels_used: dict[str, float | None] = Field(description="given labels, or the best-fit")
    flags: list[str] = Field(
        description="nonfinite, masked, flux_range, label_range, noise_range (noisier than "
        "the calibrated range, about the checkpoint's min_snr: signal score extrapolated), "
        "unscorable (the model could not score it: scores null, percentile 0)"
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


# ---------------------------------------------------------------------- parsed request


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
        req.marginal = marginal or DEFAULT_MARGINAL
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
    chosen = req.marginal if "marginal" in req.model_fields_set else (marginal or DEFAULT_MARGINAL)
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
    tests = [str(t) for t in scores.get("strongest_test", [None] * n)]
    flags = np.asarray(scores["flags"]).astype(np.int64).tolist()
    if labelled is None:  # log_p is NaN exactly where labels were not given (or bad)
        labelled = ~np.isnan(np.asarray(scores["log_p"], dtype=np.float64))
    labelled = np.asarray(labelled, dtype=bool).tolist()
    out = []
    for i in range(n):
        row: dict[str, Any] = {"index": i, "id": ids[i], "labelled": labelled[i]}
        for k in SCORE_FIELDS:
            row[k] = cols[k][i]
        row["strongest_test"] = tests[i]
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
