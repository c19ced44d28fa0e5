"""How llama.cpp runs the embedded `local` LM in this process, decided by a probe.

llama.cpp can kill its host process instead of raising: a source build for the native
CPU turns on AMX weight-repacking buffers that crash (`ggml_backend_amx_mul_mat`,
SIGSEGV) where the kernel does not let the process use the AMX tiles, and a wheel built
on another CPU dies with SIGILL. A segfault cannot be caught, so before the first load
in a process we run one tiny completion in a child process: with llama.cpp's extra
buffer types (the default, fastest where they work), then without them. The answer is
cached per CPU, llama-cpp-python version and model file under `$DSPYFLOW_HOME`, so the
probe costs one child process per machine, not per command.

`DSPYFLOW_LOCAL_EXTRA_BUFTS=on|off` skips the probe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

PROBE_SCHEMA = 1  # bump when the probe's meaning changes: old cache entries are ignored
PROBE_TIMEOUT_S = 120.0


class LlamaCannotRunError(RuntimeError):
    """llama.cpp crashes on this machine whatever we set: say so in one line."""


@dataclass(frozen=True)
class ProbeOutcome:
    ok: bool
    detail: str  # "ok", or how the child died ("SIGSEGV", "exit 1: ...", "timed out")


Probe = Callable[[Path, bool], ProbeOutcome]


def extra_bufts_setting() -> str:
    value = os.environ.get("DSPYFLOW_LOCAL_EXTRA_BUFTS", "auto").strip().lower()
    if value not in ("auto", "on", "off"):
        raise LlamaCannotRunError(
            f"DSPYFLOW_LOCAL_EXTRA_BUFTS={value!r} is not one of auto, on, off"
        )
    return value


def use_extra_bufts(model_path: Path, *, probe: Probe | None = None) -> bool:
    """Whether llama.cpp may use its extra (weight-repacking) buffer types here."""
    setting = extra_bufts_setting()
    if setting != "auto":
        return setting == "on"
    cache = _cache_path(model_path)
    cached = _read_cache(cache)
    if cached is not None:
        return cached
    probe = probe or run_probe
    with_bufts = probe(model_path, True)
    if with_bufts.ok:
        decision = True
    else:
        without = probe(model_path, False)
        if not without.ok:
            raise LlamaCannotRunError(
                f"llama.cpp cannot run the local LM on this CPU (probe: {with_bufts.detail}; "
                f"without extra buffer types: {without.detail}); use a remote LM "
                "(--lm openai/... --api-base ...) or rebuild llama-cpp-python with "
                'CMAKE_ARGS="-DGGML_NATIVE=OFF"'
            )
        decision = False
    _write_cache(cache, decision, with_bufts.detail)
    return decision


def run_probe(model_path: Path, extra_bufts: bool) -> ProbeOutcome:
    """One short chat completion in a child process; how it ended."""
    cmd = [sys.executable, "-m", "tasks.lm.llama_runtime", str(model_path)]
    cmd.append("on" if extra_bufts else "off")
    env = {**os.environ, "PYTHONPATH": _project_root_on_path()}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return ProbeOutcome(False, f"timed out after {PROBE_TIMEOUT_S:g} s")
    return outcome_of(done.returncode, done.stderr)


def outcome_of(returncode: int, stderr: str) -> ProbeOutcome:
    if returncode == 0:
        return ProbeOutcome(True, "ok")
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return ProbeOutcome(False, f"the process died with {name}")
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return ProbeOutcome(False, f"exit {returncode}: {lines[-1] if lines else 'no output'}")


def _project_root_on_path() -> str:
    root = str(Path(__file__).resolve().parent.parent)
    existing = os.environ.get("PYTHONPATH")
    return root if not existing else f"{root}{os.pathsep}{existing}"


# --- loading a model with the decided settings ---------------------------------------------

_params_lock = threading.Lock()


@contextlib.contextmanager
def model_params_override(**fields: Any) -> Iterator[None]:
    """Set fields of llama.cpp's model params that `Llama(...)` does not expose.

    `Llama.__init__` starts from `llama_cpp.llama_model_default_params()` (looked up on
    the module at call time), so for the duration of one constructor call that function
    returns params with `fields` set. The lock keeps two loads from interleaving.
    """
    import llama_cpp.llama_cpp as bindings

    original = bindings.llama_model_default_params

    def patched():
        params = original()
        for name, value in fields.items():
            setattr(params, name, value)
        return params

    with _params_lock:
        bindings.llama_model_default_params = patched
        try:
            yield
        finally:
            bindings.llama_model_default_params = original


def load_llama(model_path: Path, *, extra_bufts: bool, **kwargs: Any) -> Any:
    """`llama_cpp.Llama` for `model_path`, with or without extra buffer types."""
    from llama_cpp import Llama

    if extra_bufts:
        return Llama(model_path=str(model_path), **kwargs)
    with model_params_override(use_extra_bufts=False):
        return Llama(model_path=str(model_path), **kwargs)


def server_command(model_path: Path, *, alias: str, port: int, threads: int) -> list[str]:
    """llama-cpp-python's OpenAI-compatible server for `model_path` on 127.0.0.1:`port`,
    loading the model as the `local` LM does (without extra buffer types where the probe
    found they crash). Needs llama-cpp-python's `[server]` extra."""
    launch = (
        "import runpy, sys\n"
        "from tasks.lm.llama_runtime import model_params_override\n"
        "sys.argv = ['llama_cpp.server', *sys.argv[1:]]\n"
        f"with model_params_override(use_extra_bufts={use_extra_bufts(model_path)}):\n"
        "    runpy.run_module('llama_cpp.server', run_name='__main__')\n"
    )
    return [
        sys.executable, "-c", launch,
        "--model", str(model_path), "--model_alias", alias,
        "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", "4096", "--n_threads", str(threads), "--n_threads_batch", str(threads),
    ]  # fmt: skip


