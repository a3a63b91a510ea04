"""runtime/generate.py on the CPU: the static-cache, graph-per-step generator with the `Deferred` capturer, which
runs every line of it but the CUDA graph itself (capture stores the step, replay calls it). Greedy tokens and
logits must equal transformers' own eager loop with a DynamicCache; graph bookkeeping, growth, fallback when a
capture fails, and one-line errors. The benchmark's graphed runner rides on it. A `gpu` test captures for real."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from runtime import RoseRuntimeError
from runtime.generate import ATTENTION, Deferred, GraphedGenerator, cache_kwarg


def eager_greedy(model, ids, steps):
    from transformers import DynamicCache

    kw = cache_kwarg(model)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        logits = model(input_ids=ids, **{kw: cache}, use_cache=True).logits
        tok = logits[:, -1:].argmax(-1)
        toks = [tok]
        for _ in range(steps):
            tok = model(input_ids=tok, **{kw: cache}, use_cache=True).logits[:, -1:].argmax(-1)
            toks.append(tok)
    return logits, torch.cat(toks, 1)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", init=0.2)


def ids(n, seed=0, batch=1):
    return torch.randint(0, 70, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_greedy_tokens_and_logits_equal_the_eager_loop(model):
    cap = Deferred()
    gen = GraphedGenerator(model, max_len=48, capture=cap)
    for n, steps, seed in [(9, 12, 0), (5, 7, 1), (9, 3, 2), (17, 20, 3)]:
        prompt = ids(n, seed)
        logits, tokens = eager_greedy(model, prompt, steps)
        assert torch.allclose(gen.prefill(prompt), logits, atol=1e-5)
        assert torch.equal(gen.generate(prompt, steps), tokens), (n, steps)
    assert cap.captured == gen.captures == 4        # prefill graphs for 9, 5 and 17 tokens, one decode step
    assert gen.graph_error is None and model.config._attn_implementation != ATTENTION   # restored


def test_batch_of_two(model):
    prompt = ids(6, 4, batch=2)
    _, tokens = eager_greedy(model, prompt, 5)
    assert torch.equal(GraphedGenerator(model, 16, capture=Deferred()).generate(prompt, 5), tokens)


def test_the_cache_grows_and_graphs_are_captured_again(model):
    gen = GraphedGenerator(model, max_len=8, capture=Deferred())
    prompt = ids(6, 5)
    _, tokens = eager_greedy(model, prompt, 10)
    assert torch.equal(gen.generate(prompt, 10), tokens)
    assert gen.max_len >= 17 and gen.captures == 2


def test_lengths_beyond_max_graphs_run_eagerly(model):
    cap = Deferred()
    gen = GraphedGenerator(model, max_len=32, capture=cap, max_graphs=1)
    for n in (4, 5, 6):
        prompt = ids(n, n)
        assert torch.equal(gen.generate(prompt, 3), eager_greedy(model, prompt, 3)[1])
    assert cap.captured == 2                        # one prefill graph (4 tokens) and the decode step


class Refusing(Deferred):
    def capture(self, fn):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")


def test_a_refused_capture_falls_back_to_eager_and_says_why(model, caplog):
    gen = GraphedGenerator(model, max_len=32, capture=Refusing())
    prompt = ids(7, 6)
    assert torch.equal(gen.generate(prompt, 4), eager_greedy(model, prompt, 4)[1])
    assert gen.graph_error == ("prefill of 7 tokens: RuntimeError: CUDA error: operation not permitted when stream is "
                               "capturing")
    assert gen.captures == 0 and "running eagerly" in caplog.text


def test_one_line_errors(model):
    gen = GraphedGenerator(model, max_len=16, capture=Deferred())
    with pytest.raises(RoseRuntimeError, match=r"^call start\(ids\) before decode\(steps\)$"):
        gen.decode(3)
    gen.start(ids(10))
    with pytest.raises(RoseRuntimeError, match="10 prompt tokens and 9 more exceed the cache of 16"):
        gen.decode(9)
    with pytest.raises(RoseRuntimeError, match="max_len must be >= 2"):
        GraphedGenerator(model, max_len=1, capture=Deferred())
    if not torch.cuda.is_available():
        with pytest.raises(RoseRuntimeError, match="CUDA graphs need a model on a CUDA device"):
            GraphedGenerator(model, max_len=16)


def test_cache_keyword_follows_the_transformers_release(model):
    import inspect

    expected = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    assert cache_kwarg(model) == expected


def test_the_benchmarks_graphed_runner(model):
    from runtime_bench.torch_backends import GraphedRunner, TorchRunner

    base = TorchRunner(model, "cpu")
    runner = GraphedRunner(base, 40, capture=Deferred())
    prompt = ids(8, 7)
    logits, tokens = eager_greedy(model, prompt, 6)
    assert runner.graphs and not base.graphs and runner.eager() is base and runner.graph_error is None
    assert torch.allclose(runner.logits(prompt), logits.float(), atol=1e-5)
    runner.prime(prompt, 6)
    assert torch.equal(runner.decode(runner.start(prompt), 6), tokens)
    assert torch.equal(runner.first_token(prompt), tokens[:, :1])
    assert torch.equal(base.decode(base.start(prompt), 6), tokens)
    assert runner.weight_bytes == base.weight_bytes and runner.linear_bytes == base.linear_bytes


def test_bench_model_variants(model, monkeypatch):
    """Which runners bench model gates and times per built model: on CUDA with --cuda-graphs the graphed one, plus
    the eager one for the backends named in --eager-too; elsewhere the runner itself."""
    from runtime_bench import torch_backends
    from runtime_bench.cases import Settings
    from runtime_bench.model_bench import variants

    monkeypatch.setattr(torch_backends, "CAPTURE", Deferred())
    cpu = torch_backends.TorchRunner(model, "cpu")
    assert variants(cpu, Settings(), 32, "torch-cpu") == [cpu]
    fake_cuda = torch_backends.TorchRunner(model, "cpu")
    fake_cuda.cuda = True
    graphed, = variants(fake_cuda, Settings(), 32, "gpu24")
    assert graphed.graphs and graphed.eager() is fake_cuda and graphed.gen.max_len == 32
    both = variants(fake_cuda, Settings(eager_too=("gpu24",)), 32, "gpu24")
    assert [r.graphs for r in both] == [True, False] and both[1] is fake_cuda
    assert variants(fake_cuda, Settings(cuda_graphs=False), 32, "gpu24") == [fake_cuda]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_give_the_eager_tokens():
    """Real capture: the graphs compute what the same steps compute eagerly (the same kernels: the same bits), and
    the prefill logits match transformers' own eager forward (other kernels: within fp16 rounding)."""
    m = tiny_model("llama", init=0.2).half().cuda()
    prompt = ids(33, 8).cuda()
    gen = GraphedGenerator(m, 64)
    out = gen.generate(prompt, 16)
    assert gen.graph_error is None and gen.captures == 2
    assert torch.equal(out, GraphedGenerator(m, 64, capture=Deferred()).generate(prompt, 16))
    logits, _ = eager_greedy(m, prompt, 1)
    graphed = gen.prefill(prompt).float()
    assert float((graphed - logits.float()).norm() / logits.float().norm()) < 1e-2
