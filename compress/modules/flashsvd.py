"""FlashSVD serving: low-rank blocks that never materialise full-size activations.

:func:`enable_flashsvd` finds the blocks of a loaded model whose linears are all
:class:`LowRankLinear` and switches them to fused forwards built on :mod:`compress.kernels.flashsvd`:

* LLaMA-family MLP (``gate/up/down``, SiLU): ``flash_swiglu_ffn`` — the ``L × D`` intermediate
  is produced and consumed tile by tile.
* LLaMA-family attention (``q/k/v`` low-rank; causal, RoPE, GQA): ``flash_svd_attention`` — Q/K/V
  are rebuilt per tile from the rank-space coefficients ``x U`` inside the online softmax; the
  output projection runs as it is (any module).
* BERT FFN (``intermediate.dense`` + ``output.dense``, exact GELU): ``flash_gelu_ffn``, then the
  block's own dropout, residual and LayerNorm.
* BERT self-attention (``query/key/value`` low-rank, padding mask): ``flash_svd_attention``.

The switch changes only the class of each module (to a subclass of its own ``transformers``
class that overrides ``forward``), so parameter names, the state dict and the call signatures
stay exactly those of ``transformers`` 5.x; :func:`disable_flashsvd` switches back.

A fused attention falls back to the stock (unfused low-rank) forward when it cannot reproduce
it exactly: with a KV cache (generation; FlashSVD v1 has no cache), in training mode, with
cross-attention, or with an attention mask that is not "causal and/or key padding" (e.g. a
sliding window or packed sequences). The fused FFNs have no such cases.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from compress.errors import CompressError
from compress.modules.lowrank import LowRankLinear
from compress.kernels.flashsvd import flash_gelu_ffn, flash_svd_attention, flash_swiglu_ffn

_MASK_CHECK_ROWS = 256  # query rows per step when checking a 4-D mask (bounds the check's memory)


# -- masks -------------------------------------------------------------------------------------
def key_padding_from_mask(mask: Tensor | None, length: int, causal: bool) -> tuple[bool, Tensor | None]:
    """Decompose an HF attention mask into (representable, key padding ``[B, L]`` or None).

    ``mask`` is None (no masking beyond ``causal``), or ``[B, 1, L, L]`` boolean (True = attend)
    or additive float (0 = attend). It is representable when it equals ``keep[b, k]`` (and
    ``k ≤ q`` if causal) for every query row; the check walks the rows in chunks.
    """
    if mask is None:
        return True, None
    if mask.dim() != 4 or mask.shape[1] != 1 or tuple(mask.shape[-2:]) != (length, length):
        return False, None
    keep = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0  # [B, L, L]
    kpm = keep[:, -1, :] if causal else keep[:, 0, :]  # [B, L]: the row that sees every key
    cols = torch.arange(length, device=mask.device)
    for q0 in range(0, length, _MASK_CHECK_ROWS):
        q1 = min(length, q0 + _MASK_CHECK_ROWS)
        want = kpm[:, None, :].expand(-1, q1 - q0, -1)  # [B, rows, L]
        if causal:
            rows = torch.arange(q0, q1, device=mask.device)
            want = want & (cols[None, :] <= rows[:, None])
        if not torch.equal(keep[:, q0:q1], want):
            return False, None
    return True, (None if bool(kpm.all()) else kpm)


def _attention_args(q: LowRankLinear, k: LowRankLinear, v: LowRankLinear, x: Tensor) -> tuple:
    """Rank-space coefficients and factors of q/k/v: ``(pq, Vq, bq, pk, Vk, bk, pv, Vv, bv)``."""
    out: list = []
    for lin in (q, k, v):
        out += [lin.coefficients(x), lin.stacked_v(), lin.bias]  # x U: [B, L, heads·r]
    return tuple(out)


# -- fused forwards (mixins placed before the transformers class in the MRO) ---------------------
class FlashSwiGLUMLP:
    """LLaMA-family MLP: ``down(silu(gate(x)) · up(x))`` in rank space, streamed."""

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        g, u, d = self.gate_proj, self.up_proj, self.down_proj  # type: ignore[attr-defined]
        return flash_swiglu_ffn(x, g.U, g.V, u.U, u.V, d.U, d.V, g.bias, u.bias, d.bias)


def _kv_cache(args: tuple, kwargs: dict) -> object:
    """The KV cache handed to an attention forward, whatever ``transformers`` calls it
    (``past_key_values`` up to 5.x, ``cache`` from 5.2x; positional or keyword)."""
    for value in (*args[:1], kwargs.get("cache"), kwargs.get("past_key_values"), kwargs.get("past_key_value")):
        if value is not None:
            return value
    return None


class FlashLlamaAttention:
    """LLaMA-family self-attention with Q/K/V rebuilt per tile (causal, RoPE, GQA)."""

    def forward(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor] | None = None,
                attention_mask: Tensor | None = None, *args: object,
                **kwargs: object) -> tuple[Tensor, None]:
        L = hidden_states.shape[1]
        ok, kpm = key_padding_from_mask(attention_mask, L, causal=True)
        if (not ok or _kv_cache(args, kwargs) is not None or position_embeddings is None or self.training  # type: ignore[attr-defined]
                or getattr(self, "sliding_window", None)):
            return super().forward(hidden_states, position_embeddings, attention_mask,  # type: ignore[misc]
                                   *args, **kwargs)
        q, k, v = self.q_proj, self.k_proj, self.v_proj  # type: ignore[attr-defined]
        hd = self.head_dim  # type: ignore[attr-defined]
        cos, sin = position_embeddings
        o = flash_svd_attention(*_attention_args(q, k, v, hidden_states),
                                num_heads=q.out_features // hd, num_kv_heads=k.out_features // hd,
                                head_dim=hd, causal=True, cos=cos, sin=sin, key_padding_mask=kpm,
                                scale=self.scaling)  # type: ignore[attr-defined]
        return self.o_proj(o), None  # type: ignore[attr-defined]


class FlashBertSelfAttention:
    """BERT self-attention with Q/K/V rebuilt per tile (bidirectional, key padding mask)."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                *args: object, **kwargs: object) -> tuple[Tensor, None]:
        L = hidden_states.shape[1]
        ok, kpm = key_padding_from_mask(attention_mask, L, causal=False)
        if (not ok or _kv_cache(args, kwargs) is not None or self.training or self.is_causal  # type: ignore[attr-defined]
                or kwargs.get("encoder_hidden_states") is not None):
            return super().forward(hidden_states, attention_mask, *args, **kwargs)  # type: ignore[misc]
        q, k, v = self.query, self.key, self.value  # type: ignore[attr-defined]
        hd = self.attention_head_size  # type: ignore[attr-defined]
        heads = q.out_features // hd
        o = flash_svd_attention(*_attention_args(q, k, v, hidden_states), num_heads=heads,
                                num_kv_heads=heads, head_dim=hd, causal=False, key_padding_mask=kpm,
                                scale=self.scaling)  # type: ignore[attr-defined]
        return o, None


