"""Tensor operations for embedding work: matmul, distances, normalization, cosine top-k.

Every op validates its inputs (2-D, non-empty, float32/float16/bfloat16, same dtype and
device, matching feature sizes) and raises `TypeError`/`ValueError` that name the shapes
and dtypes. Half-precision inputs on the CPU are computed in float32 and the result cast
back: CPU half matmuls are slow or unsupported, and fp32 accumulation is what GPUs do too.

`topk_cosine` never materializes the full queries x database score matrix: it scores the
database in chunks sized to a byte budget, keeps each chunk's top-k, and merges them.
Whatever precision the scores are computed in, the winners are those of `torch.topk` on
float32 scores: low-precision scores only pick candidates, which are rescored in float32
and certified against the rounding bound (see `_select_exact`).

The Triton kernels need Triton >= 3.4 (`TRITON_MIN_VERSION`); below it, or without Triton,
the torch path runs and `kernel_path()` / `TopKSearch.path` name it and why.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from functools import lru_cache
from typing import Any, Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict

from gpu.memory import ChunkedRun, run_chunked

log = logging.getLogger("dspyflow.gpu.tensor_ops")

DEFAULT_MAX_BYTES = 256 * 1024**2
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
_HALF = (torch.float16, torch.bfloat16)
# Grouped selection: one streaming amax over groups of this many scores replaces torch.topk's
# multi-pass radix select over the whole (chunk-wide) row on GPUs.
_GROUP = 32
_MERGE_EVERY = 8  # merge partial top-k lists after this many chunks: bounded memory
_RESCORE_BYTES = 32 * 1024**2  # fused top-k: gathered candidate rows at once


# --- validation -----------------------------------------------------------------------


def _check_matrix(name: str, t: Any) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows x features), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")


def _check_pair(a_name: str, a: Any, b_name: str, b: Any, *, same_features: bool = True) -> None:
    _check_matrix(a_name, a)
    _check_matrix(b_name, b)
    if a.dtype != b.dtype:
        raise TypeError(
            f"{a_name} and {b_name} must have the same dtype, got {a.dtype} and {b.dtype}"
        )
    if a.device != b.device:
        raise ValueError(f"{a_name} is on {a.device} but {b_name} is on {b.device}")
    if same_features and a.shape[1] != b.shape[1]:
        raise ValueError(
            f"feature sizes differ: {a_name} {tuple(a.shape)} vs {b_name} {tuple(b.shape)}"
        )


def _check_k(k: Any, rows: int, what: str = "the database") -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if k > rows:
        raise ValueError(f"k={k} is larger than {what} ({rows} rows)")


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype an op computes in: half types on the CPU are computed in float32."""
    return torch.float32 if device.type == "cpu" and dtype in _HALF else dtype


# --- matmul ---------------------------------------------------------------------------


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for a (m, k) and b (k, n); the result has the inputs' dtype."""
    _check_pair("a", a, "b", b, same_features=False)
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul inner dimensions differ: a {tuple(a.shape)} @ b {tuple(b.shape)}")
    cd = compute_dtype(a.dtype, a.device)
    if cd != a.dtype:
        return torch.mm(a.to(cd), b.to(cd)).to(a.dtype)
    return torch.mm(a, b)


# --- normalization --------------------------------------------------------------------


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of each row (accumulated in float32 for half inputs), shape (n,)."""
    _check_matrix("x", x)
    return torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).to(x.dtype)


def normalize_rows(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale each row to unit length: ``x / max(||x||, eps)`` (as F.normalize).

    On CUDA/ROCm with Triton >= 3.4 this is one fused pass (read once, write once: the
    bandwidth floor); elsewhere torch's two kernels (a norm reduction, then a divide).
    `kernel_path("normalize", x.device)` says which one runs here, and why.
    """
    _check_matrix("x", x)
    if x.device.type == "cuda" and x.shape[1] <= _NORMALIZE_MAX_COLS and _triton_usable():
        try:
            return _normalize_rows_triton(x, eps)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # a Triton that cannot compile here: eager, named, warned
            _TRITON_FAILED.append(f"{type(exc).__name__}: {exc}".splitlines()[0])
            log.warning(
                "fused Triton normalization failed (%s); using torch ops from now on",
                _TRITON_FAILED[-1],
            )
    return _normalize_rows_eager(x, eps)


def _normalize_rows_eager(x: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype in _HALF:
        # Sum of squares in float32: 384 squares of |v| > 13 overflow float16.
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32)
        return (x / norm.clamp_min_(eps)).to(x.dtype)
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return torch.div(x, norm.clamp_min_(eps))


# --- Triton: the version floor and which path runs --------------------------------------

# The kernels are built lazily as closures over `triton.language`; Triton < 3.4 cannot
# compile them (and `torch>=2.4` admits Triton 3.0), so older ones are not used at all.
TRITON_MIN_VERSION = (3, 4)
_NORMALIZE_MAX_COLS = 16384  # one row per program block: wider rows do not fit registers
_TRITON_FAILED: list[str] = []  # why a kernel was given up at run time, if one was


class TritonStatus(NamedTuple):
    usable: bool
    version: str | None
    reason: str  # "Triton 3.5.0", or why it is not used


def _parse_version(v: str) -> tuple[int, ...]:
    parts = []
    for piece in v.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


