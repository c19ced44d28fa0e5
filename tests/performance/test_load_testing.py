"""Load-testing scenarios of the seed report, against a real HTTP server on 127.0.0.1.

The server (tasks.load.loopback) counts what it receives and measures its own latency,
so the generator's counts, rates and percentiles are checked from the other side. The
machine running these tests is small and shared: counts are asserted exactly, rates and
latencies with tolerances that a correct generator meets on 2 busy cores.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.load.bottlenecks import detect
from tasks.load.config import LoadTestConfig
from tasks.load.histograms import decode, encode, merge, new_histogram, percentiles, record_seconds
from tasks.load.loopback import LoopbackServer
from tasks.load.patterns import ConstantPattern, RampPattern, SpikePattern, WavePattern
from tasks.load.results import LoadTestResult
from tasks.load.runner import Verdict, judge, run_load_test
from tasks.load.thresholds import ThresholdError, parse_threshold
from tasks.reports.load import ReportData, series, write_reports
from tests.browser import CHROMIUM, render_in_chromium

pytestmark = pytest.mark.performance


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    with LoopbackServer(delay_ms=(1.0, 5.0)) as srv:
        yield srv


def _config(server: LoopbackServer, **kw: object) -> LoadTestConfig:
    base: dict[str, object] = {"url": server.url, "rps": 50, "duration_s": 2, "max_concurrency": 50}
    base.update(kw)
    return LoadTestConfig(**base)  # type: ignore[arg-type]


def _arrivals_in(server_arrivals: list[float], t0: float, start: float, end: float) -> int:
    return sum(1 for a in server_arrivals if start <= a - t0 < end)


# --- patterns: the open model's schedule ---------------------------------------------------


def test_schedule_is_the_inverse_of_the_cumulative_rate() -> None:
    patterns = [
        ConstantPattern(rps=100, duration=3),
        RampPattern(rps=100, duration=10, warmup_s=1, ramp_s=3, cooldown_s=2, start_rps=10),
        SpikePattern(rps=20, duration=5, spike_rps=200, spike_start_s=2, spike_s=1),
        WavePattern(rps=50, duration=4, period_s=2, amplitude=1.0),
    ]
    for p in patterns:
        times = list(p.intended_times())
        assert len(times) == math.ceil(p.total - 1e-9), p.name
        assert times == sorted(times) and times[-1] < p.duration
        # N(t_i) = i: no drift, whatever the pattern (1e-3 request = 10 us at 100 rps)
        assert max(abs(p.cumulative(t) - i) for i, t in enumerate(times)) < 1e-3, p.name
    poisson = list(ConstantPattern(rps=200, duration=10).intended_times(arrivals="poisson", seed=3))
    assert abs(len(poisson) - 2000) < 4 * math.sqrt(2000)


def test_constant_pattern(server: LoopbackServer) -> None:
    result = run_load_test(_config(server, rps=50, duration_s=2))
    s = result.summary
    stats = server.stats()
    assert s.planned_requests == 100
    assert s.overall.requests == 100 == stats.requests  # counted from both sides
    assert s.overall.errors == 0 and stats.statuses[200] == 100
    assert [w.requests for w in result.windows[:2]] == [50, 50]
    assert s.steady.achieved_rps == pytest.approx(50, rel=0.03)
    # The server saw them spread over 2 s (an open model does not burst at the start).
    first, last = min(stats.arrivals), max(stats.arrivals)
    assert 1.85 < last - first < 2.3  # (a 2-core box may stall the last send a little)


def test_ramp_up_pattern(server: LoopbackServer) -> None:
    config = _config(
        server,
        pattern="ramp",
        rps=80,
        duration_s=2,
        warmup_s=0.5,
        ramp_s=0.5,
        cooldown_s=0.5,
        start_rps=10,
        window_s=0.5,
    )
    result = run_load_test(config)
    s = result.summary
    assert s.overall.requests == server.stats().requests == 90  # N(2 s) of this ramp
    phases = [w.phase.value for w in result.windows[:4]]
    assert phases == ["warmup", "warmup", "steady", "cooldown"]
    targets = [w.target for w in result.windows[:4]]
    assert targets == pytest.approx([5, 22.5, 40, 22.5])
    assert [w.requests for w in result.windows[:4]] == pytest.approx(targets, abs=1)
    # Warm-up and cool-down stay out of the steady state.
    assert s.steady.requests == 40 and s.phases["warmup"].requests == 28
    assert s.steady.target_rps == pytest.approx(80)


def test_spike_pattern(server: LoopbackServer) -> None:
    config = _config(
        server,
        pattern="spike",
        rps=20,
        spike_rps=150,
        spike_start_s=0.5,
        spike_s=0.5,
        duration_s=1.5,
        max_concurrency=100,
        window_s=0.5,
    )
    result = run_load_test(config)
    assert [w.requests for w in result.windows[:3]] == [10, 75, 10]
    stats = server.stats()
    assert stats.requests == 95
    # From the server's side too: the spike's half second carries the spike's requests.
    t0 = min(stats.arrivals)
    assert _arrivals_in(stats.arrivals, t0, 0.5 - 0.01, 1.0 - 0.01) == pytest.approx(75, abs=4)
    assert result.summary.overall.errors == 0


def test_wave_pattern(server: LoopbackServer) -> None:
    config = _config(
        server,
        pattern="wave",
        rps=60,
        duration_s=2,
        wave_period_s=2,
        wave_amplitude=0.8,
        window_s=0.5,
    )
    result = run_load_test(config)
    per_window = [w.requests for w in result.windows[:4]]
    assert sum(per_window) == 120 == server.stats().requests
    # sin over one period: the first half carries more than the second
    assert per_window[0] > per_window[2] and per_window[1] > per_window[3]
    expected = [w.target for w in result.windows[:4]]
    assert per_window == pytest.approx(expected, abs=1)


# --- sustained load ------------------------------------------------------------------------


@pytest.mark.slow
def test_sustained_high_load_100_rps_for_30_s(server: LoopbackServer) -> None:
    config = _config(
        server,
        rps=100,
        duration_s=30,
        max_concurrency=60,
        thresholds=["error_rate<0.01", "rps>=97", "p95<500ms"],
    )
    result = run_load_test(config)
    verdict = judge(result, config)
    s = result.summary
    assert s.overall.requests >= 2970 and s.overall.requests == 3000
    assert server.stats().requests == s.overall.requests
    assert s.overall.error_rate < 0.01
    # The generator held the rate: sends per second of the run (completions in [0, 30 s)
    # may lose a few to a stall at the very end on a shared machine: rps>=97 above).
    assert s.steady.sent_rps >= 99.0
    # Every one-second window held the rate (sent by actual send time).
    assert min(w.sent for w in result.windows[1:29]) >= 90
    assert verdict.passed, (verdict.thresholds, s.resources)
    assert s.duration_s < 32.0


# --- bottlenecks ---------------------------------------------------------------------------


def test_bottleneck_detection_slow_target_and_concurrency_cap() -> None:
    with LoopbackServer(delay_ms=(300.0, 400.0)) as slow:
        config = LoadTestConfig(url=slow.url, rps=30, duration_s=1.5, max_concurrency=5)
        result = run_load_test(config)
    found = {b.component: b for b in judge(result, config).bottlenecks}
    assert {"response_time", "concurrency", "throughput"} <= set(found)
    assert found["response_time"].severity in ("medium", "high")
    assert "Little's law" in found["concurrency"].recommendation
    # The rate was not lowered: every request was still sent, late, and counted as waited.
    s = result.summary
    assert s.overall.requests == 45 and s.overall.waited > 0
    assert s.overall.response.p95_ms > s.overall.service.p95_ms * 1.5


def test_bottleneck_detection_errors_and_saturated_generator() -> None:
    with LoopbackServer(error_rate=0.5, error_status=503) as failing:
        config = LoadTestConfig(url=failing.url, rps=50, duration_s=1)
        found = {b.component: b for b in judge(run_load_test(config), config).bottlenecks}
    assert found["error_handling"].severity in ("high", "critical")
    assert "http_503" in found["error_handling"].message

    async def blocks_the_loop() -> None:
        time.sleep(0.03)  # a target that hogs the generator's event loop

    config = LoadTestConfig(rps=50, duration_s=1.5, max_concurrency=50)
    result = run_load_test(config, target=blocks_the_loop)
    found = {b.component: b for b in detect(result.summary)}
    assert "load_generator" in found, [b.message for b in detect(result.summary)]
    assert result.summary.resources.loop_lag_ms_max is not None
    assert result.summary.resources.loop_lag_ms_max > 20


# --- resources -----------------------------------------------------------------------------


def test_resource_monitoring_integration(server: LoopbackServer) -> None:
    def burn() -> None:  # a CPU-bound sync callable: runs in the generator's thread pool
        end = time.perf_counter() + 0.004
        while time.perf_counter() < end:
            pass

    config = LoadTestConfig(rps=100, duration_s=2, max_concurrency=20, monitor_interval_s=0.25)
    result = run_load_test(config, target=burn)
    samples = result.resources
    assert 6 <= len(samples) <= 12
    assert all(0 <= x.cpu_pct <= 100 and 0 < x.mem_pct < 100 for x in samples)
    res = result.summary.resources
    assert res.proc_cpu_pct_max is not None and res.proc_cpu_pct_max > 15
    assert res.loop_lag_ms_max is not None
    assert res.gpu  # a GPU description, or why there is none (never a crash)
    assert {"cpu_pct", "proc_cpu_pct", "loop_lag_ms"} <= set(result.windows[0].resources)
    assert result.summary.overall.requests == 200 and result.summary.overall.errors == 0


# --- percentiles ---------------------------------------------------------------------------


def test_percentile_accuracy_merging_and_encoding() -> None:
    import random

    rng = random.Random(7)
    values = [rng.lognormvariate(math.log(0.02), 0.8) for _ in range(20_000)]
    windows = [new_histogram() for _ in range(10)]
    for i, v in enumerate(values):
        record_seconds(windows[i % 10] if i < 10_000 else windows[0], v)  # uneven windows
    merged = merge(decode(encode(h)) for h in windows)  # through the stored encoding
    exact = sorted(values)
    p = percentiles(merged)
    for q, got in ((50, p.p50_ms), (95, p.p95_ms), (99, p.p99_ms)):
        want = exact[math.ceil(q / 100 * len(exact)) - 1] * 1000
        assert got == pytest.approx(want, rel=2e-3), q  # 3 significant digits
    assert p.count == 20_000
    # Averaging per-window percentiles is not the merged percentile.
    mean_of_p99 = sum(percentiles(h).p99_ms or 0 for h in windows) / 10
    assert abs(mean_of_p99 - (p.p99_ms or 0)) > 0.01 * (p.p99_ms or 1)


def test_percentile_accuracy_against_the_server_side() -> None:
    """Client service-time percentiles vs the server's own, the server in its own process."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasks.load.loopback", "--delay-ms", "10", "50"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = json.loads(proc.stdout.readline())["url"]  # type: ignore[union-attr]
        config = LoadTestConfig(url=url, rps=100, duration_s=2, max_concurrency=50)
        result = run_load_test(config)
        from tasks.load.loopback import fetch_stats

        stats = fetch_stats(url)
    finally:
        proc.terminate()
        proc.wait(10)
    assert stats["requests"] == result.summary.overall.requests == 200
    server = percentiles(decode(stats["histogram"]))
    client = result.summary.overall.service
    # The client's excess over the server, in fixed bounds: a late event loop (the
    # generator's own defect to catch) must not widen them, as the loop lag it measured
    # once did. benchmarks/load_generator.py holds 1 ms + 1 % on a quiet machine; these
    # are generous bounds for a shared 2-core box (measured there: +1 to +2.2 ms at p50
    # and p90), much wider at p99, which two descheduled requests of 200 can move.
    slack_ms = {"p50_ms": 5.0, "p90_ms": 5.0, "p99_ms": 50.0}
    for q, slack in slack_ms.items():
        c, s = getattr(client, q), getattr(server, q)
        assert c >= s - 0.1, q  # the client cannot see less than the server spent
        assert c - s <= slack + 0.03 * s, (q, c, s, result.summary.resources.loop_lag_ms_max)


