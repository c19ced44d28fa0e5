"""Memory: current and peak allocation, cleanup, and chunked work that backs off under pressure.

On CUDA/ROCm the figures are torch's caching-allocator statistics (tensor bytes, not what
the driver reserved). On the CPU they are the process's resident set (psutil) and its
high-water mark (Linux VmHWM, which `reset_peak` clears through /proc/self/clear_refs).
`track_tensor_allocations` counts the bytes of tensors created inside a block on any device:
the way to check on a CPU that an op stays under a byte budget.
"""

from __future__ import annotations

import gc
import logging
import re
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generic, TypeVar

import psutil
import torch
from pydantic import BaseModel, ConfigDict
from torch.utils._python_dispatch import TorchDispatchMode

from gpu.device import DeviceSpec, resolve_device

log = logging.getLogger("dspyflow.gpu.memory")

T = TypeVar("T")

_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


class MemoryStats(BaseModel):
    device: str
    source: str  # "torch.cuda", "torch.mps" or "process-rss"
    current_bytes: int
    peak_bytes: int
    reserved_bytes: int | None = None  # CUDA caching allocator's reservation


def _rss_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


def _rss_peak_bytes() -> int:
    try:
        match = re.search(r"VmHWM:\s+(\d+)\s+kB", _PROC_STATUS.read_text())
        if match:
            return int(match.group(1)) * 1024
    except OSError:
        pass
    import resource  # not Linux: the lifetime peak (cannot be reset)

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def memory_stats(device: DeviceSpec = "auto") -> MemoryStats:
    dev = resolve_device(device)
    if dev.type == "cuda":
        return MemoryStats(
            device=str(dev),
            source="torch.cuda",
            current_bytes=torch.cuda.memory_allocated(dev),
            peak_bytes=torch.cuda.max_memory_allocated(dev),
            reserved_bytes=torch.cuda.memory_reserved(dev),
        )
    if dev.type == "mps":
        current = int(torch.mps.current_allocated_memory())
        # MPS keeps no peak counter; the driver's total is the closest upper figure.
        return MemoryStats(
            device=str(dev),
            source="torch.mps",
            current_bytes=current,
            peak_bytes=max(current, int(torch.mps.driver_allocated_memory())),
        )
    rss = _rss_bytes()
    return MemoryStats(
        device=str(dev),
        source="process-rss",
        current_bytes=rss,
        peak_bytes=max(rss, _rss_peak_bytes()),
    )


def current_allocated(device: DeviceSpec = "auto") -> int:
    return memory_stats(device).current_bytes


def peak_allocated(device: DeviceSpec = "auto") -> int:
    return memory_stats(device).peak_bytes


def reset_peak(device: DeviceSpec = "auto") -> None:
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        return
    if dev.type == "cpu":
        try:  # "5" resets the process's peak RSS (Linux >= 4.0)
            _PROC_CLEAR_REFS.write_text("5")
        except OSError:
            log.debug("cannot reset peak RSS here; peak stays the process lifetime peak")


def cleanup(device: DeviceSpec | None = None) -> int:
    """Collect garbage and return cached blocks to the driver; returns bytes released."""
    dev = resolve_device(device or "auto")
    before = memory_stats(dev)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        after = memory_stats(dev)
        return max(0, (before.reserved_bytes or 0) - (after.reserved_bytes or 0))
    if dev.type == "mps":
        torch.mps.empty_cache()
    after = memory_stats(dev)
    return max(0, before.current_bytes - after.current_bytes)


# --- counting tensor bytes on any device ----------------------------------------------


class AllocationTracker:
    """Live and peak bytes of tensor storages created while the tracker is active."""

    def __init__(self) -> None:
        self.current_bytes = 0
        self.peak_bytes = 0
        self.largest_bytes = 0
        self.largest_shape: tuple[int, ...] = ()
        self._live: dict[int, list[int]] = {}  # storage ptr -> [nbytes, live tensors]

    def _release(self, ptr: int) -> None:
        entry = self._live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            self.current_bytes -= entry[0]
            del self._live[ptr]

    def _see(self, t: torch.Tensor, preexisting: set[int]) -> None:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in preexisting:
            return
        entry = self._live.get(ptr)
        if entry is None:
            nbytes = storage.nbytes()
            entry = self._live[ptr] = [nbytes, 0]
            self.current_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
            if nbytes > self.largest_bytes:
                self.largest_bytes, self.largest_shape = nbytes, tuple(t.shape)
        entry[1] += 1
        weakref.finalize(t, self._release, ptr)


