"""dspyflow's job queue: priority order, backpressure, a concurrency cap.

Prefect's concurrency limits are caps that poll (HTTP 423, jittered retry): no order, no
priority, no wake-up on release. So the order in which jobs start, and what happens when
too many arrive, is decided here, in process; Prefect limits stay the cross-process cap.

- `JobQueue`: bounded (capacity), highest priority first and FIFO within a priority;
  at >= 90 % of capacity a submission is refused or deferred (configurable), always with
  a status, never dropped; `take()` hands out a job only while fewer than
  `max_concurrent` are in flight; wait and run times feed p50/p95 metrics.

The LM rate limits that the cycles' engines call live beside them, in `tasks.lm.rate_limit`.

Plain Python (threads and a condition variable): no Prefect import at module level.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, TypeVar

from pydantic import BaseModel, Field

T = TypeVar("T")

DEFAULT_CAPACITY = 2000
DEFAULT_HIGH_WATERMARK = 0.9
DEFAULT_MAX_CONCURRENT = 500
_SAMPLES = 100_000  # wait/run time samples kept for percentiles (a ring buffer)


class Backpressure(StrEnum):
    """What a full queue (>= high watermark) does with a new submission."""

    refuse = "refuse"  # the caller gets `refused` and keeps the job
    defer = "defer"  # the queue parks it and admits it when the depth falls below the mark


class SubmitStatus(StrEnum):
    accepted = "accepted"
    deferred = "deferred"
    refused = "refused"


class SubmitResult(BaseModel):
    job_id: str
    status: SubmitStatus
    depth: int = Field(description="Queued jobs after this submission (deferred not counted).")
    capacity: int
    reason: str | None = None


class QueueClosedError(RuntimeError):
    """`submit` after `close()`."""


class QueueMetrics(BaseModel):
    """A snapshot of the queue's utilization."""

    capacity: int
    high_watermark: int = Field(description="Depth at which backpressure starts.")
    max_concurrent: int
    depth: int
    deferred: int
    in_flight: int
    max_in_flight: int
    utilization: float = Field(description="in_flight / max_concurrent.")
    submitted: int
    accepted: int
    deferred_total: int
    refused: int
    completed: int
    wait_p50_s: float | None = Field(None, description="Submission to start, median.")
    wait_p95_s: float | None = None
    wait_max_s: float | None = None
    run_p50_s: float | None = Field(None, description="Start to done, median.")
    run_p95_s: float | None = None


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(order=True)
class _Entry(Generic[T]):
    sort_key: tuple[int, int]
    job_id: str = field(compare=False)
    item: T = field(compare=False)
    priority: int = field(compare=False)
    submitted_at: float = field(compare=False)


@dataclass
class QueuedJob(Generic[T]):
    """A job handed out by `take()`: call `JobQueue.done(job.job_id)` when it finishes."""

    job_id: str
    item: T
    priority: int
    waited_s: float


