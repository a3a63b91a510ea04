"""`onnx-sparse24`: the `onnx` graph with every 2:4 linear run by rose's own operator, so onnxruntime runs it sparse.

Each 2:4 weight W (R x C) that the exported graph multiplies as `MatMul(X, Transpose(W))` becomes one node
`rose.Sparse24MatMul(X, <W>.values, <W>.masks)` (attributes `rows`, `cols`; weights that read the same X, as q/k/v
and gate/up do, share one node over their stacked rows, followed by a Split), its weight stored in the kernel's
panel-8 layout (`cpp/sparse24.h`: per panel of 8 rows and group of 4 columns, 16 kept values and one 32-bit word
of 4-bit keep masks), which the operator reads in place: 2.125 of every 4 dense bytes in fp32, and no dense copy
ever exists, in the file or in the session. Embeddings, `lm_head` and layers that are not 2:4 stay standard.

The operator lives in rose's custom-operator library (`cpp/`, built by `make install` into
`runtime/_lib/librose_ort.so`); the export copies it into the format's directory, so the directory is
self-contained: onnxruntime registers it with `SessionOptions.register_custom_ops_library`, and onnxruntime-genai
finds it through `genai_config.json` (which accepts only a library inside the model's directory). The library is
plain C++ for x86-64 Linux (AVX-512, AVX2 or scalar, chosen at run time) and needs no PyTorch.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch

from rose.errors import RoseError

from .onnx_export import EXTERNAL_DATA_BYTES, MODEL_FILE
from .packed24 import keep_mask24

DOMAIN, OP, OPSET = "rose", "Sparse24MatMul", 1
LIBRARY = "librose_ort.so"
PANEL = 8
# the first and second kept column of each 4-bit keep mask with two bits set (other nibbles never occur)
_FIRST = np.array([0, 0, 1, 0, 2, 0, 1, 0, 3, 0, 1, 0, 2, 0, 1, 0])
_SECOND = np.array([0, 0, 1, 1, 2, 2, 2, 1, 3, 3, 3, 1, 3, 2, 2, 1])


def find_library() -> Path:
    """rose's operator library: `ROSE_ORT_LIBRARY`, else the one `make install` builds in this checkout. A file,
    not an import: the formats never import a runtime."""
    env = os.environ.get("ROSE_ORT_LIBRARY")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "runtime" / "_lib" / LIBRARY
    if not path.is_file():
        raise RoseError(f"format onnx-sparse24 needs rose's onnxruntime operator library, and {path} is not built: "
                        f"run `make install` (or `make -C cpp`), or leave onnx-sparse24 out of --formats")
    return path


def pack_panels(W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values, masks int32) of a 2:4 matrix in the operator's panel-8 layout, flat, as `rose24::pack_dense`
    writes them (the same kept slots as packed24: nonzeros, then a stored -0.0, then the lowest columns)."""
    rows, cols = W.shape
    G, P = cols // 4, -(-rows // PANEL)
    keep = keep_mask24(torch.from_numpy(np.array(W, copy=True))).numpy().reshape(rows, G, 4)
    nib = (keep.astype(np.int64) << np.arange(4)).sum(-1)                              # rows x G
    groups = W.reshape(rows, G, 4)
    first = np.take_along_axis(groups, _FIRST[nib][..., None], 2)[..., 0]
    second = np.take_along_axis(groups, _SECOND[nib][..., None], 2)[..., 0]
    pad = P * PANEL - rows                                  # padding rows keep columns 0 and 1, with zero values
    first, second = (np.concatenate([a, np.zeros((pad, G), a.dtype)]) for a in (first, second))
    nib = np.concatenate([nib, np.full((pad, G), 0b0011)])
    values = np.stack([first.reshape(P, PANEL, G).transpose(0, 2, 1),
                       second.reshape(P, PANEL, G).transpose(0, 2, 1)], axis=2)       # P, G, 2, 8
    words = (nib.reshape(P, PANEL, G) << (4 * np.arange(PANEL)).reshape(1, PANEL, 1)).sum(1)   # P, G
    return np.ascontiguousarray(values.reshape(-1)), words.astype(np.uint32).view(np.int32).reshape(-1)


def _perm(node) -> list[int] | None:
    from onnx import helper

    return next((list(helper.get_attribute_value(a)) for a in node.attribute if a.name == "perm"), None)


def _why_not(W: np.ndarray, is_24: bool, users: list, transposes: list, matmuls: list) -> str | None:
    """None when the weight can become the operator's, else why it stays standard."""
    if not is_24:
        return "not 2:4"
    if W.ndim != 2 or W.shape[1] % 4:
        return f"shape {W.shape}: the operator takes 2-D weights with columns a multiple of 4"
    if W.dtype != np.float32:
        return f"dtype {W.dtype}: the operator's graph weights are float32"
    if not transposes or len(users) != len(transposes) or not matmuls or any(
            m.op_type != "MatMul" or m.input[1] not in {t.output[0] for t in transposes} for m in matmuls):
        return "the graph does not use it as MatMul(X, Transpose(W)) alone"
    return None


