"""Typed configuration validated at the boundary: sparsity patterns, pruning settings and the recipe."""
from __future__ import annotations

import json
import platform
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import RoseError, first_line

RECIPE_NAME = "rose_recipe.json"
RECIPE_VERSION = 1
DEFAULT_BLOCKSIZE = 128   # SparseGPT's lazy-update block width
DEFAULT_PERCDAMP = 0.01   # SparseGPT's damping, a fraction of mean(diag H)
DEFAULT_THRESHOLD = 0.5   # ROSE's columnar threshold on the relative range of block losses (the paper's)
# the refit after pruning (refit.py): Adam steps per decoder layer (one calibration window each), learning rate
DEFAULT_REFIT_STEPS = 64
DEFAULT_REFIT_LR = 1e-3
DEFAULT_PERMUTE_ROUNDS = 20   # --permute: rounds of the channel-permutation search (permute.py)
DEFAULT_EVAL_DATA = "wikitext2"
DEFAULT_EVAL_SEQLEN = 2048
# the choices of PruneConfig's string fields; the CLI offers exactly these
ROSE_ORDER_MODES = ("both", "columns", "blocks", "none")   # ablation of ROSE's two levels
WITHIN_GROUP = ("keep", "sort")                           # N:M: columns inside a moved group
SCALERS = ("uniform", "reference")                        # reference = the released code's 1/k weighting
ORDERS = ("rose", "best")                                 # best = candidate search + decoder-layer guard
DEVICES = ("cpu", "cuda")
REFIT_LOSSES = ("relative", "mse")   # per-token relative error (as the layer guard measures it), or plain MSE


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
    """Everything that decides the pruned weights; saved verbatim into the recipe. Its defaults are the CLI's, and
    it checks itself, so a library caller gets the same one-line errors as `rose-export`."""

    method: str = "rose"
    sparsity: Sparsity = Sparsity(0.5)   # a Sparsity, or its text ("2:4", "0.5")
    calib: str = "wikitext2"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    percdamp: float = DEFAULT_PERCDAMP
    blocksize: int = DEFAULT_BLOCKSIZE
    device: str = "cpu"
    # ROSE options (ignored by the other methods)
    rose_threshold: float = DEFAULT_THRESHOLD
    rose_order: str = "both"
    rose_within_group: str = "keep"
    rose_scaler: str = "uniform"
    order: str = "rose"
    # the refit after pruning (any method): each decoder layer's kept weights reconstruct the dense layer's output
    refit: bool = False
    refit_steps: int = DEFAULT_REFIT_STEPS
    refit_lr: float = DEFAULT_REFIT_LR
    refit_samples: int | None = None     # calibration windows the refit trains on; None = all of them
    refit_loss: str = "relative"
    refit_norms: bool = False            # also train the layer's norm weights and biases (unmasked)
    # N:M: free input-channel permutations before each decoder layer is pruned (any method; permute.py)
    permute: bool = False
    permute_rounds: int = DEFAULT_PERMUTE_ROUNDS

    def __post_init__(self) -> None:
        from .methods import METHODS  # the registry imports this module

        if not isinstance(self.sparsity, Sparsity):
            object.__setattr__(self, "sparsity", Sparsity.parse(self.sparsity))
        choices = {"method": tuple(sorted(METHODS)), "rose_order": ROSE_ORDER_MODES,
                   "rose_within_group": WITHIN_GROUP, "rose_scaler": SCALERS, "order": ORDERS,
                   "refit_loss": REFIT_LOSSES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise RoseError(f"unknown {_flag(name)} {getattr(self, name)!r}: choose from {', '.join(allowed)}")
        for name, low in (("nsamples", 1), ("seqlen", 2), ("blocksize", 1), ("refit_steps", 1),
                          ("permute_rounds", 1)):
            if not _is_int(getattr(self, name)) or getattr(self, name) < low:
                raise RoseError(f"{_flag(name)} must be an integer >= {low}, got {getattr(self, name)!r}")
        for name in ("percdamp", "refit_lr"):
            if not isinstance(getattr(self, name), (int, float)) or not getattr(self, name) > 0:
                raise RoseError(f"{_flag(name)} must be > 0, got {getattr(self, name)!r}")
        if self.refit_samples is not None and not (_is_int(self.refit_samples)
                                                   and 1 <= self.refit_samples <= self.nsamples):
            raise RoseError(f"--refit-samples must be an integer from 1 to --nsamples ({self.nsamples}), "
                            f"got {self.refit_samples!r}")
        if str(self.device).split(":")[0] not in DEVICES:
            raise RoseError(f"unknown --device {self.device!r}: use cpu or cuda")
        if self.permute and not self.sparsity.is_nm:
            raise RoseError(f"--permute needs an N:M --sparsity such as 2:4: it regroups the input channels that "
                            f"N:M prunes together, and unstructured {self.sparsity} has no groups")
        if self.order == "best" and self.method != "rose":
            raise RoseError("--order best applies to --method rose only")
        if self.method == "rose" and self.sparsity.is_nm and self.blocksize % self.sparsity.m:
            # ROSE pre-prunes whole 128-column blocks; an N:M group may not straddle two of them
            raise RoseError(f"--blocksize {self.blocksize} must be a multiple of M={self.sparsity.m} "
                            f"for {self.sparsity}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sparsity"] = str(self.sparsity)
        return d

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of one field (the CLI shows these)."""
        return next(f.default for f in fields(cls) if f.name == name)


def parse_list(text: str | Iterable[str], flag: str, *, choices: Iterable[str] | None = None,
               what: str = "value", hint: str = "") -> list[str]:
    """`"a, b,a"` (or a list) -> `["a", "b"]`: stripped, without repeats, in order. An empty list, or an item not
    among `choices`, is a one-line error naming `flag` (or `what`) and the choices (or `hint`)."""
    items = text.split(",") if isinstance(text, str) else [str(t) for t in text]
    names = list(dict.fromkeys(i.strip() for i in items if i.strip()))
    allowed = f": choose from {', '.join(choices)}" if choices is not None else (f": {hint}" if hint else "")
    if not names:
        raise RoseError(f"{flag} is empty{allowed}")
    unknown = [n for n in names if choices is not None and n not in choices]
    if unknown:
        raise RoseError(f"unknown {what} {unknown[0]!r}{allowed}")
    return names


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Library versions that affect the result (plus `extra` packages), for the recipe and manifests, and torch's
    CPU thread count: it changes LAPACK's Cholesky in the last bits, which moves SparseGPT's masks (55.12 against
    55.44 perplexity at 50%, README)."""
    import importlib.metadata as md

    import torch

    out = {"python": platform.python_version(), "torch_threads": str(torch.get_num_threads())}
    for pkg in ("rose", "torch", "transformers", "datasets", "safetensors", "onnx", "onnxruntime-gpu", *extra):
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
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, UnicodeDecodeError, ValueError, TypeError) as exc:
            raise RoseError(f"{path} is damaged ({first_line(exc)[:120]}): re-run `rose-export prune`") from None
