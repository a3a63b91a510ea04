"""Every backend, gathered from its family's module (each registers its entries on import): torch dense, PyTorch
semi-structured (cuSPARSELt, CUTLASS), onnxruntime (rose's operator included), onnxruntime-genai, and rose's own
kernels. See registry.py for what an entry is."""
from __future__ import annotations

from . import genai_backends, ort_backends, rose_backends, semi_backends, torch_backends  # noqa: F401  (they register)
from .registry import BACKENDS, Backend, LinearOp, Unsupported, register, resolve

__all__ = ["BACKENDS", "Backend", "LinearOp", "Unsupported", "register", "resolve"]
