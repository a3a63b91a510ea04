"""Library entry points of the export: every format of a pruned checkpoint, verified, written atomically.

`export_all(pruned_dir, out, formats, overwrite)` exports an existing `rose-export prune` output;
`prune_and_export(model, cfg, out, formats, overwrite)` prunes first. Both validate every input before any
expensive work, build all formats in a temporary sibling of `out`, and move it into place only when complete.
`dtype` (float32, float16, bfloat16; None keeps the checkpoint's) applies to `hf` and `packed24`; the ONNX formats
are always fp32 and `semi-structured` has its own `semi_dtype`.
"""
from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rose.config import PruneConfig
from rose.errors import RoseError
from rose.outputs import atomic_output, check_output

from . import manifest as mf
from .source import DTYPES, Source, cast, copy_all, copy_aux, dtype_name, not_24, open_source, require_24, write_hf

log = logging.getLogger(__name__)

FORMATS = ("hf", "packed24", "semi-structured", "onnx", "onnx-packed24")
NEEDS_24 = ("packed24", "semi-structured", "onnx-packed24")
SCRATCH = ".scratch"  # inside the temporary output; removed before it is moved into place


def parse_formats(formats: str | Iterable[str] | None) -> list[str] | None:
    """Canonical list of the requested formats (None: every one that applies); unknown names are an error."""
    if formats is None:
        return None
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    names = [f.strip() for f in items if f.strip()]
    if not names:
        raise RoseError(f"--formats is empty: choose from {', '.join(FORMATS)}")
    unknown = [f for f in names if f not in FORMATS]
    if unknown:
        raise RoseError(f"unknown format {unknown[0]!r}: choose from {', '.join(FORMATS)}")
    return [f for f in FORMATS if f in names]


def resolve_formats(src: Source, formats: list[str] | None) -> list[str]:
    """Default: all five for a 2:4 checkpoint, else hf and onnx. Explicit 2:4 formats must fit the weights."""
    if formats is None:
        return list(FORMATS) if src.linears and not not_24(src) else ["hf", "onnx"]
    for fmt in formats:
        if fmt in NEEDS_24:
            require_24(src, fmt)
    return formats


def check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise RoseError(f"unknown dtype {dtype!r}: choose from {', '.join(DTYPES)}")


def export_all(pruned_dir: Path, out: Path, formats: str | Iterable[str] | None = None, overwrite: bool = False,
               *, semi_dtype: str = "float16", dtype: str | None = None) -> dict[str, Any]:
    """Export a pruned directory into `out/<format>/` plus `out/manifest.json`; returns the manifest."""
    wanted = parse_formats(formats)
    check_dtype(dtype)
    src = open_source(pruned_dir)
    check_output(out, overwrite)
    if Path(out).expanduser().absolute() == src.path.absolute():
        raise RoseError("--out must differ from --pruned")
    fmts = resolve_formats(src, wanted)
    with atomic_output(out, overwrite) as tmp:
        manifest = _export_into(src, tmp, fmts, semi_dtype=semi_dtype, dtype=dtype)
    return manifest


def prune_and_export(model_name: str, cfg: PruneConfig, out: Path, formats: str | Iterable[str] | None = None,
                     overwrite: bool = False, *, progress: bool = True, semi_dtype: str = "float16",
                     dtype: str | None = None) -> dict[str, Any]:
    """Prune `model_name` with `cfg`, then export it like `export_all`; the pruned checkpoint is the `hf` format
    (saved as it is, or kept aside and cast when `dtype` differs from the model's)."""
    from rose import api

    wanted = parse_formats(formats)
    check_dtype(dtype)
    needs = [f for f in wanted or () if f in NEEDS_24]
    if needs and str(cfg.sparsity) != "2:4":
        raise RoseError(f"format {needs[0]} needs --sparsity 2:4 (got {cfg.sparsity}): change one or the other")
    check_output(out, overwrite)
    model, tokenizer, recipe = api.prune(model_name, cfg, progress=progress)
    with atomic_output(out, overwrite) as tmp:
        keep = wanted is None or "hf" in wanted
        in_place = keep and dtype in (None, str(model.dtype).replace("torch.", ""))
        hf = tmp / ("hf" if in_place else f"{SCRATCH}/hf")
        api.save_pruned(model, tokenizer, recipe, hf)
        del model
        src = open_source(hf)
        fmts = resolve_formats(src, wanted)
        label = "hf (pruned by this run)" if keep else "pruned by this run (not kept)"
        manifest = _export_into(src, tmp, fmts, semi_dtype=semi_dtype, dtype=dtype, hf_in_place=in_place,
                                label=label)
    return manifest


