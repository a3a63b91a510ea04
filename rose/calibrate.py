"""The generic sequential calibration loop (SparseGPT's protocol), one decoder layer at a time.

1. capture the inputs of the first decoder layer for every calibration sample;
2. for each layer: collect statistics of every linear sublayer, prune them, then run the *pruned* layer to get
   the inputs of the next one.
A method may supply a layer guard (`--order best` does, see best_order.py): it carries the dense model's hidden
states and settles each layer after its sublayers are pruned; the loop runs it without knowing the method.
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

from .arch import all_sublayers, decoder_layers, get_weight, linear_sublayers, set_weight
from .config import PruneConfig
from .errors import RoseError
from .methods import Candidate, layer_guard, prune_weight
from .offload import all_but_on_device, calibration_mode, full_fp32, on_device, to_device
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
                    seconds: float, fallback: Candidate | None, decision: dict | None) -> dict[str, Any]:
    """The recipe's record of one sublayer, written once its decoder layer is settled (a layer guard may have put
    the fallback in place of the method's first answer)."""
    rec = {"layer": layer, "name": name, "shape": list(get_weight(module).shape), "sparsity": _zero_fraction(module),
           "rel_error": round(rel_error, 6), "seconds": round(seconds, 4), **info}
    if decision is not None:
        rec["layer_guard"] = decision
        if decision["kept"] == "sparsegpt" and fallback is not None:
            rec["order_before_guard"], rec["order"] = rec["order"], fallback.order
            rec["rel_error"] = fallback.rel_error
    return rec


def prune_model(model: nn.Module, calib: torch.Tensor, cfg: PruneConfig, progress: bool = True) -> list[dict]:
    """Prune every linear sublayer of every decoder layer in place; returns one record per sublayer."""
    check_widths(model, cfg)
    device = cfg.device
    records: list[dict] = []
    layers = decoder_layers(model)
    guard = layer_guard(cfg)  # a strategy of the method (`--order best`), or None
    with calibration_mode(model), full_fp32():
        inputs, kwargs = capture_inputs(model, calib, device)
        kwargs = to_device(kwargs, device)
        for idx, layer in enumerate(tqdm(layers, desc=f"{cfg.method} {cfg.sparsity}", disable=not progress)):
            with on_device(layer, device):
                subs = linear_sublayers(model, layer)
                run = functools.partial(run_layer, layer, kwargs=kwargs)
                stats, outs = collect_stats(layer, subs, inputs, kwargs, device)
                if guard is not None:
                    guard.advance(run, outs)
                del outs  # the next layer's inputs come from the pruned layer
                infos, fallbacks, errors, seconds, line = {}, {}, {}, {}, []
                for name, mod in subs.items():
                    t0 = time.perf_counter()
                    W = get_weight(mod).float()
                    result = prune_weight(W, stats[name], cfg)
                    errors[name] = reconstruction_error(W, result.weight, stats[name].H)
                    set_weight(mod, result.weight)
                    infos[name], fallbacks[name] = result.info, result.fallback
                    seconds[name] = time.perf_counter() - t0
                    line.append(f"{name.split('.')[-1]}={errors[name]:.4f}" + ("*" if result.info.get("reordered")
                                                                               else ""))
                    del stats[name], result, W
                log.info("layer %d rel. error %s", idx, " ".join(line))  # * = reordered by ROSE
                decision = None
                if guard is not None:
                    inputs, decision = guard.settle(run, subs, fallbacks, inputs)
                else:
                    inputs = run(inputs)
                records += [sublayer_record(idx, name, subs[name], infos[name], errors[name], seconds[name],
                                            fallbacks[name], decision) for name in subs]
                del fallbacks
    return records
