"""Every backend, gathered from its family's module (each registers its entries on import): torch dense, PyTorch
semi-structured (cuSPARSELt, CUTLASS), onnxruntime, rose's C++ CPU kernel, and rose's GPU 2:4 path (the Triton
decode kernel, the dispatching layer of runtime/gpu24.py). See registry.py for what an entry is."""
from __future__ import annotations

from . import torch_backends, semi_backends, ort_backends, rose_backends, gpu24_backends  # noqa: F401,I001  (they register)
from .registry import BACKENDS, Backend, LinearOp, Unsupported, register, resolve

__all__ = ["BACKENDS", "Backend", "LinearOp", "Unsupported", "register", "resolve"]
