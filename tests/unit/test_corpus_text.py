"""A corpus must be text: binary files, NUL bytes, directories and unreadable files are refused
in one line naming the file; a real text with a couple of stray invalid bytes is still read."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from compress.calib.corpus import read_lines
from compress.errors import CompressError

TEXT = "".join(f"The quick brown fox number {i} jumps over the lazy dog.\n" for i in range(200))


def _refused(path: Path, *needles: str) -> CompressError:
    with pytest.raises(CompressError) as info:
        read_lines(path)
    err = info.value
    assert str(path) in err.problem and "\n" not in str(err)
    for needle in needles:
        assert needle in str(err), str(err)
    return err


def test_random_bytes_are_refused(tmp_path: Path) -> None:
    p = tmp_path / "garbage.txt"
    rng = random.Random(0)
    p.write_bytes(bytes(rng.randrange(1, 256) for _ in range(20000)))  # no NUL: the UTF-8 check
    err = _refused(p, "is not UTF-8 text", "of its bytes are invalid")
    assert err.fix == "pass a UTF-8 text or JSONL file"


def test_nul_bytes_are_refused(tmp_path: Path) -> None:
    p = tmp_path / "weights.bin"
    p.write_bytes(TEXT.encode()[:500] + b"\x00\x00\x01\x02" + TEXT.encode()[500:])
    _refused(p, "NUL")
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes(TEXT.encode("utf-16"))
    _refused(utf16, "NUL")


def test_a_few_stray_bytes_are_tolerated(tmp_path: Path) -> None:
    data = bytearray(TEXT.encode())
    data[100:101] = b"\xff"
    data[5000:5001] = b"\xc3"  # a truncated two-byte sequence
    p = tmp_path / "real.txt"
    p.write_bytes(bytes(data))
    lines = read_lines(p)
    assert len(lines) == 200 and sum(s.count("\ufffd") for s in lines) == 2


def test_directory_is_refused(tmp_path: Path) -> None:
    _refused(tmp_path, "is a directory")


def test_unreadable_file_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "secret.txt"
    p.write_text(TEXT)

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)  # works as root too (chmod would not)
    _refused(p, "cannot read", "Permission denied")


def test_jsonl_still_works(tmp_path: Path) -> None:
    p = tmp_path / "corpus.jsonl"
    p.write_text("".join(json.dumps({"text": f"récord {i}"}) + "\n" for i in range(3)), encoding="utf-8")
    assert read_lines(p) == ["récord 0", "récord 1", "récord 2"]


def test_empty_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "empty.txt"
    p.write_bytes(b"")
    _refused(p, "is empty")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    _refused(blank, "is empty")
