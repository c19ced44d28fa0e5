"""The open-model scheduler: requests start at their intended times, whatever the target does.

Each request's intended start is fixed by the pattern (t0 + N⁻¹(i)) and the loop sleeps
until that absolute monotonic deadline, so sleep overshoot never accumulates (a loop of
``sleep(1 / rate)`` drifts and silently lowers the rate). Response time is measured from
the intended start, service time from the actual send; their gap is queueing, in the
generator or at the cap. When ``max_concurrency`` requests are in flight the next one
either waits for a slot (counted, and the wait is in its response time) or is dropped
(counted, never sent); the rate is never lowered. At most ``max_concurrency`` request
tasks exist at a time.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Literal

from tasks.load.patterns import LoadPattern
from tasks.load.results import WindowRecorder
from tasks.load.targets import TIMEOUT, Target

OnFull = Literal["wait", "drop"]


@dataclass
class ScheduleSettings:
    max_concurrency: int = 100
    on_full: OnFull = "wait"
    timeout_s: float = 30.0
    arrivals: Literal["uniform", "poisson"] = "uniform"
    seed: int | None = None
    start_delay_s: float = 0.05  # lets the loop settle before the first deadline


@dataclass
class ScheduleRun:
    t0: float  # perf_counter of offset 0
    ended: float  # perf_counter when the last request finished
    error_samples: dict[str, str]

    @property
    def duration_s(self) -> float:
        return self.ended - self.t0


class OpenModelScheduler:
    def __init__(
        self,
        pattern: LoadPattern,
        target: Target,
        recorder: WindowRecorder,
        settings: ScheduleSettings,
    ) -> None:
        self.pattern = pattern
        self.target = target
        self.recorder = recorder
        self.settings = settings
        self.in_flight = 0
        self.t0 = 0.0
        self._slot_free = asyncio.Event()
        self._error_samples: dict[str, str] = {}

    async def run(self, t0: float | None = None) -> ScheduleRun:
        s = self.settings
        rec = self.recorder
        perf = time.perf_counter
        self.t0 = t0 if t0 is not None else perf() + s.start_delay_s
        tasks: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        wait_end = 0.0

        for offset in self.pattern.intended_times(arrivals=s.arrivals, seed=s.seed):
            intended = self.t0 + offset
            delay = intended - perf()
            if delay > 0:
                await asyncio.sleep(delay)  # an absolute deadline: overshoot never accumulates
            if self.in_flight >= s.max_concurrency:
                if s.on_full == "drop":
                    rec.at(offset).dropped += 1
                    continue
                while self.in_flight >= s.max_concurrency:
                    self._slot_free.clear()
                    await self._slot_free.wait()
                wait_end = perf()
            if intended < wait_end:
                # Due while the loop waited for a slot (itself or an earlier request): late
                # because of the cap, and its response time says by how much.
                rec.at(offset).waited += 1
            self.in_flight += 1
            busy = rec.at(perf() - self.t0)
            busy.max_in_flight = max(busy.max_in_flight, self.in_flight)
            task = loop.create_task(self._one(intended))
            tasks.add(task)
            task.add_done_callback(self._finished(tasks))

        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        return ScheduleRun(self.t0, perf(), dict(self._error_samples))

    def _finished(self, tasks: set[asyncio.Task[None]]):
        def done(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            self.in_flight -= 1
            self._slot_free.set()

        return done

    async def _one(self, intended: float) -> None:
        perf = time.perf_counter
        timeout = self.settings.timeout_s
        sent = perf()  # after the slot is taken: the wait for it is not service time
        error: str | None
        try:
            if self.target.cancellable:
                async with asyncio.timeout(timeout):
                    error = await self.target.call()
            else:
                error = await self.target.call()
        except Exception as exc:
            error = TIMEOUT if isinstance(exc, TimeoutError) else self.target.classify(exc)
            self._error_samples.setdefault(error, f"{type(exc).__name__}: {exc}"[:300])
        done = perf()
        if done - sent > timeout and (error == TIMEOUT or not self.target.cancellable):
            # A caller with this timeout saw it at sent + timeout. Later is the generator's
            # doing: a sync thread that cannot be interrupted, or a cancellation that a busy
            # loop (or a client that shields its cleanup) delivered late.
            error, done = TIMEOUT, sent + timeout
        self.recorder.record(t0=self.t0, intended=intended, sent=sent, done=done, error=error)
