"""Reading the `packed24` export (the legacy compressed-tensors `sparse-24-bitmask` layout) for the runtimes.

Per 2:4 linear `<m>`: `<m>.compressed` (R x C/2 kept values), `<m>.bitmask` (uint8, R x ceil(C/8), bit j of byte
b marks column 8b+j) and `<m>.shape` (int64, [[R], [C]]), in one `model.safetensors`, with `config.json` beside
it. The writer is `export/packed24.py`; this is the reading side, kept apart so a deployer needs no exporter.
"""
from __future__ import annotations

from pathlib import Path

from .errors import RoseRuntimeError

WEIGHTS = "model.safetensors"


def packed24_config(path: Path):
    """The model config of a packed24 directory, without the compressed-tensors entry (rose loads it itself)."""
    from transformers import AutoConfig

    if not (Path(path) / WEIGHTS).is_file():
        raise RoseRuntimeError(f"{path} is not a packed24 directory (no {WEIGHTS}): export it with "
                               f"--formats packed24")
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config
