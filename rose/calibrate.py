"""The generic sequential calibration loop (SparseGPT's protocol), one decoder layer at a time.

1. capture the inputs of the first decoder layer for every calibration sample;
2. for each layer: collect statistics of every linear sublayer, prune them, then run the *pruned* layer to get
   the inputs of the next one.
With `--order best`, a third step guards each decoder layer: the dense model's own hidden states are carried
along, and if the layer with SparseGPT's solution for every sublayer comes closer to them than the layer with the
per-sublayer best orders, SparseGPT's solution is kept for the whole layer.
Only the current layer (plus embeddings) sits on the compute device, so models larger than it can be pruned.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import all_sublayers, decoder_layers, get_weight, linear_sublayers, set_weight
from .config import PruneConfig
from .errors import RoseError
from .methods import SPARSEGPT_WEIGHT, prune_weight
from .offload import all_but_on_device, calibration_mode, on_device, to_device
from .solver import reconstruction_error
from .stats import InputStats

log = logging.getLogger(__name__)


class _Captured(Exception):
    """Raised by the pre-hook on the first layer to stop the forward pass once its inputs are caught."""


def check_widths(model: nn.Module, cfg: PruneConfig) -> None:
    """Fail before any work when an N:M pattern does not fit a sublayer's input width."""
    if not cfg.sparsity.is_nm:
        return
    m = cfg.sparsity.m
    bad = [f"{name} (in_features={get_weight(mod).shape[1]})" for name, mod in all_sublayers(model).items()
           if get_weight(mod).shape[1] % m]
    if bad:
        raise RoseError(f"{cfg.sparsity} needs input widths that are multiples of {m}; not: {', '.join(bad[:4])}"
                        + (f" and {len(bad) - 4} more" if len(bad) > 4 else ""))
    if cfg.method == "rose" and cfg.blocksize % m:
        raise RoseError(f"--blocksize {cfg.blocksize} must be a multiple of M={m} for {cfg.sparsity}")


def capture_inputs(model: nn.Module, calib: torch.Tensor, device: str) -> tuple[list[torch.Tensor], dict]:
    """Hidden states entering the first decoder layer for each sample, and that layer's keyword arguments."""
    layers = decoder_layers(model)
    inputs: list[torch.Tensor] = []
    kwargs: dict[str, Any] = {}

    def hook(module, args, kw):
        hidden = args[0] if args else kw.pop("hidden_states")
        inputs.append(hidden.detach())
        if not kwargs:
            kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Captured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with all_but_on_device(model, layers, device), on_device(layers[0], device):
            for row in calib:
                with contextlib.suppress(_Captured):
                    model(row.unsqueeze(0).to(device), use_cache=False)
    finally:
        handle.remove()
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    kwargs["use_cache"] = False
    return inputs, kwargs


