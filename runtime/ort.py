"""rose's 2:4 kernel inside onnxruntime: the custom-operator library built from `cpp/` (`make install`).

    from runtime.ort import session
    sess = session("model.onnx", threads=2)        # an onnxruntime.InferenceSession that knows rose's operators
    y, = sess.run(None, {"x": x})

The library adds operator `Sparse24MatMul` in domain `rose` (contract: `cpp/README.md`). It needs onnxruntime
1.17 or newer and nothing else: no PyTorch, and this module imports neither torch nor rose.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import RoseRuntimeError, first_line
from .manifest import verify_files

LIBRARY = Path(__file__).resolve().parent / "_lib" / "librose_ort.so"
DOMAIN = "rose"
OP = "Sparse24MatMul"


def library_path() -> Path:
    """The built custom-operator library; a one-line error saying how to build it when it is missing."""
    if not LIBRARY.is_file():
        raise RoseRuntimeError(f"rose's onnxruntime operator library {LIBRARY} is not built: run `make install` "
                               f"(or `make -C cpp`) in rose's source checkout")
    return LIBRARY


def session_options(threads: int | None = None) -> Any:
    """`onnxruntime.SessionOptions` with rose's operators registered; `threads` sets `intra_op_num_threads`, the
    pool the operator runs on (None: onnxruntime's default, one thread per core)."""
    import onnxruntime as ort

    path = library_path()
    options = ort.SessionOptions()
    if threads is not None:
        if threads < 1:
            raise RoseRuntimeError(f"threads must be at least 1, got {threads}")
        options.intra_op_num_threads = threads
    try:
        options.register_custom_ops_library(str(path))
    except Exception as exc:  # e.g. an onnxruntime older than 1.17: the library says so in one line
        raise RoseRuntimeError(f"onnxruntime {ort.__version__} cannot load {path.name}: "
                               f"{_ort_message(exc)}") from exc
    return options


def session(model: str | os.PathLike | bytes, threads: int | None = None, options: Any = None,
            providers: list | None = None, verify: bool = True) -> Any:
    """An `onnxruntime.InferenceSession` for `model` (a path, or the serialized model) on the CPU with rose's
    operators registered. `options`: your own `SessionOptions`, without rose's library (this registers it; `threads`
    still applies when given). A graph inside an export whose `manifest.json` lists its directory is checked first,
    as every runtime loader does: the graph's files' sizes and sha256 (one read, about 1 s per GB; `verify=False`
    skips it; the configs beside it may be edited). onnxruntime then checks the graph, and rose's operator every
    packed mask."""
    import onnxruntime as ort

    if not isinstance(model, bytes) and verify:
        path = Path(model).resolve()
        verify_files(path.parent, files=path.name, strict=False)

    if options is None:
        options = session_options(threads)
    else:
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            options.register_custom_ops_library(str(library_path()))
        except RoseRuntimeError:
            raise
        except Exception as exc:
            raise RoseRuntimeError(f"onnxruntime {ort.__version__} cannot load {LIBRARY.name}: "
                                   f"{_ort_message(exc)}") from exc
    what = "the model" if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), sess_options=options,
                                    providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # a bad packed weight fails here, with the node and the problem in the message
        message = _ort_message(exc)
        if "Domain already set in registry" in message:
            message = "rose's operator library was registered twice on these SessionOptions: pass options without it"
        raise RoseRuntimeError(f"{what}: {message}") from exc


def _ort_message(exc: BaseException) -> str:
    """onnxruntime's message without its '[ONNXRuntimeError] : 1 : FAIL :' prefix, on one line."""
    text = first_line(exc)
    if text.startswith("[ONNXRuntimeError]"):
        text = text.split(" : ", 3)[-1]
    return text
