"""Correctness checks and target timings for one device: what scripts/gpu-check.sh runs.

    python -m gpu.check --device cuda --out gpu-check.json        # a lent H100/H200, ~3 min
    python -m gpu.check --device cpu --small --out check.json     # the same checks, small

Writes ONE JSON file, rewritten after every step (a timeout keeps what was done):
- ``checks``: top-k against `torch.topk` on float32 scores of the inputs as given (k = 1,
  10, 64; a ragged database; planted near-ties that are distinct in float32 but equal in
  float16, and exact duplicates) for every selection path that runs on the device (topk,
  grouped, fused; whole and chunked) and each dtype; `normalize_rows` against
  `F.normalize` and `pairwise_l2` against a float64 reference; on CUDA the fused kernel's
  launch over 16 queries x 20M rows.
- ``suite``: `gpu.benchmark.run_suite` (``full`` on a GPU, a scaled-down ``small`` with
  ``--small``), saved with ``--json-out``'s format and then stored through
  ``benchmarks/gpu_ops.py --load FILE --store`` into a scratch SQLite database.
- ``targets``: the three targets from the suite (grouped and fused top-k 1024 x 1M x 384
  fp16 <= 1.5 ms and <= 1 GB extra; normalize 1M x 384 fp32 <= 1.0 ms; pairwise L2
  8192 x 8192 x 384 fp32 <= 1.2 ms): median with min-max and n, extra memory, met or not.
A failing check is recorded with its error and the next one runs; the exit status is 1
when any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gpu import tensor_ops as ops
from gpu.device import device_info, resolve_device

REPO_ROOT = Path(__file__).resolve().parent.parent
KS = (1, 10, 64)
# Float32 scores of the same inputs summed in another order differ by a few ulps: ranks
# closer than this are ties, whichever row wins.
SCORE_TOL = 4e-6
# Returned values are rounded to the input dtype: at most half an ulp below 1.
VALUE_TOL = {torch.float32: 4e-6, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


# --- top-k exactness -------------------------------------------------------------------


def planted_database(
    n_queries: int,
    n_rows: int,
    dim: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    seed: int = 0,
    planted: int = 80,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and a unit-row database where, for the first queries, ``planted`` rows
    scattered over the database score 0.90-0.90+planted*2e-5: distinct in float32, many
    equal in float16 (its step there is 4.9e-4); two of them are exact duplicates."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n_queries, dim, generator=gen)
    db = torch.randn(n_rows, dim, generator=gen)
    qn = F.normalize(q, dim=1)
    spots = torch.randperm(n_rows, generator=gen)[: planted * min(4, n_queries)]
    for j in range(min(4, n_queries)):
        rows = spots[j * planted : (j + 1) * planted]
        cos = 0.90 + 2e-5 * torch.arange(planted, dtype=torch.float32)
        v = torch.randn(planted, dim, generator=gen)
        v -= (v @ qn[j]).unsqueeze(1) * qn[j]  # orthogonal to the query
        v = F.normalize(v, dim=1)
        db[rows] = cos.unsqueeze(1) * qn[j] + (1 - cos**2).sqrt().unsqueeze(1) * v
        db[rows[1]] = db[rows[0]]  # an exact tie
    db = ops.normalize_rows(db.to(device=device, dtype=dtype))
    return q.to(device=device, dtype=dtype), db


def reference_scores(q: torch.Tensor, db: torch.Tensor, *, normalized: bool = True) -> torch.Tensor:
    """float32 cosine scores of the inputs as given: what a user's fp32 torch computes
    (``normalized``: the rows are an index already normalized, used as they are)."""
    rows = db.float() if normalized else F.normalize(db.float(), dim=1)
    return F.normalize(q.float(), dim=1) @ rows.T


def compare_topk(
    values: torch.Tensor, indices: torch.Tensor, scores: torch.Tensor, k: int
) -> dict[str, Any]:
    """How a top-k answer differs from `torch.topk` on the float32 ``scores``.

    - ``score_err``: the returned rows' true scores, sorted, vs the k best scores (0 when
      the right rows came back, whichever of exactly tied rows);
    - ``winners_differ``: ranks whose score is clear of its neighbours by SCORE_TOL (not a
      tie) where torch.topk's row is missing from ours;
    - ``value_err``: returned values vs the k best, in units of the output dtype's step.
    """
    ref_v, ref_i = torch.topk(scores, k, dim=1)
    got = torch.gather(scores, 1, indices).sort(dim=1, descending=True).values
    score_err = float((got - ref_v).abs().max())
    # A rank is clear when no other score lies within SCORE_TOL of it: the (k+1)-th too.
    wide = torch.topk(scores, min(k + 1, scores.shape[1]), dim=1).values
    gaps = (wide[:, :-1] - wide[:, 1:]).abs() if wide.shape[1] > k else None
    clear = torch.ones_like(ref_v, dtype=torch.bool)
    if gaps is not None:
        clear &= gaps[:, :k] > SCORE_TOL
        clear[:, 1:] &= gaps[:, : k - 1] > SCORE_TOL
    present = (ref_i.unsqueeze(2) == indices.unsqueeze(1)).any(dim=2)
    winners_differ = int((clear & ~present).sum())
    value_err = float((values.float().sort(dim=1, descending=True).values - ref_v).abs().max())
    dup = bool((indices.sort(dim=1).values.diff(dim=1) == 0).any()) if k > 1 else False
    step = VALUE_TOL[values.dtype]
    return {
        "score_err": score_err,
        "winners_differ": winners_differ,
        "value_err_steps": value_err / step,
        "duplicate_rows": dup,
        "near_ties": near_ties(scores, k),
        "ok": score_err <= SCORE_TOL
        and winners_differ == 0
        and value_err <= step * 1.01
        and not dup,
    }


def near_ties(scores: torch.Tensor, k: int) -> int:
    """Pairs of adjacent top-(k+1) scores that differ in float32 but not in float16."""
    top = torch.topk(scores, min(k + 1, scores.shape[1]), dim=1).values
    same16 = top[:, :-1].half() == top[:, 1:].half()
    return int((same16 & (top[:, :-1] != top[:, 1:])).sum())


def selection_paths(device: torch.device) -> list[dict[str, Any]]:
    """Every selection path that runs on ``device`` (the fused one needs Triton)."""
    paths: list[dict[str, Any]] = [
        {"selection": "auto"},
        {"selection": "topk"},
        {"selection": "grouped"},
    ]
    if ops._fused_usable(device):
        paths.append({"selection": "fused", "normalized": True})
    return paths


def _topk_case(
    q: torch.Tensor, db: torch.Tensor, scores: torch.Tensor, k: int, kwargs: dict[str, Any]
) -> dict[str, Any]:
    res = ops.topk_cosine_search(q, db, k, **kwargs)
    return {"path": res.path, **compare_topk(res.values, res.indices, scores, k)}


def topk_checks(device: torch.device, *, small: bool, record: Callable[..., None]) -> None:
    n_q, n_rows, dim = (16, 3001, 64) if small else (64, 100_003, 384)
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    for dtype in dtypes:
        q, db = planted_database(n_q, n_rows, dim, dtype, device)
        scores = reference_scores(q, db)
        for path in selection_paths(device):
            if path["selection"] == "fused" and dtype == torch.float32:
                continue  # the fused kernel takes half inputs only
            for chunk_rows in (None, n_rows // 3 + 7):  # whole, and ragged chunks
                for k in KS:
                    kwargs = {"normalized": True, **path, "chunk_rows": chunk_rows}
                    name = (
                        f"topk {path['selection']} {str(dtype)[6:]} k={k} "
                        f"{n_q}x{n_rows}x{dim}{' chunked' if chunk_rows else ''}"
                    )

                    record(name, partial(_topk_case, q, db, scores, k, kwargs))


def elementwise_checks(device: torch.device, *, small: bool, record: Callable[..., None]) -> None:
    n, m, d = (300, 200, 48) if small else (20_000, 2048, 384)
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = (torch.randn(n, d, generator=gen) * 20).to(device=device, dtype=dtype)
        y = torch.randn(m, d, generator=gen).to(device=device, dtype=dtype)
        tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]

        def norm(x: torch.Tensor = x, tol: float = tol) -> dict[str, Any]:
            got = ops.normalize_rows(x).double()
            err = float((got - F.normalize(x.double(), dim=1)).abs().max())
            return {"path": ops.kernel_path("normalize", x.device), "max_err": err, "ok": err < tol}

        def l2(x: torch.Tensor = x, y: torch.Tensor = y, tol: float = tol) -> dict[str, Any]:
            xs = x[:512]
            got = ops.pairwise_l2(xs, y).double()
            ref = torch.cdist(xs.double(), y.double())
            rel = float(((got - ref).abs() / ref.clamp_min(1e-6)).max())
            half = ops._uses_half_gemm(x.dtype, x.device)
            return {
                "path": "half GEMM" if half else "fp32 GEMM",
                "max_rel_err": rel,
                "ok": rel < 4 * tol,
            }

        record(f"normalize {str(dtype)[6:]} {n}x{d}", norm)
        record(f"pairwise_l2 {str(dtype)[6:]} 512x{m}x{d}", l2)


def sliced_reference_topk(
    q: torch.Tensor, db: torch.Tensor, k: int, rows: int = 2_000_000
) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk on float32 scores of a database too big for one score matrix."""
    qf = F.normalize(q.float(), dim=1)
    best_v, best_i = [], []
    for s in range(0, db.shape[0], rows):
        v, i = torch.topk(qf @ db[s : s + rows].float().T, k, dim=1)
        best_v.append(v)
        best_i.append(i + s)
    v, pos = torch.topk(torch.cat(best_v, 1), k, dim=1)
    return v, torch.gather(torch.cat(best_i, 1), 1, pos)