def _run_layer(layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    outs = []
    for x in inputs:
        out = layer(x, **kwargs)
        outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outs


def token_error(outs: Iterable[torch.Tensor], targets: Iterable[torch.Tensor]) -> float:
    """Mean over tokens of `||y' - y||^2 / ||y||^2`: per token, as the final RMSNorm sees the hidden state.
    `outs` may be a generator, so that a layer's outputs are scored one sample at a time and never all held."""
    total, count = 0.0, 0
    for o, t in zip(outs, targets):
        o, t = o.float().reshape(-1, o.shape[-1]), t.float().reshape(-1, t.shape[-1])
        total += float(((o - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12)).sum())
        count += o.shape[0]
    return total / max(count, 1)


def _zero_fraction(module: nn.Module) -> float:
    W = get_weight(module)
    return round(int((W == 0).sum()) / W.numel(), 6)


def _layer_guard(layer: nn.Module, subs: dict[str, nn.Module], fallback: dict[str, torch.Tensor],
                 recs: list[dict], inputs: list[torch.Tensor], targets: list[torch.Tensor], kwargs: dict,
                 ) -> list[torch.Tensor]:
    """Keep the per-sublayer best orders or SparseGPT's solution for the whole layer, whichever output lies
    closer to the dense model's; returns the kept layer's outputs (the next layer's inputs).

    Per-sublayer reconstruction error does not see how errors combine through attention, the MLP and the
    residual stream, nor how they add up over layers; this check does, at the cost of one more layer forward
    (two where SparseGPT's solution is kept, to hold only one set of outputs at a time).
    """
    outs = _run_layer(layer, inputs, kwargs)
    if not fallback:
        return outs
    err_best = token_error(outs, targets)
    chosen = {name: get_weight(subs[name]).clone() for name in fallback}
    for name, W in fallback.items():
        set_weight(subs[name], W)
    err_sgpt = token_error((_run_layer(layer, [x], kwargs)[0] for x in inputs), targets)
    keep_sgpt = err_sgpt < err_best
    if keep_sgpt:
        del outs
        outs = _run_layer(layer, inputs, kwargs)
    else:
        for name, W in chosen.items():
            set_weight(subs[name], W)
    for rec in recs:
        rec["layer_guard"] = {"kept": "sparsegpt" if keep_sgpt else "best", "error_best": round(err_best, 6),
                              "error_sparsegpt": round(err_sgpt, 6)}
        if keep_sgpt and rec["name"] in fallback:
            rec["order_before_guard"] = rec["order"]
            rec["order"] = "identity"
            rec["rel_error"] = rec["candidate_errors"]["identity"]
            rec["sparsity"] = _zero_fraction(subs[rec["name"]])
    log.info("layer guard: best %.5f, sparsegpt %.5f -> kept %s", err_best, err_sgpt,
             "sparsegpt" if keep_sgpt else "best")
    return outs


def prune_model(model: nn.Module, calib: torch.Tensor, cfg: PruneConfig, progress: bool = True) -> list[dict]:
    """Prune every linear sublayer of every decoder layer in place; returns one record per sublayer."""
    check_widths(model, cfg)
    device = cfg.device
    records: list[dict] = []
    layers = decoder_layers(model)
    guard = cfg.method == "rose" and cfg.order == "best"
    with calibration_mode(model):
        inputs, kwargs = capture_inputs(model, calib, device)
        kwargs = to_device(kwargs, device)
        dense_inputs: list[torch.Tensor] = []  # the dense model's hidden states, for the layer guard only
        for idx, layer in enumerate(tqdm(layers, desc=f"{cfg.method} {cfg.sparsity}", disable=not progress)):
            with on_device(layer, device):
                subs = linear_sublayers(model, layer)
                stats = {name: InputStats(get_weight(mod).shape[1], device) for name, mod in subs.items()}
                hooks = [mod.register_forward_hook(lambda m, a, o, s=stats[name]: s.add(a[0]))
                         for name, mod in subs.items()]
                try:
                    outs = _run_layer(layer, inputs, kwargs)
                finally:
                    for h in hooks:
                        h.remove()
                if guard and idx == 0:  # both streams start from the same inputs: the pass above is the dense one
                    dense_inputs = outs
                elif guard:  # the dense layer on the dense stream, in place: the guard's targets
                    for i, x in enumerate(dense_inputs):
                        dense_inputs[i] = _run_layer(layer, [x], kwargs)[0]
                del outs  # otherwise unused: the next layer's inputs come from the pruned layer
                line, layer_recs, fallback = [], [], {}
                for name, mod in subs.items():
                    t0 = time.perf_counter()
                    W = get_weight(mod).float()
                    W_new, info = prune_weight(W, stats[name], cfg)
                    if SPARSEGPT_WEIGHT in info:
                        fallback[name] = info.pop(SPARSEGPT_WEIGHT)
                    err = reconstruction_error(W, W_new, stats[name].H)
                    set_weight(mod, W_new)
                    layer_recs.append({"layer": idx, "name": name, "shape": list(W.shape),
                                       "sparsity": _zero_fraction(mod), "rel_error": round(err, 6),
                                       "seconds": round(time.perf_counter() - t0, 4), **info})
                    line.append(f"{name.split('.')[-1]}={err:.4f}" + ("*" if info.get("reordered") else ""))
                    del stats[name]
                log.info("layer %d rel. error %s", idx, " ".join(line))  # * = reordered by ROSE
                if guard:
                    inputs = _layer_guard(layer, subs, fallback, layer_recs, inputs, dense_inputs, kwargs)
                    fallback.clear()
                else:
                    inputs = _run_layer(layer, inputs, kwargs)
                records.extend(layer_recs)
    return records
