"""Evaluation under a named protocol: token perplexity plus fidelity to the dense model.

Perplexity is *token* perplexity: ``exp(total next-token NLL / predicted tokens)`` over the
protocol's evaluation windows (each window predicts its last ``seq_len − 1`` tokens).
Fidelity is the mean per-token ``KL(dense ‖ compressed)`` and top-1 next-token agreement on
the same windows. Size is bytes of the safetensors on disk and the effective bits per
parameter of the compressed linears (everything they store, scales included).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress.arch import get_adapter, remote_code_trusted
from compress.calib.corpus import load_corpus
from compress.calib.token_cache import cached_token_ids
from compress.calib.protocol import (
    corpus_protocol_name, eval_windows, get_protocol, split_lines, tokenize_joined)
from compress.checkpoint import CheckpointReader

if TYPE_CHECKING:
    from compress.eval_encoder import EncoderEvalResult
    from compress.placement import DeviceMap

#: ``progress(done, total, message)``, called after each evaluated window (or encoder batch)
Progress = Callable[[int, int, str], None]


@dataclass
class EvalResult:
    """One evaluation (every figure names its protocol).

    ``protocol`` is the protocol as applied to the evaluated corpus (``brown-512``, or
    ``other-512`` for ``--data other.txt``); ``eval_windows`` is how many windows were scored
    (fewer than the protocol's when the text is short)."""

    protocol: str
    model: str
    ppl: float
    dense_ppl: float | None
    kl_mean: float | None
    top1_agreement: float | None
    bytes_on_disk: int
    dense_bytes_on_disk: int | None
    effective_bits: float | None
    compressed_params: int
    eval_tokens: int
    seconds: float
    eval_windows: int = 0
    data: str = "brown"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def eval_token_windows(model_dir: Path, protocol: str, data: str | None) -> Tensor:
    """The protocol's evaluation windows of the test split, tokenised by the model's tokenizer
    (the ids come from the work store when an earlier run tokenised the same split)."""
    from transformers import AutoTokenizer

    proto = get_protocol(protocol)
    lines, _ = load_corpus(data)
    _, test = split_lines(lines, proto)

    def tokenize() -> Tensor:
        return tokenize_joined(AutoTokenizer.from_pretrained(model_dir, trust_remote_code=remote_code_trusted()), test)

    ids = cached_token_ids(model_dir, test, tokenize)
    return eval_windows(ids, proto)


def _device(model: nn.Module) -> torch.device:
    """Where input ids go: the token embedding's device (its execution device under a device map)."""
    from compress.placement import input_device

    return input_device(model)


@torch.no_grad()
def score(model: nn.Module, windows: Tensor, dense: nn.Module | None = None, *,
          progress: Progress | None = None, label: str = "eval") -> dict[str, float]:
    """NLL sum, token count and (with ``dense``) KL sum and top-1 matches over the windows.

    ``progress`` is told ``(i, n, "<label> (window i/n)")`` after each window, so a caller can
    show a bar with an ETA; ``label`` names what is evaluated (``eval brown-512``).
    """
    nll, n, kl, agree, dense_nll = 0.0, 0, 0.0, 0, 0.0
    total = len(windows)
    for i, w in enumerate(windows, 1):
        ids = w.unsqueeze(0).to(_device(model))  # (1, seq)
        logits = model(input_ids=ids).logits[0, :-1].float()  # (seq-1, vocab)
        nll += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        n += logits.shape[0]
        if dense is not None:
            ref = dense(input_ids=ids).logits[0, :-1].float()
            dense_nll += float(F.cross_entropy(ref, ids[0, 1:], reduction="sum"))
            lp, lq = F.log_softmax(ref, -1), F.log_softmax(logits, -1)
            kl += float((lp.exp() * (lp - lq)).sum())
            agree += int((ref.argmax(-1) == logits.argmax(-1)).sum())
        if progress is not None:
            progress(i, total, f"{label} (window {i}/{total})")
    out = {"nll": nll, "tokens": n}
    if dense is not None:
        out.update({"kl": kl, "agree": agree, "dense_nll": dense_nll})
    return out


def compressed_size(reader: CheckpointReader, manifest: dict) -> tuple[float | None, int]:
    """(effective bits per original parameter of the compressed linears, their parameter count)."""
    bits, params = 0, 0
    mods = manifest.get("modules", {})
    tops = [n for n in mods if not any(n.startswith(o + ".") for o in mods)]  # outermost only
    for name in tops:
        entry = mods[name]
        if "in_features" not in entry:
            continue
        params += int(entry["in_features"]) * int(entry["out_features"])
        for key in reader.keys():
            if key.startswith(name + ".") and not key.endswith(".bias"):
                bits += 8 * reader.nbytes(key)
    return (bits / params if params else None), params


def evaluate(model_dir: str | Path, against: str | Path | None = None, *,
             protocol: str = "brown-512", data: str | None = None, device: str | None = None,
             progress: Progress | None = None,
             device_map: DeviceMap | None = None) -> EvalResult | EncoderEvalResult:
    """Evaluate ``model_dir`` (and optionally the dense model ``against``) under ``protocol``.

    ``device`` (default CPU) or ``device_map`` (both models placed by ``accelerate``, see
    :func:`compress.load`; the windows go to the embedding's device) say where it runs.

    Encoders (``adapter.causal`` False) get :func:`compress.eval_encoder.evaluate_encoder`.
    ``progress(done, total, message)`` is called after each evaluation window (each batch of
    sentences for an encoder), e.g. ``(3, 40, "eval brown-512 (window 3/40)")``.
    """
    from compress.api import load
    from compress.assets import resolve_model

    t0 = time.perf_counter()
    model_dir = resolve_model(str(model_dir))
    reader = CheckpointReader(model_dir)
    if not get_adapter(reader.config).causal:  # encoders: sentence-embedding fidelity instead
        from compress.eval_encoder import evaluate_encoder

        return evaluate_encoder(model_dir, against, protocol=protocol, data=data, progress=progress,
                                device=device, device_map=device_map)
    manifest = reader.manifest() or {}
    if against is None and manifest.get("origin") and Path(manifest["origin"]).is_dir():
        against = manifest["origin"]
    windows = eval_token_windows(model_dir, protocol, data)
    model = load(model_dir, device=device, device_map=device_map)
    dense = load(resolve_model(str(against)), device=device, device_map=device_map) if against is not None else None
    name = corpus_protocol_name(protocol, data)
    s = score(model, windows, dense, progress=progress, label=f"eval {name}")
    dense_ppl, dense_bytes = None, None
    if dense is not None:
        dense_ppl = math.exp(s["dense_nll"] / s["tokens"])  # same forward as the KL reference
        dense_bytes = CheckpointReader(resolve_model(str(against))).total_bytes()
    bits, params = compressed_size(reader, manifest)
    return EvalResult(
        protocol=name, model=str(model_dir),
        ppl=math.exp(s["nll"] / s["tokens"]),
        dense_ppl=dense_ppl, kl_mean=s["kl"] / s["tokens"] if dense else None,
        top1_agreement=s["agree"] / s["tokens"] if dense else None,
        bytes_on_disk=reader.total_bytes(), dense_bytes_on_disk=dense_bytes,
        effective_bits=bits, compressed_params=params, eval_tokens=int(s["tokens"]),
        seconds=time.perf_counter() - t0, eval_windows=int(windows.shape[0]),
        data="brown" if data in (None, "brown") else str(Path(data).resolve()))
