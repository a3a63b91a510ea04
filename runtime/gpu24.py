"""rose's GPU 2:4 linear layer: cuSPARSELt for prefill, the Triton decode kernel for 1 to 16 tokens.

    from runtime.gpu24 import Gpu24Linear, sparsify_gpu, load_gpu24

Per layer, everything is made once at load: the weight in the stored form(s) chosen below, and, per process, the
cuSPARSELt algorithm found by `torch._cslt_sparse_mm_search` for each (rows, cols, dtype, token bucket), kept in
`AlgoCache` (buckets: 16, 32, 64, ... 16384 tokens, the count rounded up to a power of two; a search runs once
per key, on the first call that needs it, never under CUDA-graph capture). `forward` dispatches by the number of
rows (tokens) in x:

- rows <= `crossover` (default `DEFAULT_CROSSOVER` = 16, the kernel's limit) and a Triton layout is held: the
  Triton kernel (`runtime/triton24.py`), which reads only the kept values and 4-bit masks;
- otherwise cuSPARSELt: `torch._cslt_sparse_mm(compressed, x2d.t())` with the searched algorithm, x padded to
  cuSPARSELt's row multiple (its workspace is allocated by PyTorch on each call from the caching allocator; inside
  a CUDA graph, once, from the graph's pool). cuSPARSELt writes W x^T (out x tokens, row-major); its transpose is the output in
  the layout (tokens x out) but strided. `contiguous=True` copies it (attention's q, k, v need contiguous rows:
  strided ones push scaled_dot_product_attention off its fused kernels); `contiguous=False` hands the strided
  view on, which elementwise consumers (o_proj's residual add, the MLP's act(gate) * up, down_proj's input)
  take without a copy. `transpose_result=True` is never used: it crashed under CUDA-graph capture on an H100.
- no compressed copy held (`store="triton"`): the kernel's layout is expanded into a shared scratch buffer by one
  Triton launch, then cuBLAS; this costs about one extra write and read of the weight per call.

MEMORY, the trade-off (fp16/bf16; dense = 2 bytes per weight):
- cuSPARSELt's compressed copy: kept values (50%) + its metadata (6.25%) = about 56%;
- the Triton layout: kept values (50%) + 4-bit masks (6.25%) = 56.25%;
- both: about 112%, more than the dense weight, so `store="both"` is for measurement only.
`store` picks one stored form per deployment:
- "cusparselt": 56%; prefill gains from the sparse tensor cores; decode runs through cuSPARSELt too (x padded
  to its row multiple), which was no faster than dense cuBLAS at 1 token on an H100.
- "triton": 56.25%; decode through the kernel (memory-bound: up to 1.78x dense); prefill expands the weight and
  runs dense cuBLAS, so it is about dense speed minus the expansion.
- "auto" (the default): cuSPARSELt's copy, plus the kernel's 4-bit masks (6.25%) when the kernel can read its
  kept values straight out of cuSPARSELt's compressed buffer. PyTorch documents that buffer as [kept values |
  metadata], the first rows x cols/2 elements being the kept values; whether they are in the kernel's order is
  checked at load, on this GPU with this cuSPARSELt, for every layer: masks are derived that place each stored
  value on a column of the dense weight holding that value, and the result must rebuild the weight exactly. Then
  the layer holds about 62.5% of dense and has both fast paths ("shared"). If the check fails, the layer keeps
  cuSPARSELt's copy alone ("cusparselt": 56%, decode through cuSPARSELt) and says so once. The 57% target is met
  by "cusparselt" and "triton" but not by "shared" (62.5%): meeting it with both fast paths needs the kernel to
  read cuSPARSELt's own metadata, whose layout is undocumented (the GPU procedure dumps it:
  `cslt_layout_report`).
`Gpu24Linear.form` says what a layer holds; `weight_bytes` counts it.

Everything here checks its input and raises one-line `RoseRuntimeError`s: a layer that is not 2:4, not fp16/bf16,
or of a shape cuSPARSELt refuses; no CUDA or no cuSPARSELt in this build. The cuSPARSELt calls go through an
`ops` object (`TorchCslt` by default), so the CPU tests run everything above the library with a stand-in.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import triton24 as t24
from .errors import RoseRuntimeError, first_line

log = logging.getLogger(__name__)

DEFAULT_CROSSOVER = 16          # rows up to this go to the Triton kernel (measured per shape by the GPU procedure)
STORES = ("auto", "cusparselt", "triton", "both")
MIN_BUCKET, MAX_BUCKET = 16, 16384
DTYPES = (torch.float16, torch.bfloat16)
# output layout per LLaMA-family sublayer (`contiguous="auto"`): whose consumer is elementwise
STRIDED_OK = ("o_proj", "gate_proj", "up_proj", "down_proj")


def token_bucket(tokens: int) -> int:
    """The algorithm cache's bucket of a token count: the next power of two, at least 16, at most 16384."""
    if tokens < 1:
        raise RoseRuntimeError(f"token count must be >= 1, got {tokens}")
    return min(MAX_BUCKET, max(MIN_BUCKET, 1 << (tokens - 1).bit_length()))


