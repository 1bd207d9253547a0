"""FlashSVD attention: Triton kernel (CPU interpreter), streaming torch twin, references.

The float64 reference materialises Q, K, V from the rank-space factors, applies HF's own
``apply_rotary_pos_emb`` and runs a plain softmax with explicit causal / padding masks (fully
masked rows defined as 0).  The fused paths are also checked against a real
``transformers`` ``LlamaAttention`` whose projections are factored at full rank.  Outputs are
written into NaN-poisoned buffers so any element the kernel forgets fails the comparison.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from dataclasses import dataclass

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding, apply_rotary_pos_emb

from compress.kernels.flashsvd import attention, attention_torch, attention_triton

FP32_TOL = 1e-4
BF16_TOL = 2e-2
RANKS = (19, 5, 33)  # q, k, v: none a multiple of the rank block
BLOCKS = dict(block_m=16, block_n=16, block_r=16)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Max-abs error relative to the reference's max-abs value (NaN-propagating)."""
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


def rand(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)


@dataclass
class Problem:
    """Inputs of one ``flash_svd_attention`` call."""

    args: tuple
    kwargs: dict

    @property
    def out_shape(self) -> tuple[int, int, int]:
        B, L = self.args[0].shape[:2]
        return B, L, self.kwargs["num_heads"] * self.kwargs["head_dim"]


