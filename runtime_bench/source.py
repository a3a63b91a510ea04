"""Where a benchmark's weights come from: a pruned or prune-and-export directory, or a preset with random 2:4
weights; the dense fp32 model of those weights is the correctness reference."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rose.errors import RoseError

from .presets import hf_config


@dataclass
class ModelSource:
    """Where the weights come from: a pruned / prune-and-export directory, or a preset with random 2:4 weights."""

    label: str
    hf: Path | None = None           # dense Hugging Face directory (zeros kept)
    export: Path | None = None       # prune-and-export output (onnx/, onnx-packed24/, semi-structured/, ...)
    manifest: dict = field(default_factory=dict)
    preset: str | None = None
    layers: int | None = None
    seed: int = 0
    _dense: Any = None

    @classmethod
    def pruned(cls, path: Path) -> "ModelSource":
        path = Path(path).expanduser()
        if not path.exists():
            raise RoseError(f"pruned directory {path} does not exist: pass the --out of `rose-export "
                            f"prune-and-export` (or of `rose-export prune`)")
        if (path / "manifest.json").is_file():
            from export.manifest import load

            hf = path / "hf" if (path / "hf" / "config.json").is_file() else None
            if hf is None:
                raise RoseError(f"{path} has no hf/ export: the dense reference needs it; export with hf in --formats")
            return cls(label=str(path), hf=hf, export=path, manifest=load(path))
        if (path / "config.json").is_file():
            return cls(label=str(path), hf=path)
        raise RoseError(f"{path} is neither a prune-and-export output (no manifest.json) nor a pruned model "
                        f"(no config.json)")

    @classmethod
    def random(cls, preset: str, layers: int | None, seed: int) -> "ModelSource":
        hf_config(preset, layers)  # validates the name now
        return cls(label=f"{preset} (random 2:4{f', {layers} layers' if layers else ''})", preset=preset,
                   layers=layers, seed=seed)

    def spec(self) -> dict[str, Any]:
        return {"pruned": str(self.export or self.hf) if self.preset is None else None, "preset": self.preset,
                "layers": self.layers, "seed": self.seed}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "ModelSource":
        return cls.pruned(Path(spec["pruned"])) if spec["pruned"] else cls.random(spec["preset"], spec["layers"],
                                                                                  spec["seed"])

    @property
    def vocab(self) -> int:
        from transformers import AutoConfig

        return (hf_config(self.preset, self.layers) if self.preset else AutoConfig.from_pretrained(self.hf)).vocab_size

    def dense_fp32(self):
        """The dense fp32 CPU model (zeros in place): the reference of the correctness gate. Built once."""
        if self._dense is None:
            from transformers import AutoModelForCausalLM

            _quiet_transformers()

            if self.preset is None:
                self._dense = AutoModelForCausalLM.from_pretrained(self.hf, dtype=torch.float32).eval()
            else:
                self._dense = _random_24(self.preset, self.layers, self.seed)
        return self._dense

    def model(self, device: str, dtype: torch.dtype):
        """The dense model on `device` in `dtype`, loaded directly in that dtype where possible."""
        from transformers import AutoModelForCausalLM

        if (device, dtype) == ("cpu", torch.float32) or self.preset is not None:
            return clone(self.dense_fp32(), device, dtype)
        _quiet_transformers()
        return AutoModelForCausalLM.from_pretrained(self.hf, dtype=dtype).to(device).eval()

    def release(self) -> None:
        self._dense = None

    def formats_bytes(self) -> dict[str, int]:
        return {f: info["bytes"] for f, info in self.manifest.get("formats", {}).items()}


def _quiet_transformers() -> None:
    """Loading bars would interleave with the benchmark's own output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _random_24(preset: str, layers: int | None, seed: int):
    from transformers import AutoModelForCausalLM

    from rose.arch import all_sublayers
    from rose.masks import nm_mask

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(preset, layers), dtype=torch.float32).eval()
    with torch.no_grad():
        for module in all_sublayers(model).values():
            module.weight.masked_fill_(nm_mask(module.weight.abs(), 2, 4), 0.0)
    return model


def clone(model: torch.nn.Module, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `model` on `device` in `dtype` (the source model itself when nothing changes)."""
    from transformers import AutoModelForCausalLM

    if device == "cpu" and dtype == next(model.parameters()).dtype:
        return model
    with torch.device(device):
        copy = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    copy.load_state_dict(model.state_dict(), strict=False)
    copy.tie_weights()
    return copy.eval()
