"""Library entry points behind the CLI: prune a model and save it with its recipe, evaluate perplexity."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from .calibrate import check_widths, prune_model
from .config import PruneConfig, Recipe
from .data import calibration_windows, evaluation_tokens, load_rows
from .errors import RoseError
from .eval import perplexity
from .models import check_context, check_seqlen, load_model
from .offload import full_fp32
from .outputs import atomic_output

log = logging.getLogger(__name__)


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RoseError(f"--device {device} needs CUDA, which this machine lacks: use --device cpu")
    if not device.startswith(("cpu", "cuda")):
        raise RoseError(f"unknown --device {device!r}: use cpu or cuda")


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over the sublayers: overall sparsity, mean reconstruction error, ROSE's columnar fraction, the layer
    guard's and the refit's decisions."""
    numel = sum(r["shape"][0] * r["shape"][1] for r in records)
    out: dict[str, Any] = {
        "sublayers": len(records),
        "sparsity": round(sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in records) / numel, 6),
        "mean_rel_error": round(sum(r["rel_error"] for r in records) / len(records), 6),
    }
    if any("reordered" in r for r in records):
        out["columnar_fraction"] = round(sum(bool(r.get("reordered")) for r in records) / len(records), 4)
        orders: dict[str, int] = {}
        for r in records:
            orders[r["order"]] = orders.get(r["order"], 0) + 1
        out["chosen_orders"] = orders
    perms = [r["permutation"] for r in records if "lost_after" in r.get("permutation", {})]
    if perms:  # --permute: the share of the consumers' saliency that N:M loses, identity against permuted
        out["permutation"] = {"sublayers": len(perms),
                              "mean_lost_before": round(sum(p["lost_before"] for p in perms) / len(perms), 6),
                              "mean_lost_after": round(sum(p["lost_after"] for p in perms) / len(perms), 6),
                              "seconds": round(sum(p["seconds"] for p in perms), 2)}
    guards = {r["layer"]: r["layer_guard"]["kept"] for r in records if "layer_guard" in r}
    if guards:  # --order best: decoder layers checked, and where SparseGPT's solution was kept
        out["guarded_layers"] = len(guards)
        out["guard_kept_sparsegpt"] = sum(k == "sparsegpt" for k in guards.values())
    refits = {r["layer"]: r["refit"] for r in records if "refit" in r}
    if refits:  # --refit: the decoder layers' distance to the dense outputs before and after, and where it was kept
        final = [f["error_after"] if f["kept"] == "refit" else f["error_before"] for f in refits.values()]
        out["refit"] = {"layers": len(refits), "kept": sum(f["kept"] == "refit" for f in refits.values()),
                        "mean_error_before": round(sum(f["error_before"] for f in refits.values()) / len(refits), 6),
                        "mean_error_after": round(sum(final) / len(refits), 6),
                        "seconds": round(sum(f["seconds"] for f in refits.values()), 2)}
    return out


def prune(model_name: str, cfg: PruneConfig, *, progress: bool = True, model=None, tokenizer=None):
    """Load (unless given), calibrate and prune; returns `(model, tokenizer, recipe)`."""
    check_device(cfg.device)
    rows = load_rows(cfg.calib, "train")  # a bad calibration file fails before the model is loaded
    if model is None:
        check_context(model_name, cfg.seqlen, "--seqlen")
        model, tokenizer = load_model(model_name)
    check_seqlen(model.config, cfg.seqlen, "--seqlen", model_name)
    check_widths(model, cfg)
    calib = calibration_windows(tokenizer, cfg.calib, cfg.nsamples, cfg.seqlen, cfg.seed, rows)
    t0, c0 = time.perf_counter(), time.process_time()
    records = prune_model(model, calib, cfg, progress=progress)
    seconds = time.perf_counter() - t0
    # CPU time beside wall time: on a shared machine the wall clock measures the load as well
    recipe = Recipe(model=model_name, config=cfg.to_dict(), layers=records,
                    results={"prune_seconds": round(seconds, 2),
                             "prune_cpu_seconds": round(time.process_time() - c0, 2), **summarize(records)})
    log.info("pruned %d sublayers in %.1f s: sparsity %.4f", len(records), seconds, recipe.results["sparsity"])
    return model, tokenizer, recipe


def evaluate(model, tokenizer, data: str, seqlen: int, max_tokens: int | None, device: str = "cpu",
             progress: bool = True, flag: str = "--seqlen", rows: list[str] | None = None) -> dict[str, Any]:
    """Perplexity of `model` on `data` (`rows`: its text, when already read)."""
    check_seqlen(model.config, seqlen, flag, getattr(model.config, "_name_or_path", "") or "the model")
    ids = evaluation_tokens(tokenizer, data, rows)
    model.to(device)
    try:
        with full_fp32():
            result = perplexity(model, ids, seqlen, max_tokens, device=device, progress=progress)
    finally:
        model.to("cpu")
    return {"data": data, **result}


def recipe_inputs(recipe: Recipe) -> list[tuple[str, str | None]]:
    """The local inputs a run read (model, calibration and evaluation text): an output may not touch them."""
    evaluated = recipe.results.get("eval", {}).get("data")
    return [("--model", recipe.model), ("--calib", recipe.config.get("calib")), ("--eval-data", evaluated)]


def save_pruned(model, tokenizer, recipe: Recipe, out: Path, overwrite: bool = False) -> Path:
    """`save_pretrained` (safetensors) plus `rose_recipe.json`, written atomically, never onto an input."""
    with atomic_output(out, overwrite, recipe_inputs(recipe)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        recipe.save(tmp)
    return Path(out)


__all__ = ["prune", "evaluate", "save_pruned", "check_device"]
