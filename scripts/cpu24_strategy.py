"""Which strategy the PyTorch binding of rose's C++ kernel should use for many tokens: the kernel itself (streaming,
or decoding blocks once with AVX-512) against dense tiles through PyTorch's BLAS, beside PyTorch's dense product;
interleaved medians, per dtype and token count. It decides `runtime/cpu24.py`'s DENSE_FROM tables.

    python scripts/cpu24_strategy.py --shape 4096x4096 --tokens 64,256,1024 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    from conftest import random24
    from runtime.cpu24 import Sparse24Linear, ensure_ops

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4096x4096", help="OUTxIN of the weight")
    ap.add_argument("--tokens", default="64,256,1024")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    rows, cols = (int(v) for v in args.shape.split("x"))
    print("code path:", ensure_ops(), "| threads:", args.threads)
    torch.set_num_threads(args.threads)
    W = random24(rows, cols, 0)
    for dtype in (torch.float32, torch.bfloat16):
        tiles = Sparse24Linear.from_dense(W, dtype=dtype, dense_from=1)   # every call through tiles and BLAS
        kernel = Sparse24Linear.from_dense(W, dtype=dtype, dense_from=0)  # never: the kernel at every count
        Wd = W.to(dtype)
        for M in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(M, cols).to(dtype)
            runs = {"tiles": lambda: tiles(x), "kernel": lambda: kernel(x),
                    "torch dense": lambda: torch.nn.functional.linear(x, Wd)}
            times = {k: [] for k in runs}
            for f in runs.values():
                f()
            for _ in range(args.reps):
                for k, f in runs.items():
                    start = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - start)
            print(f"{str(dtype):15s} {M:5d} tokens  " + "  ".join(f"{k} {statistics.median(v) * 1e3:7.1f} ms"
                                                              for k, v in times.items()))


if __name__ == "__main__":
    main()
