"""The pruned checkpoint an export starts from: its stored tensors, its pruned linears, and which of them are 2:4.

Every format reads the same stored tensors (tied weights appear once, as `save_pretrained` wrote them), so a
format never depends on how a model object happens to lay out its parameters.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from rose.config import RECIPE_NAME, Recipe
from rose.errors import RoseError, first_line
from rose.models import DTYPES, load_config, meta_model

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
MAX_NAMED = 4  # offending layers named in one error line


@dataclass
class Source:
    """A pruned Hugging Face directory, read once."""

    path: Path
    config: dict
    recipe: Recipe
    tensors: dict[str, torch.Tensor]
    linears: dict[str, str] = field(default_factory=dict)  # pruned linear -> "linear" or "conv1d" (stored (in, out))
    all_linears: list[str] = field(default_factory=list)   # every linear module, pruned or not (lm_head...)

    def weight(self, linear: str) -> torch.Tensor:
        return self.tensors[f"{linear}.weight"]


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`; a damaged file is a one-line error naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RoseError(f"{path} cannot be read as JSON ({first_line(exc)[:120]}): {what}") from None
    if not isinstance(data, dict):
        raise RoseError(f"{path} is not a JSON object: {what}")
    return data


def check_source(path: Path) -> Path:
    """The quick checks of a pruned directory (no weights read), so that they come before any other work."""
    path = Path(path).expanduser()
    if not path.exists():
        raise RoseError(f"pruned directory {path} does not exist: pass the --out of `rose-export prune`")
    if not path.is_dir():
        raise RoseError(f"pruned directory {path} is not a directory")
    if not (path / "config.json").is_file():
        raise RoseError(f"{path} has no config.json: is it the output of `rose-export prune`?")
    read_json(path / "config.json", "the pruned directory is damaged; re-run `rose-export prune`")
    Recipe.load(path)
    if not list(path.glob("*.safetensors")):
        raise RoseError(f"{path} holds no .safetensors weights: re-run `rose-export prune`")
    return path


def open_source(path: Path) -> Source:
    """Read a `rose-export prune` output; every defect of the directory is a one-line RoseError."""
    from safetensors.torch import load_file

    path = check_source(path)
    recipe = Recipe.load(path)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        try:
            tensors.update(load_file(f))
        except Exception as exc:  # safetensors' own error type: a truncated or damaged file
            raise RoseError(f"{f} cannot be read ({first_line(exc)[:160]}): the file is damaged or truncated; "
                            f"re-run `rose-export prune`") from None
    config = read_json(path / "config.json", "the pruned directory is damaged; re-run `rose-export prune`")
    linears, all_linears = _linears(path, tensors)
    return Source(path=path, config=config, recipe=recipe, tensors=tensors, linears=linears, all_linears=all_linears)


def _linears(path: Path, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, str], list[str]]:
    """The decoder linears (the ones rose prunes) and all linears, found on a weightless copy of the model."""
    from rose.arch import Conv1D, all_sublayers, is_linear

    model = meta_model(load_config(path))
    pruned = {}
    for name, module in all_sublayers(model).items():
        if f"{name}.weight" in tensors:
            pruned[name] = "conv1d" if Conv1D and isinstance(module, Conv1D) else "linear"
    return pruned, [n for n, m in model.named_modules() if is_linear(m)]


def why_not_24(W: torch.Tensor, kind: str = "linear") -> str | None:
    """None when W (out, in) has at least 2 zeros in every 4 consecutive inputs, else the reason."""
    if kind != "linear":
        return "stored transposed (Conv1D): 2:4 formats need (out, in) weights"
    if W.dim() != 2:
        return f"weight has {W.dim()} dimensions"
    rows, cols = W.shape
    if cols % 4:
        return f"input width {cols} is not a multiple of 4"
    zeros = (W.reshape(rows, cols // 4, 4) == 0).sum(dim=2)
    bad = (zeros < 2).float().mean().item()
    return None if bad == 0 else f"{bad:.1%} of its groups of 4 keep more than 2 weights"


def not_24(src: Source) -> dict[str, str]:
    """Pruned linear -> reason, for every one that is not 2:4."""
    out = {}
    for name, kind in src.linears.items():
        reason = why_not_24(src.weight(name), kind)
        if reason:
            out[name] = reason
    return out


def require_24(src: Source, fmt: str) -> None:
    """Refuse a 2:4 format for a checkpoint that is not 2:4, naming the offending layers."""
    if not src.linears:
        raise RoseError(f"{fmt} needs 2:4 linear layers, but {src.path} has none that rose prunes")
    bad = not_24(src)
    if bad:
        named = ", ".join(f"{n} ({r})" for n, r in list(bad.items())[:MAX_NAMED])
        more = f" and {len(bad) - MAX_NAMED} more" if len(bad) > MAX_NAMED else ""
        raise RoseError(f"format {fmt} needs 2:4 weights, but {len(bad)} of {len(src.linears)} pruned layers are "
                        f"not 2:4: {named}{more}; prune with --sparsity 2:4 or drop {fmt} from --formats")


def dtype_name(src: Source) -> str:
    """The dtype of the checkpoint's floating tensors ("float32", ...), as save_pretrained writes it."""
    dtypes = {t.dtype for t in src.tensors.values() if t.is_floating_point()}
    return "mixed" if len(dtypes) != 1 else str(dtypes.pop()).replace("torch.", "")


