"""torch's intra-op threads for a training loop, chosen by measuring the steps as they run.

A step of a small model (the signal-space flow: 11-13 dimensions, 512 rows) runs hundreds
of tiny ops, each an OpenMP parallel region whose threads spin at a barrier.  On an idle
2-core machine two threads make an epoch 1.3x faster than one (2.2 against 2.9 s); when
another process shares the CPUs, a thread that the scheduler has parked keeps the other
spinning at every barrier, and the same epoch took 126 s instead of 2.6 s with one thread
(`python bench/bench_threads.py`).  Neither setting is right everywhere, and the load
changes while a training runs, so :class:`ThreadGovernor` probes both in a few steps,
keeps the faster, and probes again, sooner when a step is suddenly slow.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["ThreadGovernor"]


class ThreadGovernor:
    """Alternates short probes of 1 and ``n_max`` threads with runs of the faster one.

    Call :meth:`before_step` before and :meth:`after_step` after each step.  A probe runs
    ``probe`` steps with 1 thread and ``probe`` with ``n_max``; the faster setting (median
    step time) then runs for ``gap`` steps, the gap doubling (up to ``max_gap``) while the
    same setting keeps winning.  A step slower than ``slow`` times the winner's probe time
    starts a new probe at once.  With ``n_max`` = 1 it does nothing.

    Results then depend on the load in the last bits (1 and 2 threads sum in different
    orders: 7e-9 apart in the flow's weights after an epoch); ``fit(adapt_threads=False)``
    keeps torch's setting throughout, for bit-identical reruns.

    Args:
        n_max: threads to compare with one (default: torch's current setting).
        clock: seconds (tests pass their own).
    """

    def __init__(self, n_max: int | None = None, probe: int = 3, first_gap: int = 50,
                 max_gap: int = 800, slow: float = 3.0,
                 clock: Callable[[], float] = time.perf_counter) -> None:  # fmt: skip
        self.clock = clock
        self.n_max = n_max or torch.get_num_threads()
        self.probe, self.first_gap, self.max_gap, self.slow = probe, first_gap, max_gap, slow
        self.initial = torch.get_num_threads()
        self.choice, self.gap, self.ref = self.n_max, 0, float("inf")
        self.plan: list[int] = []  # the probe's remaining settings
        self.times: dict[int, list[float]] = {}
        self.left = 0  # steps before the next probe
        self.history: list[tuple[int, float]] = []  # (threads, seconds) of every step
        self._start_probe()

    @property
    def active(self) -> bool:
        return self.n_max > 1

    def _start_probe(self) -> None:
        if self.active:  # one thread first: under load it is the cheap one to measure
            self.plan = [1] * self.probe + [self.n_max] * self.probe
            self.times = {1: [], self.n_max: []}

    def before_step(self) -> None:
        if not self.active:
            return
        threads = self.plan[0] if self.plan else self.choice
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        self._t0 = self.clock()

    def after_step(self) -> None:
        if not self.active:
            return
        seconds = self.clock() - self._t0
        self.history.append((torch.get_num_threads(), seconds))
        if self.plan:
            self.times[self.plan.pop(0)].append(seconds)
            if not self.plan:
                self._decide()
            return
        self.left -= 1
        if self.left <= 0 or seconds > self.slow * self.ref:
            self._start_probe()

    def _decide(self) -> None:
        med = {n: statistics.median(t) for n, t in self.times.items()}
        best = min(med, key=med.get)
        same = best == self.choice and self.gap > 0
        self.gap = min(2 * self.gap, self.max_gap) if same else self.first_gap
        self.choice, self.ref, self.left = best, med[best], self.gap

    def restore(self) -> None:
        """Put torch's thread count back as it was."""
        torch.set_num_threads(self.initial)
