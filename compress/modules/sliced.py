"""Runtime structure of a SliceGPT-sliced decoder (rotated and narrowed residual stream).

A sliced model keeps the ``transformers`` model and its module paths (``self_attn.q_proj``,
``mlp.down_proj``, ``input_layernorm`` ...) so that later passes (GPTQ) find every linear where
the adapter says. What changes:

* linears that read the residual have fewer input columns, those that write it fewer output
  rows; norms have the sliced width (a constant weight and a rescaled eps keep dividing by the
  *original* width, see :func:`compress.algos.slicegpt.rms_norm_at_width`);
* each block may carry ``attn_shortcut`` / ``mlp_shortcut`` linears that carry the residual
  from one basis into the next (its class is swapped for a subclass whose ``forward`` applies
  them);
* the token embedding may be stored wider than it is read (:class:`SlicedEmbedding`): a tied
  head keeps the full rotated table, and the final norm then maps the last residual basis into
  the table's basis with one small matrix (:class:`ProjectedRMSNorm`).

``apply_slicing`` (the ``slicegpt`` model transform) rebuilds this structure on the meta device
from the manifest alone, so ``compress.load`` needs nothing from the original checkpoint.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress.modules.kinds import register_transform

_EPS_ATTRS = ("variance_epsilon", "eps")


class SlicedEmbedding(nn.Embedding):
    """An embedding table stored ``stored`` columns wide whose lookups return the first
    ``width`` columns (the tied head reads the whole table)."""

    def __init__(self, num_embeddings: int, stored: int, width: int, padding_idx: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(num_embeddings, stored, padding_idx=padding_idx, device=device, dtype=dtype)
        self.width = width

    def forward(self, input_ids: Tensor) -> Tensor:
        return F.embedding(input_ids, self.weight[:, :self.width], self.padding_idx)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, width={self.width}"


class ProjectedRMSNorm(nn.Module):
    """``(weight · x · rsqrt(mean(x²) + eps)) · Mᵀ``: the final norm of a sliced model followed by
    the map ``M`` from the last residual basis into the (tied) head's basis."""

    def __init__(self, width: int, out_features: int, eps: float,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width, device=device, dtype=dtype), requires_grad=False)
        self.variance_epsilon = eps
        self.proj = nn.Linear(width, out_features, bias=False, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.proj(self.weight * h.to(dtype))


# -- blocks ---------------------------------------------------------------------------------
class _SlicedBlock:
    """Mixin: the pre-norm block with residual shortcuts (``x·S`` instead of ``x``)."""

    _extra_names: tuple[str, ...] = ()
    _slice_paths: tuple[str, str, str, str] = ("", "", "", "")
    #: residual shortcuts: the staged (attention-then-MLP) calibration cannot run this block
    supports_staged_calibration = False

    def forward(self, hidden_states: Tensor, *args, **kwargs):  # noqa: ANN002, ANN003
        kwargs.update(zip(self._extra_names, args, strict=False))  # positional extras by name
        attn_norm, attn, mlp_norm, mlp = (self.get_submodule(p) for p in self._slice_paths)  # type: ignore[attr-defined]
        out = attn(hidden_states=attn_norm(hidden_states), **kwargs)
        h = out[0] if isinstance(out, (tuple, list)) else out
        x = _carry(self.attn_shortcut, hidden_states) + h  # type: ignore[attr-defined]
        return _carry(self.mlp_shortcut, x) + mlp(mlp_norm(x))  # type: ignore[attr-defined]


def _carry(shortcut: nn.Module | None, x: Tensor) -> Tensor:
    return x if shortcut is None else shortcut(x)


_CLASSES: dict[type, type] = {}


def sliced_block_class(base: type[nn.Module]) -> type[nn.Module]:
    """The subclass of a decoder-layer class whose forward applies residual shortcuts."""
    if issubclass(base, _SlicedBlock):
        return base
    if base not in _CLASSES:
        params = list(inspect.signature(base.forward).parameters.values())[2:]  # after self, hidden
        names = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        _CLASSES[base] = type(f"Sliced{base.__name__}", (_SlicedBlock, base), {"_extra_names": names})
    return _CLASSES[base]


def make_sliced_block(layer: nn.Module, paths: tuple[str, str, str, str]) -> None:
    """Swap ``layer``'s class for its sliced subclass (shortcuts start absent)."""
    layer.__class__ = sliced_block_class(type(layer))
    layer._slice_paths = paths  # type: ignore[attr-defined]
    for name in ("attn_shortcut", "mlp_shortcut"):
        if name not in layer._modules:
            layer.register_module(name, None)


def set_shortcut(layer: nn.Module, name: str, weight: Tensor | None) -> None:
    """Install (or remove) the residual map ``name`` with ``weight`` ``[d_out, d_in]``."""
    if weight is None:
        layer.register_module(name, None)
        return
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
    lin.weight = nn.Parameter(weight, requires_grad=False)
    layer.register_module(name, lin)


# -- resizing -------------------------------------------------------------------------------
def set_linear(lin: nn.Linear, weight: Tensor, bias: Tensor | None) -> None:
    """Give ``lin`` new weight/bias tensors and the matching ``in/out_features``."""
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if lin.bias is not None:
        if bias is None:
            raise ValueError("a linear with a bias needs a new bias")
        lin.bias = nn.Parameter(bias, requires_grad=False)
    lin.out_features, lin.in_features = weight.shape


def set_norm(norm: nn.Module, weight: Tensor, eps: float) -> None:
    """Give an RMSNorm a new weight (its width) and eps."""
    norm.weight = nn.Parameter(weight, requires_grad=False)
    for attr in _EPS_ATTRS:
        if hasattr(norm, attr):
            setattr(norm, attr, eps)
            return
    raise TypeError(f"{type(norm).__name__} has no eps attribute ({', '.join(_EPS_ATTRS)})")


def norm_eps(norm: nn.Module) -> float:
    for attr in _EPS_ATTRS:
        if hasattr(norm, attr):
            return float(getattr(norm, attr))
    raise TypeError(f"{type(norm).__name__} has no eps attribute ({', '.join(_EPS_ATTRS)})")


def block_paths(adapter) -> tuple[str, str, str, str]:  # noqa: ANN001
    """(attention norm, attention, MLP norm, MLP) relative paths of a pre-norm block."""
    return adapter.attn_norm, adapter.role("attn"), adapter.mlp_norm, adapter.role("mlp")


def block_linears(adapter) -> dict[str, list[str]]:  # noqa: ANN001
    """The block's linears by the side of the residual they touch: the adapter's four input
    groups in execution order (q/k/v or a fused qkv, o, gate/up or a fused gate_up, down)."""
    attn_in, attn_out, mlp_in, mlp_out = adapter.groups
    return {"attn_in": list(attn_in), "attn_out": list(attn_out), "mlp_in": list(mlp_in), "mlp_out": list(mlp_out)}


# -- the model transform ----------------------------------------------------------------------
def _meta(*shape: int, dtype: torch.dtype) -> Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype)


