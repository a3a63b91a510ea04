"""Export formats for pruned models (ONNX, packed 2:4 checkpoints, semi-structured tensors)."""
