"""Device detection, selection and facts: CUDA, ROCm (HIP), Apple MPS, and the CPU fallback.

ROCm builds of torch expose AMD GPUs through the `torch.cuda` API (device type "cuda"), so
the backend is told apart by `torch.version.hip`, not by the device string.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from collections.abc import Iterator
from enum import StrEnum
from functools import lru_cache
from typing import Any

import psutil
import torch
from pydantic import BaseModel, ConfigDict

from storage.environment import cpu_model

log = logging.getLogger("dspyflow.gpu.device")

DeviceSpec = str | torch.device


class DeviceUnavailableError(ValueError):
    """The requested device does not exist on this machine (message names what does)."""


class Backend(StrEnum):
    cuda = "cuda"
    rocm = "rocm"
    mps = "mps"
    cpu = "cpu"


class DeviceInfo(BaseModel):
    """Facts about one device, as recorded next to every benchmark figure."""

    model_config = ConfigDict(frozen=True)

    device: str  # canonical torch string: "cpu", "cuda:0", "mps"
    backend: Backend
    name: str
    total_memory_bytes: int | None = None
    free_memory_bytes: int | None = None
    compute_capability: str | None = None  # "9.0" on H100; the gfx arch on ROCm
    multiprocessors: int | None = None
    torch_version: str
    runtime_version: str | None = None  # CUDA or HIP runtime torch was built with
    driver: str | None = None
    cpu_threads: int | None = None

    def environment_facts(self) -> dict[str, Any]:
        """The facts that key benchmark history (storage.environment adds the host's)."""
        return {
            "device_name": self.name,
            "device_type": self.device.split(":")[0],
            "backend": str(self.backend),
            "compute_capability": self.compute_capability,
            "total_memory_bytes": self.total_memory_bytes,
            "driver": self.driver,
            "runtime": self.runtime_version,
            "torch_version": self.torch_version,
        }


# --- detection ------------------------------------------------------------------------


def cuda_available() -> bool:
    """True for NVIDIA CUDA and for AMD ROCm (both use the torch.cuda API)."""
    try:
        return torch.cuda.is_available()
    except Exception:  # a broken driver install must not take the CPU path down with it
        return False


def is_rocm() -> bool:
    return getattr(torch.version, "hip", None) is not None


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def gpu_backend() -> Backend | None:
    """The accelerator backend torch can use here, or None on a CPU-only machine."""
    if cuda_available():
        return Backend.rocm if is_rocm() else Backend.cuda
    if mps_available():
        return Backend.mps
    return None


def available_devices() -> list[str]:
    """Every device torch can use here, best first; "cpu" is always last and always there."""
    devices: list[str] = []
    if cuda_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if mps_available():
        devices.append("mps")
    devices.append("cpu")
    return devices


def backend_of(device: DeviceSpec) -> Backend:
    dev = torch.device(device)
    if dev.type == "cuda":
        return Backend.rocm if is_rocm() else Backend.cuda
    if dev.type == "mps":
        return Backend.mps
    return Backend.cpu


# --- choosing -------------------------------------------------------------------------


def _unavailable(requested: str, reason: str) -> DeviceUnavailableError:
    return DeviceUnavailableError(
        f"device {requested!r} is not available ({reason}); "
        f"available: {', '.join(available_devices())}"
    )


def resolve_device(spec: DeviceSpec = "auto", *, fallback: bool = False) -> torch.device:
    """Turn "auto" | "cpu" | "cuda" | "cuda:1" | "mps" (or a torch.device) into a device.

    "auto" picks the best accelerator and else the CPU. An absent device raises
    `DeviceUnavailableError` naming it and what is available, unless ``fallback`` is
    true: then the CPU is used and a warning logged.
    """
    requested = str(spec).strip().lower() if not isinstance(spec, torch.device) else str(spec)
    if requested in ("", "auto"):
        if cuda_available():
            return torch.device("cuda", torch.cuda.current_device())
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    # "rocm"/"hip" are user-facing aliases: torch addresses AMD GPUs as "cuda".
    if requested.startswith(("rocm", "hip")):
        _, _, index = requested.partition(":")
        requested = f"cuda:{index}" if index else "cuda"
    try:
        dev = torch.device(requested)
    except RuntimeError:
        raise DeviceUnavailableError(
            f"unknown device {requested!r}; expected auto, cpu, cuda, cuda:N, mps; "
            f"available: {', '.join(available_devices())}"
        ) from None
    try:
        _check_present(dev, requested)
    except DeviceUnavailableError as exc:
        if not fallback:
            raise
        log.warning("%s; falling back to cpu", exc)
        return torch.device("cpu")
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return dev


def _check_present(dev: torch.device, requested: str) -> None:
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not cuda_available():
            raise _unavailable(requested, "no CUDA/ROCm device, or torch was built without it")
        count = torch.cuda.device_count()
        if dev.index is not None and not 0 <= dev.index < count:
            raise _unavailable(requested, f"this machine has {count} CUDA device(s)")
        return
    if dev.type == "mps":
        if not mps_available():
            raise _unavailable(requested, "Apple MPS is not available")
        return
    raise _unavailable(requested, f"device type {dev.type!r} is not supported by dspyflow")


def synchronize(device: DeviceSpec | None = None) -> None:
    """Wait for all queued work on ``device`` (a no-op on the CPU, whose ops are eager)."""
    dev = torch.device(device) if device is not None else None
    if dev is None:
        if cuda_available():
            torch.cuda.synchronize()
        elif mps_available():
            torch.mps.synchronize()
        return
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()


# --- facts ----------------------------------------------------------------------------


@lru_cache(maxsize=1)
@lru_cache(maxsize=1)
def nvidia_driver_version() -> str | None:
    """The NVIDIA kernel driver version via NVML (nvidia-ml-py), if there is one."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # no NVML library or no NVIDIA driver: not an error, just unknown
        return None


def device_info(device: DeviceSpec = "auto") -> DeviceInfo:
    dev = resolve_device(device)
    backend = backend_of(dev)
    common = {"device": str(dev), "backend": backend, "torch_version": torch.__version__}
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        if backend is Backend.rocm:
            capability = getattr(props, "gcnArchName", None) or f"{props.major}.{props.minor}"
            runtime, driver = f"hip {torch.version.hip}", None
        else:
            capability = f"{props.major}.{props.minor}"
            runtime, driver = f"cuda {torch.version.cuda}", nvidia_driver_version()
        return DeviceInfo(
            **common,
            name=props.name,
            total_memory_bytes=int(total),
            free_memory_bytes=int(free),
            compute_capability=capability,
            multiprocessors=props.multi_processor_count,
            runtime_version=runtime,
            driver=driver,
        )
    vm = psutil.virtual_memory()
    if dev.type == "mps":
        # Unified memory: the system's RAM is the device's; Metal reports its own ceiling.
        total = int(getattr(torch.mps, "recommended_max_memory", lambda: vm.total)())
        return DeviceInfo(
            **common,
            name=f"Apple MPS ({platform.machine()})",
            total_memory_bytes=total,
            free_memory_bytes=int(vm.available),
            driver=platform.mac_ver()[0] or None,
        )
    return DeviceInfo(
        **common,
        name=cpu_model(),
        total_memory_bytes=int(vm.total),
        free_memory_bytes=int(vm.available),
        cpu_threads=torch.get_num_threads(),
    )


# --- a stateful manager for callers that switch devices -------------------------------


class DeviceManager:
    """Holds the current device; `use()` switches it for a block and switches back."""

    def __init__(self, device: DeviceSpec = "auto", *, fallback: bool = False) -> None:
        self._fallback = fallback
        self._device = resolve_device(device, fallback=fallback)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def backend(self) -> Backend:
        return backend_of(self._device)

    @property
    def is_gpu(self) -> bool:
        return self._device.type != "cpu"

    def switch(self, device: DeviceSpec) -> torch.device:
        """Make ``device`` current (validated first: on failure the old one stays)."""
        new = resolve_device(device, fallback=self._fallback)
        if new.type == "cuda":
            torch.cuda.set_device(new)
        self._device = new
        return new

    @contextlib.contextmanager
    def use(self, device: DeviceSpec) -> Iterator[torch.device]:
        previous = self._device
        try:
            yield self.switch(device)
        finally:
            self._device = previous
            if previous.type == "cuda":
                torch.cuda.set_device(previous)

    def to(self, tensor: torch.Tensor, *, non_blocking: bool = False) -> torch.Tensor:
        return tensor.to(self._device, non_blocking=non_blocking)

    def synchronize(self) -> None:
        synchronize(self._device)

    def info(self) -> DeviceInfo:
        return device_info(self._device)

    def available(self) -> list[str]:
        return available_devices()

    def __repr__(self) -> str:
        return f"DeviceManager(device={str(self._device)!r})"


def use_all_cpu_threads() -> int:
    """A fair CPU baseline uses every core (torch defaults may use fewer)."""
    n = os.cpu_count() or 1
    torch.set_num_threads(n)
    return n
