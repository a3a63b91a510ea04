"""Library entry points of the export: every format of a pruned checkpoint, verified, written atomically.

`export_all(pruned_dir, out, formats, overwrite)` exports an existing `rose-export prune` output;
`prune_and_export(model, cfg, out, formats, overwrite)` prunes first. Both validate every input before any
expensive work, build all formats in a temporary sibling of `out`, and move it into place only when complete.
`dtype` (float32, float16, bfloat16; None keeps the checkpoint's) applies to `hf` and `packed24`; the ONNX formats
are always fp32 and `semi-structured` has its own `semi_dtype`.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rose.config import PruneConfig, parse_list
from rose.errors import RoseError
from rose.outputs import atomic_output, check_output

from . import manifest as mf
from .formats import FORMATS, SCRATCH, ExportContext, run
from .semi_structured import DEFAULT_DTYPE as DEFAULT_SEMI_DTYPE
from .source import DTYPES, Source, check_source, dtype_name, not_24, open_source, require_24

log = logging.getLogger(__name__)


def parse_formats(formats: str | Iterable[str] | None) -> list[str] | None:
    """Canonical list of the requested formats (None: every one that applies); unknown names, or a format that
    cannot be written here (its reason: a missing build), are an error."""
    if formats is None:
        return None
    names = parse_list(formats, "--formats", choices=FORMATS, what="format")
    for name in names:
        if reason := FORMATS[name].available():
            raise RoseError(reason)
    return [f for f in FORMATS if f in names]


def resolve_formats(src: Source, formats: list[str] | None) -> list[str]:
    """Default: every format for a 2:4 checkpoint, else those that need no 2:4, less those that cannot be written
    here (with a warning). Explicit 2:4 formats must fit the weights."""
    if formats is None:
        is_24 = bool(src.linears) and not not_24(src)
        out = []
        for name, fmt in FORMATS.items():
            if fmt.needs_24 and not is_24:
                continue
            if reason := fmt.available():
                log.warning("format %s is left out: %s", name, reason)
                continue
            out.append(name)
        return out
    for fmt in formats:
        if FORMATS[fmt].needs_24:
            require_24(src, fmt)
    return formats


def check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise RoseError(f"unknown dtype {dtype!r}: choose from {', '.join(DTYPES)}")


def export_all(pruned_dir: Path, out: Path, formats: str | Iterable[str] | None = None, overwrite: bool = False,
               *, semi_dtype: str = DEFAULT_SEMI_DTYPE, dtype: str | None = None) -> dict[str, Any]:
    """Export a pruned directory into `out/<format>/` plus `out/manifest.json`; returns the manifest."""
    wanted = parse_formats(formats)
    check_dtype(dtype)
    inputs = [("--pruned", pruned_dir)]
    check_source(pruned_dir)
    check_output(out, overwrite, inputs)
    src = open_source(pruned_dir)
    fmts = resolve_formats(src, wanted)
    with atomic_output(out, overwrite, inputs) as tmp:
        manifest = _export_into(ExportContext(src, tmp, fmts, dtype=dtype, semi_dtype=semi_dtype))
    return manifest


def prune_and_export(model_name: str, cfg: PruneConfig, out: Path, formats: str | Iterable[str] | None = None,
                     overwrite: bool = False, *, progress: bool = True, semi_dtype: str = DEFAULT_SEMI_DTYPE,
                     dtype: str | None = None) -> dict[str, Any]:
    """Prune `model_name` with `cfg`, then export it like `export_all`; the pruned checkpoint is the `hf` format
    (saved as it is, or kept aside and cast when `dtype` differs from the model's)."""
    from rose import api

    wanted = parse_formats(formats)
    check_dtype(dtype)
    needs = [f for f in wanted or () if FORMATS[f].needs_24]
    if needs and str(cfg.sparsity) != "2:4":
        raise RoseError(f"format {needs[0]} needs --sparsity 2:4 (got {cfg.sparsity}): change one or the other")
    inputs = [("--model", model_name), ("--calib", cfg.calib)]
    check_output(out, overwrite, inputs)
    model, tokenizer, recipe = api.prune(model_name, cfg, progress=progress)
    with atomic_output(out, overwrite, inputs) as tmp:
        keep = wanted is None or "hf" in wanted
        in_place = keep and dtype in (None, str(model.dtype).replace("torch.", ""))
        hf = tmp / ("hf" if in_place else f"{SCRATCH}/hf")
        api.save_pruned(model, tokenizer, recipe, hf)
        del model
        src = open_source(hf)
        fmts = resolve_formats(src, wanted)
        label = "hf (pruned by this run)" if keep else "pruned by this run (not kept)"
        ctx = ExportContext(src, tmp, fmts, dtype=dtype, semi_dtype=semi_dtype, hf_in_place=in_place)
        manifest = _export_into(ctx, label=label)
    return manifest


def _export_into(ctx: ExportContext, label: str | None = None) -> dict[str, Any]:
    """Write every format into the temporary root, verify each, and finish with manifest.json."""
    infos, skipped, parity = run(ctx)
    src = ctx.src
    source = {"path": label or str(src.path.absolute()), "model": src.recipe.model, "dtype": dtype_name(src),
              "method": src.recipe.config.get("method"), "sparsity": src.recipe.config.get("sparsity"),
              "pruned_layers": len(src.linears), "layers_not_24": len(not_24(src))}
    manifest = mf.build(ctx.root, source, infos, skipped, parity)
    mf.write(ctx.root, manifest)
    return manifest
