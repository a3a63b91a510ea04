"""Perplexity with the papers' protocol: non-overlapping windows of `seqlen` tokens over the joined test text."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import RoseError


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seqlen: int, max_tokens: int | None = None,
               device: str = "cpu", progress: bool = True) -> dict:
    """exp(mean next-token loss) over the first `max_tokens // seqlen` windows (all windows by default)."""
    windows = len(ids) // seqlen
    if max_tokens is not None:
        windows = min(windows, max_tokens // seqlen)
    if windows < 1:
        raise RoseError(f"evaluation text has {len(ids)} tokens, fewer than one window of --seqlen {seqlen}")
    model.eval()
    total = 0.0
    for w in tqdm(range(windows), desc="perplexity", disable=not progress):
        batch = ids[w * seqlen:(w + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(batch, use_cache=False).logits.float()
        total += F.cross_entropy(logits[0, :-1], batch[0, 1:]).item()
    return {"perplexity": math.exp(total / windows), "windows": windows, "seqlen": seqlen,
            "tokens": windows * seqlen}
