"""``compress.load(..., device_map=...)``: compressed models placed by ``accelerate`` (CPU and
disk here) compute exactly what the plain load computes, for every runtime module kind: RTN
QuantLinear (tied head), low-rank (and FlashSVD), SliceGPT (sliced blocks, sliced embedding,
projected final norm) and the shared-tensor / mixed-width kinds of ``tests/pipeline/share_pass``.
Offloaded blocks really are offloaded (their codes too), the shared holder stays put, a tied
head stays tied, and bad maps are refused in one line; the CLI takes ``--device-map``."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import compress
from compress.errors import CompressError
from compress.modules.kinds import SHARED_PREFIX
from compress.recipe import parse_recipe
from compress.runner import run_recipe
from tests.conftest import error_lines, make_llama
from tests.pipeline import share_pass

CAL = {"protocol": "brown-128-smoke", "batch_size": 4}
RECIPES = {
    "rtn": {"stages": [{"pass": "rtn", "config": {"bits": 4, "group_size": 16}}]},
    "lowrank": {"stages": [{"pass": "lowrank", "config": {"ratio": 0.5, "whiten": False}}]},
    "slicegpt": {"calibration": CAL, "stages": [
        {"pass": "slicegpt", "config": {"sparsity": 0.25, "embedding_sparsity": 0.25}}]},
    "shared": {"stages": [{"pass": "test-share", "config": {"rank": 8}}]},  # mixed widths + shared tensors
}
KINDS = list(RECIPES)
IDS = torch.arange(1, 49).reshape(2, 24) * 13 % 400


@pytest.fixture(scope="module")
def outs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    from compress.registry import PASSES

    root = tmp_path_factory.mktemp("devmap")
    src = make_llama(root / "llama", layers=3, tie=True)
    share_pass.register()
    try:
        yield {k: run_recipe(parse_recipe(r), src, root / k) for k, r in RECIPES.items()}
    finally:
        PASSES.pop("test-share", None)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def _placed(dmap: dict, name: str) -> object:
    """The device of the most specific map entry covering ``name``."""
    keys = [k for k in dmap if k == "" or name == k or name.startswith(k + ".")]
    return dmap[max(keys, key=len)]


def _disk_map(model: torch.nn.Module) -> dict[str, str]:
    """Blocks 0 and 2 and the final norm on disk, everything else in CPU memory."""
    a = model.compress_adapter
    base, _, leaf = a.layers.rpartition(".")
    dmap = {f"{base}.{n}": "cpu" for n, _ in model.get_submodule(base).named_children() if n != leaf}
    dmap |= {f"{a.layers}.{i}": "disk" if i % 2 == 0 else "cpu" for i in range(len(model.get_submodule(a.layers)))}
    dmap[a.final_norm] = "disk"
    dmap |= {n: "cpu" for n, _ in model.named_children() if n not in (base, SHARED_PREFIX)}
    return dmap


def _stored(module: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters and persistent buffers (what a checkpoint stores)."""
    return list(module.state_dict(keep_vars=True).values())


def _cap(sizes: dict[str, int], adapter) -> int:  # noqa: ANN001
    """CPU bytes for the embedding table and about one block (accelerate keeps room for the
    largest block, to load disk blocks back into)."""
    return sizes[adapter.token_embedding] + max(sizes[f"{adapter.layers}.{i}"] for i in range(3)) + 1024


def _tied(model: torch.nn.Module) -> bool:
    a = model.compress_adapter
    return model.get_submodule(a.head).weight is model.get_submodule(a.token_embedding).weight


@pytest.mark.parametrize("kind", KINDS)
def test_auto_on_cpu_is_the_plain_load(kind: str, outs: dict[str, Path]) -> None:
    ref = compress.load(outs[kind])
    model = compress.load(outs[kind], device_map="auto")
    assert torch.equal(_logits(model), _logits(ref))
    assert set(model.hf_device_map.values()) == {"cpu"}
    assert model.compress_manifest == ref.compress_manifest and model.compress_adapter is ref.compress_adapter


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_on_disk_compute_the_same(kind: str, outs: dict[str, Path]) -> None:
    """An explicit dict sends blocks 0 and 2 (and the final norm) to disk: their tensors, the
    quantised codes among them, are on meta between forwards, and the logits match (twice)."""
    ref = _logits(compress.load(outs[kind]))
    model = compress.load(outs[kind])  # only to build the map from its module names
    dmap = _disk_map(model)
    model = compress.load(outs[kind], device_map=dmap)
    a = model.compress_adapter
    assert all(t.is_meta for t in _stored(model.get_submodule(f"{a.layers}.0")))
    assert not any(t.is_meta for t in _stored(model.get_submodule(f"{a.layers}.1")))
    assert torch.allclose(_logits(model), ref, atol=1e-6, rtol=0)
    assert torch.allclose(_logits(model), ref, atol=1e-6, rtol=0)  # the hooks load and drop again
    assert all(t.is_meta for t in _stored(model.get_submodule(f"{a.layers}.2")))
    assert model.hf_device_map == {**dmap, **({SHARED_PREFIX: "cpu"} if kind == "shared" else {})}


