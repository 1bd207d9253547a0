"""Text corpora: the named ``brown`` corpus or any user text / JSONL file.

A corpus must be text: calibrating on a binary file would silently run on noise. A file is
refused when it holds a NUL byte (binary, or UTF-16) or when more than
:data:`MAX_INVALID_FRACTION` of its bytes (and more than :data:`MIN_INVALID_TOLERATED`) are not
valid UTF-8; below that, the few stray bytes a large real text may carry are replaced by U+FFFD.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from compress.errors import CompressError

#: largest fraction of bytes that may be invalid UTF-8 before a file is refused as not text
MAX_INVALID_FRACTION = 0.001
#: invalid bytes always tolerated, however short the file (a stray byte in a small text)
MIN_INVALID_TOLERATED = 4
TEXT_FIX = "pass a UTF-8 text or JSONL file"
_ESCAPED = re.compile("[\udc80-\udcff]")  # one lone surrogate per invalid byte (surrogateescape)


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path``; a directory, an unreadable file or a non-text file is a
    one-line :class:`CompressError` naming the file and what is wrong with it."""
    if path.is_dir():
        raise CompressError(f"corpus {path} is a directory, not a file", TEXT_FIX)
    if not path.is_file():
        raise CompressError(f"corpus {path} does not exist", "pass --data PATH to a text or JSONL file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CompressError(f"cannot read corpus {path} ({e.strerror or type(e).__name__})",
                            "check the file's permissions, or " + TEXT_FIX) from None
    if b"\x00" in data:
        raise CompressError(f"corpus {path} is not text: it contains NUL bytes (binary or UTF-16)",
                            TEXT_FIX)
    text = data.decode("utf-8", errors="surrogateescape")
    bad = len(_ESCAPED.findall(text))
    if bad > max(MIN_INVALID_TOLERATED, MAX_INVALID_FRACTION * len(data)):
        raise CompressError(f"corpus {path} is not UTF-8 text: {_percent(bad / len(data))} of its "
                            "bytes are invalid", TEXT_FIX)
    return _ESCAPED.sub("\ufffd", text) if bad else text


def _percent(frac: float) -> str:
    """``12 %`` or, below 10 %, ``0.4 %``."""
    pct = 100 * frac
    return f"{pct:.0f} %" if pct >= 10 else f"{pct:.1f} %"


def read_lines(path: str | Path) -> list[str]:
    """Non-empty lines of a text file, or the ``text`` field of each JSONL record."""
    p = Path(path)
    raw = read_text(p)
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


def corpus_bytes(data: str | None) -> int:
    """Size on disk of the corpus named ``data`` (0 when it cannot be read: the run says why)."""
    if data in (None, "brown"):
        from compress.assets import brown_corpus_path

        data = str(brown_corpus_path())
    try:
        return Path(data).stat().st_size
    except OSError:
        return 0


def load_corpus(data: str | None) -> tuple[list[str], str]:
    """Lines of the corpus named ``data`` (``None``/``"brown"`` or a path) and a source label."""
    if data in (None, "brown"):
        from compress.assets import brown_corpus_path

        path = brown_corpus_path()
        return read_lines(path), "brown"
    return read_lines(data), str(Path(data).resolve())
