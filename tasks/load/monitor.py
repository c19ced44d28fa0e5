"""Resource monitoring during a load test, to tell a saturated generator from a saturated
system under test.

A daemon thread samples every ``interval_s``: the machine's CPU and memory (psutil), the
GPUs when an NVIDIA driver is present (NVML via ``nvidia-ml-py``; skipped with a reason
otherwise), and the generator process's own CPU (100 % = one core: a Python generator is
bound to one core by the GIL). A ticker task on the generator's event loop measures how
late the loop wakes up (loop lag): when it grows, intended start times slip in the
generator, not in the target.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

import psutil

from tasks.load.histograms import new_histogram, percentiles, record_seconds
from tasks.load.results import ResourceSample, ResourceSummary, Window


class _Gpus:
    """NVML handles, or the reason there are none."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.description: str | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            names = {pynvml.nvmlDeviceGetName(h) for h in self.handles}
            name = ", ".join(n.decode() if isinstance(n, bytes) else str(n) for n in names)
            self.description = f"{count} x {name}" if count else "no NVIDIA GPU"
        except ImportError:
            self.description = "no GPU data: nvidia-ml-py is not installed"
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            self.description = f"no GPU data: {type(exc).__name__}"

    def sample(self) -> tuple[float, float, float] | None:
        if not self.handles:
            return None
        import pynvml

        try:
            util = max(pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self.handles)
            mems = [pynvml.nvmlDeviceGetMemoryInfo(h) for h in self.handles]
        except Exception as exc:  # a device fell off the bus: stop asking, say why
            self.handles = []
            self.description = f"GPU sampling stopped: {type(exc).__name__}"
            return None
        mb = 1024 * 1024
        return float(util), sum(m.used for m in mems) / mb, sum(m.total for m in mems) / mb

    def close(self) -> None:
        if self.handles:
            import pynvml

            with contextlib.suppress(Exception):
                pynvml.nvmlShutdown()


class ResourceMonitor:
    def __init__(
        self, interval_s: float = 0.5, *, lag_tick_s: float = 0.01, gpu: bool = True
    ) -> None:
        self.interval_s = interval_s
        self.lag_tick_s = lag_tick_s
        self.samples: list[ResourceSample] = []
        self.t0 = time.perf_counter()
        self._gpu_enabled = gpu
        self._gpus: _Gpus | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._lag_max = 0.0  # worst lag since the last sample (seconds)
        self._lag_seen = False
        self._lag_hist = new_histogram()
        self._process = psutil.Process()

    # --- the sampling thread -------------------------------------------------------------

    def start(self, t0: float | None = None) -> ResourceMonitor:
        self.t0 = t0 if t0 is not None else time.perf_counter()
        self._gpus = _Gpus() if self._gpu_enabled else None
        psutil.cpu_percent(None)  # the first call only sets the baseline
        self._process.cpu_percent(None)
        self._thread = threading.Thread(target=self._run, name="load-monitor", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        next_at = time.perf_counter() + self.interval_s
        while not self._stop.wait(max(0.0, next_at - time.perf_counter())):
            self._sample()
            next_at += self.interval_s  # absolute deadlines: no drift

    def _sample(self) -> None:
        mem = psutil.virtual_memory()
        with self._lock:
            lag = self._lag_max * 1000 if self._lag_seen else None
            self._lag_max, self._lag_seen = 0.0, False
        gpu = self._gpus.sample() if self._gpus else None
        self.samples.append(
            ResourceSample(
                t_s=time.perf_counter() - self.t0,
                cpu_pct=psutil.cpu_percent(None),
                mem_pct=mem.percent,
                mem_used_mb=(mem.total - mem.available) / 1e6,
                proc_cpu_pct=self._process.cpu_percent(None),
                proc_rss_mb=self._process.memory_info().rss / 1e6,
                loop_lag_ms=lag,
                gpu_util_pct=gpu[0] if gpu else None,
                gpu_mem_used_mb=gpu[1] if gpu else None,
                gpu_mem_total_mb=gpu[2] if gpu else None,
            )
        )

    def stop(self) -> list[ResourceSample]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._sample()  # the last partial interval
        if self._gpus is not None:
            self._gpus.close()
        return self.samples

    # --- the event-loop ticker -----------------------------------------------------------

    async def loop_ticker(self) -> None:
        """Run on the generator's loop until cancelled; records how late each tick wakes."""
        tick = self.lag_tick_s
        while True:
            expected = time.perf_counter() + tick
            await asyncio.sleep(tick)
            lag = max(0.0, time.perf_counter() - expected)
            with self._lock:
                self._lag_max = max(self._lag_max, lag)
                self._lag_seen = True
                record_seconds(self._lag_hist, lag)

    # --- results -------------------------------------------------------------------------

    def summary(self) -> ResourceSummary:
        s = self.samples
        if not s:
            return ResourceSummary(gpu=self._gpus.description if self._gpus else None)

        def mean(xs: list[float]) -> float:
            return sum(xs) / len(xs)

        lags = [x.loop_lag_ms for x in s if x.loop_lag_ms is not None]
        gpu_util = [x.gpu_util_pct for x in s if x.gpu_util_pct is not None]
        gpu_mem = [x.gpu_mem_used_mb for x in s if x.gpu_mem_used_mb is not None]
        return ResourceSummary(
            samples=len(s),
            cpu_pct_mean=mean([x.cpu_pct for x in s]),
            cpu_pct_max=max(x.cpu_pct for x in s),
            mem_pct_max=max(x.mem_pct for x in s),
            proc_cpu_pct_mean=mean([x.proc_cpu_pct for x in s]),
            proc_cpu_pct_max=max(x.proc_cpu_pct for x in s),
            proc_rss_mb_max=max(x.proc_rss_mb for x in s),
            loop_lag_ms_max=max(lags) if lags else None,
            loop_lag_ms_p99=percentiles(self._lag_hist).p99_ms if lags else None,
            gpu=self._gpus.description if self._gpus else "GPU monitoring off",
            gpu_util_pct_max=max(gpu_util) if gpu_util else None,
            gpu_mem_used_mb_max=max(gpu_mem) if gpu_mem else None,
        )


def attach_to_windows(samples: list[ResourceSample], windows: list[Window]) -> None:
    """Average (CPU) or take the worst (memory, lag) of the samples inside each window."""
    if not windows:
        return
    length = windows[0].length_s
    buckets: dict[int, list[ResourceSample]] = {}
    for sample in samples:
        buckets.setdefault(max(0, int(sample.t_s // length)), []).append(sample)
    for w in windows:
        inside = buckets.get(w.index, [])
        if not inside:
            continue
        lags = [x.loop_lag_ms for x in inside if x.loop_lag_ms is not None]
        gpu = [x.gpu_util_pct for x in inside if x.gpu_util_pct is not None]
        w.resources.update(
            cpu_pct=round(sum(x.cpu_pct for x in inside) / len(inside), 2),
            mem_pct=max(x.mem_pct for x in inside),
            proc_cpu_pct=round(sum(x.proc_cpu_pct for x in inside) / len(inside), 2),
            loop_lag_ms=round(max(lags), 3) if lags else None,
            gpu_util_pct=max(gpu) if gpu else None,
        )
