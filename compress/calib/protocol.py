"""Named evaluation/calibration protocols (see docs/PROTOCOL.md).

``brown-512``: line i of the corpus is *test* when ``i % 10 == 0``, else *calibration*.
Calibration draws 128 windows of 512 tokens at offsets drawn uniformly from the tokenised
calibration split with ``torch.Generator().manual_seed(0)``. Evaluation tokenises the
``"\\n"``-joined test lines once and takes the first 40 non-overlapping 512-token windows.
Smaller variants carry ``-smoke`` in their name; a protocol applied to another corpus is named
after it (:func:`corpus_protocol_name`: ``brown-512`` on ``other.txt`` is ``other-512``).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from compress.errors import CompressError


class Protocol(BaseModel):
    """A calibration + evaluation protocol."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    seq_len: int = Field(512, ge=8, le=131072)
    n_calib: int = Field(128, ge=1, le=100000)
    n_eval: int = Field(40, ge=1, le=100000)
    seed: int = 0
    test_every: int = Field(10, ge=2)


PROTOCOLS: dict[str, Protocol] = {
    "brown-512": Protocol(name="brown-512"),
    "brown-512-smoke": Protocol(name="brown-512-smoke", n_calib=16, n_eval=8),
    "brown-128-smoke": Protocol(name="brown-128-smoke", seq_len=128, n_calib=8, n_eval=4),
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise CompressError(f"unknown protocol {name!r} (known: {', '.join(PROTOCOLS)})",
                            "pick one of the named protocols")
    return PROTOCOLS[name]


def corpus_protocol_name(name: str, data: str | Path | None) -> str:
    """The name of protocol ``name`` applied to the corpus ``data`` (``None``/``"brown"`` or a path).

    The brown corpus keeps the name (``brown-512``, ``brown-512-smoke``); any other file replaces
    the leading ``brown`` by the file's stem and keeps the suffixes (``other.txt`` →
    ``other-512``, ``other-512-smoke``, ``other-512-c32``), so no figure computed on other text
    carries a brown name. A file named ``brown.*`` that is not the brown corpus becomes
    ``file-brown-…``.
    """
    if data is None or str(data) == "brown":
        return name
    path = Path(data)
    stem = re.sub(r"[^A-Za-z0-9._]+", "-", path.stem).strip("-") or "data"
    if stem.lower() == "brown":
        try:
            from compress.assets import brown_corpus_path

            if path.resolve() == brown_corpus_path().resolve():
                return name
        except Exception:  # noqa: BLE001  (no brown corpus here: the file cannot be it)
            pass
        stem = "file-brown"
    rest = name[len("brown"):] if name.startswith("brown") else f"-{name}"
    return stem + rest


def split_lines(lines: list[str], protocol: Protocol) -> tuple[list[str], list[str]]:
    """(calibration lines, test lines) by line index."""
    calib = [s for i, s in enumerate(lines) if i % protocol.test_every != 0]
    test = [s for i, s in enumerate(lines) if i % protocol.test_every == 0]
    return calib, test


def tokenize_joined(tokenizer, lines: list[str], chunk_lines: int = 2000) -> torch.Tensor:
    """Token ids of ``"\\n".join(lines)`` as one 1-D int64 tensor (default special tokens).

    Tokenising megabytes at once makes fast tokenizers hold ~600 bytes per token of offsets and
    alignments, so the text is tokenised in chunks of whole lines. Chunking is only used when it
    is provably identical: every chunk boundary is re-tokenised as one string (last line +
    ``"\\n"`` + next line) and compared with the two pieces; any difference falls back to a
    single call on the whole text.
    """
    if len(lines) <= chunk_lines:
        return _encode(tokenizer, "\n".join(lines), special=True)
    chunks = ["\n".join(lines[i:i + chunk_lines]) for i in range(0, len(lines), chunk_lines)]
    pieces = [c + "\n" for c in chunks[:-1]] + [chunks[-1]]
    for i in range(len(chunks) - 1):
        left, right = lines[(i + 1) * chunk_lines - 1] + "\n", lines[(i + 1) * chunk_lines]
        joined = _encode(tokenizer, left + right, special=False)
        split = torch.cat([_encode(tokenizer, left, special=False), _encode(tokenizer, right, special=False)])
        if not torch.equal(joined, split):
            return _encode(tokenizer, "\n".join(lines), special=True)
    body = torch.cat([_encode(tokenizer, p, special=False) for p in pieces])
    prefix, suffix = _special_affixes(tokenizer)
    return torch.cat([prefix, body, suffix])


def _encode(tokenizer, text: str, special: bool) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64, device="cpu")  # token ids live on the host


def _special_affixes(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Special tokens the tokenizer adds before and after a single text (e.g. [CLS] / [SEP])."""
    probe = "a"
    bare = _encode(tokenizer, probe, special=False).tolist()
    full = _encode(tokenizer, probe, special=True).tolist()
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return (torch.tensor(full[:start], dtype=torch.int64, device="cpu"),
                    torch.tensor(full[start + len(bare):], dtype=torch.int64, device="cpu"))
    raise ValueError("cannot locate the text inside the tokenizer's special-token template")


def calibration_windows(ids: torch.Tensor, protocol: Protocol) -> torch.Tensor:
    """``[n_calib, seq_len]`` windows at uniformly drawn offsets of the calibration tokens."""
    n, L = ids.numel(), protocol.seq_len
    if n < L:
        raise CompressError(f"calibration text has {n} tokens, fewer than one {L}-token window",
                            "use a longer corpus or a smaller --seq-len")
    g = torch.Generator(device="cpu").manual_seed(protocol.seed)
    starts = torch.randint(0, n - L + 1, (protocol.n_calib,), generator=g, device="cpu")
    return torch.stack([ids[s:s + L] for s in starts.tolist()])


def eval_windows(ids: torch.Tensor, protocol: Protocol) -> torch.Tensor:
    """The first ``n_eval`` non-overlapping windows (fewer if the text is short, at least one)."""
    L = protocol.seq_len
    n = min(protocol.n_eval, ids.numel() // L)
    if n < 1:
        raise CompressError(f"evaluation text has {ids.numel()} tokens, fewer than one {L}-token window",
                            "use a longer corpus or a smaller --seq-len")
    return ids[: n * L].view(n, L)  # (n_windows, seq_len)


def fingerprint(windows: torch.Tensor, protocol: Protocol, source: str) -> str:
    """sha256 of the exact token windows plus the protocol and data source names."""
    h = hashlib.sha256(windows.to(torch.int64).numpy().tobytes())
    h.update(f"{protocol.model_dump_json()}|{source}".encode())
    return h.hexdigest()
