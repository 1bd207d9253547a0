"""Random packed weights / low-rank factors with float64 references, and runners that push them
through every kernel path with NaN-poisoned outputs (shared by ``benchmarks/kernels.py`` and
``benchmarks/kernels_gpu.py``).

The references are built from the *signed codes* drawn here (never by unpacking), so they are
independent of the packing and decoding code under test.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from compress.kernels.packing import pack_int32
from compress.kernels.quant_matmul_torch import make_packed_weight

TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 1e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class QuantCase:
    """A random packed weight (``mode`` sym / asym / lut) and its float64 dense ``[N, K]``."""

    mode: str
    bits: int
    group_size: int
    packed: Tensor
    scale: Tensor
    zero_point: Tensor | None
    codebook: Tensor | None
    dense64: Tensor

    @property
    def n(self) -> int:
        return self.dense64.shape[0]

    @property
    def k(self) -> int:
        return self.dense64.shape[1]

    def packed_weight(self):  # noqa: ANN201
        return make_packed_weight(self.packed, self.scale, self.zero_point, self.codebook, bits=self.bits,
                                  group_size=self.group_size, in_features=self.k)

    def to(self, device: str | torch.device) -> QuantCase:
        mv = (lambda t: None if t is None else t.to(device))
        return QuantCase(self.mode, self.bits, self.group_size, mv(self.packed), mv(self.scale),
                         mv(self.zero_point), mv(self.codebook), self.dense64)


def make_quant_case(mode: str, bits: int, n: int, k: int, group_size: int, seed: int = 0,
                    scale_dtype: torch.dtype = torch.float32) -> QuantCase:
    """Random codes (never all zero), positive scales, random zero points / codebook."""
    gen = torch.Generator().manual_seed(seed)
    half = 1 << (bits - 1)
    n_groups = -(-k // group_size)
    gidx = torch.arange(k) // group_size  # [K]
    scale = ((torch.rand(n, n_groups, generator=gen) + 0.5) * 0.02).to(scale_dtype)  # [N, G]
    s64 = scale.to(torch.float64)[:, gidx]  # [N, K]
    if mode == "lut":
        idx = torch.randint(0, 1 << bits, (n, k), generator=gen)  # unsigned indices
        codebook = torch.randn(1 << bits, generator=gen).sort().values
        packed = pack_int32(idx - half, bits)  # stored unsigned = idx
        dense = codebook.to(torch.float64)[idx] * s64
        return QuantCase(mode, bits, group_size, packed, scale, None, codebook, dense)
    codes = torch.randint(-half, half, (n, k), generator=gen)  # signed
    q = codes.to(torch.float64)
    zero_point = None
    if mode == "asym":
        zero = torch.randint(-half, half, (n, n_groups), generator=gen)  # signed
        zero_point = pack_int32(zero, bits, dim=0)
        q = q - zero.to(torch.float64)[:, gidx]
    return QuantCase(mode, bits, group_size, pack_int32(codes, bits), scale, zero_point, None, q * s64)


def rel_err(y: Tensor, ref: Tensor) -> float:
    """``‖y − ref‖_F / ‖ref‖_F`` in float64; NaN (a failure) if ``y`` has a non-finite element."""
    if not bool(torch.isfinite(y).all()):
        return float("nan")
    return float((y.to(torch.float64).cpu() - ref).norm() / ref.norm())


def triton_quant(case: QuantCase, x: Tensor, bias: Tensor | None, path: str) -> Tensor:
    """One Triton path on ``x [M, K]`` with every output buffer NaN-poisoned before the launch."""
    from compress.kernels import quant_matmul_triton as qt

    w = case.packed_weight()
    m, n = x.shape[0], case.n
    if path == "gemv":
        splits = qt.gemv_plan(w)[0]
        partials = torch.full((splits, m, n), float("nan"), device=x.device)
        y = qt.launch_gemv(x, w, partials=partials).sum(dim=0)  # [splits, M, N] -> [M, N] fp32
        return (y if bias is None else y + bias.float()).to(x.dtype)
    if path == "fused":
        out = torch.full((m, n), float("nan"), device=x.device, dtype=x.dtype)
        return qt.launch_fused(x, w, bias, out=out)
    dense = torch.full((n, case.k), float("nan"), device=x.device, dtype=x.dtype)
    qt.launch_dequant(w, x.dtype, out=dense)
    return x @ dense.t() if bias is None else torch.addmm(bias.to(x.dtype), x, dense.t())


def twin_quant(case: QuantCase, x: Tensor, bias: Tensor | None) -> Tensor:
    """The torch twin (what CPU serving runs)."""
    from compress.kernels import quant_matmul_torch as qtorch

    meta = dict(bits=case.bits, group_size=case.group_size, in_features=case.k, bias=bias)
    if case.codebook is not None:
        return qtorch.lut_matmul(x, case.packed, case.codebook, case.scale, **meta)
    return qtorch.quant_matmul(x, case.packed, case.scale, case.zero_point, **meta)


def quant_reference(case: QuantCase, x: Tensor, bias: Tensor | None) -> Tensor:
    y = x.to(torch.float64).cpu() @ case.dense64.t()
    return y if bias is None else y + bias.to(torch.float64).cpu()


def make_factors(m: int, k: int, rank: int, ns: tuple[int, ...], dtype: torch.dtype, seed: int = 0,
                 ) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor | None]]:
    """``x [m, k]``, ``U [k, r]``, ``V_i [r, n_i]`` and biases (every other V), all in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    U = (torch.randn(k, rank, generator=gen) / k**0.5).to(dtype)
    Vs = [(torch.randn(rank, n, generator=gen) / rank**0.5).to(dtype) for n in ns]
    biases = [torch.randn(n, generator=gen).to(dtype) if i % 2 == 0 else None for i, n in enumerate(ns)]
    return x, U, Vs, biases


def lowrank_reference(x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None) -> Tensor:
    f = (lambda t: t.to(torch.float64).cpu())
    y = (f(x) @ f(U)) @ f(V)  # float64 throughout (inputs are exactly representable)
    return y if bias is None else y + f(bias)


def triton_lowrank(x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None) -> Tensor:
    """The Triton low-rank kernel with a NaN-poisoned output."""
    from compress.kernels import lowrank_triton as lt

    out = torch.full((x.shape[0], V.shape[1]), float("nan"), device=x.device, dtype=x.dtype)
    return lt.launch_lowrank(x, U, V, bias, out=out)

