"""Encoder evaluation: fidelity of mean-pooled sentence embeddings to the dense model.

Protocol ``brown-sentences-512``: the first 512 *test* lines of brown under the brown-512 split
(line i is test when ``i % 10 == 0``), one sentence each, tokenised with the checkpoint's own
tokenizer (default special tokens, truncated to 256 tokens — all-MiniLM-L6-v2's
``max_seq_length``), batches of 32 padded to their longest sentence. The embedding of a sentence
is the attention-mask-weighted mean of the last hidden states; fidelity is the cosine similarity
between the compressed and the dense embedding of each sentence (mean, min, 5th percentile,
median). ``brown-sentences-64-smoke`` takes the first 64 test lines.

A compressed model whose blocks are low-rank is served through the fused FlashSVD blocks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from rich.table import Table
from torch import Tensor, nn

from compress.arch import remote_code_trusted
from compress.calib.corpus import load_corpus
from compress.calib.protocol import corpus_protocol_name, get_protocol, split_lines
from compress.checkpoint import CheckpointReader
from compress.errors import CompressError
from compress.placement import input_device

if TYPE_CHECKING:
    from compress.eval import Progress
    from compress.placement import DeviceMap


class SentenceProtocol(BaseModel):
    """Which sentences are embedded and how."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    split: str = "brown-512"  # the protocol whose test lines are used
    n_sentences: int
    max_tokens: int = 256
    batch_size: int = 32


SENTENCE_PROTOCOLS: dict[str, SentenceProtocol] = {
    "brown-sentences-512": SentenceProtocol(name="brown-sentences-512", n_sentences=512),
    "brown-sentences-64-smoke": SentenceProtocol(name="brown-sentences-64-smoke", n_sentences=64),
}


def sentence_protocol(name: str) -> SentenceProtocol:
    """The named sentence protocol; ``brown-512`` maps to ``brown-sentences-512`` and any
    ``-smoke`` protocol to ``brown-sentences-64-smoke`` (the result names the one used)."""
    if name in SENTENCE_PROTOCOLS:
        return SENTENCE_PROTOCOLS[name]
    if name == "brown-512":
        return SENTENCE_PROTOCOLS["brown-sentences-512"]
    if name.endswith("-smoke"):
        return SENTENCE_PROTOCOLS["brown-sentences-64-smoke"]
    raise CompressError(f"protocol {name!r} has no encoder (sentence-embedding) variant",
                        f"use one of {', '.join(SENTENCE_PROTOCOLS)}")


def eval_sentences(proto: SentenceProtocol, data: str | None) -> list[str]:
    """The first ``n_sentences`` test lines of the corpus under ``proto.split``."""
    lines, _ = load_corpus(data)
    _, test = split_lines(lines, get_protocol(proto.split))
    return test[:proto.n_sentences]


@torch.no_grad()
def embed(model: nn.Module, tokenizer: object, sentences: list[str], proto: SentenceProtocol,
          after_batch: Callable[[], None] | None = None) -> Tensor:
    """Mean-pooled (attention-mask-weighted) last hidden states, ``[n, hidden]`` float64.

    Padded positions are masked, so a tokenizer without a pad token pads with its eos/unk token.
    ``after_batch`` is called once per batch of ``proto.batch_size`` sentences (for progress).
    """
    if getattr(tokenizer, "pad_token", None) is None:
        fill = getattr(tokenizer, "eos_token", None) or getattr(tokenizer, "unk_token", None)
        if fill is None:
            raise CompressError("the tokenizer has no pad, eos or unk token to pad batches with",
                                "add a pad token to the checkpoint's tokenizer")
        tokenizer.pad_token = fill  # type: ignore[attr-defined]
    out = []
    for i in range(0, len(sentences), proto.batch_size):
        enc = tokenizer(sentences[i:i + proto.batch_size], padding=True, truncation=True,  # type: ignore[operator]
                        max_length=proto.max_tokens, return_tensors="pt")
        enc = {k: v.to(input_device(model)) for k, v in enc.items()}
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                       token_type_ids=enc.get("token_type_ids")).last_hidden_state  # [b, L, d]
        mask = enc["attention_mask"].to(torch.float64).unsqueeze(-1)  # [b, L, 1]
        out.append((hidden.double() * mask).sum(1) / mask.sum(1).clamp_min(1.0))
        if after_batch is not None:
            after_batch()
    return torch.cat(out).cpu()


