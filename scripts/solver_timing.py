"""Pruning cost of SparseGPT, ROSE and `--order best`, measured side by side in one process.

Calibration statistics are collected once from the dense model (every decoder layer, dense inputs), then each
method solves every sublayer, the methods interleaved per sublayer so that machine load hits them alike.
Reports seconds per method and pattern and the ratio to SparseGPT, and the time of the statistics pass that
every method shares (a full pruning run makes it twice per layer: collect, then propagate the pruned outputs).
With --whole-runs, it also times complete sequential pruning runs (`prune_model` on a fresh copy of the model,
SparseGPT, ROSE, `--order best` and, with the refit, SparseGPT and `--order best` back to back per pattern): these
include the forward passes, for `--order best` the decoder-layer guard's extra ones, and for `--refit` its
training steps and the forward that measures the refitted layer (`--refit-steps`, `--refit-lr` as in the CLI;
the refit's cost is per step, so its share depends on --nsamples: time it with the quality runs' 64).
Usage:
    python scripts/solver_timing.py --calib ../shared/data/wikitext2/valid.tokens.txt --out timing.json
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from rose.arch import decoder_layers, get_weight, linear_sublayers
from rose.calibrate import capture_inputs, collect_stats, prune_model
from rose.config import PruneConfig, Sparsity, versions
from rose.data import calibration_windows
from rose.methods import prune_weight
from rose.models import load_model
from rose.offload import calibration_mode

VARIANTS = {"magnitude": dict(method="magnitude"), "wanda": dict(method="wanda"),
            "sparsegpt": dict(method="sparsegpt"), "rose": dict(method="rose"),
            "rose --order best": dict(method="rose", order="best")}
WHOLE = {"sparsegpt": dict(method="sparsegpt"), "rose": dict(method="rose"),
         "rose --order best": dict(method="rose", order="best"),
         "sparsegpt --refit": dict(method="sparsegpt", refit=True),
         "rose --order best --refit": dict(method="rose", order="best", refit=True),
         "sparsegpt --permute": dict(method="sparsegpt", permute=True),
         "sparsegpt --refit --permute": dict(method="sparsegpt", refit=True, permute=True)}


def collect(model, calib):
    """(name, W, stats) for every sublayer, statistics taken on dense inputs."""
    out = []
    with calibration_mode(model):
        inputs, kwargs = capture_inputs(model, calib, "cpu")
        for idx, layer in enumerate(decoder_layers(model)):
            subs = linear_sublayers(model, layer)
            stats, inputs = collect_stats(layer, subs, inputs, kwargs, "cpu")
            out += [(f"{idx}.{n}", get_weight(m).float().clone(), stats[n]) for n, m in subs.items()]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--patterns", default="0.5,0.7,4:8,2:4")
    ap.add_argument("--out", required=True)
    ap.add_argument("--whole-runs", action="store_true", help="also time complete pruning runs per method")
    ap.add_argument("--whole-variants", default=",".join(WHOLE),
                    help=f"which whole runs, comma-separated (sparsegpt first): {', '.join(WHOLE)}")
    ap.add_argument("--refit-steps", type=int, default=PruneConfig.default("refit_steps"))
    ap.add_argument("--refit-lr", type=float, default=PruneConfig.default("refit_lr"))
    args = ap.parse_args()
    model, tok = load_model(args.model)
    calib = calibration_windows(tok, args.calib, args.nsamples, args.seqlen, 0)
    t0 = time.perf_counter()
    subs = collect(model, calib)
    collect_s = time.perf_counter() - t0
    rows = []
    for pattern in args.patterns.split(","):
        seconds = {v: 0.0 for v in VARIANTS}
        for _, W, st in subs:
            for v, kw in VARIANTS.items():
                cfg = PruneConfig(sparsity=Sparsity.parse(pattern), **kw)
                t0 = time.perf_counter()
                prune_weight(W, st, cfg)
                seconds[v] += time.perf_counter() - t0
        for v, s in seconds.items():
            rows.append({"pattern": pattern, "variant": v, "seconds": round(s, 2),
                         "vs_sparsegpt": round(s / seconds["sparsegpt"], 2)})
    whole = []
    if args.whole_runs:
        for pattern in args.patterns.split(","):
            seconds, cpu = {}, {}
            for v in args.whole_variants.split(","):
                m = copy.deepcopy(model)
                cfg = PruneConfig(sparsity=Sparsity.parse(pattern), nsamples=args.nsamples, seqlen=args.seqlen,
                                  refit_steps=args.refit_steps, refit_lr=args.refit_lr, **WHOLE[v])
                t0, c0 = time.perf_counter(), time.process_time()
                prune_model(m, calib, cfg, progress=False)
                seconds[v], cpu[v] = time.perf_counter() - t0, time.process_time() - c0
                del m
                print(f"whole run {pattern} {v}: {seconds[v]:.1f} s ({cpu[v]:.1f} s CPU)", flush=True)
            whole += [{"pattern": pattern, "variant": v, "seconds": round(t, 2), "cpu_seconds": round(cpu[v], 2),
                       "vs_sparsegpt": round(t / seconds["sparsegpt"], 2),
                       "cpu_vs_sparsegpt": round(cpu[v] / cpu["sparsegpt"], 2)} for v, t in seconds.items()]
    result = {"model": args.model, "sublayers": len(subs), "threads": torch.get_num_threads(),
              "refit": {"steps": args.refit_steps, "lr": args.refit_lr},
              "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen,
                              "statistics_pass_seconds": round(collect_s, 2)},
              "versions": versions(), "rows": rows, **({"whole_runs": whole} if whole else {})}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"statistics pass (one forward of every layer with hooks, {args.nsamples} x {args.seqlen} tokens): "
          f"{collect_s:.1f} s")
    print("| pattern | variant | solver seconds (all sublayers) | vs SparseGPT |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['pattern']} | {r['variant']} | {r['seconds']:.1f} | {r['vs_sparsegpt']:.2f}x |")
    if whole:
        print("\n| pattern | variant | whole pruning run seconds | vs SparseGPT | CPU seconds | vs SparseGPT |\n"
              "|---|---|---|---|---|---|")
        for r in whole:
            print(f"| {r['pattern']} | {r['variant']} | {r['seconds']:.1f} | {r['vs_sparsegpt']:.2f}x | "
                  f"{r['cpu_seconds']:.1f} | {r['cpu_vs_sparsegpt']:.2f}x |")


if __name__ == "__main__":
    main()
