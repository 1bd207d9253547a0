"""``trust_remote_code`` is off by default: a checkpoint's own Python code (``auto_map``) never runs
unless ``--trust-remote-code`` is given. A model only that code defines is refused in one line; a
model ``transformers`` implements itself is built from ``transformers``' class. Each checkpoint's
code writes a marker file when it is imported, so the tests see whether it ran."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import compress
from tests.conftest import make_llama, run_cli

CALIB = ["--protocol", "brown-128-smoke", "--n-samples", "4", "--seq-len", "32"]


def _with_code(src: Path, model_type: str) -> Path:
    """``src`` plus configuration/modeling files (subclasses of LLaMA's) named by ``auto_map``."""
    marker = src / "code-ran"
    (src / "configuration_remote.py").write_text(
        "from transformers import LlamaConfig\n\n\n"
        f"class RemoteConfig(LlamaConfig):\n    model_type = {model_type!r}\n")
    (src / "modeling_remote.py").write_text(
        f"from pathlib import Path\n\nPath({str(marker)!r}).write_text('imported')\n\n"
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_remote import RemoteConfig\n\n\n"
        "class RemoteForCausalLM(LlamaForCausalLM):\n    config_class = RemoteConfig\n")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type=model_type, auto_map={"AutoConfig": "configuration_remote.RemoteConfig",
                                                "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM"})
    (src / "config.json").write_text(json.dumps(cfg))
    return src


@pytest.fixture()
def remote_only(tmp_path: Path) -> Path:
    return _with_code(make_llama(tmp_path / "remote", layers=2, seed=2), "tinyremote")


@pytest.fixture()
def known_type(tmp_path: Path) -> Path:
    return _with_code(make_llama(tmp_path / "known", layers=2, seed=2), "llama")


@pytest.mark.parametrize("command", [["gptq", "-o", "OUT", *CALIB], ["inspect"], ["eval", "--protocol",
                                                                                  "brown-128-smoke"]])
def test_a_model_only_its_code_defines_is_refused(command: list[str], remote_only: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    args = [command[0], str(remote_only), *[str(tmp_path / "o") if a == "OUT" else a for a in command[1:]]]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--trust-remote-code" in lines[0] and "tinyremote" in lines[0], err
    assert not (remote_only / "code-ran").exists() and not (tmp_path / "o").exists()


def test_trusted_the_code_runs_and_the_adapter_is_named(remote_only: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("COMPRESS_TRUST_REMOTE_CODE", "0")  # and unset again after the test
    code, _, err = run_cli(["gptq", str(remote_only), "-o", str(tmp_path / "o"), "--trust-remote-code", *CALIB],
                           monkeypatch, capsys)
    assert code == 2 and "add an Adapter for 'tinyremote'" in err, err
    assert not (tmp_path / "o").exists()


def test_a_known_type_is_built_without_its_code_unless_trusted(known_type: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPRESS_TRUST_REMOTE_CODE", "0")  # and unset again after the test
    recipe = {"calibration": {"protocol": "brown-128-smoke", "n_samples": 4, "seq_len": 32},
              "stages": [{"pass": "rtn", "config": {"bits": 8}}]}
    plain = compress.run(recipe, known_type, tmp_path / "plain")
    ids = torch.arange(20).reshape(1, 20)
    with torch.no_grad():
        want = compress.load(plain)(input_ids=ids).logits
    assert not (known_type / "code-ran").exists()  # transformers' own LLaMA, the shipped code unread
    trusted = compress.run(recipe, known_type, tmp_path / "trusted", trust_remote_code=True)
    assert (known_type / "code-ran").exists()
    assert (trusted / "modeling_remote.py").is_file()  # the output carries the code its auto_map names
    model = compress.load(trusted, trust_remote_code=True)
    assert type(model).__name__ == "RemoteForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)
    assert os.environ["COMPRESS_TRUST_REMOTE_CODE"] == "0"  # the library call did not leak the trust
