"""FlashSVD rank-space FFN blocks: Triton kernel (CPU interpreter), torch twin, references.

Every check compares against a float64 reference that materialises everything densely
(``x @ Ug @ Vg`` etc.); the Triton kernel is also compared with its torch twin, and both with
real ``transformers`` modules whose weights are factored at full rank.  Output buffers are
poisoned with NaN so an element the kernel forgets to write fails the comparison.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from compress.kernels.flashsvd import ffn, ffn_torch, ffn_triton

FP32_TOL = 1e-5
HF_TOL = 1e-4
BF16_TOL = 2e-2
SMALL_BLOCKS = dict(block_l=16, block_d=16, block_r=16, block_rd=16)


# ----------------------------------------------------------------------------- helpers


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Max-abs error relative to the reference's max-abs value (NaN-propagating)."""
    diff = (got.double() - ref.double()).abs().max()
    return float(diff / ref.double().abs().max())


def rand(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    """Random normal data; ``scale`` keeps activations O(1) through the rank products."""
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)


def factors(n_in: int, r: int, n_out: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A random rank-``r`` factor pair ``U [n_in, r]``, ``V [r, n_out]`` with O(1) outputs."""
    return rand(n_in, r, dtype=dtype, scale=n_in**-0.5), rand(r, n_out, dtype=dtype, scale=r**-0.5)


def full_rank_factors(linear: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factorisation of ``linear.weight`` ``[out, in]`` as ``W^T = U V`` via an SVD.

    ``W = A diag(S) B^T`` so ``x W^T = x (B diag(S)) A^T``: ``U = B diag(S)``, ``V = A^T``.
    """
    A, S, Bt = torch.linalg.svd(linear.weight.detach().double(), full_matrices=False)
    return (Bt.T * S).float(), A.T.contiguous().float()


def swiglu_reference(x, Ug, Vg, Uu, Vu, Ud, Vd, bg=None, bu=None, bd=None) -> torch.Tensor:
    """Dense float64 SwiGLU: materialises gate, up and the ``L x D`` hidden."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    gate = d(x) @ d(Ug) @ d(Vg) + (0 if bg is None else d(bg))
    up = d(x) @ d(Uu) @ d(Vu) + (0 if bu is None else d(bu))
    return (F.silu(gate) * up) @ d(Ud) @ d(Vd) + (0 if bd is None else d(bd))


def gelu_reference(x, U1, V1, b1, U2, V2, b2) -> torch.Tensor:
    """Dense float64 BERT FFN with exact erf GELU."""
    d = lambda t: t.double()  # noqa: E731
    h = F.gelu(d(x) @ d(U1) @ d(V1) + d(b1), approximate="none")
    return h @ d(U2) @ d(V2) + d(b2)


def swiglu_problem(L: int, hidden: int, D: int, ranks: tuple[int, int, int], out: int, dtype, bias=True,
                   shared=False, lead: tuple[int, ...] = ()):
    """Random SwiGLU inputs ``(x, Ug, Vg, Uu, Vu, Ud, Vd, bg, bu, bd)``."""
    rg, ru, rd = ranks
    x = rand(*lead, L, hidden, dtype=dtype)
    Ug, Vg = factors(hidden, rg, D, dtype)
    Uu, Vu = factors(hidden, ru, D, dtype)
    if shared:
        Uu = Ug
        Vu = rand(rg, D, dtype=dtype, scale=rg**-0.5)
    Ud, Vd = factors(D, rd, out, dtype)
    biases = (rand(D, dtype=dtype), rand(D, dtype=dtype), rand(out, dtype=dtype)) if bias else (None,) * 3
    return (x, Ug, Vg, Uu, Vu, Ud, Vd, *biases)


def gelu_problem(L: int, hidden: int, D: int, r1: int, r2: int, out: int, dtype):
    """Random BERT-FFN inputs ``(x, U1, V1, b1, U2, V2, b2)``."""
    x = rand(L, hidden, dtype=dtype)
    U1, V1 = factors(hidden, r1, D, dtype)
    U2, V2 = factors(D, r2, out, dtype)
    return x, U1, V1, rand(D, dtype=dtype), U2, V2, rand(out, dtype=dtype)


def poisoned(shape: tuple[int, ...], dtype) -> torch.Tensor:
    """An output buffer full of NaN: any element the code does not write fails the check."""
    return torch.full(shape, float("nan"), dtype=dtype)


# ----------------------------------------------------------------------------- Triton kernel


@pytest.mark.parametrize("L", [1, 3, 17, 50])
def test_triton_swiglu_odd_shapes(L: int) -> None:
    torch.manual_seed(L)
    args = swiglu_problem(L, hidden=24, D=40, ranks=(5, 19, 33), out=20, dtype=torch.float32)
    ref = swiglu_reference(*args)
    got = ffn_triton.flash_swiglu_ffn(*args, **SMALL_BLOCKS, out=poisoned((L, 20), torch.float32))
    twin = ffn_torch.flash_swiglu_ffn(*args, chunk_l=7, chunk_d=13)
    assert rel_err(got, ref) <= FP32_TOL
    assert rel_err(twin, ref) <= FP32_TOL
    assert rel_err(got, twin) <= FP32_TOL


def test_triton_core_writes_every_element_of_s() -> None:
    """The kernel's own output ``S = h @ Ud`` over a poisoned buffer, ragged rd tiles."""
    torch.manual_seed(1)
    x, Ug, Vg, Uu, Vu, Ud, Vd, bg, bu, bd = swiglu_problem(37, 24, 40, (5, 19, 33), 20, torch.float32)
    s = poisoned((37, 33), torch.float32)
    ffn_triton.rank_ffn_core([x @ Ug, x @ Uu], [(Ug, Vg, bg), (Uu, Vu, bu)], Ud, **SMALL_BLOCKS, s_out=s)
    d = lambda t: t.double()  # noqa: E731
    h = F.silu(d(x) @ d(Ug) @ d(Vg) + d(bg)) * (d(x) @ d(Uu) @ d(Vu) + d(bu))
    assert rel_err(s, h @ d(Ud)) <= FP32_TOL


@pytest.mark.parametrize("blocks", [dict(block_l=32, block_d=64, block_r=32, block_rd=32),
                                    dict(block_l=16, block_d=32, block_r=16, block_rd=64)])
def test_triton_swiglu_block_sizes_and_leading_dims(blocks: dict) -> None:
    """The grid follows the block sizes actually passed; ``x`` may have leading dims."""
    torch.manual_seed(2)
    args = swiglu_problem(25, 24, 72, (33, 5, 19), 20, torch.float32, lead=(2,))
    got = ffn_triton.flash_swiglu_ffn(*args, **blocks, out=poisoned((2, 25, 20), torch.float32))
    assert got.shape == (2, 25, 20)
    assert rel_err(got, swiglu_reference(*args)) <= FP32_TOL


def test_triton_swiglu_shared_basis_no_bias() -> None:
    """Jointly factored gate/up: ``Ug is Uu``; biases absent."""
    torch.manual_seed(3)
    args = swiglu_problem(17, 24, 40, (19, 19, 5), 20, torch.float32, bias=False, shared=True)
    assert args[1] is args[3]
    got = ffn_triton.flash_swiglu_ffn(*args, **SMALL_BLOCKS)
    twin = ffn_torch.flash_swiglu_ffn(*args, chunk_l=4, chunk_d=9)
    ref = swiglu_reference(*args)
    assert rel_err(got, ref) <= FP32_TOL
    assert rel_err(twin, ref) <= FP32_TOL


@pytest.mark.parametrize("L", [3, 50])
def test_triton_gelu_odd_shapes(L: int) -> None:
    torch.manual_seed(10 + L)
    args = gelu_problem(L, hidden=24, D=40, r1=19, r2=33, out=20, dtype=torch.float32)
    ref = gelu_reference(*args)
    got = ffn_triton.flash_gelu_ffn(*args, **SMALL_BLOCKS, out=poisoned((L, 20), torch.float32))
    twin = ffn_torch.flash_gelu_ffn(*args, chunk_l=7, chunk_d=13)
    assert rel_err(got, ref) <= FP32_TOL
    assert rel_err(twin, ref) <= FP32_TOL
    assert rel_err(got, twin) <= FP32_TOL


def test_triton_bf16() -> None:
    torch.manual_seed(4)
    sw = swiglu_problem(17, 24, 40, (5, 19, 33), 20, torch.bfloat16)
    ge = gelu_problem(17, 24, 40, 19, 5, 20, torch.bfloat16)
    got_sw = ffn_triton.flash_swiglu_ffn(*sw, **SMALL_BLOCKS, out=poisoned((17, 20), torch.bfloat16))
    got_ge = ffn_triton.flash_gelu_ffn(*ge, **SMALL_BLOCKS, out=poisoned((17, 20), torch.bfloat16))
    assert got_sw.dtype == got_ge.dtype == torch.bfloat16
    assert rel_err(got_sw, swiglu_reference(*sw)) <= BF16_TOL
    assert rel_err(got_ge, gelu_reference(*ge)) <= BF16_TOL
    assert rel_err(ffn_torch.flash_swiglu_ffn(*sw, chunk_l=5, chunk_d=16), swiglu_reference(*sw)) <= BF16_TOL
    assert rel_err(ffn_torch.flash_gelu_ffn(*ge, chunk_l=5, chunk_d=16), gelu_reference(*ge)) <= BF16_TOL


def test_triton_rejects_bad_blocks_and_dtypes() -> None:
    args = swiglu_problem(3, 24, 40, (5, 5, 5), 20, torch.float32)
    with pytest.raises(ValueError, match="power of two"):
        ffn_triton.flash_swiglu_ffn(*args, block_d=24)
    with pytest.raises(ValueError, match="dtype"):
        ffn_triton.flash_swiglu_ffn(args[0].double(), *args[1:])
    for fn in (ffn_triton.flash_swiglu_ffn, ffn_torch.flash_swiglu_ffn):
        with pytest.raises(ValueError, match="V must be"):
            fn(*args[:4], args[4][:, :-1], *args[5:])  # Vu one column short


# ----------------------------------------------------------------------------- HF modules


def test_fused_swiglu_matches_hf_llama_mlp() -> None:
    """Full-rank factors of a real LlamaMLP (separate and jointly factored gate/up)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(5)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                         num_key_value_heads=2, mlp_bias=True, vocab_size=32)
    mlp = LlamaMLP(config).eval()
    x = rand(2, 9, 64)
    with torch.no_grad():
        ref = mlp(x)
    (Ug, Vg), (Uu, Vu), (Ud, Vd) = (full_rank_factors(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    biases = (mlp.gate_proj.bias.detach(), mlp.up_proj.bias.detach(), mlp.down_proj.bias.detach())
    # Joint gate/up basis: SVD of the stacked [2D, in] weight, one U shared by both.
    A, S, Bt = torch.linalg.svd(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach().double(),
                                full_matrices=False)
    U_joint = (Bt.T * S).float()
    Vg_j, Vu_j = A[:96].T.float().contiguous(), A[96:].T.float().contiguous()
    with torch.no_grad():
        for fn in (ffn_triton.flash_swiglu_ffn, ffn_torch.flash_swiglu_ffn):
            blocks = SMALL_BLOCKS if fn is ffn_triton.flash_swiglu_ffn else dict(chunk_l=5, chunk_d=40)
            assert rel_err(fn(x, Ug, Vg, Uu, Vu, Ud, Vd, *biases, **blocks), ref) <= HF_TOL
            assert rel_err(fn(x, U_joint, Vg_j, U_joint, Vu_j, Ud, Vd, *biases, **blocks), ref) <= HF_TOL


def test_fused_gelu_matches_hf_bert_ffn() -> None:
    """Full-rank factors of a real BertIntermediate + BertOutput.dense (exact GELU)."""
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertIntermediate, BertOutput

    torch.manual_seed(6)
    config = BertConfig(hidden_size=64, intermediate_size=100, num_attention_heads=4, hidden_act="gelu")
    inter, output = BertIntermediate(config).eval(), BertOutput(config).eval()
    x = rand(2, 11, 64)
    with torch.no_grad():
        ref = output.dense(inter(x))
        U1, V1 = full_rank_factors(inter.dense)
        U2, V2 = full_rank_factors(output.dense)
        args = (x, U1, V1, inter.dense.bias, U2, V2, output.dense.bias)
        assert rel_err(ffn_triton.flash_gelu_ffn(*args, **SMALL_BLOCKS), ref) <= HF_TOL
        assert rel_err(ffn_torch.flash_gelu_ffn(*args, chunk_l=6, chunk_d=33), ref) <= HF_TOL


# ----------------------------------------------------------------------------- dispatch


def test_dispatcher_picks_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(7)
    sw = swiglu_problem(17, 24, 40, (5, 19, 33), 20, torch.float32)
    ge = gelu_problem(17, 24, 40, 19, 5, 20, torch.float32)
    monkeypatch.setenv("COMPRESS_KERNELS", "torch")
    assert torch.equal(ffn.flash_swiglu_ffn(*sw), ffn_torch.flash_swiglu_ffn(*sw))
    assert torch.equal(ffn.flash_gelu_ffn(*ge), ffn_torch.flash_gelu_ffn(*ge))
    monkeypatch.setenv("COMPRESS_KERNELS", "triton")
    assert torch.equal(ffn.flash_swiglu_ffn(*sw), ffn_triton.flash_swiglu_ffn(*sw))
    assert torch.equal(ffn.flash_gelu_ffn(*ge), ffn_triton.flash_gelu_ffn(*ge))


def test_import_does_not_import_triton() -> None:
    code = "import sys, compress.kernels.flashsvd; assert 'triton' not in sys.modules, 'triton imported'"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ----------------------------------------------------------------------------- streaming twin


def test_twin_streams_long_sequence_with_small_chunks() -> None:
    torch.manual_seed(8)
    sw = swiglu_problem(300, 32, 200, (19, 33, 5), 24, torch.float32)
    ge = gelu_problem(300, 32, 200, 33, 19, 24, torch.float32)
    assert rel_err(ffn_torch.flash_swiglu_ffn(*sw, chunk_l=37, chunk_d=23), swiglu_reference(*sw)) <= FP32_TOL
    assert rel_err(ffn_torch.flash_gelu_ffn(*ge, chunk_l=64, chunk_d=48), gelu_reference(*ge)) <= FP32_TOL


class LargestAllocation(TorchDispatchMode):
    """Records the largest *new* storage any aten op produces while active.

    Storages that already existed (inputs, weights, the preallocated output) and views of them
    are ignored, so the figure is the biggest activation buffer the code allocates by design.
    It is deterministic (no allocator or profiler timing involved) and independent of the
    platform's allocator caching.
    """

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing if t is not None}
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in tree_leaves(result):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.existing:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return result


def largest_allocation(fn, tensors: list[torch.Tensor], **kwargs) -> int:
    """Bytes of the largest new buffer ``fn(*tensors, **kwargs)`` allocates."""
    with LargestAllocation([*tensors, kwargs.get("out")]) as mode:
        fn(*tensors, **kwargs)
    return mode.largest


def unfused_low_rank_swiglu(x, Ug, Vg, Uu, Vu, Ud, Vd, bg, bu, bd, out=None) -> torch.Tensor:
    """The plain low-rank block: materialises gate, up and hidden (``L x D`` each)."""
    h = F.silu(x @ Ug @ Vg + bg) * (x @ Uu @ Vu + bu)
    return torch.addmm(bd, h @ Ud, Vd, out=out.view(-1, Vd.shape[1]))


def test_twin_peak_activation_scales_with_chunk_not_sequence() -> None:
    """L=4096, hidden 256, D 2048, rank 64: the twin never allocates an ``L x D`` buffer.

    Measured with ``LargestAllocation`` (see its docstring).  The unfused low-rank block's
    largest buffer is ``L * D`` floats (32 MiB); the twin's is bounded by
    ``chunk_l * max(chunk_d, hidden, rank)`` floats and halves when ``chunk_l`` halves.
    """
    torch.manual_seed(9)
    L, hidden, D, r = 4096, 256, 2048, 64
    args = swiglu_problem(L, hidden, D, (r, r, r), hidden, torch.float32)
    out = torch.empty(L, hidden)
    unfused = largest_allocation(unfused_low_rank_swiglu, list(args), out=out)
    assert unfused == L * D * 4
    peaks = {}
    for chunk_l in (256, 128):
        peaks[chunk_l] = largest_allocation(ffn_torch.flash_swiglu_ffn, list(args), chunk_l=chunk_l,
                                            chunk_d=512, out=out)
        assert peaks[chunk_l] <= chunk_l * max(512, hidden, r) * 4
    assert peaks[128] * 2 == peaks[256]
    assert peaks[256] * 64 <= unfused
    x, U1, V1, b1 = args[0], args[1], args[2], args[7]
    gelu_args = [x, U1, V1, b1, args[5], args[6], args[9]]
    assert largest_allocation(ffn_torch.flash_gelu_ffn, gelu_args, chunk_l=256, chunk_d=512, out=out) \
        <= 256 * 512 * 4
