"""Model-agnostic plumbing: where the decoder layers and their linear sublayers are, and which of their input
channels may be permuted for free. Algorithms never look here.

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
    # free input-channel permutations (see `free_permutations`): the MLP's (consumer, producers), and attention's
    # (output projection, value projection); None where rose does not know them
    mlp: tuple[str, tuple[str, ...]] | None = None
    heads: tuple[str, str] | None = None


_LLAMA_ARCH = Arch("model.layers", _LLAMA, mlp=("mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj")),
                   heads=("self_attn.o_proj", "self_attn.v_proj"))
ARCHS: dict[str, Arch] = {
    "llama": _LLAMA_ARCH,
    "mistral": _LLAMA_ARCH,
    "qwen2": _LLAMA_ARCH,
    "qwen3": _LLAMA_ARCH,
    "opt": Arch("model.decoder.layers", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                         "self_attn.out_proj", "fc1", "fc2"),
                mlp=("fc2", ("fc1",)), heads=("self_attn.out_proj", "self_attn.v_proj")),
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


@dataclass(frozen=True)
class ChannelGroup:
    """Input channels of `consumer` that may be reordered without changing what the decoder layer computes,
    because `producers` make them row by row (their output rows, and biases, move with them) and nothing between
    mixes channels: the MLP's units (SwiGLU or ReLU act per unit), or a value head's dimensions (attention weights
    mix tokens, never dimensions). Permutation k reorders `width` channels: producer rows `k*width ...` and, in
    the consumer, each column block starting at `tied[k]` (the query heads that read value head k under
    grouped-query attention all take its permutation)."""

    consumer: str
    producers: tuple[str, ...]
    width: int
    tied: tuple[tuple[int, ...], ...]

    def consumer_columns(self, perms: list[torch.Tensor], columns: int) -> torch.Tensor:
        """The consumer's full column permutation (new position -> old column)."""
        full = torch.arange(columns)
        for perm, starts in zip(perms, self.tied):
            for s in starts:
                full[s:s + self.width] = s + perm
        return full

    def producer_rows(self, perms: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([k * self.width + perm for k, perm in enumerate(perms)])


def free_permutations(model: nn.Module, layer: nn.Module) -> list[ChannelGroup]:
    """The decoder layer's free input-channel permutations (MLP units, then value-head dimensions); a one-line
    error for a model type whose are not in the table."""
    model_type = getattr(model.config, "model_type", "")
    arch = ARCHS.get(model_type)
    if arch is None or arch.mlp is None or arch.heads is None:
        known = ", ".join(k for k, a in ARCHS.items() if a.mlp is not None)
        raise RoseError(f"--permute does not know the free permutations of model type {model_type!r}: "
                        f"it supports {known}; drop --permute for this model")
    cfg = model.config
    down, ups = arch.mlp
    units = get_weight(layer.get_submodule(down)).shape[1]
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    out, value = arch.heads
    if (get_weight(layer.get_submodule(out)).shape[1] != heads * dim
            or get_weight(layer.get_submodule(value)).shape[0] != kv * dim or heads % kv):
        raise RoseError(f"--permute: the attention of {model_type!r} does not have {heads} heads of {dim} "
                        f"(and {kv} value heads) as its config says; drop --permute for this model")
    share = heads // kv
    return [ChannelGroup(down, ups, units, ((0,),)),
            ChannelGroup(out, (value,), dim, tuple(tuple(h * dim for h in range(k * share, (k + 1) * share))
                                                   for k in range(kv)))]


@torch.no_grad()
def permute_channels(layer: nn.Module, group: ChannelGroup, perms: list[torch.Tensor]) -> torch.Tensor:
    """Apply one permutation per tied block to the consumer's columns and the producers' rows (and biases);
    returns the consumer's full column permutation."""
    consumer = layer.get_submodule(group.consumer)
    W = get_weight(consumer)
    cols = group.consumer_columns(perms, W.shape[1]).to(W.device)
    set_weight(consumer, W[:, cols])
    rows = group.producer_rows(perms)
    for name in group.producers:
        mod = layer.get_submodule(name)
        set_weight(mod, get_weight(mod)[rows.to(mod.weight.device)])
        if getattr(mod, "bias", None) is not None:
            mod.bias.data.copy_(mod.bias.data[rows.to(mod.bias.device)])
    return cols