def _fuse_shared_inputs(replace: dict[int, list], packed_inits: list, order: dict[int, int]) -> list[list[str]]:
    """Operator nodes that read the same X (q/k/v, gate/up) become one node over their rows stacked, then a Split.

    At one token a small layer's call is mostly fixed cost (a pool dispatch, a pass over X): one call of 960 rows
    runs faster than three of 576, 192 and 192. Panels are independent runs of 8 rows, so stacking weights whose row
    counts are multiples of 8 is concatenating their flat arrays; the product is the same to the bit. Rewrites
    `replace` in place (id(MatMul) -> [nodes]: the fused pair at the group's first MatMul in graph order, nothing
    at the others) and `packed_inits`; returns the weight names of each fused group. A weight that more than one
    MatMul reads stays unfused."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in packed_inits}
    uses: dict[str, int] = {}
    for (node,) in replace.values():
        uses[node.input[1]] = uses.get(node.input[1], 0) + 1
    groups: dict[str, list[int]] = {}
    for key in sorted(replace, key=order.__getitem__):
        (node,) = replace[key]
        if uses[node.input[1]] == 1:
            groups.setdefault(node.input[0], []).append(key)
    fused = []
    for x, keys in groups.items():
        nodes = [replace[k][0] for k in keys]
        attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
        if len(nodes) < 2 or len({a["cols"] for a in attrs}) != 1 or any(a["rows"] % PANEL for a in attrs):
            continue
        weights = [n.input[1][: -len(".values")] for n in nodes]
        name = "+".join(weights)
        for part in ("values", "masks"):
            arrays = [numpy_helper.to_array(inits.pop(f"{w}.{part}")) for w in weights]
            inits[f"{name}.{part}"] = numpy_helper.from_array(np.concatenate(arrays), f"{name}.{part}")
        rows = [a["rows"] for a in attrs]
        stacked = f"{name}.out"
        split = numpy_helper.from_array(np.array(rows, np.int64), f"{name}.split")
        inits[split.name] = split
        first = helper.make_node(OP, [x, f"{name}.values", f"{name}.masks"], [stacked], name=f"{nodes[0].name}/fused",
                                 domain=DOMAIN, rows=sum(rows), cols=attrs[0]["cols"])
        parts = helper.make_node("Split", [stacked, split.name], [o for n in nodes for o in n.output],
                                 name=f"{nodes[0].name}/split", axis=-1)
        for i, k in enumerate(keys):
            replace[k] = [first, parts] if i == 0 else []
        fused.append(weights)
    packed_inits[:] = list(inits.values())
    return fused


def write_sparse24_onnx(dense_dir: Path, out: Path, targets: dict[str, bool]) -> dict:
    """Rewrite `dense_dir/model.onnx` into `out/model.onnx` (plus the operator library); `targets` maps weight name
    -> is 2:4. Returns what the manifest records, with `skipped`: weight -> why it stayed standard."""
    import onnx
    from onnx import helper, numpy_helper

    library = find_library()
    model = onnx.load(str(Path(dense_dir) / MODEL_FILE), load_external_data=True)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    skipped: dict[str, str] = {}
    replace: dict[int, object] = {}   # id(MatMul) -> its Sparse24MatMul
    drop: set[int] = set()
    packed_inits, done = [], []
    for name, is_24 in targets.items():
        if name not in inits:
            skipped[name] = "not an initializer of the exported graph"
            continue
        W = numpy_helper.to_array(inits[name])
        users = consumers.get(name, [])
        transposes = [n for n in users if n.op_type == "Transpose" and _perm(n) == [1, 0]]
        matmuls = [m for t in transposes for m in consumers.get(t.output[0], [])]
        reason = _why_not(W, is_24, users, transposes, matmuls)
        if reason:
            skipped[name] = reason
            continue
        rows, cols = W.shape
        values, masks = pack_panels(W)
        packed_inits += [numpy_helper.from_array(values, f"{name}.values"),
                         numpy_helper.from_array(masks, f"{name}.masks")]
        for m in matmuls:
            replace[id(m)] = [helper.make_node(OP, [m.input[0], f"{name}.values", f"{name}.masks"], list(m.output),
                                               name=f"rose_sparse24/{len(replace)}", domain=DOMAIN, rows=rows,
                                               cols=cols)]
        drop |= {id(t) for t in transposes}
        done.append(name)
    order = {id(n): i for i, n in enumerate(graph.node)}
    fused = _fuse_shared_inputs(replace, packed_inits, order)
    nodes = [m for n in graph.node if id(n) not in drop for m in replace.get(id(n), [n])]
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [i for i in graph.initializer if i.name not in set(done)]
    del graph.initializer[:]
    graph.initializer.extend(kept + packed_inits)
    if done:
        model.opset_import.append(helper.make_opsetid(DOMAIN, OPSET))
    out.mkdir(parents=True, exist_ok=True)
    size = sum(i.ByteSize() for i in graph.initializer)
    external = size > EXTERNAL_DATA_BYTES
    onnx.save_model(model, str(out / MODEL_FILE), save_as_external_data=external,
                    location=f"{MODEL_FILE}.data" if external else None)
    shutil.copy2(library, out / LIBRARY)
    return {"sparse24_weights": len(done), "fused_nodes": fused, "skipped": skipped, "external_data": external,
            "custom_ops_library": LIBRARY, "operator": f"{DOMAIN}.{OP}"}
