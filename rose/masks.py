"""Vectorised mask selection shared by every method: True marks a weight to zero."""
from __future__ import annotations

import torch


def smallest_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask exactly the `k` smallest entries of `scores` (over the whole tensor)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.topk(scores.flatten(), k, largest=False).indices] = True
    return mask.view_as(scores)


def row_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Mask the `int(cols * ratio)` smallest entries of every row (Wanda's per-output comparison group)."""
    k = int(scores.shape[1] * ratio)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask the `n` smallest entries in every group of `m` consecutive columns of every row."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"width {cols} is not a multiple of {m}")
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=2, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(rows, cols)


def is_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of `m` consecutive input weights of every row holds at least `n` zeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    zeros = (weight.reshape(rows, cols // m, m) == 0).sum(dim=2)
    return bool((zeros >= n).all())
