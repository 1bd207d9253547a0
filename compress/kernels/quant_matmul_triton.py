"""Triton kernels for quantized matmul ``y = x · dequant(W)ᵀ (+ bias)``.

Every kernel decodes the packed weight with the same in-register helper, :func:`_dequant_tile`,
which handles the three weight kinds (``MODE``): symmetric signed codes, asymmetric codes with a
packed zero point, and lookup-table codes (unsigned index into a codebook). Each element of a
``[BLOCK_N, BLOCK_K]`` tile computes its own bit offset ``k * bits`` in the row's dense bit stream,
gathers the word it starts in (and, for a 3-bit code straddling two words, the next one), so one
code path serves every bit width, any ``K`` (masked) and ragged last groups.

Three launchers, one per matmul path:

* :func:`launch_gemv` — split-K GEMV for decode. The grid is (rows, K splits, N tiles); each
  program writes an fp32 partial sum to a ``[splits, M, N]`` workspace that torch reduces. Partials
  were chosen over ``tl.atomic_add`` because they are deterministic, need no zero-initialised
  buffer, and behave identically under ``TRITON_INTERPRET=1``.
* :func:`launch_fused` — fused dequant-GEMM for small M: weight tiles are decoded in registers and
  fed straight to ``tl.dot``; the dense weight never exists in global memory.
* :func:`launch_dequant` — writes the dense weight (the large-M path then calls ``torch.matmul``).

Block sizes and the split-K target below are starting points, not measured optima.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from compress.kernels._triton import interpreting
from compress.kernels.quant_matmul_torch import PackedWeight, check_activation, check_path, make_packed_weight

MODE_SYM, MODE_ASYM, MODE_LUT = 0, 1, 2
_MODES = {"sym": MODE_SYM, "asym": MODE_ASYM, "lut": MODE_LUT}

DOT_IEEE_F32, DOT_NATIVE, DOT_UPCAST_F32 = 0, 1, 2
"""How ``tl.dot`` is fed: fp32 operands at full (IEEE) precision; native fp16/bf16 operands; or
bf16 operands upcast to fp32 — used only under the interpreter, whose ``tl.dot`` multiplies the raw
uint16 storage of bf16 tensors instead of their values."""

GEMV_TARGET_PROGRAMS = 256
"""Split-K aims for about this many programs per row (provisional, not measured)."""


@triton.jit
def _stream_codes(base, idx, stride, mask, BITS: tl.constexpr):
    """Unsigned codes ``idx`` of a dense ``BITS``-wide stream whose int32 word ``w`` is at
    ``base + w * stride`` (see :mod:`compress.kernels.packing`): code ``i`` starts at bit ``i * BITS``.

    For 2/4/8 bits a code lies in one word; for 3 bits a code whose low part fills the top of
    one word takes its high part from the bottom of the next, so a second (masked) load is made.
    """
    bit = idx * BITS
    word = bit // 32
    shift = bit % 32
    words = tl.load(base + word * stride, mask=mask, other=0)
    if 32 % BITS == 0:
        codes = (words >> shift) & ((1 << BITS) - 1)
    else:
        full = tl.zeros_like(shift) + ((1 << BITS) - 1)
        lo = tl.minimum(32 - shift, BITS)  # bits of the code in its first word
        codes = (words >> shift) & (full >> (BITS - lo))  # arithmetic shift: the mask drops sign bits
        nxt = tl.load(base + (word + 1) * stride, mask=mask & (lo < BITS), other=0)
        codes = codes | ((nxt & (full >> lo)) << lo)
    return codes


@triton.jit
def _dequant_tile(
    wp_ptr, s_ptr, z_ptr, cb_ptr, offs_n, offs_k, k0, N, K, stride_wn, stride_sn, stride_zw, stride_cb,
    BITS: tl.constexpr, GROUP: tl.constexpr, MODE: tl.constexpr, SCALE_PER_TILE: tl.constexpr,
):
    """fp32 ``[BLOCK_N, BLOCK_K]`` tile of the dense weight at rows ``offs_n``, columns ``offs_k``.

    ``SCALE_PER_TILE`` means the whole k-tile starting at ``k0`` lies in one quantization group, so
    one scale (and zero) per row is loaded instead of one per element. Out-of-range elements are
    finite but meaningless: callers zero the matching activations or mask the store.
    """
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_k < K)[None, :]
    codes = _stream_codes(wp_ptr + offs_n[:, None] * stride_wn, offs_k[None, :], 1, mask, BITS)
    if SCALE_PER_TILE:
        group = k0 // GROUP
        scale = tl.load(s_ptr + offs_n * stride_sn + group, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    else:
        group = offs_k // GROUP
        scale = tl.load(s_ptr + offs_n[:, None] * stride_sn + group[None, :], mask=mask, other=0.0).to(tl.float32)
    if MODE == 2:  # MODE_LUT (jit code cannot read plain module globals)
        q = tl.load(cb_ptr + offs_n[:, None] * stride_cb + codes, mask=mask, other=0.0)  # stride 0: one table
    elif MODE == 1:  # MODE_ASYM: zero points packed along the output dimension
        if SCALE_PER_TILE:
            zero = _stream_codes(z_ptr + group, offs_n, stride_zw, mask_n, BITS)[:, None]
        else:
            zero = _stream_codes(z_ptr + group[None, :], offs_n[:, None], stride_zw, mask, BITS)
        q = (codes - zero).to(tl.float32)
    else:  # MODE_SYM: stored code = signed code + 2^(bits-1)
        q = (codes - (1 << (BITS - 1))).to(tl.float32)
    return q * scale


@triton.jit
def mma(a, b, acc, DOT_MODE: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation, the operands fed as ``DOT_MODE`` says."""
    if DOT_MODE == 0:  # DOT_IEEE_F32
        out = tl.dot(a, b, acc, input_precision="ieee")
    elif DOT_MODE == 1:  # DOT_NATIVE
        out = tl.dot(a, b, acc)
    else:  # DOT_UPCAST_F32
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return out