class FlashBertFFN:
    """BERT layer whose FFN (``intermediate`` + ``output.dense``) runs in rank space."""

    def feed_forward_chunk(self, attention_output: Tensor) -> Tensor:  # noqa: D102
        up, out = self.intermediate.dense, self.output  # type: ignore[attr-defined]
        down = out.dense
        y = flash_gelu_ffn(attention_output, up.U, up.V, up.bias, down.U, down.V, down.bias)
        return out.LayerNorm(out.dropout(y) + attention_output)


# -- switching ---------------------------------------------------------------------------------
_CLASSES: dict[tuple[type, type], type] = {}


def _fused_class(base: type, mixin: type) -> type:
    """``FlashSVD<Base>``: the mixin's forward over the ``transformers`` class (cached)."""
    key = (base, mixin)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"FlashSVD{base.__name__}", (mixin, base), {"_flashsvd_base": base})
    return _CLASSES[key]


def _switch(mod: nn.Module, mixin: type) -> None:
    mod.__class__ = _fused_class(type(mod), mixin)


def _all_lowrank(mod: nn.Module, names: tuple[str, ...]) -> bool:
    return all(isinstance(mod.get_submodule(n), LowRankLinear) for n in names)


def _act_name(mod: nn.Module) -> str | None:
    cfg = getattr(mod, "config", None)
    return getattr(cfg, "hidden_act", None)


