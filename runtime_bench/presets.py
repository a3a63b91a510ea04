"""Model shapes to benchmark without downloading anything: a table of published configs, and shapes read from a
local model directory.

A preset is the part of a config that fixes the shapes of the decoder's linears (and, for `bench model
--random`, the whole architecture). `tiny` is not a real model: it keeps tests and smoke runs fast.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rose.config import parse_list
from rose.errors import RoseError


@dataclass(frozen=True)
class Preset:
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool = False
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


PRESETS: dict[str, Preset] = {
    "llama-2-7b": Preset("llama", 4096, 11008, 32, 32, 32, 32000),
    "llama-2-13b": Preset("llama", 5120, 13824, 40, 40, 40, 32000),
    "llama-2-70b": Preset("llama", 8192, 28672, 80, 64, 8, 32000),
    "llama-3-8b": Preset("llama", 4096, 14336, 32, 32, 8, 128256, rope_theta=500000.0),
    "mistral-7b": Preset("mistral", 4096, 14336, 32, 32, 8, 32000, rope_theta=1000000.0),
    "smollm2-135m": Preset("llama", 576, 1536, 30, 9, 3, 49152, tie_embeddings=True, rope_theta=100000.0),
    "tiny": Preset("llama", 128, 256, 2, 4, 2, 256, tie_embeddings=True),
}

# (sublayer, rows, cols) of one LLaMA-family decoder layer, as functions of the preset
_SUBLAYERS = (
    ("q_proj", lambda p: (p.heads * p.head_dim, p.hidden)),
    ("k_proj", lambda p: (p.kv_heads * p.head_dim, p.hidden)),
    ("v_proj", lambda p: (p.kv_heads * p.head_dim, p.hidden)),
    ("o_proj", lambda p: (p.hidden, p.heads * p.head_dim)),
    ("gate_proj", lambda p: (p.intermediate, p.hidden)),
    ("up_proj", lambda p: (p.intermediate, p.hidden)),
    ("down_proj", lambda p: (p.hidden, p.intermediate)),
)

Shape = tuple[int, int]  # (out_features, in_features) of W; y = x W^T


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise RoseError(f"unknown preset {name!r}: choose from {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_shapes(name: str) -> dict[Shape, list[str]]:
    """Distinct (out, in) shapes of a preset's decoder linears -> the sublayers that have them."""
    p = preset(name)
    out: dict[Shape, list[str]] = {}
    for sub, shape in _SUBLAYERS:
        out.setdefault(shape(p), []).append(sub)
    return out


def model_shapes(directory: Path) -> dict[Shape, list[str]]:
    """Distinct (out, in) shapes of the prunable linears of a local model (an HF dir or an export's hf/)."""
    from rose.arch import all_sublayers, get_weight
    from rose.models import load_config, meta_model

    model = meta_model(load_config(hf_dir(Path(directory))))
    out: dict[Shape, list[str]] = {}
    for name, module in all_sublayers(model).items():
        short = name.split(".", 3)[-1] if name.count(".") >= 3 else name
        names = out.setdefault(tuple(get_weight(module).shape), [])
        if short not in names:
            names.append(short)
    return out


def hf_dir(path: Path) -> Path:
    """The Hugging Face directory inside `path`: itself, or its `hf/` when `path` is an export output."""
    path = Path(path).expanduser()
    if not path.exists():
        raise RoseError(f"directory {path} does not exist")
    if (path / "hf" / "config.json").is_file():
        return path / "hf"
    if (path / "config.json").is_file():
        return path
    raise RoseError(f"{path} holds no config.json (nor hf/config.json): pass a model or prune-and-export output")


def parse_shapes(text: str) -> list[Shape]:
    """`4096x11008,11008x4096` (OUTxIN) -> [(4096, 11008), (11008, 4096)]."""
    shapes = []
    for item in parse_list(text, "--shapes", hint="write OUTxIN[,OUTxIN...]"):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise RoseError(f"unknown shape {item!r}: write OUTxIN with positive integers, e.g. 4096x11008")
        shapes.append((int(parts[0]), int(parts[1])))
    return shapes


def hf_config(name: str, layers: int | None = None):
    """A transformers config for a preset (random-weight models), optionally with fewer decoder layers."""
    from transformers import LlamaConfig, MistralConfig

    p = preset(name)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig}[p.model_type]
    return cls(vocab_size=p.vocab, hidden_size=p.hidden, intermediate_size=p.intermediate,
               num_hidden_layers=layers or p.layers, num_attention_heads=p.heads, num_key_value_heads=p.kv_heads,
               max_position_embeddings=max(4096, 2 * 8192), tie_word_embeddings=p.tie_embeddings,
               rope_theta=p.rope_theta)
