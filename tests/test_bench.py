"""runtime_bench on the CPU: every CPU backend runs (linear and end to end on a tiny 2:4 export), results.json
carries the documented fields, the correctness gate rejects a deliberately wrong backend, and every bad input is
a one-line error with exit code 2. Tiny shapes, few iterations: timings here prove plumbing, not speed."""
import json
from pathlib import Path

import pytest
import torch

from conftest import make_pruned, one_line_error, run_cli as run

CPU_BACKENDS = ["torch-cpu", "cpp", "onnx-cpu", "onnx-packed24-cpu", "onnx-sparse24-cpu"]
GENAI_BACKENDS = ["genai-cpu", "genai-sparse24-cpu"]  # model benchmark only
CUDA_BACKENDS = ["torch-cuda", "cusparselt", "cutlass", "onnx-cuda", "onnx-packed24-cuda", "triton24", "gpu24",
                 "gpu24-cslt", "gpu24-triton"]
STAMP = ["device_name", "threads", "torch", "onnxruntime", "cuda", "driver", "cusparselt", "cpu_model"]
FAST = ["--iters", "2", "--warmup", "1"]


def ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """A tiny LLaMA pruned 2:4 by magnitude and exported as hf, onnx and onnx-packed24."""
    root = tmp_path_factory.mktemp("bench")
    pruned = make_pruned(root, "2:4", hidden=64)
    ok(run("export", "--pruned", pruned, "--out", root / "exp", "--formats", "hf,onnx,onnx-packed24,onnx-sparse24",
           "-q"))
    return root / "exp"


def results(out: Path) -> dict:
    assert (out / "results.md").is_file()
    return json.loads((out / "results.json").read_text())


def by_backend(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["backend"], []).append(r)
    return out


def assert_skipped_cuda(doc: dict):
    """Every CUDA backend the run lists (triton24 has no model benchmark) is skipped here, with a reason."""
    if not torch.cuda.is_available():
        listed = [b for b in CUDA_BACKENDS if b in doc["backends"]]
        assert len(listed) >= len(CUDA_BACKENDS) - 1
        assert set(listed) <= set(doc["skipped"]) and all(doc["skipped"][b] for b in listed)
        assert all(not doc["backends"][b]["available"] for b in listed)


