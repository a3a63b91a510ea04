"""The format registry: one entry per deployment format: its writer, its parity check and what it needs.

A writer gets the shared `ExportContext` and its own output directory, writes the format there and returns a
`Written` (manifest info, layers left dense). The format's check then reads what was written and compares it with
the source (bit for bit, or logits and greedy tokens against PyTorch), raising on any difference; its result is
the manifest's parity record. Both run inside the temporary output, so a format that fails its check never
appears. What several formats share is made once, on first demand, by the context: the checkpoint cast to the
requested dtype, and the dense ONNX graph with the PyTorch reference traces that every ONNX format is checked
against. A new format is one `register(...)` here plus its module.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from rose.errors import RoseError

from .semi_structured import DEFAULT_DTYPE as DEFAULT_SEMI_DTYPE
from .genai import write_genai_config
from .source import Source, cast, copy_all, copy_aux, dtype_name, not_24, write_hf

log = logging.getLogger(__name__)

SCRATCH = ".scratch"  # inside the temporary output; removed before it is moved into place


@dataclass
class Written:
    """What a writer reports for the manifest."""

    info: dict[str, Any]
    skipped: Any = None           # layers left dense (and why), where the format can leave some


@dataclass
class ExportContext:
    """One export run: the source checkpoint, the temporary root, the options, and lazily made shared artefacts."""

    src: Source
    root: Path                    # the temporary output directory (moved into place when complete)
    formats: list[str]
    dtype: str | None = None      # hf and packed24 precision (None: the checkpoint's)
    semi_dtype: str = DEFAULT_SEMI_DTYPE
    hf_in_place: bool = False     # prune-and-export saved the pruned checkpoint straight into root/hf
    _onnx: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def cast_src(self) -> Source:
        """The checkpoint in the requested dtype (what hf and packed24 store)."""
        return cast(self.src, self.dtype)

    def dense_onnx(self) -> dict[str, Any]:
        """The dense ONNX graph (in root/onnx when that format is wanted, else in scratch), checked against PyTorch:
        export info, zero-check, parity, and what packed variants compare with. Made once."""
        if self._onnx:
            return self._onnx
        from rose.models import load_model

        from . import verify
        from .onnx_export import MODEL_FILE, cache_shape, export_onnx

        model, tokenizer = load_model(str(self.src.path), dtype="float32")
        state = {k: v.detach() for k, v in model.state_dict().items()}
        weights = [f"{n}.weight" for n in self.src.linears]
        directory = self.root / "onnx" if "onnx" in self.formats else self.root / SCRATCH / "onnx"
        info = export_onnx(model, directory)
        cache = cache_shape(model)
        ids = verify.prompt_ids(tokenizer)
        reference = [verify.torch_greedy(model, i) for i in ids]
        sparsity = verify.initializer_sparsity(directory / MODEL_FILE, state, weights)
        parity, traces = verify.onnx_parity(directory / MODEL_FILE, reference, ids, cache)
        self._onnx.update(dir=directory, file=directory / MODEL_FILE, info=info, state=state, weights=weights,
                          ids=ids, reference=reference, cache=cache, sparsity=sparsity, parity=parity, traces=traces)
        return self._onnx


Writer = Callable[[ExportContext, Path], Written]
Check = Callable[[ExportContext, Path, Written], "dict[str, Any] | None"]


def always() -> None:
    return None


def unchecked(ctx: ExportContext, out: Path, done: Written) -> None:
    """For a format that is the source itself (hf): nothing to compare."""
    return None


@dataclass(frozen=True)
class Format:
    name: str
    write: Writer
    check: Check            # reads the written format back against the source; raises on a difference
    needs_24: bool          # only for 2:4 checkpoints (and in the default set only for them)
    loaded_by: str          # what reads it back (README)
    description: str = ""
    available: Callable[[], str | None] = always  # why it cannot be written here (a missing build), or None


FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    FORMATS[fmt.name] = fmt
    return fmt


def run(ctx: ExportContext) -> tuple[dict[str, dict], dict[str, Any], dict[str, Any]]:
    """Write every format of `ctx` in registry order; returns (infos, skipped, parity) for the manifest."""
    import shutil

    infos: dict[str, dict] = {}
    skipped: dict[str, Any] = {}
    parity: dict[str, Any] = {}
    for name in ctx.formats:
        log.info("export: %s", name)
        start = time.perf_counter()
        fmt = FORMATS[name]
        done = fmt.write(ctx, ctx.root / name)
        if (checked := fmt.check(ctx, ctx.root / name, done)) is not None:
            parity[name] = checked
        infos[name] = {**done.info, "seconds": round(time.perf_counter() - start, 2)}
        if done.skipped is not None:
            skipped[name] = done.skipped
    shutil.rmtree(ctx.root / SCRATCH, ignore_errors=True)
    return infos, skipped, parity


# ---- the writers ----------------------------------------------------------------------------------------------

def _hf(ctx: ExportContext, out: Path) -> Written:
    if ctx.cast_src is not ctx.src:
        write_hf(ctx.cast_src, out)
    elif not ctx.hf_in_place:
        copy_all(ctx.src.path, out)
    return Written({"dtype": dtype_name(ctx.cast_src)})


def _packed24(ctx: ExportContext, out: Path) -> Written:
    from . import packed24

    return Written(packed24.write_packed24(ctx.cast_src, out))


def _packed24_check(ctx: ExportContext, out: Path, done: Written) -> dict[str, Any]:
    from . import packed24

    return packed24.check_packed24(ctx.cast_src, out)


def _semi_structured(ctx: ExportContext, out: Path) -> Written:
    from . import semi_structured

    info = semi_structured.write_semi_structured(ctx.src, out, ctx.semi_dtype)
    skipped = info.pop("skipped")
    return Written(info, skipped=skipped)


def _semi_structured_check(ctx: ExportContext, out: Path, done: Written) -> dict[str, Any]:
    from . import semi_structured

    return semi_structured.check_semi_structured(ctx.src, out)


def _onnx(ctx: ExportContext, out: Path) -> Written:
    dense = ctx.dense_onnx()  # written into `out` itself
    copy_aux(ctx.src.path, out)
    return Written({**dense["info"], **dense["sparsity"], **write_genai_config(out)})


def _onnx_check(ctx: ExportContext, out: Path, done: Written) -> dict[str, Any]:
    """The dense graph's logits and greedy tokens against PyTorch (run when the context made the graph)."""
    return ctx.dense_onnx()["parity"]


