"""The refit after pruning: block-wise reconstruction of each decoder layer, its masks frozen (as EBFT and BESA).

Every method here solves each linear sublayer once, against its own inputs; the errors of a decoder layer's
sublayers then add up through attention, the MLP and the residual stream, and over the layers. The refit
optimises the *kept* weights of one decoder layer's linear sublayers so that the pruned layer, fed the pruned
stream (the hidden states the pruned model really produces), reproduces the dense model's output of that layer
on the dense stream (dense_stream.py). Calibration data only:

- gradients reach only the weights of the layer's linear sublayers (norms, biases and embeddings stay as they
  are, unless `refit_norms` adds the layer's other parameters), and a pruned weight stays exactly zero: its
  gradient is masked and the mask is applied again after every step, so an N:M pattern stays N:M;
- Adam, one calibration window per step, the windows in an order drawn from the run's seed (deterministic for a
  given seed and thread count), float32;
- the loss is the per-token relative error `||y' - y||^2 / ||y||^2` that the layer guard measures, as the next
  RMSNorm sees the hidden state (`refit_loss="mse"` is the plain alternative);
- kept only where it lands closer to the dense outputs over all calibration windows than the layer did before;
  otherwise the layer's weights are put back bit for bit. Both errors go into the recipe.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .config import PruneConfig
from .dense_stream import Run, token_error
from .errors import RoseError

log = logging.getLogger(__name__)


def layer_loss(out: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """The training loss of one window: mean per-token relative error (`token_error`'s), or mean squared error."""
    out, target = out.reshape(-1, out.shape[-1]), target.reshape(-1, target.shape[-1])
    if kind == "mse":
        return (out - target).pow(2).mean()
    return ((out - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-12)).mean()


@contextlib.contextmanager
def trainable(layer: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Gradients on, for `params` only; every parameter's `requires_grad` is restored afterwards."""
    flags = [(p, p.requires_grad) for p in layer.parameters()]
    wanted = {id(p) for p in params}
    for p, _ in flags:
        p.requires_grad_(id(p) in wanted)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def window_order(samples: int, steps: int, seed: int, layer: int) -> list[int]:
    """Which calibration window each step trains on: shuffled passes over the first `samples` windows, drawn from
    the run's seed and the layer's index."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    passes = -(-steps // samples)
    return torch.cat([torch.randperm(samples, generator=g) for _ in range(passes)])[:steps].tolist()


def refit_layer(layer: nn.Module, run: Run, subs: dict[str, nn.Module], inputs: list[torch.Tensor],
                targets: list[torch.Tensor], before: float, cfg: PruneConfig,
                index: int) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Refit the kept weights of `subs` (the pruned sublayers of `layer`, number `index`) towards `targets`;
    `before` is the layer's `token_error` to them as pruned. Returns the kept layer's outputs (the next layer's
    inputs) and the record: both errors, which weights were kept, steps and seconds."""
    t0 = time.perf_counter()
    params = [mod.weight for mod in subs.values()]
    keep = [p.detach() != 0 for p in params]
    if cfg.refit_norms:  # the rest of the layer (norm weights, biases): nothing to mask
        ids = {id(p) for p in params}
        rest = [p for p in layer.parameters() if id(p) not in ids]
        params += rest
        keep += [torch.ones_like(p, dtype=torch.bool) for p in rest]
    if any(p.dtype != torch.float32 for p in params):
        raise RoseError("the refit trains in float32: load the model in float32 to refit it")
    saved = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=cfg.refit_lr)
    with trainable(layer, params):
        for i in window_order(cfg.refit_samples or len(inputs), cfg.refit_steps, cfg.seed, index):
            loss = layer_loss(run([inputs[i]])[0], targets[i], cfg.refit_loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for p, k in zip(params, keep):
                p.grad.mul_(k)
            opt.step()
            with torch.no_grad():
                for p, k in zip(params, keep):
                    p.mul_(k)
    del opt
    outs = run(inputs)
    after = token_error(outs, targets)
    kept = after < before
    if not kept:  # the refit did not bring the layer closer to the dense model: put the pruned weights back
        del outs
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
        outs = run(inputs)
    seconds = time.perf_counter() - t0
    log.info("refit: layer error %.5f -> %.5f, kept %s (%.1f s)", before, after, "refit" if kept else "pruned",
             seconds)
    return outs, {"error_before": round(before, 6), "error_after": round(after, 6),
                  "kept": "refit" if kept else "pruned", "steps": cfg.refit_steps, "seconds": round(seconds, 2)}
