"""Triton kernels for low-rank matmul ``y = (x @ U) @ V + bias``.

Each program owns an M-tile of rows and computes the rank-space tile ``T = x[tile] @ U`` in
registers, then multiplies it by ``V`` at once: the ``[M, r]`` intermediate is never written to
global memory, so the only allocation is the output.

Two kernels:

* :func:`_lowrank_hoisted_kernel` (rank fits one ``BLOCK_R`` chunk, r <= :data:`HOIST_MAX_RANK`):
  ``T`` is computed once per program and reused for every N-tile the program owns.
* :func:`_lowrank_chunked_kernel` (larger ranks): one program per (M-tile, N-tile), looping over
  rank chunks; each chunk of ``T`` is rebuilt for every N-tile.

FLOP trade-off: the plain two-GEMM evaluation costs ``2·M·r·(K + N)``; a kernel that rebuilds ``T``
in ``P`` programs per M-tile costs ``2·M·r·(P·K + N)``. The extra ``2·M·r·K·(P - 1)`` buys the
removal of the ``M×r`` round trip through global memory. The hoisted kernel keeps ``P`` small (one
program walks several N-tiles) and only splits N across programs when there are too few M-tiles to
occupy the GPU; the chunked kernel has ``P = ceil(N / BLOCK_N)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from compress.kernels.lowrank_torch import check_lowrank_args
from compress.kernels.quant_matmul_triton import dot_mode, mma

HOIST_MAX_RANK = 64
"""Largest rank whose whole ``T`` tile is held in registers (provisional, not measured)."""
TARGET_PROGRAMS = 256
"""The hoisted kernel splits N over programs until about this many run (provisional)."""


@triton.jit
def _rank_tile(
    x_ptr, u_ptr, offs_m, r0, M, K, R, stride_xm, stride_uk,
    DOT_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """fp32 ``[BLOCK_M, BLOCK_R]`` tile of ``x @ U`` for rank columns ``r0 .. r0 + BLOCK_R``."""
    offs_r = r0 + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    t = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x_mask = mask_m[:, None] & mask_k[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=x_mask, other=0.0)
        u_mask = mask_k[:, None] & mask_r[None, :]
        u = tl.load(u_ptr + offs_k[:, None] * stride_uk + offs_r[None, :], mask=u_mask, other=0.0)
        t = mma(x, u, t, DOT_MODE)
    return t


@triton.jit
def _load_v(v_ptr, r0, offs_n, N, R, stride_vr, BLOCK_R: tl.constexpr):
    """``[BLOCK_R, BLOCK_N]`` chunk of V (zero outside ``r < R``, ``n < N``)."""
    offs_r = r0 + tl.arange(0, BLOCK_R)
    mask = (offs_r < R)[:, None] & (offs_n < N)[None, :]
    return tl.load(v_ptr + offs_r[:, None] * stride_vr + offs_n[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(acc, b_ptr, y_ptr, offs_m, offs_n, M, N, stride_ym, HAS_BIAS: tl.constexpr):
    """Add the bias (fp32) and store an output tile in the output dtype."""
    mask_n = offs_n < N
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lowrank_hoisted_kernel(
    x_ptr, u_ptr, v_ptr, b_ptr, y_ptr, M, N, K, R, TILES_PER_PROG,
    stride_xm, stride_uk, stride_vr, stride_ym,
    HAS_BIAS: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Whole rank in one chunk: build ``T`` once, then write ``TILES_PER_PROG`` N-tiles."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # M * N may exceed 2**31
    t = _rank_tile(x_ptr, u_ptr, offs_m, 0, M, K, R, stride_xm, stride_uk, DOT_MODE, BLOCK_M, BLOCK_K, BLOCK_R)
    t = t.to(x_ptr.dtype.element_ty)  # the rank-space activations, rounded like x @ U in x.dtype
    for j in range(0, TILES_PER_PROG):
        offs_n = (pid_n * TILES_PER_PROG + j) * BLOCK_N + tl.arange(0, BLOCK_N)
        v = _load_v(v_ptr, 0, offs_n, N, R, stride_vr, BLOCK_R)
        acc = mma(t, v, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_MODE)
        _store_tile(acc, b_ptr, y_ptr, offs_m, offs_n, M, N, stride_ym, HAS_BIAS)


@triton.jit
def _lowrank_chunked_kernel(
    x_ptr, u_ptr, v_ptr, b_ptr, y_ptr, M, N, K, R,
    stride_xm, stride_uk, stride_vr, stride_ym,
    HAS_BIAS: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Rank larger than one chunk: one output tile, looping over rank chunks of ``T``."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # M * N may exceed 2**31
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        t = _rank_tile(x_ptr, u_ptr, offs_m, r0, M, K, R, stride_xm, stride_uk, DOT_MODE, BLOCK_M, BLOCK_K, BLOCK_R)
        v = _load_v(v_ptr, r0, offs_n, N, R, stride_vr, BLOCK_R)
        acc = mma(t.to(x_ptr.dtype.element_ty), v, acc, DOT_MODE)
    _store_tile(acc, b_ptr, y_ptr, offs_m, offs_n, M, N, stride_ym, HAS_BIAS)


def _default_block_r(rank: int) -> int:
    """The whole rank (as a power of two >= 16) when it is at most HOIST_MAX_RANK, else HOIST_MAX_RANK."""
    if rank > HOIST_MAX_RANK:
        return HOIST_MAX_RANK
    return max(16, triton.next_power_of_2(rank))


def _block_m(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


def launch_lowrank(
    x2: Tensor, U: Tensor, V: Tensor, bias: Tensor | None, *, out: Tensor | None = None,
    block_m: int | None = None, block_n: int = 64, block_k: int = 32, block_r: int | None = None,
) -> Tensor:
    """``(x2 @ U) @ V + bias`` for ``x2 [M, K]`` -> ``[M, N]`` in ``x2.dtype`` (one launch).

    ``U``/``V``/``bias`` are cast to ``x2.dtype`` if needed. The kernel is the hoisted one when
    ``rank <= block_r``, else the chunked one. ``out`` (optional, contiguous) receives the result.
    """
    m, k = x2.shape
    rank, n = V.shape
    dtype = x2.dtype
    u = U.to(dtype).contiguous()
    v = V.to(dtype).contiguous()
    block_m = block_m or _block_m(m)
    block_r = block_r or _default_block_r(rank)
    if out is None:
        out = torch.empty((m, n), device=x2.device, dtype=dtype)
    if tuple(out.shape) != (m, n) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {(m, n)}")
    if m == 0 or n == 0:
        return out
    b = bias.contiguous() if bias is not None else out
    args = (x2, u, v, b, out, m, n, k, rank)
    strides = (x2.stride(0), u.stride(0), v.stride(0), out.stride(0))
    meta = dict(HAS_BIAS=bias is not None, DOT_MODE=dot_mode(dtype), BLOCK_M=block_m, BLOCK_N=block_n,
                BLOCK_K=block_k, BLOCK_R=block_r)
    m_tiles, n_tiles = triton.cdiv(m, block_m), triton.cdiv(n, block_n)
    if rank <= block_r:
        n_progs = max(1, min(n_tiles, triton.cdiv(TARGET_PROGRAMS, m_tiles)))
        tiles_per_prog = triton.cdiv(n_tiles, n_progs)
        grid = (m_tiles, triton.cdiv(n_tiles, tiles_per_prog))
        _lowrank_hoisted_kernel[grid](*args, tiles_per_prog, *strides, **meta)
    else:
        _lowrank_chunked_kernel[(m_tiles, n_tiles)](*args, *strides, **meta)
    return out


def _rows(x: Tensor) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])  # [..., K] -> [M, K]
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def shared_basis_matmul(
    x: Tensor, U: Tensor, Vs: Sequence[Tensor], biases: Sequence[Tensor | None] | None = None
) -> list[Tensor]:
    """Triton implementation of :func:`compress.kernels.lowrank.shared_basis_matmul`.

    The ``V``s (and biases, zeros standing in for missing ones) are concatenated along N, so one
    launch computes each rank tile once for all of them; the outputs are views into one buffer.
    """
    biases = [None] * len(Vs) if biases is None else list(biases)
    check_lowrank_args(x, U, Vs, biases)
    dtype = x.dtype
    v_cat = torch.cat([V.to(dtype) for V in Vs], dim=1) if len(Vs) > 1 else Vs[0]  # [r, sum N_i]
    b_cat = None
    if any(b is not None for b in biases):
        b_cat = torch.cat([
            b.to(dtype) if b is not None else torch.zeros(V.shape[1], dtype=dtype, device=x.device)
            for V, b in zip(Vs, biases)
        ])  # [sum N_i]
    x2 = _rows(x)  # [M, K]
    y = launch_lowrank(x2, U, v_cat, b_cat)  # [M, sum N_i]
    y = y.reshape(*x.shape[:-1], y.shape[-1])  # [..., sum N_i]
    return list(torch.split(y, [V.shape[1] for V in Vs], dim=-1))


def lowrank_matmul(x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None = None) -> Tensor:
    """Triton implementation of :func:`compress.kernels.lowrank.lowrank_matmul`."""
    return shared_basis_matmul(x, U, [V], [bias])[0]
