"""The pruning package's commands: `rose-export prune` and `rose-export eval` (composed by rose_export.py)."""
from __future__ import annotations

from pathlib import Path

import click
from tqdm.contrib.logging import logging_redirect_tqdm

from .clikit import (config_from_options, eval_options, model_option, prune_options, quiet_option, setup_logging,
                     stack)
from .config import DEFAULT_EVAL_DATA, DEFAULT_EVAL_SEQLEN, PruneConfig


@click.command()
@prune_options
@eval_options
@stack(
    click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory for the pruned model."),
    click.option("--overwrite", is_flag=True, help="Replace an existing --out."),
    click.option("--eval", "do_eval", is_flag=True, help="Measure perplexity after pruning; saved in the recipe."),
    quiet_option,
)
def prune(model, out, overwrite, do_eval, eval_data, eval_seqlen, max_tokens, quiet, **opts) -> None:
    """Prune MODEL and save it (safetensors) with rose_recipe.json, which records how to reproduce it."""
    from . import api
    from .data import check_sources, load_rows
    from .models import check_context
    from .outputs import check_output

    setup_logging(quiet)
    cfg = config_from_options(**opts)
    inputs = [("--model", model), ("--calib", cfg.calib), *(("--eval-data", d) for d in eval_data)]
    check_output(out, overwrite, inputs)
    check_sources(cfg.calib, *(eval_data if do_eval else ()))
    eval_rows = []
    if do_eval:  # every input is read and checked before hours of pruning, not after
        check_context(model, eval_seqlen, "--eval-seqlen")
        eval_rows = [load_rows(d, "test") for d in eval_data]
    with logging_redirect_tqdm():  # per-layer log lines print above the progress bar, not through it
        pruned, tokenizer, recipe = api.prune(model, cfg, progress=not quiet)
    if do_eval:
        results = [api.evaluate(pruned, tokenizer, data, eval_seqlen, max_tokens, cfg.device, progress=not quiet,
                                flag="--eval-seqlen", rows=rows) for data, rows in zip(eval_data, eval_rows)]
        recipe.results["eval"] = results[0]
        if len(results) > 1:
            recipe.results["eval_extra"] = results[1:]
        for r in results:
            click.echo(f"perplexity {r['perplexity']:.3f}" + (f" ({r['data']})" if len(results) > 1 else ""))
    api.save_pruned(pruned, tokenizer, recipe, out, overwrite)
    click.echo(f"wrote {out}")


@click.command("eval")
@model_option
@stack(
    click.option("--data", multiple=True, default=[DEFAULT_EVAL_DATA], show_default=True,
                 help="wikitext2, c4, pydoc or a local text file; repeat for more texts (JSON: the first at the top, "
                      "the others under eval_extra)."),
    click.option("--seqlen", type=click.IntRange(min=2), default=DEFAULT_EVAL_SEQLEN, show_default=True,
                 help="Window length."),
    click.option("--max-tokens", type=click.IntRange(min=2), default=None, help="Score only the first windows."),
    click.option("--device", default=PruneConfig.default("device"), show_default=True),
    click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
)
def eval_cmd(model, data, seqlen, max_tokens, device, as_json) -> None:
    """Perplexity of MODEL (an id, directory, pruned output or smollm2-135m) on non-overlapping windows."""
    import json

    from . import api
    from .data import load_rows
    from .models import check_context, load_model

    setup_logging(True)
    api.check_device(device)
    check_context(model, seqlen, "--seqlen")
    rows = [load_rows(d, "test") for d in data]  # before the model: a bad file fails in a second, not after the load
    m, tok = load_model(model)
    results = [api.evaluate(m, tok, d, seqlen, max_tokens, device, progress=False, rows=r) for d, r in zip(data, rows)]
    if as_json:
        click.echo(json.dumps({"model": model, **results[0], **({"eval_extra": results[1:]} if len(results) > 1
                                                                 else {})}))
    else:
        for r in results:
            click.echo(f"perplexity {r['perplexity']:.3f}" + (f" ({r['data']})" if len(results) > 1 else ""))


COMMANDS = [prune, eval_cmd]
