"""The benchmarks' A/B timing: alternating order, warm-ups discarded, and an untimed
set-up before every run (the cycle benchmark collects and freezes the heap there)."""

from __future__ import annotations

import time

from benchmarks._ab import interleaved


def test_set_up_runs_before_every_run_and_is_not_timed() -> None:
    log: list[str] = []

    def arm(name: str):  # type: ignore[no-untyped-def]
        def run() -> str:
            log.append(name)
            return name

        return run

    def slow_set_up() -> None:
        log.append("set-up")
        time.sleep(0.05)

    samples = interleaved({"a": arm("a"), "b": arm("b")}, rounds=2, before_each=slow_set_up)
    # warm-up A B, round 0 B A, round 1 A B: every run preceded by its set-up
    assert log == [x for name in "abbaab" for x in ("set-up", name)]
    assert [len(s.seconds) for s in samples.values()] == [2, 2]
    assert max(t for s in samples.values() for t in s.seconds) < 0.04, "set-up was timed"
