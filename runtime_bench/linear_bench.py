"""The linear benchmark: y = x W^T for an exact 2:4 W (random, magnitude-masked) against the dense reference
x @ (W*mask)^T, every backend gated on its error and then timed interleaved, per shape, dtype and token count.
"""
from __future__ import annotations

import sys
from typing import Any

import torch

from .registry import Backend, Unsupported
from .cases import (DTYPES, LINEAR_TOL, Settings, add_ratios, bandwidths, document, fp32_exact, linear_input,
                    linear_weight, one_line, record, rel_error, split_available)
from .memory import cuda_peak, peak_rss
from .presets import Shape
from .report import environment
from .timing import Timed, interleaved


def run_linear(shapes: dict[Shape, list[str]], tokens: list[int], dtypes: list[str], backends: list[Backend],
               settings: Settings, label: str) -> dict[str, Any]:
    usable, skipped = split_available(backends)
    env = environment(settings.threads, copy=bandwidths(usable))
    records: list[dict[str, Any]] = []
    ref_device = "cuda" if any(b.device == "cuda" for b in usable) else "cpu"
    for shape, layers in shapes.items():
        W = linear_weight(shape, settings.seed)
        for dname in dtypes:
            dtype, tol = DTYPES[dname], LINEAR_TOL[dname]
            base = {"case": "linear", "model": label, "shape": list(shape), "layers": layers, "dtype": dname,
                    "batch": 1}
            ops = {}
            for b in usable:
                try:
                    ops[b.name] = (b, b.linear(W, dtype, settings.threads))
                except Unsupported as exc:
                    records += [record(b, env, {**base, "tokens": t}, "skipped", reason=str(exc)) for t in tokens]
                except Exception as exc:  # a backend that breaks is reported, never fatal
                    records += [record(b, env, {**base, "tokens": t}, "error", message=one_line(exc))
                                for t in tokens]
            Wr = W.to(dtype).float().to(ref_device)
            for t in tokens:
                records += _linear_case(ops, env, {**base, "tokens": t}, W, Wr, dtype, tol, settings)
            if settings.rss:
                _attach_rss(records, ops, base, dname, max(tokens), settings)
    add_ratios(records, ("shape", "dtype", "tokens"), {"median_ms": True})
    extra = {}
    if "runtime.gpu24" in sys.modules:
        extra["gpu24_algorithms"] = sys.modules["runtime.gpu24"].ALGOS.report()
    return document("linear", backends, skipped, env, settings, records, source=label, **extra)


def graphed(fn, x, capture=None):
    """`fn(x)` captured once as a CUDA graph (after two warm-up calls on a side stream): what gets timed is its
    replay, so per-call host work (cuSPARSELt's plan set-up, Python) is gone for every backend alike. Returns the
    replay and None, or `fn` itself and why capture failed."""
    from runtime.generate import CudaGraphs

    capturer = capture or CudaGraphs()
    try:
        capturer.warmup(lambda: fn(x))
        replay = capturer.capture(lambda: fn(x))
        return (lambda _: replay()), None
    except Exception as exc:  # noqa: BLE001 - some ops refuse capture: time them eagerly, and say so
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return (lambda _: fn(x)), one_line(exc)


def _linear_case(ops: dict, env: dict, base: dict, W: torch.Tensor, Wr: torch.Tensor, dtype: torch.dtype,
                 tol: float, settings: Settings) -> list[dict[str, Any]]:
    x = linear_input(base["tokens"], W.shape[1], settings.seed, dtype)
    with fp32_exact():
        ref = x.to(Wr.device) @ Wr.T          # on the GPU when CUDA backends run: the gate compares there
    out, contenders = {}, {}
    for name, (b, op) in ops.items():
        extra = {"weight_bytes": op.weight_bytes, "tolerance": tol,
                 **({"weight_file_bytes": op.file_bytes} if op.file_bytes is not None else {}), **(op.info or {})}
        if op.max_tokens is not None and base["tokens"] > op.max_tokens:
            out[name] = record(b, env, base, "skipped", reason=f"takes at most {op.max_tokens} tokens (rows of x)",
                               **extra)
            continue
        try:
            xi = op.to_input(x)
            err = rel_error(op.to_output(op.fn(xi)), ref)
        except Exception as exc:
            out[name] = record(b, env, base, "error", message=one_line(exc), **extra)
            continue
        if err > tol:
            out[name] = record(b, env, base, "wrong", error=err, **extra)
            continue
        run, timing = (lambda _, f=op.fn, a=xi: f(a)), "eager"
        if op.cuda and settings.cuda_graphs:
            run, why = graphed(op.fn, xi)
            timing = "cuda graph" if why is None else f"eager (capture failed: {why})"
        out[name] = record(b, env, base, "ok", error=err, timing=timing, **extra)
        contenders[name] = Timed(run=run, cuda=op.cuda)
    for name, stats in interleaved(contenders, settings.warmup, settings.iters).items():
        r, (b, op) = out[name], ops[name]
        r.update(stats)
        if op.cuda:
            r.update(cuda_peak(lambda c=contenders[name]: c.run(None)))
        if base["tokens"] == 1:
            r["weight_gbs"] = op.weight_bytes / (stats["median_ms"] / 1e3) / 1e9
            r["copy_gbs"] = env["copy_gbs"][b.device] / 1e9
    return list(out.values())


def _attach_rss(records: list, ops: dict, base: dict, dname: str, tokens: int, settings: Settings) -> None:
    for name, (b, _) in ops.items():
        if b.device != "cpu":
            continue
        spec = {"kind": "linear", "backend": name, "shape": base["shape"], "dtype": dname, "tokens": tokens,
                "seed": settings.seed, "threads": settings.threads}
        rss = {**peak_rss(spec), "rss_tokens": tokens}
        for r in records:
            if r["backend"] == name and r["shape"] == base["shape"] and r["dtype"] == dname and r["status"] == "ok":
                r.update(rss)


