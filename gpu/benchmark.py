"""Benchmarks of gpu.tensor_ops: ours vs plain torch, GPU vs CPU, against measured peaks.

How it times (see docs/gpu.md):
- GPU: CUDA events around each repetition, after a warm-up; before every repetition a
  256 MB buffer is zeroed so each one starts with a cold L2 (reported as `cold`).
- CPU: perf_counter around each repetition (ops are synchronous); caches stay warm.
- Ours and the baseline run interleaved in alternating order (A B, B A, A B, ...) after a
  discarded warm-up, so drift and whichever-runs-second effects hit both alike; figures
  are medians with min-max and n (and the interquartile range).
- The baseline is what a user would otherwise write: plain torch, and on the CPU in
  float32 (half inputs converted, as anyone computing on a CPU would). CPU ratios say
  nothing about GPUs.
- Each case is measured, then reported (``on_result``) before the next starts; a case
  that fails is recorded with its error and the others still run.
- Achieved GB/s = compulsory bytes / time, TFLOP/s = algorithmic FLOPs / time; both
  against this run's measured ceilings: a big device-to-device copy and a dense matmul.
- Error: max |ours - float64 reference| (numpy), on a subset of rows for big cases.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from gpu import tensor_ops as ops
from gpu.device import DeviceInfo, device_info, resolve_device, synchronize
from gpu.memory import track_tensor_allocations
from gpu.timing import DTYPES, PeakFigures, Sizes, Timer, Timing, measure_peaks
from storage.environment import environment as host_environment
from storage.environment import fingerprint

log = logging.getLogger("dspyflow.gpu.benchmark")

SUITE = "gpu"
_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


# --- cases ----------------------------------------------------------------------------


class OpCase(BaseModel):
    """One op at one size and dtype. Shapes: matmul m,k,n; normalize n,d;
    pairwise_l2 / cosine_similarity n,m,d; topk_cosine q,n,d (+ k)."""

    op: str
    dtype: str
    shape: dict[str, int]
    k: int | None = None
    # "tf32": fp32 matmuls on TF32 tensor cores (ours and the baseline alike);
    # "fused": top-k through the fused Triton group-max GEMM (`selection="fused"`).
    variant: Literal["", "tf32", "fused"] = ""

    @property
    def tf32(self) -> bool:
        return self.variant == "tf32"

    @property
    def name(self) -> str:
        return f"{self.op}_{self.variant}" if self.variant else self.op

    @property
    def key(self) -> str:
        return f"{self.name}.{_SHORT[self.dtype]}"

    @property
    def shape_label(self) -> str:
        return "x".join(str(v) for v in self.shape.values())


def cases_for(sizes: Sizes, device: torch.device) -> list[OpCase]:
    if sizes == "small":
        # Each op tens of milliseconds on a 2-core CPU: the whole suite takes seconds.
        return [
            OpCase(op="matmul", dtype="float32", shape={"m": 1024, "k": 1024, "n": 1024}),
            OpCase(op="normalize", dtype="float32", shape={"n": 20_000, "d": 384}),
            OpCase(op="pairwise_l2", dtype="float32", shape={"n": 512, "m": 1024, "d": 384}),
            OpCase(op="cosine_similarity", dtype="float32", shape={"n": 512, "m": 1024, "d": 384}),
            OpCase(op="topk_cosine", dtype="float32", shape={"q": 64, "n": 10_000, "d": 384}, k=10),
            OpCase(op="topk_cosine", dtype="float16", shape={"q": 64, "n": 10_000, "d": 384}, k=10),
        ] + (
            [
                OpCase(
                    op="topk_cosine",
                    dtype="float16",
                    shape={"q": 64, "n": 10_000, "d": 384},
                    k=10,
                    variant="fused",
                )
            ]
            if device.type == "cuda"
            else []
        )
    full = [
        OpCase(op="matmul", dtype="float16", shape={"m": 8192, "k": 8192, "n": 8192}),
        OpCase(op="normalize", dtype="float32", shape={"n": 1_000_000, "d": 384}),
        OpCase(op="pairwise_l2", dtype="float32", shape={"n": 8192, "m": 8192, "d": 384}),
        OpCase(op="cosine_similarity", dtype="float32", shape={"n": 8192, "m": 8192, "d": 384}),
        OpCase(
            op="topk_cosine", dtype="float16", shape={"q": 1024, "n": 1_000_000, "d": 384}, k=10
        ),
    ]
    if device.type == "cuda":  # variants that only mean something on (tensor-core) GPUs
        full += [
            OpCase(
                op="pairwise_l2",
                dtype="float32",
                shape={"n": 8192, "m": 8192, "d": 384},
                variant="tf32",
            ),
            # Half inputs stay half: one tensor-core GEMM with float32 accumulation.
            OpCase(op="pairwise_l2", dtype="float16", shape={"n": 8192, "m": 8192, "d": 384}),
            OpCase(
                op="topk_cosine",
                dtype="float16",
                shape={"q": 1024, "n": 1_000_000, "d": 384},
                k=10,
                variant="fused",
            ),
        ]
    return full


# Targets for the full sizes on an H100/H200 (ms, extra bytes); none on CPUs.
GPU_TARGETS: dict[str, dict[str, float]] = {
    "topk_cosine.fp16": {"ms": 1.5, "extra_bytes": 1024**3},
    "topk_cosine_fused.fp16": {"ms": 1.5, "extra_bytes": 1024**3},
    "normalize.fp32": {"ms": 1.0},
    "pairwise_l2.fp32": {"ms": 1.2},
}


class _Bench:
    """Inputs, both implementations, cost model and float64 reference for one case."""

    def __init__(self, case: OpCase, device: torch.device, seed: int) -> None:
        self.case, self.device = case, device
        self.dtype = DTYPES[case.dtype]
        gen = torch.Generator(device="cpu").manual_seed(seed)
        s = case.shape

        def rnd(*shape: int) -> torch.Tensor:
            # Random data (not zeros), made on the CPU for reproducibility across devices.
            return torch.randn(*shape, generator=gen).to(device=device, dtype=self.dtype)

        if case.op == "matmul":
            self.inputs: tuple[torch.Tensor, ...] = (rnd(s["m"], s["k"]), rnd(s["k"], s["n"]))
        elif case.op == "normalize":
            self.inputs = (rnd(s["n"], s["d"]),)
        elif case.op in ("pairwise_l2", "cosine_similarity"):
            self.inputs = (rnd(s["n"], s["d"]), rnd(s["m"], s["d"]))
        elif case.op == "topk_cosine":
            # The database is an index: normalized once, searched many times.
            db = ops.normalize_rows(rnd(s["n"], s["d"]))
            self.inputs = (rnd(s["q"], s["d"]), db)
        else:
            raise ValueError(f"unknown benchmark op {case.op!r}")

    # implementations -------------------------------------------------------------------

    def ours(self) -> Any:
        c, x = self.case, self.inputs
        if c.op == "matmul":
            return ops.matmul(*x)
        if c.op == "normalize":
            return ops.normalize_rows(x[0])
        if c.op == "pairwise_l2":
            return ops.pairwise_l2(*x, allow_tf32=c.tf32)
        if c.op == "cosine_similarity":
            return ops.cosine_similarity(*x)
        if c.variant == "fused":
            res = ops.topk_cosine_search(x[0], x[1], c.k or 1, normalized=True, selection="fused")
            return res.values, res.indices
        return ops.topk_cosine(x[0], x[1], c.k or 1, normalized=True)

    def baseline_label(self) -> str:
        """What the baseline is, in words (stored beside the ratio)."""
        c = self.case
        cpu_fp32 = " in float32" if self._baseline_in_fp32() else ""
        label = {
            "matmul": "a @ b (the same kernel as ours: an A/A control for noise)",
            "normalize": "F.normalize(x)",
            "pairwise_l2": "torch.cdist(x, y)",
            "cosine_similarity": "F.normalize(x) @ F.normalize(y).T",
            "topk_cosine": "torch.topk(F.normalize(q) @ db.T, k)",
        }[c.op]
        return label + cpu_fp32

    def _baseline_in_fp32(self) -> bool:
        # On a CPU nobody computes in half: torch's CPU half kernels are slow, so a user
        # converts to float32 first (inside the timed call, as ours does).
        return self.device.type == "cpu" and self.dtype != torch.float32

    def path(self) -> str:
        """Which implementation of ours runs here (a fallback is named, never silent)."""
        c = self.case
        if c.op == "normalize":
            return f"normalize: {ops.kernel_path('normalize', self.device)}"
        if c.op == "pairwise_l2":
            half = ops._uses_half_gemm(self.dtype, self.device)
            return "pairwise_l2: " + ("half GEMM, fp32 accumulate" if half else "fp32 GEMM")
        if c.op == "topk_cosine":
            q, db = self.inputs
            plan = ops.plan_topk(
                q.shape[0],
                db.shape[0],
                q.shape[1],
                c.k or 1,
                dtype=q.dtype,
                device=self.device,
                normalized=True,
                selection="fused" if c.variant == "fused" else "auto",
            )
            cd = ops.compute_dtype(q.dtype, self.device)
            return "topk: " + ops._path_name(plan.selection, cd, self.device)
        return f"{c.op}: torch"

    def baseline(self) -> Any:
        c, x = self.case, self.inputs
        if self._baseline_in_fp32():
            x = tuple(t.float() for t in x)
        if c.op == "matmul":
            return x[0] @ x[1]
        if c.op == "normalize":
            return F.normalize(x[0], dim=1)
        if c.op == "pairwise_l2":
            if c.tf32:
                with ops.tf32_enabled(True):
                    return torch.cdist(x[0], x[1])
            return torch.cdist(x[0], x[1])
        if c.op == "cosine_similarity":
            return F.normalize(x[0], dim=1) @ F.normalize(x[1], dim=1).T
        return torch.topk(F.normalize(x[0], dim=1) @ x[1].T, c.k or 1, dim=1)

    # cost model ------------------------------------------------------------------------

    def flops(self) -> float:
        s, c = self.case.shape, self.case
        if c.op == "matmul":
            return 2.0 * s["m"] * s["k"] * s["n"]
        if c.op == "normalize":
            return 3.0 * s["n"] * s["d"]  # square-add, then scale
        if c.op in ("pairwise_l2", "cosine_similarity"):
            return 2.0 * s["n"] * s["m"] * s["d"]
        return 2.0 * s["q"] * s["n"] * s["d"]

    def bytes(self) -> float:
        """Compulsory traffic: read every input once, write the output once."""
        s, c = self.case.shape, self.case
        e = torch.empty((), dtype=self.dtype).element_size()
        if c.op == "matmul":
            return float(e * (s["m"] * s["k"] + s["k"] * s["n"] + s["m"] * s["n"]))
        if c.op == "normalize":
            return float(2 * e * s["n"] * s["d"])
        if c.op in ("pairwise_l2", "cosine_similarity"):
            return float(e * ((s["n"] + s["m"]) * s["d"] + s["n"] * s["m"]))
        return float(e * (s["q"] + s["n"]) * s["d"] + s["q"] * (c.k or 1) * (e + 8))

    def peak_key(self) -> str:
        if self.case.tf32:
            return "tf32"
        return str(ops.compute_dtype(self.dtype, self.device)).removeprefix("torch.")

    # correctness -----------------------------------------------------------------------

    def max_abs_error(self, out: Any, rows: int = 256) -> float:
        """Max |out - float64 reference| over the first ``rows`` output rows."""
        c = self.case

        def f64(t: torch.Tensor) -> np.ndarray:
            return t.detach().to("cpu", torch.float64).numpy()

        if c.op == "matmul":
            ref = f64(self.inputs[0][:rows]) @ f64(self.inputs[1])
            got = out[:rows]
        elif c.op == "normalize":
            a = f64(self.inputs[0][: rows * 16])
            ref = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
            got = out[: rows * 16]
        elif c.op == "pairwise_l2":
            a, b = f64(self.inputs[0][:rows]), f64(self.inputs[1])
            sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
            ref, got = np.sqrt(np.maximum(sq, 0)), out[:rows]
        elif c.op == "cosine_similarity":
            a, b = f64(self.inputs[0][:rows]), f64(self.inputs[1])
            a = a / np.linalg.norm(a, axis=1, keepdims=True)
            b = b / np.linalg.norm(b, axis=1, keepdims=True)
            ref, got = a @ b.T, out[:rows]
        else:
            q = f64(self.inputs[0][: min(rows, 32)])
            q = q / np.linalg.norm(q, axis=1, keepdims=True)
            scores = q @ f64(self.inputs[1]).T  # the database is already normalized
            ref = -np.sort(-scores, axis=1)[:, : c.k]
            got = out[0][: q.shape[0]]
        got_np = got.detach().to("cpu", torch.float64).numpy()
        return float(np.max(np.abs(got_np - ref)))


# --- environment ----------------------------------------------------------------------


def environment(info: DeviceInfo) -> dict[str, Any]:
    """The device's facts and this host's (storage.environment fingerprints them)."""
    return host_environment(info.environment_facts())


# --- results --------------------------------------------------------------------------


class OpResult(BaseModel):
    case: OpCase
    device: str
    ours: Timing
    torch: Timing
    # Median of the paired (interleaved, adjacent in time) ours/torch ratios: drift on a
    # shared machine cancels within a pair. Below 1: ours is faster.
    ratio_vs_torch: float
    flops: float
    bytes: float
    gbps: float
    tflops: float
    pct_peak_bw: float
    pct_peak_flops: float
    pct_of_peak: float  # of the binding ceiling (the larger of the two)
    bound: Literal["memory", "compute"]
    max_abs_err: float
    torch_max_abs_err: float
    extra_bytes: int | None = None  # ours: peak extra memory of one call (incl. output)
    torch_extra_bytes: int | None = None
    cpu: Timing | None = None  # ours on the CPU (all threads), when the device is a GPU
    speedup_vs_cpu: float | None = None
    target_ms: float | None = None
    meets_target: bool | None = None
    notes: list[str] = Field(default_factory=list)
    path: str = ""  # which implementation of ours ran (e.g. a Triton kernel or torch)
    baseline: str = ""  # what the baseline is, in words

    def line(self) -> dict[str, Any]:
        """This case's figures as one JSON-ready dict (one line of the script's output)."""
        return {"case": self.case.key, **_figures(self)}


class CaseError(BaseModel):
    """A case that failed: recorded with its error; the suite goes on with the next case."""

    case: OpCase
    device: str
    error: str  # "ExceptionType: first line of the message"
    traceback: str  # its last lines

    def line(self) -> dict[str, Any]:
        return {"case": self.case.key, "shape": self.case.shape_label, "error": self.error}


CPU_NOTE = (
    "CPU figures: ratios of ours to plain torch on this CPU; they are not GPU figures and "
    "say nothing about GPU speed"
)


def _figures(r: OpResult) -> dict[str, Any]:
    return {
        "shape": r.case.shape_label,
        "ours_ms": _r(r.ours.median_ms),
        "ours_min_ms": _r(r.ours.min_ms),
        "ours_max_ms": _r(r.ours.max_ms),
        "ours_iqr_ms": _r(r.ours.iqr_ms),
        "torch_ms": _r(r.torch.median_ms),
        "torch_min_ms": _r(r.torch.min_ms),
        "torch_max_ms": _r(r.torch.max_ms),
        "n": r.ours.n or len(r.ours.samples_ms),
        "ratio": _r(r.ratio_vs_torch),
        "gbps": _r(r.gbps),
        "tflops": _r(r.tflops),
        "pct_peak": _r(r.pct_of_peak),
        "bound": r.bound,
        "max_err": float(f"{r.max_abs_err:.3g}"),
        "extra_mb": None if r.extra_bytes is None else _r(r.extra_bytes / 2**20),
        "speedup_vs_cpu": None if r.speedup_vs_cpu is None else _r(r.speedup_vs_cpu),
        "target_ms": r.target_ms,
        "meets_target": r.meets_target,
        "path": r.path,
        "baseline": r.baseline,
    }


class SuiteResult(BaseModel):
    session_id: str
    created_at: datetime
    sizes: Sizes
    device: str
    device_info: DeviceInfo
    environment: dict[str, Any]
    env_fingerprint: str
    peak: PeakFigures
    config: dict[str, Any]
    results: list[OpResult]
    errors: list[CaseError] = Field(default_factory=list)
    wall_s: float

    def _row(
        self,
        metric: str,
        value: float,
        unit: str,
        *,
        samples: list[float] | None = None,
        params: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "suite": SUITE,
            "metric": metric,
            "value": float(value),
            "unit": unit,
            "samples": samples,
            "params": {"sizes": self.sizes, "device": self.device, **(params or {})},
            "env_fingerprint": self.env_fingerprint,
            "environment": self.environment,
            "commit": self.environment.get("git_commit"),
        }

    def to_rows(self) -> Iterator[dict[str, Any]]:
        """Rows for `Repository.add_benchmark_results` (one metric each, unique per session)."""
        dev = self.device.split(":")[0]
        yield self._row(
            f"gpu.peak.copy_gbps.{dev}",
            self.peak.copy_gbps,
            "GB/s",
            params={"bytes": self.peak.copy_bytes},
        )
        for kind, value in self.peak.matmul_tflops.items():
            yield self._row(
                f"gpu.peak.matmul_tflops.{kind}.{dev}",
                value,
                "TFLOP/s",
                params={"n": self.peak.matmul_n},
            )
        for r in self.results:
            c = r.case
            prefix = f"gpu.{c.name}.{_SHORT[c.dtype]}.{c.shape_label}.{dev}"
            params = {
                "op": c.op,
                "dtype": c.dtype,
                "shape": c.shape,
                "k": c.k,
                "variant": c.variant,
                "cold": r.ours.cold,
                "timer": r.ours.timer,
                "path": r.path,
                **self.config,
            }
            yield self._row(
                f"{prefix}.ms",
                r.ours.median_ms,
                "ms",
                samples=r.ours.samples_ms,
                params={
                    **params,
                    "iqr_ms": r.ours.iqr_ms,
                    "min_ms": r.ours.min_ms,
                    "max_ms": r.ours.max_ms,
                    "first_call_ms": r.ours.first_call_ms,
                },
            )
            yield self._row(
                f"{prefix}.torch_ms",
                r.torch.median_ms,
                "ms",
                samples=r.torch.samples_ms,
                params={
                    **params,
                    "iqr_ms": r.torch.iqr_ms,
                    "min_ms": r.torch.min_ms,
                    "max_ms": r.torch.max_ms,
                    "baseline": r.baseline,
                },
            )
            yield self._row(f"{prefix}.ratio_vs_torch", r.ratio_vs_torch, "x", params=params)
            yield self._row(f"{prefix}.gbps", r.gbps, "GB/s", params=params)
            yield self._row(f"{prefix}.tflops", r.tflops, "TFLOP/s", params=params)
            yield self._row(
                f"{prefix}.pct_peak", r.pct_of_peak, "%", params={**params, "bound": r.bound}
            )
            yield self._row(f"{prefix}.max_abs_err", r.max_abs_err, "abs", params=params)
            if r.extra_bytes is not None:
                yield self._row(f"{prefix}.extra_bytes", r.extra_bytes, "bytes", params=params)
            if r.cpu is not None and r.speedup_vs_cpu is not None:
                yield self._row(
                    f"{prefix}.cpu_ms",
                    r.cpu.median_ms,
                    "ms",
                    samples=r.cpu.samples_ms,
                    params=params,
                )
                yield self._row(f"{prefix}.speedup_vs_cpu", r.speedup_vs_cpu, "x", params=params)

    def summary(self) -> dict[str, Any]:
        """The figures as one JSON-ready dict (the benchmark script's last line)."""
        return {
            "session_id": self.session_id,
            "device": self.device,
            "device_name": self.device_info.name,
            "sizes": self.sizes,
            "env_fingerprint": self.env_fingerprint,
            "commit": self.environment.get("git_commit"),
            "torch": torch.__version__,
            "threads": self.config.get("cpu_threads"),
            "peak": {
                "copy_gbps": _r(self.peak.copy_gbps),
                "matmul_tflops": {k: _r(v) for k, v in self.peak.matmul_tflops.items()},
            },
            "ops": {r.case.key: _figures(r) for r in self.results},
            "errors": [e.line() for e in self.errors],
            "note": CPU_NOTE if self.device == "cpu" else None,
            "wall_s": _r(self.wall_s),
        }

    def table_rows(self) -> list[dict[str, Any]]:
        return [
            {
                "op": r.case.key,
                "shape": r.case.shape_label,
                "ours_ms": r.ours.median_ms,
                "min_ms": r.ours.min_ms,
                "max_ms": r.ours.max_ms,
                "n": r.ours.n,
                "torch_ms": r.torch.median_ms,
                "ratio": r.ratio_vs_torch,
                "GB/s": r.gbps,
                "TFLOP/s": r.tflops,
                "%peak": r.pct_of_peak,
                "max_err": r.max_abs_err,
                "extra_MB": None if r.extra_bytes is None else r.extra_bytes / 2**20,
                "vs_cpu": r.speedup_vs_cpu,
                "path": r.path,
            }
            for r in self.results
        ]


def _r(x: float) -> float:
    return float(f"{x:.4g}")


# --- the suite ------------------------------------------------------------------------


class BenchmarkConfig(BaseModel):
    device: str = "auto"
    sizes: Sizes = "small"
    warmup: int | None = None  # default: 1 (small) / 5 (full)
    reps: int | None = None  # default: 5 (small) / 25 (full)
    cpu_baseline: bool = True  # on a GPU, also time ours on the CPU for the speedup
    cpu_reps: int = 3
    ops: list[str] | None = None  # only these op names (default: all)
    seed: int = 0
    fallback: bool = False  # an absent device: fall back to the CPU instead of failing
    # Multiplies every row count (not the feature size): < 1 for smoke tests of the suite.
    scale: float = Field(1.0, gt=0, le=1)


def _extra_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak memory one call adds on top of what was allocated before it (incl. output)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    with track_tensor_allocations() as tracker:
        out = fn()
    del out
    return int(tracker.peak_bytes)


def run_suite(
    config: BenchmarkConfig | None = None,
    *,
    on_result: Callable[[OpResult | CaseError], None] | None = None,
    **overrides: Any,
) -> SuiteResult:
    """Run every case of ``config.sizes`` on ``config.device``; see the module docstring.

    ``on_result`` is called with each case's result (or its `CaseError`) as soon as it is
    measured, so a crash later in the run loses nothing already measured. A failing case
    (an exception, a CUDA OOM) is recorded in ``errors`` and the next case runs.
    """
    cfg = (config or BenchmarkConfig()).model_copy(update=overrides)
    started = time.perf_counter()
    device = resolve_device(cfg.device, fallback=cfg.fallback)
    warmup = cfg.warmup if cfg.warmup is not None else (1 if cfg.sizes == "small" else 5)
    reps = cfg.reps if cfg.reps is not None else (5 if cfg.sizes == "small" else 25)
    prev_threads = torch.get_num_threads()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)  # a fair CPU: every core (torch may default to fewer)
    try:
        info = device_info(device)
        env = environment(info)
        peak = measure_peaks(device, cfg.sizes)
        timer = Timer(device)
        cpu_timer = Timer(torch.device("cpu"))
        results: list[OpResult] = []
        errors: list[CaseError] = []
        for case in cases_for(cfg.sizes, device):
            if cfg.scale != 1.0:
                case = case.model_copy(
                    update={
                        "shape": {
                            dim: v if dim == "d" else max(case.k or 1, int(v * cfg.scale))
                            for dim, v in case.shape.items()
                        }
                    }
                )
            if cfg.ops and case.op not in cfg.ops and case.name not in cfg.ops:
                continue
            log.info("benchmark %s %s on %s", case.key, case.shape_label, device)
            item: OpResult | CaseError
            try:
                item = _run_case(case, device, cfg, warmup, reps, timer, cpu_timer, peak)
                results.append(item)
            except Exception as exc:  # recorded with its error; the other cases still run
                item = _case_error(case, device, exc)
                errors.append(item)
                log.warning("benchmark %s failed: %s", case.key, item.error)
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # a failed case's blocks must not starve the next
            if on_result is not None:
                on_result(item)
    finally:
        torch.set_num_threads(prev_threads)
    return SuiteResult(
        session_id=uuid.uuid4().hex,
        created_at=datetime.now(UTC),
        sizes=cfg.sizes,
        device=str(device),
        device_info=info,
        environment=env,
        env_fingerprint=fingerprint(env),
        peak=peak,
        config={
            "warmup": warmup,
            "reps": reps,
            "seed": cfg.seed,
            "cpu_threads": threads,
            "cpu_reps": cfg.cpu_reps,
        },
        results=results,
        errors=errors,
        wall_s=time.perf_counter() - started,
    )


