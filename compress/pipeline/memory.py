"""Peak resident memory of a stage, predicted from shapes alone (``compress plan``).

A stage streams one block at a time, so its peak is the largest of three phases, each a sum of
terms that scale with the model's shapes and the calibration (no term grows with depth):

* **calibration text**: the runtime and the corpus being read and tokenised (Python strings
  and token lists: about 11.5 bytes per byte of text, measured with 1, 6 and 18 MB corpora) plus
  the tokenizer;
* **embeddings**: the runtime, the token table (materialised, plus the copy the writer makes),
  and the calibration activations being captured;
* **blocks**: the runtime, the token table when the head is tied (it stays for the head), the
  largest block twice (the dense block and what replaces it), the calibration activations
  (times the buffers the pass holds), one calibration batch's forward workspace, and the
  pass's own working set (:meth:`Pass.plan_memory`: Gram matrices, solver and SVD workspaces);
* **tail**: the runtime, the head (and a tied table), the final activations.

The constants were measured on CPU with glibc (``benchmarks/foundation.py --sections
plan-memory`` checks the prediction against real runs of four recipes on SmolLM2):

* ``RUNTIME_BYTES``: resident size of a ``compress`` process once torch, transformers, the
  CLI and the model classes are imported and the meta skeleton is built (a data-free run of a
  tiny model peaks at 506 MiB);
* :func:`forward_workspace`: the high-water mark of one block forward on one calibration batch
  above the resident inputs, measured on LLaMA blocks of several widths:
  ``tokens × (4000 + 5·hidden + 2.5·intermediate)`` float32 elements.
"""

from __future__ import annotations

from dataclasses import dataclass

from compress.arch import Adapter
from compress.calib.protocol import Protocol
from compress.checkpoint import CheckpointReader
from compress.pipeline.shapes import ShapePlan, block_relative

RUNTIME_BYTES = 500 * 1024**2
TOKENIZER_BYTES = 16 * 1024**2
TEXT_FACTOR = 11.5  # resident bytes per byte of calibration text while it is tokenised
_WORKSPACE_BASE, _WORKSPACE_HIDDEN, _WORKSPACE_INTER = 4000, 5.0, 2.5


@dataclass(frozen=True)
class MemoryShape:
    """What a stage's peak depends on, read from the shapes its input will have.

    Args:
        hidden: residual width entering the widest block (after slicing: the sliced width).
        intermediate: widest linear output in a block (the MLP's intermediate width).
        block_bytes: stored bytes of the largest block's linears.
        widest_linear: (out, in) of the largest block linear.
        gram_inputs: input width of each group of linears that reads one input (q/k/v, o,
            gate/up, down), in the largest block.
        embed_bytes / head_bytes: the token table and an untied head (0 when tied).
        elem: bytes per element of the dense weights and the activations.
        windows / seq_len / batch_size: the calibration (windows 0: data-free).
        text_bytes: size of the calibration corpus file (0: data-free).
    """

    hidden: int
    intermediate: int
    block_bytes: int
    widest_linear: tuple[int, int]
    gram_inputs: tuple[int, ...]
    embed_bytes: int
    head_bytes: int
    elem: int
    windows: int
    seq_len: int
    batch_size: int
    text_bytes: int = 0

    @property
    def activation_bytes(self) -> int:
        """One ``[windows, seq, hidden]`` buffer of calibration activations."""
        return self.windows * self.seq_len * self.hidden * self.elem

    @property
    def gram_bytes(self) -> int:
        """float64 Gram matrices of every input group of one block."""
        return sum(k * k for k in self.gram_inputs) * 8


def forward_workspace(shape: MemoryShape) -> int:
    """Bytes one block forward on one calibration batch allocates above its inputs."""
    if not shape.windows:
        return 0
    tokens = min(shape.batch_size, shape.windows) * shape.seq_len
    per_token = _WORKSPACE_BASE + _WORKSPACE_HIDDEN * shape.hidden + _WORKSPACE_INTER * shape.intermediate
    return int(tokens * per_token * 4)


def memory_shape(plan: ShapePlan, reader: CheckpointReader, adapter: Adapter, protocol: Protocol | None,
                 batch_size: int, text_bytes: int = 0) -> MemoryShape:
    """The :class:`MemoryShape` of a stage whose input has the shapes ``plan`` describes."""
    blocks: dict[str, list[str]] = {}
    for name in plan.linears:
        blocks.setdefault(name[: len(name) - len(block_relative(name, adapter))], []).append(name)
    largest = max(blocks.values(), key=lambda names: sum(plan.linear_bytes[n] for n in names), default=[])
    by_rel = {block_relative(n, adapter): plan.linears[n] for n in largest}
    first_of_group = [g[0] for g in adapter.groups if g[0] in by_rel]
    gram_inputs = tuple(by_rel[n][1] for n in first_of_group)
    hidden = by_rel[first_of_group[0]][1] if first_of_group else int(plan.config.get("hidden_size", 0))
    shapes = list(by_rel.values()) or [(0, 0)]
    embed = _tensor_bytes(reader, adapter.token_embedding + ".weight")
    head = 0 if plan.tied_head or adapter.head is None else _tensor_bytes(reader, adapter.head + ".weight")
    return MemoryShape(
        hidden=hidden, intermediate=max(o for o, _ in shapes),
        block_bytes=sum(plan.linear_bytes[n] for n in largest),
        widest_linear=max(shapes, key=lambda s: s[0] * s[1]), gram_inputs=gram_inputs,
        embed_bytes=embed, head_bytes=head, elem=plan.elem,
        windows=0 if protocol is None else protocol.n_calib, seq_len=0 if protocol is None else protocol.seq_len,
        batch_size=batch_size, text_bytes=text_bytes if protocol is not None else 0)


def _tensor_bytes(reader: CheckpointReader, key: str) -> int:
    return reader.nbytes(key) if key in reader else 0


@dataclass(frozen=True)
class PeakEstimate:
    """The predicted terms of every phase of a stage (``calibration text``, ``embeddings``,
    ``blocks``, ``tail``; the runtime counted in each); the peak is the largest phase."""

    phases: dict[str, dict[str, int]]

    @property
    def phase(self) -> str:
        return max(self.phases, key=lambda p: sum(self.phases[p].values()))

    @property
    def terms(self) -> dict[str, int]:
        return self.phases[self.phase]

    @property
    def peak(self) -> int:
        return sum(self.terms.values())


def stage_peak(shape: MemoryShape, pass_terms: dict[str, int], tied: bool) -> PeakEstimate:
    """The phases of a stage whose pass holds ``pass_terms`` while it processes a block
    (:meth:`Pass.plan_memory`: its statistics, solver workspace, extra activation buffers)."""
    acts = shape.activation_bytes
    kept = shape.embed_bytes if tied else 0
    text = {"calibration text + tokens": int(TEXT_FACTOR * shape.text_bytes), "tokenizer": TOKENIZER_BYTES}
    phases = {
        "calibration text": text if shape.text_bytes else {},
        "embeddings": {"token embedding (+ write copy)": 2 * shape.embed_bytes, "calibration activations": acts},
        "blocks": {"token embedding (tied head)": kept, "largest block (dense + replacement)": 2 * shape.block_bytes,
                   "calibration activations": acts, "one calibration batch through a block": forward_workspace(shape),
                   **pass_terms},
        "tail": {"token embedding (tied head)": kept, "head": shape.head_bytes, "calibration activations": acts},
    }
    runtime = {"runtime (torch + transformers + compress)": RUNTIME_BYTES}
    return PeakEstimate({name: runtime | {k: v for k, v in terms.items() if v} for name, terms in phases.items()})