# ---- bench linear --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_linear_every_cpu_backend_runs_and_reports(export_dir, tmp_path):
    out = tmp_path / "lin"
    ok(run("bench", "linear", "--model", export_dir, "--shapes", "128x64", "--tokens", "1,4", "--dtypes", "fp32",
           "--threads", "1", "--no-rss", *FAST, "--out", out))
    doc = results(out)
    assert doc["benchmark"] == "linear" and doc["environment"]["threads"] == 1
    assert_skipped_cuda(doc)
    recs = by_backend(doc["records"])
    assert set(CPU_BACKENDS) <= set(recs)
    for name in CPU_BACKENDS:
        assert [r["tokens"] for r in recs[name]] == [1, 4]
        for r in recs[name]:
            assert r["status"] == "ok" and r["shape"] == [128, 64] and r["layers"] == ["mlp.gate_proj", "mlp.up_proj"]
            assert r["dtype"] == "fp32" and r["batch"] == 1 and r["device"] == "cpu" and r["runs"] == 2
            assert r["median_ms"] > 0 and r["iqr_ms"] >= 0 and len(r["times_ms"]) == 2
            dense_bytes = 128 * 64 * 4
            assert r["error"] <= r["tolerance"] == 1e-5
            # rose's kernel, in PyTorch and in onnxruntime, holds 2.125 of every 4 bytes
            packed = name in ("cpp", "onnx-sparse24-cpu")
            assert r["weight_bytes"] == (dense_bytes * 17 // 32 if packed else dense_bytes), name
            assert all(k in r for k in STAMP) and r["device_name"] == doc["environment"]["cpu_model"]
        one = next(r for r in recs[name] if r["tokens"] == 1)
        assert one["weight_gbs"] > 0 and one["copy_gbs"] > 0
    for name in ("onnx-packed24-cpu", "onnx-sparse24-cpu"):
        packed = recs[name][0]
        assert packed["baseline"] == "onnx-cpu" and packed["median_ms_ratio"] > 0
        assert packed["weight_file_bytes"] < recs["onnx-cpu"][0]["weight_file_bytes"]
    assert (out / "speedup_128x64.png").is_file() and (out / "latency_fp32.png").is_file()
    assert "dense/sparse" in (out / "results.md").read_text()


def test_linear_half_dtypes_gate_or_skip(tmp_path):
    out = tmp_path / "half"
    ok(run("bench", "linear", "--shapes", "32x64", "--tokens", "2", "--dtypes", "fp16,bf16", "--backends",
           ",".join(CPU_BACKENDS), "--no-rss", *FAST, "--out", out))
    for r in results(out)["records"]:
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "ok":
            assert r["tolerance"] == 1e-2 and r["error"] <= 1e-2
        else:
            assert r["reason"]
    onnx_bf16 = [r for r in results(out)["records"] if r["backend"] == "onnx-cpu" and r["dtype"] == "bf16"]
    assert onnx_bf16[0]["status"] == "skipped" and "bfloat16" in onnx_bf16[0]["reason"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reasons given without CUDA")
def test_gpu_24_backends_say_why_they_cannot_run_here(tmp_path):
    out = tmp_path / "gpu24"
    ok(run("bench", "linear", "--shapes", "32x64", "--tokens", "1,20", "--dtypes", "fp16", "--backends",
           "torch-cpu,triton24,gpu24,gpu24-cslt,gpu24-triton", "--no-rss", *FAST, "--out", out))
    doc = results(out)
    for name in ("triton24", "gpu24", "gpu24-cslt", "gpu24-triton"):
        assert doc["skipped"][name] == "no CUDA device here (torch.cuda.is_available() is False)"
        assert doc["backends"][name]["baseline"] == "torch-cuda" and doc["backends"][name]["sparse"]
    assert {r["backend"] for r in doc["records"]} == {"torch-cpu"}


def test_a_backend_this_gpu_refuses_is_a_skipped_case(monkeypatch):
    """CUTLASS's 2:4 kernels refuse Hopper with a RuntimeError at the first product: the builders turn that into
    Unsupported (skipped records with PyTorch's reason), not errors."""
    from runtime_bench.registry import Unsupported
    from runtime_bench.semi_backends import refused

    def refuse(x, w, b=None):
        raise RuntimeError("sparse_semi_structured_mad_op: Supported only on GPUs with compute capability 8.x\nmore")

    weight = torch.ones(32, 64, dtype=torch.float16)
    refused("cutlass", weight, torch.float16)                          # a product that works: nothing raised
    monkeypatch.setattr(torch.nn.functional, "linear", refuse)
    with pytest.raises(Unsupported, match=r"^cutlass refused on this GPU: sparse_semi_structured_mad_op: Supported "
                                          r"only on GPUs with compute capability 8.x$"):
        refused("cutlass", weight, torch.float16)


def test_references_and_random_models_live_where_the_backends_run():
    from runtime_bench.backends import BACKENDS
    from runtime_bench.model_bench import reference_device
    from runtime_bench.source import ModelSource, clone, same_device

    assert reference_device([BACKENDS["torch-cpu"], BACKENDS["cpp"]]) == "cpu"
    assert reference_device([BACKENDS["torch-cpu"], BACKENDS["gpu24"]]) == "cuda"
    assert same_device("cpu", torch.device("cpu")) and not same_device("cuda", torch.device("cpu"))
    source = ModelSource.random("tiny", 1, 3)
    a = source.dense_fp32()
    assert source.parameters() == sum(p.numel() for p in {id(p): p for p in a.parameters()}.values())
    source.release()
    b = source.dense_fp32()                                            # rebuilt bit for bit from the seed
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    half = clone(b, "cpu", torch.bfloat16)
    assert half is not b and next(half.parameters()).dtype == torch.bfloat16
    assert half.lm_head.weight is half.model.embed_tokens.weight       # tied again
    assert torch.equal(half.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight.bfloat16())
    assert clone(b, "cpu", torch.float32) is b
    source.check_reference_fits()                                      # on the CPU: nothing to check


def test_presets_cover_the_issue_and_give_llama_shapes():
    from runtime_bench.presets import PRESETS, preset_shapes

    assert {"llama-2-7b", "llama-2-13b", "llama-3-8b", "mistral-7b", "llama-2-70b", "smollm2-135m"} <= set(PRESETS)
    assert preset_shapes("llama-2-7b") == {(4096, 4096): ["q_proj", "k_proj", "v_proj", "o_proj"],
                                           (11008, 4096): ["gate_proj", "up_proj"], (4096, 11008): ["down_proj"]}
    assert (1024, 4096) in preset_shapes("llama-3-8b") and (1024, 8192) in preset_shapes("llama-2-70b")
    assert preset_shapes("smollm2-135m")[(192, 576)] == ["k_proj", "v_proj"]


class _WrongLinear:
    """Test double: a 'sparse kernel' that forgets a sliver of the mask (relative error ~1e-3)."""

    @staticmethod
    def build(W, dtype, threads):
        from runtime_bench.backends import LinearOp

        Wd = (W + (W == 0) * 1e-3).to(dtype)
        return LinearOp(fn=lambda x: torch.nn.functional.linear(x, Wd), to_input=lambda x: x.to(dtype),
                        to_output=lambda y: y.float(), weight_bytes=Wd.nbytes)


def test_gate_rejects_a_wrong_backend(monkeypatch, tmp_path):
    from runtime_bench.backends import BACKENDS, Backend

    wrong = Backend("wrong-cpu", "cpu", True, "torch-cpu", lambda: None, _WrongLinear.build, None, "test double")
    monkeypatch.setitem(BACKENDS, "wrong-cpu", wrong)
    out = tmp_path / "gate"
    ok(run("bench", "linear", "--shapes", "32x64", "--tokens", "1,3", "--dtypes", "fp32", "--backends",
           "torch-cpu,wrong-cpu", "--no-rss", *FAST, "--out", out))
    recs = by_backend(results(out)["records"])
    assert all(r["status"] == "ok" and "median_ms" in r for r in recs["torch-cpu"])
    for r in recs["wrong-cpu"]:
        assert r["status"] == "wrong" and r["error"] > r["tolerance"] and "median_ms" not in r
        assert "median_ms_ratio" not in r
    assert "**wrong**" in (out / "results.md").read_text()


def test_a_backend_that_takes_few_tokens_is_skipped_above(monkeypatch, tmp_path):
    """A decode kernel (triton24 takes 1 to 16 rows) is gated and timed up to its limit, skipped with the reason
    above it; what the op reports about itself (`info`) lands in its records."""
    from runtime_bench.backends import BACKENDS, Backend, LinearOp

    def build(W, dtype, threads):
        Wd = W.to(dtype)
        return LinearOp(fn=lambda x: torch.nn.functional.linear(x, Wd), to_input=lambda x: x.to(dtype),
                        to_output=lambda y: y.float(), weight_bytes=Wd.nbytes, max_tokens=4, info={"form": "probe"})

    monkeypatch.setitem(BACKENDS, "few-cpu", Backend("few-cpu", "cpu", True, "torch-cpu", lambda: None, build))
    out = tmp_path / "few"
    ok(run("bench", "linear", "--shapes", "32x64", "--tokens", "1,4,8", "--dtypes", "fp32", "--backends",
           "torch-cpu,few-cpu", "--no-rss", *FAST, "--out", out))
    recs = {r["tokens"]: r for r in results(out)["records"] if r["backend"] == "few-cpu"}
    assert recs[1]["status"] == recs[4]["status"] == "ok" and recs[1]["form"] == "probe"
    assert recs[8]["status"] == "skipped" and recs[8]["reason"] == "takes at most 4 tokens (rows of x)"
    assert "median_ms_ratio" in recs[4] and recs[1]["timing"] == "eager"


# ---- bench model ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_model_every_cpu_backend_runs_and_reports(export_dir, tmp_path):
    out = tmp_path / "model"
    ok(run("bench", "model", "--pruned", export_dir, "--prompt-lens", "3,5", "--batch", "1,2", "--decode-tokens",
           "2", "--threads", "1", *FAST, "--out", out))
    doc = results(out)
    assert doc["benchmark"] == "model"
    assert set(doc["formats_bytes"]) == {"hf", "onnx", "onnx-packed24", "onnx-sparse24"}
    assert_skipped_cuda(doc)
    recs = by_backend(doc["records"])
    for name in CPU_BACKENDS + (GENAI_BACKENDS if not doc["skipped"].get("genai-cpu") else []):
        assert sorted((r["batch"], r["tokens"]) for r in recs[name]) == [(1, 3), (1, 5), (2, 3), (2, 5)]
        for r in recs[name]:
            assert r["status"] == "ok" and r["dtype"] == "fp32" and r["decode_tokens"] == 2
            assert r["error"] <= r["tolerance"] == 1e-4
            for key in ("prefill_ms", "prefill_iqr_ms", "ttft_ms", "decode_ms", "decode_tokens_per_s",
                        "median_ms", "iqr_ms", "weight_bytes", "peak_rss_bytes"):
                assert r[key] is not None and r[key] >= 0, key
            assert all(k in r for k in STAMP)
    for name in ("onnx-packed24-cpu", "onnx-sparse24-cpu"):
        for r in recs[name]:
            assert r["baseline"] == "onnx-cpu" and r["prefill_ms_ratio"] > 0 and r["decode_tokens_per_s_ratio"] > 0
            assert r["greedy_same_as_dense"]
    for dense, sparse in zip(recs["torch-cpu"], recs["cpp"]):
        assert sparse["baseline"] == "torch-cpu" and sparse["decode_tokens_per_s_ratio"] > 0
        assert dense["greedy_same_as_dense"] and sparse["greedy_same_as_dense"]
        assert sparse["linear_weight_bytes"] <= 0.56 * dense["linear_weight_bytes"]
    assert (out / "latency_prefill.png").is_file() and (out / "decode_tokens_per_s.png").is_file()


@pytest.mark.slow
def test_model_random_preset_and_onnx_needs_an_export(tmp_path):
    out = tmp_path / "random"
    ok(run("bench", "model", "--config", "tiny", "--random", "--layers", "1", "--prompt-lens", "4",
           "--decode-tokens", "2", "--backends", "torch-cpu,cpp,onnx-cpu", "--no-rss", *FAST, "--out", out))
    recs = by_backend(results(out)["records"])
    assert recs["torch-cpu"][0]["status"] == "ok" and recs["torch-cpu"][0]["error"] == 0.0
    assert recs["cpp"][0]["status"] == "ok" and recs["cpp"][0]["error"] <= 1e-4
    assert recs["onnx-cpu"][0]["status"] == "skipped" and "--pruned" in recs["onnx-cpu"][0]["reason"]


@pytest.mark.slow
def test_linear_peak_rss_comes_from_a_fresh_process():
    from runtime_bench.memory import peak_rss

    rss = peak_rss({"kind": "linear", "backend": "onnx-packed24-cpu", "shape": [64, 128], "dtype": "fp32",
                    "tokens": 4, "seed": 0, "threads": 1})
    assert rss["peak_rss_bytes"] >= rss["rss_before_build_bytes"] > 0, rss
    assert peak_rss({"kind": "linear", "backend": "no-such", "shape": [8, 8], "dtype": "fp32", "tokens": 1,
                     "seed": 0, "threads": 1})["rss_error"].startswith("exit 1")


# ---- timing --------------------------------------------------------------------------------------------------

def test_timing_interleaves_and_summarizes():
    from runtime_bench.timing import Timed, interleaved

    calls = []
    stats = interleaved({"a": Timed(lambda _: calls.append("a")), "b": Timed(lambda s: calls.append(s),
                                                                               setup=lambda: "b")}, warmup=1, iters=3)
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b"]  # warm-up, then rounds in rotating order
    assert stats["a"]["runs"] == 3 and stats["a"]["min_ms"] <= stats["a"]["median_ms"] <= stats["a"]["max_ms"]


# ---- one-line errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["linear", "--preset", "tiny", "--backends", "torch-cpu,nope"], "unknown backend 'nope'"),
    (["linear", "--preset", "llama-9b"], "unknown preset 'llama-9b'"),
    (["linear", "--preset", "tiny", "--shapes", "999x64"], "unknown shape 999x64"),
    (["linear", "--shapes", "12by64"], "unknown shape '12by64'"),
    (["linear", "--preset", "tiny", "--tokens", "0,8"], "--tokens must be integers >= 1, got 0"),
    (["linear", "--preset", "tiny", "--tokens", "-3"], "--tokens must be integers >= 1, got -3"),
    (["linear", "--preset", "tiny", "--dtypes", "fp8"], "unknown dtype 'fp8'"),
    (["linear"], "choose one source of shapes"),
    (["model", "--pruned", "/nonexistent/pruned"], "does not exist"),
    (["model", "--config", "tiny", "--random", "--prompt-lens", "0"], "--prompt-lens must be integers >= 1"),
    (["model", "--config", "tiny", "--random", "--batch", "0"], "--batch must be integers >= 1"),
    (["model", "--config", "nope", "--random"], "unknown preset 'nope'"),
    (["model", "--config", "tiny"], "--config PRESET --random"),
    (["model", "--config", "tiny", "--random", "--backends", "cuda-magic"], "unknown backend 'cuda-magic'"),
    (["model", "--config", "tiny", "--random", "--backends", "torch-cpu", "--eager-too", "gpu24"],
     "unknown backend 'gpu24'"),
    (["model", "--config", "tiny", "--random", "--eager-too", "gpu24", "--no-cuda-graphs"], "needs --cuda-graphs"),
    (["model", "--config", "tiny", "--random", "--backends", "triton24"], "backend 'triton24' has no model benchmark"),
])
def test_bad_inputs_are_one_line_errors(args, fragment, tmp_path):
    one_line_error(run("bench", *args, "--out", tmp_path / "never"), fragment)
    assert not (tmp_path / "never").exists()