def rope_tables(B: int, L: int, hd: int, per_batch: bool, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """HF LLaMA cos/sin: ``[B, L, hd]`` with per-batch position offsets, or ``[1, L, hd]``."""
    config = LlamaConfig(hidden_size=4 * hd, num_attention_heads=4, head_dim=hd, vocab_size=32)
    rotary = LlamaRotaryEmbedding(config)
    positions = torch.arange(L)[None] + (7 * torch.arange(B)[:, None] if per_batch else 0)  # [B or 1, L]
    return rotary(torch.zeros(1, dtype=dtype), positions)


def padding_mask(B: int, L: int) -> torch.Tensor:
    """Key padding (True = keep): batch 0 left-padded (its first causal rows see no key) plus
    random holes; batch 1 entirely padded (every row fully masked)."""
    keep = torch.rand(B, L) > 0.25
    keep[0, : min(2, L - 1)] = False
    keep[0, -1] = True
    if B > 1:
        keep[1] = False
    return keep


def make_problem(B, L, H, Hkv, hd, *, causal, rope, pad, dtype=torch.float32, bias=True, scale=None) -> Problem:
    """Random rank-space attention inputs; ``pq/pk/pv`` are column slices of one tensor, as
    produced by a fused ``x @ [Uq | Uk | Uv]`` (non-contiguous strides)."""
    rq, rk, rv = RANKS
    p_all = rand(B, L, rq + rk + rv, dtype=dtype)
    pq, pk, pv = p_all[..., :rq], p_all[..., rq:rq + rk], p_all[..., rq + rk:]
    args = []
    for p, r, heads in ((pq, rq, H), (pk, rk, Hkv), (pv, rv, Hkv)):
        V = rand(r, heads * hd, dtype=dtype, scale=r**-0.5)
        b = rand(heads * hd, dtype=dtype) if bias else None
        args += [p, V, b]
    cos, sin = rope_tables(B, L, hd, per_batch=B > 1, dtype=dtype) if rope else (None, None)
    kwargs = dict(num_heads=H, num_kv_heads=Hkv, head_dim=hd, causal=causal, cos=cos, sin=sin,
                  key_padding_mask=padding_mask(B, L) if pad else None, scale=scale)
    return Problem(tuple(args), kwargs)


def attention_reference(pq, Vq, bq, pk, Vk, bk, pv, Vv, bv, *, num_heads, num_kv_heads, head_dim,
                        causal, cos=None, sin=None, key_padding_mask=None, scale=None) -> torch.Tensor:
    """Slow obvious float64 attention: full Q/K/V, HF RoPE, explicit masks, plain softmax."""
    B, L = pq.shape[:2]

    def heads(p, V, b, n):
        y = p.double() @ V.double() + (0 if b is None else b.double())  # [B, L, n*hd]
        return y.view(B, L, n, head_dim).transpose(1, 2)  # [B, n, L, hd]

    q, k, v = heads(pq, Vq, bq, num_heads), heads(pk, Vk, bk, num_kv_heads), heads(pv, Vv, bv, num_kv_heads)
    if cos is not None:
        q, k = apply_rotary_pos_emb(q, k, cos.double(), sin.double())
    group = num_heads // num_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [B, H, L, hd]
    scores = q @ k.transpose(-1, -2) * (head_dim**-0.5 if scale is None else scale)  # [B, H, L, L]
    keep = torch.ones(B, 1, L, L, dtype=torch.bool)
    if causal:
        keep &= torch.ones(L, L, dtype=torch.bool).tril()
    if key_padding_mask is not None:
        keep &= key_padding_mask[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # fully-masked rows attend to nothing: output 0
    return (probs @ v).transpose(1, 2).reshape(B, L, num_heads * head_dim)


def run_triton(problem: Problem, **blocks) -> torch.Tensor:
    out = torch.full(problem.out_shape, float("nan"), dtype=problem.args[0].dtype)
    return attention_triton.flash_svd_attention(*problem.args, **problem.kwargs, **(blocks or BLOCKS), out=out)


def run_twin(problem: Problem, chunk_q: int = 7, chunk_k: int = 5) -> torch.Tensor:
    out = torch.full(problem.out_shape, float("nan"), dtype=problem.args[0].dtype)
    return attention_torch.flash_svd_attention(*problem.args, **problem.kwargs, chunk_q=chunk_q,
                                               chunk_k=chunk_k, out=out)


CASES = [
    # B, L, H, Hkv, hd, causal, rope, pad
    pytest.param(2, 1, 4, 2, 16, True, True, False, id="L1-gqa-causal-rope"),
    pytest.param(2, 3, 4, 4, 24, False, False, True, id="L3-mha-pad"),
    pytest.param(2, 17, 4, 2, 24, True, True, True, id="L17-gqa-causal-rope-pad"),
    pytest.param(1, 50, 4, 2, 16, True, True, False, id="L50-gqa-causal-rope-bcast"),
    pytest.param(2, 50, 2, 2, 64, False, False, True, id="L50-mha-pad-hd64"),
    pytest.param(1, 17, 2, 1, 48, True, True, True, id="L17-mqa-causal-rope-pad-hd48"),
]


@pytest.mark.parametrize("B, L, H, Hkv, hd, causal, rope, pad", CASES)
def test_triton_and_twin_match_float64_reference(B, L, H, Hkv, hd, causal, rope, pad) -> None:
    torch.manual_seed(L * 100 + hd)
    problem = make_problem(B, L, H, Hkv, hd, causal=causal, rope=rope, pad=pad)
    ref = attention_reference(*problem.args, **problem.kwargs)
    got, twin = run_triton(problem), run_twin(problem)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert rel_err(got, ref) <= FP32_TOL
    assert rel_err(twin, ref) <= FP32_TOL
    assert rel_err(got, twin) <= FP32_TOL
    if pad and B > 1:  # batch 1 has every key padded
        assert torch.equal(got[1], torch.zeros_like(got[1])) and torch.equal(twin[1], torch.zeros_like(twin[1]))


def test_triton_other_blocks_no_bias_custom_scale() -> None:
    """Different tile shapes (grid follows the blocks passed), no biases, explicit scale."""
    torch.manual_seed(11)
    problem = make_problem(2, 37, 4, 2, 24, causal=True, rope=True, pad=True, bias=False, scale=0.3)
    ref = attention_reference(*problem.args, **problem.kwargs)
    assert rel_err(run_triton(problem, block_m=32, block_n=16, block_r=32), ref) <= FP32_TOL
    assert rel_err(run_triton(problem, block_m=16, block_n=32, block_r=16), ref) <= FP32_TOL
    assert rel_err(run_twin(problem, chunk_q=11, chunk_k=32), ref) <= FP32_TOL


def test_bf16() -> None:
    torch.manual_seed(12)
    problem = make_problem(2, 17, 4, 2, 24, causal=True, rope=True, pad=True, dtype=torch.bfloat16)
    ref = attention_reference(*problem.args, **problem.kwargs)
    got, twin = run_triton(problem), run_twin(problem)
    assert got.dtype == twin.dtype == torch.bfloat16
    assert rel_err(got, ref) <= BF16_TOL
    assert rel_err(twin, ref) <= BF16_TOL


@pytest.mark.parametrize("hd, bias", [(16, False), (24, True)])
def test_fused_matches_hf_llama_attention(hd: int, bias: bool) -> None:
    """Full-rank SVD factors of a real LlamaAttention (GQA 4/2, sdpa, causal, HF RoPE)."""
    torch.manual_seed(hd)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=hd, attention_bias=bias, vocab_size=32, max_position_embeddings=64)
    config._attn_implementation = "sdpa"
    attn = LlamaAttention(config, layer_idx=0).eval()
    B, L = 2, 13
    x = rand(B, L, 64)
    cos, sin = LlamaRotaryEmbedding(config)(x, torch.arange(L)[None].expand(B, L))
    with torch.no_grad():
        ref, _ = attn(x, position_embeddings=(cos, sin), attention_mask=None)
        args = []
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            A, S, Bt = torch.linalg.svd(proj.weight.double(), full_matrices=False)  # W = A S B^T
            args += [x @ (Bt.T * S).float(), A.T.float().contiguous(), proj.bias]  # p = x U, V = A^T
        kwargs = dict(num_heads=4, num_kv_heads=2, head_dim=hd, causal=True, cos=cos, sin=sin)
        fused = attention_triton.flash_svd_attention(*args, **kwargs, **BLOCKS)
        twin = attention_torch.flash_svd_attention(*args, **kwargs, chunk_q=5, chunk_k=4)
        assert rel_err(attn.o_proj(fused), ref) <= FP32_TOL
        assert rel_err(attn.o_proj(twin), ref) <= FP32_TOL


def test_dispatcher_picks_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(13)
    problem = make_problem(2, 9, 4, 2, 16, causal=True, rope=True, pad=True)
    monkeypatch.setenv("COMPRESS_KERNELS", "torch")
    via_torch = attention.flash_svd_attention(*problem.args, **problem.kwargs)
    assert torch.equal(via_torch, attention_torch.flash_svd_attention(*problem.args, **problem.kwargs))
    monkeypatch.setenv("COMPRESS_KERNELS", "triton")
    via_triton = attention.flash_svd_attention(*problem.args, **problem.kwargs)
    assert torch.equal(via_triton, attention_triton.flash_svd_attention(*problem.args, **problem.kwargs))


def test_rejects_bad_arguments() -> None:
    problem = make_problem(1, 5, 4, 2, 16, causal=False, rope=True, pad=False)
    args, kw = problem.args, problem.kwargs
    with pytest.raises(ValueError, match="multiple"):
        attention_torch.flash_svd_attention(*args, **{**kw, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="together"):
        attention_torch.flash_svd_attention(*args, **{**kw, "sin": None})
    with pytest.raises(ValueError, match="power of two"):
        attention_triton.flash_svd_attention(*args, **kw, block_m=24)
    with pytest.raises(ValueError, match="Vk"):
        attention_triton.flash_svd_attention(*args[:4], args[4][:, :-1], *args[5:], **kw)


def test_twin_streams_long_sequence_with_small_chunks() -> None:
    torch.manual_seed(14)
    problem = make_problem(2, 300, 4, 2, 24, causal=True, rope=True, pad=True)
    ref = attention_reference(*problem.args, **problem.kwargs)
    assert rel_err(run_twin(problem, chunk_q=37, chunk_k=23), ref) <= FP32_TOL


class LargestAllocation(TorchDispatchMode):
    """Records the largest *new* storage any aten op produces while active.

    Inputs and the preallocated output (and views of them) are ignored, so the figure is the
    biggest activation buffer the code allocates by design; deterministic and allocator-free.
    """

    def __init__(self, existing: list) -> None:
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing if isinstance(t, torch.Tensor)}
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in tree_leaves(result):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.existing:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return result


def test_twin_peak_activation_scales_with_chunks_not_sequence() -> None:
    """B=1, L=1024, H=4 (Hkv=2), hd=16: the reference's largest buffer is the ``L x L`` score
    tensor per head; the twin's is ``max(B*H*cq*ck, B*cq*H*hd)`` floats and shrinks 4x when
    both chunks halve (the ``cq x ck`` score block dominates)."""
    torch.manual_seed(15)
    problem = make_problem(1, 1024, 4, 2, 16, causal=True, rope=True, pad=True)
    out = torch.empty(problem.out_shape)
    existing = [*problem.args, problem.kwargs["cos"], problem.kwargs["sin"], problem.kwargs["key_padding_mask"], out]
    with LargestAllocation(existing) as mode:
        attention_reference(*(a.float() if a is not None else None for a in problem.args), **problem.kwargs)
    materialised = mode.largest
    peaks = {}
    for chunk in (64, 32):
        with LargestAllocation(existing) as mode:
            attention_torch.flash_svd_attention(*problem.args, **problem.kwargs, chunk_q=chunk, chunk_k=chunk, out=out)
        peaks[chunk] = mode.largest
        assert peaks[chunk] <= 4 * max(4 * chunk * chunk, chunk * 4 * 16)
    assert peaks[64] == 4 * peaks[32]
    assert materialised >= 4 * 1024 * 1024 * 4
    assert peaks[64] * 64 <= materialised