# --- throughput and concurrency ------------------------------------------------------------


def test_throughput_validation(server: LoopbackServer) -> None:
    config = _config(
        server,
        rps=300,
        duration_s=2,
        max_concurrency=100,
        thresholds=["rps>=291", "error_rate<0.001"],
    )
    result = run_load_test(config)
    s = result.summary
    assert s.overall.requests == 600 == server.stats().requests
    assert s.steady.achieved_rps >= 0.97 * 300
    assert judge(result, config).passed
    # achieved vs target per window, by actual send time
    for w in result.windows[:2]:
        assert w.sent == pytest.approx(w.target, rel=0.1)


def test_concurrent_requests_pool_sized_to_the_cap() -> None:
    # 120 rps x 1 s service time = 120 in flight: above the 100-connection default of both
    # httpx and aiohttp, so a pool not sized to the cap would queue inside the client.
    for client in ("aiohttp", "httpx"):
        with LoopbackServer(delay_ms=1000.0) as slow:
            config = LoadTestConfig(
                url=slow.url,
                rps=120,
                duration_s=1,
                max_concurrency=200,
                http_client=client,
                timeout_s=10,
            )
            result = run_load_test(config)
            stats = slow.stats()
        assert stats.requests == 120 == result.summary.overall.requests, client
        assert stats.max_concurrent > 105, (client, stats.max_concurrent)
        assert result.summary.overall.max_in_flight > 105
        assert result.summary.overall.errors == 0, result.summary.error_samples


