"""`onnx`: the causal LM with KV cache, exported by torch.onnx's dynamo exporter (no hand-built graph).

Inputs `input_ids`, `attention_mask`, `position_ids` and `past_key_values.<i>.key|value`; outputs `logits` and
`present.<i>.key|value`. A thin wrapper only flattens the cache into tensors. Weight initializers keep their
checkpoint names and values: the graph optimizer may fold anything except a node that reads a weight, so
transposes of weights stay in the graph (onnxruntime folds them at session creation) and zeros stay visible
in the file, where the packed rewrite and the sparsity check find them by name.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from rose.errors import RoseError, first_line
from rose.models import cache_kwarg

log = logging.getLogger(__name__)

OPSET = 18
MODEL_FILE = "model.onnx"
EXTERNAL_DATA_BYTES = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB limit, with room for the graph itself
PREFIX = "lm."  # the wrapper's attribute name, stripped from initializer names


def input_names(layers: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids"] + past_names(layers)


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def output_names(layers: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


class KVWrapper(nn.Module):
    """Flat tensors in and out, as ONNX wants: the past is rebuilt into a DynamicCache for the real model."""

    def __init__(self, lm: nn.Module, layers: int):
        super().__init__()
        self.lm = lm
        self.layers = layers
        self.cache_kw = cache_kwarg(lm)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.lm.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      **{self.cache_kw: cache}, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def cache_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of the model's KV cache, read from one tiny forward pass."""
    with torch.no_grad():
        out = model(input_ids=torch.ones(1, 2, dtype=torch.long), use_cache=True)
    layers = out.past_key_values.layers
    _, heads, _, dim = layers[0].keys.shape
    return len(layers), heads, dim


def export_onnx(model: nn.Module, out: Path, opset: int = OPSET) -> dict:
    """Write `out/model.onnx` (plus `model.onnx.data` past 2 GB) for an fp32 copy of `model`."""
    import onnxscript.optimizer

    if opset < OPSET:
        raise RoseError(f"ONNX opset {opset} is too old: use {OPSET} or newer")
    model = model.float().eval()
    layers, heads, dim = cache_shape(model)
    batch, past, seq = 2, 3, 4
    example = (torch.ones(batch, seq, dtype=torch.long), torch.ones(batch, past + seq, dtype=torch.long),
               torch.arange(past, past + seq).expand(batch, seq).contiguous(),
               *[torch.zeros(batch, heads, past, dim) for _ in range(2 * layers)])
    b, s, p, t = (torch.export.Dim(n) for n in ("batch", "sequence", "past_sequence", "total_sequence"))
    shapes = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: t}, "position_ids": {0: b, 1: s},
              "past": tuple({0: b, 2: p} for _ in range(2 * layers))}
    wrapper = KVWrapper(model, layers).eval()
    with _quiet_exporter():
        try:
            program = torch.onnx.export(wrapper, example, dynamo=True, optimize=False, dynamic_shapes=shapes,
                                        input_names=input_names(layers), output_names=output_names(layers),
                                        opset_version=opset, verbose=False)
        except Exception as exc:  # the exporter's messages are pages long: keep the first line
            first = first_line(exc)
            raise RoseError(f"torch.onnx could not export {model.config.model_type}: {first[:300]}") from None
        weights = _strip_prefix(program.model)
        onnxscript.optimizer.optimize_ir(program.model, should_fold=lambda node: _keep_weights(node, weights))
    _strip_debug_info(program.model)
    out.mkdir(parents=True, exist_ok=True)
    size = sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)
    external = size > EXTERNAL_DATA_BYTES
    program.save(out / MODEL_FILE, external_data=external)
    log.info("onnx: %d initializers, %.1f MB%s", len(program.model.graph.initializers), size / 1e6,
             " (external data)" if external else "")
    return {"opset": opset, "external_data": external, "layers": layers, "kv_heads": heads, "head_dim": dim,
            "dtype": "float32"}


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter and its optimizer log every rewrite at INFO and warn about axis names: keep the CLI readable."""
    quiet = {"onnxscript": logging.WARNING, "onnx_ir": logging.WARNING, "torch.export": logging.WARNING,
             "torch.onnx": logging.ERROR}  # torch.onnx warns that torchvision's ops are missing: irrelevant here
    loggers = [logging.getLogger(n) for n in quiet]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(quiet[lg.name])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _strip_prefix(model) -> set[str]:
    """Give initializers their checkpoint names (`model.layers.0...`), returning those names."""
    names = set()
    for value in list(model.graph.initializers.values()):
        if value.name and value.name.startswith(PREFIX):
            value.name = value.name[len(PREFIX):]
            names.add(value.name)
    return names


def _strip_debug_info(model) -> None:
    """Drop the exporter's per-node stack traces and scopes: they outweigh a small model and name local paths."""
    import onnx_ir as ir

    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        node.metadata_props.clear()


def _keep_weights(node, weights: set[str]) -> bool | None:
    """Never fold a node that reads a checkpoint weight (that would rename, transpose or merge it)."""
    return False if any(v is not None and v.name in weights for v in node.inputs) else None
