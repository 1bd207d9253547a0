"""Triton kernels with plain-torch twins for compressed checkpoints.

Importing this package never imports Triton; each kernel module loads it lazily. The package
deliberately defines no ``__version__``: ``transformers`` probes for an unrelated PyPI package that
is also called ``kernels`` and must keep reporting it unavailable.
"""