def _onnx_packed24(ctx: ExportContext, out: Path) -> Written:
    from .onnx_export import MODEL_FILE
    from .onnx_packed import write_packed_onnx

    dense = ctx.dense_onnx()
    bad = not_24(ctx.src)
    packed = write_packed_onnx(dense["dir"], out, {w: w[: -len(".weight")] not in bad for w in dense["weights"]})
    skipped = packed.pop("skipped")
    copy_aux(ctx.src.path, out)
    packed.update(write_genai_config(out))
    dense_bytes = sum(f.stat().st_size for f in dense["dir"].glob(f"{MODEL_FILE}*"))
    packed_bytes = sum(f.stat().st_size for f in out.glob(f"{MODEL_FILE}*"))
    if packed_bytes > 0.6 * dense_bytes:
        log.warning("onnx-packed24 is %.1f%% of the dense ONNX file (embeddings and other dense tensors are "
                    "stored as they are)", 100 * packed_bytes / dense_bytes)
    return Written({**dense["info"], **packed, "weights_rebuilt": "bit-exact",
                    "size_ratio_to_onnx": round(packed_bytes / dense_bytes, 4)}, skipped=skipped)


def _onnx_packed24_check(ctx: ExportContext, out: Path, done: Written) -> dict[str, Any]:
    """Every packed weight rebuilt by the graph's own ops equals the dense one bit for bit, and the graph's logits
    equal the dense graph's exactly (and so PyTorch's as closely as the dense graph's)."""
    from . import verify
    from .onnx_export import MODEL_FILE

    dense = ctx.dense_onnx()
    names = [w for w in dense["weights"] if w not in done.skipped]
    unpacked = verify.unpacked_weights(out / MODEL_FILE, names)
    wrong = [n for n in names if unpacked[n].tobytes() != dense["state"][n].numpy().tobytes()]
    if wrong:
        raise RoseError(f"onnx-packed24 does not rebuild {', '.join(wrong[:4])} exactly: please report this")
    result, traces = verify.onnx_parity(out / MODEL_FILE, dense["reference"], dense["ids"], dense["cache"])
    same = verify.compare(dense["traces"], traces)
    if same["max_abs_logits"] != 0.0 or not same["greedy_identical"]:
        raise RoseError(f"onnx-packed24 differs from onnx: max |logit diff| {same['max_abs_logits']:.2e}")
    return {**result, "identical_to_onnx": True}