@pytest.mark.parametrize("kind", KINDS)
def test_max_memory_sends_blocks_to_disk(kind: str, outs: dict[str, Path], tmp_path: Path) -> None:
    from accelerate.utils import compute_module_sizes

    ref_model = compress.load(outs[kind])
    ref = _logits(ref_model)
    a = ref_model.compress_adapter
    sizes = compute_module_sizes(ref_model)
    cap = _cap(sizes, a)
    model = compress.load(outs[kind], device_map="auto", max_memory={"cpu": cap}, offload_folder=tmp_path / "off")
    dmap = model.hf_device_map
    assert any(_placed(dmap, f"{a.layers}.{i}") == "disk" for i in range(3)), dmap
    folder = Path(model.compress_offload_folder)
    assert folder.parent == tmp_path / "off" and (folder / "index.json").is_file()
    assert torch.allclose(_logits(model), ref, atol=1e-6, rtol=0)
    del model
    gc.collect()
    assert not folder.exists()  # the offloaded copy lives as long as the model


def test_the_shared_holder_is_pinned_to_the_main_device(outs: dict[str, Path]) -> None:
    """Modules of every block read the holder without calling it: a map that leaves it out gets
    it on the main device (its tensors real); a map that offloads it is refused."""
    model = compress.load(outs["shared"])
    dmap = _disk_map(model)
    placed = compress.load(outs["shared"], device_map=dmap)
    assert placed.hf_device_map[SHARED_PREFIX] == "cpu"
    assert not any(t.is_meta for t in _stored(getattr(placed, SHARED_PREFIX)))
    with pytest.raises(CompressError, match="offloads compress_shared") as info:
        compress.load(outs["shared"], device_map={**dmap, SHARED_PREFIX: "disk"})
    assert "\n" not in str(info.value)
    whole = compress.load(outs["shared"], device_map={"": "disk"})  # the holder still stays in memory
    assert whole.hf_device_map[SHARED_PREFIX] == "cpu"
    assert torch.allclose(_logits(whole), _logits(model), atol=1e-6, rtol=0)


def test_a_dict_may_leave_out_modules_that_store_nothing(outs: dict[str, Path]) -> None:
    """RoPE's frequencies are never stored, so a map need not name ``model.rotary_emb``: it is
    added on the main device (where the hooks run the blocks)."""
    dmap = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    model = compress.load(outs["rtn"], device_map=dmap)
    assert model.hf_device_map == {**dmap, "model.rotary_emb": "cpu"}
    assert torch.equal(_logits(model), _logits(compress.load(outs["rtn"])))


def test_flashsvd_blocks_on_disk(outs: dict[str, Path]) -> None:
    """A fused block reads its linears' factors without calling them: it is preloaded whole."""
    from compress.modules.flashsvd import is_fused

    ref = _logits(compress.load(outs["lowrank"], flashsvd=True))
    model = compress.load(outs["lowrank"], flashsvd=True, device_map=_disk_map(compress.load(outs["lowrank"])))
    assert any(is_fused(m) for m in model.modules())
    assert torch.allclose(_logits(model), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["rtn", "slicegpt"])
def test_a_tied_head_stays_tied(kind: str, outs: dict[str, Path], tmp_path: Path) -> None:
    from accelerate.utils import compute_module_sizes, find_tied_parameters

    plain = compress.load(outs[kind])
    a = plain.compress_adapter
    assert _tied(plain)
    ref = _logits(plain)
    sizes = compute_module_sizes(plain)
    cap = _cap(sizes, a)
    for dmap, kw in (("auto", {}), (_disk_map(plain), {}), ("auto", {"max_memory": {"cpu": cap}})):
        model = compress.load(outs[kind], device_map=dmap, offload_folder=tmp_path, **kw)
        assert _placed(model.hf_device_map, a.head) == _placed(model.hf_device_map, a.token_embedding) == "cpu"
        assert torch.allclose(_logits(model), ref, atol=1e-6, rtol=0)
        assert _tied(model), dmap  # still one tensor after the hooks ran
        assert [f"{a.head}.weight", f"{a.token_embedding}.weight"] in map(sorted, find_tied_parameters(model))
    both_on_disk = {**_disk_map(plain), a.token_embedding: "disk", a.head: "disk"}
    assert torch.allclose(_logits(compress.load(outs[kind], device_map=both_on_disk)), ref, atol=1e-6, rtol=0)
    with pytest.raises(CompressError, match="share one tied weight"):
        compress.load(outs[kind], device_map={**_disk_map(plain), a.head: "disk"})


