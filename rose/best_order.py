"""`--order best` (ours, beyond the paper): a candidate search per sublayer and a guard per decoder layer.

1. Per sublayer, SparseGPT in the identity order, in descending diag(H) (GPTQ's act-order) and, where the layer is
   columnar, in ROSE's order; the lowest reconstruction error wins. SparseGPT's own solution is kept aside as the
   fallback whenever another order won.
2. Per decoder layer, the guard: the dense model's hidden states are carried along, and if the layer with every
   fallback in place lands closer to them than the layer with the winners, the whole layer keeps the fallbacks.
   A sublayer's error on its own inputs does not see how errors combine through attention, the MLP and the
   residual stream, nor how they add up over layers; this check does, at the cost of one more layer forward on
   each stream (two on the pruned one where the fallbacks are kept, to hold one set of outputs at a time). The
   dense model's hidden states are the calibration loop's dense stream (dense_stream.py), which the refit reads too.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .arch import get_weight, set_weight
from .config import PruneConfig
from .dense_stream import Run, token_error
from .methods import Candidate, Pruned, solve
from .ordering import Ordering, hessian_diag_order
from .solver import reconstruction_error
from .stats import InputStats

log = logging.getLogger(__name__)

def search(W: torch.Tensor, stats: InputStats, cfg: PruneConfig, rose: Ordering, info: dict[str, Any]) -> Pruned:
    """The lowest-error of the identity, diag(H) and (where columnar) ROSE orders. Only the identity solution and
    the best so far are held."""
    W_identity = solve(W, stats, cfg, None)
    errors = {"identity": reconstruction_error(W, W_identity, stats.H)}
    best, W_best = "identity", W_identity
    candidates = {"diag_h": hessian_diag_order(stats.H, cfg.sparsity, cfg.blocksize)}
    if rose.reordered:
        candidates["rose"] = rose
    for name, order in candidates.items():
        W_new = solve(W, stats, cfg, order)
        errors[name] = reconstruction_error(W, W_new, stats.H)
        if errors[name] < errors[best]:
            best, W_best = name, W_new
    rounded = {k: round(v, 6) for k, v in errors.items()}
    info.update(order=best, candidate_errors=rounded)
    fallback = Candidate(W_identity, rounded["identity"], "identity") if best != "identity" else None
    return Pruned(W_best, info, fallback)


def guard_layer(run: Run, subs: dict[str, nn.Module], fallbacks: dict[str, torch.Tensor],
                inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict | None]:
    """Keep the chosen weights or every fallback, whichever layer output lies closer to `targets`; returns the kept
    layer's outputs (the next layer's inputs) and the decision (None when there is no fallback to weigh)."""
    outs = run(inputs)
    if not fallbacks:
        return outs, None
    err_best = token_error(outs, targets)
    chosen = {name: get_weight(subs[name]).clone() for name in fallbacks}
    for name, W in fallbacks.items():
        set_weight(subs[name], W)
    err_sgpt = token_error((run([x])[0] for x in inputs), targets)
    keep_sgpt = err_sgpt < err_best
    if keep_sgpt:
        del outs
        outs = run(inputs)
    else:
        for name, W in chosen.items():
            set_weight(subs[name], W)
    log.info("layer guard: best %.5f, sparsegpt %.5f -> kept %s", err_best, err_sgpt,
             "sparsegpt" if keep_sgpt else "best")
    return outs, {"kept": "sparsegpt" if keep_sgpt else "best", "fallback_kept": keep_sgpt,
                  "error_best": round(err_best, 6), "error_sparsegpt": round(err_sgpt, 6)}


class LayerGuard:
    """The strategy the calibration loop runs for `--order best` after a decoder layer's sublayers are pruned: it
    weighs the fallbacks against the chosen weights on the dense stream's targets (dense_stream.py)."""

    def settle(self, run: Run, subs: dict[str, nn.Module], fallbacks: dict[str, Candidate | None],
               inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict | None]:
        """Weigh the fallbacks (sublayer -> Candidate or None) against the chosen weights; returns the kept layer's
        outputs and the decision (its `fallback_kept` tells the loop whose records to rewrite)."""
        weights = {name: c.weight for name, c in fallbacks.items() if c is not None}
        return guard_layer(run, subs, weights, inputs, targets)
