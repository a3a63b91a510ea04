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


def refused(backend: str, weight, dtype: torch.dtype) -> None:
    """Unsupported (a skipped case, with PyTorch's reason) when this GPU refuses the backend's kernels: CUTLASS's
    2:4 kernels refuse Hopper ("sparse_semi_structured_mad_op: Supported only on GPUs with ...")."""
    from runtime.errors import first_line

    try:
        torch.nn.functional.linear(torch.ones(16, weight.shape[1], dtype=dtype, device=weight.device), weight)
        if weight.is_cuda:
            torch.cuda.synchronize()
    except (RuntimeError, NotImplementedError) as exc:
        raise Unsupported(f"{backend} refused on this GPU: {first_line(exc)[:200]}") from None


def _linear(backend: str) -> Callable[[torch.Tensor, torch.dtype, int], LinearOp]:
    def build(W: torch.Tensor, dtype: torch.dtype, threads: int) -> LinearOp:
        from export.semi_structured import _classes, why_not

        if reason := why_not(backend, tuple(W.shape), dtype):
            raise Unsupported(reason)
        Ws = _classes()[backend].from_dense(W.to(device="cuda", dtype=dtype).contiguous())
        refused(backend, Ws, dtype)
        return LinearOp(fn=lambda x: torch.nn.functional.linear(x, Ws),
                        to_input=lambda x: x.to(device="cuda", dtype=dtype),
                        to_output=lambda y: y.float(), weight_bytes=sparse_bytes(Ws), cuda=True)
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
            model = load_sparse(semi, "cuda", backend)
            if model.rose_sparse["sparse"]:
                refused(backend, model.get_submodule(model.rose_sparse["sparse"][0]).weight, dtype)
            return TorchRunner(model, "cuda")
        model = source.model("cuda", dtype)
        cls = _classes()[backend]
        first = None
        for name, module in all_sublayers(model).items():
            W = module.weight.data
            if why_not(backend, tuple(W.shape), dtype) is None and is_nm(W, 2, 4):
                module.weight = torch.nn.Parameter(cls.from_dense(W.contiguous()), requires_grad=False)
                if first is None:
                    first = module.weight
                    refused(backend, first, dtype)
        return TorchRunner(model, "cuda")
    return build


register(Backend("cusparselt", "cuda", True, "torch-cuda", _cusparselt, _linear("cusparselt"), _model("cusparselt"),
                 "SparseSemiStructuredTensor, cuSPARSELt kernels"))
register(Backend("cutlass", "cuda", True, "torch-cuda", cuda, _linear("cutlass"), _model("cutlass"),
                 "SparseSemiStructuredTensor, CUTLASS kernels (not on Hopper)"))