def launch_check(device: torch.device, record: Callable[..., None]) -> None:
    """The fused kernel over 16 queries x 20M rows: 78,125+ database blocks, more than a
    CUDA grid's axis 1 takes (65,535); exact against a chunked float32 reference."""
    if not ops._fused_usable(device) or device.type != "cuda":
        record("fused launch 16x20000000x384", lambda: {"skipped": "needs CUDA and Triton"})
        return

    def run() -> dict[str, Any]:
        gen = torch.Generator(device=device).manual_seed(3)
        q = torch.randn(16, 384, device=device, generator=gen, dtype=torch.float16)
        db = torch.randn(20_000_000, 384, device=device, generator=gen, dtype=torch.float16)
        db = ops.normalize_rows(db)  # in place would be better; 31 GB fits an H100
        res = ops.topk_cosine_search(q, db, 10, normalized=True, selection="fused")
        v, ref_i = sliced_reference_topk(q, db, 10)
        same = float((res.indices.sort(1).values == ref_i.sort(1).values).float().mean())
        err = float((res.values.float() - v).abs().max())
        return {
            "chunks": res.chunks,
            "path": res.path,
            "same_rows": same,
            "value_err": err,
            "ok": same == 1.0 and err <= VALUE_TOL[torch.float16],
        }

    record("fused launch 16x20000000x384", run)


