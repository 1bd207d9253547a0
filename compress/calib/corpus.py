"""Text corpora: the named ``brown`` corpus or any user text / JSONL file."""

from __future__ import annotations

import json
from pathlib import Path

from compress.errors import CompressError


def read_lines(path: str | Path) -> list[str]:
    """Non-empty lines of a text file, or the ``text`` field of each JSONL record."""
    p = Path(path)
    if not p.is_file():
        raise CompressError(f"corpus {p} does not exist", "pass --data PATH to a text or JSONL file")
    raw = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix == ".jsonl":
        lines = []
        for n, row in enumerate(raw.splitlines(), 1):
            if not row.strip():
                continue
            try:
                rec = json.loads(row)
            except json.JSONDecodeError:
                raise CompressError(f"{p}:{n} is not valid JSON", "fix the JSONL file") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise CompressError(f"{p}:{n} has no string 'text' field", "give every record a 'text'")
            lines.append(rec["text"])
    else:
        lines = raw.splitlines()
    lines = [s for s in (s.strip() for s in lines) if s]
    if not lines:
        raise CompressError(f"corpus {p} is empty", "pass a text file with content")
    return lines


def load_corpus(data: str | None) -> tuple[list[str], str]:
    """Lines of the corpus named ``data`` (``None``/``"brown"`` or a path) and a source label."""
    if data in (None, "brown"):
        from compress.assets import brown_corpus_path

        path = brown_corpus_path()
        return read_lines(path), "brown"
    return read_lines(data), str(Path(data).resolve())