@lru_cache(maxsize=1)
def triton_status() -> TritonStatus:
    """Whether the Triton kernels can be used in this process, and why not if not."""
    if os.environ.get("DSPYFLOW_DISABLE_TRITON", "") not in ("", "0"):
        return TritonStatus(False, None, "disabled by DSPYFLOW_DISABLE_TRITON")
    try:
        import triton  # ships with CUDA/ROCm builds of torch
    except Exception as exc:
        return TritonStatus(False, None, f"Triton not importable ({type(exc).__name__})")
    version = str(getattr(triton, "__version__", "0"))
    if _parse_version(version) < TRITON_MIN_VERSION:
        floor = ".".join(map(str, TRITON_MIN_VERSION))
        return TritonStatus(False, version, f"Triton {version} is older than {floor}")
    return TritonStatus(True, version, f"Triton {version}")


def _triton_usable() -> bool:
    return not _TRITON_FAILED and triton_status().usable


def _triton_importable() -> bool:  # kept for callers of the old name
    return triton_status().usable


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernel_path(op: Literal["normalize", "fused_topk"], device: torch.device | str) -> str:
    """The implementation `op` uses on ``device`` in this process, with the reason for a
    fallback: recorded next to every benchmark figure, so no fallback is silent."""
    dev = torch.device(device)
    status = triton_status()
    why = _TRITON_FAILED[-1] if _TRITON_FAILED else status.reason
    if op == "normalize":
        if dev.type != "cuda":
            return f"torch ({dev.type})"
        return "triton" if _triton_usable() else f"torch ({why})"
    if op == "fused_topk":
        if _interpreting() and status.usable:
            return "triton-interpreter"
        if dev.type == "cuda" and _triton_usable():
            return "triton"
        return f"unavailable ({why if dev.type == 'cuda' else 'needs CUDA'})"
    raise ValueError(f"unknown op {op!r}; expected normalize or fused_topk")


@lru_cache(maxsize=1)
def _build_normalize_kernel() -> Any:
    """Define the Triton kernel on first use (Triton is imported only on GPU machines).

    Checked on machines without a GPU by running it under TRITON_INTERPRET=1 (set for the
    whole process before Triton is imported), Triton's CPU interpreter.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def normalize_rows_kernel(
        x_ptr,
        out_ptr,
        n_rows,
        n_cols,
        stride_x,
        stride_out,
        eps,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        rows64 = rows.to(tl.int64)[:, None]  # 1e6 x 384 offsets overflow int32 soon
        x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        norm = tl.sqrt(tl.sum(x * x, axis=1))
        inv = 1.0 / tl.maximum(norm, eps)
        y = x * inv[:, None]
        tl.store(
            out_ptr + rows64 * stride_out + cols[None, :],
            y.to(out_ptr.dtype.element_ty),
            mask=mask,
        )

    return normalize_rows_kernel


def _normalize_rows_triton(x: torch.Tensor, eps: float) -> torch.Tensor:
    kernel = _build_normalize_kernel()
    if x.stride(1) != 1:
        x = x.contiguous()
    n_rows, n_cols = x.shape
    out = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    block_n = 1 << max(0, (n_cols - 1).bit_length())
    block_m = max(1, min(64, 8192 // block_n))  # ~8K elements a program: enough bytes in flight
    grid = ((n_rows + block_m - 1) // block_m,)
    kernel[grid](
        x,
        out,
        n_rows,
        n_cols,
        x.stride(0),
        out.stride(0),
        eps,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=8 if block_m * block_n >= 8192 else 4,
    )
    return out


# --- fused top-k: one pass over the database, no score matrix ---------------------------

# Grid limits of CUDA launches: axis 0 takes 2**31 - 1 blocks, axes 1 and 2 only 65,535.
_GRID_AXIS0_MAX = 2**31 - 1
# Queries are looped over inside the kernel and re-read from L2 by every program: this
# many fp16 384-d queries (3 MB) stay in an H100's 50 MB L2 next to the streamed rows.
FUSED_MAX_QUERIES = 4096
_INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32}  # small: the CPU interprets


@lru_cache(maxsize=1)
def _build_group_max_kernel() -> tuple[Any, Any]:
    """A Triton GEMM whose epilogue keeps only the max of each group of `_GROUP` rows.

    One program owns BLOCK_N database rows and loops over every query inside the kernel, so
    each database row is read from HBM once (one pass over the database: the bandwidth
    floor) and the q x N score matrix is never written, only q x N/32 float32 maxima. The
    database blocks sit on grid axis 0 (2**31 - 1 blocks: 20M rows need 78,125). ``K`` (the
    feature size) and ``M_PAD`` (the query count rounded up, so few sizes compile) are
    compile-time constants: Triton's interpreter then never turns a runtime scalar (a
    1-element array) into a loop bound, which NumPy >= 2.4 refuses.
    Returns (plain kernel, autotuned kernel).
    """
    import triton
    import triton.language as tl

    @triton.jit
    def group_max_kernel(
        q_ptr,
        db_ptr,
        out_ptr,
        M,
        n_rows,
        n_groups,
        stride_qm,
        stride_dn,
        stride_om,
        M_PAD: tl.constexpr,
        K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_rows
        db_rows = offs_n.to(tl.int64) * stride_dn  # 20M x 384 offsets overflow int32
        offs_k = tl.arange(0, BLOCK_K)
        offs_g = pid * (BLOCK_N // GROUP) + tl.arange(0, BLOCK_N // GROUP)
        g_ok = offs_g < n_groups
        for m0 in range(0, M_PAD, BLOCK_M):  # M_PAD >= M: compile-time trip count
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < M
            q_rows = offs_m.to(tl.int64) * stride_qm
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + offs_k
                a = tl.load(
                    q_ptr + q_rows[:, None] + kk[None, :],
                    mask=m_ok[:, None] & (kk[None, :] < K),
                    other=0.0,
                )
                # The same rows for every query block: after the first, L1/L2 hits.
                b = tl.load(
                    db_ptr + db_rows[None, :] + kk[:, None],
                    mask=n_ok[None, :] & (kk[:, None] < K),
                    other=0.0,
                )
                acc = tl.dot(a, b, acc)
            acc = tl.where(n_ok[None, :], acc, float("-inf"))  # padding never wins
            group_max = tl.max(tl.reshape(acc, (BLOCK_M, BLOCK_N // GROUP, GROUP)), axis=2)
            tl.store(
                out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_g[None, :],
                group_max,
                mask=m_ok[:, None] & g_ok[None, :],
            )

    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64}, num_warps=w, num_stages=st)
        for bm, bn, w, st in ((128, 128, 8, 3), (64, 256, 8, 3), (128, 256, 8, 3), (64, 128, 4, 4))
    ]
    tuned = triton.autotune(configs=configs, key=["M_PAD", "K"])(group_max_kernel)
    return group_max_kernel, tuned


def fused_grid(n_rows: int, block_n: int) -> tuple[int]:
    """The fused kernel's launch grid: database blocks on axis 0 only (queries are looped
    over inside the kernel), so any database that fits in memory launches."""
    blocks = (n_rows + block_n - 1) // block_n
    if blocks > _GRID_AXIS0_MAX:
        raise ValueError(
            f"fused top-k: {n_rows} rows in blocks of {block_n} need {blocks} blocks, more "
            f"than a CUDA grid's {_GRID_AXIS0_MAX}; use chunk_rows to split the database"
        )
    return (blocks,)


def _fused_usable(device: torch.device) -> bool:
    if _interpreting():
        return triton_status().usable  # the CPU interpreter: for checking, not speed
    return device.type == "cuda" and _triton_usable()


def _group_max_scores(qn: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
    """(q, ceil(c / _GROUP)) float32: the max cosine score in each group of chunk rows."""
    plain, tuned = _build_group_max_kernel()
    qn = qn if qn.stride(1) == 1 else qn.contiguous()
    chunk = chunk if chunk.stride(1) == 1 else chunk.contiguous()
    q, d = qn.shape
    c = chunk.shape[0]
    n_groups = (c + _GROUP - 1) // _GROUP
    out = torch.empty((q, n_groups), dtype=torch.float32, device=qn.device)
    args = (qn, chunk, out, q, c, n_groups, qn.stride(0), chunk.stride(0), out.stride(0))
    # Round the query count up (powers of two to 128, then multiples of 128): one compile
    # serves many query-block sizes; the padding rows are masked.
    m_pad = max(16, 1 << (q - 1).bit_length()) if q <= 128 else -(-q // 128) * 128
    consts = {"M_PAD": m_pad, "K": d, "GROUP": _GROUP}
    if _interpreting():
        grid = fused_grid(c, _INTERPRET_BLOCKS["BLOCK_N"])
        plain[grid](*args, **consts, **_INTERPRET_BLOCKS)
    else:
        tuned[lambda meta: fused_grid(c, meta["BLOCK_N"])](*args, **consts)
    return out


def _fused_topk(
    qn: torch.Tensor, q32: torch.Tensor, chunk: torch.Tensor, k: int, budget: int = _RESCORE_BYTES
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of q32 @ chunk.T without the score matrix: the kernel's float32 group maxima
    (of the queries in their own dtype, ``qn``) pick candidate groups, whose rows are
    rescored in float32 against the float32-normalized queries ``q32`` and certified."""
    group_max = _group_max_scores(qn, chunk)
    err = _score_error(qn.dtype, qn.shape[1], 0)
    return _select_exact(q32, chunk, group_max, _GROUP, k, err, budget=budget)


