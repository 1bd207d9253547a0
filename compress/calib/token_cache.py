"""Token ids of a corpus split, kept in the work store.

Tokenising the calibration split of brown (5.4 MB) takes seconds with any fast tokenizer, and
every calibrating run and every evaluation did it again. The ids depend only on the tokenizer's
files, the library versions, the text of the split and the chunking code, so they are stored
once under a key of exactly those (:func:`token_key`) and read back, verified, by later runs;
a hit does not even load the tokenizer. A checkpoint without tokenizer files is never cached
(the tokenizer load then fails with its own message).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from compress.store import WorkStore, fingerprint

#: bump when :func:`compress.calib.protocol.tokenize_joined` changes what it returns
TOKENIZE_VERSION = 1
#: every file ``AutoTokenizer`` may read from a checkpoint directory
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model")


def tokenizer_hash(model_dir: Path) -> str | None:
    """sha256 over the names and bytes of the tokenizer files in ``model_dir`` and the two
    ``config.json`` fields that can choose the tokenizer class (None: no tokenizer files)."""
    h, found = hashlib.sha256(), False
    for name in TOKENIZER_FILES:
        path = Path(model_dir) / name
        if path.is_file():
            found = True
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    if not found:
        return None
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    chooses = {k: config.get(k) for k in ("model_type", "tokenizer_class")} if isinstance(config, dict) else {}
    h.update(json.dumps(chooses, sort_keys=True).encode())
    return h.hexdigest()


def token_key(model_dir: Path, lines: list[str]) -> str | None:
    """The work-store key of the ids of ``"\\n".join(lines)`` under ``model_dir``'s tokenizer."""
    import tokenizers
    import transformers

    tok = tokenizer_hash(model_dir)
    if tok is None:
        return None
    text = hashlib.sha256("\n".join(lines).encode("utf-8", "surrogatepass")).hexdigest()
    return fingerprint(statistic="token-ids", version=TOKENIZE_VERSION, tokenizer=tok, text=text,
                       lines=len(lines), transformers=transformers.__version__, tokenizers=tokenizers.__version__)


def cached_token_ids(model_dir: Path, lines: list[str], tokenize: Callable[[], torch.Tensor], *,
                     cache: bool = True, store: WorkStore | None = None) -> torch.Tensor:
    """``tokenize()`` (1-D int64 ids of the joined ``lines``), read from the work store when an
    earlier run stored it; ``cache=False`` (``--no-cache``) neither reads nor writes."""
    key = token_key(model_dir, lines) if cache else None
    if key is None:
        return tokenize()
    store = store or WorkStore()
    hit = store.get(key, "ids")
    if hit is not None and set(hit) == {"ids"} and hit["ids"].dtype == torch.int64 and hit["ids"].dim() == 1:
        return hit["ids"]
    ids = tokenize()
    store.put(key, "ids", {"ids": ids}, parts={"statistic": "token-ids", "lines": len(lines),
                                                 "model": str(model_dir)})
    return ids
