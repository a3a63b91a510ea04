"""rose's runtimes: what runs a pruned 2:4 model fast, for deployers who never touch the pruner.

    from runtime import load_packed24_cpu, Sparse24Linear, sparsify    # the C++ CPU kernel (cpp/)
    from runtime import load_packed24                                   # packed24 -> a dense transformers model
    from runtime import load_sparse                                     # semi-structured -> cuSPARSELt / CUTLASS

Every loader checks what it reads (runtime/verify.py): file hashes against the export's manifest (`verify=False`
skips them), shapes against the config, two of four per group, no NaN; a failure is one `RoseRuntimeError` line.

This package imports nothing of `rose` (pruning) or `export` (formats): a runtime reads the files an export
wrote, by their documented layout, and checks them itself.
"""
from __future__ import annotations

from typing import Any

from .errors import RoseRuntimeError

_LAZY = {"load_packed24_cpu": "cpu24", "Sparse24Linear": "cpu24", "sparsify": "cpu24", "ensure_ops": "cpu24",
         "load_packed24": "packed24", "read_packed24": "packed24",
         "load_sparse": "semi", "load_dense": "semi", "read_semi_structured": "semi"}

__all__ = ["RoseRuntimeError", *_LAZY]


def __getattr__(name: str) -> Any:  # the kernels build or load on first use, not on `import runtime`
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
