"""Runtime modules the loader swaps in for compressed linears, and the registry that maps a
manifest entry's ``kind`` to the module that serves it."""

from compress.modules.kinds import MODULE_KINDS, build_module, register_kind
from compress.modules.lowrank import LowRankLinear
from compress.modules.quant_linear import QuantLinear
from compress.modules.sliced import SlicedEmbedding  # registers the slicegpt transform

__all__ = ["MODULE_KINDS", "LowRankLinear", "QuantLinear", "SlicedEmbedding", "build_module", "register_kind"]
