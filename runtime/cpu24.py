"""2:4 on the CPU with rose's C++ kernel (`cpp/`): `torch.ops.rose.sparse24_*`, `Sparse24Linear`, and loaders
that turn a pruned model or a `packed24` directory into one whose 2:4 linears hold only packed weights.

The kernel is built on first use with `torch.utils.cpp_extension` (cached; `make install` builds it up front).
Where it cannot be built there is one warning and the same operators run in pure PyTorch (unpack, then matmul),
so every caller works everywhere; only the speed differs.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from .errors import RoseRuntimeError, first_line

log = logging.getLogger(__name__)

CPP_DIR = Path(__file__).resolve().parents[1] / "cpp"
SOURCES = ("sparse24.cpp", "torch_ops.cpp")
ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}
DTYPES = (torch.float32, torch.bfloat16)
# From this many tokens on, a call unpacks a few panels at a time into a small dense tile and uses BLAS
# (crossovers measured on the 2-core dev machine, docs/bench/cpu; override with ROSE24_DENSE_FROM). 0: never.
# With AVX-512 the kernel decodes blocks once for many tokens (cpp/README.md) and beats PyTorch's fp32 BLAS at every
# count (4096x4096, 1 thread: 57.8 against 132.5 ms of tiles at 256 tokens, 241 against 496 ms at 1024); PyTorch's
# bf16 matmul stays ahead from 32 tokens on (34.7 against 57.8 ms at 256).
DENSE_FROM = {torch.float32: 256, torch.bfloat16: 32}
DENSE_FROM_AVX512 = {torch.float32: 0, torch.bfloat16: 32}
TILE_BYTES = 8 << 20

_state: dict[str, object] = {}


def _build() -> str | None:
    """Build and load the C++ operators; None when they are there, else why not (one line)."""
    if not all((CPP_DIR / s).is_file() for s in SOURCES):
        return f"the C++ sources are not in {CPP_DIR} (install rose from a source checkout with pip install -e)"
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(name="rose_sparse24", sources=[str(CPP_DIR / s) for s in SOURCES],
                           # -fopenmp: at::parallel_for is OpenMP pragmas inlined into this library; without
                           # the flag it runs serially. libgomp.so.1 resolves to the copy torch already loaded.
                           extra_cflags=["-O3", "-std=c++17", "-fopenmp"], extra_ldflags=["-fopenmp"],
                           extra_include_paths=[str(CPP_DIR)],
                           is_python_module=False, verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the fallback
        return f"building it failed: {first_line(exc)}"
    return None


def _define_fallback() -> None:
    """The same operators in pure PyTorch (slow but identical results), for machines that cannot build `cpp/`."""
    lib = torch.library.Library("rose", "DEF")
    _state["fallback_lib"] = lib
    lib.define("sparse24_pack(Tensor weight) -> (Tensor values, Tensor masks)")
    lib.define("sparse24_pack_bitmask(Tensor kept, Tensor bitmask, int rows, int cols) -> (Tensor values, Tensor masks)")
    lib.define("sparse24_unpack(Tensor values, Tensor masks, int rows, int cols) -> Tensor")
    lib.define("sparse24_linear(Tensor x, Tensor values, Tensor masks, int rows, int cols, Tensor? bias=None, "
               "int isa=0, int dense_from=0, int tile_bytes=8388608) -> Tensor")
    lib.define("sparse24_isa() -> str")
    lib.define("sparse24_parallel_threads() -> int")
    from . import cpu24_reference as ref

    lib.impl("sparse24_pack", ref.pack, "CPU")
    lib.impl("sparse24_pack_bitmask", ref.pack_bitmask, "CPU")
    lib.impl("sparse24_unpack", ref.unpack, "CPU")
    lib.impl("sparse24_linear", ref.linear, "CPU")
    lib.impl("sparse24_isa", lambda: "pytorch-fallback", "CompositeExplicitAutograd")
    lib.impl("sparse24_parallel_threads", lambda: torch.get_num_threads(), "CompositeExplicitAutograd")


def ensure_ops() -> str:
    """Make `torch.ops.rose.sparse24_*` available; returns the code path this CPU runs ('avx512', 'avx2',
    'scalar', or 'pytorch-fallback' where the C++ build is not available)."""
    if "isa" not in _state:
        why = "ROSE24_DISABLE_CPP is set" if os.environ.get("ROSE24_DISABLE_CPP") else _build()
        if why:
            warnings.warn(f"rose's C++ 2:4 kernel is not available ({why}); using the slow pure-PyTorch fallback",
                          RuntimeWarning, stacklevel=2)
            _define_fallback()
        _state["isa"] = torch.ops.rose.sparse24_isa()
    return str(_state["isa"])


def default_dense_from(dtype: torch.dtype) -> int:
    """The token count from which calls go through dense tiles and BLAS on this CPU (0: never)."""
    return (DENSE_FROM_AVX512 if ensure_ops() == "avx512" else DENSE_FROM)[dtype]


def _call(op: str, *args, what: str = "weight"):
    try:
        return getattr(torch.ops.rose, op)(*args)
    except RuntimeError as exc:
        raise RoseRuntimeError(f"{what}: {first_line(exc).removeprefix('sparse24: ')}") from None


def pack(W: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """(values, masks) of a dense 2:4 matrix (fp32 or bf16); an error names `name` and the offending group."""
    ensure_ops()
    return _call("sparse24_pack", W.detach(), what=name)


class Sparse24Linear(nn.Module):
    """y = x W^T + b with W held only as packed 2:4 values and 2-bit masks (no dense copy).

    `isa` forces a code path ('scalar' for tests); `dense_from` is the token count from which calls go through
    small dense tiles and BLAS (0: never).
    """

    def __init__(self, values: torch.Tensor, masks: torch.Tensor, rows: int, cols: int,
                 bias: torch.Tensor | None = None, isa: str = "auto", dense_from: int | None = None,
                 name: str = "weight"):
        super().__init__()
        if isa not in ISAS:
            raise RoseRuntimeError(f"unknown code path {isa!r}: choose from {', '.join(ISAS)}")
        if values.dtype not in DTYPES:
            raise RoseRuntimeError(f"{name}: the C++ 2:4 kernel holds float32 or bfloat16 values, not {values.dtype}")
        self.in_features, self.out_features, self.name = cols, rows, name
        self.register_buffer("values", values)
        self.register_buffer("masks", masks)
        # the bias stays fp32: the kernel adds it in fp32 whatever the values' dtype
        self.bias = nn.Parameter(bias.detach().float(), requires_grad=False) if bias is not None else None
        self.isa = ISAS[isa]
        if dense_from is None:  # an explicit argument wins over the environment, which wins over the default
            env = os.environ.get("ROSE24_DENSE_FROM")
            dense_from = int(env) if env else default_dense_from(values.dtype)
        self.dense_from = dense_from

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, name: str = "weight",
                   dtype: torch.dtype | None = None, **kw) -> "Sparse24Linear":
        dtype = dtype or weight.dtype
        if dtype not in DTYPES:
            raise RoseRuntimeError(f"{name}: the C++ 2:4 kernel takes float32 or bfloat16 weights, not {dtype}")
        if weight.dim() != 2 or weight.shape[1] % 4:
            raise RoseRuntimeError(f"{name}: a 2:4 weight needs a 2-D shape with columns a multiple of 4, got "
                            f"{tuple(weight.shape)}")
        values, masks = pack(weight.to(dtype), name)
        return cls(values, masks, weight.shape[0], weight.shape[1], bias, name=name, **kw)

    @classmethod
    def from_linear(cls, linear: nn.Linear, name: str = "weight", dtype: torch.dtype | None = None,
                    **kw) -> "Sparse24Linear":
        return cls.from_dense(linear.weight.data, linear.bias.data if linear.bias is not None else None, name, dtype,
                              **kw)

    @classmethod
    def from_packed24(cls, kept: torch.Tensor, bitmask: torch.Tensor, shape: tuple[int, int],
                      bias: torch.Tensor | None = None, name: str = "weight", **kw) -> "Sparse24Linear":
        """Straight from the `packed24` export's (compressed, bitmask): the dense weight is never built."""
        ensure_ops()
        rows, cols = shape
        values, masks = _call("sparse24_pack_bitmask", kept, bitmask, rows, cols, what=name)
        return cls(values, masks, rows, cols, bias, name=name, **kw)

    @property
    def weight_bytes(self) -> int:
        return self.values.nbytes + self.masks.nbytes + (self.bias.nbytes if self.bias is not None else 0)

    def dense_weight(self) -> torch.Tensor:
        """The dense matrix (for checks; the module itself never keeps one)."""
        return _call("sparse24_unpack", self.values, self.masks, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return torch.ops.rose.sparse24_linear(x, self.values, self.masks, self.out_features, self.in_features,
                                                  self.bias, self.isa, self.dense_from, TILE_BYTES)
        except RuntimeError as exc:
            raise RoseRuntimeError(f"{self.name}: {first_line(exc).removeprefix('sparse24: ')}") from None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.values.dtype}, "
                f"bias={self.bias is not None}")


