"""Per-block scan statistics: where a stage keeps them (:class:`BlockStats`) and the one every
Hessian-based pass shares (:func:`input_grams`, the mean ``XᵀX`` of each fused group's input).

A statistic of the dense model depends on the input checkpoint, the calibration windows, the
statistic's own options and the code computing it — nothing else — so its key is a fingerprint
of exactly those (plus the torch version, whose kernels can change the last bits). GPTQ and
whitened low-rank under ``propagate: dense`` both read ``input-gram``: a low-rank run after a
GPTQ run on the same model and data reuses its Grams.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from compress.arch import Adapter
from compress.calib.pipeline import LayerContext
from compress.pipeline.pass_api import Statistic
from compress.store import WorkStore, fingerprint

INPUT_GRAM_VERSION = 1


def input_gram_statistic(dtype: str) -> Statistic:
    """``input-gram`` accumulated in ``dtype`` (``float64`` or ``float32``)."""
    return Statistic("input-gram", INPUT_GRAM_VERSION, {"dtype": dtype})


def group_first(adapter: Adapter, rel: str) -> str:
    """The first linear of ``rel``'s fused group (whose input ``rel`` shares): the Gram's name."""
    return next((g[0] for g in adapter.groups if rel in g), rel)


def input_grams(ctx: LayerContext, dtype: str) -> dict[str, Tensor]:
    """Mean ``XᵀX`` of every fused group's input in one dense forward that also propagates the
    block's outputs to the next block; keyed by the group's first linear (:func:`group_first`)."""
    ctx.hessian_dtype = getattr(torch, dtype)
    firsts = []
    for g in ctx.adapter.groups:
        try:
            ctx.module(g[0])
        except AttributeError:  # an adapter group this block does not have (e.g. no bias-only MLP)
            continue
        firsts.append(g[0])
    return ctx.collect(firsts, propagate=True)


class BlockStats:
    """One stage's per-block statistics in a work store entry (group ``block-0007`` per block).

    Args:
        store: the work store (``--no-cache``: a private store in a temporary directory that
            :meth:`close` deletes, so a plan step still has every block's statistics).
        key: the entry, :func:`stats_key`; n_blocks: blocks of the model.
    """

    def __init__(self, store: WorkStore, key: str, n_blocks: int, parts: dict,
                 scratch: Path | None = None) -> None:
        self.store = store
        self.key = key
        self.n_blocks = n_blocks
        self.parts = parts
        self._scratch = scratch

    @staticmethod
    def name(i: int) -> str:
        return f"block-{i:04d}"

    def missing(self) -> list[int]:
        """Blocks whose statistics are not stored (by the index and file sizes; reads verify)."""
        return [i for i in range(self.n_blocks) if not self.store.has(self.key, self.name(i))]

    def block(self, i: int) -> dict[str, Tensor] | None:
        """Block ``i``'s statistics, verified (None when missing or found corrupt)."""
        return self.store.get(self.key, self.name(i))

    def put(self, i: int, tensors: dict[str, Tensor]) -> None:
        self.store.put(self.key, self.name(i), tensors, parts=self.parts)

    def close(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)


def stats_key(statistic: Statistic, model_hash: str, calibration: str | None,
              device: str = "cpu") -> tuple[str, dict]:
    """The store key of ``statistic`` on a checkpoint and calibration, and what it was made of
    (the device type too: a CUDA Hessian differs from the CPU one in the last bits, and a run
    on one device must give the same tensors whether or not the store had its statistics)."""
    parts = {"statistic": statistic.name, "version": statistic.version, "options": statistic.options,
             "model": model_hash, "calibration": calibration, "torch": torch.__version__.split("+")[0]}
    if device != "cpu":  # CPU keys stay those of earlier releases, so their entries are reused
        parts["device"] = device
    return fingerprint(**parts), parts


def open_stats(statistic: Statistic, src: Path, calibration: str | None, n_blocks: int, *,
               cache: bool, keep_all: bool, scratch_dir: Path, device: str = "cpu") -> BlockStats:
    """The stage's statistics: in the shared work store; with ``cache=False`` nowhere (each
    block's statistics live only while it is applied) or, when a plan step needs every block's
    (``keep_all``), in a scratch store under ``scratch_dir`` that no other run reads."""
    if cache:
        store = WorkStore()
        key, parts = stats_key(statistic, store.checkpoint_hash(src), calibration, device)
        return BlockStats(store, key, n_blocks, parts)
    if not keep_all:
        key, parts = stats_key(statistic, "uncached", calibration)
        return BlockStats(WorkStore(enabled=False), key, n_blocks, parts)
    scratch = Path(tempfile.mkdtemp(prefix=".compress-scan-", dir=scratch_dir))
    store = WorkStore(scratch, max_bytes=1 << 62)
    key, parts = stats_key(statistic, "uncached", calibration)
    return BlockStats(store, key, n_blocks, parts, scratch=scratch)
