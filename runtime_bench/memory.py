"""Memory: peak CUDA memory of one run in this process, and on the CPU the peak resident set of a fresh
subprocess that builds one backend and runs one case (so allocator caches of other backends do not count).

    python -m runtime_bench.memory '<json spec>'    (used by the benchmark itself; prints one JSON line)
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch

RSS_TIMEOUT_S = 1800


def cuda_peak(fn: Callable[[], Any]) -> dict[str, int]:
    """Peak CUDA memory allocated during one call of `fn` (absolute, and above what was allocated before)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"cuda_peak_bytes": peak, "cuda_peak_above_resident_bytes": peak - before}


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return None


def _reset_peak() -> bool:
    """Forget the peak RSS reached while importing (Linux >= 4.0: write 5 to clear_refs), so the peak counts
    from here on; False where that is refused (then the lifetime peak is reported)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:  # pragma: no cover
        return False


def peak_rss(spec: dict[str, Any]) -> dict[str, Any]:
    """Run `spec` in a fresh interpreter; {"peak_rss_bytes", "rss_before_build_bytes"} or {"rss_error"}."""
    cmd = [sys.executable, "-m", "runtime_bench.memory", json.dumps(spec)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=RSS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"rss_error": f"timed out after {RSS_TIMEOUT_S} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"rss_error": f"exit {done.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    from . import cases
    from .backends import BACKENDS
    from .source import ModelSource

    torch.set_num_threads(spec["threads"])
    backend = BACKENDS[spec["backend"]]
    dtype = cases.DTYPES[spec["dtype"]]
    reset = _reset_peak()
    before = _status_bytes("VmRSS")
    if spec["kind"] == "linear":
        W = cases.linear_weight(tuple(spec["shape"]), spec["seed"])
        op = backend.linear(W, dtype, spec["threads"])
        x = op.to_input(cases.linear_input(spec["tokens"], W.shape[1], spec["seed"], dtype))
        op.fn(x)
    else:
        source = ModelSource.from_spec(spec["source"])
        runner = backend.model(source, dtype, spec["threads"])
        source.release()
        ids = cases.prompt_ids(spec["batch"], spec["prompt_len"], source.vocab, spec["seed"])
        runner.decode(runner.start(ids), spec["decode_tokens"])
    peak = _status_bytes("VmHWM") if reset else None
    return {"peak_rss_bytes": peak or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_before_build_bytes": before, "peak_counts_from": "build" if reset and peak else "process start"}


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
