"""Our pack-quantized outputs against compressed-tensors' own code.

* packing: ``compress.kernels.packing`` vs ``compressed_tensors``' ``pack_to_int32`` / ``unpack_from_int32``,
  byte for byte, for every bit width;
* the config we write parses as compressed-tensors ``QuantizationConfig`` and says what was done;
* the matrix: bits × symmetry × group (32, 64, per channel, ragged) × act-order on a tiny LLaMA:
  every output that advertises compressed-tensors loads in plain
  ``transformers.AutoModelForCausalLM.from_pretrained`` with logits equal to ``compress.load``'s
  within 1e-5 relative; every output that cannot (a ragged last group; asymmetric zero points,
  which transformers 5 + compressed-tensors 0.20 allocate unpacked) advertises nothing and says
  why — and a canary checks that transformers still refuses the packed zero points, so the
  refusal is lifted when upstream is fixed;
* checkpoints written in the format-version-1 layout (3-bit codes ten to a word) still load.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

import compress
from compress.kernels.packing import pack_int32, unpack_int32
from tests.conftest import brown_lines, exact_kernels, train_tokenizer

ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")

BITS = (2, 3, 4, 8)
HIDDEN, FFN = 128, 256  # 32 and 64 divide both; 48 leaves a ragged last group in every linear
GROUPS = {"g32": 32, "g64": 64, "channel": 0, "ragged48": 48}
SMOKE = {"protocol": "brown-128-smoke", "batch_size": 4}  # "data" added by the fixture


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 31), (5, 32), (4, 33), (7, 100), (37, 300), (2, 1000)])
@pytest.mark.parametrize("dim", [0, 1])
def test_packing_is_byte_identical_to_compressed_tensors(bits: int, shape: tuple[int, int], dim: int) -> None:
    gen = torch.Generator().manual_seed(bits * 1000 + shape[1])
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), shape, generator=gen, dtype=torch.int8)
    ours = pack_int32(codes, bits, dim=dim)
    theirs = ct_helpers.pack_to_int32(codes, bits, packed_dim=dim)
    assert ours.dtype == theirs.dtype == torch.int32 and ours.shape == theirs.shape
    assert ours.numpy().tobytes() == theirs.numpy().tobytes()
    assert torch.equal(unpack_int32(theirs, bits, shape[dim], dim=dim), codes)
    assert torch.equal(ct_helpers.unpack_from_int32(ours, bits, torch.Size(shape), packed_dim=dim), codes)


def _tiny(path: Path) -> Path:
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    train_tokenizer(path)
    cfg = transformers.LlamaConfig(vocab_size=400, hidden_size=HIDDEN, intermediate_size=FFN,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def interop_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("interop")
    text = root / "calib.txt"  # a short corpus: the matrix runs 64 calibrations
    text.write_text("\n".join(brown_lines(1500)) + "\n")
    SMOKE["data"] = str(text)
    return _tiny(root / "llama")


def _ids() -> torch.Tensor:
    return torch.randint(0, 400, (2, 40), generator=torch.Generator().manual_seed(0))


def _hf_logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(_ids()).logits


def _ours_logits(path: Path) -> torch.Tensor:
    with torch.no_grad(), exact_kernels():  # fp32 twin: the comparison is held to 1e-5
        return compress.load(path)(_ids()).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


CELLS = list(itertools.product(BITS, (True, False), GROUPS, (True, False)))


@pytest.mark.parametrize(("bits", "sym", "group", "act_order"), CELLS,
                         ids=[f"w{b}-{'sym' if s else 'asym'}-{g}-{'ao' if a else 'noao'}" for b, s, g, a in CELLS])
def test_matrix_loads_in_transformers_or_says_why(interop_llama: Path, tmp_path: Path, bits: int, sym: bool,
                                                  group: str, act_order: bool) -> None:
    cfg = {"bits": bits, "symmetric": sym, "group_size": GROUPS[group], "act_order": act_order, "mse": False}
    out = compress.run({"calibration": SMOKE, "stages": [{"pass": "gptq", "config": cfg}]}, interop_llama,
                       tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    export = json.loads((out / "compression.json").read_text())["export"]
    if not sym or group == "ragged48":
        assert "quantization_config" not in config
        assert export["compressed_tensors"] is False
        assert ("asymmetric zero points" in export["reason"]) if not sym else \
            ("ragged last group" in export["reason"] and "group size 48" in export["reason"])
        assert torch.isfinite(_ours_logits(out)).all()
        return
    assert export == {"compressed_tensors": True, "reason": None}
    qc = config["quantization_config"]
    _check_parses_as_compressed_tensors(qc, bits, sym, GROUPS[group], act_order)
    theirs, ours = _hf_logits(out), _ours_logits(out)
    assert torch.isfinite(ours).all()
    assert _rel(theirs, ours) <= 1e-5, _rel(theirs, ours)


def _val(x: object) -> str:
    """An enum member's value, or the string compressed-tensors kept (it stores enum values)."""
    return str(getattr(x, "value", x))


