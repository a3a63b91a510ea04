"""`packed24`: a 2:4 checkpoint about half the size, in the legacy compressed-tensors `sparse-24-bitmask` layout.

For each 2:4 weight W (R x C): `<module>.compressed` (R x C/2, W's dtype: the two kept values of every group of
four, in column order), `<module>.bitmask` (uint8, R x ceil(C/8), bit j of byte b marks column 8b+j, little bit
order) and `<module>.shape` (int64, 2 x 1). `config.json` carries `quantization_config.sparsity_config` so that
compressed-tensors 0.14 (the last release that reads this format) can decompress it, and `rose_format` so that
transformers' `from_pretrained` refuses it loudly (`source.not_for_transformers`). Deployers load it with
`runtime.load_packed24` (dense) or `runtime.load_packed24_cpu` (C++ kernel), which verify it; `read_packed24`
here is the writer's own bit-exact round trip.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from rose.errors import RoseError

from .source import Source, bit_equal, bits, copy_aux, dtype_name, not_for_transformers, require_24, set_config_dtype

FORMAT = "sparse-24-bitmask"
LEGACY_VERSION = "0.14.0.1"  # the last compressed-tensors release that reads and writes sparse-24-bitmask
WEIGHTS = "model.safetensors"
LOADER = "runtime.load_packed24(dir) or runtime.load_packed24_cpu(dir)"


def keep_mask24(W: torch.Tensor) -> torch.Tensor:
    """Exactly two marked slots in every group of four of a 2:4 matrix: its nonzero values first, then nonzero
    bits (so a stored -0.0 survives), then the lowest positions."""
    rows, cols = W.shape
    groups = W.reshape(rows, cols // 4, 4)
    rank = ((groups != 0).to(torch.int8) * 8 + (bits(groups) != 0).to(torch.int8) * 4
            + torch.arange(3, -1, -1, dtype=torch.int8))
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, torch.topk(rank, 2, dim=2).indices, True)
    return keep.reshape(rows, cols)


def pack24(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(compressed, bitmask) of a 2:4 matrix."""
    rows, cols = W.shape
    keep = keep_mask24(W)
    compressed = W[keep].reshape(rows, cols // 2)
    bitmask = torch.from_numpy(np.packbits(keep.numpy(), axis=-1, bitorder="little"))
    return compressed, bitmask


def unpack24(compressed: torch.Tensor, bitmask: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The dense matrix back: zeros everywhere the bitmask is clear."""
    keep = torch.from_numpy(np.unpackbits(bitmask.numpy(), axis=-1, count=shape[1], bitorder="little").astype(bool))
    dense = torch.zeros(shape, dtype=compressed.dtype)
    dense[keep.reshape(shape)] = compressed.flatten()
    return dense


def _sparsity_config(src: Source, packed: list[str]) -> dict:
    """What compressed-tensors 0.14 writes: every Linear is a target, the ones left dense are ignored by name."""
    numel = sum(t.numel() for t in src.tensors.values() if t.is_floating_point())
    zeros = sum(int((t == 0).sum()) for t in src.tensors.values() if t.is_floating_point())
    return {"format": FORMAT, "global_sparsity": round(zeros / numel, 6), "ignore": [n for n in src.all_linears
                                                                                      if n not in packed],
            "registry_requires_subclass": False, "sparsity_structure": "2:4", "targets": ["Linear"]}


def write_packed24(src: Source, out: Path) -> dict:
    """Write the packed checkpoint of `src` (cast first with `source.cast` for fp16/bf16) into `out`
    (`check_packed24` then reads it back)."""
    from safetensors.torch import save_file

    require_24(src, "packed24")
    copy_aux(src.path, out)
    packed = [n for n, kind in src.linears.items() if kind == "linear"]
    tensors: dict[str, torch.Tensor] = {}
    for name, t in src.tensors.items():
        module = name[: -len(".weight")]
        if name.endswith(".weight") and module in packed:
            compressed, bitmask = pack24(t)
            tensors[f"{module}.compressed"] = compressed
            tensors[f"{module}.bitmask"] = bitmask
            tensors[f"{module}.shape"] = torch.tensor(list(t.shape), dtype=torch.int64).reshape(-1, 1)
        else:
            tensors[name] = t.contiguous()
    save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})
    config = set_config_dtype(json.loads((out / "config.json").read_text()), dtype_name(src))
    config["quantization_config"] = {"quant_method": "compressed-tensors", "version": LEGACY_VERSION,
                                     "sparsity_config": _sparsity_config(src, packed), "transform_config": {}}
    not_for_transformers(config, "packed24", LOADER)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {"dtype": dtype_name(src), "packed_layers": len(packed)}


def check_packed24(src: Source, out: Path) -> dict:
    """Read the written directory back and compare every tensor with `src`, bit for bit (`compressed` keeps the
    tensors' dtype, so nothing may move)."""
    back = read_packed24(out)
    mismatched = [n for n, t in back.items() if n not in src.tensors or not bit_equal(t, src.tensors[n])]
    if mismatched or set(back) != set(src.tensors):
        raise RoseError(f"packed24 round trip is not bit-exact for {mismatched[:4] or 'the tensor names'}: "
                        f"please report this")
    return {"round_trip": "bit-exact"}


def read_packed24(path: Path) -> dict[str, torch.Tensor]:
    """The dense state dict of a packed24 directory (as stored: tied weights once)."""
    from safetensors.torch import load_file

    stored = load_file(Path(path) / WEIGHTS)
    out: dict[str, torch.Tensor] = {}
    for name, t in stored.items():
        if name.endswith((".bitmask", ".shape")):
            continue
        if name.endswith(".compressed"):
            module = name[: -len(".compressed")]
            shape = tuple(int(s) for s in stored[f"{module}.shape"].flatten())
            out[f"{module}.weight"] = unpack24(t, stored[f"{module}.bitmask"], shape)  # type: ignore[arg-type]
        else:
            out[name] = t
    return out
