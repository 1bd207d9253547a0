"""Checkpoint I/O: lazy safetensors reads, sharded atomic writes, the compression manifest."""

from compress.checkpoint.reader import CheckpointReader
from compress.checkpoint.writer import CheckpointWriter, prepare_output

__all__ = ["CheckpointReader", "CheckpointWriter", "prepare_output"]
