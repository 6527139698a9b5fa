"""The Ray Serve scoring application: ``POST /score`` over HTTP for a trained checkpoint.

One deployment, :class:`MendisScorer`, with a FastAPI ingress.  Each replica loads the
checkpoint once, whichever model it holds (:class:`mendis_ray.predictor.Predictor`: the
full-space flow's :class:`~mendis_ray.science.ood.Scorer` or the signal-space model's
:class:`~mendis_ray.science.signal_scores.SignalScorer`), sets its torch thread count
from its CPUs (Ray sets ``OMP_NUM_THREADS=1`` in workers) and scores through one
``@serve.batch`` queue whose size is counted in *spectra*: concurrent requests of one
spectrum are fanned in to one batch, and large requests are cut into batch-sized pieces,
so the flow sees batches of up to ``batch_size`` spectra.  The model runs in a worker
thread, so the replica keeps reading and validating the next requests meanwhile, and the
batches formed during a model call are merged into the next call
(:class:`~mendis_ray.distributed.model_queue.ModelQueue`).  The arguments are
:class:`~mendis_ray.distributed.serve_args.ServeArgs`.

Endpoints:

- ``POST /score``: JSON (one or many spectra) or a bulk table (Arrow IPC stream/file,
  Parquet), see :mod:`mendis_ray.scoring_api`; query ``marginal`` (``unlabelled``: the
  label-free score, for a full-space flow slow and at most ``max_marginal`` spectra per
  request; ``none``: flags only for unlabelled spectra; default the server's ``marginal``
  argument, whose default is :class:`~mendis_ray.config.ScoreConfig`'s ``unlabelled``)
  and ``grid`` (hash or name the model must have).  Returns one result per spectrum with
  the scores of the served model kind (null where it has none): a flow checkpoint gives
  log p, the normalised score ``log_p_per_dim``, percentile, signal score, likelihood
  ratio to the Gaussian; a signal-space checkpoint the triage ``score`` and its
  percentile, signal and residual scores and percentiles, log p, chi^2/dof and noise
  level (unlabelled spectra always scored label-free); flags by name for both.
- ``GET /healthz``; ``GET /model`` (model kind, grid, preset or signal config, parameter
  count, training metrics, limits); OpenAPI docs at ``/docs``.
- ``GET /triage`` and ``POST /triage/verdicts`` when started with ``triage`` (a scored
  catalog folder, ``mendis serve CHECKPOINT --triage DIR``): the triage page
  (:mod:`mendis_ray.triage.page`, with the verdicts saved so far), and one verdict
  (JSON ``{"id", "verdict", "note"}``, at most 16 KiB, ``application/json`` only, the id
  one of the page's) written atomically to ``DIR/verdicts.parquet`` under a lock
  (:func:`mendis_ray.triage.verdicts.post_verdict`); 404 without ``triage``.

Bad input is a 4xx with ``{"error": "FIELD: short message", "field": FIELD}`` and never
echoes the input: 400 unreadable body, 413 over ``max_request_bytes`` (Content-Length and
the bytes actually read are both checked), 415 unknown content type, 422 invalid values.
Bodies are parsed in a thread pool (never on the event loop) and bounded before decoding
(:mod:`mendis_ray.parquet_guard`).  A valid-looking spectrum the model cannot score (e.g.
flux of 3e38, all pixels masked) is scored, flagged ``unscorable`` and ranked most
outlying; a model call that fails anyway is retried in parts (``ModelQueue``), so
one bad spectrum never fails the other requests merged into its batch.

Use::

    app = build_app({"checkpoint": "mendis_out/compact/checkpoint", "num_cpus": 2})
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(app, name="mendis", route_prefix="/")

or ``mendis serve CHECKPOINT`` (:func:`main_serve`), or ``serve deploy`` with
``serve/config.yaml`` (import path ``serve.app:build_app``).

(No ``from __future__ import annotations`` here: FastAPI resolves the route signatures of
the class-based view from real annotations in the replica.)
"""

import argparse
import asyncio
import functools
import itertools
import logging
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.deployment import Application

from mendis_ray import __version__
from mendis_ray.distributed.model_queue import (
    MAX_PENDING_BATCHES,
    BatchWarningFilter,
    Item,
    ModelQueue,
    n_spectra,
)
from mendis_ray.distributed.serve_args import ServeArgs, validate_args
from mendis_ray.predictor import Predictor, flow_unscorable
from mendis_ray.scoring_api import (
    BODY_KINDS,
    ErrorResponse,
    ParsedRequest,
    RequestError,
    ScoreResponse,
    body_kind,
    dumps,
    format_validation_errors,
    openapi_request_body,
    parse_body,
    results_to_json,
)

__all__ = [
    "MendisScorer",
    "ServeArgs",
    "bind_replica_grpc_to_loopback",
    "build_app",
    "main_serve",
    "validate_args",
]

