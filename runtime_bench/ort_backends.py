"""The onnxruntime family: rose's ONNX exports (and one-matmul graphs) on onnxruntime's CPU and CUDA execution
providers. The model runner feeds the exported causal LM with its KV cache: plain `run` on the CPU EP, IO binding
(the cache stays on the GPU) on CUDA."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .registry import Backend, LinearOp, Unsupported, cuda, register

CPU_EP, CUDA_EP = "CPUExecutionProvider", "CUDAExecutionProvider"
OPSET, IR_VERSION = 18, 8  # what the exporter writes; onnx's newest IR can be ahead of onnxruntime
ONNX_DTYPES = {torch.float32: "FLOAT", torch.float16: "FLOAT16"}


def elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _available(provider: str) -> Callable[[], str | None]:
    def check() -> str | None:
        try:
            import onnxruntime as ort
        except ImportError:
            return "onnxruntime is not installed"
        if provider not in ort.get_available_providers():
            return f"onnxruntime {ort.__version__} has no {provider}"
        if provider == CUDA_EP:
            return cuda()  # onnxruntime-gpu lists its CUDA EP even on machines without a GPU
        return None
    return check


def ort_session(model: bytes | Path, provider: str, threads: int, custom_ops: bool = False):
    """A session for timing (spinning off, `threads` intra-op threads); `custom_ops` registers rose's operator
    library (runtime.ort)."""
    import onnxruntime as ort

    if custom_ops:
        from runtime.ort import session_options

        options = session_options(threads)
    else:
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


def linear_onnx(W: torch.Tensor, dtype: torch.dtype, fmt: str = "onnx") -> bytes | str:
    """y = x W^T as an ONNX model laid out as the export `fmt` writes it (onnx: the weight transposed by a node;
    onnx-packed24: rebuilt by standard ops; onnx-sparse24: one rose.Sparse24MatMul node); a str says why not."""
    from onnx import TensorProto, helper, numpy_helper

    from export.onnx_packed import SHIFTS, THREE, pack_indices, unpack_nodes
    from export.onnx_sparse24 import DOMAIN, OP, OPSET as ROSE_OPSET, pack_panels

    if dtype not in ONNX_DTYPES:
        return f"onnxruntime's Python API has no {dtype} arrays (numpy lacks it)"
    rows, cols = W.shape
    if fmt == "onnx-packed24" and cols % 8:
        return f"onnx-packed24 needs a width that is a multiple of 8, got {cols}"
    if fmt == "onnx-sparse24" and dtype != torch.float32:
        return "rose's onnxruntime operator takes float32 activations"
    kind = getattr(TensorProto, ONNX_DTYPES[dtype])
    Wn = W.to(dtype).numpy()
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "Wt"], ["y"])]
    opsets = [helper.make_opsetid("", OPSET)]
    if fmt == "onnx-sparse24":
        values, masks = pack_panels(Wn)
        nodes = [helper.make_node(OP, ["x", "W.values", "W.masks"], ["y"], domain=DOMAIN, rows=rows, cols=cols)]
        inits = [numpy_helper.from_array(values, "W.values"), numpy_helper.from_array(masks, "W.masks")]
        opsets.append(helper.make_opsetid(DOMAIN, ROSE_OPSET))
    elif fmt == "onnx-packed24":
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
    model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)
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


def ort_model(provider: str, fmt: str, custom_ops: bool = False):
    def build(source, dtype: torch.dtype, threads: int) -> OrtRunner:
        from export.onnx_export import MODEL_FILE

        if dtype != torch.float32:
            raise Unsupported(f"the {fmt} export is float32 only")
        path = source.export / fmt / MODEL_FILE if source.export else None
        if path is None or not path.is_file():
            raise Unsupported(f"no {fmt}/ export to run: pass --pruned with a prune-and-export output that has it")
        info = source.manifest["formats"][fmt]
        sess = ort_session(path, provider, threads, custom_ops)
        if fmt == "onnx-packed24":  # what the session holds once the unpack subgraphs are folded: the dense graph
            dense = [f for f in (source.export / "onnx").glob(f"{MODEL_FILE}*")]
            held = sum(f.stat().st_size for f in dense) if dense else None
        else:
            held = sum(f.stat().st_size for f in path.parent.glob(f"{MODEL_FILE}*"))
        return OrtRunner(sess, provider, info["layers"], info["kv_heads"], info["head_dim"], info["bytes"], held)
    return build


def _linear(provider: str, fmt: str) -> Callable[[torch.Tensor, torch.dtype, int], LinearOp]:
    def build(W: torch.Tensor, dtype: torch.dtype, threads: int) -> LinearOp:
        graph = linear_onnx(W, dtype, fmt)
        if isinstance(graph, str):
            raise Unsupported(graph)
        sess = ort_session(graph, provider, threads, custom_ops=fmt == "onnx-sparse24")
        fn, to_input, to_output = ort_linear_io(sess, provider, dtype)
        held = _initializer_bytes(graph) if fmt == "onnx-sparse24" else W.numel() * elem(dtype)
        return LinearOp(fn=fn, to_input=to_input, to_output=to_output, weight_bytes=held, file_bytes=len(graph))
    return build


def _initializer_bytes(graph: bytes) -> int:
    """Bytes of the tensors a one-node graph holds (the packed weight: values and masks)."""
    import onnx
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(i).nbytes for i in onnx.load_from_string(graph).graph.initializer)


def _sparse24_available() -> str | None:
    if reason := _available(CPU_EP)():
        return reason
    from runtime.errors import RoseRuntimeError
    from runtime.ort import library_path

    try:
        library_path()
    except RoseRuntimeError as exc:
        return str(exc)
    return None


register(Backend("onnx-cpu", "cpu", False, None, _available(CPU_EP), _linear(CPU_EP, "onnx"),
                 ort_model(CPU_EP, "onnx"), "onnxruntime CPU EP on the dense onnx export"))
register(Backend("onnx-packed24-cpu", "cpu", True, "onnx-cpu", _available(CPU_EP), _linear(CPU_EP, "onnx-packed24"),
                 ort_model(CPU_EP, "onnx-packed24"), "onnxruntime CPU EP on onnx-packed24 (unpacked at load)"))
register(Backend("onnx-sparse24-cpu", "cpu", True, "onnx-cpu", _sparse24_available, _linear(CPU_EP, "onnx-sparse24"),
                 ort_model(CPU_EP, "onnx-sparse24", custom_ops=True),
                 "onnxruntime CPU EP on onnx-sparse24: rose's operator (cpp/) on packed weights"))
register(Backend("onnx-cuda", "cuda", False, None, _available(CUDA_EP), _linear(CUDA_EP, "onnx"),
                 ort_model(CUDA_EP, "onnx"), "onnxruntime CUDA EP on the dense onnx export"))
register(Backend("onnx-packed24-cuda", "cuda", True, "onnx-cuda", _available(CUDA_EP), _linear(CUDA_EP, "onnx-packed24"),
                 ort_model(CUDA_EP, "onnx-packed24"), "onnxruntime CUDA EP on onnx-packed24"))
