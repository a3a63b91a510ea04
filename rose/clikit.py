"""What every `rose-export` command shares: one-line errors, option stacking, logging, and the pruning options
that `prune` and `prune-and-export` both take. Each package's CLI imports this, never another package's CLI;
the entry point (`rose_export.py`) composes their commands."""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any

import click

from .config import (DEFAULT_EVAL_DATA, DEFAULT_EVAL_SEQLEN, ORDERS, REFIT_LOSSES, ROSE_ORDER_MODES, SCALERS,
                     WITHIN_GROUP, PruneConfig, Sparsity)
from .errors import RoseError
from .methods import METHODS
from .models import DEFAULT_MODEL

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


class OneLineErrors(click.Group):
    """Every user mistake ends as `Error: ...` on one line with exit code 2, never a traceback. `user_errors` are
    the exception types that carry such a message (RoseError, and the runtimes' own)."""

    user_errors: tuple[type[BaseException], ...] = (RoseError,)

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
        except self.user_errors as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)
        sys.exit(code if isinstance(code, int) else 0)


def entry_point(help_text: str, commands: Iterable[click.Command],
                user_errors: tuple[type[BaseException], ...] = (RoseError,)) -> click.Group:
    """The `rose-export` group: the given commands under one-line errors, `--help` and `--version`."""
    group_cls = type("RoseExport", (OneLineErrors,), {"user_errors": user_errors})

    @click.group(cls=group_cls, help=help_text, context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(package_name="rose", prog_name="rose-export")
    def main() -> None:
        pass

    for command in commands:
        main.add_command(command)
    return main


def stack(*options: Decorator) -> Decorator:
    """Apply click options in the order written (click would otherwise list them bottom-up in --help)."""
    def wrap(f):
        for opt in reversed(options):
            f = opt(f)
        return f
    return wrap


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", force=True)


quiet_option = click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")


class SparsityType(click.ParamType):
    name = "SPARSITY"

    def convert(self, value, param, ctx):
        if isinstance(value, Sparsity):
            return value
        try:
            return Sparsity.parse(value)
        except RoseError as exc:
            self.fail(str(exc), param, ctx)


def model_option(f):
    return click.option("--model", default=DEFAULT_MODEL, show_default=True,
                        help="Hugging Face id, local model directory, or the embedded alias smollm2-135m.")(f)


def _default(name: str) -> Any:
    return PruneConfig.default(name)


def prune_options(f):
    """The options that decide the pruned weights (PruneConfig's fields, with its defaults)."""
    return stack(
        model_option,
        click.option("--method", type=click.Choice(sorted(METHODS)), default=_default("method"), show_default=True,
                     help="rose = SparseGPT in ROSE's column order; magnitude and wanda need no solver."),
        click.option("--sparsity", type=SparsityType(), default=str(_default("sparsity")), show_default=True,
                     help="Unstructured ratio (0.5 = half the weights) or N:M (2:4 = 2 zeros in every 4)."),
        click.option("--calib", default=_default("calib"), show_default=True,
                     help="Calibration text: wikitext2, c4 (need the hub) or a local .txt/.jsonl/.parquet."),
        click.option("--nsamples", type=click.IntRange(min=1), default=_default("nsamples"), show_default=True,
                     help="Number of calibration windows."),
        click.option("--seqlen", type=click.IntRange(min=2), default=_default("seqlen"), show_default=True,
                     help="Tokens per calibration window."),
        click.option("--seed", type=int, default=_default("seed"), show_default=True,
                     help="Seed of the random windows."),
        click.option("--device", default=_default("device"), show_default=True,
                     help="Where each decoder layer is pruned (cpu or cuda); one layer at a time."),
        click.option("--percdamp", type=click.FloatRange(min=0, min_open=True), default=_default("percdamp"),
                     show_default=True, help="SparseGPT damping as a fraction of mean(diag H)."),
        click.option("--blocksize", type=click.IntRange(min=1), default=_default("blocksize"), show_default=True,
                     help="SparseGPT lazy-update block width (and ROSE's block)."),
        click.option("--rose-threshold", type=float, default=_default("rose_threshold"), show_default=True,
                     help="Reorder a sublayer only when (max-min)/max of its block losses exceeds this."),
        click.option("--rose-order", type=click.Choice(ROSE_ORDER_MODES), default=_default("rose_order"),
                     show_default=True, help="Ablation: reorder columns, blocks, both, or none (= SparseGPT)."),
        click.option("--rose-within-group", type=click.Choice(WITHIN_GROUP), default=_default("rose_within_group"),
                     show_default=True,
                     help="N:M only: keep columns inside a group in order, or sort them by column loss."),
        click.option("--rose-scaler", type=click.Choice(SCALERS), default=_default("rose_scaler"),
                     show_default=True, help="reference reproduces the released code's 1/k sample weighting."),
        click.option("--order", type=click.Choice(ORDERS), default=_default("order"), show_default=True,
                     help="best: per sublayer, keep the lowest-error of identity, ROSE and diag(H) orders; then per "
                          "decoder layer, fall back to plain SparseGPT where that lies closer to the dense model."),
        click.option("--refit", is_flag=True, default=_default("refit"),
                     help="After pruning each decoder layer, optimise its kept weights (masks frozen) so that its "
                          "output on the pruned model's hidden states matches the dense layer's; kept per layer only "
                          "where it lands closer. Any method and pattern; calibration data only."),
        click.option("--refit-steps", type=click.IntRange(min=1), default=_default("refit_steps"), show_default=True,
                     help="Refit: Adam steps per decoder layer, one calibration window each."),
        click.option("--refit-lr", type=click.FloatRange(min=0, min_open=True), default=_default("refit_lr"),
                     show_default=True, help="Refit: Adam learning rate."),
        click.option("--refit-samples", type=click.IntRange(min=1), default=_default("refit_samples"),
                     help="Refit: train on the first N calibration windows only  [default: all]."),
        click.option("--refit-loss", type=click.Choice(REFIT_LOSSES), default=_default("refit_loss"),
                     show_default=True, help="Refit: per-token relative error of the layer output, or plain MSE."),
        click.option("--refit-norms", is_flag=True, default=_default("refit_norms"),
                     help="Refit: also train the decoder layer's norm weights and biases (an ablation: "
                          "docs/quality/refit)."),
        click.option("--permute", is_flag=True, default=_default("permute"),
                     help="N:M only: before each decoder layer is pruned, reorder the input channels of down_proj "
                          "and o_proj (with the rows of gate/up_proj and v_proj that make them, so the dense model "
                          "computes the same function) so that N:M groups keep more saliency. Any method."),
        click.option("--permute-rounds", type=click.IntRange(min=1), default=_default("permute_rounds"),
                     show_default=True, help="Permute: rounds of the channel-permutation search per sublayer."),
    )(f)


def eval_options(f):
    return stack(
        click.option("--eval-data", multiple=True, default=[DEFAULT_EVAL_DATA], show_default=True,
                     help="Perplexity text: wikitext2, c4, pydoc (Python's own documentation, shipped with Python) "
                          "or a local text file (e.g. WikiText-2 raw test). Repeat for more texts: the first is "
                          "the recipe's `eval`, the others its `eval_extra`."),
        click.option("--eval-seqlen", type=click.IntRange(min=2), default=DEFAULT_EVAL_SEQLEN, show_default=True,
                     help="Window length of the perplexity evaluation."),
        click.option("--max-tokens", type=click.IntRange(min=2), default=None,
                     help="Score only the first windows that fit in this many tokens."),
    )(f)


def config_from_options(**opts: Any) -> PruneConfig:
    """The PruneConfig of `prune_options`' values (it validates itself)."""
    return PruneConfig(**opts)
