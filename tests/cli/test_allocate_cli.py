"""`compress allocate` (RCO): refusals before any work, an exactly met budget, the checkpoint built
from the database (loads, validates, matches the interpolated model at the chosen options), the
baselines from the same database, low-rank options, and the export grouped per width."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import compress
from tests.conftest import SMOKE, assert_refused, dir_hash, run_cli


def _allocate(src: Path, out: Path, args: list[str], monkeypatch: pytest.MonkeyPatch,
              capsys: pytest.CaptureFixture) -> dict:
    code, _, err = run_cli(["allocate", str(src), "-o", str(out), *SMOKE, "--steps", "8", *args], monkeypatch, capsys)
    assert code == 0, err
    return json.loads((out / "assignment.json").read_text())


CASES = [
    (["--budget", "1.5bits"], "outside what the options can spend"),
    (["--budget", "9bits"], "outside what the options can spend"),
    (["--budget", "1KB"], "outside what the options can spend"),
    (["--budget", "three"], "not a budget"),
    (["--options", "gptq:5"], "has no kernel"),
    (["--options", "prune:0.5"], "METHOD:V1"),
    (["--options", "lowrank:1.5"], "ratio"),
    (["--budget", "2.5bits", "--search", "uniform"], "search uniform"),
    (["--options", "lowrank:0.99"], "outside what the options can spend"),
]


@pytest.mark.parametrize("args,needle", CASES)
def test_bad_allocate_inputs(args: list[str], needle: str, tiny_llama: Path, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    before = dir_hash(tiny_llama)
    out = tmp_path / "out"
    code, _, err = run_cli(["allocate", str(tiny_llama), "-o", str(out), *SMOKE, *args], monkeypatch, capsys)
    assert_refused(code, err, needle, tiny_llama, before, out)


def test_rco_hits_the_budget_and_its_output_loads_and_validates(tiny_llama: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "rco"
    a = _allocate(tiny_llama, out, ["--budget", "3.2bits"], monkeypatch, capsys)
    # every weight count here is a multiple of 2048 out of 92160: 3.2 bits is reachable exactly
    assert a["exact"] and abs(a["realized_average_bits"] - 3.2) < 1e-12
    assert len(a["history"]) == 8 and max(h["cost_error"] for h in a["history"]) < 1e-9
    assert (out / "reports" / "assignment.png").is_file()
    model = compress.load(out)
    manifest = model.compress_manifest
    widths = {e["bits"] for e in manifest["modules"].values()}
    assert widths <= {2, 3, 4, 8}
    # fused siblings share one width
    for g in a["groups"]:
        bits = {manifest["modules"][f"model.layers.{g['layer']}.{n}"]["bits"] for n in g["names"]}
        assert len(bits) == 1 and bits == {int(g["option"][4:])}
    code, _, err = run_cli(["validate", str(out)], monkeypatch, capsys)
    assert code == 0, err
    ids = torch.randint(0, 200, (1, 16))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_an_unreachable_budget_takes_the_nearest_feasible_cost(tiny_llama: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    a = _allocate(tiny_llama, tmp_path / "o", ["--budget", "3.25bits", "--search", "sensitivity"], monkeypatch,
                  capsys)
    assert not a["exact"]  # 3.25 × 45 units of 2048 weights is not an integer
    assert abs(a["realized_average_bits"] - 3.25) <= 0.5 / 45 + 1e-12


def test_baselines_read_the_same_database(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    u = _allocate(tiny_llama, tmp_path / "u", ["--budget", "3bits", "--search", "uniform"], monkeypatch, capsys)
    assert {g["option"] for g in u["groups"]} == {"gptq3"}
    g = _allocate(tiny_llama, tmp_path / "g", ["--budget", "3.2bits", "--search", "greedy"], monkeypatch, capsys)
    assert g["realized_average_bits"] <= 3.2 + 1e-12
    s = _allocate(tiny_llama, tmp_path / "s", ["--budget", "3.2bits", "--search", "sensitivity"], monkeypatch,
                  capsys)
    assert s["exact"]
    # the exact knapsack on the database's errors is at least as good as the greedy on them
    assert sum(x["error"] for x in s["groups"]) <= sum(x["error"] for x in g["groups"]) + 1e-12


def test_byte_budget_with_lowrank_options(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    u = _allocate(tiny_llama, tmp_path / "u", ["--budget", "3bits", "--search", "uniform"], monkeypatch, capsys)
    out = tmp_path / "mixed"
    budget = u["realized_bytes"]
    a = _allocate(tiny_llama, out, ["--budget", f"{budget}B", "--options", "gptq:2,3,4,8",
                                    "--options", "lowrank:0.2,0.4"], monkeypatch, capsys)
    assert a["realized_bytes"] <= budget and abs(a["realized_bytes"] - budget) <= 0.01 * budget
    kinds = {e["kind"] for e in compress.load(out).compress_manifest["modules"].values()}
    assert kinds <= {"quant", "lowrank"}


def test_reference_assignment_reproduces_the_reference_model(tiny_llama: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    """The interpolated model at p = onehot(reference) is the 8-bit model built from the database."""
    from compress.passes import rco_objective

    out = tmp_path / "w8"
    a = _allocate(tiny_llama, out, ["--budget", "8bits", "--search", "uniform"], monkeypatch, capsys)
    built = compress.load(out)
    w8 = {n: m.dequantized_weight(torch.float32) for n, m in built.named_modules()
          if hasattr(m, "dequantized_weight")}
    groups = [[f"model.layers.{g['layer']}.{n}" for n in g["names"]] for g in a["groups"]]
    windows = torch.randint(0, 200, (2, 16))

    def candidates(name: str) -> list[torch.Tensor]:  # random others, the real 8-bit reference
        W = w8[name]
        return [W + torch.randn_like(W) * 0.01 for _ in range(3)] + [W]

    obj = rco_objective.build_objective(str(tiny_llama), groups, [3] * len(groups), candidates, windows,
                                        objective="kl", batch=2, device=torch.device("cpu"),
                                        delta_dtype=torch.bfloat16)
    p = torch.zeros(len(groups), 4, dtype=torch.float64)
    p[:, 3] = 1.0
    obj.mixture.p = p.float()
    from compress.passes.rco_objective import InterpolatedLinear

    for name, m in obj.model.named_modules():  # W(onehot(ref)) is the reference weight, bit for bit
        if isinstance(m, InterpolatedLinear):
            W = m.ref.clone()
            for j, k in enumerate(m.others):
                W.add_(m.deltas[j].float(), alpha=float(p[m.group, k]))
            assert torch.equal(W, w8[name]), name
    with torch.no_grad():  # the served quant kernels round differently from F.linear, in the last bits
        torch.testing.assert_close(obj.model(windows).logits, built(windows).logits, rtol=0, atol=1e-5)


def test_interpolated_gradient_matches_autograd() -> None:
    from compress.passes.rco_objective import InterpolatedLinear, Mixture

    torch.manual_seed(0)
    ref = torch.randn(5, 7)
    deltas = torch.randn(2, 5, 7)
    mix = Mixture()
    lin = InterpolatedLinear(ref, deltas, [0, 2], torch.randn(5), mix, 0)
    x = torch.randn(3, 4, 7, requires_grad=True)
    p = torch.rand(1, 3, requires_grad=True)
    mix.p = p
    y = lin(x)
    (y ** 2).sum().backward()
    gx, gp = x.grad.clone(), p.grad.clone()
    x2 = x.detach().clone().requires_grad_(True)
    p2 = p.detach().clone().requires_grad_(True)
    W = ref + p2[0, 0] * deltas[0] + p2[0, 2] * deltas[1]
    (torch.nn.functional.linear(x2, W, lin.bias) ** 2).sum().backward()
    torch.testing.assert_close(gx, x2.grad)
    torch.testing.assert_close(gp, p2.grad)
