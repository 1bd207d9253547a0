"""Test helper run as a subprocess: apply a recipe and SIGKILL this process right after the
commit of block K of the named pass (a real kill -9: no cleanup, no atexit, no finally).

    python -m tests.pipeline.kill_after_block RECIPE_JSON MODEL OUT K PASS [PLUGIN]

PLUGIN: a module whose ``register()`` registers a test-only pass first.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
from pathlib import Path

from compress.pipeline import stream
from compress.recipe import parse_recipe
from compress.runner import run_recipe


def main() -> None:
    recipe, model, out, k, victim = sys.argv[1:6]
    if len(sys.argv) > 6:
        importlib.import_module(sys.argv[6]).register()
    original = stream.Stream.commit

    def commit(self: stream.Stream, blocks_done: int) -> None:
        original(self, blocks_done)
        if blocks_done == int(k) and self.the_pass.name == victim:
            os.kill(os.getpid(), signal.SIGKILL)

    stream.Stream.commit = commit  # type: ignore[method-assign]
    run_recipe(parse_recipe(json.loads(recipe)), Path(model), Path(out))


if __name__ == "__main__":
    main()
