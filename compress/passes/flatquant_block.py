"""FlatQuant's trainable block: a llama-family decoder block run with learnable transforms and
fake-quantised weights, activations and KV cache (the calibration-time model).

Sites (the reference's): ``ln`` (the normed input q/k/v share), ``ug`` (the normed input
gate/up share), ``down`` (down_proj's input), ``o`` (o_proj's input as heads ⊗ head_dim: a
heads × heads factor ``P_o`` applied online, times the head_dim ``P_v`` folded into v_proj's
output rows), ``k`` (keys after RoPE). ``ln``/``ug``/``down`` carry a per-channel scaling ``d``
(folded into the norms and up_proj at export). The block's own dense weights stay frozen; only
the transforms, ``d`` and the clip parameters train.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from compress.algos.flatquant import (CLIP_INIT, clip_rows, factor_pair, fake_quant_act, fake_quant_kv,
                                      fake_quant_weight, kron_apply, random_hadamard, random_orthogonal)
from compress.calib.hessian import GramAccumulator
from compress.modules.flat_attention import attend

#: the linears of a llama-family block and the site whose transform their input takes
SITE_OF = {"self_attn.q_proj": "ln", "self_attn.k_proj": "ln", "self_attn.v_proj": "ln",
           "self_attn.o_proj": "o", "mlp.gate_proj": "ug", "mlp.up_proj": "ug", "mlp.down_proj": "down"}


class Factor(nn.Module):
    """One ``n × n`` transform factor ``P`` and its inverse transpose.

    ``orthogonal``: ``U · diag(σ) · Vᵀ`` with ``U = U₀ · C(A_u)`` and ``V = C(A_v)``, where
    ``C(A) = (I − A)⁻¹ (I + A)`` is the Cayley map of a skew-symmetric ``A = S − Sᵀ`` (orthogonal
    for every ``S``; ``S = 0`` at the start, so ``P`` starts at the random orthogonal ``U₀``) and
    ``P^(−T) = U · diag(1/σ) · Vᵀ`` is exact and free; ``direct``: a plain matrix whose inverse is
    taken in float64; ``fixed``: a constant (the Hadamard baseline).
    """

    def __init__(self, n: int, mode: str, init: Tensor) -> None:
        super().__init__()
        self.n, self.mode = n, mode
        if mode == "orthogonal":
            self.register_buffer("u0", init.clone())
            self.s_u = nn.Parameter(torch.zeros(n, n))
            self.s_v = nn.Parameter(torch.zeros(n, n))
            self.sigma = nn.Parameter(torch.ones(n))
        elif mode == "direct":
            self.p = nn.Parameter(init.clone())
        else:
            self.register_buffer("p", init.clone())

    def _uv(self) -> tuple[Tensor, Tensor]:
        return self.u0 @ _cayley(self.s_u), _cayley(self.s_v)

    def matrix(self) -> Tensor:
        if self.mode == "orthogonal":
            u, v = self._uv()
            return (u * self.sigma) @ v.t()
        return self.p

    def inverse_t(self) -> Tensor:
        if self.mode == "orthogonal":
            u, v = self._uv()
            return (u / self.sigma) @ v.t()
        return torch.linalg.inv(self.p.to(torch.float64)).t().to(self.p.dtype)


def _cayley(s: Tensor) -> Tensor:
    """``(I − A)⁻¹ (I + A)`` with ``A = S − Sᵀ``: orthogonal, the identity at ``S = 0``."""
    a = s - s.t()
    eye = torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
    return torch.linalg.solve(eye - a, eye + a)


class Site(nn.Module):
    """``x ↦ (x ⊙ d) · (P₁ ⊗ P₂)`` and the matching weight map ``W ↦ (W ⊘ d) · (P₁ ⊗ P₂)^(−T)``.

    ``split``: Kronecker factors of sizes :func:`factor_pair` (one dense factor when ``n`` has no
    other factorisation, or when not split); ``scale``: the initial ``d`` (None: no scaling).
    ``mode`` ``none`` gives no transform (identity, nothing stored).
    """

    def __init__(self, n: int, mode: str, gen: torch.Generator, scale: Tensor | None, learn_scale: bool,
                 split: bool = True) -> None:
        super().__init__()
        self.n, self.mode = n, mode
        n1, n2 = factor_pair(n) if split else (n, 1)
        if n1 == 1:
            n1, n2 = n, 1
        self.dense_fallback = split and n2 == 1 and n > 1
        sizes = [s for s in (n1, n2) if s > 1] if mode != "none" else []
        self.factors = nn.ModuleList(Factor(s, _factor_mode(mode), _init(mode, s, gen)) for s in sizes)
        if scale is None:
            self.d = None
        elif learn_scale:
            self.d = nn.Parameter(scale.clone())
        else:
            self.register_buffer("d", scale.clone())

    def pair(self, inverse: bool = False) -> tuple[Tensor | None, Tensor | None]:
        mats = [f.inverse_t() if inverse else f.matrix() for f in self.factors]
        if not mats:
            return None, None
        return mats[0], (mats[1] if len(mats) > 1 else None)

    def forward(self, x: Tensor) -> Tensor:
        if self.d is not None:
            x = x * self.d
        left, right = self.pair()
        return kron_apply(x, left, right)

    def weight(self, w: Tensor) -> Tensor:
        """``(W ⊘ d) · P^(−T)`` of a weight ``[out, n]`` reading this site."""
        if self.d is not None:
            w = w / self.d
        left, right = self.pair(inverse=True)
        return kron_apply(w, left, right)


def _factor_mode(mode: str) -> str:
    return {"flatquant": "orthogonal", "flatquant-direct": "direct"}.get(mode, "fixed")


def _init(mode: str, n: int, gen: torch.Generator) -> Tensor:
    if mode == "hadamard":
        return random_hadamard(n, gen)
    if mode in ("flatquant", "flatquant-direct"):
        return random_orthogonal(n, gen)
    return torch.eye(n)


@dataclass(frozen=True)
class BlockSpec:
    """What the trainable block quantises and learns."""

    transform: str  # none | hadamard | smooth | flatquant | flatquant-direct
    w_bits: int
    a_bits: int
    k_bits: int
    v_bits: int
    lwc: bool
    lac: bool
    learn_scale: bool


class _KV(nn.Module):
    """Trainable counterpart of :class:`compress.modules.flat_attention.KVQuantizer`."""

    def __init__(self, site: Site | None, k_bits: int, v_bits: int, lac: bool) -> None:
        super().__init__()
        self.site, self.k_bits, self.v_bits = site, k_bits, v_bits
        self.k_clip = nn.Parameter(torch.full((2,), CLIP_INIT)) if lac and k_bits < 16 else None
        self.v_clip = nn.Parameter(torch.full((2,), CLIP_INIT)) if lac and v_bits < 16 else None

    def keys(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        if self.site is not None and self.site.factors:
            p = self.site.factors[0]
            q, k = q @ p.inverse_t().to(q.dtype), k @ p.matrix().to(k.dtype)
        return q, fake_quant_kv(k, self.k_bits, _mult(self.k_clip))

    def values(self, v: Tensor) -> Tensor:
        return fake_quant_kv(v, self.v_bits, _mult(self.v_clip))


def _mult(theta: Tensor | None) -> tuple[Tensor, Tensor] | None:
    return None if theta is None else (torch.sigmoid(theta[0]), torch.sigmoid(theta[1]))


class FlatBlock(nn.Module):
    """The block ``layer`` (frozen) with the sites, clip parameters and quantisers of ``spec``.

    ``smooth``: per-channel absmax of each site's calibration input (``ln``, ``ug``, ``down``),
    for the initial scaling ``d`` (None or missing: no scaling at that site).
    """

    def __init__(self, layer: nn.Module, spec: BlockSpec, gen: torch.Generator,
                 smooth: dict[str, Tensor] | None) -> None:
        super().__init__()
        object.__setattr__(self, "layer", layer)  # not a submodule: its weights are not trained
        self.spec = spec
        #: dtype the weights are transformed in (float64 at export)
        self.work_dtype = torch.float32
        #: when set, each linear's (quantised) input is added to its accumulator (GPTQ's Hessians)
        self.grams: dict[str, GramAccumulator] | None = None
        attn, mlp = layer.self_attn, layer.mlp
        hidden, inter = attn.q_proj.in_features, mlp.down_proj.in_features
        hd = attn.head_dim
        heads = attn.o_proj.in_features // hd
        mode = "none" if spec.transform == "smooth" else spec.transform
        sm = smooth or {}
        self.sites = nn.ModuleDict({
            "ln": Site(hidden, mode, gen, sm.get("ln"), spec.learn_scale),
            "ug": Site(hidden, mode, gen, sm.get("ug"), spec.learn_scale),
            "down": Site(inter, mode, gen, sm.get("down"), spec.learn_scale),
            "o": Site(heads, mode, gen, None, False, split=False),
            "v": Site(hd, mode, gen, None, False, split=False),
        })
        transform_keys = mode != "none" and spec.k_bits < 16
        self.kv = _KV(Site(hd, mode, gen, None, False, split=False) if transform_keys else None,
                      spec.k_bits, spec.v_bits, spec.lac)
        lins = {n: layer.get_submodule(n) for n in SITE_OF}
        self.w_clip = nn.ParameterDict({n.replace(".", "_"): nn.Parameter(torch.full((m.out_features, 2), CLIP_INIT))
                                        for n, m in lins.items()}) if spec.lwc else None
        self.a_clip = nn.ParameterDict({n.replace(".", "_"): nn.Parameter(torch.full((2,), CLIP_INIT))
                                        for n in lins}) if spec.lac and spec.a_bits < 16 else None

    # -- the transformed weights ------------------------------------------------------------
    def weight(self, name: str) -> tuple[Tensor, Tensor | None]:
        """Linear ``name``'s transformed, clipped (not yet quantised) weight and its bias."""
        lin = self.layer.get_submodule(name)
        w, b = lin.weight.to(self.work_dtype), None if lin.bias is None else lin.bias.to(self.work_dtype)
        if name == "self_attn.o_proj":
            w = kron_apply(w, self.sites["o"].pair(inverse=True)[0], self.sites["v"].pair(inverse=True)[0])
        else:
            w = self.sites[SITE_OF[name]].weight(w)
        if self.w_clip is not None:
            theta = self.w_clip[name.replace(".", "_")]
            w = clip_rows(w, theta[:, :1], theta[:, 1:])
        if name == "self_attn.v_proj":
            w, b = self._value_rows(w, b)
        return w, b

    def _value_rows(self, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``P_v`` folded into v_proj's output rows: head h's rows become ``P_vᵀ · W_h``."""
        p = self.sites["v"].pair()[0]
        if p is None:
            return w, b
        hd = p.shape[0]
        wt = (w.t().reshape(w.shape[1], -1, hd) @ p).reshape(w.shape[1], -1)  # [in, kv·hd]
        return wt.t(), None if b is None else (b.reshape(-1, hd) @ p).reshape(-1)

    def act_clip(self, name: str) -> tuple[Tensor, Tensor] | None:
        return None if self.a_clip is None else _mult(self.a_clip[name.replace(".", "_")])

    def _linear(self, name: str, x: Tensor) -> Tensor:
        w, b = self.weight(name)
        w = fake_quant_weight(w, self.spec.w_bits)
        xq = fake_quant_act(x, self.spec.a_bits, self.act_clip(name))
        if self.grams is not None:
            self.grams[name].add(xq)
        return nn.functional.linear(xq, w.to(xq.dtype), None if b is None else b.to(xq.dtype))

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: Tensor, **kwargs: object) -> Tensor:
        layer, s = self.layer, self.sites
        attn, mlp = layer.self_attn, layer.mlp
        h = s["ln"](layer.input_layernorm(x))
        q, k, v = (self._linear(f"self_attn.{p}_proj", h) for p in "qkv")
        o_in = attend(attn, q, k, v, kwargs["position_embeddings"], kwargs.get("attention_mask"), None, self.kv)
        o_in = kron_apply(o_in, s["o"].pair()[0], None)  # P_oᵀ over the heads of [heads, hd]
        x = x + self._linear("self_attn.o_proj", o_in)
        h = s["ug"](layer.post_attention_layernorm(x))
        z = mlp.act_fn(self._linear("mlp.gate_proj", h)) * self._linear("mlp.up_proj", h)
        return x + self._linear("mlp.down_proj", s["down"](z))

    def trainable(self, lr: float, clip_lr: float) -> list[dict]:
        """AdamW parameter groups: transforms and scalings at ``lr``, clip factors at ``clip_lr``."""
        clips = [p for d in (self.w_clip, self.a_clip) if d is not None for p in d.values()]
        clips += [p for p in (self.kv.k_clip, self.kv.v_clip) if p is not None]
        ids = {id(p) for p in clips}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [g for g in ({"params": rest, "lr": lr}, {"params": clips, "lr": clip_lr}) if g["params"]]