@dataclass
class EncoderEvalResult:
    """One encoder evaluation (every figure names its protocol)."""

    protocol: str
    model: str
    cosine_mean: float | None
    cosine_min: float | None
    cosine_p05: float | None
    cosine_p50: float | None
    bytes_on_disk: int
    dense_bytes_on_disk: int | None
    effective_bits: float | None
    compressed_params: int
    sentences: int
    served: str
    seconds: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def cosine_stats(a: Tensor, b: Tensor) -> dict[str, float]:
    """Per-row cosine similarity of two ``[n, d]`` embedding sets: mean, min, p05, p50."""
    cos = F.cosine_similarity(a.double(), b.double(), dim=-1)
    return {"mean": float(cos.mean()), "min": float(cos.min()),
            "p05": float(torch.quantile(cos, 0.05)), "p50": float(torch.quantile(cos, 0.5))}


def _has_lowrank(model: nn.Module) -> bool:
    from compress.modules.lowrank import LowRankLinear

    return any(isinstance(m, LowRankLinear) for m in model.modules())


def evaluate_encoder(model_dir: str | Path, against: str | Path | None = None, *,
                     protocol: str = "brown-sentences-512", data: str | None = None,
                     progress: Progress | None = None, device: str | None = None,
                     device_map: DeviceMap | None = None) -> EncoderEvalResult:
    """Embedding fidelity of ``model_dir`` to the dense ``against`` under a sentence protocol.

    With ``device_map`` the models are placed by ``accelerate`` (:func:`compress.load`) after the
    FlashSVD switch, which must see the blocks before their hooks are attached.

    ``progress(done, total, message)`` is called after each batch of sentences; with ``against``
    the dense model's batches count too (``total`` covers both).
    """
    from transformers import AutoTokenizer

    from compress.api import load
    from compress.assets import resolve_model
    from compress.eval import compressed_size
    from compress.modules.flashsvd import enable_flashsvd
    from compress.placement import place

    t0 = time.perf_counter()
    proto = sentence_protocol(protocol)
    model_dir = resolve_model(str(model_dir))
    reader = CheckpointReader(model_dir)
    manifest = reader.manifest() or {}
    if against is None and manifest.get("origin") and Path(manifest["origin"]).is_dir():
        against = manifest["origin"]
    sentences = eval_sentences(proto, data)
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=remote_code_trusted())
    model = load(model_dir, device=device if device_map is None else None)
    served = "modules"
    if _has_lowrank(model) and enable_flashsvd(model, require=False).total:
        served = "flashsvd"
    if device_map is not None:
        model = place(model, device_map)
    name = corpus_protocol_name(proto.name, data)
    tick = _batch_ticker(progress, f"eval {name}", sentences, proto, 1 if against is None else 2)
    emb = embed(model, tok, sentences, proto, tick)
    stats: dict[str, float | None] = dict.fromkeys(("mean", "min", "p05", "p50"))
    dense_bytes = None
    if against is not None:
        dense_dir = resolve_model(str(against))
        ref = embed(load(dense_dir, device=device, device_map=device_map), tok, sentences, proto, tick)
        stats.update(cosine_stats(emb, ref))
        dense_bytes = CheckpointReader(dense_dir).total_bytes()
    bits, params = compressed_size(reader, manifest)
    return EncoderEvalResult(
        protocol=name, model=str(model_dir),
        cosine_mean=stats["mean"], cosine_min=stats["min"],
        cosine_p05=stats["p05"], cosine_p50=stats["p50"], bytes_on_disk=reader.total_bytes(),
        dense_bytes_on_disk=dense_bytes, effective_bits=bits, compressed_params=params,
        sentences=len(sentences), served=served, seconds=time.perf_counter() - t0)


def _batch_ticker(progress: Progress | None, label: str, sentences: list[str],
                  proto: SentenceProtocol, passes: int) -> Callable[[], None] | None:
    """A per-batch callback reporting ``(done, total, "<label> (batch done/total)")`` over
    ``passes`` embedding passes of ``sentences`` (None when there is no ``progress``)."""
    if progress is None:
        return None
    total = passes * -(-len(sentences) // proto.batch_size)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        progress(done, total, f"{label} (batch {done}/{total})")

    return tick


def encoder_table(res: EncoderEvalResult) -> Table:
    """The rich table ``compress eval`` prints for an encoder."""
    t = Table(title=f"evaluation ({res.protocol}, {res.sentences} sentences, "
                    "mean-pooled sentence embeddings)")
    t.add_column("metric")
    t.add_column("value", justify="right")

    def f(v: float | None, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    rows = [("mean cosine vs dense", f(res.cosine_mean, ".5f")), ("min cosine", f(res.cosine_min, ".5f")),
            ("5th percentile cosine", f(res.cosine_p05, ".5f")), ("median cosine", f(res.cosine_p50, ".5f")),
            ("bytes on disk", f"{res.bytes_on_disk:,}"),
            ("dense bytes on disk", "—" if res.dense_bytes_on_disk is None else f"{res.dense_bytes_on_disk:,}"),
            ("effective bits/param (compressed linears)", f(res.effective_bits, ".3f")),
            ("sentences", str(res.sentences)), ("served by", res.served)]
    for r in rows:
        t.add_row(*r)
    return t