@pytest.mark.parametrize(("kw", "needle"), [
    ({"device": "cpu", "device_map": "auto"}, "both device="),
    ({"device_map": "fastest"}, "unknown device_map 'fastest'"),
    ({"device_map": {"model.layers.7": "cpu", "model": "cpu", "lm_head": "cpu"}}, "'model.layers.7', which is not"),
    ({"device_map": {"model": "cpu"}}, "leaves lm_head.weight unplaced"),
    ({"device_map": {"model": "cpu", "model.layers.0": "disk", "lm_head": "cpu"}}, "places 'model.layers.0' twice"),
    ({"device_map": {"model": "gpu", "lm_head": "cpu"}}, "device_map['model'] = 'gpu' is not a device"),
    ({"device_map": {"model": 7, "lm_head": "cpu"}}, "names CUDA device 7"),
    ({"device_map": "auto", "max_memory": {"cpu": "lots"}}, "max_memory['cpu'] = 'lots' is not a size"),
    ({"max_memory": {"cpu": "1GiB"}}, "apply with a device_map only"),
])
def test_bad_maps_are_refused_in_one_line(kw: dict, needle: str, outs: dict[str, Path]) -> None:
    with pytest.raises(CompressError) as info:
        compress.load(outs["rtn"], **kw)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_eval_generate_and_bench_take_a_map(outs: dict[str, Path]) -> None:
    """The windows / prompt go to the embedding's device; the figures do not change."""
    from compress.bench import run_bench
    from compress.eval import evaluate
    from compress.generate import generate

    out = outs["rtn"]
    dmap = _disk_map(compress.load(out))
    plain = evaluate(out, protocol="brown-128-smoke")
    placed = evaluate(out, protocol="brown-128-smoke", device_map=dmap)
    assert placed.ppl == pytest.approx(plain.ppl, rel=1e-9) and placed.kl_mean == pytest.approx(plain.kl_mean, abs=1e-9)
    g0, g1 = generate(out, "The jury said", max_new_tokens=6), generate(out, "The jury said", max_new_tokens=6,
                                                                           device_map=dmap)
    assert g1.text == g0.text and "device map over cpu, disk" in g1.served_by
    rep = run_bench(out, seqs=[16], decode_tokens=2, prompt=4, repeats=1, isolate=False, device_map=dmap)
    assert rep.device_map == dmap and [p["phase"] for p in rep.phases] == ["prefill", "decode"]
    with pytest.raises(CompressError, match="both --device"):
        run_bench(out, seqs=[16], device="cpu", device_map="auto")


SCRIPT = Path(sys.executable).parent / "compress"


def _cli(*args: str) -> subprocess.CompletedProcess:
    if not SCRIPT.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "80"}
    return subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=600)


def _ppl(stdout: str) -> str:
    return next(ln for ln in stdout.splitlines() if ln.startswith("│ PPL")).split("│")[2].strip()


def test_cli_eval_device_map(outs: dict[str, Path], tmp_path: Path) -> None:
    out = outs["rtn"]
    base = ["eval", str(out), "--protocol", "brown-512-smoke", "--json", str(tmp_path / "e.json")]
    plain, placed = _cli(*base), _cli(*base, "--device-map", "auto")
    assert plain.returncode == 0 and placed.returncode == 0, plain.stderr + placed.stderr
    assert _ppl(placed.stdout) == _ppl(plain.stdout)
    assert "Traceback" not in placed.stderr and "meta device" not in placed.stderr
    both = _cli(*base, "--device", "cpu", "--device-map", "auto")
    assert both.returncode == 2 and "Traceback" not in both.stderr, both.stderr
    lines = error_lines(both.stderr)
    assert len(lines) == 1 and "--device cpu and --device-map auto" in lines[0], both.stderr
    bad = _cli(*base, "--device-map", "everywhere")
    assert bad.returncode == 2 and len(error_lines(bad.stderr)) == 1 and "--device-map" in bad.stderr