def test_concurrency_cap_drops_are_counted() -> None:
    with LoopbackServer(delay_ms=300.0) as slow:
        config = LoadTestConfig(
            url=slow.url, rps=100, duration_s=1.5, max_concurrency=10, on_full="drop"
        )
        result = run_load_test(config)
        received = slow.stats().requests
    s = result.summary.overall
    assert s.dropped > 80 and s.requests + s.dropped == 150
    assert received == s.requests  # dropped requests were never sent
    assert s.max_in_flight == 10
    assert any(b.component == "concurrency" for b in detect(result.summary))


# --- errors and thresholds ----------------------------------------------------------------


def test_threshold_expressions() -> None:
    t = parse_threshold("p95<500ms")
    assert (t.kind, t.metric, t.op, t.value) == ("latency", "p95", "<", 500.0)
    assert parse_threshold("p(99)<=1s").value == 1000.0
    assert parse_threshold("p(99.9) < 250").metric == "p99.9"
    assert parse_threshold("service.p99<20ms").source == "service"
    assert parse_threshold("error_rate<0.05").value == 0.05
    assert parse_threshold("rate<1%").value == pytest.approx(0.01)
    assert parse_threshold("rps>=95").metric == "achieved_rps"
    assert parse_threshold("max<2000").value == 2000.0
    assert parse_threshold("avg<3us").value == pytest.approx(0.003)
    for bad in (
        "p95<<5",
        "p95",
        "latency<5",
        "error_rate<5ms",
        "p(0)<5",
        "rps>=5ms",
        "error_rate<2",
        "",
    ):
        with pytest.raises(ThresholdError):
            parse_threshold(bad)
    with pytest.raises(ValueError, match="thresholds"):
        LoadTestConfig(url="http://x", rps=1, duration_s=1, thresholds=["p95<<5"])


