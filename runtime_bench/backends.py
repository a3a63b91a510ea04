"""Every backend, gathered from its family's module (each registers its entries on import): torch dense, PyTorch
semi-structured (cuSPARSELt, CUTLASS), onnxruntime (rose's operator included), onnxruntime-genai, rose's C++ CPU
kernel, and rose's GPU 2:4 path (the Triton decode kernel, the dispatching layer of runtime/gpu24.py). See
registry.py for what an entry is."""
from __future__ import annotations

# the import order is the registry's order (and the reports'): baselines first
from . import torch_backends, semi_backends, ort_backends, genai_backends, rose_backends, gpu24_backends  # noqa: F401,I001
from .registry import BACKENDS, Backend, LinearOp, Unsupported, register, resolve

__all__ = ["BACKENDS", "Backend", "LinearOp", "Unsupported", "register", "resolve"]
