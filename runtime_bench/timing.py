"""Timing: warm-up, then N runs of every contender interleaved round-robin (so drift hits all alike; the
order rotates each round so no contender always follows the same one), each run timed alone. CUDA runs are
timed with events recorded after a synchronisation; everything else with `time.perf_counter` around a call
that returns only when its outputs are ready. Median and IQR are reported.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_WARMUP = 3
DEFAULT_ITERS = 20


@dataclass
class Timed:
    """One contender: `setup()` (untimed, e.g. a prefill before timing decode) feeds `run(state)` (timed)."""

    run: Callable[[Any], Any]
    setup: Callable[[], Any] | None = None
    cuda: bool = False  # time with CUDA events (the work is queued on the current CUDA stream)


def summarize(times_ms: list[float]) -> dict[str, Any]:
    q = statistics.quantiles(times_ms, n=4, method="inclusive") if len(times_ms) > 1 else [times_ms[0]] * 3
    return {"median_ms": statistics.median(times_ms), "iqr_ms": q[2] - q[0], "min_ms": min(times_ms),
            "max_ms": max(times_ms), "runs": len(times_ms), "times_ms": [round(t, 6) for t in times_ms]}


def _once(t: Timed) -> float:
    state = t.setup() if t.setup else None
    if t.cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t.run(state)
        end.record()
        torch.cuda.synchronize()
        return float(start.elapsed_time(end))
    begin = time.perf_counter()
    t.run(state)
    return (time.perf_counter() - begin) * 1e3


def interleaved(contenders: dict[str, Timed], warmup: int = DEFAULT_WARMUP, iters: int = DEFAULT_ITERS
                ) -> dict[str, dict[str, Any]]:
    """Warm every contender up, then time them round-robin `iters` times; name -> summary."""
    if iters < 1:
        raise ValueError("iters must be >= 1")
    for t in contenders.values():
        for _ in range(warmup):
            _once(t)
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(iters):
        for name in names[i % len(names):] + names[: i % len(names)]:  # rotate: no backend always runs first
            times[name].append(_once(contenders[name]))
    return {name: summarize(ts) for name, ts in times.items()}


def copy_bandwidth(device: str = "cpu", nbytes: int = 64 * 1024**2, iters: int = 5) -> float:
    """Bytes moved per second (read + write) by a plain tensor copy on `device`: the roof for weight streaming."""
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    result = interleaved({"copy": Timed(lambda _: dst.copy_(src), cuda=device.startswith("cuda"))},
                         warmup=1, iters=iters)["copy"]
    return 2 * n * 4 / (result["median_ms"] / 1e3)
