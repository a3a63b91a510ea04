"""`onnx-packed24`: the `onnx` graph with every 2:4 weight stored packed and rebuilt by standard ONNX ops.

Each 2:4 weight W (R x C) becomes `<W>.values` (R x C/4 x 2, W's dtype: the two kept values of every group of
four) and `<W>.indices` (uint8, R x C/8 x 1: the 2-bit position of each kept value, four to a byte, lowest bits
first). Seven nodes rebuild W under its own name, so no consumer changes:

    BitShift(indices, [0,2,4,6]) -> BitwiseAnd 3 -> Cast int64 -> Reshape (R, C/4, 2)
    ScatterElements(ConstantOfShape (R, C/4, 4), positions, values, axis=2) -> Reshape (R, C)

Every input of those nodes is an initializer, so onnxruntime's constant folding runs them once when the session
is created; inference then sees exactly the dense graph. Weights whose width is not a multiple of 8 stay dense.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .onnx_export import EXTERNAL_DATA_BYTES, MODEL_FILE
from .packed24 import keep_mask24

UNPACK_PREFIX = "rose_unpack/"
SHIFTS = f"{UNPACK_PREFIX}shifts"
THREE = f"{UNPACK_PREFIX}three"


def pack_indices(W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values (R, C/4, 2), indices (R, C/8, 1) uint8) of a 2:4 matrix."""
    rows, cols = W.shape
    keep = keep_mask24(torch.from_numpy(np.ascontiguousarray(W).copy())).reshape(rows, cols // 4, 4)
    positions = keep.nonzero()[:, 2].reshape(rows, cols // 8, 4).to(torch.int32)
    packed = (positions << torch.tensor([0, 2, 4, 6], dtype=torch.int32)).sum(dim=2).to(torch.uint8)
    values = W.reshape(rows, cols // 4, 4)[keep.numpy()].reshape(rows, cols // 4, 2)
    return values, packed.reshape(rows, cols // 8, 1).numpy()


def unpack_nodes(name: str, key: str, rows: int, cols: int, dtype: int) -> tuple[list, list]:
    """(nodes, shape initializers) that rebuild weight `name` from `<name>.values` and `<name>.indices`.

    Intermediate names are short (`<key>/...`): with one subgraph per weight they would outweigh a small model."""
    from onnx import TensorProto, helper, numpy_helper

    p = f"{UNPACK_PREFIX}{key}"
    inits = [numpy_helper.from_array(np.array([rows, cols // 4, 2], dtype=np.int64), f"{p}/ps"),
             numpy_helper.from_array(np.array([rows, cols // 4, 4], dtype=np.int64), f"{p}/gs"),
             numpy_helper.from_array(np.array([rows, cols], dtype=np.int64), f"{p}/ws")]
    zero = helper.make_tensor("value", dtype, [1], [0])
    nodes = [
        helper.make_node("BitShift", [f"{name}.indices", SHIFTS], [f"{p}/s"], direction="RIGHT"),
        helper.make_node("BitwiseAnd", [f"{p}/s", THREE], [f"{p}/a"]),
        helper.make_node("Cast", [f"{p}/a"], [f"{p}/c"], to=TensorProto.INT64),
        helper.make_node("Reshape", [f"{p}/c", f"{p}/ps"], [f"{p}/p"]),
        helper.make_node("ConstantOfShape", [f"{p}/gs"], [f"{p}/z"], value=zero),
        helper.make_node("ScatterElements", [f"{p}/z", f"{p}/p", f"{name}.values"], [f"{p}/g"], axis=2),
        helper.make_node("Reshape", [f"{p}/g", f"{p}/ws"], [name]),
    ]
    return nodes, inits


def producers(graph, outputs: list[str]) -> list:
    """The nodes that compute `outputs` from initializers alone (here: the unpack subgraphs), in graph order."""
    made_by = {o: n for n in graph.node for o in n.output}
    wanted, stack = set(), list(outputs)
    while stack:
        node = made_by.get(stack.pop())
        if node is not None and id(node) not in wanted:
            wanted.add(id(node))
            stack.extend(node.input)
    return [n for n in graph.node if id(n) in wanted]


def write_packed_onnx(dense_dir: Path, out: Path, targets: dict[str, bool]) -> dict:
    """Rewrite `dense_dir/model.onnx` into `out/model.onnx`; `targets` maps weight name -> is 2:4."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(Path(dense_dir) / MODEL_FILE), load_external_data=True)
    graph = model.graph
    kept, nodes, inits = [], [], []
    packed: list[str] = []
    skipped: dict[str, str] = {}
    for init in graph.initializer:
        if init.name not in targets:
            kept.append(init)
            continue
        W = numpy_helper.to_array(init)
        reason = _why_not(W, targets[init.name])
        if reason:
            skipped[init.name] = reason
            kept.append(init)
            continue
        values, indices = pack_indices(W)
        inits += [numpy_helper.from_array(values, f"{init.name}.values"),
                  numpy_helper.from_array(indices, f"{init.name}.indices")]
        n, i = unpack_nodes(init.name, str(len(packed)), W.shape[0], W.shape[1], init.data_type)
        nodes += n
        inits += i
        packed.append(init.name)
    missing = sorted(set(targets) - {i.name for i in graph.initializer})
    for name in missing:
        skipped[name] = "not an initializer of the exported graph"
    if packed:
        inits += [numpy_helper.from_array(np.array([0, 2, 4, 6], dtype=np.uint8), SHIFTS),
                  numpy_helper.from_array(np.array(3, dtype=np.uint8), THREE)]
    del graph.initializer[:]
    graph.initializer.extend(kept + inits)
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)
    out.mkdir(parents=True, exist_ok=True)
    size = sum(i.ByteSize() for i in graph.initializer)
    external = size > EXTERNAL_DATA_BYTES
    onnx.save_model(model, str(out / MODEL_FILE), save_as_external_data=external,
                    location=f"{MODEL_FILE}.data" if external else None)
    return {"packed_weights": len(packed), "skipped": skipped, "external_data": external}


def _why_not(W: np.ndarray, is_24: bool) -> str | None:
    if W.ndim != 2:
        return f"{W.ndim}-D initializer"
    if not is_24:
        return "not 2:4"
    if W.shape[1] % 8:
        return f"width {W.shape[1]} is not a multiple of 8 (four 2-bit positions per byte)"
    return None