log = logging.getLogger(__name__)

# the model queue's names as they were here (tests and benchmarks import them)
_Item, _ModelQueue, _n_spectra = Item, ModelQueue, n_spectra
#: Scores of ``n`` full-space-flow rows that could not be scored (``Predictor.unscorable``
#: gives those of the served model kind).
_unscorable = flow_unscorable


# ---------------------------------------------------------------------- FastAPI app

app = FastAPI(
    title="mendis_ray scoring",
    version=__version__,
    description="Outlier scores of stellar spectra from a signal-space model or a full-space "
    "normalizing flow (higher = more typical). POST spectra to /score as JSON or as an "
    "Arrow/Parquet table; GET /model for the model kind, grid and limits.",
)

_ERRORS = {
    400: {"model": ErrorResponse, "description": "unreadable body (invalid JSON, Arrow...)"},
    413: {"model": ErrorResponse, "description": "body larger than max_request_bytes"},
    415: {"model": ErrorResponse, "description": "unsupported Content-Type"},
    422: {"model": ErrorResponse, "description": "invalid values; names the field"},
}


@app.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.to_dict(), status_code=exc.status)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = format_validation_errors(exc.errors())  # no input echo
    return JSONResponse(err.to_dict(), status_code=err.status)


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error on %s %s", request.method, request.url.path)
    return JSONResponse(
        {"error": "internal error (see the replica log)", "field": ""}, status_code=500
    )


def bind_replica_grpc_to_loopback() -> bool:
    """In a replica of a cluster whose node IP is 127.0.0.1 (the embedded cluster of
    :func:`mendis_ray.distributed.session.ensure_ray`), bind Serve's inter-deployment
    gRPC server to 127.0.0.1 instead of every interface.

    Ray Serve 2.60 binds it to ``[::]:0`` unconditionally (``replica.py``), after the
    deployment's constructor has run, through ``add_port_to_grpc_server``; this wraps
    that function in this replica process.  Returns whether it did; a Ray without that
    hook is left alone (with a warning), and the listening-socket test then fails."""
    import ray
    from ray.serve._private import replica as replica_mod

    if ray.util.get_node_ip_address() != "127.0.0.1":
        return False
    add = getattr(replica_mod, "add_port_to_grpc_server", None)
    if add is None:
        log.warning("cannot bind the replica's gRPC server to 127.0.0.1 (Ray internals changed)")
        return False
    if getattr(add, "_mendis_loopback", False):
        return True

    def add_loopback(server: Any, address: str) -> int:
        if address.startswith("[::]:") or address.startswith("0.0.0.0:"):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return add(server, address)

    add_loopback._mendis_loopback = True  # type: ignore[attr-defined]
    replica_mod.add_port_to_grpc_server = add_loopback
    return True


#: Headers of the triage page: nothing from elsewhere, not framed, not sniffed.
_PAGE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def _triage_ids(folder: str | None) -> frozenset[str]:
    """The spectrum ids a verdict may name: those on the triage page of ``folder``."""
    if not folder:
        return frozenset()
    import pyarrow.parquet as pq

    from mendis_ray.triage.page import SPECTRA_FILE

    ids = pq.read_table(Path(folder) / SPECTRA_FILE, columns=["id"]).column("id")
    return frozenset(str(i) for i in ids.to_pylist())


