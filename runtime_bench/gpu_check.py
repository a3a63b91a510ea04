"""GPU check of a `semi-structured` export; needs CUDA, so it runs on a GPU machine, not in the CPU test suite.

    python -m runtime_bench.gpu_check OUT_DIR [--json report.json]

OUT_DIR is an export output (its `semi-structured/` is used) or a semi-structured directory. It checks:
1. the stored CUTLASS packing of every packed layer equals what `to_sparse_semi_structured` (CUTLASS backend)
   computes on the GPU from the same dense weight;
2. for each backend, a model from `load_sparse` gives logits within `REL_TOL` (relative L2 error) of the dense
   fp16 model with the same weights. A backend this GPU or build cannot run (CUTLASS's 2:4 kernels refuse
   Hopper, for example) is reported as unsupported, not failed.
3. rose's GPU 2:4 path (`runtime.gpu24.load_gpu24`, each stored form): logits of a prompt long enough for the
   cuSPARSELt path (`LONG_PROMPT`, over 16 tokens) within `REL_TOL` of the dense fp16 model, and `GREEDY_STEPS`
   greedy tokens (decode through the Triton kernel) identical to the dense model's, both eagerly and with the
   CUDA-graph generator (`runtime.generate`).
Exit status: 0 when nothing failed, 1 when a check failed, 2 when the machine has no CUDA.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from rose.errors import RoseError
from runtime.errors import RoseRuntimeError, first_line
from runtime.semi import BACKENDS, INDEX, WEIGHTS, cutlass_unpack, load_dense, load_sparse

REL_TOL = 1e-2
PROMPT = "The capital of France is Paris. The capital of Germany is"
LONG_PROMPT = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
               "structure in Paris. Its base is square, measuring 125 metres on each side. During its construction,")
GREEDY_STEPS = 32


def _semi_dir(path: Path) -> Path:
    path = Path(path)
    return path / "semi-structured" if (path / "semi-structured" / INDEX).is_file() else path


def packing_check(path: Path, device: str = "cuda") -> dict:
    """Stored (packed, meta) against `to_sparse_semi_structured`'s CUTLASS packing of the unpacked weight."""
    from safetensors.torch import load_file
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    index = json.loads((path / INDEX).read_text())
    stored = load_file(path / WEIGHTS)
    mismatched = []
    forced = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = True
    try:
        for module in index["packed"]:
            packed, meta = stored[f"{module}.packed"], stored[f"{module}.meta"]
            ref = to_sparse_semi_structured(cutlass_unpack(packed, meta).to(device))
            if not (torch.equal(ref.packed.cpu(), packed) and torch.equal(ref.meta.cpu(), meta)):
                mismatched.append(module)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = forced
    return {"layers": len(index["packed"]), "mismatched": mismatched, "ok": not mismatched}


@torch.no_grad()
def logits_check(path: Path, device: str = "cuda", prompt: str = PROMPT) -> dict:
    """Relative L2 error of each backend's logits against the dense fp16 model with the same weights."""
    from transformers import AutoTokenizer

    ids = torch.tensor([AutoTokenizer.from_pretrained(path)(prompt)["input_ids"]], device=device)
    dense = load_dense(path, device)
    ref = dense(input_ids=ids).logits.float()
    del dense
    out = {}
    for backend in BACKENDS:
        try:
            model = load_sparse(path, device=device, backend=backend)
            logits = model(input_ids=ids).logits.float()
        except (RuntimeError, NotImplementedError, RoseRuntimeError) as exc:
            first = first_line(exc)
            out[backend] = {"ok": None, "unsupported": first[:300]}
            continue
        rel = float((logits - ref).norm() / ref.norm())
        out[backend] = {"ok": rel < REL_TOL, "rel_error": rel, "tolerance": REL_TOL,
                        "sparse_layers": len(model.rose_sparse["sparse"]), "dense_layers": model.rose_sparse["dense"],
                        "same_argmax": float((logits.argmax(-1) == ref.argmax(-1)).float().mean())}
        del model
        torch.cuda.empty_cache()
    return out


def greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy tokens with transformers' DynamicCache, eagerly (the first token and `steps` more)."""
    from transformers import DynamicCache

    from runtime.generate import cache_kwarg

    kw = cache_kwarg(model)
    cache = DynamicCache(config=model.config)
    tok = model(input_ids=ids, **{kw: cache}, use_cache=True).logits[:, -1:].argmax(-1)
    out = [tok]
    for _ in range(steps):
        tok = model(input_ids=tok, **{kw: cache}, use_cache=True).logits[:, -1:].argmax(-1)
        out.append(tok)
    return torch.cat(out, dim=1).cpu()


def _first_difference(a: torch.Tensor, b: torch.Tensor) -> int | None:
    diff = (a != b).flatten().nonzero()
    return int(diff[0]) if len(diff) else None


@torch.no_grad()
def gpu24_check(path: Path, device: str = "cuda", prompt: str = LONG_PROMPT, steps: int = GREEDY_STEPS) -> dict:
    """rose's GPU 2:4 path against the dense fp16 model of the same weights: logits and greedy tokens."""
    from transformers import AutoTokenizer

    from runtime.generate import GraphedGenerator
    from runtime.gpu24 import ALGOS, load_gpu24

    ids = torch.tensor([AutoTokenizer.from_pretrained(path)(prompt)["input_ids"]], device=device)
    dense = load_dense(path, device)
    ref = dense(input_ids=ids).logits.float()
    ref_tokens = greedy(dense, ids, steps)
    del dense
    out = {"prompt_tokens": int(ids.shape[1]), "steps": steps, "tolerance": REL_TOL}
    for store in ("auto", "cusparselt", "triton"):
        try:
            model = load_gpu24(path, device, store=store)
            logits = model(input_ids=ids).logits.float()
            eager = greedy(model, ids, steps)
            gen = GraphedGenerator(model, ids.shape[1] + steps + 2)
            graphed = gen.generate(ids, steps)
        except (RuntimeError, RoseRuntimeError) as exc:
            out[store] = {"ok": False, "error": first_line(exc)[:300]}
            continue
        rel = float((logits - ref).norm() / ref.norm())
        report = model.rose_gpu24
        out[store] = {"rel_error": rel, "forms": report["forms"], "sparse_layers": len(report["sparse"]),
                      "dense_layers": report["dense"],
                      "linear_bytes_vs_dense": report["weight_bytes"] / max(1, report["dense_weight_bytes"]),
                      "greedy_eager_same": bool(torch.equal(eager, ref_tokens)),
                      "greedy_graphed_same": bool(torch.equal(graphed, ref_tokens)),
                      "first_difference_eager": _first_difference(eager, ref_tokens),
                      "first_difference_graphed": _first_difference(graphed, ref_tokens),
                      "graph_error": gen.graph_error, "graph_captures": gen.captures}
        out[store]["ok"] = rel < REL_TOL and out[store]["greedy_eager_same"] and out[store]["greedy_graphed_same"]
        del model, gen
        torch.cuda.empty_cache()
    out["algorithms"] = ALGOS.report()
    return out


def run(path: Path, device: str = "cuda") -> dict:
    if not torch.cuda.is_available():
        raise RoseError("the semi-structured GPU check needs CUDA, and this machine has none")
    path = _semi_dir(path)
    report = {"path": str(path), "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "cusparselt": torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None,
              "packing": packing_check(path, device), "logits": logits_check(path, device),
              "gpu24": gpu24_check(path, device)}
    report["ok"] = (report["packing"]["ok"] and all(r["ok"] is not False for r in report["logits"].values())
                    and all(r["ok"] for k, r in report["gpu24"].items() if isinstance(r, dict) and "ok" in r))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="an export output directory or its semi-structured/ directory")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    try:
        report = run(args.path, args.device)
    except (RoseError, RoseRuntimeError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
