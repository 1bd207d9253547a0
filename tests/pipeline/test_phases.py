"""Scan → plan → apply: dense-model statistics go through the work store and are reused; a
cached run computes no activation; a corrupt entry is recomputed; a plan step sees every block."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import BaseModel
from torch import Tensor

from compress.checkpoint import CheckpointReader
from compress.pipeline import stream
from compress.pipeline.pass_api import Needs, Pass, PassConfig, Statistic
from compress.recipe import parse_recipe
from compress.registry import PASSES, register_pass
from compress.runner import run_recipe
from compress.store import WorkStore

CAL = {"protocol": "brown-128-smoke", "batch_size": 3}


def _recipe(pass_name: str, **cfg: object):
    return parse_recipe({"calibration": CAL, "stages": [{"pass": pass_name, "config": cfg}]})


def _tensors(d: Path) -> dict[str, Tensor]:
    r = CheckpointReader(d)
    return {k: r.get(k) for k in r.keys()}


def _assert_identical(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.fixture()
def store_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "work"


def _stat_entries(store_root: Path) -> list[Path]:
    """Work-store entries of scan statistics (the tokenised calibration split is one more)."""
    import json

    return [p for p in store_root.glob("??/*") if p.is_dir()
            and json.loads((p / "index.json").read_text())["parts"].get("statistic") != "token-ids"]


def _no_activations(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("a cached statistics-only run computed calibration activations")
    monkeypatch.setattr(stream, "capture_block_inputs", refuse)


def test_dense_gptq_reuses_hessians_and_equals_no_cache(tiny_llama: Path, tmp_path: Path, store_root: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    run_recipe(_recipe("gptq", bits=4, propagate="dense"), tiny_llama, tmp_path / "w4")
    keys = _stat_entries(store_root)
    assert len(keys) == 1 and len(list(keys[0].glob("block-*.safetensors"))) == 3
    run_recipe(_recipe("gptq", bits=3, propagate="dense"), tiny_llama, tmp_path / "w3-plain", cache=False)
    with monkeypatch.context() as m:
        _no_activations(m)
        run_recipe(_recipe("gptq", bits=3, propagate="dense"), tiny_llama, tmp_path / "w3")
    _assert_identical(tmp_path / "w3", tmp_path / "w3-plain")


def test_whitened_lowrank_reads_the_grams_gptq_stored(tiny_llama: Path, tmp_path: Path, store_root: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    run_recipe(_recipe("gptq", bits=4, propagate="dense"), tiny_llama, tmp_path / "w4")
    run_recipe(_recipe("lowrank", ratio=0.6, propagate="dense"), tiny_llama, tmp_path / "lr-plain", cache=False)
    with monkeypatch.context() as m:
        _no_activations(m)
        run_recipe(_recipe("lowrank", ratio=0.6, propagate="dense"), tiny_llama, tmp_path / "lr")
    _assert_identical(tmp_path / "lr", tmp_path / "lr-plain")


def test_no_cache_writes_nothing(tiny_llama: Path, tmp_path: Path, store_root: Path) -> None:
    run_recipe(_recipe("gptq", bits=4, propagate="dense"), tiny_llama, tmp_path / "w4", cache=False)
    assert not list(store_root.glob("??/*"))


def test_corrupt_statistics_are_recomputed_with_a_warning(tiny_llama: Path, tmp_path: Path, store_root: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    """A truncated block (seen by its size before the run starts) and one with flipped bytes (seen
    by its checksum when read, after block 0 was applied without activations: the run rebuilds the
    dense activations up to it): each recomputed with one warning line, the output what an
    uncached run writes."""
    run_recipe(_recipe("gptq", bits=4, propagate="dense"), tiny_llama, tmp_path / "c", cache=False)
    run_recipe(_recipe("gptq", bits=4, propagate="dense"), tiny_llama, tmp_path / "a")
    for damage, block in (("truncated", 1), ("flipped", 2)):
        victim = next(store_root.glob(f"??/*/block-000{block}.safetensors"))
        data = bytearray(victim.read_bytes())
        if damage == "truncated":
            data = data[:100]
        else:
            data[-64:] = bytes(64)
        victim.write_bytes(bytes(data))
        capsys.readouterr()
        run_recipe(_recipe("gptq", bits=4, propagate="dense"), tiny_llama, tmp_path / damage)
        err = capsys.readouterr().err
        assert f"block-000{block}" in err and "recomput" in err, (damage, err)
        _assert_identical(tmp_path / damage, tmp_path / "c")
        assert victim.stat().st_size > 100  # stored again, whole


def test_the_key_changes_with_the_input_and_the_calibration() -> None:
    from compress.pipeline.stats import input_gram_statistic, stats_key

    st = input_gram_statistic("float64")
    base = stats_key(st, "m" * 64, "cal")[0]
    assert base == stats_key(st, "m" * 64, "cal")[0]
    assert len({base, stats_key(st, "n" * 64, "cal")[0], stats_key(st, "m" * 64, "other")[0],
                stats_key(input_gram_statistic("float32"), "m" * 64, "cal")[0]}) == 4


# -- a pass with a plan step -------------------------------------------------------------------
class _PlanConfig(PassConfig):
    keep: int = 1


class _Plan(BaseModel):
    energies: list[float]
    loudest: int


SEEN: dict[str, object] = {}


class _Planner(Pass):
    """Scans each block's input energy, plans which block is loudest, applies nothing but notes."""

    name = "test-planner"

    def needs(self) -> Needs:
        return Needs(scan=True, plan=True, activations=False)

    def statistic(self) -> Statistic:
        return Statistic("test-energy", 1)

    def scan_layer(self, ctx):  # noqa: ANN001, ANN201
        st = ctx.state
        e = sum(float(st.batch(b).double().pow(2).mean()) for b in st.batches())
        return {"energy": torch.tensor([e], dtype=torch.float64)}

    def plan(self, stats, run):  # noqa: ANN001, ANN201
        energies = [float(stats.block(i)["energy"]) for i in range(stats.n_blocks)]
        return _Plan(energies=energies, loudest=max(range(len(energies)), key=energies.__getitem__))

    def process_layer(self, ctx, run):  # noqa: ANN001, ANN201
        assert ctx.state is None and ctx.stats is not None
        SEEN.setdefault("applied", []).append((ctx.index, run.plan.loudest))  # type: ignore[union-attr]
        return []


