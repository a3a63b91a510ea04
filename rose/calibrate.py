"""The generic sequential calibration loop (SparseGPT's protocol), one decoder layer at a time.

1. capture the inputs of the first decoder layer for every calibration sample;
2. for each layer: collect statistics of every linear sublayer, prune them, then run the *pruned* layer to get
   the inputs of the next one. With `cfg.permute` (N:M), the layer's free input-channel permutations are applied
   between the statistics and the pruning (permute.py): the layer's function, and so both streams, stay the same.
Two optional stages compare a pruned layer with the dense model, whose hidden states the loop then carries beside
the pruned ones (the dense stream, dense_stream.py): a method's layer guard (`--order best` supplies one, see
best_order.py), which settles each layer after its sublayers are pruned, and the refit (`cfg.refit`, refit.py),
which reconstructs the layer's output with its masks frozen, after the guard and before the outputs are passed
on. The loop runs both without knowing the method.
Only the current layer (plus embeddings) sits on the compute device, so models larger than it can be pruned.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import all_sublayers, decoder_layers, free_permutations, get_weight, linear_sublayers, set_weight
from .config import PruneConfig
from .dense_stream import DenseStream, token_error
from .errors import RoseError
from .methods import Candidate, layer_guard, prune_weight
from .offload import all_but_on_device, calibration_mode, full_fp32, on_device, to_device
from .permute import permute_layer
from .refit import refit_layer
from .solver import reconstruction_error
from .stats import InputStats

log = logging.getLogger(__name__)


class _Captured(Exception):
    """Raised by the pre-hook on the first layer to stop the forward pass once its inputs are caught."""


def check_widths(model: nn.Module, cfg: PruneConfig) -> None:
    """Fail before any work when an N:M pattern does not fit a sublayer's input width, or `--permute` meets a
    model whose free permutations rose does not know."""
    if not cfg.sparsity.is_nm:
        return
    if cfg.permute:
        free_permutations(model, decoder_layers(model)[0])
    m = cfg.sparsity.m
    bad = [f"{name} (in_features={get_weight(mod).shape[1]})" for name, mod in all_sublayers(model).items()
           if get_weight(mod).shape[1] % m]
    if bad:
        raise RoseError(f"{cfg.sparsity} needs input widths that are multiples of {m}; not: {', '.join(bad[:4])}"
                        + (f" and {len(bad) - 4} more" if len(bad) > 4 else ""))


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
    for name in ("cache", "past_key_values", "past_key_value"):  # the cache's names across transformers releases
        kwargs.pop(name, None)
    kwargs["use_cache"] = False
    return inputs, kwargs


def run_layer(layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    """The layer's output hidden states for each sample."""
    outs = []
    for x in inputs:
        out = layer(x, **kwargs)
        outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outs


def collect_stats(layer: nn.Module, subs: dict[str, nn.Module], inputs: list[torch.Tensor], kwargs: dict,
                  device: str) -> tuple[dict[str, InputStats], list[torch.Tensor]]:
    """The statistics pass: one forward of the layer over every sample with a hook on each sublayer; returns
    their input statistics and the layer's outputs."""
    stats = {name: InputStats(get_weight(mod).shape[1], device) for name, mod in subs.items()}
    hooks = [mod.register_forward_hook(lambda m, a, o, s=stats[name]: s.add(a[0])) for name, mod in subs.items()]
    try:
        outs = run_layer(layer, inputs, kwargs)
    finally:
        for h in hooks:
            h.remove()
    return stats, outs


def _zero_fraction(module: nn.Module) -> float:
    W = get_weight(module)
    return round(int((W == 0).sum()) / W.numel(), 6)


def sublayer_record(layer: int, name: str, module: nn.Module, info: dict[str, Any], rel_error: float,
                    seconds: float, fallback: Candidate | None, decision: dict | None,
                    refit: dict | None = None) -> dict[str, Any]:
    """The recipe's record of one sublayer, written once its decoder layer is settled (a layer guard may have put
    the fallback in place of the method's first answer; a refit may have changed the kept weights, so `rel_error`
    is the pruned weight's, before the refit, and the decoder layer's errors before and after are in `refit`)."""
    rec = {"layer": layer, "name": name, "shape": list(get_weight(module).shape), "sparsity": _zero_fraction(module),
           "rel_error": round(rel_error, 6), "seconds": round(seconds, 4), **info}
    if decision is not None:
        rec["layer_guard"] = decision
        if decision["fallback_kept"] and fallback is not None:
            rec["order_before_guard"], rec["order"] = rec["order"], fallback.order
            rec["rel_error"] = fallback.rel_error
    if refit is not None:
        rec["refit"] = refit
    return rec


def prune_model(model: nn.Module, calib: torch.Tensor, cfg: PruneConfig, progress: bool = True) -> list[dict]:
    """Prune every linear sublayer of every decoder layer in place; returns one record per sublayer."""
    check_widths(model, cfg)
    device = cfg.device
    records: list[dict] = []
    layers = decoder_layers(model)
    guard = layer_guard(cfg)  # a strategy of the method (`--order best`), or None
    dense = DenseStream() if guard is not None or cfg.refit else None
    with calibration_mode(model), full_fp32():
        inputs, kwargs = capture_inputs(model, calib, device)
        kwargs = to_device(kwargs, device)
        for idx, layer in enumerate(tqdm(layers, desc=f"{cfg.method} {cfg.sparsity}", disable=not progress)):
            with on_device(layer, device):
                subs = linear_sublayers(model, layer)
                run = functools.partial(run_layer, layer, kwargs=kwargs)
                stats, outs = collect_stats(layer, subs, inputs, kwargs, device)
                if dense is not None:
                    dense.advance(run, outs)
                del outs  # the next layer's inputs come from the pruned layer
                permuted = (permute_layer(model, layer, stats, cfg, seed=cfg.seed * 100_003 + idx)
                            if cfg.permute else {})
                infos, fallbacks, errors, seconds, line = {}, {}, {}, {}, []
                for name, mod in subs.items():
                    t0 = time.perf_counter()
                    W = get_weight(mod).float()
                    result = prune_weight(W, stats[name], cfg)
                    errors[name] = reconstruction_error(W, result.weight, stats[name].H)
                    set_weight(mod, result.weight)
                    infos[name], fallbacks[name] = result.info, result.fallback
                    if name in permuted:
                        infos[name]["permutation"] = permuted[name]
                    seconds[name] = time.perf_counter() - t0
                    line.append(f"{name.split('.')[-1]}={errors[name]:.4f}" + ("*" if result.info.get("reordered")
                                                                               else ""))
                    del stats[name], result, W
                log.info("layer %d rel. error %s", idx, " ".join(line))  # * = reordered by ROSE
                decision = refit = None
                if guard is not None:
                    outs, decision = guard.settle(run, subs, fallbacks, inputs, dense.targets)
                else:
                    outs = run(inputs)
                if cfg.refit:
                    before = token_error(outs, dense.targets)
                    del outs  # the refit holds the inputs and targets only, then the outputs it keeps
                    outs, refit = refit_layer(layer, run, subs, inputs, dense.targets, before, cfg, idx)
                inputs = outs
                del outs
                records += [sublayer_record(idx, name, subs[name], infos[name], errors[name], seconds[name],
                                            fallbacks[name], decision, refit) for name in subs]
                del fallbacks
    return records
