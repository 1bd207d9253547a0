"""The SmolLM2 cells users hit most, loaded by plain transformers + compressed-tensors.

Each output that advertises compressed-tensors must give the logits ``compress.load`` gives
(1e-5 relative); an output that cannot load there must say so at the end of the run and in
``compress inspect`` and carry no ``quantization_config``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import compress
from tests.conftest import run_cli

pytestmark = pytest.mark.e2e
pytest.importorskip("compressed_tensors")


def _logits_pair(out: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
        ours = compress.load(out)(ids).logits
    return theirs, ours


def _assert_same_logits(out: Path) -> None:
    theirs, ours = _logits_pair(out)
    rel = float((theirs - ours).norm() / ours.norm())
    assert rel <= 1e-5, rel


def test_gptq_w4_g64_sym_loads_in_transformers(smollm2_w4: Path) -> None:
    assert "quantization_config" in json.loads((smollm2_w4 / "config.json").read_text())
    _assert_same_logits(smollm2_w4)


@pytest.mark.native_kernels
def test_the_default_cpu_path_agrees_with_transformers_to_bf16(smollm2_w4: Path) -> None:
    """compress.load serves through torch's native int4 ops with bf16 activations by default: the
    logits stay within bf16 rounding of transformers' fp32 dequantised model, and the greedy token
    agrees at nearly every position."""
    theirs, ours = _logits_pair(smollm2_w4)
    rel = float((theirs - ours).norm() / ours.norm())
    assert rel <= 2e-2, rel
    agree = float((theirs.argmax(-1) == ours.argmax(-1)).float().mean())
    assert agree >= 0.9, agree


@pytest.mark.parametrize(("args", "group"), [
    (["--bits", "4"], 64),                       # the default group size: auto → 64 on SmolLM2
    (["--bits", "3", "--group-size", "64"], 64),
    (["--bits", "8", "--group-size", "0"], None),  # per channel
], ids=["w4-default", "w3-g64", "w8-channel"])
def test_rtn_cells_load_in_transformers(smollm2: Path, tmp_path: Path, args: list[str], group: int | None,
                                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(["quantize", str(smollm2), "--method", "rtn", *args, "-o", str(out)], monkeypatch, capsys)
    assert code == 0, err
    assert "loads in: compress.load, and transformers" in err
    if "--group-size" not in args:
        assert "group size: auto → 64" in err
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    (scheme,) = qc["config_groups"].values()
    assert scheme["weights"]["group_size"] == group
    _assert_same_logits(out)


def test_ragged_group_is_compress_only_and_says_so(smollm2: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    """GPTQ with a group wider than 576 and act-order off (it used to crash): q/k/v/o/gate/up are
    per channel, down_proj (1536 inputs) has a ragged 512-column last group → compress only."""
    out = tmp_path / "out"
    code, _, err = run_cli(["gptq", str(smollm2), "--bits", "4", "--group-size", "1024", "--no-act-order",
                            "--no-mse", "--protocol", "brown-128-smoke", "--batch-size", "4", "-o", str(out)],
                           monkeypatch, capsys)
    assert code == 0, err
    assert "loads in: compress.load only" in err and "ragged last group" in err
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    modules = json.loads((out / "compression.json").read_text())["modules"]
    assert {e["group_size"] for n, e in modules.items() if "down_proj" not in n} == {576}
    assert {e["group_size"] for n, e in modules.items() if "down_proj" in n} == {1024}
    code, text, _ = run_cli(["inspect", str(out)], monkeypatch, capsys)
    assert code == 0 and "compress.load only" in text
    with torch.no_grad():
        assert torch.isfinite(compress.load(out)(torch.tensor([[1, 2, 3]])).logits).all()
