#!/usr/bin/env bash
# A separate virtual environment for the llm-compressor peer (it pins transformers<=5.17 and
# compressed-tensors==0.19, which must not leak into the project's own environment).
set -euo pipefail
VENV="${1:-${COMPRESS_CACHE:-$HOME/.cache/compress}/venv-llmc}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import llmcompressor" 2>/dev/null; then
  echo "$VENV"; exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q llmcompressor==0.14.0.1
echo "$VENV"
