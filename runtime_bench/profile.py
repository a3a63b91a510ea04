"""Where the time of a whole forward goes, dense against 2:4: torch.profiler over a few decoder layers of a random
2:4 preset, the top kernels and the time per kind of kernel, side by side (issue 19: the gap between the sum of
the linears' gains and the whole forward).

    python -m runtime_bench.profile --config llama-2-7b --layers 4 --tokens 2048 --backends torch-cuda,gpu24 \\
        --out DIR        # writes DIR/profile.json and DIR/profile.md; needs CUDA

Each backend's model is the same random 2:4 weights (`--layers` decoder layers), fp16, built on the GPU; the
prefill forward (no cache) runs `--warmup` times, then `--runs` times under the profiler (CUDA activity). Kernels
are sorted into kinds by name (`KINDS`): dense GEMM, 2:4 GEMM (cuSPARSELt, CUTLASS sparse, rose's Triton
kernels), attention, copies and layout changes, normalisation and elementwise, other. A kernel the rules do not
know lands in "other" under its own name in the top table, so nothing is hidden. Exit status 2 without CUDA.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from rose.config import parse_list
from rose.errors import RoseError

KINDS = [  # (kind, pattern on the lower-cased kernel name), first match wins
    ("2:4 gemm", r"cusparselt|sparse24|sp_gemm|sm\d+_xmma_sparse|cutlass.*sparse|sparse.*cutlass|spmma|_sp_"),
    ("2:4 expand", r"expand24"),
    ("attention", r"flash|fmha|attention|attn|cudnn.*(sdpa|mha)|softmax"),
    ("dense gemm", r"gemm|cutlass|cublas|nvjet|xmma|sm90_|sm80_|ampere|hopper|wgmma|matmul|gemv"),
    ("copy/layout", r"copy|transpose|cat|memcpy|memset|index|pad|fill|contiguous"),
    ("norm/elementwise", r"elementwise|vectorized|reduce|norm|silu|mul|add|pow|mean|rsqrt|exp|neg|unrolled"),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def summarize(events: list[tuple[str, int, float]], runs: int, top: int = 25) -> dict:
    """(kernel name, calls, total CUDA microseconds) over `runs` forwards -> per-forward totals by kind and the top
    kernels."""
    total = sum(us for _, _, us in events) / runs
    kinds: dict[str, float] = {}
    for name, _, us in events:
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + us / runs
    rows = sorted(events, key=lambda e: -e[2])[:top]
    return {"cuda_us_per_forward": total,
            "kinds_us": {k: round(v, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [{"kernel": n[:160], "kind": kind_of(n), "calls_per_forward": c / runs, "us_per_forward": us / runs,
                     "share": us / runs / total if total else 0.0} for n, c, us in rows]}


def markdown(report: dict) -> str:
    lines = [f"# Kernel time of one prefill forward: {report['config']}, {report['layers']} layers, {report['tokens']} "
             f"tokens, fp16", "", f"{report['env']}", ""]
    backends = list(report["backends"])
    kinds = sorted({k for b in backends for k in report["backends"][b].get("kinds_us", {})})
    lines += ["| kind | " + " | ".join(f"{b} us" for b in backends) + " |", "|---|" + "---:|" * len(backends)]
    for k in kinds:
        lines.append(f"| {k} | " + " | ".join(f"{report['backends'][b].get('kinds_us', {}).get(k, 0.0):.0f}"
                                              for b in backends) + " |")
    lines.append("| **all kernels** | " + " | ".join(f"{report['backends'][b].get('cuda_us_per_forward', 0):.0f}"
                                                    for b in backends) + " |")
    lines.append("| wall, eager forward (ms) | " + " | ".join(f"{report['backends'][b].get('wall_ms', 0):.2f}"
                                                            for b in backends) + " |")
    for b in backends:
        info = report["backends"][b]
        lines += ["", f"## {b}", ""]
        if "error" in info:
            lines.append(f"error: {info['error']}")
            continue
        lines += ["| kernel | kind | calls | us | share |", "|---|---|---:|---:|---:|"]
        for t in info["top"]:
            lines.append(f"| `{t['kernel'][:90]}` | {t['kind']} | {t['calls_per_forward']:.0f} | "
                         f"{t['us_per_forward']:.0f} | {t['share']:.1%} |")
    return "\n".join(lines) + "\n"


def profile_model(model, ids, warmup: int, runs: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(warmup):
            model(input_ids=ids, use_cache=False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(runs):
                model(input_ids=ids, use_cache=False)
            torch.cuda.synchronize()
    return {**summarize(kernel_events(prof.key_averages()), runs), "wall_ms": wall_ms}


def kernel_events(averages) -> list[tuple[str, int, float]]:
    """(name, calls, microseconds) of the GPU-side events (kernels, memcpy/memset) only: the CPU-side operator
    events carry their kernels' time too and would count it twice."""
    from torch.autograd import DeviceType

    out = []
    for e in averages:
        if getattr(e, "device_type", None) != DeviceType.CUDA:
            continue
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0.0)
        if us:
            out.append((e.key, int(e.count), float(us)))
    return out


def build(backend: str, reference, dtype):
    from runtime.gpu24 import sparsify_gpu

    from .source import clone

    model = clone(reference, "cuda", dtype)
    stores = {"gpu24": "auto", "gpu24-cslt": "cusparselt", "gpu24-triton": "triton"}
    if backend in stores:
        sparsify_gpu(model, store=stores[backend])
    elif backend == "cusparselt":
        from torch.sparse import SparseSemiStructuredTensorCUSPARSELT as C

        from rose.arch import all_sublayers

        for m in all_sublayers(model).values():
            m.weight = torch.nn.Parameter(C.from_dense(m.weight.data.contiguous()), requires_grad=False)
    elif backend != "torch-cuda":
        raise ValueError(backend)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="llama-2-7b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--backends", default="torch-cuda,gpu24")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    allowed = ("cusparselt", "gpu24", "gpu24-cslt", "gpu24-triton", "torch-cuda")
    try:
        names = parse_list(args.backends, "--backends", choices=allowed, what="backend")
    except RoseError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    if args.layers < 1 or args.tokens < 1 or args.runs < 1:
        print("Error: --layers, --tokens and --runs must be >= 1", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("Error: the profile needs CUDA, and this machine has none", file=sys.stderr)
        return 2
    from .presets import preset
    from .source import _random_24

    preset(args.config)
    reference = _random_24(args.config, args.layers, args.seed, "cuda")
    ids = torch.randint(0, reference.config.vocab_size, (1, args.tokens), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(args.seed))
    props = torch.cuda.get_device_properties(0)
    report = {"config": args.config, "layers": args.layers, "tokens": args.tokens, "backends": {},
              "env": f"{props.name}, torch {torch.__version__}, CUDA {torch.version.cuda}, cuSPARSELt "
                     f"{torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None}"}
    for name in names:
        try:
            model = build(name, reference, torch.float16)
            report["backends"][name] = profile_model(model, ids, args.warmup, args.runs)
            del model
        except Exception as exc:  # noqa: BLE001 - one backend failing must not hide the others
            report["backends"][name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.json").write_text(json.dumps(report, indent=1) + "\n")
    md = markdown(report)
    (args.out / "profile.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
