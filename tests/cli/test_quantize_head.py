"""``--quantize-head int8|int4``: the head (and a tied table) served from codes.

* tied head, shared codes: the embedding lookup returns exactly the rows the head multiplies by
  (one stored copy under ``compress_shared.tied_head``), the output validates and generates;
* ``--dense-embedding`` unties them and keeps the table as it was;
* an untied head is stored as an ordinary quant linear;
* GPTQ's head (Gram matrix of the final-norm outputs) has a lower output error than RTN's;
* refusals: a model without a head, a head that is compressed already.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import compress
from tests.conftest import SMOKE, error_lines, make_bert, make_llama, run_cli

pytestmark = pytest.mark.native_kernels  # the default CPU path, checked against the twin

CAL = {"protocol": "brown-128-smoke", "batch_size": 4}


def _keys(out: Path) -> set[str]:
    keys: set[str] = set()
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as s:
            keys |= set(s.keys())
    return keys


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama(tmp_path_factory.mktemp("hq") / "tied")


@pytest.mark.parametrize("head", ["int8", "int4"])
def test_shared_codes_serve_head_and_lookup(tied: Path, tmp_path: Path, head: str) -> None:
    out = compress.run({"stages": [{"pass": "rtn", "config": {"bits": 4, "group_size": 32, "quantize_head": head}}]},
                       tied, tmp_path / "out")
    keys = _keys(out)
    assert {"compress_shared.tied_head.weight_packed", "compress_shared.tied_head.weight_scale"} <= keys
    assert not any(k.startswith(("lm_head.", "model.embed_tokens.")) for k in keys)  # one copy, shared
    manifest = json.loads((out / "compression.json").read_text())
    assert manifest["modules"]["lm_head"]["kind"] == manifest["modules"]["model.embed_tokens"]["kind"] == "quant-tied"
    assert manifest["shared"]["tied_head"]["users"] == ["lm_head", "model.embed_tokens"]
    model = compress.load(out)
    ids = torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(0))
    table = model.lm_head.dequantized_weight(torch.float32)  # [vocab, hidden]
    assert torch.equal(model.model.embed_tokens(ids), table[ids])
    dense = compress.load(tied)
    want = dense.model.embed_tokens.weight.detach()
    rel = float((table - want).norm() / want.norm())
    assert rel < (0.01 if head == "int8" else 0.2), rel
    assert model.lm_head.kernel_path(torch.zeros(1, 64)).startswith(f"native {head}")


def test_shared_codes_validate_and_generate(tied: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "w4h8"
    code, _, err = run_cli(["rtn", str(tied), "--bits", "4", "--group-size", "32", "--quantize-head", "int8",
                            "-o", str(out)], monkeypatch, capsys)
    assert code == 0, err
    code, out_txt, err = run_cli(["validate", str(out), "--m", "1", "--m", "7"], monkeypatch, capsys)
    assert code == 0 and "validation passed" in err, out_txt + err
    code, out_txt, err = run_cli(["generate", str(out), "The", "--max-new-tokens", "5"],
                                 monkeypatch, capsys)
    assert code == 0, err


def test_dense_embedding_unties(tied: Path, tmp_path: Path) -> None:
    cfg = {"bits": 4, "group_size": 32, "quantize_head": "int4", "dense_embedding": True}
    out = compress.run({"stages": [{"pass": "rtn", "config": cfg}]}, tied, tmp_path / "out")
    keys = _keys(out)
    assert "model.embed_tokens.weight" in keys and "lm_head.weight_packed" in keys and "lm_head.weight" not in keys
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as s, \
            safe_open(str(next(tied.glob("*.safetensors"))), "pt") as d:
        assert torch.equal(s.get_tensor("model.embed_tokens.weight"), d.get_tensor("model.embed_tokens.weight"))
    model = compress.load(out)
    assert type(model.lm_head).__name__ == "QuantLinear" and model.lm_head.group_size == 32


def test_untied_head(tmp_path: Path) -> None:
    src = make_llama(tmp_path / "untied", tie=False)
    out = compress.run({"stages": [{"pass": "rtn", "config": {"bits": 4, "group_size": 32, "quantize_head": "int8"}}]},
                       src, tmp_path / "out")
    keys = _keys(out)
    assert {"lm_head.weight_packed", "lm_head.weight_scale", "model.embed_tokens.weight"} <= keys
    assert "lm_head.weight" not in keys
    model = compress.load(out)
    assert model.lm_head.bits == 8 and model.lm_head.group_size == 64  # per channel: one group per row


def test_gptq_head_output_error_below_rtn(tied: Path, tmp_path: Path) -> None:
    """On the calibration windows' final-norm outputs, GPTQ's int4 head errs less than RTN's."""
    from compress.algos.gptq import relative_output_error

    outs = {}
    for method in ("rtn", "gptq"):
        cfg = {"bits": 8, "quantize_head": "int4", "group_size": 32}
        outs[method] = compress.run({"calibration": CAL, "stages": [{"pass": method, "config": cfg}]}, tied,
                                    tmp_path / method)
    dense = compress.load(tied)
    ids = torch.randint(0, 400, (4, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = dense.model(ids).last_hidden_state.reshape(-1, 64).double()
    H = h.T @ h / h.shape[0]
    W = dense.lm_head.weight.detach().float()
    err = {m: relative_output_error(W, compress.load(o).lm_head.dequantized_weight(torch.float32), H)
           for m, o in outs.items()}
    assert err["gptq"] < err["rtn"], err


def test_refusals(tied: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    bert = make_bert(tmp_path / "bert")
    capsys.readouterr()
    code, _, err = run_cli(["rtn", str(bert), "--bits", "4", "--quantize-head", "int8", "-o", str(tmp_path / "b")],
                           monkeypatch, capsys)
    assert code == 2 and len(error_lines(err)) == 1 and "no LM head" in err, err
    first = tmp_path / "first"
    code, _, err = run_cli(["rtn", str(tied), "--bits", "8", "--quantize-head", "int8", "-o", str(first)],
                           monkeypatch, capsys)
    assert code == 0, err
    code, _, err = run_cli(["gptq", str(first), "--bits", "4", "--quantize-head", "int8", *SMOKE,
                            "-o", str(tmp_path / "again")], monkeypatch, capsys)
    assert code == 2 and len(error_lines(err)) == 1 and "compressed already" in err, err
    assert not (tmp_path / "again").exists()
