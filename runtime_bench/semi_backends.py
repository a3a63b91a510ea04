"""The semi-structured family: PyTorch's `SparseSemiStructuredTensor` on CUDA, with cuSPARSELt or CUTLASS kernels."""
from __future__ import annotations

from collections.abc import Callable

import torch

from .registry import Backend, LinearOp, Unsupported, cuda, register
from .torch_backends import TorchRunner, sparse_bytes


def _cusparselt() -> str | None:
    if reason := cuda():
        return reason
    return None if torch.backends.cusparselt.is_available() else "this PyTorch build has no cuSPARSELt"


def _linear(backend: str) -> Callable[[torch.Tensor, torch.dtype, int], LinearOp]:
    def build(W: torch.Tensor, dtype: torch.dtype, threads: int) -> LinearOp:
        from export.semi_structured import _classes, why_not

        if reason := why_not(backend, tuple(W.shape), dtype):
            raise Unsupported(reason)
        Ws = _classes()[backend].from_dense(W.to(device="cuda", dtype=dtype).contiguous())
        return LinearOp(fn=lambda x: torch.nn.functional.linear(x, Ws),
                        to_input=lambda x: x.to(device="cuda", dtype=dtype),
                        to_output=lambda y: y.float().cpu(), weight_bytes=sparse_bytes(Ws), cuda=True)
    return build


def _model(backend: str):
    """Loaded from the `semi-structured` export when its dtype matches, else converted in memory (random models)."""
    def build(source, dtype: torch.dtype, threads: int) -> TorchRunner:
        import json

        from export.semi_structured import _classes, why_not
        from rose.arch import all_sublayers
        from rose.masks import is_nm
        from runtime.semi import HALF, INDEX, load_sparse

        if dtype not in HALF.values():
            raise Unsupported(f"{backend} 2:4 kernels take float16 or bfloat16, not {dtype}")
        semi = source.export / "semi-structured" if source.export else None
        if semi is not None and (semi / INDEX).is_file():
            stored = HALF[json.loads((semi / INDEX).read_text())["dtype"]]
            if stored != dtype:
                raise Unsupported(f"the semi-structured export holds {stored}; re-export with --semi-dtype")
            return TorchRunner(load_sparse(semi, "cuda", backend), "cuda")
        model = source.model("cuda", dtype)
        cls = _classes()[backend]
        for name, module in all_sublayers(model).items():
            W = module.weight.data
            if why_not(backend, tuple(W.shape), dtype) is None and is_nm(W, 2, 4):
                module.weight = torch.nn.Parameter(cls.from_dense(W.contiguous()), requires_grad=False)
        return TorchRunner(model, "cuda")
    return build


register(Backend("cusparselt", "cuda", True, "torch-cuda", _cusparselt, _linear("cusparselt"), _model("cusparselt"),
                 "SparseSemiStructuredTensor, cuSPARSELt kernels"))
register(Backend("cutlass", "cuda", True, "torch-cuda", cuda, _linear("cutlass"), _model("cutlass"),
                 "SparseSemiStructuredTensor, CUTLASS kernels (not on Hopper)"))
