"""Checks built into every export: onnxruntime against PyTorch, zeros in ONNX weights, folding of packed weights.

Parity runs the same prompts through both: a prefill, then greedy decoding with the KV cache for
`NEW_TOKENS` tokens. It compares every logit row while the two token streams agree, and the streams themselves.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rose.errors import RoseError

PROMPTS = ("The capital of France is", "Once upon a time, there was a little")
NEW_TOKENS = 32
LOGITS_ATOL = 1e-3  # fp32 torch vs onnxruntime CPU


@dataclass
class Trace:
    """Greedy tokens and the logit rows that chose them (prefill rows first)."""

    tokens: list[int] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)


def prompt_ids(tokenizer, prompts=PROMPTS) -> list[torch.Tensor]:
    ids = [torch.tensor([tokenizer(p)["input_ids"]], dtype=torch.long) for p in prompts]
    if any(i.numel() == 0 for i in ids):
        raise RoseError("the tokenizer turns a parity prompt into no tokens")
    return ids


@torch.no_grad()
def torch_greedy(model, ids: torch.Tensor, new_tokens: int = NEW_TOKENS) -> Trace:
    from transformers import DynamicCache

    from rose.models import cache_kwarg

    trace, cache, step, key = Trace(), DynamicCache(config=model.config), ids, cache_kwarg(model)
    for _ in range(new_tokens):
        logits = model(input_ids=step, **{key: cache}, use_cache=True).logits[0].float().numpy()
        trace.logits.append(logits)
        trace.tokens.append(int(logits[-1].argmax()))
        step = torch.tensor([[trace.tokens[-1]]])
    return trace


def session(path: Path, optimized: Path | None = None, custom_ops: Path | None = None):
    """An onnxruntime session on the CPU execution provider (fp32, the reference for parity); `custom_ops`: a
    custom-operator library to register (onnx-sparse24's)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if custom_ops is not None:
        options.register_custom_ops_library(str(custom_ops))
    if optimized is not None:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_greedy(sess, ids: torch.Tensor, layers: int, heads: int, dim: int, new_tokens: int = NEW_TOKENS) -> Trace:
    from .onnx_export import past_names

    names = past_names(layers)
    past = {n: np.zeros((1, heads, 0, dim), dtype=np.float32) for n in names}
    trace, step, seen = Trace(), ids.numpy(), 0
    for _ in range(new_tokens):
        length = step.shape[1]
        feeds = {"input_ids": step, "attention_mask": np.ones((1, seen + length), dtype=np.int64),
                 "position_ids": np.arange(seen, seen + length, dtype=np.int64)[None], **past}
        logits, *present = sess.run(None, feeds)
        past = dict(zip(names, present))
        seen += length
        trace.logits.append(logits[0])
        trace.tokens.append(int(logits[0, -1].argmax()))
        step = np.array([[trace.tokens[-1]]], dtype=np.int64)
    return trace


def compare(a: list[Trace], b: list[Trace]) -> dict:
    """Max |logit difference| over the rows where both streams had the same history, and token identity."""
    diff, same = 0.0, True
    for ta, tb in zip(a, b):
        for i, (la, lb) in enumerate(zip(ta.logits, tb.logits)):
            diff = max(diff, float(np.abs(la - lb).max()))
            if ta.tokens[i] != tb.tokens[i]:
                same = False
                break
    return {"max_abs_logits": diff, "greedy_identical": same}


def onnx_parity(path: Path, reference: list[Trace], ids: list[torch.Tensor], cache: tuple[int, int, int],
                custom_ops: Path | None = None) -> tuple[dict, list[Trace]]:
    """onnxruntime on `path` against the torch traces; raises when outside the tolerance."""
    sess = session(path, custom_ops=custom_ops)
    traces = [ort_greedy(sess, i, *cache, new_tokens=len(ref.tokens)) for i, ref in zip(ids, reference)]
    result = {"prompts": len(ids), "new_tokens": len(reference[0].tokens), "tolerance": LOGITS_ATOL,
              **compare(reference, traces)}
    if result["max_abs_logits"] > LOGITS_ATOL or not result["greedy_identical"]:
        raise RoseError(f"onnxruntime disagrees with PyTorch on {path.parent.name}: max |logit diff| "
                        f"{result['max_abs_logits']:.2e} (limit {LOGITS_ATOL:g}), greedy tokens identical: "
                        f"{result['greedy_identical']}")
    return result, traces


def initializer_sparsity(path: Path, state: dict[str, torch.Tensor], required: list[str]) -> dict:
    """Zeros of every weight initializer named after a checkpoint tensor must equal the checkpoint's."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=True)
    checked, mismatched = 0, []
    found = set()
    for init in model.graph.initializer:
        if init.name not in state:
            continue
        found.add(init.name)
        onnx_zeros = int((numpy_helper.to_array(init) == 0).sum())
        ckpt_zeros = int((state[init.name] == 0).sum())
        checked += 1
        if onnx_zeros != ckpt_zeros:
            mismatched.append(f"{init.name} ({onnx_zeros} zeros, checkpoint {ckpt_zeros})")
    missing = [n for n in required if n not in found]
    if mismatched or missing:
        raise RoseError(f"ONNX weights lost their zeros: {', '.join(mismatched[:4]) or 'none differ'}; "
                        f"missing from the graph: {', '.join(missing[:4]) or 'none'}")
    return {"initializers_checked": checked, "sparsity_equal": True}


def unpacked_weights(path: Path, names: list[str], batch_bytes: int = 256 * 1024**2) -> dict[str, np.ndarray]:
    """Run only the unpack subgraphs of a packed model through onnxruntime: the weights it will fold to."""
    import onnx
    from onnx import helper

    from .onnx_packed import producers

    model = onnx.load(str(path), load_external_data=True)
    inits = {i.name: i for i in model.graph.initializer}
    out: dict[str, np.ndarray] = {}
    batch: list[str] = []
    for i, name in enumerate(names):
        batch.append(name)
        if sum(inits[f"{n}.values"].ByteSize() * 2 for n in batch) < batch_bytes and i + 1 < len(names):
            continue
        mine = producers(model.graph, batch)
        needed = {x for n in mine for x in n.input if x in inits}
        graph = helper.make_graph(mine, "unpack", [], [helper.make_tensor_value_info(n, inits[f"{n}.values"].data_type,
                                                                                     None) for n in batch],
                                  [inits[x] for x in sorted(needed)])
        sub = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
        with tempfile.TemporaryDirectory() as tmp:
            onnx.save_model(sub, f"{tmp}/unpack.onnx")
            out.update(zip(batch, session(Path(tmp) / "unpack.onnx").run(batch, {})))
        batch = []
    return out


def folded_at_load(path: Path) -> bool:
    """True when onnxruntime's optimized graph keeps none of the unpack nodes (they were constant-folded)."""
    import onnx

    from .onnx_packed import UNPACK_PREFIX

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        session(path, optimized=optimized)
        graph = onnx.load(str(optimized), load_external_data=False).graph
        return not any(x.startswith(UNPACK_PREFIX) for n in graph.node for x in n.input)
