"""Model-agnostic plumbing: where the decoder layers and their linear sublayers are. Algorithms never look here.

A declarative table keyed by `config.model_type`, with a generic fallback from `_no_split_modules`.
lm_head and embeddings live outside the decoder layers, so they are never pruned.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import RoseError

try:  # GPT-2 style models store linear weights transposed, as (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

_LLAMA = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Arch:
    layers: str                       # dotted path to the ModuleList of decoder layers
    linears: tuple[str, ...] | None   # sublayer names inside one layer; None = every linear found


ARCHS: dict[str, Arch] = {
    "llama": Arch("model.layers", _LLAMA),
    "mistral": Arch("model.layers", _LLAMA),
    "qwen2": Arch("model.layers", _LLAMA),
    "qwen3": Arch("model.layers", _LLAMA),
    "opt": Arch("model.decoder.layers", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                         "self_attn.out_proj", "fc1", "fc2")),
    "gpt2": Arch("transformer.h", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")),
}


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers, from the table or, for unknown types, by `_no_split_modules`."""
    arch = ARCHS.get(getattr(model.config, "model_type", ""))
    if arch is not None:
        return model.get_submodule(arch.layers)
    names = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and type(module[0]).__name__ in names:
            return module
    raise RoseError(f"cannot find the decoder layers of model type {model.config.model_type!r}: "
                    f"add it to rose.arch.ARCHS")


def linear_sublayers(model: nn.Module, layer: nn.Module) -> dict[str, nn.Module]:
    """Name -> linear module for the prunable sublayers of one decoder layer, in forward order."""
    arch = ARCHS.get(getattr(model.config, "model_type", ""))
    if arch is not None and arch.linears is not None:
        return {name: layer.get_submodule(name) for name in arch.linears}
    return {name: m for name, m in layer.named_modules() if is_linear(m)}


def all_sublayers(model: nn.Module) -> dict[str, nn.Module]:
    """Full dotted name -> module for every prunable linear of the model."""
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    return {f"{prefix}.{i}.{name}": mod for i, layer in enumerate(layers)
            for name, mod in linear_sublayers(model, layer).items()}


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever the module stores."""
    return module.weight.data.t() if isinstance(module, Conv1D) else module.weight.data


def set_weight(module: nn.Module, W: torch.Tensor) -> None:
    """Write an (out, in) matrix back in the module's own layout and dtype."""
    target = module.weight.data
    if isinstance(module, Conv1D):
        W = W.t()
    target.copy_(W.to(target.dtype))
