"""compress: make transformer checkpoints smaller and faster.

Public API:
    ``compress.load(dir)`` — rebuild any compress output (or plain checkpoint) as a model.
    ``compress.run(recipe, model, out)`` — apply a recipe (YAML path, dict or Recipe).
"""

from __future__ import annotations

__version__ = "0.1.0"

from compress.api import load, run  # noqa: E402

__all__ = ["__version__", "load", "run"]
