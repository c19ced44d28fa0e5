"""GPU acceleration scenarios of the seed report, each asserting what it names.

Everything runs on the CPU here (quick, small sizes); the `cuda` variants and the tests
marked `gpu` run only where torch sees a GPU. Timing assertions are generous floors or
ratios: a shared 2-core machine is noisy.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from gpu import benchmark as bench
from gpu import device as devmod
from gpu import memory as mem
from gpu import tensor_ops as ops

pytestmark = pytest.mark.performance

HAS_CUDA = torch.cuda.is_available()
needs_gpu = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA/ROCm GPU; none visible to torch"),
]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=needs_gpu)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Max abs error vs float64 for O(1) outputs (cosine, unit rows) by input dtype.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
REPO_ROOT = Path(__file__).resolve().parents[2]


def rand(*shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def np_unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def np_topk_cosine(q: np.ndarray, db: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = np_unit(q) @ np_unit(db).T
    idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, idx, axis=1), scores


# --- availability and devices ---------------------------------------------------------


def test_gpu_availability_detection() -> None:
    devices = devmod.available_devices()
    assert devices[-1] == "cpu"
    assert devmod.cuda_available() == torch.cuda.is_available()
    assert any(d.startswith("cuda") for d in devices) == torch.cuda.is_available()
    backend = devmod.gpu_backend()
    auto = devmod.resolve_device("auto")
    if backend is None:
        assert auto == torch.device("cpu")
    else:
        assert auto.type in ("cuda", "mps")
        assert backend in (devmod.Backend.cuda, devmod.Backend.rocm, devmod.Backend.mps)
        assert (backend is devmod.Backend.rocm) == (torch.version.hip is not None)
    info = devmod.device_info("cpu")
    assert info.backend is devmod.Backend.cpu and info.device == "cpu"
    assert info.name and info.total_memory_bytes and info.total_memory_bytes > 0
    assert info.free_memory_bytes is not None and info.torch_version == torch.__version__
    assert devmod.DeviceInfo.model_validate_json(info.model_dump_json()) == info


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA/ROCm GPU; none visible to torch")
def test_gpu_device_facts() -> None:
    info = devmod.device_info("cuda")
    assert info.device.startswith("cuda:") and info.total_memory_bytes
    assert 0 < (info.free_memory_bytes or 0) <= info.total_memory_bytes
    assert info.compute_capability and info.multiprocessors
    assert info.runtime_version


@pytest.mark.parametrize("device", DEVICES)
def test_device_switching(device: str) -> None:
    manager = devmod.DeviceManager("cpu")
    x = rand(16, 8)
    with manager.use(device) as dev:
        assert manager.device == dev and dev.type == device
        moved = manager.to(x)
        assert moved.device.type == device
        result = ops.matmul(moved, moved.T)
        manager.synchronize()
    assert manager.device == torch.device("cpu")  # switched back after the block
    np.testing.assert_allclose(f64(result), f64(x) @ f64(x).T, atol=1e-4)
    # A failed switch leaves the current device as it was.
    with pytest.raises(devmod.DeviceUnavailableError):
        manager.switch("cuda:99")
    assert manager.device == torch.device("cpu")
    tolerant = devmod.DeviceManager("cpu", fallback=True)
    assert tolerant.switch("cuda:99") == torch.device("cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_synchronization(device: str) -> None:
    dev = devmod.resolve_device(device)
    a = rand(512, 512, device=device)
    out = a @ a
    devmod.synchronize(dev)
    devmod.synchronize()  # all devices: must not raise on a CPU-only machine either
    if dev.type == "cuda":
        done = torch.cuda.Event()
        done.record()
        devmod.synchronize(dev)
        assert done.query(), "work still pending after synchronize()"
    timer = bench.Timer(dev)
    assert timer.once(lambda: a @ a) > 0
    assert torch.isfinite(out).all()


# --- ops against float64 numpy --------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matrix_multiplication(device: str, dtype: torch.dtype) -> None:
    a, b = (
        rand(96, 64, dtype=dtype, device=device),
        rand(64, 80, dtype=dtype, device=device, seed=1),
    )
    out = ops.matmul(a, b)
    assert out.dtype == dtype and out.shape == (96, 80) and out.device.type == device
    ref = f64(a) @ f64(b)
    np.testing.assert_allclose(f64(out), ref, atol=TOL[dtype] * 8 * 8, rtol=TOL[dtype] * 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_distance_computation(device: str, dtype: torch.dtype) -> None:
    x, y = (
        rand(70, 48, dtype=dtype, device=device),
        rand(50, 48, dtype=dtype, device=device, seed=1),
    )
    xd, yd = f64(x), f64(y)
    ref = np.sqrt(((xd[:, None, :] - yd[None, :, :]) ** 2).sum(-1))
    # Distances are ~10 here; half precision keeps ~3 significant digits.
    np.testing.assert_allclose(f64(ops.pairwise_l2(x, y)), ref, rtol=TOL[dtype] * 3, atol=1e-3)
    np.testing.assert_allclose(
        f64(ops.pairwise_distances(x, y, "sqeuclidean")), ref**2, rtol=TOL[dtype] * 6, atol=1e-2
    )
    cos_ref = 1 - np_unit(xd) @ np_unit(yd).T
    np.testing.assert_allclose(
        f64(ops.pairwise_distances(x, y, "cosine")), cos_ref, atol=TOL[dtype] * 2
    )
    # Row-blocked output (the GPU default, 16 MB blocks) gives the same distances.
    torch.testing.assert_close(ops.pairwise_l2(x, y, block_bytes=4 * 50 * 7), ops.pairwise_l2(x, y))
    self_d = ops.pairwise_l2(x)
    assert (f64(self_d) >= 0).all()  # clamped: rounding never yields a negative distance
    assert np.abs(np.diag(f64(self_d))).max() < (0.05 if dtype == torch.float32 else 0.6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vector_normalization(device: str, dtype: torch.dtype) -> None:
    x = rand(300, 384, dtype=dtype, device=device) * 20  # |v| > 13: fp16 squares overflow
    x[7] = 0
    out = ops.normalize_rows(x)
    assert out.dtype == dtype and out.shape == x.shape
    np.testing.assert_allclose(f64(out), np_unit(f64(x)), atol=TOL[dtype])
    assert torch.all(out[7] == 0), "a zero row stays zero (eps guards the division)"
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(
        f64(ops.row_norms(x))[:7], np.linalg.norm(f64(x), axis=1)[:7], rtol=TOL[dtype] * 2
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cosine_similarity(device: str, dtype: torch.dtype) -> None:
    x, y = (
        rand(40, 32, dtype=dtype, device=device),
        rand(30, 32, dtype=dtype, device=device, seed=2),
    )
    sim = ops.cosine_similarity(x, y)
    assert sim.shape == (40, 30)
    np.testing.assert_allclose(f64(sim), np_unit(f64(x)) @ np_unit(f64(y)).T, atol=TOL[dtype] * 2)
    self_sim = f64(ops.cosine_similarity(x))
    np.testing.assert_allclose(np.diag(self_sim), 1.0, atol=TOL[dtype] * 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensor_operation_correctness_topk(device: str, dtype: torch.dtype) -> None:
    q, db = (
        rand(33, 64, dtype=dtype, device=device),
        rand(3000, 64, dtype=dtype, device=device, seed=3),
    )
    ref_vals, scores = np_topk_cosine(f64(q), f64(db), 9)
    for kwargs in (
        {},
        {"max_bytes": 150_000},
        {"chunk_rows": 257},
        {"selection": "grouped"},
        {"selection": "grouped", "chunk_rows": 1500},  # 2 chunks, each with a ragged tail
        {"selection": "topk", "chunk_rows": 1000},
    ):
        res = ops.topk_cosine_search(q, db, 9, **kwargs)
        assert res.values.shape == (33, 9) and res.indices.dtype == torch.int64
        assert res.values.dtype == dtype
        np.testing.assert_allclose(
            f64(res.values), ref_vals, atol=TOL[dtype] * 2, err_msg=str(kwargs)
        )
        # The returned rows really have those scores (robust to ties between rows).
        got = np.take_along_axis(scores, res.indices.cpu().numpy(), axis=1)
        np.testing.assert_allclose(got, ref_vals, atol=TOL[dtype] * 4, err_msg=str(kwargs))
        assert (np.diff(f64(res.values), axis=1) <= 1e-6).all(), "best first"
    # A pre-normalized database (an index) gives the same answer without per-chunk copies.
    vals, _ = ops.topk_cosine(q, ops.normalize_rows(db), 9, normalized=True)
    np.testing.assert_allclose(f64(vals), ref_vals, atol=TOL[dtype] * 2)


def test_topk_stays_under_byte_budget_without_full_score_matrix() -> None:
    q, db = rand(64, 128), rand(8_000, 128, seed=4)
    full_scores = 64 * 8_000 * 4
    budget = full_scores // 8
    with mem.track_tensor_allocations() as tracker:
        res = ops.topk_cosine_search(q, db, 5, max_bytes=budget)
    assert res.chunks >= 8
    assert tracker.largest_bytes < full_scores / 4, tracker.largest_shape
    assert tracker.peak_bytes <= budget, (tracker.peak_bytes, budget)
    assert res.planned_extra_bytes <= budget
    ref_vals, _ = np_topk_cosine(f64(q), f64(db), 5)
    np.testing.assert_allclose(f64(res.values), ref_vals, atol=1e-5)


# --- memory ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_memory_usage_tracking(device: str) -> None:
    mem.reset_peak(device)
    before = mem.memory_stats(device)
    assert before.current_bytes > 0 or device == "cuda"
    big = torch.ones(16 * 1024**2, device=device)  # 64 MB, touched (not lazily mapped)
    during = mem.memory_stats(device)
    assert during.current_bytes - before.current_bytes >= 48 * 1024**2
    assert during.peak_bytes >= during.current_bytes
    del big
    with mem.track_tensor_allocations() as tracker:
        a = torch.zeros(1024, 1024, device=device)  # 4 MB
        b = a + 1
        del b
    assert tracker.peak_bytes >= 2 * 4 * 1024**2 and tracker.largest_bytes == 4 * 1024**2
    assert tracker.current_bytes <= 4 * 1024**2  # `b` was released, `a` lives on
    del a


@pytest.mark.parametrize("device", DEVICES)
def test_memory_cleanup(device: str) -> None:
    mem.cleanup(device)
    base = mem.memory_stats(device)
    big = torch.ones(32 * 1024**2, device=device)  # 128 MB
    grown = mem.memory_stats(device)
    assert grown.current_bytes >= base.current_bytes + 96 * 1024**2
    del big
    released = mem.cleanup(device)
    after = mem.memory_stats(device)
    assert released >= 0
    assert after.current_bytes <= base.current_bytes + 32 * 1024**2
    if device == "cuda":
        assert (after.reserved_bytes or 0) <= (grown.reserved_bytes or 0) - 96 * 1024**2


def test_memory_pressure_handling_halves_chunks_and_stays_correct(caplog) -> None:
    q, db = rand(16, 32), rand(4000, 32, seed=5)
    plan = ops.plan_topk(
        16, 4000, 32, 4, dtype=torch.float32, device=torch.device("cpu"), normalized=False
    )
    assert plan.chunk_rows == 4000  # the budget alone would take the whole database at once
    # A simulated device that OOMs on any chunk above 600 rows: 4000 -> 2000 -> 1000 -> 500.
    fault = mem.SimulatedMemoryBudget(budget_bytes=600 * 16 * 4, bytes_per_item=16 * 4)
    with caplog.at_level(logging.WARNING, logger="dspyflow.gpu.memory"):
        res = ops.topk_cosine_search(q, db, 4, fault=fault)
    assert res.halvings == 3 and fault.raised == 3
    assert res.chunk_rows == 4000 and res.final_chunk_rows == 500 and res.chunks == 8
    assert sum("halving" in r.getMessage() for r in caplog.records) == 3
    ref_vals, _ = np_topk_cosine(f64(q), f64(db), 4)
    np.testing.assert_allclose(f64(res.values), ref_vals, atol=1e-5)


def test_run_chunked_covers_every_item_once_and_gives_up_clearly() -> None:
    seen: list[int] = []
    run = mem.run_chunked(
        lambda a, b: seen.extend(range(a, b)) or (b - a),
        1000,
        512,
        fault=mem.SimulatedMemoryBudget(100, 1),
    )
    assert seen == list(range(1000)) and sum(run.outputs) == 1000
    assert run.halvings == 3 and run.final_chunk == 64 and run.initial_chunk == 512

    def always_oom(a: int, b: int) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory (test)")

    with pytest.raises(mem.MemoryPressureError, match="smallest chunk"):
        mem.run_chunked(always_oom, 100, 64, min_chunk=8)


# --- benchmarks -----------------------------------------------------------------------


def test_comprehensive_benchmark_suite_cpu(sqlite_url: str) -> None:
    cfg = bench.BenchmarkConfig(device="cpu", sizes="small", warmup=0, reps=2, scale=0.5)
    result = bench.run_suite(cfg)
    keys = {r.case.key for r in result.results}
    assert {
        "matmul.fp32",
        "normalize.fp32",
        "pairwise_l2.fp32",
        "cosine_similarity.fp32",
        "topk_cosine.fp32",
        "topk_cosine.fp16",
    } <= keys
    for r in result.results:
        assert r.ours.median_ms > 0 and r.torch.median_ms > 0 and len(r.ours.samples_ms) == 2
        pairs = [o / t for o, t in zip(r.ours.samples_ms, r.torch.samples_ms, strict=True)]
        assert min(pairs) <= r.ratio_vs_torch <= max(pairs)
        assert r.meets_target == (r.ratio_vs_torch <= bench.CPU_RATIO_TARGET)
        assert r.gbps > 0 and r.tflops > 0 and r.pct_of_peak > 0
        tol = 1e-3 if r.case.dtype == "float32" else 2e-2
        assert r.max_abs_err < tol * (100 if r.case.op == "matmul" else 1), r.case.key
        assert r.extra_bytes is not None and r.extra_bytes > 0
        assert r.speedup_vs_cpu is None and r.ours.timer == "perf_counter" and not r.ours.cold
    top = next(r for r in result.results if r.case.key == "topk_cosine.fp32")
    assert top.case.shape == {"q": 32, "n": 5_000, "d": 384}
    assert top.torch_extra_bytes >= 32 * 5_000 * 4  # plain torch builds the q x N scores
    assert top.extra_bytes <= ops.DEFAULT_MAX_BYTES
    assert result.peak.copy_gbps > 0 and result.peak.matmul_tflops["float32"] > 0
    assert len(result.env_fingerprint) == 16
    json.dumps(result.summary())  # the script's last line must serialize

    rows = list(result.to_rows())
    assert len({r["metric"] for r in rows}) == len(rows)
    from storage.db import get_engine
    from storage.repository import Repository

    repo = Repository(get_engine(sqlite_url))
    assert repo.add_benchmark_results(rows) == len(rows)
    stored = repo.list_benchmark_results(session_id=result.session_id)
    assert len(stored) == len(rows)
    ms = [s for s in stored if s.metric == "gpu.topk_cosine.fp32.32x5000x384.cpu.ms"]
    assert ms and ms[0].samples and ms[0].env_fingerprint == result.env_fingerprint
    assert ms[0].unit == "ms" and ms[0].params["op"] == "topk_cosine"


def test_environment_fingerprint_is_stable_and_ignores_the_commit() -> None:
    env = bench.environment(devmod.device_info("cpu"))
    assert {"device_name", "driver", "torch_version", "cpu_model", "git_commit"} <= env.keys()
    fp = bench.fingerprint(env)
    assert fp == bench.fingerprint(dict(env)) and len(fp) == 16
    assert bench.fingerprint({**env, "git_commit": "0" * 40}) == fp
    assert bench.fingerprint({**env, "torch_version": "0.0"}) != fp


@pytest.fixture
def one_thread():
    """Timing comparisons on one thread: on a busy 2-core machine, OpenMP barriers wait for
    the other core's time slice and add milliseconds of noise to every parallel op."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_scaling_with_matrix_size(one_thread: None) -> None:
    timer = bench.Timer(torch.device("cpu"))
    times = {}
    for n in (128, 512):
        a, b = rand(n, n), rand(n, n, seed=1)
        # min, not median: noise on a shared machine only ever adds time.
        times[n] = timer.measure(lambda a=a, b=b: ops.matmul(a, b), warmup=1, reps=5).min_ms
    # 64x the FLOPs; allow a lot for BLAS efficiency gains and noise, but it must grow.
    assert times[512] > 4 * times[128], times


