"""FlashSVD fused blocks: rank-space FFN and attention that never materialise full activations.

A factored linear keeps ``y = (x @ U) @ V + b`` (``U [in, r]``, ``V [r, out]``).  The blocks here
take the factors (or the rank-space coefficients ``x @ U``) and rebuild the full-width
activations tile by tile inside a kernel (Triton on CUDA) or chunk by chunk (the torch twins on
CPU), so peak activation memory scales with the tile/chunk instead of the sequence.

Importing this package never imports Triton.
"""

from .attention import flash_svd_attention
from .ffn import flash_gelu_ffn, flash_swiglu_ffn

__all__ = ["flash_gelu_ffn", "flash_svd_attention", "flash_swiglu_ffn"]