@pytest.fixture()
def planner():
    register_pass("test-planner", _PlanConfig, needs_calibration=True, summary="test")(_Planner)
    SEEN.clear()
    yield
    PASSES.pop("test-planner", None)


def test_plan_step_sees_every_block_before_any_is_applied(planner: None, tiny_llama: Path, tmp_path: Path,
                                                          store_root: Path) -> None:
    import json

    out = run_recipe(_recipe("test-planner"), tiny_llama, tmp_path / "p")
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["energies"]) == 3 and all(e > 0 for e in plan["energies"])
    assert SEEN["applied"] == [(i, plan["loudest"]) for i in range(3)]
    store = WorkStore(store_root)
    key = next(p.name for p in _stat_entries(store_root))
    assert store.names(key) == ["block-0000", "block-0001", "block-0002"]


def test_compress_plan_shows_the_plan_once_statistics_are_stored(planner: None, tiny_llama: Path, tmp_path: Path,
                                                                store_root: Path) -> None:
    from rich.console import Console

    from compress.summary import plan_recipe

    def shown() -> str:
        console = Console(width=100, record=True)
        console.print(plan_recipe(_recipe("test-planner"), str(tiny_llama)))
        return console.export_text()

    assert "not stored yet" in shown()
    run_recipe(_recipe("test-planner"), tiny_llama, tmp_path / "p")
    text = shown()
    assert "from stored statistics" in text and '"loudest"' in text, text


def test_plan_step_without_cache_uses_a_scratch_store(planner: None, tiny_llama: Path, tmp_path: Path,
                                                      store_root: Path) -> None:
    run_recipe(_recipe("test-planner"), tiny_llama, tmp_path / "p", cache=False)
    assert (tmp_path / "p" / "plan.json").is_file()
    assert not list(store_root.glob("??/*")) and not list(tmp_path.glob(".compress-scan-*"))


def test_a_plan_needs_a_scan() -> None:
    with pytest.raises(ValueError, match="plan step needs a scan"):
        Needs(plan=True)