def _onnx_sparse24(ctx: ExportContext, out: Path) -> Written:
    from .onnx_export import MODEL_FILE
    from .onnx_sparse24 import LIBRARY, write_sparse24_onnx

    dense = ctx.dense_onnx()
    bad = not_24(ctx.src)
    info = write_sparse24_onnx(dense["dir"], out, {w: w[: -len(".weight")] not in bad for w in dense["weights"]})
    skipped = info.pop("skipped")
    copy_aux(ctx.src.path, out)
    info.update(write_genai_config(out, session_options={"custom_ops_library": LIBRARY}))
    sizes = {d: sum(f.stat().st_size for f in d.glob(f"{MODEL_FILE}*")) for d in (dense["dir"], out)}
    return Written({**dense["info"], **info, "size_ratio_to_onnx": round(sizes[out] / sizes[dense["dir"]], 4)},
                   skipped=skipped)


def _onnx_sparse24_check(ctx: ExportContext, out: Path, done: Written) -> dict[str, Any]:
    """The graph on rose's operator against PyTorch (logits, greedy tokens) and against the dense graph."""
    from . import verify
    from .onnx_export import MODEL_FILE
    from .onnx_sparse24 import LIBRARY

    dense = ctx.dense_onnx()
    result, traces = verify.onnx_parity(out / MODEL_FILE, dense["reference"], dense["ids"], dense["cache"],
                                        custom_ops=out / LIBRARY)
    same = verify.compare(dense["traces"], traces)
    if not same["greedy_identical"]:
        raise RoseError("onnx-sparse24 chose other greedy tokens than onnx: please report this")
    return {**result, "max_abs_logits_vs_onnx": same["max_abs_logits"]}


register(Format("hf", _hf, unchecked, False, "transformers `from_pretrained`",
                "the pruned model, `save_pretrained` (safetensors, zeros kept) + `rose_recipe.json`"))
register(Format("packed24", _packed24, _packed24_check, True,
                "`runtime.load_packed24` (dense), `runtime.load_packed24_cpu` (C++ kernel), compressed-tensors 0.14",
                "2:4 weights as kept values + bitmask (legacy `sparse-24-bitmask`)"))
register(Format("semi-structured", _semi_structured, _semi_structured_check, True,
                "`runtime.load_sparse(path, backend=...)` on CUDA",
                "the CUTLASS 2:4 layout (kept values + reordered metadata), packed on the CPU"))
register(Format("onnx", _onnx, _onnx_check, False, "onnxruntime, onnxruntime-genai (`genai_config.json`)",
                "the causal LM with KV cache (opset 18, `torch.onnx` dynamo exporter), every zero kept"))
register(Format("onnx-packed24", _onnx_packed24, _onnx_packed24_check, True,
                "onnxruntime, onnxruntime-genai (`genai_config.json`)",
                "the same graph with 2:4 weights stored packed and rebuilt by standard ops folded at load"))


def _operator_library() -> str | None:
    from .onnx_sparse24 import find_library

    try:
        find_library()
    except RoseError as exc:
        return str(exc)
    return None


register(Format("onnx-sparse24", _onnx_sparse24, _onnx_sparse24_check, True,
                "onnxruntime with rose's operator library (in the directory; `runtime.ort.session`), onnxruntime-genai",
                "the graph with every 2:4 linear run by rose's operator `rose.Sparse24MatMul` on packed weights",
                _operator_library))
