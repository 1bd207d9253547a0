"""RCO's whole-model objective: the interpolated model ``W(p) = W_ref + Σ_k p_k (W_k − W_ref)``
scored against the dense model's log-probabilities on calibration windows.

Every allocated linear becomes an :class:`InterpolatedLinear` holding its reference option's
weight (the dearest option, float32) and one delta per other option (``delta_dtype``, bf16 by
default). Only the option probabilities ``p`` receive gradients: the forward builds ``W(p)`` once
per call, the backward returns ``∂L/∂x`` for the layers below and ``∂L/∂p_k = ⟨∂L/∂W, Δ_k⟩``
(no weight gradient is kept).

Memory: the dense model while the teacher's log-probabilities are computed, then per allocated
weight 4 bytes (reference) + (K − 1)·2 bytes (bf16 deltas) + 4 bytes (the built ``W`` saved for
the backward), plus the teacher cache (``windows × seq_len × vocab`` bf16) and one batch's
activations. SmolLM2-135M with 4 options: about 1.9 GB of weights and deltas and 0.8 GB of teacher
cache at 16 × 512 windows. A model whose weights and deltas exceed host memory does not fit (the
blocks are not streamed here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress.errors import CompressError


class _Interpolate(torch.autograd.Function):
    """``y = x W(p)ᵀ + b`` with ``W(p) = ref + Σ_j p_j Δ_j``; gradients to ``x`` and ``p`` only."""

    @staticmethod
    def forward(ctx, x: Tensor, p: Tensor, ref: Tensor, deltas: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        W = ref.clone()
        for j in range(deltas.shape[0]):
            W.add_(deltas[j].to(W.dtype), alpha=float(p[j]))
        ctx.save_for_backward(x, W)
        ctx.deltas = deltas
        ctx.p_dtype = p.dtype
        return F.linear(x, W.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        x, W = ctx.saved_tensors
        gx = gy @ W.to(gy.dtype)
        gW = gy.reshape(-1, gy.shape[-1]).T.to(W.dtype) @ x.reshape(-1, x.shape[-1]).to(W.dtype)  # [out, in]
        gp = torch.stack([(gW * d.to(W.dtype)).sum() for d in ctx.deltas.unbind(0)]) if ctx.deltas.shape[0] \
            else torch.zeros(0, dtype=W.dtype, device=W.device)
        return gx, gp.to(ctx.p_dtype), None, None, None


class InterpolatedLinear(nn.Module):
    """A linear whose weight is a mixture of its candidate options (see the module docstring).

    ``others[j]`` is the option index of ``deltas[j]``; the group's probabilities are read from
    ``holder.p[group]`` at every call."""

    def __init__(self, ref: Tensor, deltas: Tensor, others: list[int], bias: Tensor | None,
                 holder: Mixture, group: int) -> None:
        super().__init__()
        self.register_buffer("ref", ref)
        self.register_buffer("deltas", deltas)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.others = others
        self.holder = [holder]  # a list: not a submodule
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        p = self.holder[0].p
        if p is None:
            raise RuntimeError("set the option probabilities before calling the interpolated model")
        coeff = p[self.group, self.others] if self.others else p.new_zeros(0)
        return _Interpolate.apply(x, coeff, self.ref, self.deltas, self.bias)


@dataclass
class Mixture:
    """The probabilities every :class:`InterpolatedLinear` reads (``[N, K]``, set per call)."""

    p: Tensor | None = None


def teacher_log_probs(model: nn.Module, windows: Tensor, device: torch.device) -> Tensor:
    """The dense model's log-probabilities on ``windows [W, T]``, bf16 ``[W, T, V]`` on the host."""
    out = []
    with torch.no_grad():
        for w in windows:
            logits = model(w[None].to(device)).logits.float()
            out.append(torch.log_softmax(logits, dim=-1)[0].to(torch.bfloat16).cpu())
    return torch.stack(out)


def kl_to_teacher(logits: Tensor, teacher: Tensor) -> Tensor:
    """Mean per-token ``KL(teacher ‖ student)`` (``[B, T, V]`` each)."""
    t = teacher.float()
    s = torch.log_softmax(logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(dim=-1).mean()


def next_token_ce(logits: Tensor, ids: Tensor) -> Tensor:
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@dataclass
class Objective:
    """``objective(p)``: the interpolated model's loss on the next batch of windows (cycling)."""

    model: nn.Module
    mixture: Mixture
    windows: Tensor
    teacher: Tensor | None  # None: cross-entropy
    batch: int
    device: torch.device
    cursor: int = 0

    def __call__(self, p: Tensor) -> Tensor:
        idx = [(self.cursor + j) % self.windows.shape[0] for j in range(self.batch)]
        self.cursor = (self.cursor + self.batch) % self.windows.shape[0]
        ids = self.windows[idx].to(self.device)
        self.mixture.p = p.to(torch.float32)
        logits = self.model(ids).logits
        if self.teacher is None:
            return next_token_ce(logits, ids)
        return kl_to_teacher(logits, self.teacher[idx].to(self.device))

    def evaluate(self, p: Tensor) -> float:
        """The loss over every window at fixed ``p`` (no gradient)."""
        total = 0.0
        with torch.no_grad():
            for s in range(0, self.windows.shape[0], self.batch):
                idx = list(range(s, min(s + self.batch, self.windows.shape[0])))
                ids = self.windows[idx].to(self.device)
                self.mixture.p = p.to(torch.float32)
                logits = self.model(ids).logits
                loss = next_token_ce(logits, ids) if self.teacher is None else \
                    kl_to_teacher(logits, self.teacher[idx].to(self.device))
                total += float(loss) * len(idx)
        return total / self.windows.shape[0]


#: builds one allocated linear's candidate weights: (full name) → list of [out, in] per option
Candidates = Callable[[str], list[Tensor]]


def build_objective(src: str, groups: list[list[str]], refs: list[int], candidates: Candidates,
                    windows: Tensor, *, objective: str, batch: int, device: torch.device,
                    delta_dtype: torch.dtype) -> Objective:
    """Load the dense model from ``src``, cache its log-probabilities on ``windows`` (KL), then
    swap every allocated linear (``groups[i]`` are full names sharing probabilities row ``i``;
    ``refs[i]`` its reference option) for an :class:`InterpolatedLinear`."""
    from compress.api import load
    from compress.model import get_module

    model = load(src, device=device)
    model.eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    teacher = teacher_log_probs(model, windows, device) if objective == "kl" else None
    mixture = Mixture()
    for i, names in enumerate(groups):
        for name in names:
            parent_name, _, leaf = name.rpartition(".")
            parent = get_module(model, parent_name)
            dense = getattr(parent, leaf)
            if not isinstance(dense, nn.Linear):
                raise CompressError(f"{name} is not a dense linear in {src}", "allocate over a dense checkpoint")
            ws = candidates(name)
            ref = ws[refs[i]].to(device=device, dtype=torch.float32)
            others = [k for k in range(len(ws)) if k != refs[i]]
            deltas = torch.stack([(ws[k].to(device, torch.float32) - ref).to(delta_dtype) for k in others]) \
                if others else torch.zeros(0, *ref.shape, dtype=delta_dtype, device=device)
            setattr(parent, leaf, InterpolatedLinear(ref, deltas, others, dense.bias, mixture, i))
    return Objective(model, mixture, windows, teacher, batch, device)
