"""`ManagedEngine`: the wrapper around every custom engine of a cycle: retries of
transient errors with exponential backoff and jitter, the shared rate limiter, the
journal that replays answers on resume, and exact usage per cycle."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import dspy
from dspy.lm15 import Response
from dspy.utils.exceptions import is_retryable_lm_error

from tasks.lm.messages import estimate_tokens
from tasks.lm.rate_limit import RateLimiter

if TYPE_CHECKING:
    from tasks.lm.journal import LMJournal

logger = logging.getLogger(__name__)


class Engine(Protocol):
    def complete(self, request: dspy.lm15.Request) -> Response: ...


@dataclass
class RetryPolicy:
    """Exponential backoff with jitter for transient LM errors (429, 5xx, timeouts)."""

    retries: int = 4
    base_delay_s: float = 0.05
    max_delay_s: float = 5.0
    jitter: float = 0.5  # each delay is scaled by a factor in [1 - jitter, 1 + jitter]

    def delay(self, attempt: int, rng: random.Random, retry_after: float | None = None) -> float:
        if retry_after is not None and math.isfinite(retry_after) and retry_after >= 0:
            return min(retry_after, self.max_delay_s)
        raw = min(self.base_delay_s * 2**attempt, self.max_delay_s)
        return raw * rng.uniform(1 - self.jitter, 1 + self.jitter)


@dataclass
class ManagedEngine:
    """Wraps a provider engine: rate limit, retry transient errors, count retries."""

    inner: Engine
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    limiter: RateLimiter | None = None
    on_retry: Callable[[Exception, int], None] | None = None
    supports_response_schema: bool = True
    supported_params: frozenset[str] = frozenset({"response_format", "temperature", "max_tokens"})
    # Set while a journaled optimizer runs (tasks.lm.journal): replay first, then record.
    journal: LMJournal | None = None
    retries_done: int = 0
    # The last error that reached DSPy: DSPy's evaluator replaces it with "Execution
    # cancelled due to errors", so the run's recorded reason comes from here.
    last_error: str | None = None
    _rng: random.Random = field(default_factory=random.Random)

    def complete(self, request: dspy.lm15.Request) -> Response:
        journal = self.journal
        if journal is not None and (replayed := journal.replay(request)) is not None:
            return replayed  # paid for by an earlier attempt of this run
        attempt = 0
        while True:
            if self.limiter is not None:
                self.limiter.acquire(tokens=estimate_tokens(request))
            try:
                response = self.inner.complete(request)
            except Exception as exc:
                if not is_transient_lm_error(exc) or attempt >= self.retry.retries:
                    text = str(exc).strip()
                    self.last_error = (
                        f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
                    )
                    raise
                delay = self.retry.delay(attempt, self._rng, getattr(exc, "retry_after", None))
                self.retries_done += 1
                if self.on_retry is not None:
                    self.on_retry(exc, attempt)
                time.sleep(delay)
                attempt += 1
                continue
            if journal is not None:
                journal.record(request, response)
            return response

    def stream(self, request: dspy.lm15.Request):
        from dspy.lm15 import response_to_events

        return response_to_events(self.complete(request))

    def close(self) -> None:
        pass


def is_transient_lm_error(exc: BaseException) -> bool:
    """429, 5xx, timeouts and transport errors, as raised inside an engine (lm15 errors)
    or after DSPy translated them. `is_retryable_lm_error` knows only the latter, so on
    its own it never retried an engine's 429."""
    from dspy.lm15 import RateLimitError, ServerError, TimeoutError, TransportError

    if isinstance(exc, RateLimitError | ServerError | TimeoutError | TransportError):
        return True
    return isinstance(exc, Exception) and is_retryable_lm_error(exc)