def test_error_classification(server: LoopbackServer) -> None:
    for query, kind in (
        ("?status=503", "http_503"),
        ("?close=1", "connection"),
        ("?hang=1", "timeout"),
    ):
        config = LoadTestConfig(url=server.url + query, rps=20, duration_s=0.5, timeout_s=0.3)
        s = run_load_test(config).summary.overall
        assert s.requests == 10 and s.error_kinds == {kind: 10}, (query, s.error_kinds)
        if kind == "timeout":  # timeouts stay in the latency data, at the timeout
            assert s.service.p50_ms == pytest.approx(300, abs=30)

    def raises() -> None:
        raise KeyError("boom")

    s = run_load_test(LoadTestConfig(rps=20, duration_s=0.5), target=raises).summary
    assert s.overall.error_kinds == {"exception": 10}
    assert "boom" in s.error_samples["exception"]


def test_error_rate_threshold_enforcement() -> None:
    with LoopbackServer(error_rate=0.2, seed=1) as flaky:
        config = LoadTestConfig(
            url=flaky.url, rps=100, duration_s=1, thresholds=["error_rate<0.05", "p99<1s"]
        )
        result = run_load_test(config)
        received = flaky.stats()
    verdict = judge(result, config)
    assert not verdict.passed
    assert [t.expr for t in verdict.breached] == ["error_rate<0.05"]
    # The generator's error count is the server's count of 500s.
    assert result.summary.overall.errors == received.statuses[500] > 5