# ---- cuSPARSELt calls ----------------------------------------------------------------------------------------

class TorchCslt:
    """cuSPARSELt through PyTorch's private operators (CUDA only)."""

    name = "cusparselt"

    def why_not(self, device: torch.device) -> str | None:
        if device.type != "cuda" or not torch.cuda.is_available():
            return (f"the GPU 2:4 path needs a CUDA device with cuSPARSELt, and the weight is on {device} "
                    f"(CUDA available: {torch.cuda.is_available()}): use runtime.cpu24 on the CPU")
        if not torch.backends.cusparselt.is_available():
            return "this PyTorch build has no cuSPARSELt (torch.backends.cusparselt.is_available() is False)"
        return None

    def row_multiple(self, dtype: torch.dtype) -> int:
        """Rows (tokens) of x are padded to a multiple of this (PyTorch's own table; 8 for fp16/bf16)."""
        try:
            from torch.sparse import SparseSemiStructuredTensorCUSPARSELT as C

            return int(C._DTYPE_SHAPE_CONSTRAINTS[dtype].dense_min_rows)
        except Exception:  # noqa: BLE001 - another torch: 16 is a multiple of every requirement
            return 16

    def min_shape(self, dtype: torch.dtype) -> tuple[int, int]:
        try:
            from torch.sparse import SparseSemiStructuredTensorCUSPARSELT as C

            c = C._DTYPE_SHAPE_CONSTRAINTS[dtype]
            return int(c.sparse_min_rows), int(c.sparse_min_cols)
        except Exception:  # noqa: BLE001
            return 32, 64

    def compress(self, weight: torch.Tensor) -> torch.Tensor:
        return torch._cslt_compress(weight)

    def mm(self, compressed: torch.Tensor, dense_t: torch.Tensor, alg_id: int) -> torch.Tensor:
        if alg_id:
            return torch._cslt_sparse_mm(compressed, dense_t, alg_id=alg_id)
        return torch._cslt_sparse_mm(compressed, dense_t)

    def search(self, compressed: torch.Tensor, dense_t: torch.Tensor) -> int:
        return int(torch._cslt_sparse_mm_search(compressed, dense_t))


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@dataclass
class AlgoCache:
    """cuSPARSELt algorithm per (rows, cols, dtype, token bucket), found once by search and shared by every layer
    of that shape. A search that fails leaves the default algorithm (0) and records why; so does a searched
    algorithm that then fails to run (`demote`). Nothing is searched while a CUDA graph is being captured (the
    default is used for that call and nothing is cached): warm up before capturing."""

    table: dict[tuple, int] = field(default_factory=dict)
    errors: dict[tuple, str] = field(default_factory=dict)
    searches: int = 0
    hits: int = 0

    @staticmethod
    def key(rows: int, cols: int, dtype: torch.dtype, tokens: int) -> tuple:
        return rows, cols, str(dtype).replace("torch.", ""), token_bucket(tokens)

    def get(self, ops, compressed: torch.Tensor, dense_t: torch.Tensor, rows: int, cols: int, dtype: torch.dtype,
            tokens: int) -> int:
        k = self.key(rows, cols, dtype, tokens)
        if k in self.table:
            self.hits += 1
            return self.table[k]
        if _capturing():
            return 0
        self.searches += 1
        try:
            alg = int(ops.search(compressed, dense_t))
        except Exception as exc:  # noqa: BLE001 - any failure: the default algorithm, and why
            alg = 0
            self.errors[k] = f"search failed: {first_line(exc)[:160]}"
        self.table[k] = alg
        return alg

    def demote(self, k: tuple, why: str) -> None:
        self.table[k] = 0
        self.errors[k] = f"algorithm failed, default used: {why[:160]}"

    def clear(self) -> None:
        self.table.clear()
        self.errors.clear()
        self.searches = self.hits = 0

    def report(self) -> dict:
        return {"algorithms": {"x".join(map(str, k[:2])) + f" {k[2]} <= {k[3]} tokens": v
                               for k, v in sorted(self.table.items())},
                "errors": {"x".join(map(str, k[:2])) + f" {k[2]} <= {k[3]} tokens": v
                           for k, v in sorted(self.errors.items())},
                "searches": self.searches, "hits": self.hits}


