"""`--permute` (N:M only): free input-channel permutations that let N:M keep more of what matters.

N:M zeroes N of every M *consecutive* input weights of a row, so which channels share a group decides what can be
kept. Some input channels can be reordered for free: the neighbouring layer that produces them reorders its output
rows to match, and the decoder layer computes the same function (`arch.free_permutations`: the MLP's units, and
each value head's dimensions). Before a decoder layer is pruned, for each such consumer (`down_proj`, `o_proj`)
this module searches a permutation that raises the Wanda saliency `|W_ij| * ||X_j||` that N:M keeps, on the
statistics the pruning itself uses, then applies it to the weights and the statistics. Any method then prunes the
permuted layer as usual.

The search (Pool & Yu's channel permutations, 2021, in spirit): each round pairs up the groups at random and
deals each pair's 2M columns into two groups again, the best of every way to do so for M <= 4 (35 for 2:4), of
the identity and every single swap for larger M. A pair is only changed when that keeps more, so no round keeps
less than the one before.
"""
from __future__ import annotations

import itertools
import time
from typing import Any

import torch
from torch import nn

from .arch import ChannelGroup, free_permutations, get_weight, permute_channels
from .config import PruneConfig
from .masks import nm_mask
from .ordering import wanda_scores
from .stats import InputStats

_CHUNK = 1 << 24   # elements of one round's candidate tensor held at a time


def kept_saliency(S: torch.Tensor, n: int, m: int) -> float:
    """Saliency that N:M keeps: what the pruning's own N:M mask leaves of `S`."""
    return float(S.masked_fill(nm_mask(S, n, m), 0).sum())


def _deals(m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ways to deal 2M columns into two groups of M, as index tensors (ways, M) for each group; the first is the
    identity. Every way with column 0 in the first group for M <= 4, else the identity and each single swap."""
    if m <= 4:
        first = [c for c in itertools.combinations(range(2 * m), m) if 0 in c]
    else:
        first = [tuple(range(m))] + [tuple(sorted(set(range(m)) - {i} | {m + j})) for i in range(m) for j in range(m)]
    second = [[i for i in range(2 * m) if i not in c] for c in first]
    return torch.tensor(first), torch.tensor(second)


def _top_sum(X: torch.Tensor, keep: int) -> torch.Tensor:
    """Sum of the `keep` largest along dim -2 of X (..., M, rows). Elementwise forms for the common cases, as
    `topk` over a tiny dimension is several times slower."""
    m = X.shape[-2]
    if keep == 1:
        return X.amax(-2)
    if keep == m - 1:
        return X.sum(-2) - X.amin(-2)
    if keep == 2:   # the two largest = the largest sum of two
        best = None
        for i, j in itertools.combinations(range(m), 2):
            s = X[..., i, :] + X[..., j, :]
            best = s if best is None else torch.maximum(best, s)
        return best
    return X.topk(keep, dim=-2).values.sum(-2)


def balanced_permutation(S: torch.Tensor, n: int, m: int, rounds: int,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """A column permutation (new position -> old column) of saliency `S` (rows x columns, columns % m == 0) under
    which N:M keeps at least as much saliency as under the identity."""
    rows, cols = S.shape
    groups, keep = cols // m, m - n
    perm = torch.arange(cols)
    if groups < 2:
        return perm
    A, B = _deals(m)
    St = S.detach().float().t().contiguous()                        # (cols, rows): a column's values together
    half = groups // 2
    step = max(1, _CHUNK // (len(A) * m * rows))   # pairs scored at a time
    for _ in range(rounds):
        order = torch.randperm(groups, generator=generator)
        grid = perm.view(groups, m).clone()
        pa, pb = order[:half], order[half:2 * half]
        both = torch.cat([grid[pa], grid[pb]], dim=1)              # (pairs, 2M) column ids
        best = torch.empty(half, dtype=torch.long)
        for lo in range(0, half, step):
            X = St[both[lo:lo + step]]                             # (pairs, 2M, rows)
            score = (_top_sum(X[:, A], keep) + _top_sum(X[:, B], keep)).sum(-1)   # (pairs, ways)
            gain = score - score[:, :1]
            choice = gain.argmax(1)
            # only a real gain moves a pair: float rounding must not trade one split for an equal one
            choice[gain.max(1).values <= 1e-6 * score[:, 0].abs()] = 0
            best[lo:lo + step] = choice
        grid[pa], grid[pb] = both.gather(1, A[best]), both.gather(1, B[best])
        perm = grid.flatten()
    return perm


def _group_saliency(S: torch.Tensor, group: ChannelGroup, k: int) -> torch.Tensor:
    """The consumer's saliency columns that permutation k reorders, the tied blocks stacked as more rows."""
    return torch.cat([S[:, s:s + group.width] for s in group.tied[k]], dim=0)


def permute_layer(model: nn.Module, layer: nn.Module, stats: dict[str, InputStats], cfg: PruneConfig,
                  seed: int) -> dict[str, dict[str, Any]]:
    """Search and apply the free permutations of one decoder layer before it is pruned; the consumers' statistics
    are permuted with their columns. Returns per consumer sublayer the share of its saliency that N:M loses,
    before and after, for the recipe."""
    n, m = cfg.sparsity.n, cfg.sparsity.m
    g = torch.Generator().manual_seed(seed)
    records: dict[str, dict[str, Any]] = {}
    for group in free_permutations(model, layer):
        t0 = time.perf_counter()
        if group.width % m:   # N:M groups would straddle the blocks the permutation may move within
            records[group.consumer] = {"skipped": f"width {group.width} is not a multiple of {m}"}
            continue
        S = wanda_scores(get_weight(layer.get_submodule(group.consumer)), stats[group.consumer].sq_norm).cpu()
        total = float(S.sum()) or 1.0
        perms = [balanced_permutation(_group_saliency(S, group, k), n, m, cfg.permute_rounds, g)
                 for k in range(len(group.tied))]
        cols = permute_channels(layer, group, perms)
        stats[group.consumer].permute_(cols)
        cols = cols.cpu()
        records[group.consumer] = {"lost_before": round(1 - kept_saliency(S, n, m) / total, 6),
                                   "lost_after": round(1 - kept_saliency(S[:, cols], n, m) / total, 6),
                                   "moved": int((cols != torch.arange(len(cols))).sum()),
                                   "seconds": round(time.perf_counter() - t0, 4)}
    return records
