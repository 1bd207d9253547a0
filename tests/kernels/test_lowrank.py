"""Low-rank matmul ``(x @ U) @ V + bias``: Triton kernels (interpreted on CPU) and the torch twin.

Results are compared with a float64 reference (``rel = ‖y − y_ref‖_F / ‖y_ref‖_F``); Triton
outputs are written into NaN-poisoned buffers so an unwritten element fails. Ranks are not
multiples of any tile (5, 19, 33, and 70 for the chunked kernel), M is odd or a tile multiple.
"""

from __future__ import annotations

import itertools
from types import ModuleType

import pytest
import torch
from torch import Tensor

from compress.kernels import lowrank as lr
from compress.kernels import lowrank_torch as lrtorch

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
"""Largest allowed relative error against the float64 reference, per activation dtype."""
K_IN, N_OUT = 100, 37


def rel_err(y: Tensor, ref: Tensor) -> float:
    return ((y.to(torch.float64) - ref).norm() / ref.norm()).item()


def make_factors(
    m: int, rank: int, ns: tuple[int, ...] = (N_OUT,), *, k: int = K_IN, dtype: torch.dtype = torch.float32,
    bias: bool = True, seed: int = 0,
) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor | None]]:
    """Random ``x [m, k]``, ``U [k, rank]``, one ``V [rank, n]`` per n, biases on every other V."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    U = (torch.randn(k, rank, generator=gen) / k**0.5).to(dtype)
    Vs = [(torch.randn(rank, n, generator=gen) / rank**0.5).to(dtype) for n in ns]
    biases = [torch.randn(n, generator=gen).to(dtype) if bias and i % 2 == 0 else None for i, n in enumerate(ns)]
    return x, U, Vs, biases


def reference(x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None) -> Tensor:
    y = (x.to(torch.float64) @ U.to(torch.float64)) @ V.to(torch.float64)
    return y if bias is None else y + bias.to(torch.float64)


@pytest.fixture
def lt() -> ModuleType:
    """The Triton module, imported under the interpreter (skips when Triton is missing)."""
    pytest.importorskip("triton")
    from compress.kernels import lowrank_triton

    return lowrank_triton


def run_poisoned(lt: ModuleType, x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None, **blocks) -> Tensor:
    out = torch.full((x.shape[0], V.shape[1]), float("nan"), dtype=x.dtype)
    lt.launch_lowrank(x, U, V, bias, out=out, **blocks)
    assert torch.isfinite(out).all(), "the kernel left part of its output unwritten"
    return out


# ------------------------------------------------------------------------------- Triton


def _cases() -> list:
    cases = []
    for i, (rank, m) in enumerate(itertools.product((5, 19, 33, 70), (1, 3, 17, 64))):
        cases.append(pytest.param(rank, m, i % 2 == 0, id=f"r{rank}-m{m}-{'bias' if i % 2 == 0 else 'nobias'}"))
    return cases


@pytest.mark.parametrize("rank,m,bias", _cases())
def test_triton_lowrank_fp32(lt, force_triton, rank, m, bias):
    x, U, (V,), (b,) = make_factors(m, rank, bias=bias, seed=rank + m)
    ref = reference(x, U, V, b)
    y = run_poisoned(lt, x, U, V, b)
    assert rel_err(y, ref) <= TOLERANCE[torch.float32]
    assert rel_err(lrtorch.lowrank_matmul(x, U, V, b), ref) <= TOLERANCE[torch.float32]
    y_public = lr.lowrank_matmul(x, U, V, b)
    assert y_public.shape == (m, N_OUT) and rel_err(y_public, ref) <= TOLERANCE[torch.float32]


TILINGS = [
    dict(block_r=16),  # chunked kernel with a ragged last rank chunk
    dict(block_m=16, block_n=16, block_k=16),  # several tiles in every dimension
    dict(block_m=16, block_n=16, block_r=16),
]


@pytest.mark.parametrize("blocks", TILINGS, ids=lambda b: "-".join(f"{k}{v}" for k, v in b.items()))
@pytest.mark.parametrize("rank", [5, 19, 33])
def test_triton_lowrank_tilings(lt, rank, blocks):
    x, U, (V,), (b,) = make_factors(64, rank, k=133, seed=rank)
    y = run_poisoned(lt, x, U, V, b, **blocks)
    assert rel_err(y, reference(x, U, V, b)) <= TOLERANCE[torch.float32]


def test_triton_hoisted_kernel_walks_several_n_tiles(lt, monkeypatch):
    """With one program per M-tile, each program writes every N-tile from one rank tile."""
    monkeypatch.setattr(lt, "TARGET_PROGRAMS", 1)
    x, U, (V,), (b,) = make_factors(17, 19, ns=(75,))
    y = run_poisoned(lt, x, U, V, b, block_n=16)
    assert rel_err(y, reference(x, U, V, b)) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rank,m", [(5, 1), (19, 17), (33, 64), (70, 3)])
def test_triton_lowrank_half_precision(lt, force_triton, dtype, rank, m):
    x, U, (V,), (b,) = make_factors(m, rank, dtype=dtype, seed=rank)
    ref = reference(x, U, V, b)
    y = run_poisoned(lt, x, U, V, b)
    assert y.dtype == dtype and rel_err(y, ref) <= TOLERANCE[dtype]
    assert rel_err(lr.lowrank_matmul(x, U, V, b), ref) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_biases", [True, False])
def test_triton_shared_basis(lt, force_triton, dtype, with_biases):
    x, U, Vs, biases = make_factors(17, 19, ns=(11, 37, 20), dtype=dtype, bias=with_biases)
    outs = lr.shared_basis_matmul(x, U, Vs, biases if with_biases else None)
    assert [o.shape for o in outs] == [(17, 11), (17, 37), (17, 20)]
    for out, V, b in zip(outs, Vs, biases):
        assert out.dtype == dtype and rel_err(out, reference(x, U, V, b)) <= TOLERANCE[dtype]


def test_triton_leading_dims_and_empty(lt, force_triton):
    x, U, (V,), (b,) = make_factors(6, 5)
    y = lr.lowrank_matmul(x.reshape(2, 3, K_IN), U, V, b)
    assert y.shape == (2, 3, N_OUT)
    assert rel_err(y.reshape(6, N_OUT), reference(x, U, V, b)) <= TOLERANCE[torch.float32]
    assert lr.lowrank_matmul(torch.randn(0, 2, K_IN), U, V, b).shape == (0, 2, N_OUT)


# ---------------------------------------------------------------------------- torch twin


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rank", [5, 19, 33, 70])
def test_twin_lowrank(rank, dtype):
    for m, bias in ((1, True), (3, False), (17, True), (64, False)):
        x, U, (V,), (b,) = make_factors(m, rank, dtype=dtype, bias=bias, seed=m)
        y = lrtorch.lowrank_matmul(x, U, V, b)
        assert y.dtype == dtype and rel_err(y, reference(x, U, V, b)) <= TOLERANCE[dtype]


def test_twin_chunks_rows(monkeypatch):
    """Several row chunks (the last one ragged) give the same result as one."""
    monkeypatch.setattr(lrtorch, "CHUNK_ROWS", 7)
    x, U, Vs, biases = make_factors(17, 19, ns=(11, 37, 20))
    outs = lrtorch.shared_basis_matmul(x.reshape(1, 17, K_IN), U, Vs, biases)
    for out, V, b in zip(outs, Vs, biases):
        assert out.shape == (1, 17, V.shape[1])
        assert rel_err(out.reshape(17, -1), reference(x, U, V, b)) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("with_biases", [True, False])
def test_twin_shared_basis(with_biases):
    x, U, Vs, biases = make_factors(3, 33, ns=(11, 37, 20), bias=with_biases)
    outs = lrtorch.shared_basis_matmul(x, U, Vs, biases if with_biases else None)
    for out, V, b in zip(outs, Vs, biases):
        assert rel_err(out, reference(x, U, V, b)) <= TOLERANCE[torch.float32]


# ------------------------------------------------------------------------- dispatch, checks


@pytest.mark.parametrize("env", [None, "torch"])
def test_dispatch_cpu_uses_twin(monkeypatch, env):
    if env is None:
        monkeypatch.delenv("COMPRESS_KERNELS", raising=False)
    else:
        monkeypatch.setenv("COMPRESS_KERNELS", env)
    calls = []
    original = lrtorch.shared_basis_matmul
    monkeypatch.setattr(lrtorch, "shared_basis_matmul", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(
        lrtorch, "lowrank_matmul", lambda *a: calls.append(1) or original(a[0], a[1], [a[2]], [a[3]])[0]
    )
    x, U, Vs, biases = make_factors(3, 5, ns=(11, 37))
    lr.lowrank_matmul(x, U, Vs[0], biases[0])
    lr.shared_basis_matmul(x, U, Vs, biases)
    assert len(calls) == 2


def test_dispatch_forced_triton(lt, force_triton, monkeypatch):
    calls = []
    original = lt.launch_lowrank
    monkeypatch.setattr(lt, "launch_lowrank", lambda *a, **k: calls.append(1) or original(*a, **k))
    x, U, (V,), (b,) = make_factors(3, 5)
    lr.lowrank_matmul(x, U, V, b)
    assert calls == [1]


def test_argument_errors():
    x, U, (V,), (b,) = make_factors(3, 5)
    with pytest.raises(ValueError, match="U"):
        lr.lowrank_matmul(x[:, :-1], U, V, b)
    with pytest.raises(ValueError, match="V must be"):
        lr.lowrank_matmul(x, U, V[:-1], b)
    with pytest.raises(ValueError, match="bias"):
        lr.lowrank_matmul(x, U, V, b[:-1])
    with pytest.raises(ValueError, match="one bias entry per V"):
        lr.shared_basis_matmul(x, U, [V, V], [b])
