"""Data-parallel calibration (``compress.distributed``) with two CPU processes over gloo.

The statistics of a run of two processes are the sums of the two shares' sums, and everything
after them is computed identically by both, so the output equals a one-process run's: here
bitwise (same machine, batch-aligned shares: each batch's float32 Gram is the same, only the
float64 order of the additions differs). The launcher is ``torchrun``, which is what
``accelerate launch --multi_gpu`` runs; the processes join through accelerate's ``PartialState``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from compress.calib.hessian import GramAccumulator
from compress.checkpoint import CheckpointReader
from compress.distributed import World, share
from compress.errors import CompressError
from tests.conftest import make_llama

BIN = Path(sys.executable).parent
CALIB = ["--protocol", "brown-128-smoke", "--n-samples", "8", "--batch-size", "2"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gram_worker(rank: int, port: int, rows: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    acc = GramAccumulator(rows.shape[-1])
    for batch in rows.chunk(2)[rank].split(5):
        acc.add(batch)
    mean = acc.mean()
    torch.save({"mean": mean, "count": acc.count}, f"{out}/rank{rank}.pt")  # test-only file, our own
    dist.destroy_process_group()


def test_gram_summed_across_two_processes_equals_one(tmp_path: Path) -> None:
    rows = torch.randn(40, 7, 24, generator=torch.Generator().manual_seed(0))
    mp.spawn(_gram_worker, args=(_port(), rows, str(tmp_path)), nprocs=2, join=True)
    one = GramAccumulator(24)
    for batch in rows.split(5):
        one.add(batch)
    want = one.mean()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["count"] == 40 * 7
        torch.testing.assert_close(got["mean"], want, rtol=1e-12, atol=0)


def test_shares_are_batch_aligned_and_cover_every_window() -> None:
    windows = torch.arange(22).reshape(11, 2)
    for size in (1, 2, 3, 6):
        parts = [share(windows, 2, World(r, size)) for r in range(size)]
        assert torch.equal(torch.cat(parts), windows)
        assert all(p.shape[0] % 2 == 0 for p in parts[:-1])
    with pytest.raises(CompressError, match="fewer than the 7 processes"):
        share(windows, 2, World(0, 7))


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama(tmp_path_factory.mktemp("dp") / "dense", layers=2, tie=True, seed=5)


def _compress(args: list[str], procs: int, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="80", OMP_NUM_THREADS="1")
    cmd = [str(BIN / "compress"), *args] if procs == 1 else [
        str(BIN / "torchrun"), "--nproc_per_node", str(procs), "--master_port", str(_port()), str(BIN / "compress"),
        *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(out)
    return {k: reader.get(k) for k in reader.keys()}


@pytest.mark.parametrize("command", [["gptq", "--bits", "4", "--group-size", "32", "--act-order"],
                                     ["slice", "--sparsity", "0.25"]])
def test_two_processes_write_what_one_writes(command: list[str], src: Path, tmp_path: Path) -> None:
    outs = {}
    for procs in (1, 2):
        out = tmp_path / f"p{procs}"
        r = _compress([command[0], str(src), "-o", str(out), "--device", "cpu", "--no-cache", *command[1:], *CALIB],
                      procs, tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[procs] = out
    one, two = _tensors(outs[1]), _tensors(outs[2])
    assert one.keys() == two.keys()
    for k in one:
        assert torch.equal(one[k], two[k]), k
    notes = json.loads((outs[2] / "compression.json").read_text())["notes"]
    assert notes["data_parallel"] == {"processes": 2, "device": "cpu"}
    assert notes["calibration"]["windows"] == [8, 128]  # the whole calibration, not one share
    assert not list(tmp_path.glob(".compress-rank1-*"))  # the other process's copy is gone


def test_nupes_learning_in_two_processes(src: Path, tmp_path: Path) -> None:
    """Each step takes one chunk per process and the gradients are averaged, so both processes
    keep the same parameters (a divergent rank would deadlock or write a different block) and
    the run completes with a loadable output."""
    import compress

    out = tmp_path / "n2"
    r = _compress(["nupes", str(src), "-o", str(out), "--device", "cpu", "--no-cache", "--bits", "4",
                   "--group-size", "32", "--init", "gptq", "--learn", "--steps", "4", *CALIB], 2, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    model = compress.load(out)
    assert {e["kind"] for e in model.compress_manifest["modules"].values()} == {"lut"}


def test_resume_is_refused_in_a_run_of_several_processes(src: Path, tmp_path: Path) -> None:
    r = _compress(["gptq", str(src), "-o", str(tmp_path / "o"), "--device", "cpu", "--resume", *CALIB], 2, tmp_path)
    assert r.returncode != 0
    assert "--resume in a run of several processes" in r.stderr
    assert not (tmp_path / "o").exists()