@serve.deployment(name="MendisScorer")
@serve.ingress(app)
class MendisScorer:
    """A replica: the checkpoint's scorer (either model kind, through
    :class:`~mendis_ray.predictor.Predictor`) behind HTTP."""

    def __init__(self, args: dict) -> None:
        import torch

        s = ServeArgs.model_validate(args)
        self.args = s
        bind_replica_grpc_to_loopback()
        self.threads = s.threads
        torch.set_num_threads(self.threads)
        t0 = time.perf_counter()
        self.predictor = Predictor.load(
            s.checkpoint, device=s.resolved_device, scorer_kwargs=s.score_config().scorer_kwargs()
        )
        self.scorer = self.predictor.scorer
        self.n_pix = self.predictor.n_pix
        self.grid = self.predictor.grid
        # label-free spectra per request: bounded where they cost an optimisation each
        # (a full-space flow); a signal-space model scores them at a labelled score's cost
        self.max_marginal = s.max_marginal if self.predictor.kind == "flow" else s.max_spectra
        self.model_info = {
            "grid": self.grid,
            **self.predictor.info,
            "device": self.predictor.device,
            "torch_threads": self.threads,
            "limits": {
                "batch_size": s.batch_size,
                "max_request_bytes": s.max_request_bytes,
                "max_spectra": s.max_spectra,
                "max_marginal": self.max_marginal,
                "marginal": s.marginal,
            },
            "content_types": list(BODY_KINDS),
            "version": __version__,
        }
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a replica (not expected)
            replica = str(os.getpid())
        self.stats: dict[str, Any] = {
            "replica": replica, "requests": 0, "spectra": 0, "batches": 0,
            "read_s": 0.0, "parse_s": 0.0, "model_s": 0.0, "respond_s": 0.0,
        }  # fmt: skip
        # One model thread (torch releases the GIL), with the replica's thread count.
        self.pool = ThreadPoolExecutor(1, "mendis-score", torch.set_num_threads, (self.threads,))
        self.model_queue = ModelQueue(
            self.pool, self._score_items, s.batch_size, self.predictor.unscorable
        )
        # Parsing (JSON validation, Arrow/Parquet decoding) runs off the event loop, so a
        # large body never stalls other requests or /healthz.
        self.parse_pool = ThreadPoolExecutor(2, "mendis-parse")
        self.triage_ids = _triage_ids(s.triage)
        logging.getLogger("ray.serve").addFilter(BatchWarningFilter())
        self._score_batch.set_max_batch_size(s.batch_size)
        self._score_batch.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        # Warm up (first calls build caches) on the training mean.
        self.pool.submit(self.predictor.warm_up).result()
        log.info(
            "replica ready: %s (%s model, %d px, %d parameters) on %s, %d torch threads, "
            "in %.1f s", s.checkpoint, self.predictor.kind, self.n_pix,
            self.model_info["n_parameters"], self.predictor.device, self.threads,
            time.perf_counter() - t0,
        )  # fmt: skip

    # ------------------------------------------------------------------ endpoints

    @app.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness: 200 once the replica has loaded its model."""
        return {"status": "ok"}

    @app.get("/model")
    async def model(self) -> dict:
        """The served model: ``model_kind`` (``flow`` or ``signal``), grid (name, n_pix,
        hash), preset (flow) or signal config and k (signal), parameter count, training
        metrics, the request limits, and this replica's counters: requests scored,
        spectra, model batches (fewer batches than requests means fan-in), and seconds
        spent reading bodies, parsing them, in the model, and writing responses."""
        return {**self.model_info, "stats": dict(self.stats)}

    @app.get("/", include_in_schema=False)
    async def root(self) -> dict:
        return {"score": "POST /score", "model": "/model", "health": "/healthz", "docs": "/docs"}

    @app.get("/triage", include_in_schema=False)
    async def triage_page(self) -> HTMLResponse:
        """The triage page of the scored catalog (``triage`` arg), verdicts as saved now."""
        from mendis_ray.triage.page import load_triage, render_page

        folder = self._triage_folder()
        html = await asyncio.get_running_loop().run_in_executor(
            self.parse_pool, lambda: render_page(load_triage(folder), api="triage/verdicts")
        )
        return HTMLResponse(html, headers=_PAGE_HEADERS)

    @app.post("/triage/verdicts", include_in_schema=False)
    async def triage_verdict(self, request: Request) -> JSONResponse:
        """Save one verdict (see :func:`mendis_ray.triage.verdicts.post_verdict`):
        written atomically to ``verdicts.parquet`` in the scored folder."""
        from mendis_ray.triage.verdicts import MAX_POST_BYTES, post_verdict

        folder = self._triage_folder()
        body = await self._read_body(request, limit=MAX_POST_BYTES)
        status, payload = await asyncio.get_running_loop().run_in_executor(
            self.parse_pool, post_verdict, folder, body,
            request.headers.get("content-type"), self.triage_ids,
        )  # fmt: skip
        return JSONResponse(payload, status_code=status)

    @app.post(
        "/score",
        response_model=ScoreResponse,
        responses=_ERRORS,
        openapi_extra={"requestBody": openapi_request_body()},
    )
    async def score(
        self,
        request: Request,
        marginal: Literal["none", "unlabelled"] | None = Query(
            None,
            description="'unlabelled': label-free score of the unlabelled spectra "
            "(full-space flow: an optimisation per spectrum, ~100-1000x slower; at most "
            "max_marginal per request); 'none': flags only for them. Default: the server's "
            "'marginal' (GET /model limits; 'unlabelled' unless configured). A JSON body's "
            "own 'marginal' wins.",
        ),
        grid: str | None = Query(
            None, max_length=64, description="grid hash or name the model must have"
        ),
    ) -> Response:
        """Score spectra: one result per spectrum, in order (see ScoreResponse)."""
        t0 = time.perf_counter()
        kind = body_kind(request.headers.get("content-type"))
        body = await self._read_body(request)
        t1 = time.perf_counter()
        parsed = await asyncio.get_running_loop().run_in_executor(
            self.parse_pool,
            functools.partial(
                parse_body,
                body,
                kind,
                n_pix=self.n_pix,
                model_grid=self.grid,
                max_spectra=self.args.max_spectra,
                max_marginal=self.max_marginal,
                marginal=marginal or self.args.marginal,
                grid=grid,
            ),
        )
        del body
        t2 = time.perf_counter()
        scores = await self._score(parsed)
        t3 = time.perf_counter()
        payload = {
            "n": len(parsed),
            "grid": self.grid.get("hash"),
            "model_kind": self.predictor.kind,
            "marginal": parsed.marginal,
            "results": results_to_json(scores, parsed.ids, parsed.labelled),
        }
        response = Response(dumps(payload), media_type="application/json")
        st = self.stats
        st["requests"] += 1
        st["read_s"] += t1 - t0
        st["parse_s"] += t2 - t1
        st["respond_s"] += time.perf_counter() - t3
        return response

    # ------------------------------------------------------------------ internals

    def _triage_folder(self) -> str:
        if not self.args.triage:
            raise RequestError(404, "triage", "no scored catalog here (serve it with --triage DIR)")
        return self.args.triage

    async def _read_body(self, request: Request, limit: int | None = None) -> bytes:
        """The body, refusing (413) one whose Content-Length or actual size is over
        ``limit`` (default ``max_request_bytes``) without reading more than that."""
        limit = limit or self.args.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise RequestError(400, "Content-Length", "not an integer") from None
            if size > limit:
                raise RequestError(
                    413,
                    "body",
                    f"{size} bytes exceed the limit of {limit} bytes (max_request_bytes)",
                )
        chunks: list[bytes] = []
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise RequestError(
                    413, "body", f"more than the limit of {limit} bytes (max_request_bytes)"
                )
            chunks.append(chunk)
        if total == 0:
            raise RequestError(400, "body", "empty body")
        return b"".join(chunks)

    async def _score(self, req: ParsedRequest) -> dict[str, np.ndarray]:
        """Scores of a parsed request through the batch queue, in pieces of at most
        ``batch_size`` spectra (all enqueued at once, so they are scored back to back)."""
        step = self.args.batch_size
        want = req.marginal == "unlabelled"
        pieces = [
            Item(req.flux[a : a + step], req.ivar[a : a + step], req.labels[a : a + step], want)
            for a in range(0, len(req), step)
        ]
        outs = await asyncio.gather(*(self._score_batch(p) for p in pieces))
        if len(outs) == 1:
            return outs[0]
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

    @serve.batch(
        max_batch_size=64,
        batch_wait_timeout_s=0.01,
        max_concurrent_batches=MAX_PENDING_BATCHES,
        batch_size_fn=n_spectra,
    )
    async def _score_batch(self, items: list[Item]) -> list[dict[str, np.ndarray]]:
        """Fan-in: the items of concurrent requests, grouped by ``@serve.batch``, go to
        the model queue, which merges the groups that wait while the model is busy."""
        return await self.model_queue.submit(items)

    def _score_items(self, items: list[Item]) -> list[dict[str, np.ndarray]]:
        flux = np.concatenate([i.flux for i in items])
        ivar = np.concatenate([i.ivar for i in items])
        labels = np.concatenate([i.labels for i in items])
        want = np.concatenate([np.full(len(i), i.marginal) for i in items])
        t0 = time.perf_counter()
        out = self.predictor.score(flux, ivar, labels, want, batch_size=self.args.batch_size)
        self.stats["batches"] += 1
        self.stats["spectra"] += len(flux)
        self.stats["model_s"] += time.perf_counter() - t0
        bounds = np.cumsum([0, *(len(i) for i in items)])
        return [{k: v[a:b] for k, v in out.items()} for a, b in itertools.pairwise(bounds)]


# ---------------------------------------------------------------------- application


def build_app(args: Mapping[str, Any]) -> Application:
    """The Serve application for ``args`` (see :class:`ServeArgs`; ``checkpoint`` is
    required).  Autoscaling between ``min_replicas`` and ``max_replicas`` (target
    ``target_ongoing_requests`` per replica) unless ``num_replicas`` fixes the count.
    Raises ValueError naming every bad argument."""
    s = validate_args(args)
    options: dict[str, Any] = {
        "max_ongoing_requests": s.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
    }
    if s.num_replicas is not None:
        # autoscaling_config silently wins over num_replicas: clear it explicitly
        options.update(num_replicas=s.num_replicas, autoscaling_config=None)
    else:
        options["autoscaling_config"] = {
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
        }
    log.info("Serve app for %s: %s", s.checkpoint, options)
    return MendisScorer.options(**options).bind(s.model_dump())


def main_serve(args: argparse.Namespace) -> int:
    """``mendis serve`` (:func:`mendis_ray.distributed.serve_local.main_serve`; kept at
    its old path)."""
    from mendis_ray.distributed.serve_local import main_serve as run

    return run(args)