def test_stress_recovery(server: LoopbackServer) -> None:
    """The server degrades for the middle second and recovers; so do the windows."""
    server.delay_ms = (1.0, 3.0)

    def stress() -> None:
        time.sleep(1.05)
        server.delay_ms, server.error_rate = 250.0, 0.3
        time.sleep(1.0)
        server.delay_ms, server.error_rate = (1.0, 3.0), 0.0

    threading.Thread(target=stress, daemon=True).start()
    config = _config(server, rps=50, duration_s=3, max_concurrency=50)
    result = run_load_test(config)
    w = result.windows
    assert w[1].errors > 0 and (percentiles(w[1].response).p50_ms or 0) > 100
    assert w[2].errors == 0 and (percentiles(w[2].response).p50_ms or 1e9) < 50
    assert result.summary.overall.requests == 150 == server.stats().requests


# --- reports ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ramp_run() -> Iterator[tuple[LoadTestResult, Verdict]]:
    """One ramp run with some errors, shared by the report tests."""
    with LoopbackServer(delay_ms=(1.0, 5.0), error_rate=0.05, seed=2) as srv:
        config = LoadTestConfig(
            url=srv.url, pattern="ramp", rps=60, duration_s=2, thresholds=["p95<1s"]
        )
        result = run_load_test(config)
        yield result, judge(result, config)


def _write(run: tuple[LoadTestResult, Verdict], path: Path) -> tuple[Path, Path]:
    result, verdict = run
    data = ReportData(
        result.summary, series(result.windows), verdict.thresholds, verdict.bottlenecks, run_id="r1"
    )
    return write_reports(data, path)


def test_full_performance_report(ramp_run: tuple[LoadTestResult, Verdict], tmp_path: Path) -> None:
    html_path, md_path = _write(ramp_run, tmp_path / "report.html")
    md = md_path.read_text()
    for heading in (
        "## Summary",
        "## Thresholds",
        "## Bottlenecks",
        "## Resources",
        "## Windows",
        "## Errors",
        "| steady |",
        "| warmup |",
        "`p95<1s`",
        "http_500",
    ):
        assert heading in md
    page = html_path.read_text()
    assert page.count('src="data:image/png;base64,') == 4
    assert '<meta name="viewport"' in page  # the reports' shared layout
    assert "<code>p95&lt;1s</code>" in page  # a threshold is text, escaped in its <code>
    assert "<script" not in page and "http-equiv" not in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # self-contained: no fetches


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium: apt-get install -y chromium")
def test_html_report_renders_in_headless_chromium(
    ramp_run: tuple[LoadTestResult, Verdict], tmp_path: Path
) -> None:
    html_path, _ = _write(ramp_run, tmp_path / "r.html")
    check = render_in_chromium(html_path, tmp_path)
    assert check["total"] == 4 and check["rendered"] == 4, check
    assert all(w > 300 for w in check["widths"])


# --- flows, the database and the CLI -------------------------------------------------------


@pytest.fixture
def flows_env(prefect_harness: None, use_database: str) -> str:
    """SQLite and the real PostgreSQL: the recording path runs on both."""
    return use_database