class _TrackingMode(TorchDispatchMode):
    def __init__(self, tracker: AllocationTracker) -> None:
        super().__init__()
        self.tracker = tracker

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Nothing is compiled under this mode; without this torch wraps __torch_dispatch__ in
        # dynamo.disable, whose first call imports torch._dynamo (seconds on 2 cores).
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Storages of the inputs (including out= buffers) are not new allocations.
        preexisting = {
            a.untyped_storage().data_ptr()
            for a in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(a, torch.Tensor)
        }
        out = func(*args, **kwargs)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.tracker._see(t, preexisting)
        return out


@contextmanager
def track_tensor_allocations() -> Iterator[AllocationTracker]:
    """Count the bytes of every tensor storage made inside the block (any device).

    Why: on a CPU there is no allocator peak to read, and RSS moves with the allocator's
    caching; this sees each torch op's outputs, so a test can assert that no q x N score
    matrix was ever built and that live extra memory stayed under a budget.
    """
    tracker = AllocationTracker()
    with _TrackingMode(tracker):
        yield tracker


# --- chunked work under memory pressure -----------------------------------------------


class SimulatedOutOfMemoryError(RuntimeError):
    """Raised by `SimulatedMemoryBudget` to exercise the back-off path without a GPU."""


OOM_ERRORS: tuple[type[BaseException], ...] = (torch.OutOfMemoryError, SimulatedOutOfMemoryError)


class MemoryPressureError(RuntimeError):
    """Out of memory even at the smallest chunk: the work cannot be done on this device."""


class SimulatedMemoryBudget:
    """An injectable fault: a chunk of more than ``budget_bytes // bytes_per_item`` items OOMs."""

    def __init__(self, budget_bytes: int, bytes_per_item: int) -> None:
        self.budget_bytes = budget_bytes
        self.bytes_per_item = max(1, bytes_per_item)
        self.raised = 0

    def __call__(self, items: int) -> None:
        need = items * self.bytes_per_item
        if need > self.budget_bytes:
            self.raised += 1
            raise SimulatedOutOfMemoryError(
                f"simulated OOM: a chunk of {items} items needs {need} bytes, "
                f"budget {self.budget_bytes}"
            )


class ChunkedRun(BaseModel, Generic[T]):
    """What `run_chunked` did: the per-chunk outputs and how hard it had to back off."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    outputs: list[Any]
    initial_chunk: int
    final_chunk: int
    halvings: int
    chunks: int


def run_chunked(
    fn: Callable[[int, int], T],
    total: int,
    chunk: int,
    *,
    min_chunk: int = 1,
    fault: Callable[[int], None] | None = None,
    device: DeviceSpec | None = None,
    label: str = "chunked op",
    on_oom: Callable[[], None] | None = None,
) -> ChunkedRun[T]:
    """Call ``fn(start, stop)`` over ``range(total)`` in chunks of at most ``chunk`` items.

    On an out-of-memory error (real, or raised by ``fault(items)`` which is called before
    each chunk) the failed chunk's memory is released, the chunk size halved, and the same
    chunk retried; the smaller size is kept for the rest of the run. Every halving is
    logged and counted in the result. ``on_oom`` lets ``fn``'s owner drop its buffers
    before the cache is emptied.
    """
    if total < 0 or chunk < 1 or min_chunk < 1:
        raise ValueError(
            f"run_chunked needs total >= 0 and chunk, min_chunk >= 1; got "
            f"total={total}, chunk={chunk}, min_chunk={min_chunk}"
        )
    outputs: list[Any] = []
    initial, halvings, start = chunk, 0, 0
    while start < total:
        stop = min(start + chunk, total)
        oom: str | None = None
        try:
            if fault is not None:
                fault(stop - start)
            outputs.append(fn(start, stop))
        except OOM_ERRORS as exc:
            oom = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if oom is None:
            start = stop
            continue
        # Outside the except block: the traceback (and the tensors it pins) is gone.
        if chunk <= min_chunk:
            raise MemoryPressureError(
                f"{label}: out of memory at the smallest chunk ({chunk} items) after "
                f"{halvings} halving(s): {oom}"
            )
        if on_oom is not None:
            on_oom()
        if resolve_device(device or "auto").type != "cpu":
            cleanup(device)  # return the failed chunk's blocks to the driver before retrying
        chunk = max(min_chunk, chunk // 2)
        halvings += 1
        log.warning(
            "%s: out of memory (%s); halving the chunk to %d items (halving %d)",
            label,
            oom,
            chunk,
            halvings,
        )
    return ChunkedRun(
        outputs=outputs,
        initial_chunk=initial,
        final_chunk=chunk,
        halvings=halvings,
        chunks=len(outputs),
    )
