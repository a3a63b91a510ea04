"""Loading the `semi-structured` export onto PyTorch's `SparseSemiStructuredTensor` (cuSPARSELt or CUTLASS), verified.

The directory holds half-precision weights, every CUTLASS-eligible 2:4 linear as `<m>.packed` (kept values) and
`<m>.meta` (CUTLASS's reordered metadata), and `semi_structured.json` (which layers are packed, which stay dense
per backend and why). cuSPARSELt's own bytes are never stored: `load_sparse` compresses at load, on this GPU, with
the library installed here. The writer is `export/semi_structured.py`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import RoseRuntimeError, first_line
from .verify import (check_finite, check_shape, empty_model, load_config, load_into, parameter_shapes, read_tensors,
                     verify_files)

FORMAT = "semi-structured"
INDEX = "semi_structured.json"
WEIGHTS = "model.safetensors"
BACKENDS = ("cusparselt", "cutlass")
HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def classes() -> dict[str, type]:
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    return {"cusparselt": SparseSemiStructuredTensorCUSPARSELT, "cutlass": SparseSemiStructuredTensorCUTLASS}


def cutlass_unpack(packed: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The dense matrix that a CUTLASS packing stands for (PyTorch's own conversion; runs on CPU tensors)."""
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_to_dense_cutlass

    return sparse_semi_structured_to_dense_cutlass(packed, meta)


def _index(path: Path) -> dict:
    try:
        index = json.loads((path / INDEX).read_text())
        if index["dtype"] not in HALF or not isinstance(index["packed"], list):
            raise ValueError(f"dtype {index['dtype']!r}")
        for backend in BACKENDS:
            if not isinstance(index["dense"][backend], dict):
                raise ValueError(f"dense[{backend}]")
        return index
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RoseRuntimeError(f"{path / INDEX} is damaged ({first_line(exc)[:80]}): re-export the model") from None


def read_semi_structured(path: Path, verify: bool = True) -> tuple[dict, dict[str, torch.Tensor],
                                                                       dict[str, torch.Tensor]]:
    """(index, dense state dict, stored tensors) of a semi-structured directory, on the CPU, checked: hashes
    against the export's manifest unless `verify=False`, then every tensor against the config, every unpacked
    weight 2:4 and finite."""
    path = Path(path)
    if not (path / INDEX).is_file():
        raise RoseRuntimeError(f"{path} is not a semi-structured export (no {INDEX})")
    verify_files(path, verify)
    config = load_config(path, FORMAT)
    index = _index(path)
    where = path / WEIGHTS
    stored = read_tensors(where)
    shapes = parameter_shapes(config)
    state = {k: v for k, v in stored.items() if not k.endswith((".packed", ".meta"))}
    for module in index["packed"]:
        for part in ("packed", "meta"):
            if f"{module}.{part}" not in stored:
                raise RoseRuntimeError(f"{where}: {module}.{part} is missing though {INDEX} lists {module} as packed")
        if f"{module}.weight" not in shapes:
            raise RoseRuntimeError(f"{where}: {module} is not a layer of the model in config.json")
        rows, cols = shapes[f"{module}.weight"]
        check_shape(where, f"{module}.packed", stored[f"{module}.packed"], (rows, cols // 2))
        try:
            W = cutlass_unpack(stored[f"{module}.packed"], stored[f"{module}.meta"])
        except Exception as exc:  # a meta tensor of the wrong size or dtype
            raise RoseRuntimeError(f"{where}: {module}.meta does not unpack ({first_line(exc)[:100]}): the file is "
                                   f"damaged; re-export it") from None
        check_shape(where, f"{module}.weight (unpacked)", W, (rows, cols))
        if ((W.reshape(rows, cols // 4, 4) != 0).sum(-1) > 2).any():
            raise RoseRuntimeError(f"{where}: {module}.meta does not describe a 2:4 weight: the file is damaged")
        state[f"{module}.weight"] = W
    for name, t in state.items():
        if name not in shapes:
            raise RoseRuntimeError(f"{where}: {name} is not a tensor of the model in config.json")
        check_shape(where, name, t, shapes[name])
        check_finite(where, name, t)
    return index, state, stored


def _model(path: Path, state: dict[str, torch.Tensor], index: dict):
    dtype = HALF[index["dtype"]]
    model = empty_model(load_config(path, FORMAT), dtype)
    load_into(model, {k: t.to(dtype) if t.is_floating_point() else t for k, t in state.items()}, path)
    return model.eval()


def load_dense(path: Path, device: str = "cpu", verify: bool = True):
    """The same weights as plain dense tensors (zeros in place): the reference for the sparse kernels."""
    index, state, _ = read_semi_structured(path, verify)
    return _model(Path(path), state, index).to(device)


def load_sparse(path: Path, device: str = "cuda", backend: str = "cusparselt", verify: bool = True):
    """A transformers model whose 2:4 linear weights are `SparseSemiStructuredTensor`s of `backend`.

    CUTLASS wraps the stored packing as it is; cuSPARSELt compresses each weight now, on this GPU, with the
    library version installed here. The model gets `rose_sparse` = {"backend", "sparse", "dense": {layer: why}}.
    """
    if backend not in BACKENDS:
        raise RoseRuntimeError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if not torch.cuda.is_available() or not str(device).startswith("cuda"):
        raise RoseRuntimeError(f"semi-structured 2:4 weights run only on CUDA GPUs and device {device!r} is not one "
                               f"(CUDA available: {torch.cuda.is_available()}): use the hf or packed24 export on the "
                               f"CPU")
    if backend == "cusparselt" and not torch.backends.cusparselt.is_available():
        raise RoseRuntimeError("this PyTorch build has no cuSPARSELt: use backend='cutlass'")
    path = Path(path)
    index, state, stored = read_semi_structured(path, verify)
    model = _model(path, state, index).to(device)
    cls = classes()[backend]
    sparse, dense = [], dict(index["dense"][backend])
    for module_name in index["layers"]:
        if module_name in dense:
            continue
        module = model.get_submodule(module_name)
        W = module.weight.data
        if backend == "cutlass":
            tensor = cls(W.shape, packed=stored[f"{module_name}.packed"].to(device),
                         meta=stored[f"{module_name}.meta"].to(device), packed_t=None, meta_t=None,
                         compressed_swizzled_bitmask=None)
        else:
            tensor = cls.from_dense(W.contiguous())
        module.weight = torch.nn.Parameter(tensor, requires_grad=False)
        sparse.append(module_name)
    model.rose_sparse = {"backend": backend, "sparse": sparse, "dense": dense}
    return model