# --- exact selection from low-precision scores -------------------------------------------


_UNIT_ROUNDING = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}


def _score_error(dtype: torch.dtype, dim: int, output_roundings: int = 1) -> float:
    """A bound on |score from ``dtype`` queries/output - float32 score| for unit rows.

    Terms: the queries normalized in ``dtype`` (each element off by at most u relative, so
    the score by at most u), the score rounded to ``dtype`` (half an ulp below 2: 2u each,
    doubled for safety), and float32 sums in another order (~d * 2**-24, taken 8x).
    """
    u = _UNIT_ROUNDING.get(dtype, 0.0)
    return u + output_roundings * 4 * u + dim * 2.0**-21


def _rescore(
    q32: torch.Tensor,
    chunk: torch.Tensor,
    cols: torch.Tensor,
    normalize: bool = False,
    budget: int = _RESCORE_BYTES,
) -> torch.Tensor:
    """float32 scores of query i against chunk rows cols[i]: (q, m). Query blocks keep the
    gathered rows (and any float32 copy) under ``budget`` bytes. ``normalize``: the rows
    are raw, normalized here in float32 (not first rounded to a half type).

    Half rows on a GPU are not copied to float32: the float32 query is split into half
    terms (hi + lo, + a third for bfloat16: 22-24 bits), and one batched tensor-core GEMM
    with float32 output scores the rows against all terms (products of halves are exact in
    float32), when this torch has `bmm(..., out_dtype=float32)` and it checks out here.
    """
    q, m = cols.shape
    d = q32.shape[1]
    split = not normalize and _half_bmm_ok(chunk.device, chunk.dtype)
    scores = torch.empty((q, m), dtype=torch.float32, device=q32.device)
    per_query = m * d * (chunk.element_size() + (0 if split else 4)) + m * 16
    step = max(1, budget // max(1, per_query))
    for s in range(0, q, step):
        rows = chunk[cols[s : s + step]]  # (b, m, d)
        if split:
            terms = _split_terms(q32[s : s + step], chunk.dtype)  # (b, d, t), scaled
            parts = torch.bmm(rows, terms, out_dtype=torch.float32)  # (b, m, t)
            scores[s : s + step] = parts.sum(dim=2).mul_(_SPLIT_SCALE**-1)
            continue
        rows = rows.float()
        if normalize:
            rows = rows / torch.linalg.vector_norm(rows, dim=2, keepdim=True).clamp_min_(1e-12)
        qs = q32[s : s + step].float().unsqueeze(2)  # (b, d, 1)
        scores[s : s + step] = torch.bmm(rows, qs).squeeze(2)
    return scores


# Unit queries are scaled by 2**8 before the split (exact) so the low terms stay normal
# half numbers; the scores are scaled back.
_SPLIT_SCALE = 2.0**8


def _split_terms(q32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(b, d) float32 -> (b, d, t) in ``dtype`` whose sum over t is q32 * _SPLIT_SCALE to
    ~22 bits (float16, 2 terms) or ~24 bits (bfloat16, 3 terms)."""
    rest = q32.float() * _SPLIT_SCALE
    terms = []
    for _ in range(2 if dtype == torch.float16 else 3):
        t = rest.to(dtype)
        terms.append(t)
        rest = rest - t.float()
    return torch.stack(terms, dim=2)


_HALF_BMM: dict[tuple[str, torch.dtype], bool] = {}


def _half_bmm_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether half x half -> float32 `bmm` works on this device and matches float32."""
    if dtype not in _HALF or device.type != "cuda":
        return False
    key = (str(device), dtype)
    if key not in _HALF_BMM:
        try:
            gen = torch.Generator(device="cpu").manual_seed(0)
            rows = torch.randn(3, 40, 64, generator=gen).to(device=device, dtype=dtype)
            q = torch.nn.functional.normalize(torch.randn(3, 64, generator=gen), dim=1)
            q = q.to(device)
            got = torch.bmm(rows, _split_terms(q, dtype), out_dtype=torch.float32)
            got = got.sum(dim=2) / _SPLIT_SCALE
            want = torch.bmm(rows.float(), q.unsqueeze(2)).squeeze(2)
            _HALF_BMM[key] = bool((got - want).abs().max() < 1e-5)
        except Exception:  # no out_dtype overload in this torch: float32 copies instead
            _HALF_BMM[key] = False
    return _HALF_BMM[key]


_MARGIN_UNITS = 2  # candidates beyond k: most rows are certified on the first try


def _select_exact(
    q32: torch.Tensor,
    chunk: torch.Tensor,
    unit_scores: torch.Tensor,
    group: int,
    k: int,
    err: float,
    normalize: bool = False,
    budget: int = _RESCORE_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k of each float32 query ``q32`` over ``chunk``, from low-precision unit scores.

    ``unit_scores`` (q, units) holds, per unit of ``group`` consecutive rows, an upper
    estimate of its best score within ``err`` of float32 (the max of a group, or a score
    itself when group = 1). The best k + margin units are rescored in float32; a query is
    certified when its k-th float32 score exceeds the best excluded unit's estimate + err,
    so nothing left out can beat it. Uncertified queries retry with 4x the units (at worst
    all of them). ``normalize``: ``chunk`` holds raw rows (see `_rescore`). Returns
    float32 values (best first) and chunk row numbers.
    """
    q, units = unit_scores.shape
    c = chunk.shape[0]
    out_v = torch.empty((q, k), dtype=torch.float32, device=q32.device)
    out_i = torch.empty((q, k), dtype=torch.int64, device=q32.device)
    rows = torch.arange(q, device=q32.device)
    # Each of the k best rows may sit in a unit of its own: k units, plus a margin.
    count = min(units, k + _MARGIN_UNITS + k // 8)
    offsets = torch.arange(group, device=q32.device)
    while rows.numel():
        us = unit_scores if rows.numel() == q else unit_scores[rows]
        top_u, top_idx = torch.topk(us, count, dim=1, sorted=False)
        cols = (top_idx.unsqueeze(2) * group + offsets).reshape(rows.numel(), -1)
        valid = cols < c
        cols = cols.clamp_max_(c - 1)
        scores = _rescore(q32[rows], chunk, cols, normalize, budget)
        scores.masked_fill_(~valid, float("-inf"))
        vals, pos = torch.topk(scores, k, dim=1)  # sorted: vals[:, -1] is the k-th
        idx = torch.gather(cols, 1, pos)
        if count >= units:
            done = torch.ones(rows.numel(), dtype=torch.bool, device=q32.device)
        else:  # every unit left out scores at most the smallest one kept
            done = vals[:, -1] > top_u.amin(dim=1).float() + err
        out_v[rows[done]] = vals[done]
        out_i[rows[done]] = idx[done]
        rows = rows[~done]
        count = min(units, count * 4)
    return out_v, out_i


# --- distances and similarities -------------------------------------------------------


def _pad_features(n: int) -> int:
    return (n + 7) // 8 * 8


def _uses_half_gemm(dtype: torch.dtype, device: torch.device) -> bool:
    """Half inputs on a GPU stay half: the GEMM runs on tensor cores (fp32 accumulate)."""
    return dtype in _HALF and device.type == "cuda"


def pairwise_l2_bytes(n: int, m: int, d: int, dtype: torch.dtype, device: torch.device) -> int:
    """Memory `pairwise_l2` holds at its peak for (n, d) x (m, d): output + working copies."""
    e = torch.empty((), dtype=dtype).element_size()
    if _uses_half_gemm(dtype, device):
        return n * m * e + (n + m) * _pad_features(d + 4) * e
    converted = dtype != torch.float32
    work = (n + m) * (d + 2 + 8) * 4 + (n + m) * d * 4 * converted
    return n * m * 4 + n * m * e * converted + work


def _available_bytes(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), "free GPU memory"
    import psutil

    return int(psutil.virtual_memory().available), "available RAM"


def pairwise_l2(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    squared: bool = False,
    allow_tf32: bool = False,
    block_bytes: int | None = None,
    max_bytes: int | None = None,
) -> torch.Tensor:
    """Euclidean distances between the rows of x (n, d) and y (m, d): shape (n, m).

    Computed as ``||x||^2 + ||y||^2 - 2 x.y`` in ONE matmul on augmented rows
    ``[-2x, ||x||^2, 1] . [y, 1, ||y||^2]`` (no separate broadcast passes over the n x m
    result), clamped at 0 (rounding can make it slightly negative), then square-rooted.

    float16/bfloat16 on a GPU stay in their dtype, on tensor cores with float32
    accumulation (`_pairwise_l2_half`); on the CPU they are computed in float32. float32
    on GPUs is produced in row blocks of ``block_bytes`` (default 16 MB) so the clamp and
    sqrt read each block from L2 rather than HBM; ``allow_tf32`` trades ~3 decimal digits
    for ~8x matmul speed on Ampere+ (off by default). The result has the inputs' dtype.

    Memory cap: when the output plus working copies (`pairwise_l2_bytes`) exceed
    ``max_bytes`` (default: the device's free memory) it raises `ValueError` naming the
    sizes, instead of failing inside an allocation.
    """
    y = x if y is None else y
    _check_pair("x", x, "y", y)
    n, d = x.shape
    m = y.shape[0]
    need = pairwise_l2_bytes(n, m, d, x.dtype, x.device)
    cap, source = (max_bytes, "max_bytes") if max_bytes is not None else _available_bytes(x.device)
    if need > cap:
        out_mib = n * m * x.element_size() / 2**20
        raise ValueError(
            f"pairwise_l2: {n} x {m} distances in {x.dtype} need {need / 2**20:.1f} MiB "
            f"({out_mib:.1f} MiB output + working copies), more than {source} "
            f"({cap / 2**20:.1f} MiB); compute it in row blocks (pairwise_l2(x[i:j], y))"
        )
    if _uses_half_gemm(x.dtype, x.device):
        return _pairwise_l2_half(x, y, squared=squared)
    # float32, or half on the CPU (computed in float32): ||x||^2 overflows float16 at
    # |x| > 256, and the cancellation in ||x||^2 + ||y||^2 - 2x.y needs > 11 mantissa bits.
    cd = torch.float32
    xa, ya = (x, y) if cd == x.dtype else (x.to(cd), y.to(cd))
    # Built with cat of contiguous pieces (strided column writes are slow on CPUs).
    x_sq = xa.pow(2).sum(dim=1, keepdim=True)
    y_sq = ya.pow(2).sum(dim=1, keepdim=True)
    ones_x = torch.ones((n, 1), dtype=cd, device=x.device)
    ones_y = torch.ones((m, 1), dtype=cd, device=x.device)
    x_parts = [xa.mul(-2), x_sq, ones_x]
    y_parts = [ya, ones_y, y_sq]
    pad = _pad_features(d + 2) - (d + 2) if x.device.type == "cuda" else 0
    if pad:  # tensor-core GEMMs want the reduction dimension a multiple of 8
        x_parts.append(torch.zeros((n, pad), dtype=cd, device=x.device))
        y_parts.append(torch.zeros((m, pad), dtype=cd, device=x.device))
    x_aug = torch.cat(x_parts, dim=1)
    y_aug = torch.cat(y_parts, dim=1)
    del xa, ya, x_parts, y_parts
    out = torch.empty((n, m), dtype=cd, device=x.device)
    if block_bytes is None:
        block_bytes = 16 * 1024**2 if x.device.type == "cuda" else 1 << 62
    rows = max(1, min(n, block_bytes // max(1, m * out.element_size())))
    with tf32_enabled(allow_tf32 and x.device.type == "cuda"):
        for start in range(0, n, rows):
            block = out[start : start + rows]
            torch.mm(x_aug[start : start + rows], y_aug.T, out=block)
            block.clamp_min_(0)
            if not squared:
                block.sqrt_()
    return out if cd == x.dtype else out.to(x.dtype)


def _pairwise_l2_half(x: torch.Tensor, y: torch.Tensor, *, squared: bool) -> torch.Tensor:
    """Half-precision L2 as one tensor-core GEMM into the half output, then clamp and sqrt.

    The GEMM accumulates ``-2x.y + ||x||^2 + ||y||^2`` in float32, so the cancellation
    happens at float32 precision and the result is rounded to half once. The squared
    norms enter as two half columns each (hi + lo: ~22 bits, not 11). Inputs are scaled by
    a power of two (exact) so norms and distances stay inside float16's range.
    """
    n, d = x.shape
    m = y.shape[0]
    dt = x.dtype
    x_sq = torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).square_()
    y_sq = x_sq if y is x else torch.linalg.vector_norm(y, dim=1, dtype=torch.float32).square_()
    # Norms <= 64 after scaling: norms^2 <= 4096 and distances^2 <= 16384 fit float16.
    biggest = float(torch.maximum(x_sq.max(), y_sq.max()).sqrt())  # one sync: a scalar
    scale = (
        2.0 ** math.ceil(math.log2(biggest / 64))
        if math.isfinite(biggest) and biggest > 64
        else 1.0
    )
    inv2 = 1.0 / (scale * scale)

    def split(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = v * inv2
        hi = v.to(dt)
        return hi.unsqueeze(1), (v - hi.float()).to(dt).unsqueeze(1)

    x_hi, x_lo = split(x_sq)
    y_hi, y_lo = split(y_sq)
    pad = _pad_features(d + 4) - (d + 4)
    ones_x = torch.ones((n, 2), dtype=dt, device=x.device)
    ones_y = torch.ones((m, 2), dtype=dt, device=x.device)
    x_aug = torch.cat(
        [x * (-2.0 / scale), x_hi, x_lo, ones_x, torch.zeros((n, pad), dtype=dt, device=x.device)],
        dim=1,
    )
    y_aug = torch.cat(
        [y * (1.0 / scale), ones_y, y_hi, y_lo, torch.zeros((m, pad), dtype=dt, device=x.device)],
        dim=1,
    )
    out = torch.mm(x_aug, y_aug.T)  # fp32 accumulate on tensor cores, rounded to half once
    del x_aug, y_aug
    out.clamp_min_(0)
    if squared:
        return out.mul_(scale * scale) if scale != 1.0 else out
    out.sqrt_()
    return out.mul_(scale) if scale != 1.0 else out


class tf32_enabled:
    """Context manager that lets fp32 matmuls use TF32 tensor cores for a block."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.previous = "highest"

    def __enter__(self) -> None:
        if self.enabled:
            self.previous = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("high")

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            torch.set_float32_matmul_precision(self.previous)


def cosine_similarity(
    x: torch.Tensor, y: torch.Tensor | None = None, *, eps: float = 1e-12
) -> torch.Tensor:
    """Cosine similarity of every row of x (n, d) with every row of y (m, d): (n, m).

    Normalizes the inputs (n + m rows) rather than scaling the n x m output: cheaper
    whenever the feature size is below n*m/(n+m).
    """
    y_ = x if y is None else y
    _check_pair("x", x, "y", y_)
    xn = normalize_rows(x, eps)
    yn = xn if y is None else normalize_rows(y_, eps)
    return matmul(xn, yn.T)


def pairwise_distances(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    metric: Literal["l2", "sqeuclidean", "cosine"] = "l2",
) -> torch.Tensor:
    """Distances between rows: Euclidean, squared Euclidean, or cosine (1 - similarity)."""
    if metric == "l2":
        return pairwise_l2(x, y)
    if metric == "sqeuclidean":
        return pairwise_l2(x, y, squared=True)
    if metric == "cosine":
        return cosine_similarity(x, y).neg_().add_(1).clamp_min_(0)
    raise ValueError(f"unknown metric {metric!r}; expected l2, sqeuclidean or cosine")


# --- cosine top-k search --------------------------------------------------------------


class TopK(NamedTuple):
    values: torch.Tensor  # (q, k) cosine similarities, best first
    indices: torch.Tensor  # (q, k) int64 database row numbers


class TopKSearch(BaseModel):
    """A top-k result plus how it was computed (chunking and memory back-off)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    values: torch.Tensor
    indices: torch.Tensor
    query_block: int
    chunk_rows: int  # database rows per chunk at the start
    final_chunk_rows: int  # after any halvings under memory pressure
    chunks: int
    halvings: int
    planned_extra_bytes: int  # the plan's bound on extra memory at the start
    selection: str
    # How the winners were found: the selection, the score precision, and for the fused
    # kernel where it ran ("triton" or "triton-interpreter"). Never a silent fallback.
    path: str = ""


Selection = Literal["auto", "topk", "grouped", "fused"]


class TopKPlan(BaseModel):
    query_block: int
    chunk_rows: int
    extra_bytes: int
    selection: Literal["topk", "grouped", "fused"]
    # Bytes of candidate rows gathered at once for the float32 rescoring: big enough on a
    # GPU that the rescoring is a few launches, not hundreds.
    rescore_bytes: int = _RESCORE_BYTES


def plan_topk(
    n_queries: int,
    n_rows: int,
    dim: int,
    k: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    normalized: bool,
    max_bytes: int = DEFAULT_MAX_BYTES,
    chunk_rows: int | None = None,
    selection: Selection = "auto",
) -> TopKPlan:
    """How many queries and database rows to score at once to stay under ``max_bytes``.

    Extra memory = normalized queries + per chunk: the score block, the group maxima,
    a converted/normalized copy of the chunk when needed, the candidate lists.
    """
    cd = compute_dtype(dtype, device)
    sb = torch.empty((), dtype=cd).element_size()
    # Copies of a database chunk alive at once: a float32 copy of half rows on the CPU, a
    # normalized copy when the rows are not unit length (plus its norms).
    copies = int(cd != dtype) + int(not normalized)
    if selection == "auto":
        # Grouped selection pays off where topk is multi-pass (GPUs); on CPUs torch.topk is
        # a single partial sort and faster than amax + gather (measured on 2 cores).
        selection = "grouped" if device.type == "cuda" and k <= 64 else "topk"
    budget = max_bytes * 0.9  # headroom for what torch allocates inside the ops
    # The fused kernel re-reads every query from L2 in each program: keep them in L2.
    qb = min(n_queries, FUSED_MAX_QUERIES) if selection == "fused" else n_queries
    # Half scores (CUDA) pick candidates that are rescored in float32 (`_select_exact`).
    rescored = selection == "fused" or cd in _HALF
    rescore_bytes = int(min(256 * 1024**2, max(4 * 1024**2, max_bytes // 4)))
    while True:
        query_bytes = 2 * qb * dim * sb  # the query block and its normalized copy
        query_bytes += 2 * qb * dim * 4 if rescored and sb != 4 else 0  # + float32 ones
        cand_bytes = qb * k * (sb + 8) * (_MERGE_EVERY + 2)
        per_row: float = copies * (dim * sb + 4)
        if rescored:  # gathered rows + candidate columns, scores and masks
            units = k + _MARGIN_UNITS + k // 8
            cand_bytes += rescore_bytes + qb * units * _GROUP * (8 + 4 + 1) + qb * k * 12
        if selection == "fused":  # no score block: float32 group maxima only
            per_row += qb * 4 / _GROUP
        else:
            per_row += qb * sb
        if selection == "grouped":
            per_row += qb * sb / _GROUP
            # The k best groups' column numbers and scores (int64 + score, then gathered).
            cand_bytes += qb * k * _GROUP * (8 + sb) * 2
        free = budget - query_bytes - cand_bytes
        rows = int(free // per_row) if free > 0 else 0
        if rows >= min(n_rows, 256) or qb == 1:
            break
        qb = (qb + 1) // 2  # too many queries for even 256 rows a chunk: split the queries
    if chunk_rows is not None:
        rows = chunk_rows
    if rows < 1:
        raise ValueError(
            f"max_bytes={max_bytes} is too small for top-k over {dim}-dim rows "
            f"(a single query row needs about {int(query_bytes + cand_bytes + per_row)} bytes)"
        )
    if rows >= n_rows:
        rows = n_rows
    if rows < n_rows and selection in ("grouped", "fused") and rows >= _GROUP:
        rows = rows // _GROUP * _GROUP
    extra = int(query_bytes + cand_bytes + per_row * rows)
    return TopKPlan(
        query_block=qb,
        chunk_rows=rows,
        extra_bytes=extra,
        selection=selection,
        rescore_bytes=rescore_bytes,
    )


def _grouped_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of each row via the k groups (of _GROUP columns) with the largest max.

    Each of the row's top-k values lies in a group whose max is at least that value, and
    at most k groups can hold them, so the k best groups contain the answer (ties aside).
    """
    q, c = scores.shape
    m = c // _GROUP
    group_max = scores[:, : m * _GROUP].reshape(q, m, _GROUP).amax(dim=2)
    best_groups = torch.topk(group_max, k, dim=1, sorted=False).indices
    offsets = torch.arange(_GROUP, device=scores.device)
    cols = (best_groups.unsqueeze(2) * _GROUP + offsets).reshape(q, k * _GROUP)
    if m * _GROUP < c:  # the ragged tail is always a candidate
        tail = torch.arange(m * _GROUP, c, device=scores.device).expand(q, c - m * _GROUP)
        cols = torch.cat([cols, tail], dim=1)
    cand = torch.gather(scores, 1, cols)
    vals, pos = torch.topk(cand, k, dim=1, sorted=False)
    return vals, torch.gather(cols, 1, pos)


def _group_maxima(scores: torch.Tensor) -> torch.Tensor:
    """(q, ceil(c / _GROUP)): the max of each group of columns, the ragged tail included."""
    q, c = scores.shape
    m = c // _GROUP
    maxima = scores[:, : m * _GROUP].reshape(q, m, _GROUP).amax(dim=2)
    if m * _GROUP < c:
        maxima = torch.cat([maxima, scores[:, m * _GROUP :].amax(dim=1, keepdim=True)], dim=1)
    return maxima


def _merge(
    vals: list[torch.Tensor], idx: list[torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    v = torch.cat(vals, dim=1)
    i = torch.cat(idx, dim=1)
    top_v, pos = torch.topk(v, min(k, v.shape[1]), dim=1)
    return top_v, torch.gather(i, 1, pos)


def topk_cosine_search(
    queries: torch.Tensor,
    database: torch.Tensor,
    k: int,
    *,
    normalized: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    chunk_rows: int | None = None,
    selection: Selection = "auto",
    fault: Callable[[int], None] | None = None,
) -> TopKSearch:
    """The k database rows most cosine-similar to each query, chunked under a byte budget.

    ``normalized=True`` promises the database rows are already unit length (an index built
    once with `normalize_rows`): then chunks are scored in place, without a copy. Extra
    memory stays under ``max_bytes`` (see `plan_topk`); the full q x N score matrix is never
    built. Under memory pressure (a CUDA OOM, or one raised by the injectable ``fault``,
    called with the chunk's row count) the chunk is halved and retried.
    """
    _check_pair("queries", queries, "database", database)
    n_rows = database.shape[0]
    _check_k(k, n_rows)
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if selection not in ("auto", "topk", "grouped", "fused"):
        raise ValueError(f"selection must be auto, topk, grouped or fused, got {selection!r}")
    device = queries.device
    # The fused kernel reads the rows as they are: they must be unit length already, and in
    # a half type (fp32 tl.dot would round through TF32 and could pick wrong groups).
    if selection == "fused" and (
        not normalized or queries.dtype not in _HALF or not _fused_usable(device)
    ):
        raise ValueError(
            "selection='fused' needs normalized=True, float16/bfloat16 inputs and a "
            f"CUDA device with Triton >= {'.'.join(map(str, TRITON_MIN_VERSION))}; got "
            f"normalized={normalized}, {queries.dtype} on {device}, fused kernel "
            f"{kernel_path('fused_topk', device)}"
        )
    plan = plan_topk(
        queries.shape[0],
        n_rows,
        queries.shape[1],
        k,
        dtype=queries.dtype,
        device=device,
        normalized=normalized,
        max_bytes=max_bytes,
        chunk_rows=chunk_rows,
        selection=selection,
    )
    cd = compute_dtype(queries.dtype, device)
    out_v: list[torch.Tensor] = []
    out_i: list[torch.Tensor] = []
    halvings, chunks, final_chunk = 0, 0, plan.chunk_rows
    for q0 in range(0, queries.shape[0], plan.query_block):
        block = queries[q0 : q0 + plan.query_block]
        qn = normalize_rows(block.to(cd))
        # Candidates picked in a half dtype are rescored against float32 queries: the
        # winners are those of float32 scores of the inputs as given.
        rescored = plan.selection == "fused" or cd in _HALF
        q32 = (
            (qn if qn.dtype == torch.float32 else normalize_rows(block.float())) if rescored else qn
        )
        run = _search_block(qn, q32, database, k, cd, normalized, plan, fault)
        vals = [v for v, _ in run.outputs]
        idx = [i for _, i in run.outputs]
        top_v, top_i = _merge(vals, idx, k)
        out_v.append(top_v)
        out_i.append(top_i)
        halvings += run.halvings
        chunks += run.chunks
        final_chunk = min(final_chunk, run.final_chunk)
    values = torch.cat(out_v) if len(out_v) > 1 else out_v[0]
    indices = torch.cat(out_i) if len(out_i) > 1 else out_i[0]
    return TopKSearch(
        values=values.to(queries.dtype),
        indices=indices,
        query_block=plan.query_block,
        chunk_rows=plan.chunk_rows,
        final_chunk_rows=final_chunk,
        chunks=chunks,
        halvings=halvings,
        planned_extra_bytes=plan.extra_bytes,
        selection=plan.selection,
        path=_path_name(plan.selection, cd, device),
    )


def _path_name(selection: str, cd: torch.dtype, device: torch.device) -> str:
    short = str(cd).removeprefix("torch.")
    if selection == "fused":
        return f"fused ({kernel_path('fused_topk', device)}); float32 group maxima, float32 rescore"
    if cd in _HALF:
        return f"{selection}; {short} scores pick candidates, float32 rescore"
    return f"{selection}; {short} scores"


def _search_block(
    qn: torch.Tensor,
    q32: torch.Tensor,
    database: torch.Tensor,
    k: int,
    cd: torch.dtype,
    normalized: bool,
    plan: TopKPlan,
    fault: Callable[[int], None] | None,
) -> ChunkedRun[Any]:
    q = qn.shape[0]
    state: dict[str, Any] = {"buf": None, "vals": [], "idx": []}

    def score_chunk(start: int, stop: int) -> None:
        c = stop - start
        raw = chunk = database[start:stop]
        if chunk.dtype != cd:
            chunk = chunk.to(cd)
        if not normalized:
            chunk = normalize_rows(chunk)
        if plan.selection == "fused":
            v, i = _fused_topk(qn, q32, chunk, min(k, c), plan.rescore_bytes)
            _commit(v, i, start)
            return
        buf = state["buf"]
        if buf is None or buf.numel() < q * c:
            state["buf"] = None  # drop the old one before allocating the new one
            buf = state["buf"] = torch.empty(q * c, dtype=cd, device=qn.device)
        # Reuse one score buffer for every chunk: no allocation (or page faults) per chunk.
        scores = torch.mm(qn, chunk.T, out=buf[: q * c].view(q, c))
        kk = min(k, c)
        grouped = plan.selection == "grouped" and c // _GROUP >= 4 * kk
        if cd in _HALF:
            # Half scores only pick candidates: the winners are decided in float32.
            # Rows normalized in the half type are off by one more rounding: rescore the raw
            # rows, normalized in float32 (the winners of the inputs as given).
            err = _score_error(cd, qn.shape[1]) + (0.0 if normalized else _UNIT_ROUNDING[cd])
            units = _group_maxima(scores) if grouped else scores
            group = _GROUP if grouped else 1
            v, i = _select_exact(
                q32, raw, units, group, kk, err, not normalized, plan.rescore_bytes
            )
        elif grouped:
            v, i = _grouped_topk(scores, kk)
        else:
            v, i = torch.topk(scores, kk, dim=1, sorted=False)
        _commit(v, i, start)

    def _commit(v: torch.Tensor, i: torch.Tensor, start: int) -> None:
        vals, idx = [*state["vals"], v], [*state["idx"], i.add_(start)]
        if len(vals) >= _MERGE_EVERY:  # merge every few chunks: candidates stay bounded
            mv, mi = _merge(vals, idx, k)
            vals, idx = [mv], [mi]
        # Commit only now: a chunk that ran out of memory above is retried without a trace.
        state["vals"], state["idx"] = vals, idx

    def release() -> None:
        state["buf"] = None

    run = run_chunked(
        score_chunk,
        database.shape[0],
        plan.chunk_rows,
        fault=fault,
        device=qn.device,
        label="topk_cosine",
        on_oom=release,
    )
    state["buf"] = None
    # The running candidate lists are the answer; hand them back as the run's outputs.
    run.outputs = list(zip(state["vals"], state["idx"], strict=True))
    return run


def topk_cosine(
    queries: torch.Tensor,
    database: torch.Tensor,
    k: int,
    *,
    normalized: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    chunk_rows: int | None = None,
) -> TopK:
    """(values, indices) of the k most cosine-similar database rows per query."""
    res = topk_cosine_search(
        queries, database, k, normalized=normalized, max_bytes=max_bytes, chunk_rows=chunk_rows
    )
    return TopK(res.values, res.indices)
