"""The benchmarks package's commands: `rose-export bench linear` and `rose-export bench model`.

Every input is checked before any timing."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import click

from rose.clikit import quiet_option, setup_logging, stack
from rose.config import parse_list
from rose.errors import RoseError

from .presets import PRESETS

ALL_TOKENS = "1,8,64,512,2048,8192"


def _common(warmup: int, iters: int):
    return stack(
        click.option("--dtypes", default=None, help="Comma-separated subset of fp32, fp16, bf16."),
        click.option("--backends", default=None,
                     help="Comma-separated registry names [default: all; unavailable ones are listed as skipped]."),
        click.option("--warmup", type=click.IntRange(min=0), default=warmup, show_default=True,
                     help="Untimed runs per case and backend."),
        click.option("--iters", type=click.IntRange(min=1), default=iters, show_default=True,
                     help="Timed runs per case and backend (median and IQR reported)."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="CPU threads for torch and onnxruntime [default: torch's current setting]."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of weights and inputs."),
        click.option("--rss/--no-rss", default=True, show_default=True,
                     help="Peak RSS of a fresh subprocess per CPU backend (costs a process start each)."),
        click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True,
                     help="CUDA backends: time CUDA-graph replays (model: static KV cache, prefill and decode graphs; "
                          "falls back to eager, saying why, where capture fails)."),
        click.option("--out", type=click.Path(path_type=Path), required=True,
                     help="Directory for results.json, results.md and the PNG plots."),
        click.option("--overwrite", is_flag=True, help="Replace an existing --out."),
        quiet_option,
    )


@contextlib.contextmanager
def _threads(threads: int | None) -> Iterator[int]:
    import torch

    before = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _finish(results: dict, out: Path, overwrite: bool, inputs: list) -> None:
    from rose.outputs import atomic_output

    from . import report

    with atomic_output(out, overwrite, inputs) as tmp:
        report.write(tmp, results)
    counts: dict[str, int] = {}
    for r in results["records"]:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    click.echo(", ".join(f"{n} {s}" for s, n in counts.items()) + f"; skipped backends: "
               f"{', '.join(results['skipped']) or 'none'}")
    click.echo(f"wrote {out}")


@click.group("bench")
def bench() -> None:
    """Time 2:4 sparse against dense: one linear layer (`linear`) or a whole model (`model`)."""


@bench.command("linear")
@click.option("--preset", default=None, help=f"Comma-separated model presets: {', '.join(PRESETS)}.")
@click.option("--model", type=click.Path(path_type=Path), default=None,
              help="A local model directory (or prune-and-export output): all its distinct linear shapes.")
@click.option("--shapes", default=None,
              help="OUTxIN[,OUTxIN...]: the shapes to time, or a subset of the preset's / model's shapes.")
@click.option("--tokens", default=ALL_TOKENS, show_default=True, help="Token counts (rows of x).")
@_common(warmup=3, iters=20)
def linear_cmd(preset, model, shapes, tokens, dtypes, backends, warmup, iters, threads, seed, rss, cuda_graphs, out,
               overwrite, quiet) -> None:
    """y = x W^T with an exact 2:4 W: every backend gated against x @ (W*mask)^T, then timed."""
    from rose.outputs import check_output

    from . import backends as registry
    from .cases import Settings, parse_counts, parse_dtypes
    from .linear_bench import run_linear
    from .presets import model_shapes, parse_shapes, preset_shapes

    setup_logging(quiet)
    token_counts = parse_counts(tokens, "--tokens")
    dtype_names = parse_dtypes(dtypes or "fp32,fp16,bf16")
    chosen = registry.resolve(backends, "linear")
    if (preset is None) == (model is None) and not (preset is None and model is None and shapes):
        raise RoseError("choose one source of shapes: --preset NAME, --model DIR, or --shapes OUTxIN alone")
    table: dict = {}
    if preset:
        for name in parse_list(preset, "--preset", choices=PRESETS, what="preset"):
            for shape, layers in preset_shapes(name).items():
                table.setdefault(shape, []).extend(f"{name}:{n}" for n in layers)
    elif model:
        table = model_shapes(model)
    if shapes:
        wanted = parse_shapes(shapes)
        if table:
            missing = [s for s in wanted if s not in table]
            if missing:
                raise RoseError(f"unknown shape {missing[0][0]}x{missing[0][1]}: not among "
                                f"{', '.join(f'{a}x{b}' for a, b in table)}")
            table = {s: table[s] for s in wanted}
        else:
            table = {s: ["custom"] for s in wanted}
    inputs = [("--model", model)]
    check_output(out, overwrite, inputs)
    label = preset or (str(model) if model else "custom shapes")
    with _threads(threads) as n:
        results = run_linear(table, token_counts, dtype_names, chosen,
                             Settings(warmup, iters, n, seed, rss, cuda_graphs), label)
    _finish(results, out, overwrite, inputs)


@bench.command("model")
@click.option("--pruned", type=click.Path(path_type=Path), default=None,
              help="A prune-and-export output (hf/, onnx/, onnx-packed24/, semi-structured/) or a pruned directory.")
@click.option("--config", "preset", default=None, help=f"A preset for --random: {', '.join(PRESETS)}.")
@click.option("--random", is_flag=True, help="Random weights from --config, made 2:4 by magnitude.")
@click.option("--layers", type=click.IntRange(min=1), default=None, help="--random only: fewer decoder layers.")
@click.option("--prompt-lens", default="128,512", show_default=True, help="Prompt lengths (prefill tokens).")
@click.option("--batch", default="1", show_default=True, help="Batch sizes.")
@click.option("--decode-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Greedy tokens decoded with the KV cache after the prefill.")
@click.option("--eager-too", default=None,
              help="With --cuda-graphs: these CUDA backends (comma-separated) are also gated and timed eagerly, on the "
                   "same weights.")
@_common(warmup=2, iters=10)
def model_cmd(pruned, preset, random, layers, prompt_lens, batch, decode_tokens, eager_too, dtypes, backends, warmup,
              iters, threads, seed, rss, cuda_graphs, out, overwrite, quiet) -> None:
    """End to end: prefill latency, time to first token, decode tokens/s and peak memory per backend."""
    from rose.outputs import check_output

    from . import backends as registry
    from .cases import Settings, parse_counts, parse_dtypes
    from .model_bench import ModelSource, run_model

    setup_logging(quiet)
    lens, batches = parse_counts(prompt_lens, "--prompt-lens"), parse_counts(batch, "--batch")
    dtype_names = parse_dtypes(dtypes or "fp32")
    chosen = registry.resolve(backends, "model")
    if pruned is not None and (preset or random):
        raise RoseError("--pruned and --config/--random exclude each other: benchmark one model at a time")
    if pruned is None and not (preset and random):
        raise RoseError("pass --pruned DIR, or --config PRESET --random for a random-weight 2:4 model")
    if layers and pruned is not None:
        raise RoseError("--layers applies to --random models only")
    eager = tuple(parse_list(eager_too, "--eager-too", choices=[b.name for b in chosen], what="backend")
                  ) if eager_too else ()
    if eager and not cuda_graphs:
        raise RoseError("--eager-too adds an eager run beside the graphed one: it needs --cuda-graphs")
    source = ModelSource.pruned(pruned) if pruned is not None else ModelSource.random(preset, layers, seed)
    inputs = [("--pruned", pruned)]
    check_output(out, overwrite, inputs)
    with _threads(threads) as n:
        results = run_model(source, lens, batches, decode_tokens, dtype_names, chosen,
                            Settings(warmup, iters, n, seed, rss, cuda_graphs, eager))
    _finish(results, out, overwrite, inputs)


COMMANDS = [bench]
