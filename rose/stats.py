"""Per-sublayer calibration statistics: running-mean Hessian and per-column input energy, in float32."""
from __future__ import annotations

import torch


class InputStats:
    """Accumulates `H = 2/N sum_t x_t x_t^T` and `s_j = 1/N sum_t x_tj^2` over N calibration tokens.

    Every token weighs the same (the released ROSE code weighted sample k by 1/k; `reference_scaler` keeps that
    variant for reproduction only).
    """

    def __init__(self, columns: int, device: torch.device | str, hessian: bool = True):
        self.tokens = 0
        self.samples = 0
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device) if hessian else None
        self.sq_norm = torch.zeros(columns, dtype=torch.float32, device=device)
        self.reference_scaler = torch.zeros(columns, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        """Add one calibration sample's inputs (any leading shape, last dim = columns)."""
        x = x.reshape(-1, x.shape[-1]).float()
        t = x.shape[0]
        total = self.tokens + t
        if self.H is not None:
            self.H.mul_(self.tokens / total).addmm_(x.T, x, alpha=2.0 / total)
        self.sq_norm.mul_(self.tokens / total).add_((x * x).sum(0), alpha=1.0 / total)
        # ROSE's released code rescales by (k-1)/k but adds ||x_k||^2 / k^2, so sample k weighs 1/k overall
        self.samples += 1
        k = self.samples
        self.reference_scaler.mul_((k - 1) / k).add_((x * x).sum(0), alpha=1.0 / k ** 2)
        self.tokens = total

    def permute_(self, perm: torch.Tensor) -> None:
        """Reorder the columns (`--permute` moved the sublayer's input channels): new position -> old column."""
        perm = perm.to(self.sq_norm.device)
        if self.H is not None:
            self.H = self.H[perm][:, perm]
        self.sq_norm = self.sq_norm[perm]
        self.reference_scaler = self.reference_scaler[perm]

    @property
    def col_norm(self) -> torch.Tensor:
        """Root-mean-square input per column, `||X_j||_2 / sqrt(N)`: Wanda's activation factor."""
        return self.sq_norm.sqrt()
