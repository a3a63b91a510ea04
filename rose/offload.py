"""Context managers for temporary state: calibration mode, and one decoder layer at a time on the device."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def calibration_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, no gradients, no KV cache; restored afterwards."""
    training, use_cache = model.training, getattr(model.config, "use_cache", None)
    model.eval()
    model.config.use_cache = False
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(training)
        model.config.use_cache = use_cache


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """fp32 matmuls in full fp32 on CUDA for the duration (TF32 off in cuBLAS and cuDNN, restored afterwards).
    The statistics and the solver are fp32 by design; a process that enabled TF32 (a training script, say) would
    otherwise round the Hessians to 10-bit mantissas on the GPU, and only there."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device | str) -> Iterator[nn.Module]:
    """Move `module` to `device` for the duration, then back to where it was."""
    home = next(module.parameters()).device
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


@contextlib.contextmanager
def all_but_on_device(model: nn.Module, skip: nn.Module, device: torch.device | str) -> Iterator[None]:
    """Move every leaf module outside `skip` (the decoder layers) to `device`: embeddings, rotary, norms."""
    skip_ids = {id(m) for m in skip.modules()}
    moved = []
    for module in model.modules():
        if id(module) in skip_ids or any(True for _ in module.children()):
            continue
        params = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if params and params[0].device != torch.device(device):
            moved.append((module, params[0].device))
            module.to(device)
    try:
        yield
    finally:
        for module, home in moved:
            module.to(home)


def to_device(obj, device):
    """Recursively move tensors inside tuples, lists and dicts."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj
