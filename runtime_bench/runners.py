"""What the registry entries build: one-matmul ONNX graphs and sessions, and model runners (torch, torch with
2:4 semi-structured weights, onnxruntime with the KV cache).

A model runner offers `logits(ids)` (full prefill logits, fp32 CPU: the correctness gate), `prefill(ids)` (one
forward with an empty cache, outputs ready), `first_token(ids)` (prefill + greedy pick, on the host: time to
first token), `start(ids)` (prefill state for decoding) and `decode(state, steps)` (greedy with the KV cache).
Every runner computes logits for every prompt position, as the exported ONNX graph does, so runtimes do the
same work.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

CUDA_EP = "CUDAExecutionProvider"
OPSET, IR_VERSION = 18, 8  # what the exporter writes; onnx's newest IR can be ahead of onnxruntime
ONNX_DTYPES = {torch.float32: "FLOAT", torch.float16: "FLOAT16"}


class Unsupported(Exception):
    """This backend does not take this case (dtype, shape, missing export format); the message says why."""


def elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def sparse_bytes(t: torch.Tensor) -> int:
    """Bytes a (possibly SparseSemiStructuredTensor) weight holds: kept values and metadata."""
    parts = [getattr(t, a, None) for a in ("packed", "meta", "packed_t", "meta_t", "compressed_swizzled_bitmask")]
    parts = [p for p in parts if isinstance(p, torch.Tensor)]
    return sum(p.nbytes for p in parts) if parts else t.nbytes


def model_weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += sparse_bytes(p.data if not hasattr(p, "packed") else p)
    for m in model.modules():  # rose's C++ 2:4 modules hold their weights as buffers
        if hasattr(m, "values") and hasattr(m, "masks") and isinstance(m.masks, torch.Tensor):
            total += m.values.nbytes + m.masks.nbytes
    return total


def linear_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the prunable linears' weights (packed or dense), the part that 2:4 shrinks."""
    from rose.arch import all_sublayers

    total = 0
    for m in all_sublayers(model).values():
        total += m.values.nbytes + m.masks.nbytes if hasattr(m, "masks") else sparse_bytes(m.weight)
    return total


# ---- onnxruntime ----------------------------------------------------------------------------------------------

