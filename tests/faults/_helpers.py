"""Shared bits of the fault tests: small sim specs, waiting, quiet stdout."""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable

from tasks.cycle.spec import CycleSpec, LMSpec


def sim_spec(**fields) -> CycleSpec:  # type: ignore[no-untyped-def]
    lm = {k: fields.pop(k) for k in list(fields) if k.startswith("sim_")}
    caps = {"max_train": 6, "max_val": 10, "max_test": 6}
    return CycleSpec(lm=LMSpec(model="sim", **lm), **{**caps, **fields})


def wait_for(predicate: Callable[[], object], timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what or predicate}"
        time.sleep(0.05)


def quiet() -> contextlib.AbstractContextManager[object]:
    return contextlib.redirect_stdout(io.StringIO())
