"""What a checkpoint will hold after each stage, for ``compress plan``: every block linear's
weight shape and stored bytes, plus the bytes of every other tensor.

Stage i's :meth:`Pass.plan_shapes` rewrites the plan stage i-1 produced, so a pass later in a
recipe is estimated on the shapes it will really see (slice 25 % → GPTQ counts the sliced
widths). The default replaces each selected, still dense linear by the pass's
:meth:`Pass.estimate_bytes`; a pass that changes shapes (SliceGPT) overrides it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from compress.arch import Adapter
from compress.checkpoint import CheckpointReader


@dataclass
class ShapePlan:
    """Args:
        linears: full module name → (out, in) of every block linear's weight.
        linear_bytes: full module name → stored bytes of that weight (or of what replaced it).
        compressed: linears a stage already compressed (a later estimate leaves them alone).
        other_bytes: every other stored tensor (embeddings, norms, head, biases, shortcuts).
        elem: bytes per element of the dense weights; config: the raw ``config.json``.
        tied_head: the head reads the token embedding table (no stored head weight).
        transforms: kinds of the model-level transforms the stages so far applied (``slicegpt``).
    """

    linears: dict[str, tuple[int, int]]
    linear_bytes: dict[str, int]
    other_bytes: int
    elem: int
    config: dict
    tied_head: bool
    compressed: set[str] = field(default_factory=set)
    transforms: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, reader: CheckpointReader, adapter: Adapter) -> ShapePlan:
        linears: dict[str, tuple[int, int]] = {}
        for key in reader.keys():
            if key.endswith(".weight") and key.startswith(adapter.layers + ".") and len(reader.shape(key)) == 2:
                name = key.removesuffix(".weight")
                if block_relative(name, adapter) in adapter.linears:
                    linears[name] = tuple(reader.shape(key))  # type: ignore[assignment]
        sizes = {n: reader.nbytes(n + ".weight") for n in linears}
        elem = next((sizes[n] // (o * k) for n, (o, k) in linears.items()), 4)
        other = reader.total_bytes() - sum(sizes.values())
        tied = adapter.head is not None and bool(reader.config.get("tie_word_embeddings")) \
            and f"{adapter.head}.weight" not in reader
        return cls(linears, sizes, other, elem, dict(reader.config), tied)

    def manifest(self, base: dict) -> dict:
        """What a stage's input manifest will say about representations and transforms: the
        input's own (``base``) plus what the stages planned so far compressed or transformed, for
        :meth:`Pass.check_input` before any work."""
        modules = {**base.get("modules", {}), **{n: {"kind": "an earlier stage's"} for n in sorted(self.compressed)}}
        transforms = [*base.get("transforms", []), *({"kind": t} for t in self.transforms)]
        return {"modules": modules, "transforms": transforms}

    def total_bytes(self) -> int:
        return self.other_bytes + sum(self.linear_bytes.values())

    def block_linears(self, adapter: Adapter) -> list[tuple[str, int, int]]:
        """(block-relative name, out, in) of every linear: what :meth:`Pass.resolve` takes."""
        return [(block_relative(n, adapter), o, k) for n, (o, k) in self.linears.items()]

    def reshape(self, name: str, out_features: int, in_features: int) -> None:
        """A dense linear that now has another shape (its bytes follow)."""
        self.linears[name] = (out_features, in_features)
        self.linear_bytes[name] = out_features * in_features * self.elem


def block_relative(name: str, adapter: Adapter) -> str:
    """``model.layers.3.self_attn.q_proj`` → ``self_attn.q_proj``."""
    return name[len(adapter.layers) + 1:].split(".", 1)[1]
