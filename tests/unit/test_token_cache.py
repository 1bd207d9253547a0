"""Tokenised splits in the work store: a hit equals tokenising again and skips the tokenizer;
the key follows the tokenizer files and the text; --no-cache and tokenizer-less checkpoints
never touch the store; a damaged entry is recomputed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from compress.calib.token_cache import cached_token_ids, token_key
from compress.store import WorkStore
from tests.conftest import brown_lines


def _ids(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64)


def test_a_hit_returns_the_stored_ids_without_tokenising(tiny_llama: Path, tmp_path: Path) -> None:
    store, lines, calls = WorkStore(tmp_path / "w"), brown_lines(50), []

    def tokenize() -> torch.Tensor:
        calls.append(1)
        return _ids(321)

    first = cached_token_ids(tiny_llama, lines, tokenize, store=store)
    second = cached_token_ids(tiny_llama, lines, tokenize, store=store)
    assert torch.equal(first, second) and len(calls) == 1


def test_the_key_follows_the_tokenizer_files_and_the_text(tiny_llama: Path, tmp_path: Path) -> None:
    lines = brown_lines(50)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama, copy)
    assert token_key(copy, lines) == token_key(tiny_llama, lines)  # the path is not part of it
    assert token_key(tiny_llama, lines[:-1]) != token_key(tiny_llama, lines)
    tok = copy / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"<eos>"', '"<end>"'))
    assert token_key(copy, lines) != token_key(tiny_llama, lines)


def test_no_cache_and_tokenizer_less_checkpoints_store_nothing(tiny_llama: Path, tmp_path: Path) -> None:
    store = WorkStore(tmp_path / "w")
    cached_token_ids(tiny_llama, brown_lines(20), lambda: _ids(5), cache=False, store=store)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    assert token_key(bare, brown_lines(20)) is None
    cached_token_ids(bare, brown_lines(20), lambda: _ids(5), store=store)
    assert store.size_bytes() == 0


def test_a_damaged_entry_is_recomputed(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store, lines = WorkStore(tmp_path / "w"), brown_lines(30)
    cached_token_ids(tiny_llama, lines, lambda: _ids(100), store=store)
    (victim,) = (tmp_path / "w").glob("??/*/ids*.safetensors")
    victim.write_bytes(victim.read_bytes()[:-16])
    again = cached_token_ids(tiny_llama, lines, lambda: _ids(100), store=store)
    assert torch.equal(again, _ids(100)) and "work store" in capsys.readouterr().err
