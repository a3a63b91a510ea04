"""One linear layer in onnxruntime: rose's `Sparse24MatMul` (runtime/_lib/librose_ort.so) against onnxruntime's
own dense MatMul, and (with --torch) the same product in PyTorch: `torch.ops.rose.sparse24_linear` against
`F.linear`. Prints medians and bandwidth; writes every time to --out (JSON).

Each session holds several copies of the layer (distinct weights, one node each, run one after the other) so
that the weights together exceed the last-level cache, as a model's layers do; times are per layer. Dense and
2:4 runs are interleaved, repeat by repeat, so that the machine's drift hits both alike.

    PYTHONPATH=. python scripts/bench_ort_op.py --threads 2 --tokens 1,8,64,256 --out /tmp/ort.json

`--lib old=/tmp/librose_ort_old.so` times another build of the operator library in the same run (A/B).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # LLaMA-2-7B: q/k/v/o, gate/up, down (rows x cols)


def random24(rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((rows, cols), dtype=np.float32)
    order = np.argsort(-np.abs(W.reshape(rows, cols // 4, 4)), axis=2)
    keep = np.zeros((rows, cols // 4, 4), dtype=bool)
    np.put_along_axis(keep, order[:, :, :2], True, axis=2)
    return W * keep.reshape(rows, cols)


def pack(W: np.ndarray, bf16: bool):
    import torch

    from runtime import cpu24

    cpu24.ensure_ops()
    t = torch.from_numpy(W)
    values, masks = torch.ops.rose.sparse24_pack(t.to(torch.bfloat16) if bf16 else t)
    return values, masks


def model_bytes(nodes, inits, inputs, outputs) -> bytes:
    from onnx import helper

    graph = helper.make_graph(nodes, "bench", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("rose", 1)],
                              ir_version=10)
    return model.SerializeToString()


def ort_models(rows: int, cols: int, copies: int, bf16: bool) -> tuple[bytes, bytes]:
    """(dense MatMul model, Sparse24MatMul model), each with `copies` layers reading the same x."""
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", cols])
    dense_nodes, dense_inits, sparse_nodes, sparse_inits, outs = [], [], [], [], []
    for i in range(copies):
        W = random24(rows, cols, i)
        out = helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["m", rows])
        outs.append(out)
        Wd = W
        if bf16:  # the dense baseline multiplies the same (bf16-rounded) weights in fp32
            import torch

            Wd = torch.from_numpy(W).to(torch.bfloat16).float().numpy()
        dense_inits.append(numpy_helper.from_array(np.ascontiguousarray(Wd.T), f"w{i}"))
        dense_nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]))
        values, masks = pack(W, bf16)
        if bf16:
            raw = values.view(dtype=__import__("torch").int16).numpy().tobytes()
            sparse_inits.append(helper.make_tensor(f"w{i}.values", TensorProto.BFLOAT16, [values.numel()], raw,
                                                   raw=True))
        else:
            sparse_inits.append(numpy_helper.from_array(values.numpy(), f"w{i}.values"))
        sparse_inits.append(numpy_helper.from_array(masks.numpy(), f"w{i}.masks"))
        sparse_nodes.append(helper.make_node("Sparse24MatMul", ["x", f"w{i}.values", f"w{i}.masks"], [f"y{i}"],
                                             domain="rose", rows=rows, cols=cols))
    return (model_bytes(dense_nodes, dense_inits, [x], outs), model_bytes(sparse_nodes, sparse_inits, [x], outs))


def timed(fn, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def bench_ort(args, rows, cols, bf16) -> list[dict]:
    import onnxruntime as ort

    from runtime.ort import library_path

    sparse_bytes = rows * cols * (1.0625 if bf16 else 2.125)
    copies = max(2, math.ceil(args.cache_bytes / sparse_bytes))

    def options():
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        # the sessions take turns here: a spinning idle pool of one would steal a core from the other
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if args.spin else "0")
        return so

    dense_model, sparse_model = ort_models(rows, cols, copies, bf16)
    sessions = {"onnx-dense": ort.InferenceSession(dense_model, options(), providers=["CPUExecutionProvider"])}
    libs = [("onnx-rose", str(library_path()))] + [(f"onnx-rose-{n}", path) for n, path in args.lib]
    for name, path in libs:
        so = options()
        so.register_custom_ops_library(path)
        sessions[name] = ort.InferenceSession(sparse_model, so, providers=["CPUExecutionProvider"])
    del dense_model, sparse_model
    rows_out = []
    for M in args.tokens:
        x = np.random.default_rng(M).standard_normal((M, cols), dtype=np.float32)
        want = sessions["onnx-dense"].run(None, {"x": x})
        for name, sess in sessions.items():
            got = sess.run(None, {"x": x})
            err = max(float(np.abs(a - b).max() / np.abs(a).max()) for a, b in zip(want, got))
            assert err < 1e-4, f"{name} disagrees with MatMul: {err}"
        inner = max(1, int(args.inner // max(1, M // 16)))
        times = {name: [] for name in sessions}
        for _ in range(args.reps):
            for name, sess in sessions.items():
                times[name].append(timed(lambda: sess.run(None, {"x": x}), inner) / copies)
        for name in list(sessions)[1:]:
            rows_out.append(summary(rows, cols, M, bf16, {k: times[k] for k in ("onnx-dense", name)},
                                    "onnx-dense", name, copies))
            print(line(rows_out[-1]), flush=True)
    return rows_out


def bench_torch(args, rows, cols, bf16) -> list[dict]:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    sparse_bytes = rows * cols * (1.0625 if bf16 else 2.125)
    copies = max(2, math.ceil(args.cache_bytes / sparse_bytes))
    dense, packed = [], []
    for i in range(copies):
        W = random24(rows, cols, i)
        values, masks = pack(W, bf16)
        packed.append((values, masks))
        Wt = torch.from_numpy(W)
        dense.append(Wt.to(torch.bfloat16).float() if bf16 else Wt)
    out = []
    for M in args.tokens:
        x = torch.randn(M, cols, generator=torch.Generator().manual_seed(M))

        def run_dense():
            for W in dense:
                F.linear(x, W)

        def run_rose():
            for v, m in packed:  # dense_from=0: the kernel at every token count, as the ORT op runs it
                torch.ops.rose.sparse24_linear(x, v, m, rows, cols, None, 0, 0, 8 << 20)

        inner = max(1, int(args.inner // max(1, M // 16)))
        times = {"torch-dense": [], "torch-rose": []}
        run_dense(), run_rose()
        for _ in range(args.reps):
            times["torch-dense"].append(timed(run_dense, inner) / copies)
            times["torch-rose"].append(timed(run_rose, inner) / copies)
        out.append(summary(rows, cols, M, bf16, times, "torch-dense", "torch-rose", copies))
        print(line(out[-1]), flush=True)
    return out


def summary(rows, cols, M, bf16, times, dense_key, rose_key, copies) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    dense_bytes = rows * cols * 4
    rose_bytes = rows * cols * (1.0625 if bf16 else 2.125)
    return {"shape": f"{rows}x{cols}", "tokens": M, "values": "bf16" if bf16 else "fp32", "copies": copies,
            "dense": dense_key, "rose": rose_key, "times_s": times, "median_ms": {k: v * 1e3 for k, v in med.items()},
            "speedup": med[dense_key] / med[rose_key],
            "weight_GBps": {dense_key: dense_bytes / med[dense_key] / 1e9, rose_key: rose_bytes / med[rose_key] / 1e9}}


def line(r: dict) -> str:
    d, s = r["dense"], r["rose"]
    bw = r["weight_GBps"]
    best = min(r["times_s"][d]) / min(r["times_s"][s])
    return (f"{r['shape']:>11} {r['values']} M={r['tokens']:<5} {d} {r['median_ms'][d]:8.3f} ms  {s} "
            f"{r['median_ms'][s]:8.3f} ms  speedup {r['speedup']:.2f}x (of minima {best:.2f}x)  weight GB/s "
            f"{bw[d]:.1f} / {bw[s]:.1f} (ratio {bw[s] / bw[d]:.2f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in SHAPES))
    p.add_argument("--tokens", default="1,8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--inner", type=int, default=4, help="calls per timed repeat (fewer for many tokens)")
    p.add_argument("--cache-bytes", type=float, default=160e6, help="weights per session, beyond the caches")
    p.add_argument("--bf16", action="store_true", help="bf16 values (the dense baseline: the same weights in fp32)")
    p.add_argument("--torch", action="store_true", help="also PyTorch: sparse24_linear against F.linear")
    p.add_argument("--no-ort", action="store_true")
    p.add_argument("--spin", action="store_true", help="let onnxruntime's idle pool threads spin (its default)")
    p.add_argument("--lib", action="append", default=[], metavar="NAME=PATH",
                   help="also time this build of the operator library (session onnx-rose-NAME), side by side")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    args.lib = [tuple(v.split("=", 1)) for v in args.lib]
    args.tokens = [int(t) for t in args.tokens.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    import onnxruntime

    print(f"# CPU: {cpu}; threads {args.threads}; onnxruntime {onnxruntime.__version__}", flush=True)
    results = []
    for rows, cols in shapes:
        if not args.no_ort:
            results += bench_ort(args, rows, cols, args.bf16)
        if args.torch:
            results += bench_torch(args, rows, cols, args.bf16)
    if args.out:
        args.out.write_text(json.dumps({"cpu": cpu, "threads": args.threads, "python": platform.python_version(),
                                        "onnxruntime": onnxruntime.__version__, "argv": sys.argv,
                                        "results": results}, indent=1))


if __name__ == "__main__":
    main()