def shape_block(layer: nn.Module, adapter, dims: dict) -> None:  # noqa: ANN001
    """Resize one block on meta to the widths in ``dims`` (``in``, ``mid``, ``out``), set its
    norms' eps (``eps_in``, ``eps_mid``) and give it the shortcuts the manifest lists."""
    lin = block_linears(adapter)
    d_in, d_mid, d_out = dims["in"], dims["mid"], dims["out"]
    for rel, (rows, cols) in [*((r, (None, d_in)) for r in lin["attn_in"]),
                              *((r, (d_mid, None)) for r in lin["attn_out"]),
                              *((r, (None, d_mid)) for r in lin["mlp_in"]),
                              *((r, (d_out, None)) for r in lin["mlp_out"])]:
        m = layer.get_submodule(rel)
        out_f, in_f = rows or m.out_features, cols or m.in_features
        dt = m.weight.dtype
        set_linear(m, _meta(out_f, in_f, dtype=dt), None if m.bias is None else _meta(out_f, dtype=dt))
    for rel, width, eps in ((adapter.attn_norm, d_in, dims["eps_in"]), (adapter.mlp_norm, d_mid, dims["eps_mid"])):
        norm = layer.get_submodule(rel)
        set_norm(norm, _meta(width, dtype=norm.weight.dtype), float(eps))
    make_sliced_block(layer, block_paths(adapter))
    dt = layer.get_submodule(lin["attn_out"][0]).weight.dtype
    set_shortcut(layer, "attn_shortcut", _meta(d_mid, d_in, dtype=dt) if dims["attn_shortcut"] else None)
    set_shortcut(layer, "mlp_shortcut", _meta(d_out, d_mid, dtype=dt) if dims["mlp_shortcut"] else None)


@register_transform("slicegpt")
def apply_slicing(model: nn.Module, t: dict, adapter) -> None:  # noqa: ANN001
    """Rebuild a sliced model's structure (meta tensors) from its ``slicegpt`` manifest entry."""
    emb = model.get_submodule(adapter.token_embedding)
    e = t["embedding"]
    dt = emb.weight.dtype
    new_emb = SlicedEmbedding(emb.num_embeddings, e["stored"], e["width"], emb.padding_idx,
                              device="meta", dtype=dt)
    _replace(model, adapter.token_embedding, new_emb)
    layers = model.get_submodule(adapter.layers)
    for layer, dims in zip(layers, t["layers"], strict=True):
        shape_block(layer, adapter, dims)
    fn = t["final_norm"]
    norm = model.get_submodule(adapter.final_norm)
    if fn["proj"] is not None:
        _replace(model, adapter.final_norm, ProjectedRMSNorm(
            fn["width"], fn["proj"], float(fn["eps"]), device="meta", dtype=dt))
    else:
        set_norm(norm, _meta(fn["width"], dtype=dt), float(fn["eps"]))
    head = model.get_submodule(adapter.head)
    set_linear(head, _meta(head.out_features, t["head"]["in"], dtype=head.weight.dtype),
               None if head.bias is None else _meta(head.out_features, dtype=head.weight.dtype))


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
