"""Tensor operations for embedding work: matmul, distances, normalization, cosine top-k.

Every op validates its inputs (2-D, non-empty, float32/float16/bfloat16, same dtype and
device, matching feature sizes) and raises `TypeError`/`ValueError` that name the shapes
and dtypes. Half-precision inputs on the CPU are computed in float32 and the result cast
back: CPU half matmuls are slow or unsupported, and fp32 accumulation is what GPUs do too.

`topk_cosine` never materializes the full queries x database score matrix: it scores the
database in chunks sized to a byte budget, keeps each chunk's top-k, and merges them.
"""

from __future__ import annotations

import logging
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

    On CUDA/ROCm with Triton this is one fused pass (read once, write once: the
    bandwidth floor); elsewhere torch's two kernels (a norm reduction, then a divide).
    """
    _check_matrix("x", x)
    if x.device.type == "cuda" and x.shape[1] <= 16384 and _triton_usable():
        try:
            return _normalize_rows_triton(x, eps)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # a Triton that cannot compile here: eager, once warned
            _TRITON_FAILED.append(f"{type(exc).__name__}: {exc}")
            log.warning(
                "fused Triton normalization failed (%s); using torch ops from now on",
                _TRITON_FAILED[-1].splitlines()[0],
            )
    return _normalize_rows_eager(x, eps)


def _normalize_rows_eager(x: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype in _HALF:
        # Sum of squares in float32: 384 squares of |v| > 13 overflow float16.
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32)
        return (x / norm.clamp_min_(eps)).to(x.dtype)
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return torch.div(x, norm.clamp_min_(eps))


_TRITON_FAILED: list[str] = []  # why the fused kernel was given up, if it was


def _triton_usable() -> bool:
    return not _TRITON_FAILED and _triton_importable()


@lru_cache(maxsize=1)
def _triton_importable() -> bool:
    if os.environ.get("DSPYFLOW_DISABLE_TRITON", "") not in ("", "0"):
        return False
    try:
        import triton  # noqa: F401  (ships with CUDA/ROCm builds of torch)
    except Exception:
        return False
    return True


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


@lru_cache(maxsize=1)
def _build_group_max_kernel() -> tuple[Any, Any]:
    """A Triton GEMM whose epilogue keeps only the max of each group of `_GROUP` columns.

    For the fused top-k: the q x N score matrix is never written (on an H100 that write
    and its re-read cost as much as the GEMM itself); only q x N/32 float32 maxima are.
    Returns (plain kernel, autotuned kernel). Checked here under TRITON_INTERPRET=1; its
    speed is for a GPU run to establish (`selection="fused"` is opt-in until then).
    """
    import triton
    import triton.language as tl

    @triton.jit
    def group_max_mm_kernel(
        q_ptr,
        db_ptr,
        out_ptr,
        M,
        N,
        K,
        n_groups,
        stride_qm,
        stride_qk,
        stride_dn,
        stride_dk,
        stride_om,
        stride_og,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            a = tl.load(
                q_ptr + offs_m[:, None].to(tl.int64) * stride_qm + kk[None, :] * stride_qk,
                mask=(offs_m[:, None] < M) & (kk[None, :] < K),
                other=0.0,
            )
            b = tl.load(
                db_ptr + offs_n[None, :].to(tl.int64) * stride_dn + kk[:, None] * stride_dk,
                mask=(offs_n[None, :] < N) & (kk[:, None] < K),
                other=0.0,
            )
            acc = tl.dot(a, b, acc)
        acc = tl.where(offs_n[None, :] < N, acc, float("-inf"))  # padding never wins
        group_max = tl.max(tl.reshape(acc, (BLOCK_M, BLOCK_N // GROUP, GROUP)), axis=2)
        offs_g = pid_n * (BLOCK_N // GROUP) + tl.arange(0, BLOCK_N // GROUP)
        tl.store(
            out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_g[None, :] * stride_og,
            group_max,
            mask=(offs_m[:, None] < M) & (offs_g[None, :] < n_groups),
        )

    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64}, num_warps=w, num_stages=st)
        for bm, bn, w, st in ((128, 256, 8, 3), (128, 128, 8, 4), (64, 256, 4, 4), (128, 128, 4, 3))
    ]
    tuned = triton.autotune(configs=configs, key=["K"])(group_max_mm_kernel)
    return group_max_mm_kernel, tuned


def _fused_usable(device: torch.device) -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _triton_importable()  # the CPU interpreter: for checking, not speed
    return device.type == "cuda" and _triton_usable()


def _group_max_scores(qn: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
    """(q, ceil(c / _GROUP)) float32: the max cosine score in each group of chunk rows."""
    plain, tuned = _build_group_max_kernel()
    q, d = qn.shape
    c = chunk.shape[0]
    n_groups = (c + _GROUP - 1) // _GROUP
    out = torch.empty((q, n_groups), dtype=torch.float32, device=qn.device)
    args = (
        qn,
        chunk,
        out,
        q,
        c,
        d,
        n_groups,
        qn.stride(0),
        qn.stride(1),
        chunk.stride(0),
        chunk.stride(1),
        out.stride(0),
        out.stride(1),
    )
    if os.environ.get("TRITON_INTERPRET") == "1":
        grid = ((q + 15) // 16, (c + 63) // 64)
        plain[grid](*args, BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, GROUP=_GROUP)
    else:

        def grid(meta: dict[str, int]) -> tuple[int, int]:
            return (
                (q + meta["BLOCK_M"] - 1) // meta["BLOCK_M"],
                (c + meta["BLOCK_N"] - 1) // meta["BLOCK_N"],
            )

        tuned[grid](*args, GROUP=_GROUP)
    return out


def _fused_topk(qn: torch.Tensor, chunk: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of qn @ chunk.T without the score matrix: the group maxima pick the k
    best groups of rows, whose k x 32 scores are then computed exactly."""
    q, d = qn.shape
    c = chunk.shape[0]
    group_max = _group_max_scores(qn, chunk)
    kk = min(k, group_max.shape[1])
    best = torch.topk(group_max, kk, dim=1, sorted=False).indices
    cols = (best.unsqueeze(2) * _GROUP + torch.arange(_GROUP, device=qn.device)).reshape(q, -1)
    valid = cols < c
    cols = cols.clamp_max_(c - 1)
    scores = torch.empty(cols.shape, dtype=qn.dtype, device=qn.device)
    step = max(1, _RESCORE_BYTES // (cols.shape[1] * d * qn.element_size()))
    for s in range(0, q, step):  # gathered rows in query blocks: bounded memory
        rows = chunk[cols[s : s + step]]  # (b, kk * 32, d)
        scores[s : s + step] = torch.bmm(rows, qn[s : s + step].unsqueeze(2)).squeeze(2)
    scores.masked_fill_(~valid, float("-inf"))
    vals, pos = torch.topk(scores, min(k, c), dim=1, sorted=False)
    return vals, torch.gather(cols, 1, pos)


# --- distances and similarities -------------------------------------------------------


def _pad_features(n: int) -> int:
    return (n + 7) // 8 * 8


def pairwise_l2(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    squared: bool = False,
    allow_tf32: bool = False,
    block_bytes: int | None = None,
) -> torch.Tensor:
    """Euclidean distances between the rows of x (n, d) and y (m, d): shape (n, m).

    Computed as ``||x||^2 + ||y||^2 - 2 x.y`` in ONE matmul on augmented rows
    ``[-2x, ||x||^2, 1] . [y, 1, ||y||^2]`` (no separate broadcast passes over the n x m
    result), clamped at 0 (rounding can make it slightly negative), then square-rooted.
    On GPUs the output is produced in row blocks of ``block_bytes`` (default 16 MB) so the
    clamp and sqrt read each block from L2 rather than HBM. ``allow_tf32`` trades ~3
    decimal digits for ~8x matmul speed on Ampere+ (off by default). The result has the
    inputs' dtype.
    """
    y = x if y is None else y
    _check_pair("x", x, "y", y)
    # Half inputs are computed in float32 on every device: ||x||^2 overflows float16 at
    # |x| > 256, and the cancellation in ||x||^2 + ||y||^2 - 2x.y needs > 11 mantissa bits.
    cd = torch.float32 if x.dtype in _HALF else x.dtype
    xa, ya = (x, y) if cd == x.dtype else (x.to(cd), y.to(cd))
    n, d = xa.shape
    m = ya.shape[0]
    # Built with cat of contiguous pieces (strided column writes are slow on CPUs); norms
    # accumulate in float32 even for half inputs.
    x_sq = xa.pow(2).sum(dim=1, keepdim=True, dtype=torch.float32)
    y_sq = ya.pow(2).sum(dim=1, keepdim=True, dtype=torch.float32)
    ones_x = torch.ones((n, 1), dtype=cd, device=x.device)
    ones_y = torch.ones((m, 1), dtype=cd, device=x.device)
    x_parts = [xa.mul(-2), x_sq.to(cd), ones_x]
    y_parts = [ya, ones_y, y_sq.to(cd)]
    pad = _pad_features(d + 2) - (d + 2) if x.device.type == "cuda" else 0
    if pad:  # tensor-core GEMMs want the reduction dimension a multiple of 8
        x_parts.append(torch.zeros((n, pad), dtype=cd, device=x.device))
        y_parts.append(torch.zeros((m, pad), dtype=cd, device=x.device))
    x_aug = torch.cat(x_parts, dim=1)
    y_aug = torch.cat(y_parts, dim=1)
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


Selection = Literal["auto", "topk", "grouped", "fused"]


class TopKPlan(BaseModel):
    query_block: int
    chunk_rows: int
    extra_bytes: int
    selection: Literal["topk", "grouped", "fused"]


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
    qb = n_queries
    while True:
        query_bytes = 2 * qb * dim * sb  # the query block and its normalized copy
        cand_bytes = qb * k * (sb + 8) * (_MERGE_EVERY + 2)
        per_row = copies * (dim * sb + 4)
        if selection == "fused":  # no score block: float32 group maxima, then a rescore
            per_row += qb * 4 / _GROUP
            cand_bytes += _RESCORE_BYTES + qb * k * _GROUP * (8 + sb + 1)
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
    elif selection in ("grouped", "fused") and rows >= _GROUP:
        rows = rows // _GROUP * _GROUP
    extra = int(query_bytes + cand_bytes + per_row * rows)
    return TopKPlan(query_block=qb, chunk_rows=rows, extra_bytes=extra, selection=selection)


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
            f"CUDA device with Triton; got normalized={normalized}, {queries.dtype} "
            f"on {device}"
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
        qn = normalize_rows(queries[q0 : q0 + plan.query_block].to(cd))
        run = _search_block(qn, database, k, cd, normalized, plan, fault)
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
    )


def _search_block(
    qn: torch.Tensor,
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
        chunk = database[start:stop]
        if chunk.dtype != cd:
            chunk = chunk.to(cd)
        if not normalized:
            chunk = normalize_rows(chunk)
        if plan.selection == "fused":
            v, i = _fused_topk(qn, chunk, k)
            _commit(v, i, start)
            return
        buf = state["buf"]
        if buf is None or buf.numel() < q * c:
            state["buf"] = None  # drop the old one before allocating the new one
            buf = state["buf"] = torch.empty(q * c, dtype=cd, device=qn.device)
        # Reuse one score buffer for every chunk: no allocation (or page faults) per chunk.
        scores = torch.mm(qn, chunk.T, out=buf[: q * c].view(q, c))
        kk = min(k, c)
        if plan.selection == "grouped" and c // _GROUP >= 4 * kk:
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