# --- the suite, the targets and storing -----------------------------------------------


def suite_and_targets(
    device: torch.device,
    *,
    small: bool,
    out: Path,
    scratch: Path,
    report: dict[str, Any],
    save: Callable[[], None],
) -> None:
    from gpu.benchmark import GPU_TARGETS, BenchmarkConfig, run_suite

    lines: list[dict[str, Any]] = report.setdefault("suite_lines", [])

    def on_result(item: Any) -> None:  # each case in the report as soon as it is measured
        lines.append(item.line())
        save()

    cfg = BenchmarkConfig(
        device=str(device),
        sizes="small" if small else "full",
        cpu_baseline=False,  # the CPU's figures come from the CPU run, not from here
        **({"reps": 2, "warmup": 0, "scale": 0.1} if small else {}),
    )
    result = run_suite(cfg, on_result=on_result)
    # The whole result (samples too): `benchmarks/gpu_ops.py --load <this file>` reads it.
    report["suite_result"] = json.loads(result.model_dump_json())
    report["suite"] = result.summary()
    report["targets"] = []
    for r in result.results:
        if r.case.key in GPU_TARGETS:
            t = GPU_TARGETS[r.case.key]
            report["targets"].append(
                {
                    "case": r.case.key,
                    "shape": r.case.shape_label,
                    "median_ms": r.ours.median_ms,
                    "min_ms": r.ours.min_ms,
                    "max_ms": r.ours.max_ms,
                    "n": r.ours.n,
                    "target_ms": t["ms"],
                    "extra_bytes": r.extra_bytes,
                    "target_extra_bytes": t.get("extra_bytes"),
                    "meets_target": r.meets_target,
                    "torch_ms": r.torch.median_ms,
                    "path": r.path,
                }
            )
    save()
    # benchmarks/gpu_ops.py --load FILE --store, into a scratch SQLite database.
    db_url = f"sqlite:///{scratch / 'gpu-check.db'}"
    env = {**os.environ, "DSPYFLOW_DATABASE_URL": db_url, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "benchmarks" / "gpu_ops.py"),
            "--load",
            str(out),
            "--store",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    stored = [ln for ln in proc.stdout.splitlines() if ln.startswith("stored ")]
    report["store"] = {
        "command": f"benchmarks/gpu_ops.py --load {out.name} --store",
        "returncode": proc.returncode,
        "stored": stored[0] if stored else None,
        "stderr": proc.stderr[-1500:],
        "ok": proc.returncode in (0, 1) and bool(stored),  # 1: the suite had failed cases
    }
    save()