@triton.jit
def _gemv_kernel(
    x_ptr, wp_ptr, s_ptr, z_ptr, cb_ptr, part_ptr, N, K, K_PER_SPLIT,
    stride_xm, stride_wn, stride_sn, stride_zw, stride_cb, stride_ps, stride_pm,
    BITS: tl.constexpr, GROUP: tl.constexpr, MODE: tl.constexpr, SCALE_PER_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Partial dot products of one row of x with a BLOCK_N slice of W over one K split."""
    row = tl.program_id(0).to(tl.int64)  # rows on grid axis 0: no 65535 limit
    pid_s = tl.program_id(1)
    pid_n = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = pid_s * K_PER_SPLIT  # a multiple of BLOCK_K, so splits never share a k-tile
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for dk in range(0, K_PER_SPLIT, BLOCK_K):
        k0 = k_start + dk
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        w = _dequant_tile(
            wp_ptr, s_ptr, z_ptr, cb_ptr, offs_n, offs_k, k0, N, K, stride_wn, stride_sn, stride_zw, stride_cb,
            BITS, GROUP, MODE, SCALE_PER_TILE,
        )
        acc += tl.sum(w * x[None, :], axis=1)
    tl.store(part_ptr + pid_s * stride_ps + row * stride_pm + offs_n, acc, mask=offs_n < N)


@triton.jit
def _fused_kernel(
    x_ptr, wp_ptr, s_ptr, z_ptr, cb_ptr, b_ptr, y_ptr, M, N, K,
    stride_xm, stride_wn, stride_sn, stride_zw, stride_cb, stride_ym,
    BITS: tl.constexpr, GROUP: tl.constexpr, MODE: tl.constexpr, SCALE_PER_TILE: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_N]`` output tile; weight tiles are decoded in registers."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # M * K may exceed 2**31
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_mask = mask_m[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=x_mask, other=0.0)
        w = _dequant_tile(
            wp_ptr, s_ptr, z_ptr, cb_ptr, offs_n, offs_k, k0, N, K, stride_wn, stride_sn, stride_zw, stride_cb,
            BITS, GROUP, MODE, SCALE_PER_TILE,
        )
        acc = mma(x, tl.trans(w.to(x.dtype)), acc, DOT_MODE)  # [BM, BK] @ [BK, BN]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _dequant_kernel(
    wp_ptr, s_ptr, z_ptr, cb_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_zw, stride_cb, stride_on,
    BITS: tl.constexpr, GROUP: tl.constexpr, MODE: tl.constexpr, SCALE_PER_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Write one ``[BLOCK_N, BLOCK_K]`` tile of the dense weight in the output dtype."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    w = _dequant_tile(
        wp_ptr, s_ptr, z_ptr, cb_ptr, offs_n, offs_k, k0, N, K, stride_wn, stride_sn, stride_zw, stride_cb,
        BITS, GROUP, MODE, SCALE_PER_TILE,
    )
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_k[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# launchers


def _block_k(w: PackedWeight, block_k: int | None) -> tuple[int, bool]:
    """K tile size and whether every k-tile lies inside a single quantization group.

    By default the largest of 64/32/16 that divides the group size is used (so group scales load
    once per row per tile); per-channel weights (one group) take 64; other group sizes fall back
    to per-element scale gathers with 64.
    """
    if block_k is None:
        block_k = 64
        if w.n_groups > 1:
            block_k = next((b for b in (64, 32, 16) if w.group_size % b == 0), 64)
    if block_k < 16 or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of two >= 16, got {block_k}")
    return block_k, w.n_groups == 1 or w.group_size % block_k == 0


def dot_mode(dtype: torch.dtype) -> int:
    """Operand handling for ``tl.dot`` given the activation dtype (see ``DOT_*``)."""
    if dtype == torch.float32:
        return DOT_IEEE_F32
    if dtype == torch.bfloat16 and interpreting():
        return DOT_UPCAST_F32
    return DOT_NATIVE


def _weight_args(w: PackedWeight) -> tuple[list, list, dict]:
    """(pointer args, stride args, constexpr kwargs) describing the packed weight to a kernel."""
    packed = w.packed.contiguous()
    scale = w.scale.contiguous()
    # Unused pointers get a valid tensor; the MODE constexpr guarantees they are never read.
    zero = w.zero_point.contiguous() if w.zero_point is not None else packed
    codebook = scale
    if w.codebook is not None:
        codebook = w.codebook.to(device=packed.device, dtype=torch.float32).contiguous()
    ptrs = [packed, scale, zero, codebook]
    per_row_table = w.codebook is not None and w.codebook.dim() == 2
    strides = [packed.stride(0), scale.stride(0), zero.stride(0), codebook.stride(0) if per_row_table else 0]
    meta = {"BITS": w.bits, "GROUP": w.group_size, "MODE": _MODES[w.mode]}
    return ptrs, strides, meta


def _as_rows(x: Tensor) -> Tensor:
    """``x`` as a 2-D ``[M, K]`` tensor with unit stride along K (copies only if needed)."""
    x2 = x.reshape(-1, x.shape[-1])  # [..., K] -> [M, K]
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _check_out(out: Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {shape} on {device}")


def gemv_plan(
    w: PackedWeight, *, split_k: int | None = None, block_n: int = 64, block_k: int | None = None,
) -> tuple[int, int, int, bool]:
    """``(splits, k_per_split, block_k, scale_per_tile)`` for :func:`launch_gemv`.

    By default the K dimension is split so that about ``GEMV_TARGET_PROGRAMS`` programs run per
    row; a split is a whole number of k-tiles, and no split starts past K.
    """
    block_k, per_tile = _block_k(w, block_k)
    k_tiles = -(-w.in_features // block_k)
    if split_k is None:
        split_k = -(-GEMV_TARGET_PROGRAMS // -(-w.out_features // block_n))
    splits = max(1, min(split_k, k_tiles))
    k_per_split = -(-k_tiles // splits) * block_k
    splits = -(-w.in_features // k_per_split)
    return splits, k_per_split, block_k, per_tile


def launch_gemv(
    x2: Tensor, w: PackedWeight, *, partials: Tensor | None = None, split_k: int | None = None,
    block_n: int = 64, block_k: int | None = None,
) -> Tensor:
    """Split-K GEMV of every row of ``x2 [M, K]``: returns fp32 partials ``[splits, M, N]``.

    The caller sums over dim 0. ``partials`` (optional, contiguous fp32, shape from
    :func:`gemv_plan`) receives the result.
    """
    m, k = x2.shape
    n = w.out_features
    splits, k_per_split, block_k, per_tile = gemv_plan(w, split_k=split_k, block_n=block_n, block_k=block_k)
    if partials is None:
        partials = torch.empty((splits, m, n), device=x2.device, dtype=torch.float32)
    _check_out(partials, (splits, m, n), torch.float32, x2.device)
    ptrs, strides, meta = _weight_args(w)
    grid = (m, splits, triton.cdiv(n, block_n))
    _gemv_kernel[grid](
        x2, *ptrs, partials, n, k, k_per_split, x2.stride(0), *strides, partials.stride(0), partials.stride(1),
        SCALE_PER_TILE=per_tile, BLOCK_N=block_n, BLOCK_K=block_k, **meta,
    )
    return partials


def _fused_block_m(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


def launch_fused(
    x2: Tensor, w: PackedWeight, bias: Tensor | None, *, out: Tensor | None = None,
    block_m: int | None = None, block_n: int = 64, block_k: int | None = None,
) -> Tensor:
    """Fused dequant-GEMM: ``x2 [M, K] · dequant(W)ᵀ + bias`` -> ``[M, N]`` in ``x2.dtype``."""
    m, k = x2.shape
    n = w.out_features
    block_m = block_m or _fused_block_m(m)
    block_k, per_tile = _block_k(w, block_k)
    if out is None:
        out = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    _check_out(out, (m, n), x2.dtype, x2.device)
    ptrs, strides, meta = _weight_args(w)
    b = bias.contiguous() if bias is not None else out
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _fused_kernel[grid](
        x2, *ptrs, b, out, m, n, k, x2.stride(0), *strides, out.stride(0),
        SCALE_PER_TILE=per_tile, HAS_BIAS=bias is not None, DOT_MODE=dot_mode(x2.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **meta,
    )
    return out


def launch_dequant(
    w: PackedWeight, dtype: torch.dtype, *, out: Tensor | None = None, block_n: int = 64, block_k: int | None = None,
) -> Tensor:
    """Dense ``[N, K]`` weight in ``dtype`` (decoded in fp32, rounded once)."""
    n, k = w.out_features, w.in_features
    block_k, per_tile = _block_k(w, block_k)
    if out is None:
        out = torch.empty((n, k), device=w.packed.device, dtype=dtype)
    _check_out(out, (n, k), dtype, w.packed.device)
    ptrs, strides, meta = _weight_args(w)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _dequant_kernel[grid](
        *ptrs, out, n, k, *strides, out.stride(0),
        SCALE_PER_TILE=per_tile, BLOCK_N=block_n, BLOCK_K=block_k, **meta,
    )
    return out


# ---------------------------------------------------------------------------------------------
# entry points (same signatures as the public dispatchers)


def _matmul(x: Tensor, w: PackedWeight, bias: Tensor | None, path: str) -> Tensor:
    """Run the chosen path on ``x [..., K]`` and return ``[..., N]`` in ``x.dtype``."""
    from compress.kernels.quant_matmul import choose_path  # the thresholds live with the dispatcher

    check_path(path)
    check_activation(x, w.in_features)
    x2 = _as_rows(x)  # [M, K]
    m, n = x2.shape[0], w.out_features
    if m == 0:
        return x.new_empty((*x.shape[:-1], n))
    if path == "auto":
        path = choose_path(m, n, w.in_features)
    if path == "gemv":
        y = launch_gemv(x2, w).sum(dim=0)  # [splits, M, N] -> [M, N] fp32
        if bias is not None:
            y += bias.to(torch.float32)
        y = y.to(x.dtype)
    elif path == "fused":
        y = launch_fused(x2, w, bias)
    else:
        dense = launch_dequant(w, x.dtype)  # [N, K]
        y = torch.matmul(x2, dense.t()) if bias is None else torch.addmm(bias.to(x.dtype), x2, dense.t())
    return y.reshape(*x.shape[:-1], n)  # [M, N] -> [..., N]


def quant_matmul(
    x: Tensor, weight_packed: Tensor, weight_scale: Tensor, weight_zero_point: Tensor | None, *,
    bits: int, group_size: int, in_features: int, bias: Tensor | None = None, path: str = "auto",
) -> Tensor:
    """Triton implementation of :func:`compress.kernels.quant_matmul.quant_matmul`."""
    w = make_packed_weight(
        weight_packed, weight_scale, weight_zero_point, None, bits=bits, group_size=group_size, in_features=in_features
    )
    return _matmul(x, w, bias, path)


def lut_matmul(
    x: Tensor, weight_packed: Tensor, codebook: Tensor, weight_scale: Tensor, *,
    bits: int, group_size: int, in_features: int, bias: Tensor | None = None, path: str = "auto",
) -> Tensor:
    """Triton implementation of :func:`compress.kernels.quant_matmul.lut_matmul`."""
    w = make_packed_weight(
        weight_packed, weight_scale, None, codebook, bits=bits, group_size=group_size, in_features=in_features
    )
    return _matmul(x, w, bias, path)


def dequantize(
    weight_packed: Tensor, weight_scale: Tensor, weight_zero_point: Tensor | None, *,
    bits: int, group_size: int, in_features: int, dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Triton implementation of :func:`compress.kernels.quant_matmul.dequantize`."""
    w = make_packed_weight(
        weight_packed, weight_scale, weight_zero_point, None, bits=bits, group_size=group_size, in_features=in_features
    )
    return launch_dequant(w, dtype)


def lut_dequantize(
    weight_packed: Tensor, codebook: Tensor, weight_scale: Tensor, *,
    bits: int, group_size: int, in_features: int, dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Triton implementation of :func:`compress.kernels.quant_matmul.lut_dequantize`."""
    w = make_packed_weight(
        weight_packed, weight_scale, None, codebook, bits=bits, group_size=group_size, in_features=in_features
    )
    return launch_dequant(w, dtype)
