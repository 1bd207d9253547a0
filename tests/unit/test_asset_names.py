"""A MODEL that is neither a directory nor a named asset is one line listing the named assets
and the closest one; a file is named as a file; ``materialize`` of an unknown name likewise."""

from __future__ import annotations

from pathlib import Path

import pytest

from compress.assets import materialize, resolve_model
from compress.errors import CompressError


def _error(fn: object, arg: str) -> CompressError:
    with pytest.raises(CompressError) as info:
        fn(arg)  # type: ignore[operator]
    assert "\n" not in str(info.value)
    return info.value


def test_typo_suggests_the_closest_asset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no directory called smollm2-135 here
    err = _error(resolve_model, "smollm2-135")
    assert "smollm2-135 does not exist" in err.problem
    assert "named: smollm2-135m, minilm-l6; did you mean smollm2-135m?" in err.problem
    assert err.fix == "pass a Hugging Face checkpoint directory or a named asset"


def test_unrelated_name_lists_assets_without_a_guess(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    err = _error(resolve_model, "zzzz")
    assert "named: smollm2-135m, minilm-l6" in err.problem and "did you mean" not in err.problem


def test_a_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    err = _error(resolve_model, str(f))
    assert "is a file, not a checkpoint directory" in err.problem


def test_a_directory_is_returned_as_is(tmp_path: Path) -> None:
    assert resolve_model(str(tmp_path)) == tmp_path


def test_materialize_unknown_asset() -> None:
    err = _error(materialize, "browm")
    assert "unknown asset 'browm'" in err.problem and "did you mean brown?" in err.problem
    assert "smollm2-135m, minilm-l6, brown" in err.problem
