"""LM rate limits: `TokenBucketLimiter` (requests/s and tokens/min for every LM call in
this process) and `PrefectRateLimiter` (the same requests/s across processes and
machines, through a Prefect global concurrency limit with slot decay)."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel, Field

logger = logging.getLogger(__name__)


class RateLimiter(Protocol):
    def acquire(self, tokens: int = 0) -> None: ...


class LimiterMetrics(BaseModel):
    calls: int
    tokens: int
    waited_calls: int = Field(description="Calls that had to wait for the bucket.")
    wait_total_s: float
    wait_max_s: float
    requests_per_s: float | None
    tokens_per_min: float | None


class TokenBucketLimiter:
    """Requests/s and tokens/min for every LM call in this process (thread-safe).

    Callers queue in arrival order (FIFO tickets); the caller at the head sleeps, outside
    the lock, until the buckets hold what it needs *now*, takes it and returns. Because a
    grant is decided on the clock at the moment it is given (not reserved ahead for a
    thread that may wake late), grants are at least 1/rps apart with `burst=1`: no window
    of any length sees more than rps * window + burst grants. A request larger than the
    token burst passes once the bucket is full and leaves it in debt.
    """

    def __init__(
        self,
        requests_per_s: float | None = None,
        tokens_per_min: float | None = None,
        *,
        burst: float = 1.0,
        token_burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if requests_per_s is not None and requests_per_s <= 0:
            raise ValueError(f"requests_per_s must be > 0, got {requests_per_s}")
        if tokens_per_min is not None and tokens_per_min <= 0:
            raise ValueError(f"tokens_per_min must be > 0, got {tokens_per_min}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        self.requests_per_s = requests_per_s
        self.tokens_per_min = tokens_per_min
        self._clock = clock
        self._sleep = sleep
        self._cond = threading.Condition()
        self._queue: deque[int] = deque()
        self._tickets = itertools.count()
        now = clock()
        self._req = _Bucket(requests_per_s, burst, now) if requests_per_s else None
        # Default token burst: one second's worth, so tokens/min is enforced smoothly.
        tok_rate = tokens_per_min / 60.0 if tokens_per_min else None
        self._tok = (
            _Bucket(tok_rate, token_burst or max(1.0, tok_rate), now)
            if tok_rate is not None
            else None
        )
        self._calls = 0
        self._tokens = 0
        self._waited = 0
        self._wait_total = 0.0
        self._wait_max = 0.0

    def acquire(self, tokens: int = 0) -> None:
        if self._req is None and self._tok is None:
            return
        with self._cond:
            arrived = self._clock()
            ticket = next(self._tickets)
            self._queue.append(ticket)
            try:
                while True:
                    if self._queue[0] != ticket:
                        self._cond.wait()  # woken when the head is served
                        continue
                    now = self._clock()
                    wait = self._shortfall(tokens, now)
                    if wait <= 0:
                        break
                    self._cond.release()  # sleep without blocking metrics or arrivals
                    try:
                        self._sleep(wait)
                    finally:
                        self._cond.acquire()
                if self._req is not None:
                    self._req.level -= 1.0
                if self._tok is not None and tokens > 0:
                    self._tok.level -= tokens
                waited = now - arrived
                self._calls += 1
                self._tokens += tokens
                if waited > 0:
                    self._waited += 1
                    self._wait_total += waited
                    self._wait_max = max(self._wait_max, waited)
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()

    def _shortfall(self, tokens: int, now: float) -> float:
        """Seconds until both buckets can serve this request (0: now)."""
        wait = 0.0
        if self._req is not None:
            wait = self._req.wait_for(1.0, now)
        if self._tok is not None and tokens > 0:
            wait = max(wait, self._tok.wait_for(float(tokens), now))
        return wait

    def metrics(self) -> LimiterMetrics:
        with self._cond:
            return LimiterMetrics(
                calls=self._calls,
                tokens=self._tokens,
                waited_calls=self._waited,
                wait_total_s=self._wait_total,
                wait_max_s=self._wait_max,
                requests_per_s=self.requests_per_s,
                tokens_per_min=self.tokens_per_min,
            )


@dataclass
class _Bucket:
    rate: float  # units per second
    burst: float
    updated: float
    level: float = -1.0  # set to `burst` in __post_init__: a fresh bucket is full

    def __post_init__(self) -> None:
        self.level = self.burst

    def wait_for(self, amount: float, now: float) -> float:
        """Refill to `now`; seconds until `amount` (at most a full bucket) is there."""
        self.level = min(self.burst, self.level + (now - self.updated) * self.rate)
        self.updated = now
        need = min(amount, self.burst)
        return 0.0 if self.level >= need else (need - self.level) / self.rate


class PrefectRateLimiter:
    """LM requests/s across processes: one slot of a Prefect global concurrency limit with
    slot decay per call (`prefect.concurrency.sync.rate_limit`). Create the limit first
    with `ensure_prefect_rate_limit`. Prefect answers a full limit with HTTP 423 and the
    caller polls, so an optional in-process `local` bucket in front keeps the polling down.
    Tokens/min stay per process (the `local` bucket)."""

    def __init__(self, name: str, *, local: TokenBucketLimiter | None = None) -> None:
        self.name = name
        self.local = local

    def acquire(self, tokens: int = 0) -> None:
        from prefect.concurrency.sync import rate_limit

        if self.local is not None:
            self.local.acquire(tokens)
        # strict: a missing limit is a configuration error, not "no limit".
        rate_limit(self.name, occupy=1, strict=True)


def ensure_prefect_rate_limit(name: str, requests_per_s: float, burst: int = 1) -> None:
    """Create or update the Prefect global concurrency limit `name` as a rate limit."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
    )
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(
                    name=name, limit=burst, slot_decay_per_second=requests_per_s, active=True
                )
            )
            return
        client.update_global_concurrency_limit(
            name,
            GlobalConcurrencyLimitUpdate(
                limit=burst, slot_decay_per_second=requests_per_s, active=True
            ),
        )