def test_warmup_effect_measurement() -> None:
    calls = {"n": 0}

    def lazily_initialised() -> None:
        calls["n"] += 1
        if calls["n"] == 1:  # a one-off cost, as a CUDA context, cuBLAS handle or JIT build
            torch.ones(256, 256) @ torch.ones(256, 256)
            import time

            time.sleep(0.05)

    timer = bench.Timer(torch.device("cpu"))
    t = timer.measure(lazily_initialised, warmup=2, reps=5)
    assert calls["n"] == 1 + 2 + 5  # first call, warm-up, repetitions
    assert t.first_call_ms is not None and t.first_call_ms >= 50
    assert len(t.samples_ms) == 5 and t.median_ms < 25, "warm-up kept out of the samples"
    assert t.q1_ms <= t.median_ms <= t.q3_ms and t.iqr_ms >= 0
    # A real op: the warm figure is recorded next to the first call for comparison.
    x = rand(4096, 384)
    real = timer.measure(lambda: ops.normalize_rows(x), warmup=2, reps=5)
    assert real.first_call_ms and real.first_call_ms > 0 and real.min_ms > 0


def test_batch_operation_efficiency(one_thread: None) -> None:
    q, db = rand(16, 384), ops.normalize_rows(rand(5_000, 384, seed=6))
    timer = bench.Timer(torch.device("cpu"))
    batched = timer.measure(lambda: ops.topk_cosine(q, db, 5, normalized=True), warmup=1, reps=3)
    single = timer.measure(
        lambda: [ops.topk_cosine(q[i : i + 1], db, 5, normalized=True) for i in range(16)],
        warmup=1,
        reps=3,
    )
    # One pass over the database instead of 16: at least 1.5x faster (usually ~5x).
    assert batched.min_ms * 1.5 < single.min_ms, (batched.min_ms, single.min_ms)
    b_vals, b_idx = ops.topk_cosine(q, db, 5, normalized=True)
    for i in (0, 7, 15):
        s_vals, s_idx = ops.topk_cosine(q[i : i + 1], db, 5, normalized=True)
        torch.testing.assert_close(s_vals[0], b_vals[i])


