"""Checks every runtime loader makes before it hands back a model: a loader never returns a wrong model in silence.

1. Hashes. When the export's `manifest.json` sits beside the format directory (it does in every
   `prune-and-export` / `export` output), every file it lists for that format must have its size and sha256.
   This catches any changed byte; it costs one read of the files (about 1 s per GB here), which `verify=False`
   skips. Without a manifest (a format directory copied alone) only the checks below run.
2. Structure, always: every tensor the format needs is there, with the shape the model's config implies, finite
   values, and (for 2:4 formats) exactly two kept values in every group of four.
Every failure is one line (`RoseRuntimeError`) naming the file and the tensor.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from .errors import RoseRuntimeError, first_line
from .manifest import MANIFEST, sha256, verify_files  # noqa: F401  (the loaders' hash check, torch-free)

log = logging.getLogger(__name__)

FORMAT_KEY = "rose_format"  # in config.json of rose's packed formats: what transformers must not load as is


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file; a missing, truncated or damaged file is one line naming it."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise RoseRuntimeError(f"{path} is missing: re-export the model")
    try:
        return load_file(path)
    except Exception as exc:  # safetensors' own error type
        raise RoseRuntimeError(f"{path} cannot be read ({first_line(exc)[:160]}): the file is damaged or "
                               f"truncated; re-export the model") from None


def load_config(directory: Path, fmt: str):
    """The model config of one of rose's packed format directories, as the model was: without the
    compressed-tensors entry and with the fields the export set to stop transformers loading it restored."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise RoseRuntimeError(f"{directory}/config.json cannot be read ({first_line(exc)[:160]}): re-export the "
                               f"model") from None
    marker: Any = getattr(config, FORMAT_KEY, None)  # absent in exports written before rose marked them
    if marker is not None:
        if not isinstance(marker, dict) or marker.get("name") != fmt:
            found = marker.get("name") if isinstance(marker, dict) else marker
            raise RoseRuntimeError(f"{directory} is not a {fmt} export (its config.json says {found}): pass the "
                                   f"{fmt}/ directory of a rose export")
        for key, value in marker.get("replaced", {}).items():
            setattr(config, key, value)
        delattr(config, FORMAT_KEY)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def parameter_shapes(config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of the model `config` describes (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def check_finite(where: Path, name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise RoseRuntimeError(f"{where}: {name} holds NaN or infinite values: the file is damaged; re-export it")


def check_shape(where: Path, name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise RoseRuntimeError(f"{where}: {name} has shape {tuple(t.shape)} but the model's config needs "
                               f"{tuple(shape)}: the file does not belong to this config, or is damaged")


def empty_model(config, dtype: torch.dtype):
    """The model of `config` with its parameters on the meta device (no memory), to be given loaded tensors."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Give `empty_model`'s parameters the tensors of `state` (tied copies may be absent); a parameter left
    without data, or a tensor the model has no place for, is one line naming them."""
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left or unexpected:
        raise RoseRuntimeError(f"{where} does not match its config: no weights for {left[:4]}, unexpected "
                               f"{unexpected[:4]}; re-export the model")
