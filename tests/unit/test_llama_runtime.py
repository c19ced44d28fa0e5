"""The embedded LM never segfaults its host: a probe in a child process decides how
llama.cpp runs, and a CPU where it cannot run gets one clear line.

The crashing probes here are real child processes that die by SIGSEGV, as llama.cpp's
AMX repack buffers do on a host whose kernel forbids AMX tiles."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.lm.llama_runtime import (
    LlamaCannotRunError,
    ProbeOutcome,
    outcome_of,
    run_probe,
    use_extra_bufts,
)

SEGFAULT = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"


def _child_probe(crash_with_bufts: bool, crash_without: bool, calls: list[bool]):  # type: ignore[no-untyped-def]
    def probe(model_path: Path, extra_bufts: bool) -> ProbeOutcome:
        calls.append(extra_bufts)
        crash = crash_with_bufts if extra_bufts else crash_without
        done = subprocess.run([sys.executable, "-c", SEGFAULT if crash else "pass"])
        return outcome_of(done.returncode, "")

    return probe


@pytest.fixture
def model_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DSPYFLOW_HOME", str(tmp_path / "home"))  # a probe cache of its own
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 64)
    return path


def test_crash_with_extra_buffers_falls_back_and_is_remembered(model_file, monkeypatch) -> None:
    monkeypatch.delenv("DSPYFLOW_LOCAL_EXTRA_BUFTS", raising=False)
    calls: list[bool] = []
    probe = _child_probe(crash_with_bufts=True, crash_without=False, calls=calls)
    assert use_extra_bufts(model_file, probe=probe) is False
    assert calls == [True, False]
    # The decision is cached per machine: the next process does not probe again.
    assert use_extra_bufts(model_file, probe=probe) is False
    assert calls == [True, False]


def test_working_extra_buffers_are_kept(model_file, monkeypatch) -> None:
    """Where the fast path works (AMX allowed, or no AMX) it stays on."""
    monkeypatch.delenv("DSPYFLOW_LOCAL_EXTRA_BUFTS", raising=False)
    calls: list[bool] = []
    assert use_extra_bufts(model_file, probe=_child_probe(False, False, calls)) is True
    assert calls == [True]


def test_crash_either_way_is_one_clear_line(model_file, monkeypatch) -> None:
    monkeypatch.delenv("DSPYFLOW_LOCAL_EXTRA_BUFTS", raising=False)
    with pytest.raises(LlamaCannotRunError) as info:
        use_extra_bufts(model_file, probe=_child_probe(True, True, []))
    message = str(info.value)
    assert "\n" not in message
    assert "SIGSEGV" in message and "--api-base" in message


@pytest.mark.parametrize(("setting", "expected"), [("on", True), ("off", False)])
def test_setting_skips_the_probe(model_file, monkeypatch, setting, expected) -> None:
    monkeypatch.setenv("DSPYFLOW_LOCAL_EXTRA_BUFTS", setting)
    calls: list[bool] = []
    assert use_extra_bufts(model_file, probe=_child_probe(True, True, calls)) is expected
    assert calls == []


def test_bad_setting_is_refused(model_file, monkeypatch) -> None:
    monkeypatch.setenv("DSPYFLOW_LOCAL_EXTRA_BUFTS", "maybe")
    with pytest.raises(LlamaCannotRunError, match="DSPYFLOW_LOCAL_EXTRA_BUFTS"):
        use_extra_bufts(model_file)


needs_llama = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="needs the `local` extra"
)


@pytest.mark.local_lm
@needs_llama
def test_real_probe_runs_the_model_both_ways() -> None:
    """The probe's child really loads SmolLM2 and decodes without extra buffers, on every
    CPU. With them it decodes too, except on a CPU that reports AMX, where llama.cpp's AMX
    buffers may die on tiles the kernel does not grant (SIGSEGV or SIGILL, seen on CI's
    machines): then the probe must report the death, not hang or raise."""
    from tasks.lm.local import local_model_path

    path = local_model_path()
    with_bufts = run_probe(path, True)
    if not with_bufts.ok:
        assert _cpu_reports_amx(), with_bufts
        assert with_bufts.detail in (
            "the process died with SIGSEGV",
            "the process died with SIGILL",
        ), with_bufts
    assert run_probe(path, False) == ProbeOutcome(True, "ok")


def _cpu_reports_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.local_lm
@needs_llama
def test_real_probe_reports_a_model_that_cannot_load(model_file) -> None:
    outcome = run_probe(model_file, True)
    assert not outcome.ok and outcome.detail.startswith("exit 1:")


@pytest.mark.local_lm
@needs_llama
def test_load_without_extra_buffers_sets_the_model_param() -> None:
    from tasks.lm.llama_runtime import load_llama
    from tasks.lm.local import local_model_path

    llm = load_llama(local_model_path(), extra_bufts=False, n_ctx=128, verbose=False)
    assert llm.model_params.use_extra_bufts is False
    import llama_cpp

    # Only that one load was changed: the library default is back.
    assert llama_cpp.llama_model_default_params().use_extra_bufts is True
