"""The Triton source of rose's 2:4 decode kernel (the layout and the reasoning are in `runtime/triton24.py`).

This module imports Triton; `runtime.triton24` imports it only when a kernel is first needed, so the packers work
where Triton is not installed. The kernel is a plain function here: `triton24` wraps it with `triton.jit` for CUDA
tensors, or with Triton's interpreter for CPU tensors, when it is first asked for. One function, no `@triton.jit`
helpers of our own: a helper decorated for one of the two ways would not run under the other. (Triton's own
library functions, `tl.sum` say, are decorated when Triton is imported, which is why the interpreter needs
`TRITON_INTERPRET=1` set before that import: `interpreter_ready` checks it.)
"""
from __future__ import annotations

import triton
import triton.language as tl


def sparse24_kernel(
    x_ptr, v_ptr, p_ptr, m_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr,
    M, N, K,
    stride_xm, stride_pn, stride_mn, stride_ym,
    k_per_split, g_per_split, w_per_split, n_split,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, USE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[:M, tile] = x[:M] W[tile]^T (+ bias) for one tile of BLOCK_N output features and one K split.

    W's tile comes as its kept values, read through `p_ptr` as one int32 per group of four columns (the two kept
    values in column order, the first in the low half; `v_ptr` is the same memory as fp16/bf16 and gives the
    dtype) and `m_ptr` (int32 words, nibble q of word w = keep mask of group 8w+q: bit j set = column 4g+j kept).
    Per-group tensors are shaped (rows, word, nibble), as the loads deliver them.
    USE_DOT: expand each group to its two dense column pairs with 32-bit integer ops and multiply the dense tile on
    the tensor cores, x padded to BLOCK_M = 16 rows. Otherwise (BLOCK_M == 1): pick, for each kept value, its x
    entry with selects and accumulate with fp32 FMAs; no expansion at all.
    UPCAST_DOT: multiply in fp32 instead (exact products too); only for Triton's interpreter, whose `tl.dot`
    multiplies bf16 bit patterns as integers (Triton 3.9).
    SPLIT: this program is one of n_split partial sums over K; the last one to finish adds the partials in split
    order (deterministic), adds the bias and stores y.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    BG: tl.constexpr = BLOCK_K // 4     # groups of four columns per step
    BW: tl.constexpr = BLOCK_K // 32    # metadata words per row per step (8 groups each)

    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rw = tl.arange(0, BW)
    rg = 8 * rw[:, None] + tl.arange(0, 8)[None, :]                # (word, nibble) -> group in the step
    shifts = 4 * tl.arange(0, 8)
    row_ok = rn < N
    m_ok = rm < M

    # this split's share of K, in dense columns, groups and metadata words (all multiples of the step)
    k_lo = pid_k * k_per_split
    g_lo = pid_k * g_per_split
    w_lo = pid_k * w_per_split
    n_it = tl.cdiv(tl.minimum(k_per_split, K - k_lo), BLOCK_K)
    m_rows = m_ptr + rn[:, None] * tl.multiple_of(stride_mn, 4)    # masks rows are whole 16-byte pieces

    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BW, 8), dtype=tl.float32)
    for it in range(0, n_it):
        kk = k_lo + it * BLOCK_K + rk
        gg = g_lo + it * BG + rg
        ww = w_lo + it * BW + rw
        g_ok = row_ok[:, None, None] & (gg[None, :, :] < K // 4)
        # the weight's bytes: per row, one contiguous run of BLOCK_K bytes of values and BLOCK_K/8 of masks
        words = tl.load(m_rows + ww[None, :], mask=row_ok[:, None] & (ww[None, :] * 32 < K), other=0)
        nib = (words[:, :, None] >> shifts[None, None, :]) & 15        # bit j set: column 4g+j kept
        b0 = (nib & 1) != 0
        b3 = (nib & 8) != 0
        kv = tl.load(p_ptr + rn[:, None, None] * stride_pn + gg[None, :, :], mask=g_ok, other=0)
        kv = kv.to(tl.uint32, bitcast=True)                             # second kept value << 16 | first
        if USE_DOT:
            # x: loaded once per step for all BLOCK_N rows of the tile
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & (kk[None, :] < K),
                        other=0.0)
            # dense column pairs (4g, 4g+1) and (4g+2, 4g+3) as 32-bit words (low half = lower column): pair 01
            # is kv = (first, second) if column 0 is kept, else (0, first); pair 23 is kv if column 3 is kept, else
            # (second, 0); then the half of a column that is not kept is cleared
            nu = nib.to(tl.uint32, bitcast=True)
            spread = nu | (nu << 15)                                  # bit 16+j: mask bit j+1
            m01 = (spread & 0x10001) * 0xFFFF                         # ones in each half whose column is kept
            m23 = ((spread >> 2) & 0x10001) * 0xFFFF
            w01 = tl.where(b0, kv, kv << 16) & m01
            w23 = tl.where(b3, kv, kv >> 16) & m23
            wp = tl.reshape(tl.join(w01, w23), (BLOCK_N, BLOCK_K // 2))
            w = tl.reshape(tl.join((wp & 0xFFFF).to(tl.uint16), (wp >> 16).to(tl.uint16)), (BLOCK_N, BLOCK_K))
            w = w.to(v_ptr.dtype.element_ty, bitcast=True)
            if UPCAST_DOT:
                acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        else:
            b1 = (nib & 2) != 0
            b2 = (nib & 4) != 0
            v0 = (kv & 0xFFFF).to(tl.uint16).to(v_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
            v1 = (kv >> 16).to(tl.uint16).to(v_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
            # one row of x, loaded once per step for all BLOCK_N rows. The first kept value sits in column 0, 1
            # or 2 of its group, the second in 1, 2 or 3: select its x entry, accumulate elementwise in fp32 (one
            # reduction after the loop)
            x = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            xe, xo = tl.split(tl.reshape(x, (BW, 8, 2, 2)))
            x0, x2 = tl.split(xe)
            x1, x3 = tl.split(xo)
            xa = tl.where(b0, x0[None, :, :], tl.where(b1, x1[None, :, :], x2[None, :, :]))
            xb = tl.where(b3, x3[None, :, :], tl.where(b2, x2[None, :, :], x1[None, :, :]))
            acc += v0 * xa + v1 * xb

    if USE_DOT:
        out = acc
    else:
        out = tl.reshape(tl.sum(tl.sum(acc, axis=2), axis=1), (1, BLOCK_N))
    out_mask = m_ok[:, None] & row_ok[None, :]
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    if SPLIT:
        # partial sums go to ws[split, m, n] (fp32); a per-tile counter finds the last program of this tile
        tile = rm[:, None] * N + rn[None, :]
        tl.store(ws_ptr + pid_k * M * N + tile, out, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is written before the counter moves (release below)
        done = tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if done == n_split - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(0, n_split):  # in split order, whoever finished last: the same sum every time
                total += tl.load(ws_ptr + s * M * N + tile, mask=out_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(b_ptr + rn, mask=row_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(lock_ptr + pid_n, 0)  # ready for the next call
    else:
        if HAS_BIAS:
            out += tl.load(b_ptr + rn, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=out_mask)


def expand24_kernel(p_ptr, m_ptr, d_ptr, N, K, stride_pn, stride_mn, stride_dn,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The dense matrix of one BLOCK_N x BLOCK_K tile of a packed weight, written as 32-bit words of column pairs
    (`d_ptr` is the dense fp16/bf16 matrix read as int32, R x K/2): the same expansion as the decode kernel's
    tensor-core variant, stored instead of multiplied. For prefill when only the kernel's layout is held: the dense
    weight goes to a scratch buffer that cuBLAS then reads."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    BW: tl.constexpr = BLOCK_K // 32
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rw = pid_k * BW + tl.arange(0, BW)
    gg = 8 * rw[:, None] + tl.arange(0, 8)[None, :]                     # (word, nibble) -> group
    row_ok = rn < N
    words = tl.load(m_ptr + rn[:, None] * stride_mn + rw[None, :], mask=row_ok[:, None] & (rw[None, :] * 32 < K),
                    other=0)
    nib = (words[:, :, None] >> (4 * tl.arange(0, 8))[None, None, :]) & 15
    g_ok = row_ok[:, None, None] & (gg[None, :, :] < K // 4)
    kv = tl.load(p_ptr + rn[:, None, None] * stride_pn + gg[None, :, :], mask=g_ok, other=0)
    kv = kv.to(tl.uint32, bitcast=True)
    nu = nib.to(tl.uint32, bitcast=True)
    spread = nu | (nu << 15)
    m01 = (spread & 0x10001) * 0xFFFF
    m23 = ((spread >> 2) & 0x10001) * 0xFFFF
    w01 = tl.where((nib & 1) != 0, kv, kv << 16) & m01
    w23 = tl.where((nib & 8) != 0, kv, kv >> 16) & m23
    wp = tl.reshape(tl.join(w01, w23), (BLOCK_N, BLOCK_K // 2)).to(tl.int32, bitcast=True)
    cw = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)             # word = column pair
    tl.store(d_ptr + rn[:, None] * stride_dn + cw[None, :], wp, mask=row_ok[:, None] & (cw[None, :] < K // 2))


def compiled_expand():
    return triton.jit(expand24_kernel)


def interpreted_expand():
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(expand24_kernel)


def compiled():
    """The kernel for CUDA tensors (Triton's JIT; with `TRITON_INTERPRET=1` Triton makes that the interpreter too)."""
    return triton.jit(sparse24_kernel)


def _loop_probe(out_ptr, n):
    total = 0
    for i in range(0, n):
        total += i
    tl.store(out_ptr, total)


def interpreter_problem() -> str | None:
    """None when Triton's interpreter can run the kernel on CPU tensors in this process, else why not (one line).
    It needs Triton imported with `TRITON_INTERPRET=1` (its library functions are decorated then) and still set,
    and an interpreter that loops to a run-time bound (Triton 3.6's fails under numpy 2; 3.9's works)."""
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.standard.zeros_like, InterpretedFunction):
        return "triton was imported before TRITON_INTERPRET=1 was set (set it in the environment before the import)"
    out = torch.zeros(1, dtype=torch.int32)
    try:
        InterpretedFunction(_loop_probe)[(1,)](out, 4)
    except Exception as exc:  # noqa: BLE001 - any failure means: this interpreter cannot run the kernel
        return (f"Triton {triton.__version__}'s interpreter cannot run a loop with a run-time bound here "
                f"({type(exc).__name__}); use triton>=3.9")
    return None if int(out) == 6 else f"Triton {triton.__version__}'s interpreter summed a loop wrongly"


def interpreted():
    """The kernel run by Triton's interpreter on CPU tensors."""
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(sparse24_kernel)


def compile_for_sm(capability: int = 90, dtype: str = "fp16", use_dot: bool = True, block_m: int = 16,
                   block_n: int = 64, block_k: int = 128, num_warps: int = 4, num_stages: int = 2,
                   has_bias: bool = False, split: bool = True):
    """Compile the kernel for an NVIDIA GPU of this compute capability without one (Triton ships ptxas): a check
    that every config builds, and its PTX/SASS to read. Strides and sizes are taken as multiples of 16 (LLaMA
    shapes), as Triton specializes them at run time. Needs a process where Triton was imported without
    TRITON_INTERPRET."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = JITFunction(sparse24_kernel)
    consts = {"HAS_BIAS": has_bias, "SPLIT": split, "USE_DOT": use_dot, "UPCAST_DOT": False, "BLOCK_M": block_m,
              "BLOCK_N": block_n, "BLOCK_K": block_k}
    ptrs = {"x_ptr": dtype, "v_ptr": dtype, "b_ptr": dtype, "y_ptr": dtype, "p_ptr": "i32", "m_ptr": "i32",
            "ws_ptr": "fp32", "lock_ptr": "i32"}
    sig = {n: f"*{ptrs[n]}" if n in ptrs else "constexpr" if n in consts else "i32" for n in fn.arg_names}
    aligned = [n for n in fn.arg_names if n in ptrs or n.startswith("stride") or n.endswith("_per_split")
               or n == "K"]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True})


def compile_expand_for_sm(capability: int = 90, block_n: int = 32, block_k: int = 128, num_warps: int = 4):
    """`expand24_kernel` through Triton's NVIDIA backend for a compute capability, without a GPU (as
    `compile_for_sm`)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = JITFunction(expand24_kernel)
    consts = {"BLOCK_N": block_n, "BLOCK_K": block_k}
    ptrs = {"p_ptr": "i32", "m_ptr": "i32", "d_ptr": "i32"}
    sig = {n: f"*{ptrs[n]}" if n in ptrs else "constexpr" if n in consts else "i32" for n in fn.arg_names}
    aligned = [n for n in fn.arg_names if n in ptrs or n.startswith("stride") or n == "K"]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps, "enable_fp_fusion": True})
