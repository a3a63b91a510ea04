#!/usr/bin/env python3
"""GPU check of rose's Triton 2:4 decode kernel (`runtime/triton24.py`): correctness and timing on CUDA.

One command from the repository root (it needs torch with CUDA, triton, and this checkout; nothing else):

    python3 scripts/gpu_triton24.py --out "$OUT"            # about 2-4 minutes on an H200
    python3 scripts/gpu_triton24.py --out "$OUT" --sweep    # also time other configs (adds 1-3 minutes)
    python3 scripts/gpu_triton24.py --dry-run --out /tmp/d  # the CPU check that CI runs (Triton's interpreter)

What it does, in order (`--budget` seconds caps the optional sweep; the rest always runs):
1. Device facts and the measured device-to-device copy bandwidth (1 GiB copied, bytes read + written, median).
2. For each dtype and LLaMA-2-7B / LLaMA-3-8B linear shape (rows x cols of W): a random 2:4 weight (magnitude
   pruned), packed on the CPU and moved; for each token count, y = linear(x, packed) (poisoned output first)
   against x W^T in fp32 from the same rounded values (TF32 off), and against cuBLAS `F.linear`; with a bias at
   the first count.
3. Timing of `F.linear` dense (cuBLAS), the Triton kernel (default config; at 1 token the FMA variant too),
   cuSPARSELt through `to_sparse_semi_structured` (`_FORCE_CUTLASS = False`) and raw `torch._cslt_sparse_mm` (x
   padded to the subclass's minimum rows outside the timed region, default algorithm): each op is captured in a
   CUDA graph over enough weight copies to exceed the L2 several times (a decode step reads weights that are not
   in cache), replayed after warm-up; the median replay over the calls gives microseconds per call.
4. Speedups over dense and cuSPARSELt, achieved bandwidth at 1 token (packed bytes + x + y over time) as a
   share of the copy bandwidth, the crossover token count (the first count at which the better cuSPARSELt path
   beats the kernel; "none" if it never does up to 16), and the issue's targets: >= 1.4x dense at 1 token,
   >= 1.2x at 8, never slower than cuSPARSELt below the crossover.
5. `--sweep`: fp16, tokens 1, 8 and 16: other block sizes, warps, stages and K splits, each timed the same way;
   the best per case is reported next to the default (to revise `pick_config`).

Outputs under --out: `triton24.json` (everything) and `triton24.md` (the tables); the markdown is printed last.
Exit status: 0 when every correctness check passed (timing targets are reported, not enforced), 1 otherwise,
2 for bad arguments. Expected format (placeholder numbers):

    | dtype | shape (out x in) | tokens | dense us | triton us | cslt us | cslt raw us | x dense | x cslt | config |
    |---|---|---|---|---|---|---|---|---|---|
    | fp16 | 4096x4096 | 1 | 9.1 | 5.9 | 11.0 | 12.3 | 1.54 | 1.86 | dot m16 n64 k128 split8 w4 s2 |

    | dtype | shape | 1-token GB/s | share of copy | crossover vs cuSPARSELt | 1.4x dense @1 | 1.2x dense @8 | never
    slower than cuSPARSELt below crossover |   (one line in the file)
    |---|---|---|---|---|---|---|---|
    | fp16 | 4096x4096 | 3210 | 0.75 | none | yes | yes | yes |

and `triton24.json`: {"env": {...}, "copy_gbps": 4300.0, "cases": [{"dtype", "shape", "tokens", "check":
{"rel_err", "max_err_ulps", "vs_cublas_rel", "finite", "ok"}, "us": {"dense", "triton", "triton_fma", "cslt",
"cslt_raw"}, "config"}], "summary": [{"dtype", "shape", "gbps_1", "copy_share_1", "crossover", "targets": {...}}],
"sweep": [{"dtype", "shape", "tokens", "default_us", "best_us", "best_config", "all": {...}}], "ok": true}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHAPES = ["4096x4096", "11008x4096", "4096x11008", "1024x4096", "14336x4096", "4096x14336"]  # W: out x in
TOKENS = [1, 2, 4, 8, 16]
DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
DRY_SCALE = 64            # --dry-run divides each shape by this (the interpreter is slow)
L2_MULTIPLE = 4           # weight copies per timed op: at least this many L2 sizes of packed bytes
TOL = {"fp16": 2e-3, "bf16": 1e-2}   # ||y - ref|| / ||ref||; rounding the output alone gives ~3e-4 / 2e-3


class ArgError(Exception):
    """A bad command line: one line, exit status 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "out/triton24"), help="output folder (default $OUT)")
    p.add_argument("--shapes", default=",".join(SHAPES), help="weights as OUTxIN, comma-separated")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="rows of x, 1 to 16, comma-separated")
    p.add_argument("--dtypes", default="fp16,bf16", help="fp16 and/or bf16")
    p.add_argument("--replays", type=int, default=20, help="timed graph replays per op (median)")
    p.add_argument("--sweep", action="store_true", help="also time other configs (fp16, 1/8/16 tokens)")
    p.add_argument("--budget", type=float, default=180.0, help="seconds the sweep may take at most")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU only: Triton's interpreter on shapes divided by 64; everything but CUDA timing")
    a = p.parse_args(argv)
    try:
        a.shape_list = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes.split(",") if s.strip()]
    except ValueError:
        raise ArgError(f"--shapes {a.shapes!r}: write each weight as OUTxIN, e.g. 4096x11008") from None
    if not a.shape_list or any(len(s) != 2 or min(s) <= 0 or s[1] % 4 for s in a.shape_list):
        raise ArgError(f"--shapes {a.shapes!r}: each must be OUTxIN with IN a multiple of 4")
    try:
        a.token_list = sorted({int(t) for t in a.tokens.split(",") if t.strip()})
    except ValueError:
        raise ArgError(f"--tokens {a.tokens!r}: integers from 1 to 16, comma-separated") from None
    if not a.token_list or a.token_list[0] < 1 or a.token_list[-1] > 16:
        raise ArgError(f"--tokens {a.tokens!r}: the kernel takes 1 to 16 rows")
    a.dtype_list = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    if not a.dtype_list or any(d not in DTYPES for d in a.dtype_list):
        raise ArgError(f"--dtypes {a.dtypes!r}: choose from {', '.join(DTYPES)}")
    if a.replays < 3:
        raise ArgError("--replays must be at least 3")
    return a


