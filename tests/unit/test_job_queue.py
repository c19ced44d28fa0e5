"""The job queue, the LM rate limiter and the jobs file, without Prefect or a database."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from tasks.batch.jobs import JobsFileError, capacity_jobs, load_jobs
from tasks.batch.queue import Backpressure, JobQueue, QueueClosedError, SubmitStatus, percentile
from tasks.lm.rate_limit import TokenBucketLimiter


class FakeClock:
    """A clock the test advances; `sleep` advances it too (the limiter's sleeps)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_priority_order_and_fifo_within_a_priority() -> None:
    q: JobQueue[str] = JobQueue(capacity=100)
    for job_id, prio in [("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", 9), ("f", -1)]:
        assert q.submit(job_id, job_id, prio).status is SubmitStatus.accepted
    q.close()
    order = []
    while (job := q.take(timeout=1)) is not None:
        order.append(job.job_id)
        q.done(job.job_id)
    assert order == ["e", "b", "d", "a", "c", "f"]


def test_backpressure_refuses_at_90_percent_with_a_reason() -> None:
    q: JobQueue[int] = JobQueue(capacity=100)
    results = [q.submit(f"j{i}", i) for i in range(95)]
    accepted = [r for r in results if r.status is SubmitStatus.accepted]
    refused = [r for r in results if r.status is SubmitStatus.refused]
    assert len(accepted) == 90 and len(refused) == 5  # refusals start *at* 90 %
    assert all(r.reason and "90/100" in r.reason and "refused" in r.reason for r in refused)
    assert q.metrics().refused == 5 and q.depth == 90
    # Room again below the mark: a new submission is accepted.
    job = q.take(timeout=1)
    assert job is not None
    assert q.submit("late", 0).status is SubmitStatus.accepted


def test_backpressure_defer_parks_jobs_and_admits_them_in_priority_order() -> None:
    q: JobQueue[int] = JobQueue(capacity=10, backpressure=Backpressure.defer, max_concurrent=1)
    statuses = [q.submit(f"j{i}", i, priority=i).status for i in range(12)]
    assert statuses.count(SubmitStatus.accepted) == 9
    assert statuses.count(SubmitStatus.deferred) == 3
    assert q.metrics().deferred == 3
    q.close()
    taken = []
    while (job := q.take(timeout=1)) is not None:
        taken.append(job.item)
        q.done(job.job_id)
    # Nothing dropped; deferred jobs (9, 10, 11) came in after the queued ones drained
    # below the mark, highest priority first among what was queued at each take.
    assert sorted(taken) == list(range(12))
    assert taken[0] == 8 and set(taken[1:4]) >= {11}
    assert q.metrics().completed == 12


def test_submit_after_close_raises() -> None:
    q: JobQueue[int] = JobQueue(capacity=5)
    q.close()
    with pytest.raises(QueueClosedError):
        q.submit("x", 1)


def test_concurrency_cap_blocks_take_until_done() -> None:
    q: JobQueue[int] = JobQueue(capacity=10, max_concurrent=2)
    for i in range(3):
        q.submit(f"j{i}", i)
    first, second = q.take(timeout=1), q.take(timeout=1)
    assert first is not None and second is not None
    assert q.take(timeout=0.05) is None  # two in flight: the cap holds
    threading.Timer(0.05, q.done, args=(first.job_id,)).start()
    third = q.take(timeout=2)
    assert third is not None and third.job_id == "j2"
    m = q.metrics()
    assert m.max_in_flight == 2 and m.in_flight == 2 and m.utilization == 1.0


def test_metrics_wait_and_run_percentiles() -> None:
    clock = FakeClock()
    q: JobQueue[int] = JobQueue(capacity=100, max_concurrent=1, clock=clock)
    for i in range(10):
        q.submit(f"j{i}", i)
    for i in range(10):
        job = q.take(timeout=0)
        assert job is not None and job.waited_s == pytest.approx(2.0 * i)
        clock.now += 2.0
        q.done(job.job_id)
    m = q.metrics()
    assert m.wait_p50_s == pytest.approx(8.0) and m.wait_p95_s == pytest.approx(18.0)
    assert m.run_p50_s == pytest.approx(2.0) and m.completed == 10 and m.depth == 0


@pytest.mark.parametrize("bad", [{"capacity": 0}, {"max_concurrent": 0}, {"capacity": -5}])
def test_queue_rejects_non_positive_sizes(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        JobQueue(**bad)  # type: ignore[arg-type]


def test_percentile_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(range(1, 101), 95) == 95


def test_token_bucket_requests_per_second() -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(requests_per_s=10, clock=clock, sleep=clock.sleep)
    start = clock.now
    for _ in range(51):
        limiter.acquire()
    # The first call is free (burst 1), then one every 100 ms.
    assert clock.now - start == pytest.approx(5.0)
    m = limiter.metrics()
    assert m.calls == 51 and m.waited_calls == 50 and m.wait_max_s == pytest.approx(0.1)


def test_token_bucket_tokens_per_minute() -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(tokens_per_min=6000, clock=clock, sleep=clock.sleep)
    start = clock.now
    for _ in range(10):
        limiter.acquire(tokens=500)  # 100 tokens/s: each call needs 5 s of refill
    # Burst: one second of tokens (100). A full bucket lets a bigger request through and
    # goes into debt (-400): each next call waits until the bucket is full again (5 s).
    assert clock.now - start == pytest.approx(9 * 5.0)
    assert limiter.metrics().tokens == 5000


def test_token_bucket_is_shared_by_threads_without_exceeding_the_rate() -> None:
    limiter = TokenBucketLimiter(requests_per_s=200)
    stamps: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(25):
            limiter.acquire()
            with lock:
                stamps.append(time.monotonic())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stamps.sort()
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    assert len(stamps) == 200 and rate <= 200 * 1.05


@pytest.mark.parametrize("bad", [{"requests_per_s": 0}, {"tokens_per_min": -1}, {"burst": 0.5}])
def test_token_bucket_rejects_bad_settings(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        TokenBucketLimiter(**bad)  # type: ignore[arg-type]


def test_batch_options_reject_non_positive_workers_and_capacity() -> None:
    from tasks.batch.models import BatchOptions

    for field in ("workers", "capacity", "max_concurrent"):
        with pytest.raises(ValidationError, match=field):
            BatchOptions(**{field: 0})
    with pytest.raises(ValidationError, match="prefect_rate_limit"):
        BatchOptions(task_runner="dask", lm_rps=5)


def _write_jobs(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jobs_file_lists_every_bad_line_and_rejects_the_file(tmp_path: Path) -> None:
    good = json.dumps({"task": "intent", "optimizer": "capacity", "lm": {"model": "sim"}})
    path = _write_jobs(
        tmp_path / "jobs.jsonl",
        [
            good,
            '{"task": "intent", ',  # 2: truncated JSON
            "",  # blank lines are fine
            json.dumps({"task": "translation", "lm": {"model": "sim"}}),  # 4: unknown task
            json.dumps({"task": "intent", "workers": 3}),  # 5: unknown field
            "[1, 2]",  # 6: not an object
            good,
        ],
    )
    with pytest.raises(JobsFileError) as info:
        load_jobs(path)
    assert [r.line for r in info.value.rejected] == [2, 4, 5, 6]
    message = str(info.value)
    assert "line 2: invalid JSON" in message and "nothing was run" in message
    assert "line 4: unknown task 'translation'" in message
    assert "line 5: workers" in message and "line 6: expected a JSON object" in message

    loaded = load_jobs(path, skip_invalid=True)
    assert loaded.lines == [1, 7] and len(loaded.jobs) == 2
    assert [r.line for r in loaded.rejected] == [2, 4, 5, 6]


def test_jobs_file_empty_or_missing(tmp_path: Path) -> None:
    with pytest.raises(JobsFileError, match="no jobs"):
        load_jobs(_write_jobs(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(JobsFileError, match="cannot read"):
        load_jobs(tmp_path / "missing.jsonl")


def test_capacity_jobs_make_the_requested_lm_calls() -> None:
    jobs = capacity_jobs(6, lm_calls=10, priorities=(0, 2))
    assert [j.priority for j in jobs] == [0, 2, 0, 2, 0, 2]
    assert {(j.max_test, j.max_val, j.optimizer) for j in jobs} == {(2, 3, "capacity")}
    assert len({j.lm.seed for j in jobs}) == 6
    with pytest.raises(ValueError, match="even"):
        capacity_jobs(1, lm_calls=7)
    with pytest.raises(ValueError, match="count"):
        capacity_jobs(0)


def test_drain_returns_the_jobs_not_taken_and_join_waits_only_for_those_in_flight() -> None:
    queue: JobQueue[str] = JobQueue(10, max_concurrent=1, backpressure=Backpressure.defer)
    queue.limit = 2  # jobs 2 and 3 are deferred
    for i in range(4):
        queue.submit(f"job-{i}", "spec", priority=i)
    taken = queue.take()
    assert taken is not None and taken.job_id == "job-1"
    assert sorted(queue.drain()) == ["job-0", "job-2", "job-3"]
    assert queue.running_ids() == ["job-1"]
    assert queue.take(timeout=0.1) is None
    assert queue.join(timeout=0.1) is False  # job-1 is still in flight
    queue.done("job-1")
    assert queue.join(timeout=1.0) is True