def cast(src: Source, dtype: str | None) -> Source:
    """`src` with every floating tensor in `dtype`; `src` itself when dtype is None or already the stored one.

    0 casts to 0 (and -0.0 to -0.0), so a 2:4 weight stays 2:4; a value outside the target's range would become
    infinite, and is refused."""
    if dtype is None or dtype_name(src) == dtype:
        return src
    target = DTYPES[dtype]
    tensors = {k: t.to(target) if t.is_floating_point() else t for k, t in src.tensors.items()}
    overflow = [k for k, t in tensors.items() if t.is_floating_point()
                and int(torch.isinf(t).sum()) > int(torch.isinf(src.tensors[k]).sum())]
    if overflow:
        raise RoseError(f"{overflow[0]} has values outside {dtype}'s range: choose --dtype bfloat16 or float32")
    return replace(src, tensors=tensors)


FORMAT_KEY = "rose_format"
ACTIVATION_KEYS = ("hidden_act", "activation_function")


def not_for_transformers(config: dict, fmt: str, loader: str) -> dict:
    """Make a packed format's config.json fail loudly in transformers' `from_pretrained` (which would otherwise
    build the model with every packed weight randomly initialised, printing only a load report) while it stays
    readable as a config: the activation's name becomes a message that its KeyError shows. The real values are
    kept under `rose_format.replaced`, which rose's loaders put back."""
    replaced = {k: config[k] for k in ACTIVATION_KEYS if k in config} or {"hidden_act": None}
    message = f"rose {fmt} export: transformers cannot load this folder (its weights are packed); use {loader}"
    config.update({k: message for k in replaced})
    config[FORMAT_KEY] = {"name": fmt, "version": 1, "loader": loader, "replaced": replaced}
    return config


def set_config_dtype(config: dict, dtype: str) -> dict:
    """Record the weights' dtype in a config.json dict (transformers 5 reads `dtype`, older ones `torch_dtype`)."""
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    return config


def set_config_file_dtype(path: Path, dtype: str) -> None:
    """`set_config_dtype` on a config.json file, rewritten sorted and indented."""
    config = set_config_dtype(json.loads(Path(path).read_text()), dtype)
    Path(path).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_hf(src: Source, out: Path) -> None:
    """The `hf` format from (cast) tensors: one model.safetensors plus every non-weight file, config dtype updated."""
    from safetensors.torch import save_file

    copy_aux(src.path, out)
    save_file({k: t.contiguous() for k, t in src.tensors.items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    set_config_file_dtype(out / "config.json", dtype_name(src))


def copy_aux(src_dir: Path, dst: Path) -> None:
    """Copy everything but the weights (config, generation config, tokenizer, recipe) so each format stands alone."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(src_dir).iterdir()):
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name not in WEIGHT_INDEXES:
            shutil.copy2(f, dst / f.name)


def copy_all(src_dir: Path, dst: Path) -> None:
    """The `hf` format of an existing pruned directory: its files as they are."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(src_dir).iterdir()):
        if f.is_file():
            shutil.copy2(f, dst / f.name)
    if not (dst / RECIPE_NAME).is_file():  # pragma: no cover - open_source already demands it
        raise RoseError(f"{src_dir} has no {RECIPE_NAME}")


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a floating tensor as integers, for bit-exact comparisons."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a.contiguous()), bits(b.contiguous()))