# ---- weights and checks --------------------------------------------------------------------------------------

def random_24(rows: int, cols: int, dtype, device, seed: int):
    """A random 2:4 weight: N(0, 1/cols), the two largest of each four kept (so no ties with zero)."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    W = torch.randn(rows, cols // 4, 4, generator=g, device=device) / math.sqrt(cols)
    keep = torch.zeros_like(W, dtype=torch.bool).scatter_(2, W.abs().topk(2, dim=2).indices, True)
    return torch.where(keep, W, torch.zeros((), device=device)).reshape(rows, cols).to(dtype)  # +0.0, not -0.0


def check(y, x, W, bias, dtype_name: str, cublas=None) -> dict:
    """y against x W^T (+ b) in fp32 from the same rounded values; errors relative to the reference's norm."""
    import torch

    ref = x.float() @ W.float().T
    if bias is not None:
        ref += bias.float()
    yf = y.float()
    finite = bool(torch.isfinite(yf).all())
    rel = float((yf - ref).norm() / ref.norm().clamp_min(1e-30))
    ulp = torch.finfo(y.dtype).eps * ref.abs().clamp_min(torch.finfo(y.dtype).tiny)
    max_ulps = float(((yf - ref).abs() / ulp).max())
    out = {"rel_err": rel, "max_err_ulps": max_ulps, "finite": finite,
           "ok": finite and rel < TOL[dtype_name]}
    if cublas is not None:
        out["vs_cublas_rel"] = float((yf - cublas.float()).norm() / cublas.float().norm().clamp_min(1e-30))
    return out


# ---- timing --------------------------------------------------------------------------------------------------

