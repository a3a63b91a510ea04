"""`rose-export`: prune LLMs with ROSE, SparseGPT, Wanda or magnitude, evaluate them, and export them."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click
from tqdm.contrib.logging import logging_redirect_tqdm

from .config import DEFAULT_BLOCKSIZE, DEFAULT_PERCDAMP, PruneConfig, Sparsity
from .errors import RoseError
from .methods import METHODS
from .models import DEFAULT_MODEL
from .ordering import DEFAULT_THRESHOLD, ORDER_MODES, WITHIN_GROUP


class _OneLineErrors(click.Group):
    """Every user mistake ends as `Error: ...` on one line with exit code 2, never a traceback."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        except click.ClickException as exc:
            click.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except RoseError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)
        sys.exit(code if isinstance(code, int) else 0)


class SparsityType(click.ParamType):
    name = "SPARSITY"

    def convert(self, value, param, ctx):
        if isinstance(value, Sparsity):
            return value
        try:
            return Sparsity.parse(value)
        except RoseError as exc:
            self.fail(str(exc), param, ctx)


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", force=True)


def model_option(f):
    return click.option("--model", default=DEFAULT_MODEL, show_default=True,
                        help="Hugging Face id, local model directory, or the embedded alias smollm2-135m.")(f)


def prune_options(f):
    """The options that decide the pruned weights; shared by `prune` and `prune-and-export`."""
    opts = [
        model_option,
        click.option("--method", type=click.Choice(sorted(METHODS)), default="rose", show_default=True,
                     help="rose = SparseGPT in ROSE's column order; magnitude and wanda need no solver."),
        click.option("--sparsity", type=SparsityType(), default="0.5", show_default=True,
                     help="Unstructured ratio (0.5 = half the weights) or N:M (2:4 = 2 zeros in every 4)."),
        click.option("--calib", default="wikitext2", show_default=True,
                     help="Calibration text: wikitext2, c4 (need the hub) or a local .txt/.jsonl/.parquet."),
        click.option("--nsamples", type=click.IntRange(min=1), default=128, show_default=True,
                     help="Number of calibration windows."),
        click.option("--seqlen", type=click.IntRange(min=2), default=2048, show_default=True,
                     help="Tokens per calibration window."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random windows."),
        click.option("--device", default="cpu", show_default=True,
                     help="Where each decoder layer is pruned (cpu or cuda); one layer at a time."),
        click.option("--percdamp", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_PERCDAMP,
                     show_default=True, help="SparseGPT damping as a fraction of mean(diag H)."),
        click.option("--blocksize", type=click.IntRange(min=1), default=DEFAULT_BLOCKSIZE, show_default=True,
                     help="SparseGPT lazy-update block width (and ROSE's block)."),
        click.option("--rose-threshold", type=float, default=DEFAULT_THRESHOLD, show_default=True,
                     help="Reorder a sublayer only when (max-min)/max of its block losses exceeds this."),
        click.option("--rose-order", type=click.Choice(ORDER_MODES), default="both", show_default=True,
                     help="Ablation: reorder columns, blocks, both, or none (= SparseGPT)."),
        click.option("--rose-within-group", type=click.Choice(WITHIN_GROUP), default="keep", show_default=True,
                     help="N:M only: keep columns inside a group in order, or sort them by column loss."),
        click.option("--rose-scaler", type=click.Choice(["uniform", "reference"]), default="uniform",
                     show_default=True, help="reference reproduces the released code's 1/k sample weighting."),
        click.option("--order", type=click.Choice(["rose", "best"]), default="rose", show_default=True,
                     help="best: per sublayer, keep the lowest-error of identity, ROSE and diag(H) orders; then per "
                          "decoder layer, fall back to plain SparseGPT where that lies closer to the dense model."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def eval_options(f):
    opts = [
        click.option("--eval-data", default="wikitext2", show_default=True,
                     help="Perplexity text: wikitext2, c4 or a local text file (e.g. WikiText-2 raw test)."),
        click.option("--eval-seqlen", type=click.IntRange(min=2), default=2048, show_default=True,
                     help="Window length of the perplexity evaluation."),
        click.option("--max-tokens", type=click.IntRange(min=2), default=None,
                     help="Score only the first windows that fit in this many tokens."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def make_config(method, sparsity, calib, nsamples, seqlen, seed, device, percdamp, blocksize, rose_threshold,
                rose_order, rose_within_group, rose_scaler, order) -> PruneConfig:
    if order == "best" and method != "rose":
        raise RoseError("--order best applies to --method rose only")
    return PruneConfig(method=method, sparsity=sparsity, calib=calib, nsamples=nsamples, seqlen=seqlen,
                       seed=seed, device=device, percdamp=percdamp, blocksize=blocksize,
                       rose_threshold=rose_threshold, rose_order=rose_order, rose_within_group=rose_within_group,
                       rose_scaler=rose_scaler, order=order)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rose", prog_name="rose-export")
def main() -> None:
    """Prune a causal LM in one shot (ROSE, SparseGPT, Wanda, magnitude) and ship it as a sparse model.

    \b
    Start with:  rose-export prune --out pruned/ --calib valid.txt --nsamples 64 --seqlen 512
    Evaluate:    rose-export eval --model pruned/ --data test.txt --seqlen 512
    """


@main.command()
@prune_options
@eval_options
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory for the pruned model.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option("--eval", "do_eval", is_flag=True, help="Measure perplexity after pruning; saved in the recipe.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def prune(model, out, overwrite, do_eval, eval_data, eval_seqlen, max_tokens, quiet, **opts) -> None:
    """Prune MODEL and save it (safetensors) with rose_recipe.json, which records how to reproduce it."""
    from . import api
    from .outputs import check_output

    _setup_logging(quiet)
    cfg = make_config(**opts)
    check_output(out, overwrite)
    with logging_redirect_tqdm():  # per-layer log lines print above the progress bar, not through it
        pruned, tokenizer, recipe = api.prune(model, cfg, progress=not quiet)
    if do_eval:
        recipe.results["eval"] = api.evaluate(pruned, tokenizer, eval_data, eval_seqlen, max_tokens, cfg.device,
                                              progress=not quiet)
        click.echo(f"perplexity {recipe.results['eval']['perplexity']:.3f}")
    api.save_pruned(pruned, tokenizer, recipe, out, overwrite)
    click.echo(f"wrote {out}")


@main.command("eval")
@model_option
@click.option("--data", default="wikitext2", show_default=True, help="wikitext2, c4 or a local text file.")
@click.option("--seqlen", type=click.IntRange(min=2), default=2048, show_default=True, help="Window length.")
@click.option("--max-tokens", type=click.IntRange(min=2), default=None, help="Score only the first windows.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_cmd(model, data, seqlen, max_tokens, device, as_json) -> None:
    """Perplexity of MODEL (an id, directory, pruned output or smollm2-135m) on non-overlapping windows."""
    import json

    from . import api
    from .models import load_model

    _setup_logging(True)
    api.check_device(device)
    m, tok = load_model(model)
    result = api.evaluate(m, tok, data, seqlen, max_tokens, device, progress=False)
    click.echo(json.dumps({"model": model, **result}) if as_json else f"perplexity {result['perplexity']:.3f}")


import export.cli  # noqa: E402,F401  (attaches `export` and `prune-and-export` to `main`)
import runtime_bench.cli  # noqa: E402,F401  (attaches `bench linear` and `bench model` to `main`)


if __name__ == "__main__":  # pragma: no cover
    main()
