"""A run's LM answers on disk, so a resumed optimizer replays what it already paid for.

MIPROv2 keeps its search state in memory (bootstrapped demos, proposed instructions,
Optuna trials). It is deterministic given its seed and the LM's answers, so a run killed
mid-search resumes by running the search again with every answer it already received
read back from this journal: no LM call, no rate-limit slot, no usage counted. Where the
journal ends, the calls go to the LM again and are appended. The resumed search is the
one that died, continued, and it pays only for the part it had not done.

One JSON line per answer, keyed by a hash of the whole request (messages, schema,
temperature, ...); repeated identical requests are replayed in the order they were
answered. Lines are appended and flushed per answer, so a `kill -9` loses at most the
answer being written (a torn last line is ignored).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import deque
from pathlib import Path
from typing import Any

import dspy
from dspy.lm15 import Message, Response, TextPart, Usage

logger = logging.getLogger("dspyflow.lm_journal")


def request_key(request: dspy.lm15.Request) -> str:
    return hashlib.sha256(repr(request).encode()).hexdigest()


def _text(response: Response) -> str:
    return "".join(getattr(part, "text", "") or "" for part in response.message.parts)


class LMJournal:
    """Answers of one run's LM: replayed first, then recorded."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._pending: dict[str, deque[dict[str, Any]]] = {}
        self.replayed = 0
        self.recorded = 0
        loaded = 0
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self._pending.setdefault(entry["key"], deque()).append(entry)
                    loaded += 1
                except (ValueError, KeyError, TypeError):
                    continue  # the line a kill cut short
        self.loaded = loaded
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")

    def replay(self, request: dspy.lm15.Request) -> Response | None:
        """The recorded answer to this request, once per time it was answered; None when
        the journal has no more (the call goes to the LM)."""
        if not self._pending:
            return None  # a fresh run, or every answer replayed: no hash to compute
        key = request_key(request)
        with self._lock:
            queue = self._pending.get(key)
            if not queue:
                return None
            entry = queue.popleft()
            if not queue:
                del self._pending[key]
            self.replayed += 1
        # No usage: DSPy counts a call only when the response reports tokens.
        return Response(
            id=None,
            model=entry["model"],
            message=Message.assistant([TextPart(entry["text"])]),
            finish_reason=entry.get("finish_reason") or "stop",
            usage=Usage(),
        )

    def record(self, request: dspy.lm15.Request, response: Response) -> None:
        line = json.dumps(
            {
                "key": request_key(request),
                "model": response.model,
                "text": _text(response),
                "finish_reason": response.finish_reason,
            }
        )
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()
            self.recorded += 1

    def close(self) -> None:
        with self._lock:
            self._file.close()
