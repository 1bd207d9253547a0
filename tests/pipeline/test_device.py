"""``--device``: where a run computes, checked before any work; where its activations live.

No GPU here, so three CPU checks stand in for what a GPU run relies on:

* **Nothing is allocated implicitly.** With torch's default device set to ``meta`` every tensor
  made without an explicit device is a meta tensor, and the first one that meets real data
  fails (or a meta tensor reaches the writer, which fails). Every registered pass runs end to
  end that way and writes the same tensors as a normal run, so on ``--device cuda`` every
  block, statistic and runtime module follows its inputs onto the GPU and the host-side data
  (token ids, RNG draws) is host by intent.
* **Host offload is exact.** ``activations="host"`` keeps the calibration activations on the host
  and copies every batch to the compute device and back (a real copy on CPU too, so a pass that
  wrote into a batch in place would lose the write): the tensors equal the on-device run's.
* **Bad devices are refused** in one line, before any work: ``cuda`` without CUDA, ``cuda:7`` on
  a one-GPU machine (CUDA faked), an unknown name.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compress.checkpoint import CheckpointReader
from compress.device import offload_activations, resolve_device
from compress.errors import CompressError
from compress.pipeline.resume import Identity
from compress.recipe import parse_recipe
from compress.registry import all_passes
from compress.runner import run_recipe
from tests.conftest import make_llama, run_cli

CAL = {"protocol": "brown-128-smoke", "n_samples": 6, "seq_len": 32, "batch_size": 4}
# one configuration per registered pass (the test below fails when a pass has none)
PASS_CASES = {
    "rtn": {"bits": 4, "group_size": 32},
    "gptq": {"bits": 4, "group_size": 32},
    "gptq-actorder-mse": ("gptq", {"bits": 3, "group_size": 32, "act_order": True, "mse": True}),
    "gptq-baq": ("gptq", {"bits": 3, "group_size": 16, "allocate": "baq", "average_bits": 2.6, "scope": "model"}),
    "lowrank": {"ratio": 0.5},
    "slicegpt": {"sparsity": 0.25},
    "structprune": {"sparsity": 0.2},
    "nupes": {"bits": 3, "group_size": 32},
    "nupes-learn": ("nupes", {"bits": 3, "group_size": 32, "init": "gptq", "learn": True, "steps": 3,
                              "exponent": "channel"}),
    "svd_cluster": {"ratio": 0.8, "error": 0.9},
    "rco": {"budget": "6bits", "options": ["gptq:4,8"], "steps": 2, "windows": 2, "group_size": 32},
    "flatquant": {"bits": 4, "act_bits": 4, "kv_bits": 4, "epochs": 1},
}


def _cases() -> dict[str, tuple[str, dict]]:
    return {k: (v if isinstance(v, tuple) else (k, v)) for k, v in PASS_CASES.items()}


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama(tmp_path_factory.mktemp("device") / "dense", layers=2, tie=True, seed=5)


def _run(src: Path, out: Path, pass_name: str, config: dict, **kw: object) -> dict[str, torch.Tensor]:
    recipe = parse_recipe({"calibration": CAL, "stages": [{"pass": pass_name, "config": config}]})
    reader = CheckpointReader(run_recipe(recipe, src, out, cache=False, **kw))
    return {k: reader.get(k) for k in reader.keys()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_every_registered_pass_has_a_case() -> None:
    assert {p for p, _ in _cases().values()} >= set(all_passes())


@pytest.mark.parametrize("case", list(_cases()))
def test_no_implicit_allocation_on_the_default_device(case: str, src: Path, tmp_path: Path) -> None:
    name, config = _cases()[case]
    want = _run(src, tmp_path / "plain", name, config, device="cpu")
    torch.set_default_device("meta")
    try:
        got = _run(src, tmp_path / "meta", name, config, device="cpu")
    finally:
        torch.set_default_device(None)
    _same(got, want)


@pytest.mark.parametrize("case", ["gptq", "gptq-actorder-mse", "lowrank", "slicegpt", "structprune", "nupes-learn",
                                  "svd_cluster", "flatquant"])
def test_host_offloaded_activations_give_the_same_tensors(case: str, src: Path, tmp_path: Path) -> None:
    name, config = _cases()[case]
    on_device = _run(src, tmp_path / "d", name, config, device="cpu", activations="device")
    _same(_run(src, tmp_path / "h", name, config, device="cpu", activations="host"), on_device)


def test_offload_decision() -> None:
    cpu = torch.device("cpu")
    assert not offload_activations(1 << 40, cpu)  # the host is where activations go anyway
    assert offload_activations(1, cpu, "host")
    assert not offload_activations(1 << 40, torch.device("cuda"), "device")


def test_resolve_device_on_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    for bad, words in (("cuda", "no CUDA device"), ("cuda:1", "no CUDA device"), ("tpu", "unknown --device"),
                       ("cuda:x", "unknown --device")):
        with pytest.raises(CompressError, match=words):
            resolve_device(bad)


def test_resolve_device_with_one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(CompressError, match=r"has 1 CUDA device\(s\) \(cuda:0..cuda:0\)"):
        resolve_device("cuda:7")


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "gpu"])
def test_cli_refuses_a_device_it_cannot_use(device: str, src: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "o"
    code, _, err = run_cli(["gptq", str(src), "-o", str(out), "--device", device, "--protocol", "brown-128-smoke"],
                           monkeypatch, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--device" in lines[0], err
    assert not out.exists() and not out.with_name("o.partial").exists()


def test_a_resume_on_another_device_is_refused() -> None:
    here = Identity(input="a", recipe="r", stage=0, calibration=None, version="v", device="cuda")
    assert here.differences(dict(here.to_dict(), device="cpu")) == [
        "the partial run computed on another device (this one: cuda)"]
    assert here.differences(here.to_dict()) == []
    older = {k: v for k, v in here.to_dict().items() if k != "device"}  # written before --device existed
    assert Identity(**dict(older, device="cpu")).differences(older) == []