def _linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer of a model except its output embedding (`lm_head`), which 2:4 pruning leaves dense."""
    try:  # GPT-2 style models store linear weights transposed
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = ()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and m is not head}


def sparsify(model: nn.Module, names: Iterable[str] | None = None, dtype: torch.dtype | None = None,
             **kw) -> list[str]:
    """Swap linears for `Sparse24Linear` in place; returns their names. `names` picks them (rose's pruned layers,
    say); by default every linear but the output embedding. One that is not 2:4, or not an `nn.Linear`, is an
    error naming it. Other modules (embeddings, lm_head, norms) stay as they are."""
    ensure_ops()
    found = _linears(model)
    chosen = list(found) if names is None else list(names)
    swapped = []
    for name in chosen:
        module = found.get(name) or model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise RoseRuntimeError(f"{name} is a {type(module).__name__}; the C++ 2:4 kernel replaces nn.Linear "
                                   f"layers only")
        parent, _, child = name.rpartition(".")
        new = Sparse24Linear.from_linear(module, name, dtype or module.weight.dtype, **kw)
        setattr(model.get_submodule(parent), child, new)
        swapped.append(name)
    return swapped


def load_packed24_cpu(path: Path, dtype: torch.dtype | None = None, verify: bool = True, **kw) -> nn.Module:
    """A transformers model from a `packed24` directory whose packed linears are `Sparse24Linear` modules, built
    from the stored kept values and bitmasks; dense linears are never allocated (they start on the meta device).
    The directory is checked first (`runtime.packed24.read_packed24`; `verify=False` skips the hashes)."""
    from .packed24 import WEIGHTS, read_packed24
    from .verify import empty_model, load_into

    path = Path(path)
    packed = read_packed24(path, verify)
    ensure_ops()
    dense = packed.dense_tensors()
    floats = [t.dtype for t in packed.tensors.values() if t.is_floating_point()]
    if not floats:
        raise RoseRuntimeError(f"{path / WEIGHTS} holds no floating-point tensors: re-export it")
    dtype = dtype or floats[0]
    if dtype not in DTYPES:
        raise RoseRuntimeError(f"the C++ 2:4 kernel takes float32 or bfloat16; pass dtype=torch.float32 for {path}")
    model = empty_model(packed.config, dtype)
    for module, shape in packed.modules.items():
        new = Sparse24Linear.from_packed24(packed.kept(module).to(dtype), packed.bitmask(module), shape,
                                           dense.pop(f"{module}.bias", None), module, **kw)
        parent, _, child = module.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    load_into(model, {name: t.to(dtype) if t.is_floating_point() else t for name, t in dense.items()}, path)
    return model.eval()
