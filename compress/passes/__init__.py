"""Compression passes. Each module registers itself with ``@register_pass``; this file imports
them explicitly so the registry is complete without walking the package."""

from compress.passes import flatquant, lowrank, nupes, quantize, rco, slicegpt, structprune, svd_cluster  # noqa: F401