@dataclass
class FlashReport:
    """How many blocks of each kind were switched, and which were left unfused (and why)."""

    fused: dict[str, int] = field(default_factory=lambda: {"mlp": 0, "attention": 0})
    skipped: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.fused.values())


def _enable_llama(layer: nn.Module, prefix: str, rep: FlashReport) -> None:
    mlp, attn = layer.mlp, layer.self_attn
    if not is_fused(mlp):
        if not _all_lowrank(mlp, ("gate_proj", "up_proj", "down_proj")):
            rep.skipped.append(f"{prefix}mlp: not every linear is low-rank")
        elif _act_name(mlp) not in ("silu", "swish"):
            rep.skipped.append(f"{prefix}mlp: activation {_act_name(mlp)!r} is not SiLU")
        else:
            _switch(mlp, FlashSwiGLUMLP)
            rep.fused["mlp"] += 1
    if not is_fused(attn):
        if _all_lowrank(attn, ("q_proj", "k_proj", "v_proj")):
            _switch(attn, FlashLlamaAttention)
            rep.fused["attention"] += 1
        else:
            rep.skipped.append(f"{prefix}self_attn: q/k/v are not all low-rank")


def _enable_bert(layer: nn.Module, prefix: str, rep: FlashReport) -> None:
    self_attn = layer.attention.self
    if not is_fused(layer):
        if not (isinstance(layer.intermediate.dense, LowRankLinear) and isinstance(layer.output.dense, LowRankLinear)):
            rep.skipped.append(f"{prefix}ffn: not every linear is low-rank")
        elif _act_name(self_attn) != "gelu":
            rep.skipped.append(f"{prefix}ffn: activation {_act_name(self_attn)!r} is not exact GELU")
        else:
            _switch(layer, FlashBertFFN)
            rep.fused["mlp"] += 1
    if not is_fused(self_attn):
        if _all_lowrank(self_attn, ("query", "key", "value")):
            _switch(self_attn, FlashBertSelfAttention)
            rep.fused["attention"] += 1
        else:
            rep.skipped.append(f"{prefix}attention.self: q/k/v are not all low-rank")


def enable_flashsvd_block(layer: nn.Module, family: str, prefix: str = "",
                          report: FlashReport | None = None) -> FlashReport:
    """Switch the eligible parts of one block (``family`` = adapter name: llama or bert)."""
    enable = {"llama": _enable_llama, "bert": _enable_bert}.get(family)
    if enable is None:
        raise CompressError(f"FlashSVD serving does not support {family!r} models",
                            "load without flashsvd=True")
    report = report if report is not None else FlashReport()
    enable(layer, prefix, report)
    return report


def enable_flashsvd(model: nn.Module, *, require: bool = True) -> FlashReport:
    """Switch every eligible block of ``model`` to its fused FlashSVD forward (in place).

    ``require`` makes a model with no eligible block a :class:`CompressError` (it was not
    compressed with the low-rank pass). Returns what was switched and what was not.
    """
    from compress.arch import get_adapter

    adapter = getattr(model, "compress_adapter", None) or get_adapter(model.config.to_dict())
    rep = FlashReport()
    layers = model.get_submodule(adapter.layers)
    for i, layer in enumerate(layers):
        enable_flashsvd_block(layer, adapter.name, adapter.layer_prefix(i), rep)
    if require and rep.total == 0:
        raise CompressError("no block has all-low-rank linears to fuse",
                            "compress the model with `compress lowrank` first")
    return rep


def disable_flashsvd(model: nn.Module) -> int:
    """Switch every fused block back to its ``transformers`` class; returns how many."""
    n = 0
    for mod in model.modules():
        base = getattr(type(mod), "_flashsvd_base", None)
        if base is not None:
            mod.__class__ = base
            n += 1
    return n


def is_fused(mod: nn.Module) -> bool:
    """True when ``mod`` currently runs a FlashSVD forward."""
    return hasattr(type(mod), "_flashsvd_base")


__all__ = ["FlashReport", "disable_flashsvd", "enable_flashsvd", "enable_flashsvd_block", "is_fused",
           "key_padding_from_mask"]
