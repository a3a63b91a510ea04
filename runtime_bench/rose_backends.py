"""rose's own kernels: the C++ 2:4 CPU kernel (`runtime.cpu24`, built from cpp/)."""
from __future__ import annotations

import torch

from .registry import Backend, LinearOp, Unsupported, register
from .torch_backends import TorchRunner


def _cpp() -> str | None:
    from runtime.cpu24 import ensure_ops

    isa = ensure_ops()
    return "rose's C++ kernel did not build here (pure-PyTorch fallback only)" if isa == "pytorch-fallback" else None


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


def _cpp_model(source, dtype: torch.dtype, threads: int) -> TorchRunner:
    """Straight from the packed24 export when there is one in this dtype, else the dense model converted in memory
    (random presets, or pruned directories without packed24)."""
    import copy

    from rose.arch import all_sublayers
    from runtime.cpu24 import DTYPES, load_packed24_cpu, sparsify

    if dtype not in DTYPES:
        raise Unsupported(f"the C++ 2:4 kernel takes float32 or bfloat16 values, not {dtype}")
    packed = source.export / "packed24" if source.export else None
    if packed is not None and (packed / "model.safetensors").is_file():
        return TorchRunner(load_packed24_cpu(packed, dtype), "cpu")
    model = copy.deepcopy(source.model("cpu", dtype))
    sparsify(model, all_sublayers(model))
    return TorchRunner(model, "cpu")


register(Backend("cpp", "cpu", True, "torch-cpu", _cpp, _cpp_linear, _cpp_model,
                 "rose's C++ 2:4 kernel (cpp/): packed values + 2-bit masks, AVX-512/AVX2/scalar"))