# --- driver ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--small", action="store_true", help="small sizes (a CPU dry run)")
    parser.add_argument("--out", default=None, help="the JSON file (default: ./gpu-check.json)")
    parser.add_argument("--no-suite", action="store_true", help="checks only, no timings")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    out = Path(args.out or "gpu-check.json").resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "created_at": datetime.now(UTC).isoformat(),
        "device": str(device),
        "device_info": json.loads(device_info(device).model_dump_json()),
        "torch": torch.__version__,
        "triton": ops.triton_status()._asdict(),
        "small": args.small,
        "checks": [],
        "errors": [],
    }

    def save() -> None:
        report["wall_s"] = round(time.perf_counter() - started, 2)
        report["failed"] = [c["name"] for c in report["checks"] if c.get("ok") is False]
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1, default=str))
        tmp.replace(out)

    def record(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        try:
            entry = {"name": name, **fn()}
        except Exception as exc:  # recorded; the next check still runs
            entry = {
                "name": name,
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}"[:500],
                "traceback": traceback.format_exc()[-1500:],
            }
        entry["s"] = round(time.perf_counter() - t0, 3)
        report["checks"].append(entry)
        status = "skip" if "skipped" in entry else ("ok" if entry.get("ok") else "FAIL")
        print(f"{status:4} {name} ({entry['s']} s)", flush=True)
        save()

    topk_checks(device, small=args.small, record=record)
    elementwise_checks(device, small=args.small, record=record)
    if not args.small:
        launch_check(device, record)
    if not args.no_suite:
        with tempfile.TemporaryDirectory() as scratch:
            try:
                suite_and_targets(
                    device,
                    small=args.small,
                    out=out,
                    scratch=Path(scratch),
                    report=report,
                    save=save,
                )
            except Exception as exc:
                report["errors"].append(f"suite: {type(exc).__name__}: {exc}"[:1000])
    save()
    failed = report["failed"] or report["errors"] or not report.get("store", {}).get("ok", True)
    print(f"wrote {out}: {len(report['checks'])} checks, {len(report['failed'])} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
