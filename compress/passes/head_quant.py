"""``--quantize-head int8|int4``: the LM head quantised at the end of an RTN/GPTQ run.

On a small decoder the head is a large share of the weights (SmolLM2: 49152 × 576, 21 % of the
parameters) and, once the blocks are 4-bit, most of the bytes a decoded token reads. The head is
quantised symmetrically — int8 per output channel or int4 in the pass's groups — so both of
torch's native CPU kernels serve it, by RTN (``rtn``) or by GPTQ on the Gram matrix of the
final-norm outputs of the calibration windows (``gptq``).

A tied head (the token table is the head) is stored once as shared codes that the embedding
lookup reads too (:mod:`compress.modules.tied_quant`); ``dense_embedding`` keeps a dense copy of
the table for the lookup instead and unties the two (``tie_word_embeddings: false``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, Field
from torch import Tensor, nn

from compress.algos.gptq import gptq_quantize, relative_output_error
from compress.algos.quant import QuantSpec, rtn_quantize
from compress.errors import CompressError
from compress.model import get_module, set_module
from compress.modules.quant_linear import QuantLinear
from compress.modules.tied_quant import TIED_GROUP, QuantEmbedding, TiedQuantHead, shared_head_tensors
from compress.pipeline.contexts import RunContext
from compress.report import LayerRecord

HEAD_GROUP_SIZES = (128, 64, 32)


class HeadOptions(BaseModel):
    """The head options of the RTN and GPTQ configs."""

    quantize_head: Literal["int8", "int4"] | None = Field(
        None, description="also quantise the LM head: int8 per channel or int4 in groups (tied heads "
                          "share the codes with the embedding lookup)")
    dense_embedding: bool = Field(
        False, description="with --quantize-head on a tied head: keep a dense token table for the "
                           "lookup (unties them; the output then loads in transformers)")


def head_spec(choice: str, group_size: int | None, hidden: int, dtype: torch.dtype, mse: bool) -> QuantSpec:
    """int8: one scale per row; int4: the pass's group size when it divides the width, else the
    largest of 128/64/32 that does (the CPU int4 kernel takes those)."""
    sdtype = dtype if dtype.is_floating_point else torch.float32
    if choice == "int8":
        return QuantSpec(8, None, True, mse, sdtype)
    sizes = ([group_size] if group_size else []) + list(HEAD_GROUP_SIZES)
    g = next((s for s in sizes if s < hidden and hidden % s == 0), None)
    if g is None:
        raise CompressError(f"--quantize-head int4 needs a group size dividing the hidden width {hidden}",
                            "use --quantize-head int8")
    return QuantSpec(4, g, True, mse, sdtype)


def head_gram(run: RunContext) -> Tensor:
    """``Σ xᵀx / n`` (float64) of the final-norm outputs of every calibration token."""
    assert run.state is not None and run.adapter.final_norm is not None
    norm = get_module(run.model, run.adapter.final_norm)
    H: Tensor | None = None
    n = 0
    for b in run.state.batches():
        x = norm(run.state.batch(b))
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)  # [tokens, hidden]
        H = x.T @ x if H is None else H.add_(x.T @ x)
        n += x.shape[0]
    assert H is not None
    return H / max(n, 1)


def check_head(run: RunContext, choice: str | None) -> None:
    """Refuse a head that cannot be quantised here (before any block is touched)."""
    if choice is None:
        return
    a = run.adapter
    head = get_module(run.model, a.head) if a.head else None
    if head is None:
        raise CompressError(f"--quantize-head: this {run.config.get('model_type')} model has no LM head",
                            "drop --quantize-head")
    if a.head in run.modules or not isinstance(head, nn.Linear):
        raise CompressError("--quantize-head: the head of this checkpoint is compressed already",
                            "drop --quantize-head, or start from the dense model")


def quantize_head(run: RunContext, choice: str, dense_embedding: bool, group_size: int | None, mse: bool,
                  method: str, damp: float, stage: str) -> LayerRecord:
    """Replace the head (and, when tied, the embedding) by their quantised forms."""
    import time

    t0 = time.perf_counter()
    a = run.adapter
    head = get_module(run.model, a.head)
    W = head.weight.detach()
    spec = head_spec(choice, group_size, W.shape[1], W.dtype, mse)
    if method == "gptq" and run.state is None:  # no activations reach the tail (--propagate dense)
        method = "rtn"
    H = head_gram(run) if method == "gptq" else None
    if H is not None:
        qw, _ = gptq_quantize(W, H, spec, percdamp=damp, act_order=True)
    else:
        qw = rtn_quantize(W, spec)
    bias = None if head.bias is None else head.bias.detach()
    qlin = QuantLinear.from_quantized(qw, bias)
    qlin.observer = "mse" if mse else "minmax"
    deq = qw.dequantize()
    if run.tied_head and not dense_embedding:
        holder = run.add_shared(TIED_GROUP, shared_head_tensors(qlin))
        emb = get_module(run.model, a.token_embedding)
        set_module(run.model, a.head, TiedQuantHead(qlin.in_features, qlin.out_features, spec.bits,
                                                    qlin.group_size, holder, observer=qlin.observer))
        set_module(run.model, a.token_embedding, QuantEmbedding(
            qlin.out_features, qlin.in_features, spec.bits, qlin.group_size, holder, dtype=emb.weight.dtype,
            observer=qlin.observer))
    else:
        set_module(run.model, a.head, qlin)
        if run.tied_head:  # the table stays dense for the lookup; the two are no longer one tensor
            run.config = dict(run.config, tie_word_embeddings=False)
    run.notes["head"] = {"quantized": choice, "method": method, "group_size": qlin.group_size,
                         "tied": run.tied_head, "shared_codes": run.tied_head and not dense_embedding}
    nbytes = sum(t.numel() * t.element_size() for k, t in qlin.state_dict().items() if not k.endswith("bias"))
    werr = float(((W.float() - deq) ** 2).sum() / (W.float() ** 2).sum().clamp_min(1e-30))
    return LayerRecord(stage=stage, layer=-1, module=a.head, kind="quant", bits=8 * nbytes / W.numel(),
                       error=None if H is None else relative_output_error(W.float(), deq, H),
                       weight_error=werr, time_s=time.perf_counter() - t0, bytes=nbytes, params=W.numel())
