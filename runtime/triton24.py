"""2:4 sparse `y = x W^T (+ b)` for decode (1 to 16 rows of x) on NVIDIA GPUs, written in Triton.

    from runtime.triton24 import Sparse24TritonLinear, linear, pack_packed24, max_rows

Why: decode reads every weight once per token, so it is bound by memory bandwidth. A 2:4 fp16/bf16 weight kept as
its values plus a 4-bit mask per group of four columns is 1.125 bytes per dense element instead of 2 (56%), so
the limit is about 1.78x dense. cuSPARSELt pads one token to 16 rows and was slower than dense fp16 at 1 token on
an H100. This kernel reads only the packed bytes for 1 to `max_rows()` (16) rows; more rows are refused (one
line) and belong to cuSPARSELt or a dense matmul: the dispatch by token count lives with the caller.

Layout (`Packed`): the bytes of rose's `packed24` export, so loading one is a copy, never a dense matrix.
- `values`: R x C/2, fp16 or bf16, row-major: per row, the two kept values of each group of four columns, in
  column order. Exactly `<m>.compressed` of `packed24`.
- `masks`: R x S int32, row-major, S = 4 * ceil(C/128) words (each row a whole number of 16-byte pieces): nibble
  q of word w (bits 4q..4q+3) is the keep mask of group g = 8w+q, bit j set = column 4g+j kept, exactly two bits
  set. This is `<m>.bitmask` of `packed24` (uint8, bit j of byte b = column 8b+j) read as little-endian words,
  each row padded with zero bytes to 16; for C a multiple of 128 it is the very same bytes.
- C must be a multiple of 4 (whole groups; others are refused); any R. Padding nibbles are zero.

Why it coalesces: a program owns BLOCK_N consecutive rows and walks its share of K in steps of BLOCK_K columns.
Per step it reads, for each of its rows, one contiguous run of BLOCK_K bytes of values and one of BLOCK_K/8 bytes
of masks, each on a 16-byte boundary when C is a multiple of 64 (Triton proves it from the strides, which it
specializes when they are multiples of 16). Consecutive threads take consecutive 16-byte pieces of a row, so
every request covers whole 32-byte sectors and 128-byte lines: on sm_90 the values arrive by 16-byte `cp.async`,
pipelined two steps deep into shared memory. Nothing is gathered, and the values need no reordering: a group's
two kept values are one 32-bit word (first value in the low half).

Kernel (`runtime/_triton24_kernels.py`), one program per (BLOCK_N rows, K split):
- Tensor-core variant (the default for every row count): each group's 32-bit word kv of kept values expands in
  registers to its two dense column pairs (4g, 4g+1) and (4g+2, 4g+3): pair 01 is kv when column 0 is kept, else
  kv << 16; pair 23 is kv when column 3 is kept, else kv >> 16; then the half of each unkept column is cleared with
  a mask spread from the nibble. About 15 integer instructions per group, no byte permutes. The dense BLOCK_N x
  BLOCK_K tile then meets x (padded to 16 rows, read once per step for all BLOCK_N rows) in `tl.dot`
  (mma.sync m16n8k16, fp32 accumulation). The padding costs nothing that matters: tensor-core work per weight byte
  is tiny, so 1 row and 16 rows take about the same time, which is the point at 8-16 tokens.
- FMA variant (`Config(use_dot=False)`, one row only; not the default): no expansion; for each kept value, selects
  pick its x entry (the first kept value sits in column 0, 1 or 2 of its group, the second in 1, 2 or 3) and fp32
  FMAs accumulate. Fewer operations per group on paper, but Triton moves its per-group selects between layouts
  through shared memory and does not pipeline its loads, so it is kept as an alternative that
  `scripts/gpu_triton24.py` times at 1 token (`FMA_MAX_ROWS` switches it on).
- Enough bytes in flight: besides the pipelining, K is split when the output rows give too few programs (1024
  rows, say): about `PROGRAMS_PER_SM` programs per multiprocessor, each split at least `MIN_STEPS_PER_SPLIT`
  steps. Partial sums (fp32) go to a workspace; a per-tile counter (atomic add, acquire/release at GPU scope, after
  a barrier) lets the last program of each tile add the partials in split order, so results are bit-identical run
  to run, add the bias and store y, all in the same launch (no second kernel, no memset: the last program resets
  the counter).
- fp16 and bf16 values and x, fp32 accumulation, one rounding at the end; the bias is added in fp32; y has x's
  dtype. Configs come from a small table by shape (`pick_config`), no autotuning.

The counters make concurrent calls with one `Packed` on different CUDA streams unsafe when K is split; calls in
one stream, and CUDA graph replays, are fine.

On the CPU: when Triton was imported with `TRITON_INTERPRET=1` in the environment (and it is still set when the
kernel runs), CPU tensors run the same kernel in Triton's interpreter (slow; for tests). One difference there: the
tensor-core product of bf16 tiles is done in fp32 (equally exact: bf16 products fit fp32), because Triton 3.9's
interpreter multiplies bf16 bit patterns as integers. The packers, `unpack` and the input checks need neither a
GPU nor Triton. `_triton24_kernels.compile_for_sm` builds the kernel for sm_90 without a GPU (for checks).
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch
from torch import nn

from .errors import RoseRuntimeError, first_line

MAX_ROWS = 16            # more rows (tokens) per call: dispatch elsewhere (cuSPARSELt, dense)
FMA_MAX_ROWS = 0         # rows up to this take the FMA variant by default (0: none; it is timed on the GPU at 1 row)
PROGRAMS_PER_SM = 4      # split K until about this many programs per multiprocessor...
MIN_STEPS_PER_SPLIT = 2  # ...but keep at least this many steps of block_k columns per split
DEFAULT_SMS = 132        # an H100/H200 SXM, for choosing configs where no GPU is asked (the interpreter)
DTYPES = (torch.float16, torch.bfloat16)
ROW_BYTES = 16           # masks rows are padded to this many bytes (16-byte vector loads)


def max_rows() -> int:
    """The most rows (tokens) of x that `linear` takes in one call."""
    return MAX_ROWS


# ---- the layout --------------------------------------------------------------------------------------------------

@dataclass
class Packed:
    """A 2:4 weight in the kernel's layout (see the module docstring); `locks` are the split-K tile counters."""

    values: torch.Tensor     # rows x cols/2, fp16/bf16
    masks: torch.Tensor      # rows x mask_words(cols), int32
    locks: torch.Tensor      # int32 zeros, one per tile of 8 rows (the smallest tile a config may use)
    rows: int
    cols: int

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads per call (values and masks; the counters are not read unless K is split)."""
        return self.values.nbytes + self.masks.nbytes

    @functools.cached_property
    def pairs(self) -> torch.Tensor:
        """`values` read as one int32 per group (first kept value in the low half), as the kernel loads them."""
        return self.values.view(torch.int32)

    def to(self, device) -> "Packed":
        return Packed(self.values.to(device), self.masks.to(device), self.locks.to(device), self.rows, self.cols)


def mask_words(cols: int) -> int:
    """int32 words per row of `masks`: one nibble per group of four columns, rows padded to 16 bytes."""
    return -(-cols // 128) * (ROW_BYTES // 4)


def _locks(rows: int, device=None) -> torch.Tensor:
    return torch.zeros(-(-rows // 8), dtype=torch.int32, device=device)


def _check_shape(rows: int, cols: int, name: str) -> None:
    if rows <= 0 or cols <= 0 or cols % 4:
        raise RoseRuntimeError(f"{name}: a 2:4 weight needs columns in whole groups of four (a multiple of 4), got "
                               f"{rows}x{cols}")


def _check_dtype(dtype: torch.dtype, name: str, what: str = "weights") -> None:
    if dtype not in DTYPES:
        raise RoseRuntimeError(f"{name}: the Triton 2:4 kernel takes float16 or bfloat16 {what}, not {dtype} "
                               f"(cast first)")


def _where(flat: int, groups: int) -> str:
    g = flat % groups
    return f"row {flat // groups}, columns {4 * g}-{4 * g + 3}"


def _keep_table() -> torch.Tensor:
    """keep nibble for (nonzero nibble | nonzero-bits nibble << 4): the nonzeros first, then stored -0.0s, then the
    lowest columns, as rose's packed24 export chooses (so both packers give the same bytes)."""
    table = torch.zeros(256, dtype=torch.uint8)
    for nz in range(16):
        for bits in range(16):
            rank = sorted(range(4), key=lambda j: (-((nz >> j) & 1), -((bits >> j) & 1), j))
            table[nz | bits << 4] = (1 << rank[0]) | (1 << rank[1])
    return table


