"""The formats package's commands: `rose-export export` and `rose-export prune-and-export`."""
from __future__ import annotations

from pathlib import Path

import click

from rose.clikit import config_from_options, prune_options, quiet_option, setup_logging, stack
from rose.models import DTYPES

from .formats import FORMATS
from .semi_structured import DEFAULT_DTYPE as DEFAULT_SEMI_DTYPE, HALF

FORMATS_HELP = (f"Comma-separated subset of {', '.join(FORMATS)} [default: all for a 2:4 model, else "
                f"{','.join(f for f, fmt in FORMATS.items() if not fmt.needs_24)}].")


def _summary(manifest: dict, out: Path) -> None:
    for fmt, info in manifest["formats"].items():
        line = f"{fmt:16s} {info['bytes'] / 1e6:9.2f} MB"
        parity = manifest["parity"].get(fmt, {})
        if "max_abs_logits" in parity:
            line += f"   max |logit diff| {parity['max_abs_logits']:.1e}, greedy identical {parity['greedy_identical']}"
        click.echo(line)
    click.echo(f"wrote {out}")


_common = stack(
    click.option("--out", type=click.Path(path_type=Path), required=True,
                 help="Output directory: one subdirectory per format plus manifest.json."),
    click.option("--formats", default=None, help=FORMATS_HELP),
    click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
                 help="Precision of the hf and packed24 weights [default: the checkpoint's]; "
                      "the ONNX formats are always float32."),
    click.option("--semi-dtype", type=click.Choice(list(HALF)), default=DEFAULT_SEMI_DTYPE,
                 show_default=True, help="Precision of the semi-structured weights."),
    click.option("--overwrite", is_flag=True, help="Replace an existing --out."),
    quiet_option,
)


@click.command("export")
@click.option("--pruned", type=click.Path(path_type=Path), required=True,
              help="A directory written by `rose-export prune`.")
@_common
def export_cmd(pruned, out, formats, dtype, semi_dtype, overwrite, quiet) -> None:
    """Export an existing pruned checkpoint to deployable formats, each verified, written atomically."""
    from .api import export_all

    setup_logging(quiet)
    manifest = export_all(pruned, out, formats, overwrite, semi_dtype=semi_dtype, dtype=dtype)
    _summary(manifest, out)


@click.command("prune-and-export")
@prune_options
@_common
def prune_and_export_cmd(model, out, formats, dtype, semi_dtype, overwrite, quiet, **opts) -> None:
    """Prune MODEL and write everything needed to deploy it: every format (hf, packed24, semi-structured, onnx,
    onnx-packed24, ...) and manifest.json with sizes, hashes, skipped layers and parity results."""
    from .api import prune_and_export

    setup_logging(quiet)
    cfg = config_from_options(**opts)
    manifest = prune_and_export(model, cfg, out, formats, overwrite, progress=not quiet, semi_dtype=semi_dtype,
                                dtype=dtype)
    _summary(manifest, out)


COMMANDS = [export_cmd, prune_and_export_cmd]