# --- the cache ---------------------------------------------------------------------------


def _fingerprint(model_path: Path) -> str:
    try:
        llama_version = version("llama_cpp_python")
    except PackageNotFoundError:
        llama_version = "unknown"
    try:
        stat = model_path.stat()
        model = f"{model_path.name}:{stat.st_size}"
    except OSError:
        model = model_path.name
    parts = [str(PROBE_SCHEMA), llama_version, model, _cpu_signature()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _cpu_signature() -> str:
    """Model name and feature flags: the same binary behaves alike on equal CPUs."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return f"{platform.machine()} {platform.processor()}"
    keep = [
        line
        for line in text.splitlines()
        if line.startswith(("model name", "flags", "Features", "CPU part"))
    ]
    return "\n".join(sorted(set(keep)))


def _cache_path(model_path: Path) -> Path:
    from storage.db import StorageSettings

    home = StorageSettings().home.expanduser()
    return home / "llama-probe" / f"{_fingerprint(model_path)}.json"


def _read_cache(path: Path) -> bool | None:
    try:
        data = json.loads(path.read_text())
        return bool(data["use_extra_bufts"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(path: Path, decision: bool, detail: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"use_extra_bufts": decision, "probe_with_extra_bufts": detail}))
        tmp.replace(path)
    except OSError:  # a read-only home only costs a probe per process
        pass


def _probe_main(argv: list[str]) -> int:
    """The child: load the model and decode a few tokens, the calls that crashed."""
    model_path, mode = Path(argv[0]), argv[1]
    llm = load_llama(model_path, extra_bufts=mode == "on", n_ctx=256, n_threads=1, verbose=False)
    llm.create_chat_completion(
        messages=[{"role": "user", "content": "Say hi."}], max_tokens=4, temperature=0.0
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(_probe_main(sys.argv[1:]))