@pytest.fixture
def flows_sqlite(prefect_harness: None, sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """One database for the tests whose database path is the one above (time: each flow run
    costs seconds on a 2-core machine)."""
    monkeypatch.setenv("DSPYFLOW_DATABASE_URL", sqlite_url)
    return sqlite_url


def test_load_test_flow_records_and_remerges(flows_env: str, server: LoopbackServer) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.load_test import load_test
    from storage.repository import Repository
    from tasks.load.store import remerge

    outcome = load_test(
        _config(
            server, pattern="ramp", rps=60, duration_s=3, thresholds=["p95<2s", "error_rate<0.01"]
        )
    )
    assert outcome.passed
    run = Repository().get_load_test(outcome.run_id)
    assert (run.state, run.passed, run.pattern) == ("completed", True, "ramp")
    assert len(run.windows) >= 2 and all(w.response_hist for w in run.windows)
    assert Path(run.report_path or "").exists()
    # Percentiles re-merged from the stored windows equal the in-memory ones.
    again = remerge(run, "steady")
    steady = outcome.summary.steady
    assert again.requests == steady.requests
    assert again.response.p99_ms == steady.response.p99_ms
    assert again.service.p50_ms == steady.service.p50_ms
    assert remerge(outcome.run_id).requests == server.stats().requests
    # The results report draws this newest test's windows from the same stored histograms.
    from tasks.reports.results import collect

    drawn = collect(Repository()).load_windows
    assert drawn is not None and drawn.id == outcome.run_id
    assert len(drawn.windows) == len(run.windows)
    assert drawn.where == f"target {run.target}"
    stored_windows = sorted(run.windows, key=lambda w: w.window_index)
    for window, stored in zip(drawn.windows, stored_windows, strict=True):
        assert window["achieved_rate"] == stored.achieved_rate
        if stored.requests:
            assert 0 < window["p50_ms"] <= window["p95_ms"] <= window["p99_ms"]
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[f"load-test-{outcome.run_id[:12]}"])
            )
        )
    assert arts and "## Summary" in (arts[0].data or "")


def test_load_test_flow_fails_on_breach_after_recording(
    flows_sqlite: str, server: LoopbackServer
) -> None:
    from flows.load_test import load_test
    from storage.repository import Repository
    from tasks.load.steps import ThresholdsBreachedError

    state = load_test(
        _config(server, rps=20, duration_s=1, thresholds=["p99<1us"]), return_state=True
    )
    assert state.is_failed()
    err = state.result(raise_on_failure=False)
    assert isinstance(err, ThresholdsBreachedError)
    run = Repository().get_load_test(err.outcome.run_id)
    assert run.passed is False and run.state == "completed" and len(run.windows) >= 1
    assert run.thresholds and run.thresholds[0]["passed"] is False


def test_load_test_flow_rejects_bad_config_before_sending(
    prefect_harness: None, server: LoopbackServer
) -> None:
    from pydantic import ValidationError

    from flows.load_test import load_test

    cases = {
        "url": {"url": "ftp:/nowhere", "rps": 1, "duration_s": 1},
        "rps": {"url": server.url, "rps": 0, "duration_s": 1},
        "duration_s": {"url": server.url, "rps": 1, "duration_s": -1},
        "thresholds": {"url": server.url, "rps": 1, "duration_s": 1, "thresholds": ["p9x<"]},
    }
    for field, raw in cases.items():
        with pytest.raises(ValidationError) as info:
            LoadTestConfig(**raw)  # type: ignore[arg-type]
        assert info.value.errors()[0]["loc"][0] == field
        with pytest.raises(Exception, match=field):
            load_test(raw)  # type: ignore[arg-type]  # Prefect validates the parameter
    assert server.stats().requests == 0


def test_load_tiers_flow(flows_sqlite: str, server: LoopbackServer) -> None:
    from flows.load_test import DEFAULT_TIERS, Tier, load_tiers

    assert [(t.rps, t.max_concurrency, t.duration_s) for t in DEFAULT_TIERS] == [
        (10, 10, 2),
        (50, 30, 5),
        (100, 60, 10),
        (100, 60, 30),
    ]
    tiers = [
        Tier(name="low", rps=10, max_concurrency=10, duration_s=1),
        Tier(name="medium", rps=50, max_concurrency=30, duration_s=1),
    ]
    results = load_tiers(server.url, tiers=tiers)
    assert [(r.tier, r.passed) for r in results] == [("low", True), ("medium", True)]
    assert server.stats().requests == 60


