"""The model queue of a Serve replica: fan-in of concurrent requests into model batches,
with failures isolated per request and per row (no Ray here; the replica is
:class:`mendis_ray.distributed.serving.MendisScorer`).

``@serve.batch`` groups the pieces (:class:`Item`) of concurrent requests, counted in
spectra (:func:`n_spectra`); :class:`ModelQueue` runs the model on them one call at a
time in a worker thread and merges the groups that arrive meanwhile; a model call that
raises is retried in halves down to single rows, and a row that still fails gets the
served model kind's ``unscorable`` scores.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from mendis_ray.predictor import flow_unscorable

__all__ = ["MAX_PENDING_BATCHES", "BatchWarningFilter", "Item", "ModelQueue", "n_spectra"]

log = logging.getLogger("mendis_ray.distributed.serving")


@dataclass
class Item:
    """One piece of a request in the batch queue: (k, n_pix) flux/ivar, (k, 3) labels."""

    flux: np.ndarray
    ivar: np.ndarray
    labels: np.ndarray
    marginal: bool

    def __len__(self) -> int:
        return len(self.flux)

    def rows(self, sl: slice) -> Item:
        return Item(self.flux[sl], self.ivar[sl], self.labels[sl], self.marginal)


def n_spectra(items: list[Item]) -> int:
    return sum(len(i) for i in items)


#: Batches ``@serve.batch`` may hand over while the model is busy (they wait, and are
#: merged, in the :class:`ModelQueue`).
MAX_PENDING_BATCHES = 256


class BatchWarningFilter(logging.Filter):
    """Drops Serve's warning that ``max_batch_size * max_concurrent_batches`` exceeds
    ``max_ongoing_requests``: it counts batch sizes in requests, ours are in spectra
    (``batch_size_fn``), and the many concurrent batches only wait in the model queue."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "max_concurrent_batches" not in record.getMessage()


class ModelQueue:
    """Runs ``fn(items) -> results`` in ``executor`` one call at a time, each call on every
    group that waited meanwhile, up to ``max_rows`` spectra.

    ``@serve.batch`` forms a batch as soon as its wait times out, even while the model is
    still busy with the previous one (with ``max_concurrent_batches=1`` it then waits
    behind it): under sustained load of single spectra that makes many small model batches
    (measured: 9 spectra on average for 64 requests in flight).  Here the groups that
    arrive during a model call are merged into the next one instead.  Failures are
    isolated per request and per row (:meth:`_isolated`); ``unscorable(n, labels)`` gives
    the results of a row that fails alone (the keys of ``fn``'s results: the served model
    kind's, :meth:`mendis_ray.predictor.Predictor.unscorable`).  Lives on the replica's
    event loop (no locks needed)."""

    def __init__(
        self, executor: ThreadPoolExecutor, fn: Any, max_rows: int, unscorable: Any = None
    ) -> None:
        self.executor = executor
        self.fn = fn
        self.max_rows = max_rows
        self.unscorable = unscorable or flow_unscorable
        self.pending: list[tuple[list[Item], asyncio.Future]] = []
        self.running = False

    async def submit(self, items: list[Item]) -> list[dict[str, np.ndarray]]:
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((items, fut))
        if not self.running:
            self.running = True
            asyncio.get_running_loop().create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.pending:
                take, rows = 0, 0
                for items, _ in self.pending:
                    n = n_spectra(items)
                    if take and rows + n > self.max_rows:
                        break
                    take, rows = take + 1, rows + n
                groups, self.pending = self.pending[:take], self.pending[take:]
                flat = [i for items, _ in groups for i in items]
                try:
                    results = await loop.run_in_executor(self.executor, self._isolated, flat)
                except Exception as err:  # not expected: _isolated contains row failures
                    for _, fut in groups:
                        if not fut.done():
                            fut.set_exception(err)
                    continue
                a = 0
                for items, fut in groups:
                    if not fut.done():  # a cancelled request (client gone) is skipped
                        fut.set_result(results[a : a + len(items)])
                    a += len(items)
        finally:
            self.running = False

    def _isolated(self, items: list[Item]) -> list[dict[str, np.ndarray]]:
        """``fn(items)``; where it raises, the items are scored in halves (a piece of one
        item in halves of its rows) down to single rows, and a single row that still
        fails gets ``unscorable`` scores.  One bad spectrum then costs its
        companions ~2 log2(n) extra model calls, never their results."""
        try:
            return self.fn(items)
        except Exception as err:
            n = n_spectra(items)
            if n <= 1:
                log.warning("a spectrum could not be scored (%s): flagged unscorable",
                            type(err).__name__)  # fmt: skip
                return [self.unscorable(len(i), i.labels) for i in items]
            log.warning("a batch of %d spectra failed (%s): scoring its parts apart",
                        n, type(err).__name__)  # fmt: skip
        if len(items) > 1:
            h = len(items) // 2
            return self._isolated(items[:h]) + self._isolated(items[h:])
        (item,) = items
        h = len(item) // 2
        parts = [self._isolated([item.rows(slice(0, h))])[0],
                 self._isolated([item.rows(slice(h, None))])[0]]  # fmt: skip
        return [{k: np.concatenate([p[k] for p in parts]) for k in parts[0]}]
