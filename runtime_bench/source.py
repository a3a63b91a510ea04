"""Where a benchmark's weights come from: a pruned or prune-and-export directory, or a preset with random 2:4
weights; the dense fp32 model of those weights is the correctness reference.

The reference lives on `ref_device`: the CPU, or the GPU when the benchmark runs CUDA backends. A 7B model in
fp32 is 27 GB: built on the CPU and moved, it would take minutes and most of a small machine's memory, so random
presets are built straight on the reference device (initialised there, masked there). On the GPU the reference
is as exact as on the CPU (fp32 with TF32 off, `fp32_exact`; only the order of summation differs, ~1e-6 relative,
far inside the gate's tolerances), and it is the very model that is timed, with all its layers: a truncated
model would gate a different model than the one measured. It is released before timing (`release`), so it
counts in no backend's memory figures; `check_reference_fits` refuses, in one line, a reference that would take
more than half of the GPU's free memory (pass --layers N then)."""
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
    ref_device: str = "cpu"
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
        """The dense fp32 model on `ref_device` (zeros in place): the reference of the correctness gate. Built once
        (again after `release`: random presets are rebuilt bit for bit from the seed)."""
        if self._dense is None:
            from transformers import AutoModelForCausalLM

            _quiet_transformers()

            if self.preset is None:
                self._dense = AutoModelForCausalLM.from_pretrained(self.hf, dtype=torch.float32).eval()
                self._dense.to(self.ref_device)
            else:
                self.check_reference_fits()
                self._dense = _random_24(self.preset, self.layers, self.seed, self.ref_device)
        return self._dense

    def parameters(self) -> int:
        """Parameters of the model (counted on the meta device)."""
        from rose.models import load_config, meta_model

        config = hf_config(self.preset, self.layers) if self.preset else load_config(self.hf)
        seen = {id(p): p.numel() for p in meta_model(config).parameters()}
        return sum(seen.values())

    def check_reference_fits(self) -> None:
        """A one-line error when the fp32 reference would take more than half the free memory of its GPU."""
        if not str(self.ref_device).startswith("cuda"):
            return
        need = 4 * self.parameters()
        free, _ = torch.cuda.mem_get_info(torch.device(self.ref_device))
        if need > free // 2:
            raise RoseError(f"the fp32 reference of {self.label} needs {need / 1e9:.1f} GB of GPU memory, more than "
                            f"half of the {free / 1e9:.1f} GB free beside the benchmarked models: use --layers N for "
                            f"fewer decoder layers")

    def model(self, device: str, dtype: torch.dtype):
        """The dense model on `device` in `dtype`, loaded directly in that dtype where possible."""
        from transformers import AutoModelForCausalLM

        if (device, dtype) == (self.ref_device, torch.float32) or self.preset is not None:
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


def _random_24(preset: str, layers: int | None, seed: int, device: str = "cpu"):
    """A preset's model with random weights, initialised on `device` (no CPU copy of a 7B model), its prunable
    linears made 2:4 by magnitude there. Deterministic for a seed and device (the CPU and CUDA generators differ)."""
    from transformers import AutoModelForCausalLM

    from rose.arch import all_sublayers
    from rose.masks import nm_mask

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config(preset, layers), dtype=torch.float32).eval()
    with torch.no_grad():
        for module in all_sublayers(model).values():
            module.weight.masked_fill_(nm_mask(module.weight.abs(), 2, 4), 0.0)
    return model


def same_device(a, b) -> bool:
    """`cuda` and `cuda:0` are the same device when 0 is the current one."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def clone(model: torch.nn.Module, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `model` on `device` in `dtype` (the source model itself when nothing changes). The copy is built
    empty (no random initialisation of weights that are overwritten anyway) and given converted tensors."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    first = next(model.parameters())
    if same_device(device, first.device) and dtype == first.dtype:
        return model
    with init_empty_weights(include_buffers=False):
        copy = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
             for k, v in model.state_dict().items()}
    copy.load_state_dict(state, strict=False, assign=True)
    copy.tie_weights()
    return copy.to(device).eval()