def _check_parses_as_compressed_tensors(qc: dict, bits: int, sym: bool, group: int, act_order: bool) -> None:
    """compressed-tensors' own config model reads what we wrote and it says what we did."""
    from compressed_tensors.quantization import QuantizationConfig

    parsed = QuantizationConfig.model_validate(qc)
    (scheme,) = parsed.config_groups.values()
    w = scheme.weights
    assert scheme.targets == ["Linear"] and "lm_head" in parsed.ignore
    assert w.num_bits == bits and w.symmetric == sym
    assert (_val(w.strategy), w.group_size) == (("group", group) if group else ("channel", None))
    assert (w.actorder is not None) == act_order and (not act_order or _val(w.actorder) == "weight")
    assert w.observer == "minmax"


def test_canary_transformers_still_refuses_packed_asymmetric_zero_points(interop_llama: Path,
                                                                         tmp_path: Path) -> None:
    """If this starts failing, upstream loads packed zero points: lift the asymmetric refusal in
    ``compress.provenance.ecosystem_refusal`` and let the matrix compare the logits."""
    base = {"bits": 4, "group_size": 32, "mse": False}
    sym = compress.run({"stages": [{"pass": "rtn", "config": {**base, "symmetric": True}}]}, interop_llama,
                       tmp_path / "sym")
    asym = compress.run({"stages": [{"pass": "rtn", "config": {**base, "symmetric": False}}]}, interop_llama,
                        tmp_path / "asym")
    config = json.loads((sym / "config.json").read_text())
    for g in config["quantization_config"]["config_groups"].values():
        g["weights"]["symmetric"] = False
    (asym / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="mismatch"):
        _hf_logits(asym)


def test_config_records_mse_observer(interop_llama: Path, tmp_path: Path) -> None:
    out = compress.run({"calibration": SMOKE, "stages": [{"pass": "gptq", "config": {"bits": 4, "group_size": 32}}]},
                       interop_llama, tmp_path / "out")
    from compressed_tensors.quantization import QuantizationConfig

    (scheme,) = QuantizationConfig.model_validate(
        json.loads((out / "config.json").read_text())["quantization_config"]).config_groups.values()
    assert scheme.weights.observer == "mse" and _val(scheme.weights.actorder) == "weight"


def test_rtn_default_group_is_auto_and_loadable(interop_llama: Path, tmp_path: Path) -> None:
    out = compress.run({"stages": [{"pass": "rtn", "config": {"bits": 4}}]}, interop_llama, tmp_path / "out")
    manifest = json.loads((out / "compression.json").read_text())
    assert manifest["notes"]["group_size"] == {"requested": "auto", "group_size": 128, "ragged": []}
    assert {e["group_size"] for e in manifest["modules"].values()} == {128}
    assert _rel(_hf_logits(out), _ours_logits(out)) <= 1e-5


def test_sliced_output_advertises_nothing(interop_llama: Path, tmp_path: Path) -> None:
    rec = {"calibration": SMOKE, "stages": [{"pass": "slicegpt", "config": {"sparsity": 0.25}},
                                            {"pass": "gptq", "config": {"bits": 4, "group_size": 32}}]}
    out = compress.run(rec, interop_llama, tmp_path / "out")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    export = json.loads((out / "compression.json").read_text())["export"]
    assert export["compressed_tensors"] is False and "shapes were changed" in export["reason"]