def ort_session(model: bytes | Path, provider: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    # onnxruntime's idle threads spin after every run by default; interleaved with other backends on the same
    # cores they would steal time from whoever runs next (torch's OpenMP threads lost up to 2x here)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options, providers=[provider])
    if sess.get_providers()[0] != provider:
        raise Unsupported(f"onnxruntime did not start {provider} (got {sess.get_providers()})")
    return sess


def linear_onnx(W: torch.Tensor, dtype: torch.dtype, packed: bool) -> bytes | str:
    """y = x W^T as an ONNX model (weight transposed by a node, as the exporter writes it); a str says why not."""
    from onnx import TensorProto, helper, numpy_helper

    from export.onnx_packed import SHIFTS, THREE, pack_indices, unpack_nodes

    if dtype not in ONNX_DTYPES:
        return f"onnxruntime's Python API has no {dtype} arrays (numpy lacks it)"
    rows, cols = W.shape
    if packed and cols % 8:
        return f"onnx-packed24 needs a width that is a multiple of 8, got {cols}"
    kind = getattr(TensorProto, ONNX_DTYPES[dtype])
    Wn = W.to(dtype).numpy()
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "Wt"], ["y"])]
    if packed:
        values, indices = pack_indices(Wn)
        unpack, inits = unpack_nodes("W", "0", rows, cols, kind)
        nodes = unpack + nodes
        inits += [numpy_helper.from_array(values, "W.values"), numpy_helper.from_array(indices, "W.indices"),
                  numpy_helper.from_array(np.array([0, 2, 4, 6], dtype=np.uint8), SHIFTS),
                  numpy_helper.from_array(np.array(3, dtype=np.uint8), THREE)]
    else:
        inits = [numpy_helper.from_array(Wn, "W")]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", kind, ["tokens", cols])],
                              [helper.make_tensor_value_info("y", kind, ["tokens", rows])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    return model.SerializeToString()


def ort_linear_io(sess, provider: str, dtype: torch.dtype):
    """(fn, to_input, to_output): plain run on the CPU EP; IO binding with device buffers on the CUDA EP."""
    if provider != CUDA_EP:
        return (lambda xn: sess.run(None, {"x": xn})[0], lambda x: x.to(dtype).numpy(),
                lambda y: torch.from_numpy(y).float())
    import onnxruntime as ort

    def fn(xv):
        io = sess.io_binding()
        io.bind_ortvalue_input("x", xv)
        io.bind_output("y", "cuda")
        sess.run_with_iobinding(io)
        return io.get_outputs()[0]
    return (fn, lambda x: ort.OrtValue.ortvalue_from_numpy(x.to(dtype).numpy(), "cuda", 0),
            lambda v: torch.from_numpy(v.numpy()).float())


class OrtRunner:
    """The exported causal LM with KV cache: plain `run` on the CPU EP, IO binding (cache stays on the GPU) on CUDA."""

    cuda = False  # onnxruntime returns when its outputs are ready: host clock

    def __init__(self, sess, provider: str, layers: int, heads: int, dim: int, file_bytes: int, weight_bytes: int):
        from export.onnx_export import output_names, past_names

        self.sess, self.heads, self.dim = sess, heads, dim
        self.binding = provider == CUDA_EP
        self.past_names, self.out_names = past_names(layers), output_names(layers)
        self.file_bytes, self.weight_bytes = file_bytes, weight_bytes

    def _empty(self, batch: int) -> dict:
        import onnxruntime as ort

        zero = np.zeros((batch, self.heads, 0, self.dim), dtype=np.float32)
        if self.binding:
            return {n: ort.OrtValue.ortvalue_from_numpy(zero, "cuda", 0) for n in self.past_names}
        return {n: zero for n in self.past_names}

    def _step(self, ids: np.ndarray, past: dict, seen: int):
        b, t = ids.shape
        feeds = {"input_ids": ids, "attention_mask": np.ones((b, seen + t), dtype=np.int64),
                 "position_ids": np.broadcast_to(np.arange(seen, seen + t, dtype=np.int64), (b, t)).copy()}
        if not self.binding:
            logits, *present = self.sess.run(None, {**feeds, **past})
            return logits, dict(zip(self.past_names, present))
        io = self.sess.io_binding()
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        for name, value in past.items():
            io.bind_ortvalue_input(name, value)
        for name in self.out_names:
            io.bind_output(name, "cuda")
        self.sess.run_with_iobinding(io)
        logits, *present = io.get_outputs()
        return logits, dict(zip(self.past_names, present))

    def _host(self, logits) -> np.ndarray:
        return logits.numpy() if self.binding else logits

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._host(self._step(ids.numpy(), self._empty(ids.shape[0]), 0)[0])).float()

    def prefill(self, ids: torch.Tensor):
        return self._step(ids.numpy(), self._empty(ids.shape[0]), 0)[0]

    def start(self, ids: torch.Tensor):
        logits, past = self._step(ids.numpy(), self._empty(ids.shape[0]), 0)
        return past, ids.shape[1], self._host(logits)[:, -1:].argmax(-1).astype(np.int64)

    def first_token(self, ids: torch.Tensor) -> np.ndarray:
        return self.start(ids)[2]

    def decode(self, state, steps: int) -> torch.Tensor:
        past, seen, token = state
        tokens = [token]
        for _ in range(steps):
            logits, past = self._step(token, past, seen)
            seen += 1
            token = self._host(logits)[:, -1:].argmax(-1).astype(np.int64)
            tokens.append(token)
        return torch.from_numpy(np.concatenate(tokens, axis=1))


def ort_model(provider: str, fmt: str):
    def build(source, dtype: torch.dtype, threads: int) -> OrtRunner:
        from export.onnx_export import MODEL_FILE

        if dtype != torch.float32:
            raise Unsupported(f"the {fmt} export is float32 only")
        path = source.export / fmt / MODEL_FILE if source.export else None
        if path is None or not path.is_file():
            raise Unsupported(f"no {fmt}/ export to run: pass --pruned with a prune-and-export output that has it")
        info = source.manifest["formats"][fmt]
        sess = ort_session(path, provider, threads)
        dense = [f for f in (source.export / "onnx").glob(f"{MODEL_FILE}*")]  # what the packed graph folds back to
        held = sum(f.stat().st_size for f in dense) if dense else None
        return OrtRunner(sess, provider, info["layers"], info["kv_heads"], info["head_dim"], info["bytes"], held)
    return build


