"""Pure tensor math: tensors in, tensors out. No hooks, no I/O, no devices."""