# --- bad input ------------------------------------------------------------------------


def test_bad_input_is_rejected_with_clear_errors() -> None:
    a, b = rand(4, 8), rand(5, 6)
    with pytest.raises(ValueError, match=r"\(4, 8\).*\(5, 6\)"):
        ops.pairwise_l2(a, b)
    with pytest.raises(ValueError, match="inner dimensions"):
        ops.matmul(a, b)
    with pytest.raises(TypeError, match="float32 and torch.float16"):
        ops.cosine_similarity(a, rand(3, 8).half())
    with pytest.raises(TypeError, match="int64"):
        ops.normalize_rows(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        ops.normalize_rows([[1.0, 2.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2-D"):
        ops.normalize_rows(torch.ones(3))
    with pytest.raises(ValueError, match="empty"):
        ops.topk_cosine(torch.ones(0, 8), rand(10, 8), 1)
    with pytest.raises(ValueError, match="empty"):
        ops.normalize_rows(torch.ones(5, 0))
    with pytest.raises(ValueError, match=r"k=11 is larger than the database \(10 rows\)"):
        ops.topk_cosine(rand(2, 8), rand(10, 8), 11)
    with pytest.raises(ValueError, match="k must be positive"):
        ops.topk_cosine(rand(2, 8), rand(10, 8), 0)
    with pytest.raises(TypeError, match="k must be an int"):
        ops.topk_cosine(rand(2, 8), rand(10, 8), 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="too small"):
        ops.topk_cosine(rand(2, 8), rand(10, 8), 2, max_bytes=16)
    with pytest.raises(ValueError, match="unknown metric"):
        ops.pairwise_distances(a, a, "manhattan")  # type: ignore[arg-type]


def test_absent_device_with_and_without_fallback() -> None:
    absent = "cuda:99" if HAS_CUDA else "cuda"
    with pytest.raises(devmod.DeviceUnavailableError) as info:
        devmod.resolve_device(absent)
    message = str(info.value)
    assert absent in message and "available: " in message and "cpu" in message
    assert isinstance(info.value, ValueError)
    assert devmod.resolve_device(absent, fallback=True) == torch.device("cpu")
    if not devmod.mps_available():
        with pytest.raises(devmod.DeviceUnavailableError, match="'mps'"):
            devmod.resolve_device("mps")
    with pytest.raises(devmod.DeviceUnavailableError, match="unknown device 'tpu'"):
        devmod.resolve_device("tpu")
    with pytest.raises(devmod.DeviceUnavailableError):
        bench.run_suite(device=absent, sizes="small")
    assert devmod.resolve_device(" CPU ") == torch.device("cpu")


# --- the fused Triton kernel (GPU, or Triton's CPU interpreter when Triton is installed) --


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _has_triton(), reason="Triton is not installed (CUDA builds ship it)")
def test_triton_kernels_in_interpreter() -> None:
    """The fused normalization and the fused group-max top-k, run by Triton's interpreter."""
    script = textwrap.dedent(
        """
        import numpy as np, torch, torch.nn.functional as F
        from gpu import benchmark as bench, tensor_ops as ops
        from gpu.memory import SimulatedMemoryBudget
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            x = (torch.randn(37, 384) * 20).to(dt)
            x[3] = 0
            y = ops._normalize_rows_triton(x, 1e-12)
            assert y.dtype == dt
            err = (y.float() - F.normalize(x.float())).abs().max().item()
            assert err < {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dt], err
        for dt in (torch.float16, torch.bfloat16):
            q = torch.randn(37, 64).to(dt)  # ragged: neither 37 nor 3001 fills a block
            db = ops.normalize_rows(torch.randn(3001, 64).to(dt))
            qn = F.normalize(q.double(), dim=1).numpy()
            scores = qn @ db.double().numpy().T
            ref = -np.sort(-scores, axis=1)[:, :9]
            for kw in ({}, {"chunk_rows": 1000}, {"fault": SimulatedMemoryBudget(1500, 1)}):
                res = ops.topk_cosine_search(q, db, 9, normalized=True, selection="fused", **kw)
                assert res.selection == "fused"
                got = np.take_along_axis(scores, res.indices.numpy(), axis=1)
                assert np.abs(got - ref).max() < 1e-6, (dt, kw)  # the exact rows
                assert np.abs(res.values.double().numpy() - ref).max() < 2e-2, (dt, kw)
        case = bench.OpCase(op="topk_cosine", dtype="float16", shape={"q": 20, "n": 700, "d": 32},
                            k=5, variant="fused")
        b = bench._Bench(case, torch.device("cpu"), 0)
        assert b.max_abs_error(b.ours()) < 1e-2
        print("ok")
        """
    )
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


# --- GPU only -------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA/ROCm GPU; none visible to torch")
@pytest.mark.skipif(not _has_triton(), reason="the fused top-k kernel needs Triton")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_fused_topk_matches_grouped(dtype: torch.dtype) -> None:
    q = rand(300, 384, dtype=dtype, device="cuda")
    db = ops.normalize_rows(rand(100_003, 384, dtype=dtype, device="cuda", seed=8))
    fused = ops.topk_cosine_search(q, db, 10, normalized=True, selection="fused")
    grouped = ops.topk_cosine_search(q, db, 10, normalized=True, selection="grouped")
    assert fused.selection == "fused" and grouped.selection == "grouped"
    torch.testing.assert_close(fused.values.float(), grouped.values.float(), atol=1e-2, rtol=0)
    exact = ops.normalize_rows(q).float() @ db.float().T  # (300, 100003): fine at this size
    ref = torch.topk(exact, 10).values
    got = torch.gather(exact, 1, fused.indices)
    torch.testing.assert_close(got.sort(dim=1, descending=True).values, ref, atol=2e-3, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA/ROCm GPU; none visible to torch")
def test_gpu_topk_extra_memory_under_budget() -> None:
    q = rand(1024, 384, dtype=torch.float16, device="cuda")
    db = ops.normalize_rows(rand(200_000, 384, dtype=torch.float16, device="cuda", seed=7))
    budget = 64 * 1024**2  # the full score matrix would be 400 MB
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    res = ops.topk_cosine_search(q, db, 10, normalized=True, max_bytes=budget)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= budget, (extra, budget)
    ref, _ = torch.topk((ops.normalize_rows(q[:64]).float() @ db.float().T), 10)
    torch.testing.assert_close(res.values[:64].float(), ref, atol=2e-3, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA/ROCm GPU; none visible to torch")
def test_gpu_faster_than_cpu_and_warmup_visible() -> None:
    result = bench.run_suite(device="cuda", sizes="small", warmup=2, reps=5, ops=["matmul"])
    r = result.results[0]
    assert r.ours.cold and r.ours.timer == "cuda-events"
    assert r.speedup_vs_cpu is not None and r.speedup_vs_cpu > 2, r.speedup_vs_cpu
    assert r.extra_bytes and r.extra_bytes >= 1024 * 1024 * 4
    timer = bench.Timer(torch.device("cuda"))
    x = rand(3000, 200, device="cuda")  # a new shape: the first call compiles/launches cold
    t = timer.measure(lambda: ops.normalize_rows(x), warmup=3, reps=10)
    assert t.median_ms < t.first_call_ms
