"""The `torch.ops.rose.sparse24_*` operators in pure PyTorch, same layout and results as `cpp/` (see
cpp/sparse24.h): the fallback where the C++ kernel cannot be built, and an independent check of it in tests."""
from __future__ import annotations

import torch

PANEL = 8
_FIRST = torch.tensor([0, 0, 1, 0, 2, 0, 1, 0, 3, 0, 1, 0, 2, 0, 1, 0])
_SECOND = torch.tensor([0, 0, 1, 1, 2, 2, 2, 1, 3, 3, 3, 1, 3, 2, 2, 1])
_PAD = 0x3  # padding rows keep columns 0 and 1, with zero values


def _check_cols(rows: int, cols: int) -> None:
    if rows <= 0 or cols <= 0 or cols % 4:
        raise RuntimeError(f"sparse24: the weight's columns must be a multiple of 4, got {rows}x{cols}")


def _where(flat: int, cols: int) -> str:
    g = flat % (cols // 4)
    return f"row {flat // (cols // 4)}, columns {4 * g}-{4 * g + 3}"


def _layout(a: torch.Tensor, b: torch.Tensor, nib: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, masks) from per-row first/second kept values and nibbles, each rows x G."""
    P, G = -(-rows // PANEL), a.shape[1]
    pad = P * PANEL - rows
    a = torch.cat([a, a.new_zeros(pad, G)]).reshape(P, PANEL, G)
    b = torch.cat([b, b.new_zeros(pad, G)]).reshape(P, PANEL, G)
    nib = torch.cat([nib, nib.new_full((pad, G), _PAD)]).reshape(P, PANEL, G).to(torch.int64)
    values = torch.stack([a.transpose(1, 2), b.transpose(1, 2)], dim=2).reshape(-1).contiguous()
    words = (nib << (4 * torch.arange(PANEL).reshape(1, PANEL, 1))).sum(1)
    masks = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).reshape(-1)
    return values, masks


def pack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if weight.dim() != 2:
        raise RuntimeError(f"sparse24: the weight must be 2-D, got {weight.dim()}-D")
    if weight.dtype not in (torch.float32, torch.bfloat16):
        raise RuntimeError(f"sparse24: the weight must be float32 or bfloat16, got {weight.dtype}")
    rows, cols = weight.shape
    _check_cols(rows, cols)
    W = weight.cpu().reshape(rows, cols // 4, 4)
    nz = W != 0
    bad = (nz.sum(-1) > 2).flatten().nonzero()
    if len(bad):
        raise RuntimeError(f"sparse24: the weight is not 2:4: more than two nonzeros in {_where(int(bad[0]), cols)}")
    # keep the nonzeros, then a stored -0.0, then the lowest free columns (the packed24 export's choice)
    signed = (W.view(torch.int16 if W.dtype == torch.bfloat16 else torch.int32) != 0).to(torch.int64)
    rank = nz.to(torch.int64) * 8 + signed * 4 + torch.arange(3, -1, -1)
    keep = torch.zeros_like(nz).scatter_(2, rank.topk(2, dim=2).indices, True)
    nib = (keep.to(torch.int64) << torch.arange(4)).sum(-1)
    a = W.gather(2, _FIRST[nib].unsqueeze(-1)).squeeze(-1)
    b = W.gather(2, _SECOND[nib].unsqueeze(-1)).squeeze(-1)
    return _layout(a, b, nib, rows)


def pack_bitmask(kept: torch.Tensor, bitmask: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_cols(rows, cols)
    if kept.dtype not in (torch.float32, torch.bfloat16):
        raise RuntimeError(f"sparse24: kept values must be float32 or bfloat16, got {kept.dtype}")
    if kept.numel() != rows * cols // 2:
        raise RuntimeError(f"sparse24: expected {rows * cols // 2} kept values, got {kept.numel()}")
    if bitmask.dtype != torch.uint8 or bitmask.numel() != rows * ((cols + 7) // 8):
        raise RuntimeError(f"sparse24: expected a uint8 bitmask of {rows}x{(cols + 7) // 8}, got {bitmask.dtype} "
                           f"with {bitmask.numel()} elements")
    B = bitmask.reshape(rows, -1).to(torch.int64)
    nib = torch.stack([B & 0xF, B >> 4], dim=-1).reshape(rows, -1)[:, : cols // 4]
    ones = sum((nib >> j) & 1 for j in range(4))
    bad = (ones != 2).flatten().nonzero()
    if len(bad):
        raise RuntimeError(f"sparse24: the bitmask does not keep exactly two of four in {_where(int(bad[0]), cols)}")
    K = kept.reshape(rows, cols // 4, 2)
    return _layout(K[..., 0], K[..., 1], nib, rows)


def unpack(values: torch.Tensor, masks: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    _check_cols(rows, cols)
    P, G = -(-rows // PANEL), cols // 4
    v = values.reshape(P, G, 2, PANEL)
    words = masks.to(torch.int64).reshape(P, G, 1) & 0xFFFFFFFF
    nib = ((words >> (4 * torch.arange(PANEL))) & 0xF)                      # P, G, 8
    out = values.new_zeros(P, G, PANEL, 4)
    out.scatter_(3, _FIRST[nib].unsqueeze(-1), v[:, :, 0].unsqueeze(-1))
    out.scatter_(3, _SECOND[nib].unsqueeze(-1), v[:, :, 1].unsqueeze(-1))
    return out.permute(0, 2, 1, 3).reshape(P * PANEL, cols)[:rows].contiguous()


def linear(x: torch.Tensor, values: torch.Tensor, masks: torch.Tensor, rows: int, cols: int,
           bias: torch.Tensor | None = None, isa: int = 0, dense_from: int = 0, tile_bytes: int = 0) -> torch.Tensor:
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise RuntimeError(f"sparse24: the input must be float32 or bfloat16, got {x.dtype}")
    if x.shape[-1] != cols:
        raise RuntimeError(f"sparse24: the input's last dimension is {x.shape[-1]} but the weight has {cols} columns")
    if bias is not None and tuple(bias.shape) != (rows,):
        raise RuntimeError(f"sparse24: the bias must have {rows} elements")
    W = unpack(values, masks, rows, cols).float()
    y = torch.nn.functional.linear(x.float(), W, None if bias is None else bias.float())
    return y.to(x.dtype)
