"""The method registry: each method maps (weight, statistics, config) to a pruned weight and diagnostics.

Every method is faithful to its own paper's code:
- magnitude: zero the smallest |W| over the whole matrix, or per group of M consecutive inputs for N:M.
- Wanda (Sun et al., 2024): |W_ij| * ||X_j||_2, compared within each output row, or within each N:M group.
- SparseGPT (Frantar & Alistarh, 2023): the OBS solver in `solver.py`.
- ROSE (Su & Wang, 2026): SparseGPT on the column order of `ordering.py`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .config import PruneConfig
from .masks import nm_mask, row_mask, smallest_mask
from .ordering import Ordering, hessian_diag_order, rose_order, wanda_scores
from .solver import reconstruction_error, sparsegpt
from .stats import InputStats

# info key under which `--order best` hands SparseGPT's solution to the decoder-layer check (popped there)
SPARSEGPT_WEIGHT = "sparsegpt_weight"

Method = Callable[[torch.Tensor, InputStats, PruneConfig], tuple[torch.Tensor, dict[str, Any]]]
METHODS: dict[str, Method] = {}


def register(name: str) -> Callable[[Method], Method]:
    def add(fn: Method) -> Method:
        METHODS[name] = fn
        return fn
    return add


def prune_weight(W: torch.Tensor, stats: InputStats, cfg: PruneConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    """Dispatch to the configured method; sparsity 0 returns the weight untouched."""
    if cfg.sparsity.ratio == 0:
        return W.detach().clone().float(), {}
    return METHODS[cfg.method](W.float(), stats, cfg)


@register("magnitude")
def magnitude(W: torch.Tensor, stats: InputStats, cfg: PruneConfig) -> tuple[torch.Tensor, dict]:
    s = cfg.sparsity
    scores = W.abs()
    mask = nm_mask(scores, s.n, s.m) if s.is_nm else smallest_mask(scores, int(W.numel() * s.ratio))
    return W.masked_fill(mask, 0), {}


@register("wanda")
def wanda(W: torch.Tensor, stats: InputStats, cfg: PruneConfig) -> tuple[torch.Tensor, dict]:
    s = cfg.sparsity
    scores = wanda_scores(W, stats.sq_norm)
    mask = nm_mask(scores, s.n, s.m) if s.is_nm else row_mask(scores, s.ratio)
    return W.masked_fill(mask, 0), {}


def _solve(W: torch.Tensor, stats: InputStats, cfg: PruneConfig, order: Ordering | None) -> torch.Tensor:
    perm, blocks = (order.perm, order.blocks) if order is not None and order.reordered else (None, None)
    return sparsegpt(W, stats.H, cfg.sparsity, perm=perm, blocks=blocks, blocksize=cfg.blocksize,
                     percdamp=cfg.percdamp)


@register("sparsegpt")
def sparsegpt_method(W: torch.Tensor, stats: InputStats, cfg: PruneConfig) -> tuple[torch.Tensor, dict]:
    return _solve(W, stats, cfg, None), {}


@register("rose")
def rose(W: torch.Tensor, stats: InputStats, cfg: PruneConfig) -> tuple[torch.Tensor, dict]:
    """SparseGPT in ROSE's order; with `order="best"`, the best of identity, ROSE and diag(H) orders."""
    energy = stats.reference_scaler if cfg.rose_scaler == "reference" else stats.sq_norm
    ordering = rose_order(W, energy, cfg.sparsity, blocksize=cfg.blocksize, threshold=cfg.rose_threshold,
                          mode=cfg.rose_order, within_group=cfg.rose_within_group)
    info: dict[str, Any] = {"relative_range": round(ordering.relative_range, 6), "reordered": ordering.reordered}
    if cfg.order != "best":
        info["order"] = "rose" if ordering.reordered else "identity"
        return _solve(W, stats, cfg, ordering), info
    # SparseGPT's own order first; then diag(H) and, where columnar, ROSE. Only the identity solution and the
    # best so far are held.
    W_identity = _solve(W, stats, cfg, None)
    errors = {"identity": reconstruction_error(W, W_identity, stats.H)}
    best, W_best = "identity", W_identity
    candidates = {"diag_h": hessian_diag_order(stats.H, cfg.sparsity, cfg.blocksize)}
    if ordering.reordered:
        candidates["rose"] = ordering
    for name, order in candidates.items():
        W_new = _solve(W, stats, cfg, order)
        errors[name] = reconstruction_error(W, W_new, stats.H)
        if errors[name] < errors[best]:
            best, W_best = name, W_new
    info.update(order=best, candidate_errors={k: round(v, 6) for k, v in errors.items()})
    if best != "identity":  # SparseGPT's own result, for the decoder-layer check in calibrate.py
        info[SPARSEGPT_WEIGHT] = W_identity
    return W_best, info
