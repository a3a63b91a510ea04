"""The SparseGPT solver (Frantar & Alistarh, 2023): prune columns left to right, pushing each error onward.

Pure tensors in and out: float32 weight `W` (rows x columns) and Hessian `H = 2/N sum x x^T` (columns x
columns). An optional column permutation is applied to `W` and `H`, the solve runs in that order, and the result
is un-permuted, so ROSE is nothing but a permutation handed to this function.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Sequence

import torch

from .config import DEFAULT_BLOCKSIZE, DEFAULT_PERCDAMP, Sparsity
from .masks import smallest_mask

log = logging.getLogger(__name__)
MAX_DAMP_RETRIES = 6  # each retry multiplies the damping by 10


@contextlib.contextmanager
def _one_thread():
    """The column loop is thousands of tiny ops: on CPU, thread hand-offs cost more than they save (4x here).
    Its outer products have no reductions, so the result does not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def inverse_hessian_factor(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of `(H + damp I)^-1`, retrying with 10x damping while `H` is not positive definite."""
    mean_diag = torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    damp = percdamp
    for attempt in range(MAX_DAMP_RETRIES + 1):
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0:
                if attempt:
                    log.warning("Hessian not positive definite at percdamp=%g; solved with percdamp=%g",
                                percdamp, damp)
                return U
        damp *= 10
    raise RuntimeError(f"Hessian is not positive definite even with percdamp={damp / 10:g}: "
                       "use more calibration samples or a larger --percdamp")


def sparsegpt(W: torch.Tensor, H: torch.Tensor, sparsity: Sparsity, *, perm: torch.Tensor | None = None,
              blocks: Sequence[int] | None = None, blocksize: int = DEFAULT_BLOCKSIZE,
              percdamp: float = DEFAULT_PERCDAMP) -> torch.Tensor:
    """Return the pruned copy of `W`.

    `perm` is a column order (new position -> original column); for N:M it must move whole groups of M.
    `blocks` gives the widths of the lazy-update blocks in that order (default: `blocksize` each), so that a
    permutation that moves a short block keeps every solver block equal to one original block.
    """
    W = W.detach().clone().float()
    H = H.detach().clone().float()
    rows, cols = W.shape
    dead = torch.diag(H) == 0            # inputs that never fire carry no information: zero them
    H[dead, dead] = 1
    W[:, dead] = 0
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    Hinv = inverse_hessian_factor(H, percdamp)
    n, m = sparsity.n, sparsity.m

    if blocks is None:
        blocks = [min(blocksize, cols - i) for i in range(0, cols, blocksize)]
    if sum(blocks) != cols:
        raise ValueError(f"block widths {list(blocks)} do not add up to {cols} columns")
    bounds = [0, *itertools.accumulate(blocks)]

    for i1, i2 in zip(bounds[:-1], bounds[1:]):
        W1 = W[:, i1:i2].clone()
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        Err1 = torch.zeros_like(W1)
        if sparsity.is_nm:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:                              # one unstructured mask per block, by OBS saliency w^2 / [H^-1]_jj^2
            mask1 = smallest_mask(W1 ** 2 / d.unsqueeze(0) ** 2, int(W1.numel() * sparsity.ratio))
        with _one_thread():
            for i in range(i2 - i1):
                if sparsity.is_nm and i % m == 0:  # N:M: choose on the already-updated weights of this group
                    score = W1[:, i:i + m] ** 2 / d[i:i + m].unsqueeze(0) ** 2
                    mask1.scatter_(1, i + torch.topk(score, n, dim=1, largest=False).indices, True)
                w = W1[:, i]
                q = torch.where(mask1[:, i], torch.zeros_like(w), w)
                err = (w - q) / Hinv1[i, i]
                W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)  # spread the error over later columns
                W1[:, i] = q
                Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]                            # lazy batch update of the rest

    if perm is not None:
        W = W[:, torch.argsort(perm)]
    return W


def reconstruction_error(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor) -> float:
    """Relative error `||W X - W' X|| / ||W X||` on the calibration inputs, computed exactly from `H ~ X X^T`."""
    W = W.float()
    delta = W - W_new.float()
    num = torch.sum((delta @ H) * delta)
    den = torch.sum((W @ H) * W)
    if den <= 0:
        return 0.0
    return float(torch.sqrt(torch.clamp(num, min=0) / den))
