"""The dense stream: the dense model's hidden states, carried beside the pruned ones through the sequential loop.

Method-independent. The calibration loop keeps one when a stage needs to compare a pruned decoder layer with the
dense model: the layer guard of `--order best` (best_order.py) and the refit (refit.py) both read its `targets`,
the dense model's output of the current layer on the dense model's own inputs.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

Run = Callable[[list[torch.Tensor]], list[torch.Tensor]]  # the layer, with its current weights, on some inputs


class DenseStream:
    """After `advance` at layer l, `targets[i]` is the dense model's output of layer l for calibration sample i."""

    def __init__(self) -> None:
        self.targets: list[torch.Tensor] = []

    def advance(self, run: Run, collected: list[torch.Tensor]) -> None:
        """Call before the layer is pruned, while `run` still computes the dense layer. At the first layer both
        streams hold the same inputs, so the statistics pass's outputs (`collected`) are the targets; later, the
        dense layer runs on the dense stream, in place (one copy of the activations)."""
        if not self.targets:
            self.targets = collected
            return
        for i, x in enumerate(self.targets):
            self.targets[i] = run([x])[0]


def token_error(outs: Iterable[torch.Tensor], targets: Iterable[torch.Tensor]) -> float:
    """Mean over tokens of `||y' - y||^2 / ||y||^2`: per token, as the final RMSNorm sees the hidden state.
    `outs` may be a generator, so that a layer's outputs are scored one sample at a time and never all held."""
    total, count = 0.0, 0
    for o, t in zip(outs, targets):
        o, t = o.float().reshape(-1, o.shape[-1]), t.float().reshape(-1, t.shape[-1])
        total += float(((o - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12)).sum())
        count += o.shape[0]
    return total / max(count, 1)
