"""rose's GPU 2:4 family: the Triton decode kernel alone (`triton24`, linear only: 1 to 16 tokens) and the
dispatching layer `runtime.gpu24.Gpu24Linear` in its stored forms (`gpu24`: the default, cuSPARSELt plus the
kernel where it can share cuSPARSELt's values; `gpu24-cslt`: cuSPARSELt alone, the "without the kernel" variant;
`gpu24-triton`: the kernel's layout alone, prefill by expansion), all compared with `torch-cuda`."""
from __future__ import annotations

from collections.abc import Callable

import torch

from .registry import Backend, LinearOp, Unsupported, cuda, register
from .torch_backends import TorchRunner

HALF = (torch.float16, torch.bfloat16)


def _triton() -> str | None:
    if reason := cuda():
        return reason
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    return None


def _gpu24() -> str | None:
    if reason := _triton():
        return reason
    return None if torch.backends.cusparselt.is_available() else "this PyTorch build has no cuSPARSELt"


def _half(dtype: torch.dtype, what: str) -> None:
    if dtype not in HALF:
        raise Unsupported(f"{what} takes float16 or bfloat16, not {dtype}")


def _triton_linear(W: torch.Tensor, dtype: torch.dtype, threads: int) -> LinearOp:
    from runtime import triton24 as t24

    _half(dtype, "the Triton 2:4 kernel")
    packed = t24.pack_dense(W.to(device="cuda", dtype=dtype))
    return LinearOp(fn=lambda x: t24.linear(x, packed), to_input=lambda x: x.to(device="cuda", dtype=dtype),
                    to_output=lambda y: y.float(), weight_bytes=packed.nbytes, cuda=True,
                    max_tokens=t24.max_rows(), info={"config_rule": "pick_config"})


def _gpu24_linear(store: str) -> Callable[[torch.Tensor, torch.dtype, int], LinearOp]:
    def build(W: torch.Tensor, dtype: torch.dtype, threads: int) -> LinearOp:
        from runtime.errors import RoseRuntimeError
        from runtime.gpu24 import Gpu24Linear

        _half(dtype, "the GPU 2:4 layer")
        try:
            layer = Gpu24Linear(W.to(device="cuda", dtype=dtype), store=store, contiguous=True, name="linear")
        except RoseRuntimeError as exc:
            raise Unsupported(str(exc)) from None
        return LinearOp(fn=layer, to_input=lambda x: x.to(device="cuda", dtype=dtype),
                        to_output=lambda y: y.float(), weight_bytes=layer.weight_bytes, cuda=True,
                        info={"form": layer.form, "crossover": layer.crossover})
    return build


def _gpu24_model(store: str):
    """From the export's semi-structured (or packed24) weights when their dtype matches; else the dense model
    converted in memory (random presets)."""
    def build(source, dtype: torch.dtype, threads: int) -> TorchRunner:
        import json

        from runtime.gpu24 import load_gpu24, sparsify_gpu
        from runtime.semi import HALF as SEMI_HALF, INDEX

        _half(dtype, "the GPU 2:4 layer")
        semi = source.export / "semi-structured" if source.export else None
        if semi is not None and (semi / INDEX).is_file() and \
                SEMI_HALF[json.loads((semi / INDEX).read_text())["dtype"]] == dtype:
            model = load_gpu24(semi, "cuda", store=store)
        else:
            model = source.model("cuda", dtype)
            sparsify_gpu(model, store=store)
        report = model.rose_gpu24
        info = {"store": store, "forms": report["forms"], "sparse_layers": len(report["sparse"]),
                "dense_layers": report["dense"],
                "linear_bytes_vs_dense": round(report["weight_bytes"] / max(1, report["dense_weight_bytes"]), 4)}
        return TorchRunner(model, "cuda", info=info)
    return build


register(Backend("triton24", "cuda", True, "torch-cuda", _triton, _triton_linear, None,
                 "rose's Triton 2:4 decode kernel alone (runtime/triton24.py), 1 to 16 tokens"))
register(Backend("gpu24", "cuda", True, "torch-cuda", _gpu24, _gpu24_linear("auto"), _gpu24_model("auto"),
                 "runtime.gpu24 default: Triton kernel up to 16 tokens (sharing cuSPARSELt's values where "
                 "possible), cuSPARSELt with searched algorithms above"))
register(Backend("gpu24-cslt", "cuda", True, "torch-cuda", _gpu24, _gpu24_linear("cusparselt"),
                 _gpu24_model("cusparselt"), "runtime.gpu24 with cuSPARSELt alone (searched algorithms, no Triton)"))
register(Backend("gpu24-triton", "cuda", True, "torch-cuda", _triton, _gpu24_linear("triton"),
                 _gpu24_model("triton"), "runtime.gpu24 with the Triton layout alone (56% of dense; prefill "
                 "expands the weight, then cuBLAS)"))
