"""Typed configuration validated at the boundary: sparsity patterns, pruning settings and the recipe."""
from __future__ import annotations

import json
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import RoseError

RECIPE_NAME = "rose_recipe.json"
RECIPE_VERSION = 1
DEFAULT_BLOCKSIZE = 128   # SparseGPT's lazy-update block width
DEFAULT_PERCDAMP = 0.01   # SparseGPT's damping, a fraction of mean(diag H)


@dataclass(frozen=True)
class Sparsity:
    """A sparsity target: either an unstructured ratio, or N zeros in every M consecutive input weights."""

    ratio: float
    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.ratio:g}"

    @classmethod
    def parse(cls, text: str | float) -> "Sparsity":
        """`0.5` (a ratio with 0 < p < 1) or `N:M` with 0 < N < M: N of every M consecutive weights are zeroed."""
        s = str(text).strip()
        nm = re.fullmatch(r"(\d+):(\d+)", s)
        if nm:
            n, m = int(nm.group(1)), int(nm.group(2))
            if not 0 < n < m:
                raise RoseError(f"sparsity {s!r} is not a valid N:M pattern: need 0 < N < M (e.g. 2:4, 4:8)")
            return cls(ratio=n / m, n=n, m=m)
        try:
            p = float(s)
        except ValueError:
            raise RoseError(f"sparsity {s!r} is neither a ratio like 0.5 nor an N:M pattern like 2:4") from None
        if not 0.0 < p < 1.0:
            raise RoseError(f"sparsity {s!r} is out of range: an unstructured ratio must satisfy 0 < p < 1")
        return cls(ratio=p)


@dataclass(frozen=True)
class PruneConfig:
    """Everything that decides the pruned weights; saved verbatim into the recipe."""

    method: str
    sparsity: Sparsity
    calib: str = "wikitext2"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    percdamp: float = DEFAULT_PERCDAMP
    blocksize: int = DEFAULT_BLOCKSIZE
    device: str = "cpu"
    # ROSE options (ignored by the other methods)
    rose_threshold: float = 0.5
    rose_order: str = "both"
    rose_within_group: str = "keep"
    rose_scaler: str = "uniform"
    order: str = "rose"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sparsity"] = str(self.sparsity)
        return d


def versions() -> dict[str, str]:
    """Library versions that affect the result, for the recipe and manifests, and torch's CPU thread count: it
    changes LAPACK's Cholesky in the last bits, which moves SparseGPT's masks (55.12 against 55.44 perplexity at
    50%, README)."""
    import importlib.metadata as md

    import torch

    out = {"python": platform.python_version(), "torch_threads": str(torch.get_num_threads())}
    for pkg in ("rose", "torch", "transformers", "datasets", "safetensors", "onnx", "onnxruntime-gpu"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


@dataclass
class Recipe:
    """What a run did and measured, written beside its outputs so that it can be reproduced."""

    model: str
    config: dict[str, Any]
    layers: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=versions)
    version: int = RECIPE_VERSION

    def save(self, directory: Path) -> Path:
        path = Path(directory) / RECIPE_NAME
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: Path) -> "Recipe":
        path = Path(directory) / RECIPE_NAME
        if not path.is_file():
            raise RoseError(f"{directory} has no {RECIPE_NAME}: is it the output of `rose-export prune`?")
        return cls(**json.loads(path.read_text()))
