"""Triton kernels with plain-torch twins for compressed checkpoints.

Importing this package never imports Triton; each kernel module loads it lazily. It lives inside
``compress`` rather than at the top level because ``transformers`` (5.25+) requires and imports an
unrelated PyPI package that is also called ``kernels``; a top-level one would shadow it.
"""
