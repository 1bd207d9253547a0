"""Quantized and lookup-table matmul: Triton kernels (interpreted on CPU) and the torch twin.

Every result is compared with a float64 reference built from the *unpacked* codes (independent of
the packing code under test) using ``rel = ‖y − y_ref‖_F / ‖y_ref‖_F``. Triton outputs are written
into NaN-poisoned buffers through the launchers, so an element a kernel forgets to write fails.

The parameter grid covers every bit width × path in fp32, then fp16/bf16, group sizes, tilings and
the lookup-table variant on subsets, to stay fast under the interpreter.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch
from torch import Tensor

from compress.kernels import quant_matmul as qm
from compress.kernels import quant_matmul_torch as qtorch
from compress.kernels.packing import dequantize_packed, pack_int32

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
"""Largest allowed relative error against the float64 reference, per activation dtype."""
PATHS = ("gemv", "fused", "dequant")
BITS = (2, 3, 4, 8)
N_OUT = 37  # not a multiple of any tile


def rel_err(y: Tensor, ref: Tensor) -> float:
    return ((y.to(torch.float64) - ref).norm() / ref.norm()).item()


@dataclass
class Case:
    """A random packed weight and its float64 dense reference ``[N, K]``."""

    packed: Tensor
    scale: Tensor
    zero_point: Tensor | None
    codebook: Tensor | None
    bits: int
    group_size: int
    in_features: int
    dense64: Tensor

    @property
    def meta(self) -> dict:
        return dict(bits=self.bits, group_size=self.group_size, in_features=self.in_features)

    def matmul(self, x: Tensor, bias: Tensor | None, path: str) -> Tensor:
        """The public dispatcher for this weight kind."""
        if self.codebook is not None:
            return qm.lut_matmul(x, self.packed, self.codebook, self.scale, bias=bias, path=path, **self.meta)
        return qm.quant_matmul(x, self.packed, self.scale, self.zero_point, bias=bias, path=path, **self.meta)

    def twin(self, x: Tensor, bias: Tensor | None) -> Tensor:
        if self.codebook is not None:
            return qtorch.lut_matmul(x, self.packed, self.codebook, self.scale, bias=bias, **self.meta)
        return qtorch.quant_matmul(x, self.packed, self.scale, self.zero_point, bias=bias, **self.meta)

    def reference(self, x: Tensor, bias: Tensor | None) -> Tensor:
        y = x.to(torch.float64) @ self.dense64.t()
        return y if bias is None else y + bias.to(torch.float64)


def make_case(
    k: int, bits: int, group_size: int, *, mode: str = "sym", n: int = N_OUT,
    scale_dtype: torch.dtype = torch.float32, seed: int = 0,
) -> Case:
    """Random codes / scales / zeros (mode ``sym``, ``asym``, ``lut`` (one table) or ``lut-rows``
    (one table per output row)), packed, plus the reference."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(lo, hi + 1, (n, k), generator=gen)
    n_groups = -(-k // group_size)
    gidx = torch.arange(k) // group_size
    scale = (torch.rand(n, n_groups, generator=gen) * 0.09 + 0.01).to(scale_dtype)
    zero_point = codebook = None
    if mode == "lut":  # stored value = code - lo is the unsigned codebook index
        codebook = torch.randn(1 << bits, generator=gen).sort().values
        q = codebook.to(torch.float64)[codes - lo]
    elif mode == "lut-rows":
        codebook = torch.randn(n, 1 << bits, generator=gen).sort(dim=1).values
        q = codebook.to(torch.float64).gather(1, codes - lo)
    elif mode == "asym":
        zeros = torch.randint(lo, hi + 1, (n, n_groups), generator=gen)
        zero_point = pack_int32(zeros, bits, dim=0)
        q = (codes - zeros[:, gidx]).to(torch.float64)
    else:
        q = codes.to(torch.float64)
    dense64 = q * scale.to(torch.float64)[:, gidx]
    return Case(pack_int32(codes, bits), scale, zero_point, codebook, bits, group_size, k, dense64)


def make_inputs(
    m: int, case: Case, dtype: torch.dtype, *, bias: bool = True, seed: int = 1
) -> tuple[Tensor, Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, case.in_features, generator=gen).to(dtype)
    b = torch.randn(case.packed.shape[0], generator=gen).to(dtype) if bias else None
    return x, b


@pytest.fixture
def qt() -> ModuleType:
    """The Triton module, imported under the interpreter (skips when Triton is missing)."""
    pytest.importorskip("triton")
    from compress.kernels import quant_matmul_triton

    return quant_matmul_triton


def run_launcher(qt: ModuleType, case: Case, x: Tensor, bias: Tensor | None, path: str, **blocks) -> Tensor:
    """Run one path through its launcher with NaN-poisoned output buffers; return ``[M, N]``."""
    w = qt.make_packed_weight(case.packed, case.scale, case.zero_point, case.codebook, **case.meta)
    m, n = x.shape[0], w.out_features
    if path == "gemv":
        splits = qt.gemv_plan(w, **blocks)[0]
        partials = torch.full((splits, m, n), float("nan"))
        qt.launch_gemv(x, w, partials=partials, **blocks)
        y = partials.sum(dim=0)
        y = (y if bias is None else y + bias.to(torch.float32)).to(x.dtype)
    elif path == "fused":
        y = torch.full((m, n), float("nan"), dtype=x.dtype)
        qt.launch_fused(x, w, bias, out=y, **blocks)
    else:
        dense = torch.full((n, w.in_features), float("nan"), dtype=x.dtype)
        qt.launch_dequant(w, x.dtype, out=dense, **blocks)
        y = x @ dense.t() if bias is None else torch.addmm(bias, x, dense.t())
    assert torch.isfinite(y).all(), "a kernel left part of its output unwritten"
    return y


def check_triton_path(qt: ModuleType, case: Case, m: int, dtype: torch.dtype, path: str, **blocks) -> None:
    """Launcher (poisoned) and public dispatcher against the float64 reference and the twin."""
    x, bias = make_inputs(m, case, dtype)
    ref = case.reference(x, bias)
    y = run_launcher(qt, case, x, bias, path, **blocks)
    assert y.dtype == dtype
    assert rel_err(y, ref) <= TOLERANCE[dtype], (path, rel_err(y, ref))
    y_twin = case.twin(x, bias)
    assert rel_err(y, y_twin.to(torch.float64)) <= 2 * TOLERANCE[dtype]
    if not blocks:
        y_public = case.matmul(x, bias, path)
        assert y_public.dtype == dtype and y_public.shape == (m, N_OUT)
        assert rel_err(y_public, ref) <= TOLERANCE[dtype]


# ----------------------------------------------------------------------------------- cases

# (K, group_size): ragged last groups (133 % 32, 100 % 64, 140 % 128) and per-channel.
SHAPES = [(133, 32), (100, 64), (140, 128), (75, 75)]
ROWS = {"gemv": (1, 3), "fused": (3, 17), "dequant": (17, 64)}


def _fp32_cases() -> list:
    cases = []
    for i, (bits, path, mode) in enumerate(itertools.product(BITS, PATHS, ("sym", "asym"))):
        k, g = SHAPES[i % len(SHAPES)]
        name = f"b{bits}-{path}-{mode}-K{k}-g{g}"
        cases.append(pytest.param(bits, path, mode, ROWS[path][i % 2], k, g, id=name))
    return cases


def _half_cases() -> list:
    cases = []
    for i, (dtype, path, bits) in enumerate(itertools.product((torch.float16, torch.bfloat16), PATHS, BITS)):
        k, g = SHAPES[i % len(SHAPES)]
        mode = ("sym", "asym")[i % 2]
        scale_dtype = dtype if i % 3 == 0 else torch.float32
        name = f"{str(dtype)[6:]}-{path}-b{bits}-{mode}-K{k}-g{g}-s{str(scale_dtype)[6:]}"
        cases.append(pytest.param(dtype, path, bits, mode, ROWS[path][i % 2], k, g, scale_dtype, id=name))
    return cases


@pytest.mark.parametrize("bits,path,mode,m,k,group_size", _fp32_cases())
def test_triton_fp32_every_bits_and_path(qt, force_triton, bits, path, mode, m, k, group_size):
    case = make_case(k, bits, group_size, mode=mode, seed=bits * 7 + k)
    check_triton_path(qt, case, m, torch.float32, path)


@pytest.mark.parametrize("dtype,path,bits,mode,m,k,group_size,scale_dtype", _half_cases())
def test_triton_half_precision(qt, force_triton, dtype, path, bits, mode, m, k, group_size, scale_dtype):
    case = make_case(k, bits, group_size, mode=mode, scale_dtype=scale_dtype, seed=bits + k)
    check_triton_path(qt, case, m, dtype, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("group_size", [32, 64, 128, 133, 40, 48, 67])
def test_triton_group_sizes(qt, force_triton, path, group_size):
    """32/64/128 (ragged at K=133), per-channel (133), scale gathers (40, 67), 16-wide k-tiles (48)."""
    case = make_case(133, 3 if group_size in (40, 133) else 4, group_size, mode="asym", seed=group_size)
    check_triton_path(qt, case, ROWS[path][1], torch.float32, path)


TILINGS = [
    ("gemv", dict(split_k=1, block_n=16)),
    ("gemv", dict(split_k=3, block_n=16, block_k=16)),
    ("gemv", dict(split_k=1000, block_k=32)),  # clamped to one split per k-tile
    ("gemv", dict(block_k=64)),  # group 32 < tile: per-element scale gathers
    ("fused", dict(block_m=16, block_n=16, block_k=16)),  # 4 M-tiles x 3 N-tiles
    ("fused", dict(block_m=32, block_n=32, block_k=64)),  # scale gathers
    ("dequant", dict(block_n=16, block_k=16)),
    ("dequant", dict(block_k=64)),  # scale gathers
]


TILING_IDS = [f"{p}-" + "-".join(f"{k}{v}" for k, v in b.items()) for p, b in TILINGS]


@pytest.mark.parametrize("path,blocks", TILINGS, ids=TILING_IDS)
@pytest.mark.parametrize("bits,mode", [(3, "asym"), (8, "sym"), (2, "lut"), (3, "lut-rows")])
def test_triton_tilings(qt, bits, mode, path, blocks):
    """Multiple tiles per dimension, split-K variants and the gather fallback for scales."""
    case = make_case(133, bits, 32, mode=mode, seed=bits)
    check_triton_path(qt, case, 64 if path == "fused" else 3, torch.float32, path, **blocks)


def _lut_cases() -> list:
    cases = [pytest.param(bits, path, torch.float32, id=f"b{bits}-{path}-fp32") for bits in BITS for path in PATHS]
    for path, dtype in itertools.product(PATHS, (torch.float16, torch.bfloat16)):
        cases.append(pytest.param(3, path, dtype, id=f"b3-{path}-{str(dtype)[6:]}"))
    return cases


@pytest.mark.parametrize("bits,path,dtype", _lut_cases())
def test_triton_lut(qt, force_triton, bits, path, dtype):
    k, g = SHAPES[bits % len(SHAPES)]
    case = make_case(k, bits, g, mode="lut", seed=bits)
    check_triton_path(qt, case, ROWS[path][bits % 2], dtype, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits", BITS)
def test_triton_lut_per_row_tables(qt, force_triton, bits, path):
    """One codebook per output row (a per-channel NUPES exponent): odd shapes, every path."""
    k, g = SHAPES[(bits + 1) % len(SHAPES)]
    case = make_case(k, bits, g, mode="lut-rows", seed=bits + 10)
    check_triton_path(qt, case, ROWS[path][bits % 2], torch.float32, path)


@pytest.mark.parametrize("m", [1, 5, 300])
@pytest.mark.parametrize("bits", BITS)
def test_twin_lut_per_row_tables(bits, m):
    """The twin's plane and dequant paths with one table per row match the float64 reference."""
    case = make_case(133, bits, 32, mode="lut-rows", seed=bits)
    x, b = make_inputs(m, case, torch.float32)
    assert rel_err(case.twin(x, b), case.reference(x, b)) <= 1e-5
    dense = qtorch.lut_dequantize(case.packed, case.codebook, case.scale, **case.meta)
    assert rel_err(dense, case.dense64) <= 1e-6


@pytest.mark.parametrize("mode", ["sym", "asym", "lut", "lut-rows"])
@pytest.mark.parametrize("bits", BITS)
def test_triton_dequantize_matches_twin(qt, force_triton, mode, bits):
    case = make_case(100, bits, 64, mode=mode, seed=bits)
    if mode.startswith("lut"):
        args = (case.packed, case.codebook, case.scale)
        fn, twin = qm.lut_dequantize, qtorch.lut_dequantize
    else:
        args = (case.packed, case.scale, case.zero_point)
        fn, twin = qm.dequantize, qtorch.dequantize
    for dtype in (torch.float32, torch.bfloat16):
        dense = fn(*args, dtype=dtype, **case.meta)
        assert dense.dtype == dtype and dense.shape == (N_OUT, 100)
        assert rel_err(dense, case.dense64) <= TOLERANCE[dtype]
        if dtype == torch.float32:
            torch.testing.assert_close(dense, twin(*args, dtype=dtype, **case.meta), rtol=1e-6, atol=0)


@pytest.mark.parametrize("path", PATHS)
def test_triton_leading_dims_and_empty(qt, force_triton, path):
    case = make_case(75, 4, 32, mode="asym")
    x = torch.randn(2, 3, 75)
    y = case.matmul(x, None, path)
    assert y.shape == (2, 3, N_OUT)
    assert rel_err(y, case.reference(x.reshape(6, 75), None).reshape(2, 3, N_OUT)) <= 1e-5
    assert case.matmul(torch.randn(0, 4, 75), None, path).shape == (0, 4, N_OUT)


def test_twin_leading_dims_and_empty():
    case = make_case(75, 4, 32, mode="lut")
    x = torch.randn(2, 3, 75)
    y = case.twin(x, None)
    assert y.shape == (2, 3, N_OUT)
    assert rel_err(y, case.reference(x.reshape(6, 75), None).reshape(2, 3, N_OUT)) <= 1e-5
    assert case.twin(torch.randn(0, 4, 75), None).shape == (0, 4, N_OUT)


# ------------------------------------------------------------------------------ torch twin


@pytest.mark.parametrize("group_size", [32, 64, 128, 133])
@pytest.mark.parametrize("mode", ["sym", "asym", "lut"])
@pytest.mark.parametrize("bits", BITS)
def test_twin_fp32(bits, mode, group_size):
    case = make_case(133, bits, group_size, mode=mode, seed=group_size + bits)
    for m in (1, 3, 17, 64):
        x, bias = make_inputs(m, case, torch.float32, bias=m % 2 == 1)
        y = case.twin(x, bias)
        assert y.dtype == torch.float32
        assert rel_err(y, case.reference(x, bias)) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("k,group_size", [(133, 67), (41, 21), (133, 7)])
@pytest.mark.parametrize("mode", ["sym", "asym", "lut"])
@pytest.mark.parametrize("bits", [2, 3])
def test_twin_odd_group_sizes(bits, mode, k, group_size):
    """Group sizes that are not multiples of the codes per word (padding past the last group)."""
    case = make_case(k, bits, group_size, mode=mode, seed=k + group_size)
    x, bias = make_inputs(3, case, torch.float32)
    assert rel_err(case.twin(x, bias), case.reference(x, bias)) <= TOLERANCE[torch.float32]
    dense = qtorch.dequantize_weight(qtorch.make_packed_weight(
        case.packed, case.scale, case.zero_point, case.codebook, **case.meta))
    assert rel_err(dense, case.dense64) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["sym", "asym", "lut"])
@pytest.mark.parametrize("bits", BITS)
def test_twin_half_precision(bits, mode, dtype):
    case = make_case(100, bits, 64, mode=mode, scale_dtype=dtype, seed=bits)
    x, bias = make_inputs(17, case, dtype)
    y = case.twin(x, bias)
    assert y.dtype == dtype
    assert rel_err(y, case.reference(x, bias)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("group_size", [32, 128, 75])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("bits", BITS)
def test_twin_dequantize_matches_packing_reference(bits, asym, group_size):
    case = make_case(75, bits, group_size, mode="asym" if asym else "sym", seed=bits)
    dense = qtorch.dequantize(case.packed, case.scale, case.zero_point, **case.meta)
    slow = dequantize_packed(case.packed, case.scale, case.zero_point, bits, group_size, (N_OUT, 75))
    torch.testing.assert_close(dense, slow, rtol=1e-6, atol=0)
    assert rel_err(dense, case.dense64) <= 1e-6


# ------------------------------------------------------------------------- dispatch, checks


def test_choose_path_thresholds():
    assert qm.choose_path(1, 4096, 4096) == "gemv"
    assert qm.choose_path(qm.GEMV_MAX_M + 1, 4096, 4096) == "fused"
    assert qm.choose_path(qm.FUSED_MAX_M, 4096, 4096) == "fused"
    assert qm.choose_path(qm.FUSED_MAX_M + 1, 4096, 4096) == "dequant"


def _spy(monkeypatch: pytest.MonkeyPatch, module: ModuleType, name: str, calls: list | None = None) -> list:
    """Record calls to ``module.name`` in ``calls`` (a new list unless given); returns the list."""
    calls = [] if calls is None else calls
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("env", [None, "torch", "auto"])
def test_dispatch_cpu_uses_twin(monkeypatch, env):
    if env is None:
        monkeypatch.delenv("COMPRESS_KERNELS", raising=False)
    else:
        monkeypatch.setenv("COMPRESS_KERNELS", env)
    calls = _spy(monkeypatch, qtorch, "quant_matmul")
    _spy(monkeypatch, qtorch, "lut_matmul", calls)
    case = make_case(75, 4, 32, mode="asym")
    lut = make_case(75, 4, 32, mode="lut")
    x, _ = make_inputs(3, case, torch.float32)
    case.matmul(x, None, "auto")
    lut.matmul(x, None, "fused")
    assert calls == ["quant_matmul", "lut_matmul"]


def test_dispatch_forced_triton(qt, force_triton, monkeypatch):
    calls = _spy(monkeypatch, qt, "quant_matmul")
    twin_calls = _spy(monkeypatch, qtorch, "quant_matmul")
    case = make_case(75, 4, 32)
    x, _ = make_inputs(1, case, torch.float32)
    case.matmul(x, None, "auto")
    assert calls == ["quant_matmul"] and twin_calls == []


def test_import_does_not_load_triton():
    code = "import sys, compress.kernels.quant_matmul, compress.kernels.lowrank; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_argument_errors():
    case = make_case(75, 4, 32, mode="asym")
    x, _ = make_inputs(2, case, torch.float32)
    with pytest.raises(ValueError, match="path"):
        case.matmul(x, None, "fast")
    with pytest.raises(ValueError, match="last dim"):
        case.matmul(x[:, :74], None, "auto")
    with pytest.raises(ValueError, match="weight_scale"):
        qm.quant_matmul(x, case.packed, case.scale[:, :1], case.zero_point, **case.meta)
    with pytest.raises(ValueError, match="words per row"):
        qm.quant_matmul(x, case.packed, case.scale, case.zero_point, bits=4, group_size=32, in_features=100)
    with pytest.raises(ValueError, match="weight_zero_point"):
        qm.quant_matmul(x, case.packed, case.scale, case.zero_point[:, :1], **case.meta)
    with pytest.raises(ValueError, match="bits"):
        qm.quant_matmul(x, case.packed, case.scale, None, bits=5, group_size=32, in_features=75)
    with pytest.raises(ValueError, match="codebook"):
        qm.lut_matmul(x, case.packed, torch.randn(8), case.scale, **case.meta)
    with pytest.raises(ValueError, match="codebook"):
        qm.lut_matmul(x, case.packed, torch.randn(N_OUT + 1, 16), case.scale, **case.meta)
