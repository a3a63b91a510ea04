"""The method registry: each method maps (weight, statistics, config) to a `Pruned` result.

Every method is faithful to its own paper's code:
- magnitude: zero the smallest |W| over the whole matrix, or per group of M consecutive inputs for N:M.
- Wanda (Sun et al., 2024): |W_ij| * ||X_j||_2, compared within each output row, or within each N:M group.
- SparseGPT (Frantar & Alistarh, 2023): the OBS solver in `solver.py`.
- ROSE (Su & Wang, 2026): SparseGPT on the column order of `ordering.py`; with `order="best"`, the candidate
  search and decoder-layer guard of `best_order.py`.
A method may also supply a layer guard (a strategy the calibration loop runs after each decoder layer, without
knowing which method asked for it).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .config import PruneConfig
from .masks import nm_mask, row_mask, smallest_mask
from .ordering import Ordering, rose_order, wanda_scores
from .solver import sparsegpt
from .stats import InputStats

if TYPE_CHECKING:
    from .best_order import LayerGuard


@dataclass
class Candidate:
    """Another solution of the same sublayer that a layer guard may keep instead: its weight, its reconstruction
    error and the order that produced it."""

    weight: torch.Tensor
    rel_error: float
    order: str


@dataclass
class Pruned:
    """A method's answer for one sublayer: the pruned weight, diagnostics for the recipe, and optionally a
    fallback candidate for the layer guard."""

    weight: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)
    fallback: Candidate | None = None


def no_guard(cfg: PruneConfig) -> None:
    return None


@dataclass(frozen=True)
class Method:
    prune: Callable[[torch.Tensor, InputStats, PruneConfig], Pruned]
    guard: Callable[[PruneConfig], LayerGuard | None] = no_guard   # makes a decoder-layer guard, or None


METHODS: dict[str, Method] = {}


def register(name: str, guard: Callable[[PruneConfig], LayerGuard | None] = no_guard):
    def add(fn: Callable[[torch.Tensor, InputStats, PruneConfig], Pruned]):
        METHODS[name] = Method(fn, guard)
        return fn
    return add


def prune_weight(W: torch.Tensor, stats: InputStats, cfg: PruneConfig) -> Pruned:
    """Dispatch to the configured method; sparsity 0 returns the weight untouched."""
    if cfg.sparsity.ratio == 0:
        return Pruned(W.detach().clone().float())
    return METHODS[cfg.method].prune(W.float(), stats, cfg)


def layer_guard(cfg: PruneConfig) -> LayerGuard | None:
    """The decoder-layer guard the configured method asks for (None for most)."""
    return METHODS[cfg.method].guard(cfg)


@register("magnitude")
def magnitude(W: torch.Tensor, stats: InputStats, cfg: PruneConfig) -> Pruned:
    s = cfg.sparsity
    scores = W.abs()
    mask = nm_mask(scores, s.n, s.m) if s.is_nm else smallest_mask(scores, int(W.numel() * s.ratio))
    return Pruned(W.masked_fill(mask, 0))


@register("wanda")
def wanda(W: torch.Tensor, stats: InputStats, cfg: PruneConfig) -> Pruned:
    s = cfg.sparsity
    scores = wanda_scores(W, stats.sq_norm)
    mask = nm_mask(scores, s.n, s.m) if s.is_nm else row_mask(scores, s.ratio)
    return Pruned(W.masked_fill(mask, 0))


def solve(W: torch.Tensor, stats: InputStats, cfg: PruneConfig, order: Ordering | None) -> torch.Tensor:
    """SparseGPT on `W` in `order` (None, or an order that does not reorder: the identity)."""
    perm, blocks = (order.perm, order.blocks) if order is not None and order.reordered else (None, None)
    return sparsegpt(W, stats.H, cfg.sparsity, perm=perm, blocks=blocks, blocksize=cfg.blocksize,
                     percdamp=cfg.percdamp)


@register("sparsegpt")
def sparsegpt_method(W: torch.Tensor, stats: InputStats, cfg: PruneConfig) -> Pruned:
    return Pruned(solve(W, stats, cfg, None))


def _rose_guard(cfg: PruneConfig) -> LayerGuard | None:
    from .best_order import LayerGuard

    return LayerGuard() if cfg.order == "best" else None


@register("rose", guard=_rose_guard)
def rose(W: torch.Tensor, stats: InputStats, cfg: PruneConfig) -> Pruned:
    """SparseGPT in ROSE's order; with `order="best"`, the best of identity, ROSE and diag(H) orders."""
    energy = stats.reference_scaler if cfg.rose_scaler == "reference" else stats.sq_norm
    ordering = rose_order(W, energy, cfg.sparsity, blocksize=cfg.blocksize, threshold=cfg.rose_threshold,
                          mode=cfg.rose_order, within_group=cfg.rose_within_group)
    info: dict[str, Any] = {"relative_range": round(ordering.relative_range, 6), "reordered": ordering.reordered}
    if cfg.order == "best":
        from .best_order import search

        return search(W, stats, cfg, ordering, info)
    info["order"] = "rose" if ordering.reordered else "identity"
    return Pruned(solve(W, stats, cfg, ordering), info)
