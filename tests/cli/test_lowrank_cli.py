"""`compress lowrank`: flags render, bad inputs → one line, exit 2, input untouched, no output;
a good run compresses an encoder that `compress eval` then scores by embedding cosine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import SMOKE, assert_refused, dir_hash, run_cli


def test_help_shows_the_pass_flags(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(["lowrank", "--help"], monkeypatch, capsys)
    assert code == 0
    for flag in ("--ratio", "--energy", "--ranks", "--whiten", "--no-whiten", "--per-head", "--damp"):
        assert flag in out, flag
    code, out, _ = run_cli(["list"], monkeypatch, capsys)
    assert code == 0 and "lowrank" in out


def _ranks_file(tmp_path: Path, body: str, suffix: str = ".yaml") -> str:
    p = tmp_path / f"ranks{suffix}"
    p.write_text(body)
    return str(p)


CASES = [
    (["--ratio", "0"], "ratio"),
    (["--ratio", "1.5"], "ratio"),
    (["--ratio", "0.5", "--energy", "0.9"], "either ratio or energy"),
    ([], "set one of ratio, energy or ranks"),
    (["--energy", "0"], "energy"),
    (["--ratio", "0.5", "--damp", "-1"], "damp"),
    (["--ranks", "{tmp}/missing.yaml"], "does not exist"),
    (["--ranks", "FILE:- 3\n- 4\n"], "must map module names"),
    (["--ranks", "FILE:model.layers.0.self_attn.q_proj: three\n"], "must map module names"),
    (["--ranks", "JSON:{\"model.layers.0.mlp.up_proj\": 4,"], "not valid json"),
    (["--ranks", "FILE:model.layers.0.self_attn.q_proj: 0\n"], "greater than or equal to 1"),
    (["--ranks", "FILE:model.layers.9.self_attn.q_proj: 4\n"], "unknown"),
    (["--ranks", "FILE:model.layers.0.mlp.gate: 4\n"], "unknown"),
    (["--ranks", "FILE:model.layers.0.mlp.up_proj: 4\n", "--ignore", "mlp"], "unselected"),
    (["--ranks", "FILE:model.layers.0.self_attn.k_proj: 33\n"], "exceeds its maximum 32"),
    (["--ranks", "FILE:model.layers.0.self_attn.k_proj: 17\n", "--per-head"], "exceeds its maximum 16"),
]


@pytest.mark.parametrize("args,needle", CASES)
def test_bad_lowrank_inputs(args: list[str], needle: str, tiny_llama: Path, tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    resolved = []
    for a in args:
        if a.startswith("FILE:"):
            a = _ranks_file(tmp_path, a[5:])
        elif a.startswith("JSON:"):
            a = _ranks_file(tmp_path, a[5:], ".json")
        resolved.append(a.replace("{tmp}", str(tmp_path)))
    before = dir_hash(tiny_llama)
    out = tmp_path / "out"
    code, _, err = run_cli(["lowrank", str(tiny_llama), "-o", str(out), "--no-whiten", *resolved],
                           monkeypatch, capsys)
    assert_refused(code, err, needle, tiny_llama, before, out)


def test_encoder_compress_and_eval(tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "b"
    code, _, err = run_cli(["lowrank", str(tiny_bert), "--ratio", "0.5", "-o", str(out), *SMOKE],
                           monkeypatch, capsys)
    assert code == 0, err
    code, stdout, err = run_cli(["eval", str(out), "--against", str(tiny_bert), "--protocol", "brown-128-smoke"],
                                monkeypatch, capsys)
    assert code == 0, err
    assert "brown-sentences-64-smoke" in stdout and "mean cosine" in stdout
    res = json.loads((out / "eval-brown-128-smoke.json").read_text())
    assert res["protocol"] == "brown-sentences-64-smoke" and res["sentences"] == 64
    assert res["served"] == "flashsvd"
    assert 0.5 < res["cosine_min"] <= res["cosine_p05"] <= res["cosine_p50"] <= 1.0 + 1e-9
    assert res["cosine_min"] <= res["cosine_mean"] <= 1.0 + 1e-9
    assert 15.0 < res["effective_bits"] <= 16.0  # ratio 0.5 of fp32, both factors counted
