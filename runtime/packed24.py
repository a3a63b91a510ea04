"""Loading the `packed24` export (the legacy compressed-tensors `sparse-24-bitmask` layout), verified.

Per 2:4 linear `<m>`: `<m>.compressed` (R x C/2 kept values), `<m>.bitmask` (uint8, R x ceil(C/8), bit j of byte
b marks column 8b+j) and `<m>.shape` (int64, [[R], [C]]), in one `model.safetensors`, with `config.json` beside
it. The writer is `export/packed24.py`; this is the reading side, apart so that a deployer needs no exporter.
`load_packed24` rebuilds a dense transformers model; `runtime.load_packed24_cpu` keeps the weights packed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import RoseRuntimeError
from .verify import (check_finite, check_shape, empty_model, load_config, load_into, parameter_shapes, read_tensors,
                     verify_files)

FORMAT = "packed24"
WEIGHTS = "model.safetensors"
PARTS = ("compressed", "bitmask", "shape")


def _two_bits_table(high_nibble: bool) -> np.ndarray:
    """For each byte value: both nibbles (or the low one alone, the high one zero) keep exactly two columns."""
    pop = np.array([bin(v).count("1") for v in range(16)])
    low, high = pop[np.arange(256) & 15] == 2, pop[np.arange(256) >> 4] == 2
    return low & high if high_nibble else low & (np.arange(256) >> 4 == 0)


_BOTH, _LOW_ONLY = _two_bits_table(True), _two_bits_table(False)


def bad_group(bitmask: torch.Tensor, cols: int) -> tuple[int, int] | None:
    """(row, first column) of the first group of four whose bitmask nibble does not keep exactly two, or None."""
    bits = bitmask.numpy()
    ok = _BOTH[bits]
    if cols % 8:  # the last byte holds one group: its high nibble must be empty
        ok[:, -1] = _LOW_ONLY[bits[:, -1]]
    if ok.all():
        return None
    row, byte = (int(i[0]) for i in np.nonzero(~ok))
    low_ok = bin(int(bits[row, byte]) & 15).count("1") == 2
    return row, 8 * byte + (4 if low_ok else 0)


@dataclass
class Packed24:
    """A packed24 directory read and checked: its config, the packed modules and every stored tensor."""

    path: Path
    config: object
    tensors: dict[str, torch.Tensor]
    modules: dict[str, tuple[int, int]]   # packed linear -> (rows, columns)

    def kept(self, module: str) -> torch.Tensor:
        return self.tensors[f"{module}.compressed"]

    def bitmask(self, module: str) -> torch.Tensor:
        return self.tensors[f"{module}.bitmask"]

    def dense_tensors(self) -> dict[str, torch.Tensor]:
        """Every stored tensor that is not part of a packed module (embeddings, norms, dense linears)."""
        packed = {f"{m}.{part}" for m in self.modules for part in PARTS}
        return {k: t for k, t in self.tensors.items() if k not in packed}


def read_packed24(path: Path, verify: bool = True) -> Packed24:
    """Read a packed24 directory and check it (module docstring of `runtime.verify`): hashes against the export's
    manifest unless `verify=False`, then every tensor against the config, every group two of four, no NaN."""
    path = Path(path)
    if not (path / WEIGHTS).is_file():
        raise RoseRuntimeError(f"{path} is not a packed24 directory (no {WEIGHTS}): export it with "
                               f"--formats packed24")
    verify_files(path, verify)
    config = load_config(path, FORMAT)
    tensors = read_tensors(path / WEIGHTS)
    where = path / WEIGHTS
    shapes = parameter_shapes(config)
    modules: dict[str, tuple[int, int]] = {}
    for name in [n[: -len(".compressed")] for n in tensors if n.endswith(".compressed")]:
        for part in PARTS[1:]:
            if f"{name}.{part}" not in tensors:
                raise RoseRuntimeError(f"{where}: {name}.compressed has no {name}.{part}: the file is damaged")
        if f"{name}.weight" not in shapes:
            raise RoseRuntimeError(f"{where}: {name} is not a layer of the model in config.json")
        rows, cols = shapes[f"{name}.weight"]
        stored = tensors[f"{name}.shape"].flatten().tolist()
        if stored != [rows, cols]:
            raise RoseRuntimeError(f"{where}: {name}.shape says {stored} but the config's {name} is {rows}x{cols}")
        kept, bitmask = tensors[f"{name}.compressed"], tensors[f"{name}.bitmask"]
        if not kept.is_floating_point():
            raise RoseRuntimeError(f"{where}: {name}.compressed holds {kept.dtype}, not floating-point values")
        check_shape(where, f"{name}.compressed", kept, (rows, cols // 2))
        if bitmask.dtype != torch.uint8:
            raise RoseRuntimeError(f"{where}: {name}.bitmask holds {bitmask.dtype}, not uint8")
        check_shape(where, f"{name}.bitmask", bitmask, (rows, -(-cols // 8)))
        bad = bad_group(bitmask, cols)
        if bad is not None:
            raise RoseRuntimeError(f"{where}: {name}.bitmask does not keep exactly two of four in row {bad[0]}, "
                                   f"columns {bad[1]}-{bad[1] + 3}: the file is damaged; re-export it")
        check_finite(where, f"{name}.compressed", kept)
        modules[name] = (rows, cols)
    packed = {f"{m}.{part}" for m in modules for part in PARTS}
    for name, t in tensors.items():
        if name in packed:
            continue
        if name not in shapes:
            raise RoseRuntimeError(f"{where}: {name} is not a tensor of the model in config.json")
        check_shape(where, name, t, shapes[name])
        check_finite(where, name, t)
    return Packed24(path, config, tensors, modules)


def unpack(kept: torch.Tensor, bitmask: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The dense matrix: kept values where the bitmask is set, zeros elsewhere."""
    keep = np.unpackbits(bitmask.numpy(), axis=-1, count=cols, bitorder="little").astype(bool)
    dense = torch.zeros(rows, cols, dtype=kept.dtype)
    dense[torch.from_numpy(keep)] = kept.flatten()
    return dense


def load_packed24(path: Path, dtype: torch.dtype | None = None, verify: bool = True):
    """A transformers model rebuilt from a packed24 directory (dense weights, zeros restored), on the CPU, after
    `read_packed24`'s checks."""
    packed = read_packed24(path, verify)
    state = packed.dense_tensors()
    for module, (rows, cols) in packed.modules.items():
        state[f"{module}.weight"] = unpack(packed.kept(module), packed.bitmask(module), rows, cols)
    stored = next(t.dtype for t in state.values() if t.is_floating_point())
    dtype = dtype or stored
    model = empty_model(packed.config, dtype)
    load_into(model, {k: t.to(dtype) if t.is_floating_point() else t for k, t in state.items()}, Path(path))
    return model.eval()
