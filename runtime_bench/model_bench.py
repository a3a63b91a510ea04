"""The end-to-end benchmark: prefill, time to first token and greedy decoding with the KV cache, each backend's
logits gated against the dense fp32 model of the same weights, then timed interleaved.
"""
from __future__ import annotations

import sys
from typing import Any

import torch

from .cases import (DTYPES, GATE_TOKENS, GREEDY_STEPS, MODEL_TOL, Settings, add_ratios, bandwidths, document,
                    fp32_exact, one_line, prompt_ids, record, rel_error, split_available)
from .memory import cuda_peak, peak_rss
from .registry import Backend, Unsupported
from .report import environment
from .source import ModelSource
from .timing import Timed, interleaved


def reference_device(backends: list[Backend]) -> str:
    """Where the fp32 reference runs: on the GPU when any usable backend does (see source.py), else the CPU."""
    return "cuda" if any(b.device == "cuda" for b in backends) else "cpu"


def run_model(source: ModelSource, prompt_lens: list[int], batches: list[int], decode_tokens: int,
              dtypes: list[str], backends: list[Backend], settings: Settings) -> dict[str, Any]:
    from .torch_backends import TorchRunner

    usable, skipped = split_available(backends)
    env = environment(settings.threads, copy=bandwidths(usable))
    source.ref_device = reference_device(usable)
    gate_ids = prompt_ids(1, GATE_TOKENS, source.vocab, settings.seed)
    with fp32_exact():
        dense = TorchRunner(source.dense_fp32(), source.ref_device)
        reference = dense.logits(gate_ids)
        greedy_ref = dense.decode(dense.start(gate_ids), GREEDY_STEPS)
    del dense
    max_len = max([*prompt_lens, GATE_TOKENS]) + max(decode_tokens, GREEDY_STEPS) + 2
    grid = [(b, p) for b in batches for p in prompt_lens]
    records: list[dict[str, Any]] = []
    for dname in dtypes:
        dtype, tol = DTYPES[dname], MODEL_TOL[dname]
        base = {"case": "model", "model": source.label, "dtype": dname, "decode_tokens": decode_tokens,
                "tolerance": tol}
        runners, gated = {}, {}
        for b in usable:
            try:
                built = b.model(source, dtype, settings.threads)
            except Unsupported as exc:
                records += [record(b, env, {**base, "batch": n, "tokens": p}, "skipped", reason=str(exc))
                            for n, p in grid]
                continue
            except Exception as exc:
                records += [record(b, env, {**base, "batch": n, "tokens": p}, "error", message=one_line(exc))
                            for n, p in grid]
                continue
            for runner in variants(built, settings, max_len, b.name):
                graphs = getattr(runner, "graphs", False)
                key = (b.name, graphs)
                extra = {"cuda_graphs": graphs if runner.cuda else None}
                try:
                    err = rel_error(runner.logits(gate_ids), reference)
                    same = bool(torch.equal(runner.decode(runner.start(gate_ids), GREEDY_STEPS).cpu(), greedy_ref))
                except Exception as exc:
                    records += [record(b, env, {**base, "batch": n, "tokens": p}, "error", message=one_line(exc),
                                       **extra) for n, p in grid]
                    continue
                gated[key] = (err, same)
                if err > tol:
                    records += [record(b, env, {**base, "batch": n, "tokens": p}, "wrong", error=err, **extra)
                                for n, p in grid]
                else:
                    runners[key] = (b, runner)
            del built
        source.release()   # the reference is not timed and must not count in the backends' memory
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        for n, p in grid:
            records += _model_case(runners, gated, env, {**base, "batch": n, "tokens": p}, source, settings)
        if settings.rss:
            _attach_model_rss(records, runners, source, dname, max(batches), max(prompt_lens), decode_tokens,
                              settings)
        del runners
    add_ratios(records, ("dtype", "batch", "tokens", "cuda_graphs"),
               {"prefill_ms": True, "ttft_ms": True, "decode_tokens_per_s": False})
    extra = {}
    if "runtime.gpu24" in sys.modules:
        extra["gpu24_algorithms"] = sys.modules["runtime.gpu24"].ALGOS.report()
    return document("model", backends, skipped, env, settings, records, source=source.label,
                     formats_bytes=source.formats_bytes(), **extra)


