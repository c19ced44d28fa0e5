"""Timing on one device, and the ceilings figures are judged against.

- GPU: CUDA events around each repetition, after a warm-up; before every repetition a
  256 MB buffer is zeroed so each one starts with a cold L2 (reported as `cold`).
- CPU (and MPS): perf_counter around each synchronized call.
- Several callables are timed interleaved in alternating order (A B, B A, ...) after a
  discarded first call and warm-up, so neither always runs first on warm caches.
- Peaks: a big device-to-device copy (GB/s) and dense matmuls per dtype (TFLOP/s), the
  best repetition of each.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import BaseModel

from gpu import tensor_ops as ops
from gpu.device import synchronize

Sizes = Literal["small", "full"]
FLUSH_BYTES = 256 * 1024**2
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Timing(BaseModel):
    samples_ms: list[float]
    median_ms: float
    q1_ms: float
    q3_ms: float
    iqr_ms: float
    min_ms: float
    max_ms: float = 0.0
    n: int = 0
    cold: bool  # L2 flushed before each repetition
    timer: str  # "cuda-events" or "perf_counter"
    first_call_ms: float | None = None  # before any warm-up: compile, handles, page faults

    @classmethod
    def of(
        cls, samples: list[float], *, cold: bool, timer: str, first_call_ms: float | None = None
    ) -> Timing:
        s = sorted(samples)
        q = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else [s[0]] * 3
        return cls(
            samples_ms=samples,
            median_ms=statistics.median(s),
            q1_ms=q[0],
            q3_ms=q[2],
            iqr_ms=q[2] - q[0],
            min_ms=s[0],
            max_ms=s[-1],
            n=len(s),
            cold=cold,
            timer=timer,
            first_call_ms=first_call_ms,
        )


class Timer:
    """Times callables on one device: CUDA events + L2 flush on GPUs, perf_counter on CPUs."""

    def __init__(self, device: torch.device, *, flush: bool = True) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._flush_buf = (
            torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=device)
            if self.cuda and flush
            else None
        )

    @property
    def name(self) -> str:
        return "cuda-events" if self.cuda else "perf_counter"

    @property
    def cold(self) -> bool:
        return self._flush_buf is not None

    def once(self, fn: Callable[[], Any]) -> float:
        """One timed call in ms (flushing L2 first on GPUs)."""
        if self.cuda:
            if self._flush_buf is not None:
                self._flush_buf.zero_()  # same stream, so it finishes before `start`
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        synchronize(self.device)
        t0 = time.perf_counter()
        fn()
        synchronize(self.device)  # MPS is asynchronous like CUDA; the CPU: a no-op
        return (time.perf_counter() - t0) * 1e3

    def measure(self, fn: Callable[[], Any], *, warmup: int, reps: int) -> Timing:
        return self.interleaved([fn], warmup=warmup, reps=reps)[0]

    def interleaved(self, fns: list[Callable[[], Any]], *, warmup: int, reps: int) -> list[Timing]:
        """First call, warm-up (both discarded), then repetitions interleaving the callables
        in alternating order (A B, B A, ...): neither always runs first on warm caches."""
        first = [self.once(fn) for fn in fns]
        for _ in range(warmup):
            for fn in fns:
                fn()
        synchronize(self.device)
        samples: list[list[float]] = [[] for _ in fns]
        order = list(range(len(fns)))
        for rep in range(reps):
            for i in order if rep % 2 == 0 else order[::-1]:
                samples[i].append(self.once(fns[i]))
        return [
            Timing.of(s, cold=self.cold, timer=self.name, first_call_ms=f)
            for s, f in zip(samples, first, strict=True)
        ]


# --- peaks ----------------------------------------------------------------------------


class PeakFigures(BaseModel):
    """Ceilings measured once per run on the device the ops run on."""

    device: str
    copy_gbps: float
    copy_bytes: int
    matmul_tflops: dict[str, float]  # by compute dtype: float32, float16, bfloat16, tf32
    matmul_n: int


def measure_peaks(device: torch.device, sizes: Sizes, *, reps: int | None = None) -> PeakFigures:
    reps = reps or (3 if sizes == "small" else 10)
    timer = Timer(device, flush=False)
    gpu = device.type != "cpu"
    copy_bytes = (1024**3 if gpu else 256 * 1024**2) if sizes == "full" else 32 * 1024**2
    if gpu and sizes == "small":
        copy_bytes = 256 * 1024**2
    src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = timer.measure(lambda: dst.copy_(src), warmup=2, reps=reps)
    # Ceilings use the best repetition: a peak is what the device can do, and noise from
    # a shared machine only ever makes a repetition slower.
    copy_gbps = 2 * copy_bytes / (t.min_ms * 1e-3) / 1e9  # read + write
    n = 8192 if gpu and sizes == "full" else (4096 if gpu else (2048 if sizes == "full" else 1024))
    tflops: dict[str, float] = {}
    kinds = ["float32", "float16", "bfloat16"] + (["tf32"] if device.type == "cuda" else [])
    for kind in kinds:
        dt = torch.float32 if kind == "tf32" else DTYPES[kind]
        if not gpu and dt != torch.float32:
            continue  # CPU half ops compute in fp32: their ceiling is the fp32 one
        a = torch.randn(n, n, device=device, dtype=torch.float32).to(dt)
        b = torch.randn(n, n, device=device, dtype=torch.float32).to(dt)
        with ops.tf32_enabled(kind == "tf32"):
            t = timer.measure(functools.partial(torch.mm, a, b), warmup=2, reps=reps)
        tflops[kind] = 2.0 * n**3 / (t.min_ms * 1e-3) / 1e12
    if not gpu:
        tflops["float16"] = tflops["bfloat16"] = tflops["float32"]
    return PeakFigures(
        device=str(device),
        copy_gbps=copy_gbps,
        copy_bytes=copy_bytes,
        matmul_tflops=tflops,
        matmul_n=n,
    )
