"""The backend registry: one small entry per way of running a 2:4 linear layer or a whole model.

An entry says where it runs, whether it is the sparse side of a comparison (and against which dense entry),
why it cannot run on this machine (`available()` returns the reason, or None), and how to build a linear
operator and/or a model runner. A new kernel (a C++ CPU 2:4 GEMM, say) plugs in as one more `register(...)`.
Builders raise `Unsupported` for a case they do not take (a dtype, a shape); the case is then reported as
skipped with that reason.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rose.errors import RoseError

from . import runners
from .runners import Unsupported


@dataclass
class LinearOp:
    """y = x W^T prepared once for one weight: `fn(to_input(x))` is what gets timed."""

    fn: Callable[[Any], Any]
    to_input: Callable[[torch.Tensor], Any]      # fp32 CPU x (already rounded to the dtype) -> what fn takes
    to_output: Callable[[Any], torch.Tensor]     # fn's result -> fp32 CPU tensor
    weight_bytes: int                            # bytes of weights held (and read once per call)
    file_bytes: int | None = None                # serialized size, where the backend has a file format
    cuda: bool = False                           # time with CUDA events


@dataclass(frozen=True)
class Backend:
    name: str
    device: str                                   # "cpu" or "cuda"
    sparse: bool
    baseline: str | None                          # the dense entry a sparse one is compared with
    available: Callable[[], str | None]
    linear: Callable[[torch.Tensor, torch.dtype, int], LinearOp] | None = None   # (W 2:4 fp32 CPU, dtype, threads)
    model: Callable[[Any, torch.dtype, int], Any] | None = None                  # (ModelSource, dtype, threads)
    description: str = ""


BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    BACKENDS[backend.name] = backend
    return backend


def resolve(names: str | list[str] | None, kind: str) -> list[Backend]:
    """The requested entries (default: all that implement `kind`); an unknown name is a one-line error."""
    if names is None:
        return [b for b in BACKENDS.values() if getattr(b, kind) is not None]
    items = names.split(",") if isinstance(names, str) else list(names)
    items = [n.strip() for n in items if n.strip()]
    if not items:
        raise RoseError(f"--backends is empty: choose from {', '.join(BACKENDS)}")
    for n in items:
        if n not in BACKENDS:
            raise RoseError(f"unknown backend {n!r}: choose from {', '.join(BACKENDS)}")
        if getattr(BACKENDS[n], kind) is None:
            raise RoseError(f"backend {n!r} has no {kind} benchmark: choose from "
                            f"{', '.join(b for b, e in BACKENDS.items() if getattr(e, kind) is not None)}")
    return [BACKENDS[n] for n in dict.fromkeys(items)]


# ---- availability ---------------------------------------------------------------------------------------------

def _always() -> None:
    return None


def _cuda() -> str | None:
    return None if torch.cuda.is_available() else "no CUDA device here (torch.cuda.is_available() is False)"


def _cusparselt() -> str | None:
    if reason := _cuda():
        return reason
    return None if torch.backends.cusparselt.is_available() else "this PyTorch build has no cuSPARSELt"


def _ort(provider: str) -> Callable[[], str | None]:
    def check() -> str | None:
        try:
            import onnxruntime as ort
        except ImportError:
            return "onnxruntime is not installed"
        if provider not in ort.get_available_providers():
            return f"onnxruntime {ort.__version__} has no {provider}"
        if provider == "CUDAExecutionProvider":
            return _cuda()  # onnxruntime-gpu lists its CUDA EP even on machines without a GPU
        return None
    return check


def _cpp() -> str | None:
    from runtime.cpu24 import ensure_ops

    isa = ensure_ops()
    return "rose's C++ kernel did not build here (pure-PyTorch fallback only)" if isa == "pytorch-fallback" else None


# ---- linear builders ------------------------------------------------------------------------------------------

def _torch_dense(device: str) -> Callable[[torch.Tensor, torch.dtype, int], LinearOp]:
    def build(W: torch.Tensor, dtype: torch.dtype, threads: int) -> LinearOp:
        if device == "cpu" and dtype != torch.float32 and not _cpu_half_ok(dtype):
            raise Unsupported(f"torch on this CPU has no {dtype} matmul")
        Wd = W.to(device=device, dtype=dtype).contiguous()
        return LinearOp(fn=lambda x: torch.nn.functional.linear(x, Wd),
                        to_input=lambda x: x.to(device=device, dtype=dtype),
                        to_output=lambda y: y.float().cpu(), weight_bytes=Wd.nbytes, cuda=device == "cuda")
    return build


def _cpu_half_ok(dtype: torch.dtype) -> bool:
    try:
        torch.nn.functional.linear(torch.ones(2, 8, dtype=dtype), torch.ones(4, 8, dtype=dtype))
        return True
    except RuntimeError:
        return False


def _semi_structured(backend: str) -> Callable[[torch.Tensor, torch.dtype, int], LinearOp]:
    def build(W: torch.Tensor, dtype: torch.dtype, threads: int) -> LinearOp:
        from export.semi_structured import _classes, why_not

        if reason := why_not(backend, tuple(W.shape), dtype):
            raise Unsupported(reason)
        Ws = _classes()[backend].from_dense(W.to(device="cuda", dtype=dtype).contiguous())
        return LinearOp(fn=lambda x: torch.nn.functional.linear(x, Ws),
                        to_input=lambda x: x.to(device="cuda", dtype=dtype),
                        to_output=lambda y: y.float().cpu(), weight_bytes=runners.sparse_bytes(Ws), cuda=True)
    return build


def _ort_linear(provider: str, packed: bool) -> Callable[[torch.Tensor, torch.dtype, int], LinearOp]:
    def build(W: torch.Tensor, dtype: torch.dtype, threads: int) -> LinearOp:
        graph = runners.linear_onnx(W, dtype, packed)
        if isinstance(graph, str):
            raise Unsupported(graph)
        sess = runners.ort_session(graph, provider, threads)
        fn, to_input, to_output = runners.ort_linear_io(sess, provider, dtype)
        return LinearOp(fn=fn, to_input=to_input, to_output=to_output, weight_bytes=W.numel() * runners.elem(dtype),
                        file_bytes=len(graph))
    return build


def _cpp_linear(W: torch.Tensor, dtype: torch.dtype, threads: int) -> LinearOp:
    from runtime.cpu24 import DTYPES, TILE_BYTES, Sparse24Linear

    if dtype not in DTYPES:
        raise Unsupported(f"the C++ 2:4 kernel takes float32 or bfloat16 values, not {dtype}")
    mod = Sparse24Linear.from_dense(W, dtype=dtype)
    op, args = torch.ops.rose.sparse24_linear, (mod.values, mod.masks, mod.out_features, mod.in_features, None,
                                                mod.isa, mod.dense_from, TILE_BYTES)
    # the operator itself, as torch-cpu times F.linear itself (no module call around it)
    return LinearOp(fn=lambda x: op(x, *args), to_input=lambda x: x.to(dtype), to_output=lambda y: y.float(),
                    weight_bytes=mod.weight_bytes)


# ---- the entries ----------------------------------------------------------------------------------------------

CPU_EP, CUDA_EP = "CPUExecutionProvider", "CUDAExecutionProvider"

register(Backend("torch-cpu", "cpu", False, None, _always, _torch_dense("cpu"), runners.torch_model("cpu"),
                 "PyTorch dense matmul on the CPU (zeros stored)"))
register(Backend("torch-cuda", "cuda", False, None, _cuda, _torch_dense("cuda"), runners.torch_model("cuda"),
                 "PyTorch dense matmul on CUDA (cuBLAS)"))
register(Backend("cusparselt", "cuda", True, "torch-cuda", _cusparselt, _semi_structured("cusparselt"),
                 runners.semi_model("cusparselt"), "SparseSemiStructuredTensor, cuSPARSELt kernels"))
register(Backend("cutlass", "cuda", True, "torch-cuda", _cuda, _semi_structured("cutlass"),
                 runners.semi_model("cutlass"), "SparseSemiStructuredTensor, CUTLASS kernels (not on Hopper)"))
register(Backend("cpp", "cpu", True, "torch-cpu", _cpp, _cpp_linear, runners.cpp_model(),
                 "rose's C++ 2:4 kernel (cpp/): packed values + 2-bit masks, AVX-512/AVX2/scalar"))
register(Backend("onnx-cpu", "cpu", False, None, _ort(CPU_EP), _ort_linear(CPU_EP, False),
                 runners.ort_model(CPU_EP, "onnx"), "onnxruntime CPU EP on the dense onnx export"))
register(Backend("onnx-packed24-cpu", "cpu", True, "onnx-cpu", _ort(CPU_EP), _ort_linear(CPU_EP, True),
                 runners.ort_model(CPU_EP, "onnx-packed24"), "onnxruntime CPU EP on onnx-packed24 (unpacked at load)"))
register(Backend("onnx-cuda", "cuda", False, None, _ort(CUDA_EP), _ort_linear(CUDA_EP, False),
                 runners.ort_model(CUDA_EP, "onnx"), "onnxruntime CUDA EP on the dense onnx export"))
register(Backend("onnx-packed24-cuda", "cuda", True, "onnx-cuda", _ort(CUDA_EP), _ort_linear(CUDA_EP, True),
                 runners.ort_model(CUDA_EP, "onnx-packed24"), "onnxruntime CUDA EP on onnx-packed24"))