ALGOS = AlgoCache()   # the process's cache, used unless a layer is given another
_SCRATCH: dict[tuple, torch.Tensor] = {}


def scratch(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A shared buffer for expanded weights (one per device and dtype, grown to the largest layer; layers run one
    after another on a stream, so one buffer serves them all). Reserve it at load (`sparsify_gpu` does), not under
    graph capture."""
    key = (str(device), dtype)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf


# ---- sharing cuSPARSELt's kept values with the kernel --------------------------------------------------------

def masks_for_values(dense: torch.Tensor, values: torch.Tensor) -> torch.Tensor | None:
    """The kernel's masks that put each pair of `values` (rows x cols/2, in group order) on columns of `dense`
    holding those values (first value on the lower column), such that every nonzero of `dense` is covered; None
    when no such masks exist (the values are not the kept values in the kernel's order). Zeros may sit on any zero
    column: a group with fewer than two nonzeros can be stored either way."""
    rows, cols = dense.shape
    if values.shape != (rows, cols // 2) or cols % 4:
        return None
    d = dense.reshape(rows, cols // 4, 4)
    v = values.reshape(rows, cols // 4, 2).to(dense.dtype)
    col = torch.arange(4, device=dense.device, dtype=torch.uint8)        # uint8 throughout: 7B layers are large
    none = torch.full((), 4, device=dense.device, dtype=torch.uint8)
    c0 = torch.where(d == v[..., :1], col, none).amin(-1)
    c1 = torch.where((d == v[..., 1:]) & (col > c0.unsqueeze(-1)), col, none).amin(-1)
    if bool(((c0 > 3) | (c1 > 3)).any()):
        return None
    one = torch.ones((), dtype=torch.uint8, device=dense.device)
    keep = (one << c0) | (one << c1)
    kept_cols = ((keep.unsqueeze(-1) >> col) & 1).bool()
    if bool(((d != 0) & ~kept_cols).any()):
        return None
    pad = keep if (cols // 4) % 2 == 0 else torch.cat([keep, keep.new_zeros(rows, 1)], dim=1)
    bitmask = pad[:, 0::2] | (pad[:, 1::2] << 4)
    return t24._masks_from_bitmask(bitmask, cols)


def values_view(compressed: torch.Tensor, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The first rows x cols/2 elements of a cuSPARSELt buffer as a rows x cols/2 matrix of `dtype` (a view)."""
    flat = compressed.reshape(-1)
    if flat.dtype != dtype:
        try:
            flat = flat.view(dtype)
        except RuntimeError:
            return None
    n = rows * cols // 2
    if flat.numel() < n:
        return None
    return flat[:n].view(rows, cols // 2)


# ---- the layer -----------------------------------------------------------------------------------------------

class Gpu24Linear(nn.Module):
    """y = x W^T + b for a 2:4 W in fp16/bf16 on a CUDA GPU; see the module docstring for the stored forms and the
    dispatch. Build it from the dense 2:4 weight on the GPU (`from_dense`, `from_linear`, or `sparsify_gpu` for a
    whole model)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, store: str = "auto",
                 crossover: int = DEFAULT_CROSSOVER, contiguous: bool = True, name: str = "weight", ops=None,
                 algos: AlgoCache | None = None):
        super().__init__()
        if store not in STORES:
            raise RoseRuntimeError(f"{name}: unknown store {store!r}: choose one of {', '.join(STORES)}")
        if crossover < 0:
            raise RoseRuntimeError(f"{name}: crossover must be >= 0, got {crossover}")
        self.ops = ops or TorchCslt()
        self.algos = algos if algos is not None else ALGOS
        self.name, self.contiguous, self.crossover = name, contiguous, min(crossover, t24.MAX_ROWS)
        W = weight.detach()
        if W.dim() != 2:
            raise RoseRuntimeError(f"{name}: a 2:4 weight must be 2-D, got shape {tuple(W.shape)}")
        if W.dtype not in DTYPES:
            raise RoseRuntimeError(f"{name}: the GPU 2:4 path takes float16 or bfloat16 weights, not {W.dtype} "
                                   f"(cast the model first)")
        if store != "triton":
            if why := self.ops.why_not(W.device):
                raise RoseRuntimeError(f"{name}: {why}")
        elif W.device.type != "cuda" and not getattr(self.ops, "cpu_ok", False):
            raise RoseRuntimeError(f"{name}: the GPU 2:4 path needs a CUDA device, and the weight is on {W.device}: "
                                   f"use runtime.cpu24 on the CPU")
        rows, cols = W.shape
        self.out_features, self.in_features, self.dtype = rows, cols, W.dtype
        min_rows, min_cols = self.ops.min_shape(W.dtype)
        needs_cslt = store != "triton"
        if needs_cslt and (rows % min_rows or cols % min_cols or rows < min_rows or cols < min_cols):
            raise RoseRuntimeError(f"{name}: cuSPARSELt needs rows a multiple of {min_rows} and columns a multiple "
                                   f"of {min_cols}, got {rows}x{cols}: leave this layer dense, or store='triton'")
        W = W.contiguous()
        packed = t24.pack_dense(W, name)            # also the 2:4 check, one line naming the first bad group
        self.row_multiple = self.ops.row_multiple(W.dtype)
        self.calls = {"triton": 0, "cusparselt": 0, "expand": 0}
        self.form, self.note = store, None
        self.register_buffer("compressed", None)
        self.register_buffer("values", None)
        self.register_buffer("masks", None)
        self.register_buffer("locks", None, persistent=False)
        if store in ("auto", "cusparselt", "both"):
            self.compressed = self.ops.compress(W)
        if store in ("triton", "both"):
            self.values, self.masks, self.locks = packed.values, packed.masks, packed.locks
        elif store == "auto":
            view = values_view(self.compressed, rows, cols, W.dtype)
            masks = masks_for_values(W, view) if view is not None else None
            if masks is not None:
                self.masks, self.locks, self.form = masks, packed.locks, "shared"
            else:
                self.form = "cusparselt"
                self.note = ("cuSPARSELt's compressed buffer does not start with the kept values in the kernel's "
                             "order here: decode runs through cuSPARSELt")
        del packed
        if store == "triton":
            scratch(W.device, W.dtype, rows * cols)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(W.device, W.dtype), requires_grad=False)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, **kw) -> "Gpu24Linear":
        return cls(weight, bias, **kw)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kw) -> "Gpu24Linear":
        return cls(linear.weight.data, linear.bias.data if linear.bias is not None else None, **kw)

    # -- what is held --
    @property
    def triton_packed(self) -> t24.Packed | None:
        """The weight as the Triton kernel takes it (None when the layer holds no masks)."""
        if self.masks is None:
            return None
        src = self.values if self.values is not None else self.compressed
        p, ref = self.__dict__.get("_packed", (None, None))
        if p is None or ref is not src or p.masks is not self.masks or p.locks is not self.locks:
            values = src if self.values is not None else values_view(src, self.out_features, self.in_features,
                                                                     self.dtype)
            p = t24.Packed(values, self.masks, self.locks, self.out_features, self.in_features)
            self.__dict__["_packed"] = (p, src)   # rebuilt when `.to()` replaces the buffers
        return p

    @property
    def weight_bytes(self) -> int:
        """Bytes the layer holds for its weight, every stored form, and its bias (as rose's other 2:4 layers)."""
        return sum(t.nbytes for t in (self.compressed, self.values, self.masks, self.bias) if t is not None)

    # -- the call --
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise RoseRuntimeError(f"{self.name}: x has shape {tuple(x.shape)} but the weight takes "
                                   f"{self.in_features} input features")
        rows = x.numel() // self.in_features
        if rows == 0:
            return x.new_empty(*x.shape[:-1], self.out_features)
        packed = self.triton_packed
        if packed is not None and rows <= self.crossover:
            self.calls["triton"] += 1
            return t24.linear(x, packed, self.bias, name=self.name)
        if self.compressed is not None:
            self.calls["cusparselt"] += 1
            return self._cusparselt(x, rows)
        self.calls["expand"] += 1
        W = t24.expand(packed, out=scratch(x.device, packed.dtype, self.out_features * self.in_features))
        return F.linear(x, W, self.bias)

    def _cusparselt(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        if x.dtype != self.dtype:
            raise RoseRuntimeError(f"{self.name}: x is {x.dtype} but the weight is {self.dtype}")
        x2 = x.reshape(rows, self.in_features)
        pad = (-rows) % self.row_multiple
        if pad:
            x2 = F.pad(x2, (0, 0, 0, pad))
        dense_t = x2.t()
        key = self.algos.key(self.out_features, self.in_features, self.dtype, rows + pad)
        alg = self.algos.get(self.ops, self.compressed, dense_t, self.out_features, self.in_features, self.dtype,
                             rows + pad)
        try:
            yt = self.ops.mm(self.compressed, dense_t, alg)
        except RuntimeError as exc:
            if not alg or _capturing():
                raise RoseRuntimeError(f"{self.name}: cuSPARSELt failed: {first_line(exc)[:200]}") from None
            self.algos.demote(key, first_line(exc))
            yt = self.ops.mm(self.compressed, dense_t, 0)
        y = (yt[:, :rows] if pad else yt).t()      # tokens x out, strided (cuSPARSELt wrote out x tokens)
        if self.contiguous:
            y = y.contiguous()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}, "
                f"form={self.form}, crossover={self.crossover}, contiguous={self.contiguous}, "
                f"bias={self.bias is not None}")


# ---- whole models --------------------------------------------------------------------------------------------

def _is_24(W: torch.Tensor) -> bool:
    rows, cols = W.shape
    return cols % 4 == 0 and bool(((W.reshape(rows, cols // 4, 4) != 0).sum(-1) <= 2).all())


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear but the output embedding (`lm_head`), which 2:4 pruning leaves dense."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


def sparsify_gpu(model: nn.Module, names: Iterable[str] | None = None, *, store: str = "auto",
                 crossover: int = DEFAULT_CROSSOVER, contiguous: bool | str = "auto", ops=None,
                 algos: AlgoCache | None = None) -> dict:
    """Swap the 2:4 linears of a model already on the GPU in fp16/bf16 for `Gpu24Linear`, in place.

    `names` picks them (rose's pruned layers, say; each must be 2:4 and of a shape cuSPARSELt takes, else a
    one-line error naming it); by default every nn.Linear but `lm_head` that is 2:4 and fits, the others left
    dense and listed with the reason. `contiguous="auto"`: strided outputs for LLaMA-family sublayers whose consumer
    is elementwise (`STRIDED_OK`), contiguous elsewhere. Returns {"sparse": [...], "dense": {name: why},
    "forms": {form: count}, "weight_bytes", "dense_weight_bytes"} (the bytes of the swapped layers, both ways)."""
    found = linears(model)
    explicit = names is not None
    chosen = list(found) if names is None else list(names)
    ops = ops or TorchCslt()
    report: dict = {"sparse": [], "dense": {}, "forms": {}, "weight_bytes": 0, "dense_weight_bytes": 0}
    for name in chosen:
        module = found.get(name) or model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise RoseRuntimeError(f"{name} is a {type(module).__name__}; the GPU 2:4 path replaces nn.Linear "
                                   f"layers only")
        W = module.weight.data
        why = None
        if not explicit:
            if W.dtype not in DTYPES:
                why = f"{W.dtype} (the GPU 2:4 path takes float16 or bfloat16)"
            elif not _is_24(W):
                why = "not 2:4"
            elif store != "triton":
                mr, mc = ops.min_shape(W.dtype)
                rows, cols = W.shape
                if rows % mr or cols % mc:
                    why = f"cuSPARSELt needs rows a multiple of {mr} and columns of {mc}, got {rows}x{cols}"
        if why:
            report["dense"][name] = why
            continue
        strided = contiguous == "auto" and name.rsplit(".", 1)[-1] in STRIDED_OK
        new = Gpu24Linear.from_linear(module, store=store, crossover=crossover,
                                      contiguous=not strided if contiguous == "auto" else bool(contiguous),
                                      name=name, ops=ops, algos=algos)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        report["sparse"].append(name)
        report["forms"][new.form] = report["forms"].get(new.form, 0) + 1
        report["weight_bytes"] += new.weight_bytes - (new.bias.nbytes if new.bias is not None else 0)
        report["dense_weight_bytes"] += W.numel() * W.element_size()
        found.pop(name, None)  # the dense weight is freed layer by layer, not at the end
        if new.note and report["forms"][new.form] == 1:
            log.warning("%s", new.note)
        del module, W
    model.rose_gpu24 = report
    return report


def _rose_format(path: Path) -> str | None:
    import json

    try:
        marker = json.loads((path / "config.json").read_text()).get("rose_format")
    except (OSError, ValueError, AttributeError):
        return None
    return marker.get("name") if isinstance(marker, dict) else None


def load_gpu24(path: Path, device: str = "cuda", store: str = "auto", dtype: torch.dtype | None = None,
               verify: bool = True, **kw) -> nn.Module:
    """A transformers model from a `semi-structured` or `packed24` export (checked as their loaders check), on
    `device`, its 2:4 linears swapped for `Gpu24Linear`; `model.rose_gpu24` says what was swapped and how."""
    path = Path(path)
    if (path / "semi_structured.json").is_file():
        from .semi import HALF, _index, load_dense

        model = load_dense(path, device="cpu", verify=verify)
        stored = HALF[_index(path)["dtype"]]
    elif _rose_format(path) == "packed24":
        from .packed24 import load_packed24

        model = load_packed24(path, verify=verify)
        stored = next(p.dtype for p in model.parameters() if p.is_floating_point())
    else:
        raise RoseRuntimeError(f"{path} is neither a semi-structured nor a packed24 export: pass one of those "
                               f"directories of a rose export")
    dtype = dtype or stored
    if dtype not in DTYPES:
        raise RoseRuntimeError(f"{path} holds {dtype} weights; the GPU 2:4 path takes float16 or bfloat16: pass "
                               f"dtype=torch.float16, or export with --dtype float16")
    if why := (kw.get("ops") or TorchCslt()).why_not(torch.device(device)):
        raise RoseRuntimeError(why)
    model = model.to(device=device, dtype=dtype).eval()
    sparsify_gpu(model, store=store, **kw)
    return model


# ---- what cuSPARSELt's compressed buffer holds (for the GPU procedure) ---------------------------------------

def cslt_layout_report(shapes: Iterable[tuple[int, int]] = ((64, 128), (4096, 4096)), dtype=torch.float16,
                       ops=None, device: str = "cuda", seed: int = 0,
                       make: Callable[[int, int], torch.Tensor] | None = None) -> dict:
    """Compress 2:4 matrices of known values and say what the compressed buffer holds: its size against the kept
    values', whether its first rows x cols/2 elements are the kept values in row and column order (bit for bit,
    and up to where zeros of sparse groups sit: `masks_for_values`), and what the rest looks like (bytes per row
    and group; whether it equals the plain 2-bit-index nibbles in row order). The GPU procedure runs this to settle
    whether the kernel can share cuSPARSELt's values (62.5% of dense) or even its metadata (56%)."""
    ops = ops or TorchCslt()
    out = {"dtype": str(dtype).replace("torch.", ""), "shapes": []}
    g = torch.Generator(device="cpu").manual_seed(seed)
    for rows, cols in shapes:
        if make is not None:
            W = make(rows, cols)
        else:
            W = torch.randn(rows, cols // 4, 4, generator=g)
            keep = torch.zeros_like(W, dtype=torch.bool).scatter_(2, W.abs().topk(2, dim=2).indices, True)
            W = torch.where(keep, W, torch.zeros(())).reshape(rows, cols)
            W[0, :4] = 0.0                                   # a group with no nonzero
            W[1, 4:8] = torch.tensor([0.0, 0.0, 0.5, 0.0])   # a group with one
        W = W.to(dtype).to(device)
        packed = t24.pack_dense(W)
        comp = ops.compress(W)
        flat = comp.reshape(-1)
        item = {"shape": [rows, cols], "compressed_numel": flat.numel(), "compressed_dtype": str(flat.dtype),
                "compressed_bytes": flat.nbytes, "dense_bytes": W.numel() * W.element_size(),
                "kept_bytes": packed.values.nbytes}
        view = values_view(comp, rows, cols, W.dtype)
        item["values_first_bitwise"] = bool(view is not None and torch.equal(view.view(torch.int16),
                                                                             packed.values.view(torch.int16)))
        item["values_first_shareable"] = bool(view is not None and masks_for_values(W, view) is not None)
        meta = flat.view(torch.uint8)[packed.values.nbytes:]
        item["meta_bytes"] = meta.numel()
        item["meta_bytes_per_group"] = meta.numel() / (rows * cols // 4)
        # the plain encoding: per group one nibble of two 2-bit indices (first kept column | second << 2), groups in
        # row order, two per byte, low nibble first; compared on the groups with two nonzeros (where a sparse group's
        # zeros sit is the library's choice)
        nib = t24._nibbles(packed.masks, cols).long()
        low = nib & -nib
        idx = (low.float().log2().long() | ((nib - low).float().log2().long() << 2)).reshape(-1)
        full = ((W.reshape(rows, cols // 4, 4) != 0).sum(-1) == 2).reshape(-1).cpu()
        head = meta[: idx.numel() // 2].cpu()
        stored = torch.stack([head & 15, head >> 4], -1).reshape(-1).long()
        if stored.numel() == idx.numel():
            item["meta_plain_nibbles_match"] = float((stored == idx.cpu())[full].float().mean())
        else:
            item["meta_plain_nibbles_match"] = None
        item["meta_head_hex"] = meta[:32].cpu().numpy().tobytes().hex()
        out["shapes"].append(item)
    return out