# ---- torch ----------------------------------------------------------------------------------------------------

class TorchRunner:
    def __init__(self, model: torch.nn.Module, device: str):
        self.model, self.device, self.cuda = model.eval(), device, device == "cuda"
        self.weight_bytes, self.file_bytes = model_weight_bytes(model), None
        self.linear_bytes = linear_weight_bytes(model)

    @torch.no_grad()
    def _forward(self, ids: torch.Tensor, cache):
        return self.model(input_ids=ids, past_key_values=cache, use_cache=True).logits

    def _cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self._forward(ids.to(self.device), self._cache()).float().cpu()

    def prefill(self, ids: torch.Tensor):
        return self._forward(ids.to(self.device), self._cache())

    def start(self, ids: torch.Tensor):
        cache = self._cache()
        logits = self._forward(ids.to(self.device), cache)
        return cache, logits[:, -1:].argmax(-1)

    def first_token(self, ids: torch.Tensor):
        return self.start(ids)[1].cpu()

    def decode(self, state, steps: int) -> torch.Tensor:
        """Greedy decoding; returns the first token and the `steps` that follow (batch x steps+1)."""
        cache, token = state
        tokens = [token]
        for _ in range(steps):
            token = self._forward(token, cache)[:, -1:].argmax(-1)
            tokens.append(token)
        return torch.cat(tokens, dim=1).cpu()


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


def torch_model(device: str):
    def build(source, dtype: torch.dtype, threads: int) -> TorchRunner:
        return TorchRunner(source.model(device, dtype), device)
    return build


def cpp_model():
    """rose's C++ kernel: straight from the packed24 export when there is one in this dtype, else the dense model
    converted in memory (random presets, or pruned directories without packed24)."""
    def build(source, dtype: torch.dtype, threads: int) -> TorchRunner:
        import copy

        from runtime.cpu24 import DTYPES, load_packed24_cpu, sparsify

        if dtype not in DTYPES:
            raise Unsupported(f"the C++ 2:4 kernel takes float32 or bfloat16 values, not {dtype}")
        packed = source.export / "packed24" if source.export else None
        if packed is not None and (packed / "model.safetensors").is_file():
            return TorchRunner(load_packed24_cpu(packed, dtype), "cpu")
        from rose.arch import all_sublayers

        model = copy.deepcopy(source.model("cpu", dtype))
        sparsify(model, all_sublayers(model))
        return TorchRunner(model, "cpu")
    return build


def semi_model(backend: str):
    """Loaded from the `semi-structured` export when its dtype matches, else converted in memory (random models)."""
    def build(source, dtype: torch.dtype, threads: int) -> TorchRunner:
        import json

        from export.semi_structured import HALF, INDEX, _classes, load_sparse, why_not
        from rose.arch import all_sublayers
        from rose.masks import is_nm

        if dtype not in HALF.values():
            raise Unsupported(f"{backend} 2:4 kernels take float16 or bfloat16, not {dtype}")
        semi = source.export / "semi-structured" if source.export else None
        if semi is not None and (semi / INDEX).is_file():
            stored = HALF[json.loads((semi / INDEX).read_text())["dtype"]]
            if stored != dtype:
                raise Unsupported(f"the semi-structured export holds {stored}; re-export with --semi-dtype")
            return TorchRunner(load_sparse(semi, "cuda", backend), "cuda")
        model = source.model("cuda", dtype)
        cls = _classes()[backend]
        for name, module in all_sublayers(model).items():
            W = module.weight.data
            if why_not(backend, tuple(W.shape), dtype) is None and is_nm(W, 2, 4):
                module.weight = torch.nn.Parameter(cls.from_dense(W.contiguous()), requires_grad=False)
        return TorchRunner(model, "cuda")
    return build