def time_calls(calls, replays: int) -> tuple[float, str]:
    """Microseconds per call: the calls captured back to back in one CUDA graph, median of timed replays (eager
    with CUDA events if capture fails)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: compiles, plans, allocator pools
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    mode = "graph"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for c in calls:
                c()
        run = graph.replay
    except Exception:  # noqa: BLE001 - some ops refuse capture; time them eagerly instead
        torch.cuda.synchronize()
        mode = "eager"

        def run():
            for c in calls:
                c()
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / len(calls))
    return statistics.median(times), mode


def copy_bandwidth(replays: int) -> float:
    """GB/s of a plain device-to-device copy of 1 GiB (bytes read plus bytes written), median."""
    import torch

    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    us, _ = time_calls([lambda: dst.copy_(src)], replays)
    return 2 * n / (us * 1e-6) / 1e9


def device_env(dry: bool) -> dict:
    import torch

    env = {"torch": torch.__version__, "python": sys.version.split()[0], "dry_run": dry}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if not dry:
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, sms=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1),
                   l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or 64.0, cuda=torch.version.cuda,
                   cusparselt=bool(torch.backends.cusparselt.is_available()),
                   cusparselt_version=(torch.backends.cusparselt.version()
                                       if torch.backends.cusparselt.is_available() else None))
    return env


# ---- one shape -----------------------------------------------------------------------------------------------

def cslt_min_rows(dtype) -> int:
    try:
        from torch.sparse import SparseSemiStructuredTensorCUSPARSELT as C

        return C._DTYPE_SHAPE_CONSTRAINTS[dtype].dense_min_rows
    except Exception:  # noqa: BLE001 - an older/newer torch: cuSPARSELt takes multiples of 16 rows anyway
        return 16


def run_shape(args, dname: str, shape: tuple[int, int], env: dict, seed: int, log) -> tuple[list, dict]:
    import torch
    import torch.nn.functional as F

    from runtime import triton24 as t24

    dtype = getattr(torch, DTYPES[dname])
    rows, cols = shape
    dev = "cpu" if args.dry_run else "cuda"
    W = random_24(rows, cols, dtype, dev, seed)
    t0 = time.time()
    packed = t24.pack_dense(W)                        # packed where W is (on the GPU: a second for 7B shapes)
    pack_s = time.time() - t0
    # the round trip through the kernel's expansion (runtime.triton24.expand: what store="triton" prefill runs)
    assert torch.equal(t24.expand(packed).view(torch.int16), W.view(torch.int16)), "round trip"
    gen = torch.Generator(device=dev).manual_seed(seed + 1)
    cases = []
    for i, m in enumerate(args.token_list):
        x = torch.randn(m, cols, generator=gen, device=dev).to(dtype)
        bias = torch.randn(rows, generator=gen, device=dev).to(dtype) if i == 0 else None
        out = torch.full((m, rows), float("nan"), dtype=dtype, device=dev)   # poisoned: every element written?
        y = t24.linear(x, packed, bias, out=out)
        cublas = None if args.dry_run else F.linear(x, W, bias)
        chk = check(y, x, W, bias, dname, cublas)
        chk["bias"] = bias is not None
        if m == 1:  # the FMA variant, checked where it may run
            fma = t24.Config(False, 1, 16, min(512, max(64, t24._pow2(cols))), 1)
            chk["fma_rel_err"] = check(t24.linear(x, packed, bias, config=fma), x, W, bias, dname)["rel_err"]
            chk["ok"] = chk["ok"] and chk["fma_rel_err"] < TOL[dname]
        config = t24.pick_config(m, rows, cols, env.get("sms", t24.DEFAULT_SMS))
        cases.append({"dtype": dname, "shape": f"{rows}x{cols}", "tokens": m, "check": chk,
                      "config": config.name(), "us": {}, "timing": {}})
        log(f"{dname} {rows}x{cols} m={m}: rel err {chk['rel_err']:.2e} ({'ok' if chk['ok'] else 'FAILED'})")
    info = {"pack_seconds": round(pack_s, 2), "packed_bytes": packed.nbytes,
            "dense_bytes": W.numel() * W.element_size()}
    if args.dry_run:
        return cases, info

    # timing: enough copies of every weight that one graph replay streams several L2 sizes from memory
    l2 = max(env.get("l2_mib", 50), 1) * 2**20
    copies = max(2, min(64, math.ceil(L2_MULTIPLE * l2 / packed.nbytes)))
    info["copies"] = copies
    n_calls = max(copies, 32)
    dense = [W] + [W.clone() for _ in range(copies - 1)]
    packs = [packed] + [t24.Packed(packed.values.clone(), packed.masks.clone(), packed.locks.clone(), rows, cols)
                        for _ in range(copies - 1)]
    cslt, cslt_raw = None, None
    if env.get("cusparselt"):
        try:
            from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

            SparseSemiStructuredTensor._FORCE_CUTLASS = False
            cslt = [to_sparse_semi_structured(w) for w in dense]
        except Exception as exc:  # noqa: BLE001 - report, keep going
            info["cslt_error"] = str(exc).splitlines()[0][:200]
        if hasattr(torch, "_cslt_compress") and hasattr(torch, "_cslt_sparse_mm"):
            try:
                cslt_raw = [torch._cslt_compress(w) for w in dense]
            except Exception as exc:  # noqa: BLE001
                info["cslt_raw_error"] = str(exc).splitlines()[0][:200]
    pad = cslt_min_rows(dtype)
    for case in cases:
        m = case["tokens"]
        x = torch.randn(m, cols, device="cuda").to(dtype)
        xp = torch.zeros(-(-m // pad) * pad, cols, dtype=dtype, device="cuda")
        xp[:m] = x
        ops = {"dense": [lambda i=i: F.linear(x, dense[i % copies]) for i in range(n_calls)],
               "triton": [lambda i=i: t24.linear(x, packs[i % copies]) for i in range(n_calls)]}
        if m == 1:
            fma = t24.Config(False, 1, 16, 512, t24.split_for(rows, cols, 16, 512, env["sms"]))
            ops["triton_fma"] = [lambda i=i: t24.linear(x, packs[i % copies], config=fma) for i in range(n_calls)]
        if cslt is not None:
            ops["cslt"] = [lambda i=i: F.linear(x, cslt[i % copies]) for i in range(n_calls)]
        if cslt_raw is not None:
            ops["cslt_raw"] = [lambda i=i: torch._cslt_sparse_mm(cslt_raw[i % copies], xp.t())
                               for i in range(n_calls)]
        for name, calls in ops.items():
            try:
                case["us"][name], case["timing"][name] = time_calls(calls, args.replays)
            except Exception as exc:  # noqa: BLE001 - one backend failing must not hide the others
                case["us"][name], case["timing"][name] = None, f"failed: {str(exc).splitlines()[0][:160]}"
        us = case["us"]
        log(f"  timed {dname} {rows}x{cols} m={m}: " + ", ".join(f"{k} {v:.1f}us" if v else f"{k} -"
                                                                for k, v in us.items()))
    del dense, packs, cslt, cslt_raw
    torch.cuda.empty_cache()
    return cases, info


def sweep_configs(rows: int, cols: int, m: int, sms: int):
    """Alternatives to the default: block sizes, warps, stages, K splits (and the FMA variant at 1 token)."""
    from runtime import triton24 as t24

    out = []
    for bn, bk, warps, stages in [(32, 128, 4, 2), (64, 128, 4, 2), (64, 128, 4, 3), (128, 128, 8, 2),
                                  (64, 256, 4, 2), (64, 256, 8, 2), (128, 64, 4, 3), (32, 256, 4, 3),
                                  (128, 256, 8, 2)]:
        for per_sm in (2, 4, 8):
            out.append(t24.Config(True, 16, bn, bk, t24.split_for(rows, cols, bn, bk, sms, per_sm), warps, stages))
    if m == 1:
        for bn, bk in [(16, 512), (32, 256), (16, 256), (8, 512)]:
            for per_sm in (4, 8):
                out.append(t24.Config(False, 1, bn, bk, t24.split_for(rows, cols, bn, bk, sms, per_sm), 4, 2))
    return list(dict.fromkeys(out))


def run_sweep(args, env, log, deadline: float) -> list:
    import torch

    from runtime import triton24 as t24

    results = []
    for rows, cols in args.shape_list:
        W = random_24(rows, cols, torch.float16, "cuda", 7)
        packed = t24.pack_dense(W)
        l2 = max(env.get("l2_mib", 50), 1) * 2**20
        copies = max(2, min(64, math.ceil(L2_MULTIPLE * l2 / packed.nbytes)))
        packs = [packed] + [t24.Packed(packed.values.clone(), packed.masks.clone(), packed.locks.clone(), rows, cols)
                            for _ in range(copies - 1)]
        for m in (1, 8, 16):
            if time.time() > deadline:
                log("sweep: out of --budget, stopping")
                return results
            x = torch.randn(m, cols, device="cuda").half()
            ref = x.float() @ W.float().T
            default = t24.pick_config(m, rows, cols, env["sms"])
            timings = {}
            for cfg in [default] + [c for c in sweep_configs(rows, cols, m, env["sms"]) if c != default]:
                if time.time() > deadline:
                    break
                try:
                    y = t24.linear(x, packed, config=cfg)
                    if float((y.float() - ref).norm() / ref.norm()) > TOL["fp16"]:
                        timings[cfg.name()] = "wrong result"
                        continue
                    us, _ = time_calls([lambda i=i: t24.linear(x, packs[i % copies], config=cfg)
                                        for i in range(max(copies, 32))], args.replays)
                    timings[cfg.name()] = us
                except Exception as exc:  # noqa: BLE001 - a config that fails to compile is a finding too
                    timings[cfg.name()] = f"failed: {str(exc).splitlines()[0][:120]}"
            timed = {k: v for k, v in timings.items() if isinstance(v, float)}
            best = min(timed, key=timed.get) if timed else None
            results.append({"dtype": "fp16", "shape": f"{rows}x{cols}", "tokens": m,
                            "default_config": default.name(), "default_us": timed.get(default.name()),
                            "best_config": best, "best_us": timed.get(best), "all": timings})
            log(f"sweep {rows}x{cols} m={m}: default {timed.get(default.name())} us, best {best} "
                f"{timed.get(best)} us")
        del packs
        torch.cuda.empty_cache()
    return results


# ---- summary and report --------------------------------------------------------------------------------------

def summarize(cases: list, copy_gbps: float | None, infos: dict) -> list:
    out = []
    for key in dict.fromkeys((c["dtype"], c["shape"]) for c in cases):
        mine = sorted((c for c in cases if (c["dtype"], c["shape"]) == key), key=lambda c: c["tokens"])
        by_m = {c["tokens"]: c["us"] for c in mine}
        info = infos.get(key, {})
        s = {"dtype": key[0], "shape": key[1], "gbps_1": None, "copy_share_1": None, "crossover": None,
             "targets": {}}
        rows, cols = (int(v) for v in key[1].split("x"))
        elem = 2
        if 1 in by_m and by_m[1].get("triton"):
            moved = info.get("packed_bytes", 0) + cols * elem + rows * elem
            s["gbps_1"] = moved / (by_m[1]["triton"] * 1e-6) / 1e9
            if copy_gbps:
                s["copy_share_1"] = s["gbps_1"] / copy_gbps

        def cslt_best(us):
            vals = [v for k, v in us.items() if k.startswith("cslt") and v]
            return min(vals) if vals else None

        timed = [(m, us) for m, us in sorted(by_m.items()) if us.get("triton")]
        if timed and any(cslt_best(us) for _, us in timed):
            slower = [m for m, us in timed if cslt_best(us) and cslt_best(us) < us["triton"]]
            s["crossover"] = slower[0] if slower else "none"
            below = [us for m, us in timed if not slower or m < slower[0]]
            s["targets"]["never_slower_than_cslt_below_crossover"] = all(
                cslt_best(us) is None or us["triton"] <= cslt_best(us) for us in below)
            s["targets"]["faster_than_cslt_at_every_count"] = not slower
        for m, need in ((1, 1.4), (8, 1.2)):
            us = by_m.get(m, {})
            if us.get("triton") and us.get("dense"):
                s["targets"][f"{need}x_dense_at_{m}"] = us["dense"] / us["triton"] >= need
        out.append(s)
    return out


def fmt(v, nd=1) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def markdown(report: dict) -> str:
    lines = [f"# Triton 2:4 decode kernel on {report['env'].get('device', 'the CPU (dry run)')}", "",
             f"torch {report['env']['torch']}, triton {report['env'].get('triton')}, copy bandwidth "
             f"{fmt(report.get('copy_gbps'), 0)} GB/s (read + write). Times: microseconds per call, CUDA graph "
             f"replay over weight copies that do not fit in L2, median.", "",
             "| dtype | shape (out x in) | tokens | rel err | dense us | triton us | triton fma us | cslt us | "
             "cslt raw us | x dense | x cslt | config |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in report["cases"]:
        us = c["us"]
        tri = us.get("triton")
        cs = [v for k, v in us.items() if k.startswith("cslt") and v]
        lines.append(f"| {c['dtype']} | {c['shape']} | {c['tokens']} | {c['check']['rel_err']:.1e}"
                     f"{'' if c['check']['ok'] else ' FAIL'} | {fmt(us.get('dense'))} | {fmt(tri)} | "
                     f"{fmt(us.get('triton_fma'))} | {fmt(us.get('cslt'))} | {fmt(us.get('cslt_raw'))} | "
                     f"{fmt(us['dense'] / tri, 2) if tri and us.get('dense') else '-'} | "
                     f"{fmt(min(cs) / tri, 2) if tri and cs else '-'} | {c['config']} |")
    lines += ["", "| dtype | shape | 1-token GB/s | share of copy | crossover vs cuSPARSELt | 1.4x dense @1 | "
              "1.2x dense @8 | never slower than cuSPARSELt below crossover |", "|---|---|---|---|---|---|---|---|"]
    for s in report["summary"]:
        t = s["targets"]
        lines.append(f"| {s['dtype']} | {s['shape']} | {fmt(s['gbps_1'], 0)} | {fmt(s['copy_share_1'], 2)} | "
                     f"{fmt(s['crossover'])} | {fmt(t.get('1.4x_dense_at_1'))} | {fmt(t.get('1.2x_dense_at_8'))} | "
                     f"{fmt(t.get('never_slower_than_cslt_below_crossover'))} |")
    if report.get("sweep"):
        lines += ["", "| shape | tokens | default us | best us | best config |", "|---|---|---|---|---|"]
        for r in report["sweep"]:
            lines.append(f"| {r['shape']} | {r['tokens']} | {fmt(r['default_us'])} | {fmt(r['best_us'])} | "
                         f"{r['best_config']} |")
    lines += ["", f"All correctness checks passed: {fmt(report['ok'])}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except ArgError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"   # Triton reads it when imported: before anything imports triton
    import torch

    from runtime.errors import RoseRuntimeError

    if not args.dry_run and not torch.cuda.is_available():
        print("Error: no CUDA device here; use --dry-run for the CPU check", file=sys.stderr)
        return 2
    if not args.dry_run:
        torch.backends.cuda.matmul.allow_tf32 = False   # the fp32 reference must be fp32
    if args.dry_run:
        args.shape_list = [(max(8, r // DRY_SCALE), max(64, c // DRY_SCALE) // 4 * 4) for r, c in args.shape_list]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:6.1f}s] {msg}", flush=True)

    env = device_env(args.dry_run)
    log(f"env: {env}")
    copy_gbps = None if args.dry_run else copy_bandwidth(args.replays)
    if copy_gbps:
        log(f"device-to-device copy: {copy_gbps:.0f} GB/s")
    cases, infos = [], {}
    try:
        for di, dname in enumerate(args.dtype_list):
            for si, shape in enumerate(args.shape_list):
                c, info = run_shape(args, dname, shape, env, 100 * di + si, log)
                cases += c
                infos[(dname, f"{shape[0]}x{shape[1]}")] = info
    except RoseRuntimeError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    report = {"env": env, "copy_gbps": copy_gbps, "cases": cases,
              "shapes": {f"{d} {s}": i for (d, s), i in infos.items()},
              "summary": summarize(cases, copy_gbps, infos), "sweep": [],
              "ok": all(c["check"]["ok"] for c in cases)}
    if args.sweep and not args.dry_run:
        report["sweep"] = run_sweep(args, env, log, time.time() + args.budget)
    report["seconds"] = round(time.time() - t_start, 1)
    (out / "triton24.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    md = markdown(report)
    (out / "triton24.md").write_text(md)
    print(md)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
