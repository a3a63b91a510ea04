"""`semi-structured`: 2:4 weights for PyTorch's `SparseSemiStructuredTensor` (cuSPARSELt and CUTLASS backends).

cuSPARSELt's compressed bytes are internal to the library and change between versions, so they are never
stored: the file holds the CUTLASS layout (kept values plus reordered metadata), computed on the CPU with
PyTorch's own pure-tensor conversion; `runtime.load_sparse` either wraps it as it is (CUTLASS) or unpacks it and
lets cuSPARSELt compress at load. Layers outside a backend's shape or dtype limits stay dense and are listed.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from rose.errors import RoseError

from rose.models import DTYPES

from .source import Source, bit_equal, copy_aux, not_for_transformers, require_24, set_config_file_dtype

BACKENDS = ("cusparselt", "cutlass")
INDEX = "semi_structured.json"
WEIGHTS = "model.safetensors"
LAYOUT_VERSION = 1
LOADER = "runtime.load_sparse(dir, backend='cusparselt' or 'cutlass') on a CUDA GPU"
HALF = {name: DTYPES[name] for name in ("float16", "bfloat16")}
DEFAULT_DTYPE = "float16"


def _classes() -> dict[str, type]:
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    return {"cusparselt": SparseSemiStructuredTensorCUSPARSELT, "cutlass": SparseSemiStructuredTensorCUTLASS}


def why_not(backend: str, shape: tuple[int, int], dtype: torch.dtype) -> str | None:
    """None when a weight of this shape and dtype fits the backend (PyTorch's own table), else the reason."""
    table = _classes()[backend]._DTYPE_SHAPE_CONSTRAINTS
    if dtype not in table:
        return f"{backend} does not take {dtype}"
    rows, cols = table[dtype].sparse_min_rows, table[dtype].sparse_min_cols
    m, n = shape
    if m < rows or m % rows or n < cols or n % cols:
        return f"{backend} needs rows a multiple of {rows} and columns a multiple of {cols}, got {m}x{n}"
    return None


def cutlass_pack(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept values, reordered metadata) in CUTLASS's layout; runs on CPU tensors."""
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    return sparse_semi_structured_from_dense_cutlass(W.contiguous())


def cutlass_unpack(packed: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The dense matrix that a CUTLASS packing stands for; runs on CPU tensors."""
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_to_dense_cutlass

    return sparse_semi_structured_to_dense_cutlass(packed, meta)


def write_semi_structured(src: Source, out: Path, dtype: str = DEFAULT_DTYPE) -> dict:
    """Write half-precision weights with every CUTLASS-eligible 2:4 linear packed (`check_semi_structured` then
    unpacks each on the CPU against the dense weight)."""
    from safetensors.torch import save_file

    require_24(src, "semi-structured")
    if dtype not in HALF:
        raise RoseError(f"semi-structured weights must be float16 or bfloat16, not {dtype}")
    half = HALF[dtype]
    copy_aux(src.path, out)
    tensors: dict[str, torch.Tensor] = {}
    packed: list[str] = []
    dense: dict[str, dict[str, str]] = {b: {} for b in BACKENDS}
    for name, t in src.tensors.items():
        t = t.to(half) if t.is_floating_point() else t
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise RoseError(f"{name} does not fit in {dtype} (values overflow): export semi-structured as bfloat16")
        module = name[: -len(".weight")]
        if not (name.endswith(".weight") and module in src.linears):
            tensors[name] = t.contiguous()
            continue
        for backend in BACKENDS:
            reason = why_not(backend, tuple(t.shape), half)
            if reason:
                dense[backend][module] = reason
        if module in dense["cutlass"]:
            tensors[name] = t.contiguous()
            continue
        tensors[f"{module}.packed"], tensors[f"{module}.meta"] = cutlass_pack(t)
        packed.append(module)
    save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})
    index = {"format": "rose-semi-structured", "version": LAYOUT_VERSION, "layout": "cutlass", "dtype": dtype,
             "torch": torch.__version__, "layers": list(src.linears), "packed": packed, "dense": dense}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    set_config_file_dtype(out / "config.json", dtype)
    config = not_for_transformers(json.loads((out / "config.json").read_text()), "semi-structured", LOADER)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {"dtype": dtype, "packed_layers": len(packed), "skipped": dense}


def check_semi_structured(src: Source, out: Path) -> dict:
    """Read the written weights back and unpack every CUTLASS-packed linear on the CPU: it must equal the source
    weight in the stored half precision, bit for bit."""
    from safetensors.torch import load_file

    stored = load_file(out / WEIGHTS)
    index = json.loads((out / INDEX).read_text())
    if set(index["packed"]) | set(index["dense"]["cutlass"]) != set(src.linears):
        raise RoseError(f"{INDEX} does not account for every linear layer: please report this")
    for module in index["packed"]:
        weight = src.tensors[f"{module}.weight"].to(HALF[index["dtype"]])
        if not bit_equal(cutlass_unpack(stored[f"{module}.packed"], stored[f"{module}.meta"]), weight):
            raise RoseError(f"the CUTLASS packing of {module} does not unpack to its weight: please report this")
    return {"cutlass_packing": "unpacked on the CPU, bit-exact"}
