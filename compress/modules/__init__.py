"""Runtime modules the loader swaps in for compressed linears, and the registry of typed module
kinds that maps a manifest entry's ``kind`` to its entry model and runtime module."""

from compress.modules.flat_attention import KVQuantizer  # registers the flatquant-attention transform
from compress.modules.kinds import MODULE_KINDS, KindEntry, ModuleKind, SharedTensors, build_module, register_kind
from compress.modules.lowrank import LowRankLinear, SharedBasisLinear
from compress.modules.lut_linear import LutLinear
from compress.modules.pruned import PrunedLinear
from compress.modules.quant_linear import MixedQuantLinear, QuantLinear, RowMixedQuantLinear
from compress.modules.tied_quant import QuantEmbedding, TiedQuantHead
from compress.modules.sliced import SlicedEmbedding  # registers the slicegpt transform
from compress.modules.transformed import TransformedInput

__all__ = ["MODULE_KINDS", "KVQuantizer", "KindEntry", "LowRankLinear", "LutLinear", "MixedQuantLinear", "ModuleKind",
           "PrunedLinear", "QuantEmbedding", "QuantLinear", "RowMixedQuantLinear", "SharedBasisLinear", "SharedTensors", "SlicedEmbedding", "TiedQuantHead", "TransformedInput", "build_module",
           "register_kind"]