class JobQueue(Generic[T]):
    """A bounded, thread-safe priority queue with backpressure and a concurrency cap."""

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        *,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
        backpressure: Backpressure | str = Backpressure.refuse,
        high_watermark: float = DEFAULT_HIGH_WATERMARK,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        if max_concurrent <= 0:
            raise ValueError(f"max_concurrent must be > 0, got {max_concurrent}")
        if not 0 < high_watermark <= 1:
            raise ValueError(f"high_watermark must be in (0, 1], got {high_watermark}")
        self.capacity = capacity
        self.max_concurrent = max_concurrent
        self.backpressure = Backpressure(backpressure)
        # Backpressure starts *at* 90 %: capacity 2000 takes 1800 jobs, refuses the 1801st.
        self.limit = max(1, math.ceil(capacity * high_watermark))
        self._clock = clock
        self._cond = threading.Condition()
        self._heap: list[_Entry[T]] = []
        self._deferred: list[_Entry[T]] = []
        self._running: dict[str, float] = {}
        self._seq = itertools.count()
        self._closed = False
        self._counts = {"submitted": 0, "accepted": 0, "deferred": 0, "refused": 0, "done": 0}
        self._max_in_flight = 0
        self._waits: deque[float] = deque(maxlen=_SAMPLES)
        self._runs: deque[float] = deque(maxlen=_SAMPLES)

    # --- producers -------------------------------------------------------------------

    def submit(self, job_id: str, item: T, priority: int = 0) -> SubmitResult:
        """Queue a job, or refuse/defer it when the queue is at its high watermark."""
        with self._cond:
            if self._closed:
                raise QueueClosedError("the queue is closed to new jobs")
            self._counts["submitted"] += 1
            entry = _Entry((-priority, next(self._seq)), job_id, item, priority, self._clock())
            self._promote_deferred()
            # Deferred jobs wait their turn: a newcomer may not overtake them into the queue.
            if len(self._heap) < self.limit and not self._deferred:
                heapq.heappush(self._heap, entry)
                self._counts["accepted"] += 1
                self._cond.notify_all()
                return self._result(job_id, SubmitStatus.accepted)
            reason = (
                f"queue at {len(self._heap)}/{self.capacity} "
                f"(backpressure from {self.limit}, {self.limit / self.capacity:.0%} of capacity)"
            )
            if self.backpressure is Backpressure.defer:
                heapq.heappush(self._deferred, entry)
                self._counts["deferred"] += 1
                return self._result(job_id, SubmitStatus.deferred, f"deferred: {reason}")
            self._counts["refused"] += 1
            return self._result(job_id, SubmitStatus.refused, f"refused: {reason}")

    def _result(self, job_id: str, status: SubmitStatus, reason: str | None = None) -> SubmitResult:
        return SubmitResult(
            job_id=job_id,
            status=status,
            depth=len(self._heap),
            capacity=self.capacity,
            reason=reason,
        )

    def close(self) -> None:
        """No more submissions; `take()` drains what is queued, then returns None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def drain(self) -> list[str]:
        """Close the queue and remove every job not yet taken (queued or deferred): a
        stopping batch will not start them. Returns their ids; `take()` then returns None
        and `join()` waits only for the jobs in flight."""
        with self._cond:
            self._closed = True
            ids = [entry.job_id for entry in (*self._heap, *self._deferred)]
            self._heap.clear()
            self._deferred.clear()
            self._cond.notify_all()
            return ids

    def running_ids(self) -> list[str]:
        with self._cond:
            return list(self._running)

    # --- consumers -------------------------------------------------------------------

    def take(self, timeout: float | None = None) -> QueuedJob[T] | None:
        """The highest-priority job, once fewer than `max_concurrent` are in flight.

        Blocks; returns None when the queue is closed and empty, or on timeout."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while True:
                self._promote_deferred()
                if self._heap and len(self._running) < self.max_concurrent:
                    entry = heapq.heappop(self._heap)
                    self._promote_deferred()
                    now = self._clock()
                    waited = now - entry.submitted_at
                    self._running[entry.job_id] = now
                    self._max_in_flight = max(self._max_in_flight, len(self._running))
                    self._waits.append(waited)
                    return QueuedJob(entry.job_id, entry.item, entry.priority, waited)
                if self._closed and not self._heap and not self._deferred:
                    return None
                remaining = None if deadline is None else deadline - self._clock()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def _promote_deferred(self) -> None:
        while self._deferred and len(self._heap) < self.limit:
            heapq.heappush(self._heap, heapq.heappop(self._deferred))

    def done(self, job_id: str) -> None:
        """A job handed out by `take()` finished (in any state): free its slot."""
        with self._cond:
            started = self._running.pop(job_id, None)
            if started is None:
                return
            self._runs.append(self._clock() - started)
            self._counts["done"] += 1
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued, deferred or in flight. False on timeout."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while self._heap or self._deferred or self._running:
                remaining = None if deadline is None else deadline - self._clock()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    # --- metrics ---------------------------------------------------------------------

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._heap)

    @property
    def in_flight(self) -> int:
        with self._cond:
            return len(self._running)

    def metrics(self) -> QueueMetrics:
        with self._cond:
            waits = list(self._waits)
            runs = list(self._runs)
            c = self._counts
            return QueueMetrics(
                capacity=self.capacity,
                high_watermark=self.limit,
                max_concurrent=self.max_concurrent,
                depth=len(self._heap),
                deferred=len(self._deferred),
                in_flight=len(self._running),
                max_in_flight=self._max_in_flight,
                utilization=len(self._running) / self.max_concurrent,
                submitted=c["submitted"],
                accepted=c["accepted"],
                deferred_total=c["deferred"],
                refused=c["refused"],
                completed=c["done"],
                wait_p50_s=percentile(waits, 50),
                wait_p95_s=percentile(waits, 95),
                wait_max_s=max(waits) if waits else None,
                run_p50_s=percentile(runs, 50),
                run_p95_s=percentile(runs, 95),
            )
