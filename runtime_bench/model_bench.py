"""The end-to-end benchmark: prefill, time to first token and greedy decoding with the KV cache, each backend's
logits gated against the dense fp32 model of the same weights, then timed interleaved.
"""
from __future__ import annotations

from typing import Any

import torch

from .cases import (DTYPES, GATE_TOKENS, GREEDY_STEPS, MODEL_TOL, Settings, add_ratios, bandwidths, document,
                    one_line, prompt_ids, record, rel_error, split_available)
from .memory import cuda_peak, peak_rss
from .registry import Backend, Unsupported
from .report import environment
from .source import ModelSource
from .timing import Timed, interleaved


def run_model(source: ModelSource, prompt_lens: list[int], batches: list[int], decode_tokens: int,
              dtypes: list[str], backends: list[Backend], settings: Settings) -> dict[str, Any]:
    from .torch_backends import TorchRunner

    usable, skipped = split_available(backends)
    env = environment(settings.threads, copy=bandwidths(usable))
    gate_ids = prompt_ids(1, GATE_TOKENS, source.vocab, settings.seed)
    dense = TorchRunner(source.dense_fp32(), "cpu")
    reference = dense.logits(gate_ids)
    greedy_ref = dense.decode(dense.start(gate_ids), GREEDY_STEPS)
    grid = [(b, p) for b in batches for p in prompt_lens]
    records: list[dict[str, Any]] = []
    for dname in dtypes:
        dtype, tol = DTYPES[dname], MODEL_TOL[dname]
        base = {"case": "model", "model": source.label, "dtype": dname, "decode_tokens": decode_tokens,
                "tolerance": tol}
        runners, gated = {}, {}
        for b in usable:
            try:
                runner = b.model(source, dtype, settings.threads)
                err = rel_error(runner.logits(gate_ids), reference)
                same = bool(torch.equal(runner.decode(runner.start(gate_ids), GREEDY_STEPS).cpu(), greedy_ref))
            except Unsupported as exc:
                records += [record(b, env, {**base, "batch": n, "tokens": p}, "skipped", reason=str(exc))
                            for n, p in grid]
                continue
            except Exception as exc:
                records += [record(b, env, {**base, "batch": n, "tokens": p}, "error", message=one_line(exc))
                            for n, p in grid]
                continue
            gated[b.name] = (err, same)
            if err > tol:
                records += [record(b, env, {**base, "batch": n, "tokens": p}, "wrong", error=err) for n, p in grid]
            else:
                runners[b.name] = (b, runner)
        for n, p in grid:
            records += _model_case(runners, gated, env, {**base, "batch": n, "tokens": p}, source, settings)
        if settings.rss:
            _attach_model_rss(records, runners, source, dname, max(batches), max(prompt_lens), decode_tokens,
                              settings)
        del runners
    add_ratios(records, ("dtype", "batch", "tokens"),
               {"prefill_ms": True, "ttft_ms": True, "decode_tokens_per_s": False})
    return document("model", backends, skipped, env, settings, records, source=source.label,
                     formats_bytes=source.formats_bytes())


def _model_case(runners: dict, gated: dict, env: dict, base: dict, source: ModelSource, settings: Settings
                ) -> list[dict[str, Any]]:
    ids = prompt_ids(base["batch"], base["tokens"], source.vocab, settings.seed)
    steps = base["decode_tokens"]
    sets = {
        "prefill": {n: Timed(run=lambda _, r=r: r.prefill(ids), cuda=r.cuda) for n, (_, r) in runners.items()},
        "ttft": {n: Timed(run=lambda _, r=r: r.first_token(ids), cuda=r.cuda) for n, (_, r) in runners.items()},
        "decode": {n: Timed(setup=lambda r=r: r.start(ids), run=lambda s, r=r: r.decode(s, steps), cuda=r.cuda)
                   for n, (_, r) in runners.items()},
    }
    out = {n: record(b, env, base, "ok", error=gated[n][0], greedy_same_as_dense=gated[n][1],
                      weight_bytes=r.weight_bytes,
                      **({"linear_weight_bytes": r.linear_bytes} if getattr(r, "linear_bytes", None) else {}),
                      **({"weight_file_bytes": r.file_bytes} if r.file_bytes else {}))
           for n, (b, r) in runners.items()}
    for metric, contenders in sets.items():
        for name, stats in interleaved(contenders, settings.warmup, settings.iters).items():
            out[name].update({f"{metric}_ms": stats["median_ms"], f"{metric}_iqr_ms": stats["iqr_ms"],
                              f"{metric}_times_ms": stats["times_ms"]})
            if metric == "prefill":
                out[name].update({"median_ms": stats["median_ms"], "iqr_ms": stats["iqr_ms"], "runs": stats["runs"]})
    for name, (b, r) in runners.items():
        rec = out[name]
        rec["decode_tokens_per_s"] = base["batch"] * steps / (rec["decode_ms"] / 1e3)
        if r.cuda:
            rec.update(cuda_peak(lambda r=r: r.decode(r.start(ids), steps)))
    return list(out.values())


def _attach_model_rss(records: list, runners: dict, source: ModelSource, dname: str, batch: int, prompt: int,
                      steps: int, settings: Settings) -> None:
    for name, (b, _) in runners.items():
        if b.device != "cpu":
            continue
        spec = {"kind": "model", "backend": name, "source": source.spec(), "dtype": dname, "batch": batch,
                "prompt_len": prompt, "decode_tokens": steps, "seed": settings.seed, "threads": settings.threads}
        rss = {**peak_rss(spec), "rss_batch": batch, "rss_tokens": prompt}
        for r in records:
            if r["backend"] == name and r["dtype"] == dname and r["status"] == "ok":
                r.update(rss)