# -- format version 1 (3-bit codes ten to a word) -------------------------------------------
def _legacy_pack(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The format-version-1 layout, written out plainly: 32 // bits codes per word, low first."""
    f = 32 // bits
    u = codes.to(torch.int64) + (1 << (bits - 1))
    u = u.t() if dim == 0 else u
    u = torch.nn.functional.pad(u, (0, math.ceil(u.shape[1] / f) * f - u.shape[1]))
    words = sum(u[:, j::f] << (j * bits) for j in range(f))
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.t().contiguous() if dim == 0 else words


@pytest.mark.parametrize("sym", [True, False])
def test_format_v1_3bit_checkpoint_still_loads(interop_llama: Path, tmp_path: Path, sym: bool) -> None:
    from safetensors.torch import load_file, save_file

    cfg = {"bits": 3, "group_size": 32, "symmetric": sym}
    out = compress.run({"stages": [{"pass": "rtn", "config": cfg}]}, interop_llama, tmp_path / "out")
    expected = _ours_logits(out)
    manifest = json.loads((out / "compression.json").read_text())
    (shard,) = out.glob("*.safetensors")
    tensors = load_file(shard)
    for name, e in manifest["modules"].items():
        w = tensors[f"{name}.weight_packed"]
        tensors[f"{name}.weight_packed"] = _legacy_pack(unpack_int32(w, 3, e["in_features"]), 3, dim=1)
        if not sym:
            z = tensors[f"{name}.weight_zero_point"]
            tensors[f"{name}.weight_zero_point"] = _legacy_pack(unpack_int32(z, 3, e["out_features"], dim=0), 3, 0)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    manifest["format_version"] = 1
    for e in manifest["modules"].values():  # what version 1 wrote: no act_order / observer keys
        e.pop("act_order"), e.pop("observer")
    (out / "compression.json").write_text(json.dumps(manifest))
    assert torch.equal(_ours_logits(out), expected)


def test_future_format_version_is_refused(interop_llama: Path, tmp_path: Path) -> None:
    from compress.errors import CompressError

    out = compress.run({"stages": [{"pass": "rtn", "config": {"bits": 4}}]}, interop_llama, tmp_path / "out")
    manifest = json.loads((out / "compression.json").read_text())
    manifest["format_version"] = 99
    (out / "compression.json").write_text(json.dumps(manifest))
    with pytest.raises(CompressError, match="format version 99"):
        compress.load(out)


def test_unknown_module_kind_is_refused(interop_llama: Path, tmp_path: Path) -> None:
    from compress.errors import CompressError

    out = compress.run({"stages": [{"pass": "rtn", "config": {"bits": 4}}]}, interop_llama, tmp_path / "out")
    manifest = json.loads((out / "compression.json").read_text())
    name = next(iter(manifest["modules"]))
    manifest["modules"][name]["kind"] = "hologram"
    (out / "compression.json").write_text(json.dumps(manifest))
    with pytest.raises(CompressError, match="unknown module kind 'hologram'"):
        compress.load(out)


def test_rco_mixed_widths_load_in_transformers_grouped_per_width(interop_llama: Path, tmp_path: Path) -> None:
    """An RCO assignment over 2/4/8 bits exports one config group per width, fused siblings in one
    group, and plain transformers + compressed-tensors computes what compress.load does."""
    from compressed_tensors.quantization import QuantizationConfig

    cfg = {"budget": "4.5bits", "options": ["gptq:2,4,8"], "search": "sensitivity", "group_size": 32}
    out = compress.run({"calibration": SMOKE, "stages": [{"pass": "rco", "config": cfg}]}, interop_llama,
                       tmp_path / "out")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    widths = {s.weights.num_bits for s in parsed.config_groups.values()}
    assert len(widths) == len(parsed.config_groups) >= 2
    named = {t: s.weights.num_bits for s in parsed.config_groups.values() for t in s.targets if t != "Linear"}
    default = next(s.weights.num_bits for s in parsed.config_groups.values() if s.targets == ["Linear"])
    for i in range(2):  # the fixture's two blocks
        for prefix, fused in (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj"))):
            bits = {named.get(f"model.layers.{i}.{prefix}.{n}", default) for n in fused}
            assert len(bits) == 1, (i, fused, bits)
    theirs, ours = _hf_logits(out), _ours_logits(out)
    assert _rel(theirs, ours) <= 1e-5, _rel(theirs, ours)


@pytest.mark.parametrize("head", ["int8", "int4"])
def test_quantized_head_with_dense_embedding_loads_in_transformers(interop_llama: Path, tmp_path: Path,
                                                                   head: str) -> None:
    """``--quantize-head`` with ``--dense-embedding`` on a tied model: the head is an ordinary
    compressed-tensors linear (int8 per channel in its own group, or int4 in the blocks' group),
    the table stays dense and untied, and transformers computes what compress.load does."""
    from compressed_tensors.quantization import QuantizationConfig

    cfg = {"bits": 4, "group_size": 32, "quantize_head": head, "dense_embedding": True}
    out = compress.run({"calibration": SMOKE, "stages": [{"pass": "gptq", "config": cfg}]}, interop_llama,
                       tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    parsed = QuantizationConfig.model_validate(config["quantization_config"])
    assert "lm_head" not in parsed.ignore
    if head == "int8":
        group = next(s for s in parsed.config_groups.values() if "lm_head" in s.targets)
        assert group.weights.num_bits == 8 and group.weights.strategy == "channel"
    theirs, ours = _hf_logits(out), _ours_logits(out)
    assert _rel(theirs, ours) <= 1e-5, _rel(theirs, ours)


def test_shared_head_codes_advertise_nothing(interop_llama: Path, tmp_path: Path) -> None:
    """A tied head quantised with shared codes (the default) has no dense table transformers
    could tie to: config.json advertises nothing and the manifest says why."""
    cfg = {"bits": 4, "group_size": 32, "quantize_head": "int8"}
    out = compress.run({"stages": [{"pass": "rtn", "config": cfg}]}, interop_llama, tmp_path / "out")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    reason = json.loads((out / "compression.json").read_text())["export"]["reason"]
    assert "quant-tied" in reason and "--dense-embedding" in reason
