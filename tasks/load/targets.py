"""What the generator calls: an HTTP endpoint or an in-process callable.

A target's ``call()`` returns None on success or an error kind (``http_503``); it may
raise, and ``classify`` maps the exception to ``timeout``, ``connection`` or
``exception``. Clients are sized to the concurrency cap: a hidden pool limit (httpx and
aiohttp both default to 100 connections) would queue requests inside the client, where
the generator cannot see or count the wait.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

TIMEOUT = "timeout"
CONNECTION = "connection"
EXCEPTION = "exception"


class Target(ABC):
    name: str = "target"
    # Whether the scheduler may cancel a call at its timeout. A sync callable in a thread
    # cannot be interrupted: it keeps its slot until it returns and is classified after.
    cancellable: bool = True

    async def open(self, max_concurrency: int, timeout_s: float) -> None:  # noqa: B027
        """Create clients/pools sized to the cap (on the generator's event loop)."""

    @abstractmethod
    async def call(self) -> str | None:
        """One request: None on success, else an error kind."""

    def classify(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            return TIMEOUT
        if isinstance(exc, ConnectionError):
            return CONNECTION
        return EXCEPTION

    async def close(self) -> None:  # noqa: B027
        pass


def _status_kind(status: int, ok_statuses: frozenset[int] | None) -> str | None:
    ok = status in ok_statuses if ok_statuses is not None else status < 400
    return None if ok else f"http_{status}"


class _HttpTarget(Target):
    def __init__(
        self,
        url: str,
        *,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        json_body: Any = None,
        ok_statuses: Sequence[int] | None = None,
    ) -> None:
        self.url = url
        self.name = f"{method} {url}"
        self.method = method
        self.headers = dict(headers or {})
        self.json_body = json_body
        self.ok_statuses = frozenset(ok_statuses) if ok_statuses else None


class AiohttpTarget(_HttpTarget):
    """The default HTTP client: ~15x the throughput of httpx's async pool at 20+ in flight
    on this project's 2-core machines (docs/load-testing.md)."""

    async def open(self, max_concurrency: int, timeout_s: float) -> None:
        import aiohttp

        connector = aiohttp.TCPConnector(
            limit=max_concurrency, limit_per_host=max_concurrency, force_close=False
        )
        # The scheduler enforces the request timeout; the client's is a little longer, so
        # every timeout is measured and classified in one place.
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=timeout_s + 1.0),
            headers=self.headers,
        )

    async def call(self) -> str | None:
        async with self._session.request(self.method, self.url, json=self.json_body) as resp:
            await resp.read()
            return _status_kind(resp.status, self.ok_statuses)

    def classify(self, exc: BaseException) -> str:
        import aiohttp

        if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
            return TIMEOUT
        if isinstance(exc, aiohttp.ClientConnectionError | ConnectionError):
            return CONNECTION
        return EXCEPTION

    async def close(self) -> None:
        await self._session.close()


class HttpxTarget(_HttpTarget):
    """httpx's AsyncClient, pool sized to the cap. Its pool slows down sharply with many
    requests in flight (encode/httpx#3215): prefer aiohttp for rates above a few hundred."""

    async def open(self, max_concurrency: int, timeout_s: float) -> None:
        import httpx

        self._client = httpx.AsyncClient(
            limits=httpx.Limits(
                max_connections=max_concurrency, max_keepalive_connections=max_concurrency
            ),
            timeout=httpx.Timeout(timeout_s + 1.0),
            headers=self.headers,
        )

    async def call(self) -> str | None:
        resp = await self._client.request(self.method, self.url, json=self.json_body)
        return _status_kind(resp.status_code, self.ok_statuses)

    def classify(self, exc: BaseException) -> str:
        import httpx

        if isinstance(exc, TimeoutError | httpx.TimeoutException):
            return TIMEOUT
        if isinstance(exc, httpx.TransportError | ConnectionError):
            return CONNECTION
        return EXCEPTION

    async def close(self) -> None:
        await self._client.aclose()


def http_target(
    url: str,
    *,
    client: str = "aiohttp",
    method: str = "GET",
    headers: dict[str, str] | None = None,
    json_body: Any = None,
    ok_statuses: Sequence[int] | None = None,
) -> Target:
    cls = {"aiohttp": AiohttpTarget, "httpx": HttpxTarget}[client]
    return cls(url, method=method, headers=headers, json_body=json_body, ok_statuses=ok_statuses)


class CallableTarget(Target):
    """An in-process callable. Async ones are awaited on the generator's loop; sync ones run
    in a thread pool of exactly ``max_concurrency`` workers (no hidden queue). A return
    value is a success; an exception is an error."""

    def __init__(self, fn: Callable[[], Any], *, name: str | None = None) -> None:
        self.fn = fn
        self.name: str = name or str(getattr(fn, "__qualname__", repr(fn)))
        self.is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - async callable objects
        )
        self.cancellable = self.is_async
        self._pool: ThreadPoolExecutor | None = None

    async def open(self, max_concurrency: int, timeout_s: float) -> None:
        if not self.is_async:
            self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="load-target")

    async def call(self) -> str | None:
        if self.is_async:
            await self.fn()
        else:
            await asyncio.get_running_loop().run_in_executor(self._pool, self.fn)
        return None

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def dspy_program_target(
    run_id: str,
    *,
    lm: Any,
    inputs: dict[str, Any] | Sequence[dict[str, Any]],
    repository: Any = None,
) -> CallableTarget:
    """Call the optimized program of optimization run ``run_id`` with ``lm`` (a ``dspy.LM``,
    or anything with a ``context()`` such as ``tasks.lm.providers.build_lm``'s result).

    ``inputs`` are the program's keyword arguments, or a list of them used in turn (so an
    LM cache does not turn the test into a cache benchmark).
    """
    import dspy

    from storage.db import get_engine
    from storage.repository import Repository
    from tasks.programs import get_task

    run = (repository or Repository(get_engine())).get_run(run_id)
    if run.program_state is None:
        raise ValueError(f"run {run_id} has no optimized program state (state {run.state})")
    program = get_task(run.task).build_program()
    program.load_state(run.program_state)
    # next() on itertools.cycle is one C call under the GIL: safe from the pool's threads.
    cycle = itertools.cycle([inputs] if isinstance(inputs, dict) else list(inputs))

    # A tasks.lm CycleLM brings its own context (LM, adapter, usage); a bare dspy.LM does not.
    context = getattr(lm, "context", None)

    def call_program() -> Any:
        with context() if callable(context) else dspy.context(lm=lm):
            return program(**next(cycle))

    return CallableTarget(call_program, name=f"dspy:{run.task}:{run.id[:8]}")