def variants(runner, settings: Settings, max_len: int, name: str = "") -> list:
    """The runners to gate and time for one built model: on CUDA with --cuda-graphs the graphed one (and, for the
    backends named in --eager-too, the eager one on the same weights); otherwise the runner itself."""
    from .torch_backends import GraphedRunner, TorchRunner

    if not (getattr(runner, "cuda", False) and settings.cuda_graphs and isinstance(runner, TorchRunner)):
        return [runner]
    graphed = GraphedRunner(runner, max_len)
    return [graphed, runner] if name in settings.eager_too else [graphed]


def _model_case(runners: dict, gated: dict, env: dict, base: dict, source: ModelSource, settings: Settings
                ) -> list[dict[str, Any]]:
    ids = prompt_ids(base["batch"], base["tokens"], source.vocab, settings.seed)
    steps = base["decode_tokens"]
    for _, r in runners.values():
        if hasattr(r, "prime"):
            r.prime(ids, steps)   # graphs for this prompt length are captured here, never inside a timed run
    sets = {
        "prefill": {k: Timed(run=lambda _, r=r: r.prefill(ids), cuda=r.cuda) for k, (_, r) in runners.items()},
        "ttft": {k: Timed(run=lambda _, r=r: r.first_token(ids), cuda=r.cuda) for k, (_, r) in runners.items()},
        "decode": {k: Timed(setup=lambda r=r: r.start(ids), run=lambda s, r=r: r.decode(s, steps), cuda=r.cuda)
                   for k, (_, r) in runners.items()},
    }
    out = {}
    for k, (b, r) in runners.items():
        graphs = getattr(r, "graphs", False)
        extra = {"cuda_graphs": graphs if r.cuda else None}
        if graphs and r.graph_error:
            extra["graph_error"] = r.graph_error
        if getattr(r, "info", None):
            extra["runner_info"] = r.info
        out[k] = record(b, env, base, "ok", error=gated[k][0], greedy_same_as_dense=gated[k][1],
                        weight_bytes=r.weight_bytes,
                        **({"linear_weight_bytes": r.linear_bytes} if getattr(r, "linear_bytes", None) else {}),
                        **({"weight_file_bytes": r.file_bytes} if r.file_bytes else {}), **extra)
    for metric, contenders in sets.items():
        for key, stats in interleaved(contenders, settings.warmup, settings.iters).items():
            out[key].update({f"{metric}_ms": stats["median_ms"], f"{metric}_iqr_ms": stats["iqr_ms"],
                             f"{metric}_times_ms": stats["times_ms"]})
            if metric == "prefill":
                out[key].update({"median_ms": stats["median_ms"], "iqr_ms": stats["iqr_ms"], "runs": stats["runs"]})
    for key, (b, r) in runners.items():
        rec = out[key]
        rec["decode_tokens_per_s"] = base["batch"] * steps / (rec["decode_ms"] / 1e3)
        if r.cuda:
            rec.update(cuda_peak(lambda r=r: r.decode(r.start(ids), steps)))
    return list(out.values())


def _attach_model_rss(records: list, runners: dict, source: ModelSource, dname: str, batch: int, prompt: int,
                      steps: int, settings: Settings) -> None:
    for _, (b, _) in runners.items():
        name = b.name
        if b.device != "cpu":
            continue
        spec = {"kind": "model", "backend": name, "source": source.spec(), "dtype": dname, "batch": batch,
                "prompt_len": prompt, "decode_tokens": steps, "seed": settings.seed, "threads": settings.threads}
        rss = {**peak_rss(spec), "rss_batch": batch, "rss_tokens": prompt}
        for r in records:
            if r["backend"] == name and r["dtype"] == dname and r["status"] == "ok":
                r.update(rss)
