"""`compress quantize --act-bits 4 --kv-bits 4 --transform flatquant` (and `compress flatquant`):
refusals before any work, a W4A4 KV4 output that loads, validates, evaluates and generates from
a code cache, the baselines of the same family, GPTQ weights, the dense fallback of a width
without a Kronecker form, and a diverging run that writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import compress
from compress.modules.flat_attention import KVQuantizer
from compress.modules.kv_cache import QuantizedKVCache
from compress.modules.transformed import TransformedInput
from tests.conftest import SMOKE, assert_refused, dir_hash, make_bert, make_llama, make_opt, run_cli

W4A4 = ["--bits", "4", "--act-bits", "4"]


def _quantize(src: Path, out: Path, args: list[str], monkeypatch: pytest.MonkeyPatch,
              capsys: pytest.CaptureFixture) -> str:
    code, _, err = run_cli(["quantize", str(src), "-o", str(out), *SMOKE, *args], monkeypatch, capsys)
    assert code == 0, err
    return err


BAD = [
    (["--act-bits", "6"], "act-bits"),
    (["--act-bits", "4", "--group-size", "64"], "per output channel"),
    (["--act-bits", "4", "--asym"], "symmetric"),
    (["--act-bits", "4", "--mse"], "lwc"),
    (["--act-bits", "4", "--transform", "rotate"], "transform"),
    (["--act-bits", "4", "--kv-bits", "5"], "kv-bits"),
    (["--act-bits", "4", "--epochs", "-1"], "epochs"),
    (["--act-bits", "4", "--target", "q_proj"], "every linear"),
]


@pytest.mark.parametrize("args,needle", BAD)
def test_bad_flatquant_options(args: list[str], needle: str, tiny_llama: Path, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    before = dir_hash(tiny_llama)
    out = tmp_path / "out"
    code, _, err = run_cli(["quantize", str(tiny_llama), "-o", str(out), *SMOKE, *args], monkeypatch, capsys)
    assert_refused(code, err, needle, tiny_llama, before, out)


@pytest.mark.parametrize("maker,needle", [(make_bert, "encoder"), (make_opt, "llama-family")])
def test_unsupported_families_are_refused(maker, needle: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    src = maker(tmp_path / "src")
    capsys.readouterr()  # the maker's progress bars
    before = dir_hash(src)
    out = tmp_path / "out"
    code, _, err = run_cli(["quantize", str(src), "-o", str(out), *SMOKE, *W4A4, "--kv-bits", "4"],
                           monkeypatch, capsys)
    assert_refused(code, err, needle, src, before, out)


def test_w4a4_kv4_loads_validates_evaluates_and_generates(tiny_llama: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "fq"
    err = _quantize(tiny_llama, out, [*W4A4, "--kv-bits", "4", "--transform", "flatquant", "--epochs", "2"],
                    monkeypatch, capsys)
    assert "compress.load only" in err
    model = compress.load(out)
    manifest = model.compress_manifest
    assert [t["kind"] for t in manifest["transforms"]] == ["flatquant-attention"]
    assert {e["kind"] for e in manifest["modules"].values()} == {"transformed-input"}
    assert {e["act_bits"] for e in manifest["modules"].values()} == {4}
    assert len(manifest["shared"]) == 4 * 3  # ln, ug, down, o per block
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, TransformedInput) and isinstance(layer.self_attn.kv_quant, KVQuantizer)
    assert layer.self_attn.kv_quant.k_transform is not None
    # the learned clip factors moved from their initial sigmoid(4)
    clips = [e["act_clip"][0] for e in manifest["modules"].values()]
    assert any(abs(c - torch.sigmoid(torch.tensor(4.0)).item()) > 1e-4 for c in clips)
    rep = json.loads((out / "reports" / "report.json").read_text())
    assert all(r["extra"]["block_mse_after"] < r["extra"]["block_mse_before"] for r in rep)
    assert (out / "reports" / "flatquant_loss.png").is_file()
    code, stdout, err = run_cli(["validate", str(out)], monkeypatch, capsys)
    assert code == 0 and "validation passed" in stdout + err, stdout + err
    code, _, err = run_cli(["eval", str(out), *SMOKE[:2], "--json", str(tmp_path / "e.json")], monkeypatch, capsys)
    assert code == 0, err
    ev = json.loads((tmp_path / "e.json").read_text())
    assert torch.isfinite(torch.tensor(ev["ppl"])) and ev["kl_mean"] > 0
    # generation from the code cache equals the uncached greedy argmax at every step
    ids = torch.randint(0, 400, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = QuantizedKVCache()
        gen = model.generate(ids, max_new_tokens=10, do_sample=False, past_key_values=cache)
        full = model(gen).logits
    assert torch.equal(full[0, 5:-1].argmax(-1), gen[0, 6:])
    assert cache.get_seq_length() == gen.shape[1] - 1 and cache.nbytes() > 0
    code, stdout, err = run_cli(["generate", str(out), "The jury said", "--max-new-tokens", "5"],
                                monkeypatch, capsys)
    assert code == 0, err


@pytest.mark.parametrize("transform", ["none", "hadamard", "smooth"])
def test_baselines_of_the_family_need_no_training(transform: str, tiny_llama: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / transform
    _quantize(tiny_llama, out, [*W4A4, "--kv-bits", "4", "--transform", transform], monkeypatch, capsys)
    model = compress.load(out)
    manifest = model.compress_manifest
    forms = {e["form"] for e in manifest["modules"].values()}
    assert forms == ({"identity"} if transform in ("none", "smooth") else {"kron", "kron-left"})
    rep = json.loads((out / "reports" / "report.json").read_text())
    assert all(r["extra"]["train_s"] == 0 for r in rep)
    kv = model.model.layers[0].self_attn.kv_quant
    assert (kv.k_transform is None) == (transform != "hadamard")
    code, stdout, err = run_cli(["validate", str(out)], monkeypatch, capsys)
    assert code == 0, stdout + err


def test_gptq_weights_and_8_bit_activations(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "gptq"
    _quantize(tiny_llama, out, ["--bits", "4", "--act-bits", "8", "--transform", "flatquant", "--epochs", "1",
                                "--weights", "gptq"], monkeypatch, capsys)
    model = compress.load(out)
    assert {e["act_bits"] for e in model.compress_manifest["modules"].values()} == {8}
    assert not model.compress_manifest["transforms"]  # a dense KV cache: the attention is unchanged
    code, stdout, err = run_cli(["validate", str(out)], monkeypatch, capsys)
    assert code == 0, stdout + err


def test_a_width_without_a_kronecker_form_gets_a_dense_transform(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    import transformers

    src = make_llama(tmp_path / "src", layers=1)
    cfg = transformers.AutoConfig.from_pretrained(src)
    cfg.intermediate_size = 97  # prime
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(src)
    capsys.readouterr()
    out = tmp_path / "out"
    err = _quantize(src, out, [*W4A4, "--transform", "flatquant", "--epochs", "1"], monkeypatch, capsys)
    assert "no Kronecker factorisation for down (97)" in err
    shared = compress.load(out).compress_manifest["shared"]
    assert shared["l0_down"]["tensors"]["left"]["shape"] == [97, 97] and "right" not in shared["l0_down"]["tensors"]


def test_divergence_names_the_block_and_writes_nothing(tiny_llama: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    from compress.passes import flatquant_block

    real = flatquant_block.FlatBlock.forward
    calls = {"n": 0}

    def poisoned(self, x, **kw):  # noqa: ANN001, ANN003, ANN202
        out = real(self, x, **kw)
        if torch.is_grad_enabled() and self.layer is not None:
            calls["n"] += 1
            if calls["n"] > 3:
                return out * float("nan")
        return out

    monkeypatch.setattr(flatquant_block.FlatBlock, "forward", poisoned)
    before = dir_hash(tiny_llama)
    out = tmp_path / "out"
    code, _, err = run_cli(["quantize", str(tiny_llama), "-o", str(out), *SMOKE, *W4A4, "--epochs", "2"],
                           monkeypatch, capsys)
    assert_refused(code, err, "diverged in block", tiny_llama, before, out)


def test_recipe_stage_runs_and_spells_its_defaults(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "r"
    code, _, err = run_cli(["flatquant", str(tiny_llama), "-o", str(out), *SMOKE, "--epochs", "1", "--kv-bits", "8"],
                           monkeypatch, capsys)
    assert code == 0, err
    recipe = (out / "recipe.yaml").read_text()
    for key in ("act_bits: 4", "kv_bits: 8", "transform: flatquant", "epochs: 1", "lr: 0.005", "weights: rtn"):
        assert key in recipe, recipe
    code, _, err = run_cli(["run", str(out / "recipe.yaml"), str(tiny_llama), "-o", str(tmp_path / "again")],
                           monkeypatch, capsys)
    assert code == 0, err
    a, b = compress.load(out), compress.load(tmp_path / "again")
    ids = torch.randint(0, 400, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)  # the same seed: the same model
