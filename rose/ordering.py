"""ROSE's column order (Su & Wang, CPAL 2026): a pure function from weights and statistics to a permutation.

ROSE = SparseGPT + this order. Columns (or, for N:M, whole groups of M columns) that would lose the most under a
Wanda-metric pre-pruning go first, so that their pruning errors have the most columns left to absorb them.
Blocks of `blocksize` original columns stay contiguous; blocks are ordered by their loss, too. A layer is only
reordered when its block losses differ enough (the "columnar" test).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import DEFAULT_BLOCKSIZE, DEFAULT_THRESHOLD, ROSE_ORDER_MODES, WITHIN_GROUP, Sparsity
from .masks import nm_mask


@dataclass
class Ordering:
    """A column permutation plus the diagnostics the recipe records."""

    perm: torch.Tensor          # new position -> original column
    blocks: list[int]           # widths of the solver's blocks in permuted order (each one original block)
    relative_range: float       # (max - min) / max of the (width-normalised) block losses
    reordered: bool


def identity_order(columns: int, blocksize: int = DEFAULT_BLOCKSIZE) -> Ordering:
    widths = [min(blocksize, columns - i) for i in range(0, columns, blocksize)]
    return Ordering(torch.arange(columns), widths, 0.0, False)


def wanda_scores(W: torch.Tensor, col_energy: torch.Tensor) -> torch.Tensor:
    """`|W_ij| * sqrt(s_j)`, with `s_j` the mean squared input of column j."""
    return W.abs().float() * col_energy.float().sqrt().unsqueeze(0)


def block_quantiles(S: torch.Tensor, p: float, blocksize: int) -> torch.Tensor:
    """Per block of `blocksize` columns, the value at `sort(block.flatten())[int(numel * p)]`, broadcast to a
    (1, columns) row. One k-th-value selection for all full blocks instead of a sort per block."""
    rows, cols = S.shape
    full = cols // blocksize * blocksize
    parts = []
    if full:
        blocks = S[:, :full].reshape(rows, -1, blocksize).transpose(0, 1).reshape(full // blocksize, -1)
        k = int(rows * blocksize * p)
        parts.append(blocks.kthvalue(k + 1, dim=1).values.repeat_interleave(blocksize))
    if cols > full:  # a short last block
        tail = S[:, full:].flatten()
        parts.append(tail.kthvalue(int(tail.numel() * p) + 1).values.expand(cols - full))
    return torch.cat(parts).unsqueeze(0)


def rose_order(W: torch.Tensor, col_energy: torch.Tensor, sparsity: Sparsity, *,
               blocksize: int = DEFAULT_BLOCKSIZE, threshold: float = DEFAULT_THRESHOLD,
               mode: str = "both", within_group: str = "keep") -> Ordering:
    """ROSE's two-level order for one sublayer; `mode` ablates the column or the block level."""
    rows, cols = W.shape
    if mode not in ROSE_ORDER_MODES or within_group not in WITHIN_GROUP:
        raise ValueError(f"unknown ROSE mode {mode!r} / within-group {within_group!r}")
    if sparsity.is_nm and blocksize % sparsity.m:
        raise ValueError(f"block size {blocksize} must be a multiple of M={sparsity.m}")
    ident = identity_order(cols, blocksize)
    if mode == "none" or sparsity.ratio == 0:
        return ident
    S = wanda_scores(W, col_energy)
    unit = sparsity.m if sparsity.is_nm else 1   # the atom that moves: a column, or a whole N:M group
    if sparsity.is_nm:
        L = S * nm_mask(S, sparsity.n, sparsity.m)            # pre-prune the N smallest per row and group
    else:
        L = S * (S <= block_quantiles(S, sparsity.ratio, blocksize))   # pre-prune each block at its p-quantile
    col_loss = L.sum(0)
    unit_loss = col_loss.reshape(-1, unit).sum(1)

    # block losses first: most layers are not columnar, and then no permutation is needed at all
    starts = list(range(0, cols, blocksize))
    widths = [min(blocksize, cols - i1) for i1 in starts]
    block_loss = [float(unit_loss[i1 // unit:(i1 + w) // unit].sum()) * blocksize / w   # a short last block
                  for i1, w in zip(starts, widths)]                                      # compares fairly
    losses = torch.tensor(block_loss, dtype=torch.float64)
    top = float(losses.max())
    rel_range = (top - float(losses.min())) / top if top > 0 else 0.0
    if rel_range <= threshold:
        return Ordering(ident.perm, ident.blocks, rel_range, False)

    block_perms = []
    for i1, width in zip(starts, widths):
        units = torch.arange(i1 // unit, (i1 + width) // unit)
        if mode in ("both", "columns"):
            units = units[torch.argsort(unit_loss[units], descending=True, stable=True)]
        members = units.unsqueeze(1) * unit + torch.arange(unit)          # whole groups, in unit order
        if unit > 1 and within_group == "sort":
            inner = torch.argsort(col_loss[members], dim=1, descending=True, stable=True)
            members = members.gather(1, inner)
        block_perms.append(members.flatten())
    order = range(len(block_perms))
    if mode in ("both", "blocks"):
        order = torch.argsort(losses, descending=True, stable=True).tolist()
    perm = torch.cat([block_perms[b] for b in order])
    return Ordering(perm, [ident.blocks[b] for b in order], rel_range, True)


def hessian_diag_order(H: torch.Tensor, sparsity: Sparsity, blocksize: int = DEFAULT_BLOCKSIZE) -> Ordering:
    """Columns (or whole N:M groups) by descending `diag(H)`: GPTQ's act-order, a cheap third candidate."""
    cols = H.shape[0]
    unit = sparsity.m if sparsity.is_nm else 1
    energy = torch.diag(H).float().reshape(-1, unit).sum(1)
    units = torch.argsort(energy, descending=True, stable=True)
    perm = (units.unsqueeze(1) * unit + torch.arange(unit)).flatten()
    return Ordering(perm, identity_order(cols, blocksize).blocks, 0.0, True)
