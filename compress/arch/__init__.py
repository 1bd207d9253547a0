"""Architecture adapters written as data.

An adapter tells the pipeline where the decoder (or encoder) layers live, which linears each
layer holds, which of them read the same input (fused siblings that must share a format and
share one Hessian), and where the embeddings, norms and head are. Adding an architecture
means adding one :class:`Adapter` literal to :data:`ADAPTERS`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

from compress.errors import CompressError


@dataclass(frozen=True)
class Adapter:
    """Where things are in one model family (all paths are dotted module paths).

    Args:
        name: adapter name shown in messages.
        model_types: the ``config.model_type`` values it covers.
        auto_class: ``transformers`` auto class that builds the model from its config.
        layers: path of the ``ModuleList`` of blocks.
        embeddings: modules that run before the first block.
        final_norm: norm after the last block (None for post-norm encoders).
        head: output projection tied or untied to the token embedding (None for encoders).
        groups: per-block linears in execution order; each inner tuple reads one input.
        attn_norm / mlp_norm: the norms in front of attention and MLP (pre-norm models), or
            behind them (post-norm models).
        norm_kind: "rms" or "layer".
        pre_norm: True when each block normalises its input (needed for rotation invariance).
        causal: decoder (causal attention) or encoder.
        token_embedding: the token embedding module (tied to ``head`` when the config says so).
        branch_norms: norms applied to a branch's *output* before the residual add (Gemma's
            post-attention and post-feedforward norms); a block with them is not
            ``x + attn(norm(x))``, so the staged calibration and residual rotations do not apply.
        norm_offset: the norm scales by ``offset + weight`` (Gemma's ``1 + w``; 0 elsewhere):
            code that folds norm weights reads it here.
        attention: the ``transformers`` attention implementation the skeleton is built with
            (``eager`` where SDPA is unsupported, e.g. Gemma 2's logit soft-capping).
    """

    name: str
    model_types: tuple[str, ...]
    auto_class: str
    layers: str
    embeddings: tuple[str, ...]
    final_norm: str | None
    head: str | None
    groups: tuple[tuple[str, ...], ...]
    attn_norm: str
    mlp_norm: str
    norm_kind: Literal["rms", "layer"]
    pre_norm: bool
    causal: bool
    token_embedding: str
    roles: dict[str, str] = field(default_factory=dict)
    branch_norms: tuple[str, ...] = ()
    norm_offset: float = 0.0
    attention: str = "sdpa"

    @property
    def linears(self) -> tuple[str, ...]:
        """Every linear of a block, in execution order."""
        return tuple(n for g in self.groups for n in g)

    def layer_prefix(self, i: int) -> str:
        return f"{self.layers}.{i}."

    def role(self, role: str) -> str:
        """Relative path of a named role (``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down``)."""
        return self.roles[role]


_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
_LLAMA_ROLES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                "down": "mlp.down_proj", "attn": "self_attn", "mlp": "mlp"}

LLAMA = Adapter(
    name="llama", model_types=("llama", "mistral", "qwen2", "qwen3"),  # qwen3: q/k norms sit inside attention
    auto_class="AutoModelForCausalLM", layers="model.layers",
    embeddings=("model.embed_tokens", "model.rotary_emb"), final_norm="model.norm", head="lm_head",
    groups=_LLAMA_GROUPS, attn_norm="input_layernorm", mlp_norm="post_attention_layernorm",
    norm_kind="rms", pre_norm=True, causal=True, token_embedding="model.embed_tokens",
    roles=_LLAMA_ROLES,
)

BERT = Adapter(
    name="bert", model_types=("bert",), auto_class="AutoModel", layers="encoder.layer",
    embeddings=("embeddings",), final_norm=None, head=None,
    groups=(("attention.self.query", "attention.self.key", "attention.self.value"),
            ("attention.output.dense",), ("intermediate.dense",), ("output.dense",)),
    attn_norm="attention.output.LayerNorm", mlp_norm="output.LayerNorm",
    norm_kind="layer", pre_norm=False, causal=False, token_embedding="embeddings.word_embeddings",
    roles={"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
           "o": "attention.output.dense", "up": "intermediate.dense", "down": "output.dense",
           "attn": "attention", "mlp": "intermediate"},
)

PHI3 = Adapter(  # the LLaMA block with fused projections: one qkv_proj, one gate_up_proj
    name="phi3", model_types=("phi3",), auto_class="AutoModelForCausalLM", layers="model.layers",
    embeddings=("model.embed_tokens", "model.rotary_emb"), final_norm="model.norm", head="lm_head",
    groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    attn_norm="input_layernorm", mlp_norm="post_attention_layernorm", norm_kind="rms", pre_norm=True,
    causal=True, token_embedding="model.embed_tokens",
    roles={"o": "self_attn.o_proj", "down": "mlp.down_proj", "attn": "self_attn", "mlp": "mlp"},
)

GEMMA = Adapter(  # Gemma 2 and Gemma 3 (text): four norms per block, (1 + w) RMSNorm, scaled embeddings
    name="gemma", model_types=("gemma2", "gemma3_text"), auto_class="AutoModelForCausalLM", layers="model.layers",
    embeddings=("model.embed_tokens", "model.rotary_emb"), final_norm="model.norm", head="lm_head",
    groups=_LLAMA_GROUPS, attn_norm="input_layernorm", mlp_norm="pre_feedforward_layernorm", norm_kind="rms",
    pre_norm=True, causal=True, token_embedding="model.embed_tokens", roles=_LLAMA_ROLES,
    branch_norms=("post_attention_layernorm", "post_feedforward_layernorm"), norm_offset=1.0, attention="eager",
)

OPT = Adapter(  # pre-norm LayerNorm blocks, ReLU FFN (fc1/fc2 on the block itself), learned positions
    name="opt", model_types=("opt",), auto_class="AutoModelForCausalLM", layers="model.decoder.layers",
    embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
    final_norm="model.decoder.final_layer_norm", head="lm_head",
    groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",),
            ("fc2",)),
    attn_norm="self_attn_layer_norm", mlp_norm="final_layer_norm", norm_kind="layer", pre_norm=True,
    causal=True, token_embedding="model.decoder.embed_tokens",
    roles={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
           "up": "fc1", "down": "fc2", "attn": "self_attn"},
)

ADAPTERS: tuple[Adapter, ...] = (LLAMA, PHI3, GEMMA, OPT, BERT)


REMOTE_CODE_ENV = "COMPRESS_TRUST_REMOTE_CODE"


def remote_code_trusted() -> bool:
    """Whether a checkpoint's own Python code (``auto_map``) may run: ``--trust-remote-code``
    (``$COMPRESS_TRUST_REMOTE_CODE=1``, inherited by the processes a command starts). Off by default."""
    return os.environ.get(REMOTE_CODE_ENV) == "1"


@contextmanager
def trusting_remote_code(on: bool) -> Iterator[None]:
    """Trust checkpoints' code inside the block when ``on`` (the library's ``trust_remote_code``)."""
    before = os.environ.get(REMOTE_CODE_ENV)
    if on:
        os.environ[REMOTE_CODE_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(REMOTE_CODE_ENV, None)
        else:
            os.environ[REMOTE_CODE_ENV] = before


def check_remote_code(config: dict) -> None:
    """Refuse a model that only the checkpoint's own code defines, unless that code is trusted.

    A config with ``auto_map`` whose ``model_type`` ``transformers`` implements itself is built
    from ``transformers``' class (the checkpoint's code is not run) unless trusted."""
    auto_map = config.get("auto_map")
    if not auto_map or remote_code_trusted():
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        first = next(iter(auto_map.values()), "") if isinstance(auto_map, dict) else auto_map
        raise CompressError(f"model_type {model_type!r} is defined by Python code in the checkpoint "
                            f"(auto_map: {first}); compress does not run a checkpoint's code by default",
                            "pass --trust-remote-code if you trust where the checkpoint comes from")


def get_adapter(config: dict) -> Adapter:
    """The adapter for a raw ``config.json`` dict, or a one-line error naming what to add."""
    check_remote_code(config)
    model_type = config.get("model_type")
    for a in ADAPTERS:
        if model_type in a.model_types:
            return a
    known = ", ".join(t for a in ADAPTERS for t in a.model_types)
    raise CompressError(
        f"unsupported model_type {model_type!r} (supported: {known})",
        f"add an Adapter for {model_type!r} to compress/arch/__init__.py")
