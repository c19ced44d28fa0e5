"""One load test, end to end, as a plain function: target, monitor, scheduler, summary,
thresholds and bottlenecks. No Prefect and no database here (see ``store`` and ``steps``).
"""

from __future__ import annotations

import asyncio
import importlib
import threading
import time
from collections.abc import Callable
from typing import Any

from hdrh.histogram import HdrHistogram
from pydantic import BaseModel

from tasks.load.bottlenecks import Bottleneck, detect
from tasks.load.config import LoadTestConfig
from tasks.load.monitor import ResourceMonitor, attach_to_windows
from tasks.load.patterns import Phase
from tasks.load.redact import scrub
from tasks.load.results import (
    LoadSummary,
    LoadTestResult,
    PhaseStats,
    Window,
    WindowRecorder,
    phase_stats,
)
from tasks.load.scheduler import OpenModelScheduler, ScheduleSettings
from tasks.load.targets import CallableTarget, Target, dspy_program_target, http_target
from tasks.load.thresholds import ThresholdResult, evaluate, parse_thresholds


class Verdict(BaseModel):
    passed: bool
    thresholds: list[ThresholdResult]
    bottlenecks: list[Bottleneck]

    @property
    def breached(self) -> list[ThresholdResult]:
        return [t for t in self.thresholds if not t.passed]


def build_target(
    config: LoadTestConfig, target: Target | Callable[[], Any] | None = None
) -> Target:
    """``target`` if given (a Target or a plain callable), else the config's target."""
    if isinstance(target, Target):
        return target
    if target is not None:
        return CallableTarget(target)
    if config.url is not None:
        return http_target(
            config.url,
            client=config.http_client,
            method=config.method,
            headers=config.headers,
            json_body=config.json_body,
            ok_statuses=config.ok_statuses,
        )
    if config.callable is not None:
        module, _, attr = config.callable.partition(":")
        fn: Any = importlib.import_module(module)
        for part in attr.split("."):
            fn = getattr(fn, part)
        return CallableTarget(fn, name=config.callable)
    if config.program_run_id is not None:
        from tasks.cycle.spec import LMSpec
        from tasks.lm.providers import build_lm

        spec = (
            LMSpec.model_validate(config.lm)
            if isinstance(config.lm, dict)
            else LMSpec(model=config.lm or "local")
        )
        return dspy_program_target(
            config.program_run_id, lm=build_lm(spec), inputs=config.program_inputs
        )
    raise ValueError("no target: give url, callable or program_run_id")


async def arun_load_test(
    config: LoadTestConfig, target: Target | Callable[[], Any] | None = None
) -> LoadTestResult:
    """Run one load test on the running event loop (which should be doing nothing else)."""
    tgt = build_target(config, target)
    pattern = config.build_pattern()
    recorder = WindowRecorder(pattern, config.window_s)
    settings = ScheduleSettings(
        max_concurrency=config.max_concurrency,
        on_full=config.on_full,
        timeout_s=config.timeout_s,
        arrivals=config.arrivals,
        seed=config.seed,
    )
    monitor = ResourceMonitor(config.monitor_interval_s)
    await tgt.open(config.max_concurrency, config.timeout_s)
    try:
        scheduler = OpenModelScheduler(pattern, tgt, recorder, settings)
        t0 = time.perf_counter() + settings.start_delay_s
        monitor.start(t0)
        ticker = asyncio.create_task(monitor.loop_ticker())
        try:
            run = await scheduler.run(t0)
        finally:
            ticker.cancel()
            samples = monitor.stop()
    finally:
        await tgt.close()

    windows = recorder.cover(run.duration_s)
    attach_to_windows(samples, windows)
    overall, overall_hists = phase_stats("overall", windows)
    phases: dict[str, PhaseStats] = {}
    hists: dict[str, dict[str, HdrHistogram]] = {"overall": overall_hists}
    for phase in Phase:
        members = [w for w in windows if w.phase == phase and _in_plan(w, pattern.duration)]
        if members:
            phases[phase.value], hists[phase.value] = phase_stats(phase.value, members)
    secrets = config.secrets()
    summary = LoadSummary(
        name=config.name,
        # Credentials of the URL or headers must not reach the database or a report.
        target=scrub(tgt.name, secrets),
        pattern=pattern.name,
        planned_requests=round(pattern.total),
        duration_s=run.duration_s,
        max_concurrency=config.max_concurrency,
        on_full=config.on_full,
        overall=overall,
        phases=phases,
        resources=monitor.summary(),
        error_samples={k: scrub(v, secrets) for k, v in run.error_samples.items()},
    )
    return LoadTestResult(summary=summary, windows=windows, resources=samples, histograms=hists)


def _in_plan(window: Window, duration: float) -> bool:
    # Tail windows (only completions after the last intended start) stay out of phase totals.
    return window.start_s < duration


def run_load_test(
    config: LoadTestConfig, target: Target | Callable[[], Any] | None = None
) -> LoadTestResult:
    """Synchronous entry point. The generator always gets an event loop of its own: inside a
    running loop (a notebook, an async flow) it runs in a fresh thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(arun_load_test(config, target))
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = asyncio.run(arun_load_test(config, target))
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=work, name="load-generator")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def judge(result: LoadTestResult, config: LoadTestConfig) -> Verdict:
    """Thresholds on the steady state (or the whole run), and the bottlenecks found."""
    summary = result.summary
    phase = Phase.steady.value if Phase.steady.value in summary.phases else "overall"
    outcomes = evaluate(
        parse_thresholds(config.effective_thresholds), summary.steady, result.histograms[phase]
    )
    bottlenecks = detect(summary, config.bottlenecks)
    return Verdict(
        passed=all(t.passed for t in outcomes), thresholds=outcomes, bottlenecks=bottlenecks
    )
