"""Checkpoint I/O: lazy safetensors reads, sharded atomic writes, the compression manifest."""

from compress.checkpoint.reader import CheckpointReader
from compress.checkpoint.writer import CheckpointWriter, ensure_writable, prepare_output

__all__ = ["CheckpointReader", "CheckpointWriter", "ensure_writable", "prepare_output"]