def test_cli_loadtest_and_loadtests(flows_sqlite: str, server: LoopbackServer) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    runner = CliRunner()
    bad = runner.invoke(app, ["loadtest", "--url", "nope", "--rps", "5", "--duration", "1"])
    assert bad.exit_code == 2 and "url" in bad.output
    bad = runner.invoke(
        app,
        ["loadtest", "--url", server.url, "--rps", "5", "--duration", "1", "--threshold", "p95<<1"],
    )
    assert bad.exit_code == 2 and "threshold" in bad.output
    assert server.stats().requests == 0

    ok = runner.invoke(
        app,
        [
            "loadtest",
            "--url",
            server.url,
            "--rps",
            "20",
            "--duration",
            "1",
            "--max-concurrency",
            "5",
            "-t",
            "p95<2s",
            "--format",
            "json",
        ],
    )
    assert ok.exit_code == 0, ok.output
    payload = json.loads(ok.stdout[ok.stdout.index("{") :])
    assert payload["passed"] is True and payload["summary"]["overall"]["requests"] == 20

    breach = runner.invoke(
        app,
        [
            "loadtest",
            "--url",
            server.url,
            "--pattern",
            "wave",
            "--rps",
            "20",
            "--duration",
            "1",
            "-t",
            "max<1us",
        ],
    )
    assert breach.exit_code == 1 and "max<1us" in breach.output

    listed = runner.invoke(app, ["loadtests", "list", "--format", "json"])
    rows = json.loads(listed.stdout)
    assert listed.exit_code == 0 and len(rows) == 2
    shown = runner.invoke(app, ["loadtests", "show", payload["id"][:8], "--format", "json"])
    assert shown.exit_code == 0
    detail = json.loads(shown.stdout)
    assert detail["remerged_steady"]["requests"] == 20
    csv_out = runner.invoke(app, ["loadtests", "show", payload["id"], "--format", "csv"])
    assert csv_out.stdout.splitlines()[0].startswith("window,start_s,phase")
    missing = runner.invoke(app, ["loadtests", "show", "0" * 32])
    assert missing.exit_code == 2


def test_generator_runs_inside_a_running_event_loop(server: LoopbackServer) -> None:
    async def caller() -> int:
        # run_load_test from async code gets a loop of its own (a thread), not this one
        return run_load_test(_config(server, rps=20, duration_s=0.5)).summary.overall.requests

    assert asyncio.run(caller()) == 10


def test_dspy_program_target_loads_the_optimized_program(repo) -> None:  # type: ignore[no-untyped-def]
    """An optimized program stored by an optimization run, called in-process with an LM."""
    import dspy
    from dspy.utils import DummyLM

    from storage.models import RunState
    from tasks.load.targets import dspy_program_target
    from tasks.programs import get_task

    program = get_task("intent").build_program()
    program.classify.signature = program.classify.signature.with_instructions("Be terse.")
    run_id = repo.create_run(task="intent", optimizer="mipro", budget="light", lm="dummy", spec={})
    lease = repo.start_run(run_id)
    repo.finish_run(run_id, RunState.succeeded, lease=lease, program_state=program.dump_state())

    lm = DummyLM([{"intent": "check_balance"}] * 50)
    target = dspy_program_target(
        run_id, lm=lm, inputs=[{"text": "what is my balance?"}], repository=repo
    )
    result = run_load_test(LoadTestConfig(rps=20, duration_s=0.5, max_concurrency=4), target)
    s = result.summary.overall
    assert s.requests == 10 and s.errors == 0, result.summary.error_samples
    assert target.name.startswith("dspy:intent:")
    assert len(lm.history) == 10  # every request reached the LM, through dspy.context
    assert "Be terse." in str(lm.history[0]["messages"])  # the stored state was loaded
    assert dspy.settings.lm is None  # the global LM was never set
