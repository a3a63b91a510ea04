"""What the two benchmarks share: settings, inputs, tolerances, records and ratios.

Both (`linear_bench.py`, `model_bench.py`) gate every backend for correctness first, then time the ones that pass
interleaved, on the same inputs, in one process, and return a JSON-ready dict (records + environment + skipped
backends).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from rose.config import parse_list
from rose.errors import RoseError
from rose.models import SHORT_DTYPES, torch_dtype

from .registry import Backend
from .presets import Shape
from .report import stamp
from .timing import copy_bandwidth

log = logging.getLogger(__name__)

DTYPES = {short: torch_dtype(short) for short in SHORT_DTYPES}  # fp32, fp16, bf16
LINEAR_TOL = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 1e-2}   # relative L2 error of y
MODEL_TOL = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}    # relative L2 error of the logits (errors compound)
GATE_TOKENS = 8  # prompt length of the end-to-end correctness gate
GREEDY_STEPS = 16  # greedy tokens compared with the dense model (recorded, not gated: low precision may differ)


@dataclass(frozen=True)
class Settings:
    warmup: int = 3
    iters: int = 20
    threads: int = 1
    seed: int = 0
    rss: bool = True  # CPU backends: peak RSS of a fresh subprocess
    cuda_graphs: bool = True   # CUDA backends: time captured CUDA graphs (model: static cache; linear: one call)
    eager_too: tuple = ()      # bench model: these CUDA backends are also timed eagerly, on the same weights


@contextlib.contextmanager
def fp32_exact() -> Iterator[None]:
    """fp32 matmuls in full fp32 on the GPU for the duration (TF32 off for cuBLAS and cuDNN): the references."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def parse_counts(text: str, what: str) -> list[int]:
    """`1,8,64` -> [1, 8, 64]; anything below 1 or not an integer is a one-line error."""
    out = []
    for item in parse_list(str(text), what):
        try:
            value = int(item)
        except ValueError:
            raise RoseError(f"{what} must be integers >= 1, got {item!r}") from None
        if value < 1:
            raise RoseError(f"{what} must be integers >= 1, got {value}")
        out.append(value)
    return list(dict.fromkeys(out))


def parse_dtypes(text: str) -> list[str]:
    return parse_list(text, "--dtypes", choices=list(DTYPES), what="dtype")


def linear_weight(shape: Shape, seed: int) -> torch.Tensor:
    """A random fp32 weight made exactly 2:4 by magnitude (2 zeros in every 4 inputs)."""
    from rose.masks import nm_mask

    if shape[1] % 4:
        raise RoseError(f"shape {shape[0]}x{shape[1]}: the input width must be a multiple of 4 for 2:4")
    W = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) / math.sqrt(shape[1])
    return W.masked_fill(nm_mask(W.abs(), 2, 4), 0.0)


def linear_input(tokens: int, cols: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """fp32 values already rounded to `dtype`, so every backend and the reference see the same numbers."""
    return torch.randn(tokens, cols, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).float()


def prompt_ids(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(vocab, (batch, length), generator=torch.Generator().manual_seed(seed + 2))


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref|| in float64, on ref's device (a GPU gate stays on the GPU: an 8192 x 14336 output
    would take seconds on the CPU)."""
    y, ref = y.to(ref.device).double(), ref.double()
    if y.shape != ref.shape:
        return math.inf
    err = float((y - ref).norm() / ref.norm().clamp_min(1e-30))
    return err if math.isfinite(err) else math.inf


def split_available(backends: list[Backend]) -> tuple[list[Backend], dict[str, str]]:
    usable, skipped = [], {}
    for b in backends:
        reason = b.available()
        if reason:
            skipped[b.name] = reason
        else:
            usable.append(b)
    return usable, skipped


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 200:  # onnxruntime prefixes the C++ source location: keep the end, where the reason is
        first = "..." + first[-200:]
    return f"{type(exc).__name__}: {first}"


def record(b: Backend, env: dict, base: dict, status: str, **extra) -> dict[str, Any]:
    return {**base, "backend": b.name, "device": b.device, "sparse": b.sparse, "baseline": b.baseline,
            "status": status, **extra, **stamp(env, b.device)}


def document(kind: str, backends: list[Backend], skipped: dict, env: dict, settings: Settings, records: list,
              **extra) -> dict[str, Any]:
    info = {b.name: {"device": b.device, "sparse": b.sparse, "baseline": b.baseline, "description": b.description,
                     "available": b.name not in skipped, **({"reason": skipped[b.name]} if b.name in skipped else {})}
            for b in backends}
    return {"version": 1, "benchmark": kind, "settings": settings.__dict__, "environment": env, "backends": info,
            "skipped": skipped, **extra, "records": records}


def bandwidths(usable: list[Backend]) -> dict[str, float]:
    devices = sorted({b.device for b in usable} | {"cpu"})
    return {d: copy_bandwidth(d) for d in devices}


def add_ratios(records: list[dict], keys: tuple[str, ...], metrics: dict[str, bool]) -> None:
    """`<metric>_ratio` on each sparse record: dense/sparse for times (lower_is_better) and sparse/dense for rates,
    so > 1 always means the sparse backend wins."""
    index = {(r["backend"], *(json.dumps(r.get(k)) for k in keys)): r for r in records if r["status"] == "ok"}
    for r in records:
        base = index.get((r["baseline"], *(json.dumps(r.get(k)) for k in keys))) if r["baseline"] else None
        if r["status"] != "ok" or base is None:
            continue
        for metric, lower_is_better in metrics.items():
            if r.get(metric) and base.get(metric):
                r[f"{metric}_ratio"] = base[metric] / r[metric] if lower_is_better else r[metric] / base[metric]