_KEEP = _keep_table()
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(16)], dtype=torch.uint8)


def _masks_from_bitmask(bitmask: torch.Tensor, cols: int) -> torch.Tensor:
    """packed24's uint8 bitmask (rows x ceil(cols/8)) -> the kernel's int32 words, rows padded to 16 bytes."""
    if sys.byteorder != "little":  # pragma: no cover - every CUDA host is little-endian
        raise RoseRuntimeError("the Triton 2:4 packer reads the bitmask as little-endian words")
    rows = bitmask.shape[0]
    out = torch.zeros(rows, mask_words(cols) * 4, dtype=torch.uint8, device=bitmask.device)
    out[:, : bitmask.shape[1]] = bitmask
    if cols % 8:  # the last byte holds one group: clear the nibble past the last column
        out[:, bitmask.shape[1] - 1] &= 0x0F
    return out.view(torch.int32)


def _nibbles(masks: torch.Tensor, cols: int) -> torch.Tensor:
    """rows x cols/4 keep nibbles (uint8) of the kernel's masks."""
    b = masks.cpu().contiguous().view(torch.uint8)
    return torch.stack([b & 0x0F, b >> 4], dim=-1).reshape(b.shape[0], -1)[:, : cols // 4]


def pack_dense(weight: torch.Tensor, name: str = "weight") -> Packed:
    """The kernel's layout of a dense 2:4 matrix, built on the weight's own device with plain tensor operations
    (the same bytes on the CPU and on a GPU; a 7B model packs on the GPU in seconds). Columns must be a multiple of
    4; a group with more than two nonzeros is an error naming its row and columns."""
    if weight.dim() != 2:
        raise RoseRuntimeError(f"{name}: a 2:4 weight must be 2-D, got shape {tuple(weight.shape)}")
    _check_dtype(weight.dtype, name)
    rows, cols = weight.shape
    _check_shape(rows, cols, name)
    W = weight.detach().contiguous()
    dev = W.device
    groups = W.reshape(rows, cols // 4, 4)
    shift = torch.arange(4, dtype=torch.uint8, device=dev)
    nz = ((groups != 0).to(torch.uint8) << shift).sum(-1, dtype=torch.uint8)
    count = _POPCOUNT.to(dev)[nz.long()]
    bad = (count > 2).flatten().nonzero()
    if len(bad):
        where = int(bad[0])
        raise RoseRuntimeError(f"{name} is not 2:4: {_where(where, cols // 4)} hold {int(count.flatten()[where])} "
                               f"nonzeros")
    signed = ((groups.view(torch.int16) != 0).to(torch.uint8) << shift).sum(-1, dtype=torch.uint8)
    keep = _KEEP.to(dev)[(nz | signed << 4).long()]                             # rows x groups nibbles
    keep_cols = ((keep.unsqueeze(-1) >> shift) & 1).bool().reshape(rows, cols)
    values = W[keep_cols].reshape(rows, cols // 2)
    pad = keep if (cols // 4) % 2 == 0 else torch.cat([keep, keep.new_zeros(rows, 1)], dim=1)
    bitmask = pad[:, 0::2] | (pad[:, 1::2] << 4)
    return Packed(values, _masks_from_bitmask(bitmask, cols), _locks(rows, dev), rows, cols)


def pack_packed24(compressed: torch.Tensor, bitmask: torch.Tensor, shape, name: str = "weight") -> Packed:
    """The kernel's layout from a `packed24` export's `<m>.compressed`, `<m>.bitmask` and `<m>.shape` (on the CPU;
    only the masks are rewritten, and no dense matrix is built). A group whose mask does not keep exactly two
    columns is an error naming its row and columns."""
    try:
        rows, cols = (int(s) for s in torch.as_tensor(shape).flatten().tolist())
    except (TypeError, ValueError):
        raise RoseRuntimeError(f"{name}: the shape must be two numbers (rows, columns), got {shape!r}") from None
    _check_shape(rows, cols, name)
    _check_dtype(compressed.dtype, name, "kept values")
    if compressed.numel() != rows * cols // 2:
        raise RoseRuntimeError(f"{name}: expected {rows * cols // 2} kept values for a {rows}x{cols} weight, got "
                               f"{compressed.numel()}")
    width = -(-cols // 8)
    if bitmask.dtype != torch.uint8 or bitmask.numel() != rows * width:
        raise RoseRuntimeError(f"{name}: expected a uint8 bitmask of {rows}x{width}, got {bitmask.dtype} with "
                               f"{bitmask.numel()} elements")
    bitmask = bitmask.detach().cpu().reshape(rows, width)
    masks = _masks_from_bitmask(bitmask, cols)
    count = _POPCOUNT[_nibbles(masks, cols).long()]
    bad = (count != 2).flatten().nonzero()
    if len(bad):
        raise RoseRuntimeError(f"{name}: the bitmask does not keep exactly two of four in "
                               f"{_where(int(bad[0]), cols // 4)}")
    values = compressed.detach().cpu().reshape(rows, cols // 2).contiguous()
    if values.storage_offset() % 2:  # the kernel reads a group's pair as one 32-bit word
        values = values.clone()
    return Packed(values, masks, _locks(rows), rows, cols)


def unpack(packed: Packed) -> torch.Tensor:
    """The dense matrix (on the CPU; for tests and checks)."""
    rows, cols = packed.rows, packed.cols
    nib = _nibbles(packed.masks, cols)
    keep = ((nib.unsqueeze(-1) >> torch.arange(4, dtype=torch.uint8)) & 1).bool().reshape(rows, cols)
    dense = torch.zeros(rows, cols, dtype=packed.dtype)
    dense[keep] = packed.values.cpu().reshape(-1)
    return dense


def to_packed24(packed: Packed) -> tuple[torch.Tensor, torch.Tensor]:
    """(compressed, bitmask) as rose's `packed24` export stores them (on the CPU)."""
    width = -(-packed.cols // 8)
    bitmask = packed.masks.cpu().contiguous().view(torch.uint8)[:, :width].clone()
    return packed.values.cpu().clone(), bitmask


# ---- configs -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """One launch configuration. `split`: programs per tile along K (1: none)."""

    use_dot: bool
    block_m: int
    block_n: int
    block_k: int
    split: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def name(self) -> str:
        kind = "dot" if self.use_dot else "fma"
        return (f"{kind} m{self.block_m} n{self.block_n} k{self.block_k} split{self.split} w{self.num_warps} "
                f"s{self.num_stages}")


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def split_for(rows_out: int, cols: int, block_n: int, block_k: int, sms: int = DEFAULT_SMS,
              per_sm: int = PROGRAMS_PER_SM, min_steps: int = MIN_STEPS_PER_SPLIT) -> int:
    """K splits per tile so that the grid has about `per_sm` programs per multiprocessor, each split at least
    `min_steps` steps of `block_k` columns long (a split costs a partial-sum round trip), none empty."""
    tiles, steps = -(-rows_out // block_n), -(-cols // block_k)
    split = max(1, min(steps // min_steps, -(-per_sm * sms // tiles)))
    per = -(-steps // split)
    return -(-steps // per)


def pick_config(rows: int, rows_out: int, cols: int, sms: int = DEFAULT_SMS) -> Config:
    """The default config for `rows` rows of x times a `rows_out` x `cols` weight (no autotuning).

    Tensor cores for every row count (x padded to 16 rows: the work per weight byte is the same for 1 or 16
    rows), 128 columns per step, 64 output rows per program (32 below 2048 output rows, for parallelism), 4 warps
    (16 output rows each: x is read from shared memory once per warp and step, so wider warps read it less per
    weight byte), 2 pipeline stages, K split by `split_for`. Rows up to `FMA_MAX_ROWS` take the FMA variant.
    Chosen by counting instructions and bytes in the sm_90 code; `scripts/gpu_triton24.py --sweep` times the
    alternatives on a GPU.
    """
    if rows <= FMA_MAX_ROWS:
        block_m, block_n, block_k, use_dot = 1, 16, 512, False
    else:
        block_m, block_n, block_k, use_dot = 16, 64 if rows_out >= 2048 else 32, 128, True
    block_k = min(block_k, max(64, _pow2(cols)))
    return Config(use_dot, block_m, block_n, block_k, split_for(rows_out, cols, block_n, block_k, sms))


def check_config(config: Config, rows: int) -> None:
    """A config the kernel can run for `rows` rows of x (a wrong one is a one-line error, not a Triton trace)."""
    pow2 = all(v > 0 and v & (v - 1) == 0 for v in (config.block_m, config.block_n, config.block_k))
    if not pow2 or config.block_k < 64 or config.block_n < 8 or config.block_m < rows or config.split < 1:
        raise RoseRuntimeError(f"config {config.name()} cannot run {rows} rows: blocks must be powers of two, "
                               f"block_k >= 64, block_n >= 8, block_m >= rows, split >= 1")
    if config.use_dot and (config.block_m < 16 or config.block_n < 16):
        raise RoseRuntimeError(f"config {config.name()}: the tensor-core variant needs block_m and block_n >= 16")
    if not config.use_dot and config.block_m != 1:
        raise RoseRuntimeError(f"config {config.name()}: the FMA variant takes one row of x (block_m 1)")


# ---- the call ----------------------------------------------------------------------------------------------------

_KERNELS: dict[str, object] = {}
_SMS: dict[int, int] = {}
_CONFIGS: dict[tuple, Config] = {}


def _kernel(device: torch.device):
    if device.type not in ("cpu", "cuda"):
        raise RoseRuntimeError(f"x is on {device}: the Triton 2:4 kernel runs on CUDA")
    how = "interpreted" if device.type == "cpu" else "compiled"
    if how not in _KERNELS:
        try:
            from . import _triton24_kernels as k
        except ImportError as exc:
            raise RoseRuntimeError(f"the Triton 2:4 kernel needs the triton package ({first_line(exc)}): "
                                   f"pip install triton") from None
        if how == "interpreted" and (why := k.interpreter_problem()):
            raise RoseRuntimeError(f"x is on the CPU: the Triton 2:4 kernel runs on CUDA, or on CPU tensors in "
                                   f"Triton's interpreter (for tests), which cannot run here: {why}; runtime.cpu24 "
                                   f"is the CPU kernel")
        _KERNELS[how] = getattr(k, how)()
    return _KERNELS[how]


def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def linear(x: torch.Tensor, packed: Packed, bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
           config: Config | None = None, name: str = "weight") -> torch.Tensor:
    """y = x W^T (+ bias) for x of shape (..., cols) with at most `max_rows()` rows in all; y has x's dtype.

    `out` (contiguous, rows x rows_out elements) receives y (a CUDA graph's static output, say); `config`
    overrides `pick_config`. Bad input is a one-line `RoseRuntimeError`.
    """
    rows_out, cols = packed.rows, packed.cols
    if x.dtype != packed.dtype:
        raise RoseRuntimeError(f"{name}: x is {x.dtype} but the weight is {packed.dtype}: cast x (the kernel takes "
                               f"float16 or bfloat16, matching its weight)")
    if x.dim() == 0 or x.shape[-1] != cols:
        raise RoseRuntimeError(f"{name}: x has shape {tuple(x.shape)} but the weight takes {cols} input features")
    rows = x.numel() // cols
    if rows > MAX_ROWS:
        raise RoseRuntimeError(f"{name}: the Triton 2:4 decode kernel takes at most {MAX_ROWS} rows (tokens) per call, "
                               f"got {rows}: dispatch larger inputs to cuSPARSELt or a dense matmul")
    if x.device != packed.device:
        raise RoseRuntimeError(f"{name}: x is on {x.device} but the weight is on {packed.device}")
    if bias is not None and (tuple(bias.shape) != (rows_out,) or bias.device != x.device
                             or not bias.is_floating_point()):
        raise RoseRuntimeError(f"{name}: the bias must be a float vector of {rows_out} on {x.device}, got "
                               f"{bias.dtype} {tuple(bias.shape)} on {bias.device}")
    shape = (*x.shape[:-1], rows_out)
    if out is None:
        y = torch.empty(rows, rows_out, dtype=x.dtype, device=x.device)
    elif out.dtype != x.dtype or out.numel() != rows * rows_out or not out.is_contiguous() or out.device != x.device:
        raise RoseRuntimeError(f"{name}: out must be a contiguous {x.dtype} tensor of {rows}x{rows_out} on {x.device}")
    else:
        y = out.view(rows, rows_out)
    if config is not None:
        check_config(config, rows)
    if rows == 0:
        return y.view(shape)
    x2 = x.reshape(rows, cols)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if config is None:
        key = (rows, rows_out, cols, x.device)
        config = _CONFIGS.get(key)
        if config is None:
            config = _CONFIGS[key] = pick_config(rows, rows_out, cols, _sms(x.device))
    split, bk = config.split, config.block_k
    steps = -(-cols // bk)
    per = -(-steps // split) * bk                  # columns per split, a multiple of the step
    split = -(-cols // per)
    tiles = -(-rows_out // config.block_n)
    if split > 1 and packed.locks.numel() < tiles:
        raise RoseRuntimeError(f"{name}: config {config.name()} needs {tiles} split counters, the weight has "
                               f"{packed.locks.numel()} (block_n must be at least 8)")
    kernel = _kernel(x.device)
    ws = torch.empty(split, rows, rows_out, dtype=torch.float32, device=x.device) if split > 1 else y
    values, pairs = packed.values, packed.pairs
    kernel[(tiles, split)](
        x2, values, pairs, packed.masks, bias if bias is not None else y, y, ws, packed.locks,
        rows, rows_out, cols,
        x2.stride(0), pairs.stride(0), packed.masks.stride(0), y.stride(0),
        per, per // 4, per // 32, split,
        HAS_BIAS=bias is not None, SPLIT=split > 1, USE_DOT=config.use_dot,
        UPCAST_DOT=config.use_dot and x.dtype == torch.bfloat16 and x.device.type == "cpu",
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=bk,
        num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=True)
    return y.view(shape)


EXPAND_BLOCK_N, EXPAND_BLOCK_K = 32, 128


def expand(packed: Packed, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense matrix of `packed` on its device, by one Triton launch (on CPU tensors: Triton's interpreter, as
    `linear`). `out` (a contiguous buffer of at least rows x cols elements of the weight's dtype, a shared scratch
    say) receives it. For the prefill of a model that holds only this layout: expand, then a dense matmul."""
    rows, cols = packed.rows, packed.cols
    if out is None:
        dense = torch.empty(rows, cols, dtype=packed.dtype, device=packed.device)
    else:
        if out.dtype != packed.dtype or out.device != packed.device or not out.is_contiguous() \
                or out.numel() < rows * cols:
            raise RoseRuntimeError(f"expand: out must be a contiguous {packed.dtype} buffer of at least {rows * cols} "
                                   f"elements on {packed.device}")
        dense = out.reshape(-1)[: rows * cols].view(rows, cols)
    how = "interpreted" if packed.device.type == "cpu" else "compiled"
    key = f"expand-{how}"
    if key not in _KERNELS:
        _kernel(packed.device)   # the same checks (Triton installed, the interpreter usable on the CPU)
        from . import _triton24_kernels as k

        _KERNELS[key] = k.interpreted_expand() if how == "interpreted" else k.compiled_expand()
    words = dense.view(torch.int32)                           # rows x cols/2 column pairs
    grid = (-(-rows // EXPAND_BLOCK_N), -(-cols // EXPAND_BLOCK_K))
    _KERNELS[key][grid](packed.pairs, packed.masks, words, rows, cols, packed.pairs.stride(0), packed.masks.stride(0),
                        words.stride(0), BLOCK_N=EXPAND_BLOCK_N, BLOCK_K=EXPAND_BLOCK_K, num_warps=4)
    return dense


# ---- the module --------------------------------------------------------------------------------------------------

class Sparse24TritonLinear(nn.Module):
    """y = x W^T + b for 1 to `max_rows()` rows, with W held only in the kernel's packed layout (no dense copy).

    Build it on the CPU (`from_dense`, `from_linear`, `from_packed24`) and move it with `.to("cuda")`, or pass
    `device=`. The bias is kept in the weight's dtype and added in fp32.
    """

    def __init__(self, packed: Packed, bias: torch.Tensor | None = None, name: str = "weight"):
        super().__init__()
        self.in_features, self.out_features, self.name = packed.cols, packed.rows, name
        self.register_buffer("values", packed.values)
        self.register_buffer("masks", packed.masks)
        self.register_buffer("locks", packed.locks, persistent=False)
        if bias is not None:
            if tuple(bias.shape) != (packed.rows,):
                raise RoseRuntimeError(f"{name}: the bias must have {packed.rows} elements, got {tuple(bias.shape)}")
            bias = nn.Parameter(bias.detach().to(device=packed.device, dtype=packed.dtype), requires_grad=False)
        self.bias = bias

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, name: str = "weight",
                   dtype: torch.dtype | None = None, device=None) -> "Sparse24TritonLinear":
        """Pack a dense 2:4 weight on its own device (cast to `dtype` first if given), then move to `device`."""
        dtype = dtype or weight.dtype
        _check_dtype(dtype, name)
        new = cls(pack_dense(weight.detach().to(dtype), name), bias, name)
        return new.to(device) if device is not None else new

    @classmethod
    def from_linear(cls, linear: nn.Linear, name: str = "weight", dtype: torch.dtype | None = None,
                    device=None) -> "Sparse24TritonLinear":
        return cls.from_dense(linear.weight.data, linear.bias.data if linear.bias is not None else None, name, dtype,
                              device)

    @classmethod
    def from_packed24(cls, compressed: torch.Tensor, bitmask: torch.Tensor, shape, bias: torch.Tensor | None = None,
                      name: str = "weight", device=None) -> "Sparse24TritonLinear":
        """Straight from a `packed24` export's tensors, on the CPU: the dense weight is never built."""
        new = cls(pack_packed24(compressed, bitmask, shape, name), bias, name)
        return new.to(device) if device is not None else new

    @property
    def packed(self) -> Packed:
        """The weight as `linear` takes it (rebuilt when `.to()` has moved the buffers)."""
        p = self.__dict__.get("_packed")
        if p is None or p.values is not self.values or p.masks is not self.masks or p.locks is not self.locks:
            p = self.__dict__["_packed"] = Packed(self.values, self.masks, self.locks, self.out_features,
                                                  self.in_features)
        return p

    @property
    def weight_bytes(self) -> int:
        return self.values.nbytes + self.masks.nbytes + (self.bias.nbytes if self.bias is not None else 0)

    def dense_weight(self) -> torch.Tensor:
        """The dense matrix on the CPU (for checks; the module never keeps one)."""
        return unpack(self.packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.packed, self.bias, name=self.name)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.values.dtype}, "
                f"bias={self.bias is not None}")
