"""Decode speed of onnxruntime-genai model directories, timed against each other in one process: a 128-token
prompt, then 64 greedy tokens, repeat by repeat in turn (the first repeat is a warm-up). For directories that
`runtime_bench`'s backends do not know, e.g. onnxruntime-genai's own builder output:

    python -m onnxruntime_genai.models.builder -i out/smollm2-rose-2of4-bench/hf -o /tmp/gb/dense -p fp32 -e cpu
    python scripts/genai_ab.py /tmp/gb/dense out/smollm2-rose-2of4-bench/onnx-sparse24 out/smollm2-rose-2of4-bench/onnx

genai's pools spin between calls (it has no option to stop them), which slows every directory a little when they
take turns; compare the directories of one run only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime_genai as og


def decode(model, prompt: list[int], tokens: int) -> tuple[float, list[int]]:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    gen.generate_next_token()  # the first token ends the prefill; decode is timed from here
    out = [int(gen.get_next_tokens()[0])]
    t0 = time.perf_counter()
    for _ in range(tokens - 1):
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return (tokens - 1) / (time.perf_counter() - t0), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    models = {d: og.Model(d) for d in args.dirs}
    prompt = [int(t) for t in np.random.default_rng(0).integers(100, 40000, args.prompt)]
    speeds: dict[str, list[float]] = {d: [] for d in args.dirs}
    tokens: dict[str, list[int]] = {}
    for rep in range(args.reps):
        for d, m in models.items():
            speed, tokens[d] = decode(m, prompt, args.tokens)
            if rep:
                speeds[d].append(speed)
    first = args.dirs[0]
    rows = [{"dir": d, "decode_tok_s": round(statistics.median(v), 1), "min": round(min(v), 1),
             "max": round(max(v), 1), "vs_first": round(statistics.median(v) / statistics.median(speeds[first]), 3),
             "tokens_equal_first": tokens[d] == tokens[first]} for d, v in speeds.items()]
    for r in rows:
        print(f"{r['dir']}: decode {r['decode_tok_s']} tok/s (min {r['min']}, max {r['max']}) = {r['vs_first']}x "
              f"the first; greedy tokens equal the first's: {r['tokens_equal_first']}")
    print(json.dumps({"prompt": args.prompt, "tokens": args.tokens, "reps": args.reps - 1, "rows": rows}))


if __name__ == "__main__":
    main()
