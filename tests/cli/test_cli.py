"""The CLI: help for every command, and every bad input → one clear line, exit code 2, the
input untouched and no output (not even a partial one)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import SMOKE, dir_hash, error_lines, run_cli

COMMANDS = ["quantize", "run", "eval", "list", "inspect", "plan", "assets", "demo", "rtn", "gptq"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help(cmd: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli([cmd, "--help"], monkeypatch, capsys)
    assert code == 0 and "Usage" in out


def test_list_and_inspect(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(["list"], monkeypatch, capsys)
    assert code == 0 and "gptq" in out and "rtn" in out
    code, out, _ = run_cli(["inspect", str(tiny_llama)], monkeypatch, capsys)
    assert code == 0 and "llama" in out


def test_quantize_plan_eval_end_to_end(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "q"
    code, _, err = run_cli(["quantize", str(tiny_llama), "--bits", "4", "--group-size", "32", "-o", str(out),
                            *SMOKE], monkeypatch, capsys)
    assert code == 0, err
    assert (out / "compression.json").is_file()
    code, stdout, err = run_cli(["eval", str(out), "--against", str(tiny_llama), "--protocol", "brown-128-smoke"],
                                monkeypatch, capsys)
    assert code == 0, err
    res = json.loads((out / "eval-brown-128-smoke.json").read_text())
    assert res["dense_ppl"] > 0 and res["ppl"] > 0 and 0 <= res["top1_agreement"] <= 1
    assert 4.0 < res["effective_bits"] < 6.0 and res["kl_mean"] >= 0
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - pass: gptq\n    config: {bits: 3, group_size: 32}\n")
    code, stdout, _ = run_cli(["plan", str(recipe), str(tiny_llama)], monkeypatch, capsys)
    assert code == 0 and "output on disk" in stdout and "peak memory" in stdout


def _assert_clean_failure(code: int, err: str, out: Path | None, needle: str) -> None:
    assert code == 2, err
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle.lower() in err.lower(), err
    if out is not None:
        assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _weights(d: Path) -> Path:
    return d / "model.safetensors"


@pytest.mark.parametrize("case,needle", [
    ("missing", "does not exist"),
    ("noconfig", "no config.json"),
    ("truncated", "truncated"),
    ("shape", "shape"),
    ("model_type", "unsupported model_type"),
    ("nan", "nan"),
    ("pickle", "pickle"),
])
def test_bad_checkpoints(case: str, needle: str, tiny_llama: Path, tmp_path: Path,
                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "in"
    if case != "missing":
        _copy(tiny_llama, src)
    if case == "noconfig":
        (src / "config.json").unlink()
    elif case == "truncated":
        data = _weights(src).read_bytes()
        _weights(src).write_bytes(data[: len(data) // 2])
    elif case == "shape":
        cfg = json.loads((src / "config.json").read_text())
        cfg["intermediate_size"] = 128
        (src / "config.json").write_text(json.dumps(cfg))
    elif case == "model_type":
        cfg = json.loads((src / "config.json").read_text())
        cfg["model_type"] = "gpt2"
        (src / "config.json").write_text(json.dumps(cfg))
    elif case == "nan":
        t = load_file(str(_weights(src)))
        t["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
        save_file(t, str(_weights(src)), metadata={"format": "pt"})
    elif case == "pickle":
        _weights(src).unlink()
        torch.save({"x": torch.ones(1)}, src / "pytorch_model.bin")
    before = dir_hash(src) if src.exists() else None
    out = tmp_path / "out"
    code, _, err = run_cli(["quantize", str(src), "--method", "gptq", "-o", str(out), *SMOKE], monkeypatch, capsys)
    _assert_clean_failure(code, err, out, needle)
    if before is not None:
        assert dir_hash(src) == before


@pytest.mark.parametrize("args,needle", [
    (["--bits", "5"], "bits"),
    (["--group-size", "3"], "--group-size 3"),
    (["--seq-len", "4096"], "context"),
    (["--damp", "-1"], "damp"),
])
def test_bad_options(args: list[str], needle: str, tiny_llama: Path, tmp_path: Path,
                     monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(["quantize", str(tiny_llama), "-o", str(out), *SMOKE, *args], monkeypatch, capsys)
    _assert_clean_failure(code, err, out, needle)


@pytest.mark.parametrize("body,needle", [
    ("stages:\n  - pass: gptq\n    config: {bitz: 4}\n", "bitz"),
    ("stages:\n  - pass: gptq\n    config: {bits: four}\n", "bits"),
    ("stages:\n  - pass: gptq\n    config: {bits: 16}\n", "bits"),
    ("stages:\n  - pass: rtn\n    config: {group_size: 2}\n", "group_size"),
    ("stages:\n  - pass: rtn\nsurprise: 1\n", "surprise"),
])
def test_bad_recipes(body: str, needle: str, tiny_llama: Path, tmp_path: Path,
                     monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(body)
    out = tmp_path / "out"
    code, _, err = run_cli(["run", str(recipe), str(tiny_llama), "-o", str(out)], monkeypatch, capsys)
    _assert_clean_failure(code, err, out, needle)


def test_output_paths(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture) -> None:
    src = _copy(tiny_llama, tmp_path / "in")
    before = dir_hash(src)
    for out, needle in ((src, "inside"), (src / "sub", "inside")):
        code, _, err = run_cli(["rtn", str(src), "-o", str(out)], monkeypatch, capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    code, _, err = run_cli(["rtn", str(src), "-o", str(existing)], monkeypatch, capsys)
    assert code == 2 and "--overwrite" in err and (existing / "keep.txt").read_text() == "mine"
    assert dir_hash(src) == before
    code, _, err = run_cli(["rtn", str(src), "-o", str(existing), "--overwrite"], monkeypatch, capsys)
    assert code == 2 and "--force" in err and (existing / "keep.txt").read_text() == "mine"  # not ours
    code, _, err = run_cli(["rtn", str(src), "-o", str(existing), "--force"], monkeypatch, capsys)
    assert code == 0 and not (existing / "keep.txt").exists()
    code, _, err = run_cli(["rtn", str(src), "-o", str(existing), "--overwrite"], monkeypatch, capsys)
    assert code == 0, err  # a compress output is replaced with --overwrite alone


@pytest.mark.parametrize("content,needle", [("", "empty"), ("a\nfew\nshort\nlines\n", "fewer than one"),
                                            ("only one line\n", "no calibration lines")])
def test_bad_corpus(content: str, needle: str, tiny_llama: Path, tmp_path: Path,
                    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "c.txt"
    data.write_text(content)
    out = tmp_path / "out"
    code, _, err = run_cli(["gptq", str(tiny_llama), "-o", str(out), "--data", str(data), *SMOKE],
                           monkeypatch, capsys)
    _assert_clean_failure(code, err, out, needle)


def test_ctrl_c_leaves_no_output(tmp_path: Path) -> None:
    from tests.conftest import make_llama

    src = make_llama(tmp_path / "deep", layers=24)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # background jobs inherit SIGINT=ignored; restore Python's handler as a terminal would have it
    boot = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); import cli; cli.main()"
    cmd = [sys.executable, "-c", boot, "gptq", str(src), "-o", str(out),
           "--protocol", "brown-512", "--n-samples", "512", "--seq-len", "256"]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[2], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    partial = out.with_name(out.name + ".partial")
    while not partial.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert partial.exists(), "the run never started writing"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert not out.exists() and not partial.exists()