def _case_error(case: OpCase, device: torch.device, exc: BaseException) -> CaseError:
    message = str(exc).splitlines()[0] if str(exc) else ""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return CaseError(
        case=case,
        device=str(device),
        error=f"{type(exc).__name__}: {message}",
        traceback="\n".join(tb.splitlines()[-12:]),
    )


def _run_case(
    case: OpCase,
    device: torch.device,
    cfg: BenchmarkConfig,
    warmup: int,
    reps: int,
    timer: Timer,
    cpu_timer: Timer,
    peak: PeakFigures,
) -> OpResult:
    bench = _Bench(case, device, cfg.seed)
    ours_t, torch_t = timer.interleaved([bench.ours, bench.baseline], warmup=warmup, reps=reps)
    err = bench.max_abs_error(bench.ours())
    torch_err = bench.max_abs_error(bench.baseline())
    extra = _extra_bytes(bench.ours, device)
    torch_extra = _extra_bytes(bench.baseline, device)
    flops, nbytes = bench.flops(), bench.bytes()
    secs = ours_t.median_ms * 1e-3
    gbps, tflops = nbytes / secs / 1e9, flops / secs / 1e12
    pct_bw = 100 * gbps / peak.copy_gbps
    peak_flops = peak.matmul_tflops.get(bench.peak_key()) or peak.matmul_tflops["float32"]
    pct_flops = 100 * tflops / peak_flops
    notes: list[str] = []
    if device.type == "cpu" and bench.dtype != torch.float32:
        notes.append("computed in float32 on the CPU, by ours and by the baseline alike")
    if case.op == "matmul":
        notes.append("ours is torch.mm, the baseline's kernel: the ratio shows the noise")
    cpu_t, speedup = None, None
    if device.type != "cpu" and cfg.cpu_baseline:
        # The fused kernel is GPU-only: the CPU does the same op its own (default) way.
        cpu_case = case.model_copy(update={"variant": ""}) if case.variant == "fused" else case
        cpu_bench = _Bench(cpu_case, torch.device("cpu"), cfg.seed)
        cpu_t = cpu_timer.measure(cpu_bench.ours, warmup=1, reps=cfg.cpu_reps)
        speedup = cpu_t.median_ms / ours_t.median_ms
        del cpu_bench
    target = GPU_TARGETS.get(case.key) if (cfg.sizes == "full" and device.type == "cuda") else None
    ratio = statistics.median(
        o / t for o, t in zip(ours_t.samples_ms, torch_t.samples_ms, strict=True)
    )
    meets = None  # targets are GPU figures: a CPU run meets or misses none of them
    if target is not None:
        meets = ours_t.median_ms <= target["ms"] and extra <= target.get("extra_bytes", 1e30)
    result = OpResult(
        case=case,
        device=str(device),
        ours=ours_t,
        torch=torch_t,
        ratio_vs_torch=ratio,
        flops=flops,
        bytes=nbytes,
        gbps=gbps,
        tflops=tflops,
        pct_peak_bw=pct_bw,
        pct_peak_flops=pct_flops,
        pct_of_peak=max(pct_bw, pct_flops),
        bound="memory" if pct_bw >= pct_flops else "compute",
        max_abs_err=err,
        torch_max_abs_err=torch_err,
        extra_bytes=extra,
        torch_extra_bytes=torch_extra,
        cpu=cpu_t,
        speedup_vs_cpu=speedup,
        target_ms=None if target is None else target["ms"],
        meets_target=meets,
        notes=notes,
        path=bench.path(),
        baseline=bench.baseline_label(),
    )
    del bench
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def format_table(result: SuiteResult) -> str:
    """A plain-text table (no rich dependency: gpu/ stays torch + numpy + pydantic)."""
    head = [
        "op",
        "shape",
        "ours ms",
        "ours min-max",
        "torch ms",
        "torch min-max",
        "n",
        "ratio",
        "GB/s",
        "TFLOP/s",
        "%peak",
        "max err",
        "extra MB",
        "vs cpu",
    ]
    rows = []
    for r in result.results:
        rows.append(
            [
                r.case.key,
                r.case.shape_label,
                f"{r.ours.median_ms:.4g}",
                f"{r.ours.min_ms:.4g}-{r.ours.max_ms:.4g}",
                f"{r.torch.median_ms:.4g}",
                f"{r.torch.min_ms:.4g}-{r.torch.max_ms:.4g}",
                str(r.ours.n or len(r.ours.samples_ms)),
                f"{r.ratio_vs_torch:.3f}",
                f"{r.gbps:.4g}",
                f"{r.tflops:.4g}",
                f"{r.pct_of_peak:.1f}",
                f"{r.max_abs_err:.2g}",
                "-" if r.extra_bytes is None else f"{r.extra_bytes / 2**20:.1f}",
                "-" if r.speedup_vs_cpu is None else f"{r.speedup_vs_cpu:.1f}x",
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    for e in result.errors:
        lines.append(f"FAILED {e.case.key} {e.case.shape_label}: {e.error}")
    p = result.peak
    peaks = ", ".join(f"{k} {v:.3g}" for k, v in p.matmul_tflops.items())
    lines.append(
        f"device {result.device} ({result.device_info.name}); peaks: copy {p.copy_gbps:.4g} GB/s, "
        f"matmul TFLOP/s {peaks}; timer {result.results[0].ours.timer if result.results else '-'}"
        f"{' (cold L2)' if result.results and result.results[0].ours.cold else ' (warm)'}; "
        f"fingerprint {result.env_fingerprint}"
    )
    lines.append(
        "ours and the baseline: "
        + "; ".join(f"{r.case.key}: {r.path} vs {r.baseline}" for r in result.results)
    )
    if result.device == "cpu":
        lines.append(CPU_NOTE + ".")
    return "\n".join(lines)
