"""``compress validate`` / ``bench`` / ``generate``: help, happy paths on a tiny quantised model,
a deliberately broken kernel that validate must catch (exit 1), and bad inputs (one line, exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import error_lines, run_cli


pytestmark = pytest.mark.native_kernels  # the default CPU path, checked against the twin

@pytest.fixture(scope="module")
def tiny_w4(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RTN W4 g32 asymmetric (zero points exercised) of the tiny LLaMA."""
    import compress

    cfg = {"bits": 4, "group_size": 32, "symmetric": False}
    return compress.run({"stages": [{"pass": "rtn", "config": cfg}]}, tiny_llama,
                        tmp_path_factory.mktemp("serve") / "w4")


def _one_line_error(code: int, err: str, needle: str) -> None:
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert needle.lower() in err.lower(), err


@pytest.mark.parametrize("cmd", ["validate", "bench", "generate"])
def test_help(cmd: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli([cmd, "--help"], monkeypatch, capsys)
    assert code == 0 and "Usage" in out


# -- validate ------------------------------------------------------------------------------------
def test_validate_passes(tiny_w4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture) -> None:
    js = tmp_path / "v.json"
    code, out, err = run_cli(["validate", str(tiny_w4), "--m", "1", "--m", "5", "--m", "300", "--json", str(js)],
                             monkeypatch, capsys)
    assert code == 0, err
    assert "validation passed" in err and "by kind" in out and "FAIL" not in out
    rep = json.loads(js.read_text())
    paths = {c["path"] for c in rep["checks"]}
    op = "native int4 (aten._weight_int4pack_mm_for_cpu, bf16 activations"
    assert paths == {f"{op})", f"{op}, q_proj/k_proj/v_proj fused)", f"{op}, gate_proj/up_proj fused)",  # M = 1, 5
                     "native int4 (decoded to bf16 per call + bf16 GEMM, ≥ 64 rows)"}, paths  # M = 300
    assert rep["ok"] and len(rep["checks"]) == 21 * 3 * 2  # modules × M × (fp32, bf16)
    assert {c["kind"] for c in rep["checks"]} == {"quant"}
    assert all(c["tolerance"] >= 1e-2 for c in rep["checks"])  # bf16 inside the op: bf16's tolerance
    # the exact fp32 twin, which the native path is checked against, holds to fp32's
    monkeypatch.setenv("COMPRESS_KERNELS", "torch")
    code, out, err = run_cli(["validate", str(tiny_w4), "--m", "1", "--m", "5", "--m", "300", "--json", str(js)],
                             monkeypatch, capsys)
    rep = json.loads(js.read_text())
    assert code == 0 and rep["ok"], err
    fp32 = {c["path"] for c in rep["checks"] if c["dtype"] == "fp32"}
    assert fp32 == {"torch twin · planes", "torch twin · dequant+matmul"}
    assert max(c["rel_err"] for c in rep["checks"] if c["dtype"] == "fp32") < 1e-6


def _break_kernel(monkeypatch: pytest.MonkeyPatch, only_rows: int | None = None) -> None:
    """Serve QuantLinear through a kernel whose scales are 0.2% off (optionally only at M rows):
    the stored tensors are intact, so only a kernel-vs-reference comparison can see it."""
    import compress.modules.quant_linear as ql

    real = ql.quant_matmul

    def broken(x, packed, scale, zero, **kw):  # noqa: ANN001, ANN003, ANN202
        rows = x.numel() // x.shape[-1]
        if only_rows is None or rows == only_rows:
            scale = scale * 1.002
        return real(x, packed, scale, zero, **kw)

    monkeypatch.setattr(ql, "quant_matmul", broken)


def test_validate_fails_on_a_broken_native_kernel(tiny_w4: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    """The default CPU path (torch's native ops) is held to bf16's tolerance: 5 % off fails."""
    import compress.kernels.native_cpu as nc

    real = nc.native_linear
    monkeypatch.setattr(nc, "native_linear", lambda x, w, b: real(x, w, b) * 1.05)
    code, out, err = run_cli(["validate", str(tiny_w4), "--m", "1", "--m", "17"], monkeypatch, capsys)
    assert code == 1 and "validation failed" in err and "FAIL" in out


def test_validate_fails_on_a_broken_kernel(tiny_w4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    """The exact twin (COMPRESS_KERNELS=torch) is held to fp32's: 0.2 % off fails."""
    monkeypatch.setenv("COMPRESS_KERNELS", "torch")
    _break_kernel(monkeypatch)
    code, out, err = run_cli(["validate", str(tiny_w4), "--m", "1", "--m", "17"], monkeypatch, capsys)
    assert code == 1 and "validation failed" in err and "FAIL" in out
    js = tmp_path / "v.json"
    monkeypatch.undo()
    monkeypatch.setenv("COMPRESS_KERNELS", "torch")
    _break_kernel(monkeypatch, only_rows=1)  # a bug in the decode path alone
    code, _, _ = run_cli(["validate", str(tiny_w4), "--m", "1", "--m", "17", "--json", str(js)], monkeypatch, capsys)
    rep = json.loads(js.read_text())
    assert code == 1 and not rep["ok"]
    assert {c["m"] for c in rep["checks"] if not c["ok"]} == {1}
    assert all(c["ok"] for c in rep["checks"] if c["m"] == 17)


def test_validate_fails_when_a_module_has_no_reference(tiny_w4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    from compress.modules.protocol import DecodedWeightCache  # QuantLinear's reference_forward

    monkeypatch.delattr(DecodedWeightCache, "reference_forward")
    js = tmp_path / "v.json"
    code, out, err = run_cli(["validate", str(tiny_w4), "--m", "1", "--json", str(js)], monkeypatch, capsys)
    assert code == 1 and "FAIL" in out and "without a reference" in err
    rep = json.loads(js.read_text())
    assert not rep["checks"] and len(rep["unvalidated"]) == 21 and set(rep["unvalidated"].values()) == {"quant"}


@pytest.mark.parametrize("args,needle", [
    (["--m", "0"], "bad --m"),
    (["--dtype", "int8"], "unknown --dtype"),
    (["--tolerance", "fast"], "bad --tolerance"),
])
def test_validate_bad_options(tiny_w4: Path, args: list[str], needle: str, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(["validate", str(tiny_w4), *args], monkeypatch, capsys)
    _one_line_error(code, err, needle)


def test_validate_bad_models(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(["validate", str(tiny_llama)], monkeypatch, capsys)
    _one_line_error(code, err, "no compressed modules")
    code, _, err = run_cli(["validate", str(tmp_path / "nope")], monkeypatch, capsys)
    _one_line_error(code, err, "does not exist")


# -- bench ----------------------------------------------------------------------------------------
def test_bench_compressed_vs_dense(tiny_w4: Path, tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture) -> None:
    js = tmp_path / "b.json"
    code, out, err = run_cli(["bench", str(tiny_w4), "--against", str(tiny_llama), "--seq", "8", "--decode-tokens",
                              "2", "--prompt", "4", "--repeats", "1", "--in-process", "--json", str(js)],
                             monkeypatch, capsys)
    assert code == 0, err
    assert "end to end" in out and "per layer" in out and "CPU, torch twins" in out
    rep = json.loads(js.read_text())
    assert [(p["phase"], p["tokens"]) for p in rep["phases"]] == [("prefill", 8), ("decode", 2)]
    for p in rep["phases"]:
        c, d = p["compressed"], p["dense"]
        assert c["latency_s"] > 0 and d["latency_s"] > 0
        assert p["latency_ratio"] == pytest.approx(c["latency_s"] / d["latency_s"])
        assert c["peak_bytes"] >= c["loaded_bytes"] > 0 and c["weight_bytes"] < d["weight_bytes"]
    assert len(rep["layers"]) == 3 * 2 and all(r["dense_s"] and r["compressed_s"] for r in rep["layers"])
    assert rep["against"] == str(tiny_llama) and "in-process" in rep["memory_method"]
    # the roofline: weight bytes per step (a tied head reads the whole table) against a copy in the same run
    dec = rep["phases"][1]
    assert rep["copy_bandwidth_Bps"] > 1e8
    assert dec["dense"]["bytes_per_step"] == dec["dense"]["weight_bytes"]  # tiny_llama's head is tied
    assert sum(dec["compressed"]["paths"].values()) == 3 * 7 and "roofline (compressed)" in out


def test_bench_child_process(tiny_w4: Path, tiny_llama: Path) -> None:
    """The default isolated mode (one fresh process per model and phase, peak RSS from VmHWM),
    with the dense source taken from the manifest's origin."""
    from compress.bench import run_bench

    rep = run_bench(tiny_w4, seqs=[8], decode_tokens=0, repeats=1, device="cpu")
    (phase,) = rep.phases
    c, d = phase["compressed"], phase["dense"]
    assert rep.against == str(tiny_llama) and phase["latency_ratio"] == pytest.approx(c["latency_s"] / d["latency_s"])
    for r in (c, d):
        assert r["peak_bytes"] >= r["loaded_bytes"] > 50 * 2**20  # a fresh process with torch loaded
    assert "fresh process" in rep.memory_method and len(rep.layers) == 3


@pytest.mark.parametrize("args,needle", [
    (["--seq", "0"], "must be positive"),
    (["--seq", "100000"], "context"),
    (["--seq", "8", "--against", "/nonexistent/dense"], "does not exist"),
    (["--device", "tpu"], "unknown --device"),
])
def test_bench_bad_inputs(tiny_w4: Path, args: list[str], needle: str, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(["bench", str(tiny_w4), "--repeats", "1", *args], monkeypatch, capsys)
    _one_line_error(code, err, needle)


def test_bench_cuda_without_gpu(tiny_w4: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, _, err = run_cli(["bench", str(tiny_w4), "--device", "cuda"], monkeypatch, capsys)
    _one_line_error(code, err, "no CUDA device")


# -- generate -------------------------------------------------------------------------------------
def test_generate_greedy_and_sampled(tiny_w4: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture) -> None:
    args = ["generate", str(tiny_w4), "The jury said", "--max-new-tokens", "6"]
    code, first, err = run_cli(args, monkeypatch, capsys)
    assert code == 0 and first.strip() and "served by CPU, torch twins" in err, err
    assert run_cli(args, monkeypatch, capsys)[1] == first  # greedy is deterministic
    sampled = [run_cli(args + ["--sample", "--seed", "7", "--temperature", "1.5"], monkeypatch, capsys)[1]
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # the seed fixes the draw


def test_generate_matches_a_manual_greedy_loop(tiny_w4: Path) -> None:
    from transformers import AutoTokenizer

    from compress import load
    from compress.generate import generate

    res = generate(tiny_w4, "The jury said", max_new_tokens=5)
    tok = AutoTokenizer.from_pretrained(tiny_w4)
    model = load(tiny_w4)
    ids = tok("The jury said", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(5):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)  # full recompute
    assert res.new_tokens == 5 and res.text == tok.decode(ids[0, -5:], skip_special_tokens=True)


def test_generate_says_when_nothing_is_compressed(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_cli(["generate", str(tiny_llama), "The jury", "--max-new-tokens", "2"], monkeypatch, capsys)
    assert code == 0 and out.strip() and "dense torch (no compressed modules)" in err, err


@pytest.mark.parametrize("args,needle", [
    (["The jury", "--chat"], "no chat template"),
    (["   "], "prompt is empty"),
    (["The jury", "--max-new-tokens", "0"], "at least 1"),
    (["The jury", "--sample", "--temperature", "0"], "temperature"),
])
def test_generate_bad_inputs(tiny_w4: Path, args: list[str], needle: str, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(["generate", str(tiny_w4), *args], monkeypatch, capsys)
    _one_line_error(code, err, needle)


def test_generate_refuses_an_encoder(tiny_bert: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(["generate", str(tiny_bert), "hello"], monkeypatch, capsys)
    _one_line_error(code, err, "not a causal language model")