def _export_into(src: Source, tmp: Path, fmts: list[str], *, semi_dtype: str, dtype: str | None = None,
                 hf_in_place: bool = False, label: str | None = None) -> dict[str, Any]:
    """Write every format into `tmp`, verify each, and finish with manifest.json."""
    from .packed24 import write_packed24
    from .semi_structured import write_semi_structured

    infos: dict[str, dict[str, Any]] = {}
    skipped: dict[str, Any] = {}
    parity: dict[str, Any] = {}
    cast_src = cast(src, dtype) if {"hf", "packed24"} & set(fmts) else src  # what hf and packed24 store
    for fmt in fmts:
        if fmt.startswith("onnx"):
            continue
        log.info("export: %s", fmt)
        start = time.perf_counter()
        if fmt == "hf":
            if cast_src is not src:
                write_hf(cast_src, tmp / "hf")
            elif not hf_in_place:
                copy_all(src.path, tmp / "hf")
            infos[fmt] = {"dtype": dtype_name(cast_src)}
        elif fmt == "packed24":
            infos[fmt] = write_packed24(cast_src, tmp / fmt)
            parity[fmt] = {"round_trip": infos[fmt].pop("round_trip")}
        elif fmt == "semi-structured":
            infos[fmt] = write_semi_structured(src, tmp / fmt, semi_dtype)
            skipped[fmt] = infos[fmt].pop("skipped")
            parity[fmt] = {"cutlass_packing": infos[fmt].pop("cutlass_check")}
        infos[fmt]["seconds"] = round(time.perf_counter() - start, 2)
    onnx_fmts = [f for f in fmts if f.startswith("onnx")]
    if onnx_fmts:
        _export_onnx(src, tmp, onnx_fmts, infos, skipped, parity)
    shutil.rmtree(tmp / SCRATCH, ignore_errors=True)
    source = {"path": label or str(src.path.absolute()), "model": src.recipe.model, "dtype": dtype_name(src),
              "method": src.recipe.config.get("method"), "sparsity": src.recipe.config.get("sparsity"),
              "pruned_layers": len(src.linears), "layers_not_24": len(not_24(src))}
    manifest = mf.build(tmp, source, {f: infos[f] for f in fmts}, skipped, parity)
    mf.write(tmp, manifest)
    return manifest


def _export_onnx(src: Source, tmp: Path, fmts: list[str], infos: dict, skipped: dict, parity: dict) -> None:
    """Export the dense graph once, pack it if asked, and check both against PyTorch on the same prompts."""
    from rose.models import load_model

    from . import verify
    from .onnx_export import MODEL_FILE, cache_shape, export_onnx
    from .onnx_packed import write_packed_onnx

    log.info("export: %s", ", ".join(fmts))
    start = time.perf_counter()
    model, tokenizer = load_model(str(src.path), dtype="float32")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    weights = [f"{n}.weight" for n in src.linears]
    dense_dir = tmp / "onnx" if "onnx" in fmts else tmp / SCRATCH / "onnx"
    info = export_onnx(model, dense_dir)
    cache = cache_shape(model)
    ids = verify.prompt_ids(tokenizer)
    reference = [verify.torch_greedy(model, i) for i in ids]
    dense_sparsity = verify.initializer_sparsity(dense_dir / MODEL_FILE, state, weights)
    dense_parity, dense_traces = verify.onnx_parity(dense_dir / MODEL_FILE, reference, ids, cache)
    if "onnx" in fmts:
        copy_aux(src.path, dense_dir)
        infos["onnx"] = {**info, **dense_sparsity, "seconds": round(time.perf_counter() - start, 2)}
        parity["onnx"] = dense_parity
    start = time.perf_counter()
    if "onnx-packed24" in fmts:
        out = tmp / "onnx-packed24"
        bad = not_24(src)
        packed = write_packed_onnx(dense_dir, out, {w: w[: -len(".weight")] not in bad for w in weights})
        skipped["onnx-packed24"] = packed.pop("skipped")
        names = [w for w in weights if w not in skipped["onnx-packed24"]]
        unpacked = verify.unpacked_weights(out / MODEL_FILE, names)
        wrong = [n for n in names if unpacked[n].tobytes() != state[n].numpy().tobytes()]
        if wrong:
            raise RoseError(f"onnx-packed24 does not rebuild {', '.join(wrong[:4])} exactly: please report this")
        result, traces = verify.onnx_parity(out / MODEL_FILE, reference, ids, cache)
        same = verify.compare(dense_traces, traces)
        if same["max_abs_logits"] != 0.0 or not same["greedy_identical"]:
            raise RoseError(f"onnx-packed24 differs from onnx: max |logit diff| {same['max_abs_logits']:.2e}")
        copy_aux(src.path, out)
        dense_bytes = sum(f.stat().st_size for f in dense_dir.glob(f"{MODEL_FILE}*"))
        packed_bytes = sum(f.stat().st_size for f in out.glob(f"{MODEL_FILE}*"))
        infos["onnx-packed24"] = {**info, **packed, "weights_rebuilt": "bit-exact",
                                  "size_ratio_to_onnx": round(packed_bytes / dense_bytes, 4),
                                  "seconds": round(time.perf_counter() - start, 2)}
        parity["onnx-packed24"] = {**result, "identical_to_onnx": True}
        if packed_bytes > 0.6 * dense_bytes:
            log.warning("onnx-packed24 is %.1f%% of the dense ONNX file (embeddings and other dense tensors are "
                        "stored as they are)", 100 * packed_bytes / dense_bytes)
