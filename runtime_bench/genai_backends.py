"""The onnxruntime-genai family: rose's ONNX exports generated with by onnxruntime-genai's own loop (its
`genai_config.json` is written by the export). `genai-cpu` runs the dense `onnx` export, `genai-sparse24-cpu`
the `onnx-sparse24` export on rose's operator (the library sits in the export's directory; genai_config.json
names it). Model benchmarks only.

The runner follows genai's generator: `append_tokens` runs the prefill, each `generate_next_token` picks a token
from the current logits (after running the model on the previous pick, from the second call on), so `start`
(prefill + first pick) and `decode` (`steps` forwards) do the same work as the other runners. End of sequence is
suppressed (`min_length`), as the other runners never stop early either.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .registry import Backend, Unsupported, register


def _available() -> str | None:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return "onnxruntime-genai is not installed (pip install --no-deps onnxruntime-genai)"
    return None


def _available_sparse24() -> str | None:
    if reason := _available():
        return reason
    from runtime.errors import RoseRuntimeError
    from runtime.ort import library_path

    try:
        library_path()
    except RoseRuntimeError as exc:
        return str(exc)
    return None


class GenaiRunner:
    """An export directory with `genai_config.json`, behind the model benchmark's runner interface."""

    cuda = False  # genai returns when its outputs are ready: host clock

    def __init__(self, directory: Path, threads: int, file_bytes: int, weight_bytes: int | None):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(directory))
        # genai's session options have no entry for onnxruntime's thread spinning (on by default): its idle threads
        # spin into whatever runs next, so time the genai backends against each other, not interleaved with others
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)
        self.length = json.loads((Path(directory) / "genai_config.json").read_text())["model"]["context_length"]
        self.file_bytes, self.weight_bytes = file_bytes, weight_bytes

    def _generator(self, ids: torch.Tensor):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.length, min_length=self.length, do_sample=False,
                                  batch_size=ids.shape[0])
        gen = self.og.Generator(self.model, params)
        gen.append_tokens(ids.numpy().astype(np.int32))  # the prefill runs here
        return gen

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.array(self._generator(ids).get_output("logits"))).float()

    def prefill(self, ids: torch.Tensor):
        return self._generator(ids)

    def start(self, ids: torch.Tensor):
        gen = self._generator(ids)
        gen.generate_next_token()  # picks the first token from the prefill's logits (no forward)
        return gen, ids.shape[0], ids.shape[1]

    def first_token(self, ids: torch.Tensor) -> np.ndarray:
        return self.start(ids)[0].get_next_tokens()

    def decode(self, state, steps: int) -> torch.Tensor:
        """`steps` forwards, each followed by a greedy pick; returns the first token and the `steps` that follow."""
        gen, batch, prompt = state
        for _ in range(steps):
            gen.generate_next_token()
        rows = [np.asarray(gen.get_sequence(i))[prompt:prompt + steps + 1] for i in range(batch)]
        return torch.from_numpy(np.stack(rows).astype(np.int64))


def _model(fmt: str) -> Callable:
    def build(source, dtype: torch.dtype, threads: int) -> GenaiRunner:
        from export.genai import CONFIG
        from export.onnx_export import MODEL_FILE

        if dtype != torch.float32:
            raise Unsupported(f"the {fmt} export is float32 only")
        directory = source.export / fmt if source.export else None
        if directory is None or not (directory / CONFIG).is_file():
            raise Unsupported(f"no {fmt}/ export with {CONFIG}: pass --pruned with a prune-and-export output that "
                              f"has it")
        held = sum(f.stat().st_size for f in directory.glob(f"{MODEL_FILE}*"))
        return GenaiRunner(directory, threads, source.manifest["formats"][fmt]["bytes"], held)
    return build


register(Backend("genai-cpu", "cpu", False, None, _available, None, _model("onnx"),
                 "onnxruntime-genai's generation loop on the dense onnx export"))
register(Backend("genai-sparse24-cpu", "cpu", True, "genai-cpu", _available_sparse24, None, _model("onnx-sparse24"),
                 "onnxruntime-genai on onnx-sparse24: rose's operator on packed weights"))
