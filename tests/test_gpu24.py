"""rose's GPU 2:4 layer (runtime/gpu24.py) on the CPU: everything above cuSPARSELt itself.

cuSPARSELt runs only on CUDA, so these tests give the layer a stand-in (`FakeCslt`) with cuSPARSELt's interface
and output layout: `compress` returns [kept values | metadata] in one buffer, `mm(compressed, x^T)` writes W x^T
(out x tokens, row-major), `search` returns an algorithm id. The Triton kernel runs in Triton's interpreter (the
`interpreter` fixture of test_triton24, skipped with the reason where it cannot run). What they check: the token
buckets and the algorithm cache, the dispatch by token count, the stored forms and their bytes, sharing the kept
values and its refusal, output layouts, whole-model swaps, the loader, and one-line errors. Tests marked `gpu` run
the real thing on CUDA.
"""
from __future__ import annotations

import pytest
import torch

from runtime import RoseRuntimeError
from runtime import gpu24 as g
from runtime import triton24 as t24


@pytest.fixture
def interpreter(monkeypatch):
    """Triton's interpreter on CPU tensors (test_triton24 imports Triton with TRITON_INTERPRET=1; imported here only
    when a test asks, so that `pytest -m gpu` on a GPU never imports Triton in interpreter mode)."""
    import test_triton24

    if test_triton24.WHY_NOT is not None:
        pytest.skip(test_triton24.WHY_NOT)
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def random_24(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A 2:4 weight with groups of two, one and no nonzeros."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols // 4, 4, generator=gen)
    keep = torch.zeros_like(W, dtype=torch.bool).scatter_(2, torch.rand(W.shape, generator=gen).topk(2, dim=2).indices,
                                                          True)
    kind = torch.randint(0, 6, (rows, cols // 4, 1), generator=gen)
    W = torch.where(keep, W, torch.zeros(()))
    W = torch.where(kind == 1, W * (torch.arange(4) == keep.float().argmax(-1, keepdim=True)), W)   # one nonzero
    W = torch.where(kind == 2, torch.zeros(()), W)                                                  # none
    return W.reshape(rows, cols).to(dtype)


class FakeCslt:
    """cuSPARSELt's interface on CPU tensors. `order`: how a group with fewer than two nonzeros is stored ("high":
    its highest zero columns, unlike rose's packer, which takes the lowest). `layout`: "plain" ([values row-major |
    2-bit-index nibbles]) or "tiled" (values of each row reversed: not the kernel's order)."""

    name, cpu_ok = "fake", True

    def __init__(self, layout: str = "plain", order: str = "high", search_fails: bool = False,
                 bad_alg: int | None = None):
        self.layout, self.order, self.search_fails, self.bad_alg = layout, order, search_fails, bad_alg
        self.searched: list[int] = []
        self.algs: list[int] = []

    def why_not(self, device):
        return None

    def row_multiple(self, dtype):
        return 8

    def min_shape(self, dtype):
        return 16, 16

    def compress(self, W):
        rows, cols = W.shape
        groups = W.reshape(rows, cols // 4, 4)
        col = torch.arange(4)
        nz = groups != 0
        # rank: nonzeros first, then zeros from the highest (or lowest) column; keep two, in column order
        score = nz.float() * 10 + (col.float() if self.order == "high" else -col.float())
        keep = torch.zeros_like(nz).scatter_(2, score.topk(2, dim=2).indices, True)
        values = groups[keep].reshape(rows, cols // 2)
        index = col.expand_as(keep)[keep].reshape(rows, cols // 4, 2)            # kept columns, 2 bits each
        nibbles = (index[..., 0] | (index[..., 1] << 2)).to(torch.uint8).reshape(-1)
        meta = nibbles[0::2] | (nibbles[1::2] << 4)
        if self.layout == "tiled":
            values = values.flip(1)
        shape = torch.tensor([rows, cols], dtype=torch.int32).view(W.dtype)    # a trailer: what the weight was
        return torch.cat([values.reshape(-1), meta.view(W.dtype), shape])

    def dense(self, comp):
        """The weight a buffer stands for, read back from the buffer alone (it survives copies and moves)."""
        rows, cols = comp[-4:].view(torch.int32).tolist()
        values = comp[: rows * cols // 2].reshape(rows, cols // 2)
        if self.layout == "tiled":
            values = values.flip(1)
        meta = comp[rows * cols // 2:-4].view(torch.uint8)
        nibbles = torch.stack([meta & 15, meta >> 4], -1).reshape(rows, cols // 4)
        index = torch.stack([nibbles & 3, nibbles >> 2], -1).long()
        W = torch.zeros(rows, cols // 4, 4, dtype=comp.dtype)
        W.scatter_(2, index, values.reshape(rows, cols // 4, 2))
        return W.reshape(rows, cols)

    def mm(self, comp, dense_t, alg):
        self.algs.append(alg)
        if self.bad_alg is not None and alg == self.bad_alg:
            raise RuntimeError("CUDA error: invalid algorithm\nmore")
        W = self.dense(comp)
        return (W.float() @ dense_t.float()).to(W.dtype)       # out x tokens, row-major, as cuSPARSELt writes it

    def search(self, comp, dense_t):
        self.searched.append(dense_t.shape[1])
        if self.search_fails:
            raise RuntimeError("cusparseLt search failed\ndetails")
        return 3


def ref(x, W, bias=None):
    y = x.float().reshape(-1, x.shape[-1]) @ W.float().T
    if bias is not None:
        y += bias.float()
    return y.reshape(*x.shape[:-1], W.shape[0])


def close(y, r, tol=2e-3):
    return float((y.float() - r).norm() / r.norm()) < tol


# ---- buckets and the algorithm cache ---------------------------------------------------------------------------

def test_token_buckets():
    assert [g.token_bucket(t) for t in (1, 8, 16, 17, 32, 33, 512, 513, 2048, 8192, 8193, 10**6)] == \
        [16, 16, 16, 32, 32, 64, 512, 1024, 2048, 8192, 16384, 16384]
    with pytest.raises(RoseRuntimeError, match="token count must be >= 1"):
        g.token_bucket(0)


def test_algorithm_cache_searches_once_per_shape_dtype_and_bucket():
    ops, cache = FakeCslt(), g.AlgoCache()
    comp, x = torch.zeros(4), torch.zeros(64, 40)
    assert cache.get(ops, comp, x, 128, 64, torch.float16, 40) == 3
    for tokens in (33, 64, 40):                                    # the same bucket (64): no new search
        assert cache.get(ops, comp, x, 128, 64, torch.float16, tokens) == 3
    cache.get(ops, comp, x, 128, 64, torch.bfloat16, 40)           # another dtype
    cache.get(ops, comp, x, 64, 128, torch.float16, 40)            # another shape
    cache.get(ops, comp, x, 128, 64, torch.float16, 65)            # another bucket
    assert cache.searches == 4 and cache.hits == 3 and len(ops.searched) == 4
    assert cache.key(128, 64, torch.float16, 40) == (128, 64, "float16", 64)
    report = cache.report()
    assert report["algorithms"]["128x64 float16 <= 64 tokens"] == 3 and report["errors"] == {}
    failing = g.AlgoCache()
    assert failing.get(FakeCslt(search_fails=True), comp, x, 16, 16, torch.float16, 1) == 0
    assert failing.get(FakeCslt(search_fails=True), comp, x, 16, 16, torch.float16, 2) == 0 and failing.searches == 1
    assert failing.report()["errors"]["16x16 float16 <= 16 tokens"] == "search failed: cusparseLt search failed"
    cache.clear()
    assert cache.table == {} and cache.searches == 0


# ---- the layer -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dispatch_by_token_count(interpreter, dtype):
    W = random_24(48, 64, dtype, seed=1)
    bias = torch.randn(48).to(dtype)
    ops, algos = FakeCslt(), g.AlgoCache()
    layer = g.Gpu24Linear(W, bias, ops=ops, algos=algos, name="mlp.up_proj")
    assert layer.form == "shared" and layer.values is None and layer.masks is not None
    tol = 2e-3 if dtype == torch.float16 else 1e-2
    for shape in [(1, 64), (2, 8, 64), (16, 64)]:                  # up to 16 rows: the Triton kernel
        x = torch.randn(shape).to(dtype)
        assert close(layer(x), ref(x, W, bias), tol)
    assert layer.calls == {"triton": 3, "cusparselt": 0, "expand": 0}
    for shape in [(17, 64), (3, 9, 64), (40, 64)]:                 # above: cuSPARSELt, x padded to 8 rows
        x = torch.randn(shape).to(dtype)
        y = layer(x)
        assert y.shape == (*shape[:-1], 48) and y.is_contiguous() and close(y, ref(x, W, bias), tol)
    assert layer.calls["cusparselt"] == 3 and ops.searched == [24, 40] and algos.searches == 2  # 24 and 32: one bucket
    assert ops.algs == [3, 3, 3]
    layer.crossover = 0                                            # everything to cuSPARSELt
    assert close(layer(torch.ones(1, 64).to(dtype)), ref(torch.ones(1, 64).to(dtype), W, bias), tol)
    assert layer.calls["cusparselt"] == 4


def test_strided_output_is_the_transposed_cusparselt_result():
    W = random_24(32, 64, torch.float16, seed=2)
    layer = g.Gpu24Linear(W, ops=FakeCslt(), algos=g.AlgoCache(), contiguous=False, crossover=0)
    x = torch.randn(2, 20, 64).half()
    y = layer(x)
    assert not y.is_contiguous() and y.stride()[-1] != 1 and y.shape == (2, 20, 32)
    assert close(y, ref(x, W))
    z = torch.nn.functional.silu(y) * y                            # elementwise consumers take it as it is
    assert close(z, torch.nn.functional.silu(ref(x, W)) * ref(x, W), 5e-3)


def test_a_failing_searched_algorithm_falls_back_to_the_default():
    W = random_24(16, 32, torch.float16, seed=3)
    ops, algos = FakeCslt(bad_alg=3), g.AlgoCache()
    layer = g.Gpu24Linear(W, ops=ops, algos=algos, crossover=0)
    x = torch.randn(5, 32).half()
    assert close(layer(x), ref(x, W)) and close(layer(x), ref(x, W))
    assert ops.algs == [3, 0, 0] and algos.table[algos.key(16, 32, torch.float16, 8)] == 0
    assert "algorithm failed, default used: CUDA error: invalid algorithm" in algos.report()["errors"][
        "16x32 float16 <= 16 tokens"]


def test_stored_forms_and_their_bytes(interpreter):
    W = random_24(64, 128, torch.float16, seed=4)
    dense = W.numel() * 2
    forms = {}
    for store in g.STORES:
        layer = g.Gpu24Linear(W, ops=FakeCslt(), algos=g.AlgoCache(), store=store)
        forms[store] = (layer.form, layer.weight_bytes / dense)
        for rows in (1, 20):                                       # every form computes the same function
            x = torch.randn(rows, 128).half()
            assert close(layer(x), ref(x, W)), (store, rows)
        if store == "triton":
            assert layer.calls == {"triton": 1, "cusparselt": 0, "expand": 1} and layer.compressed is None
    fake_cslt = ((64 * 128 // 2 + 64 * 128 // 16) * 2 + 8) / dense   # the stand-in's buffer: 56.25% and a trailer
    assert forms["cusparselt"] == ("cusparselt", pytest.approx(fake_cslt))
    assert forms["triton"] == ("triton", pytest.approx(0.5625))
    assert forms["auto"] == ("shared", pytest.approx(fake_cslt + 0.0625))
    assert forms["both"] == ("both", pytest.approx(fake_cslt + 0.5625))


def test_values_that_are_not_in_the_kernels_order_are_not_shared(caplog):
    W = random_24(32, 64, torch.float16, seed=5)
    layer = g.Gpu24Linear(W, ops=FakeCslt(layout="tiled"), algos=g.AlgoCache())
    assert layer.form == "cusparselt" and layer.masks is None and layer.triton_packed is None
    assert "does not start with the kept values" in layer.note
    x = torch.randn(3, 64).half()
    assert close(layer(x), ref(x, W)) and layer.calls["cusparselt"] == 1


def test_masks_for_values_places_zeros_anywhere_but_never_misses_a_nonzero():
    W = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 1.0, 0.0, 0.0, 3.0]], dtype=torch.float16)
    for values in ([0, 0, 0, 2, 1, 3], [0, 0, 2, 0, 1, 3]):           # lowest or highest zero columns
        masks = g.masks_for_values(W, torch.tensor([values], dtype=torch.float16))
        packed = t24.Packed(torch.tensor([values], dtype=torch.float16), masks, t24._locks(1), 1, 12)
        assert torch.equal(t24.unpack(packed), W)
    assert g.masks_for_values(W, torch.tensor([[0, 0, 0, 2, 3, 1]], dtype=torch.float16)) is None   # order
    assert g.masks_for_values(W, torch.tensor([[0, 0, 0, 0, 1, 3]], dtype=torch.float16)) is None   # 2.0 missed
    assert g.masks_for_values(W, torch.tensor([[0, 0, 0, 2, 1]], dtype=torch.float16)) is None      # shape


def test_bad_layers_and_inputs_are_one_line_errors():
    W = random_24(32, 64, torch.float16)
    cases = [
        (lambda: g.Gpu24Linear(W, name="q_proj"), "q_proj: the GPU 2:4 path needs a CUDA device with cuSPARSELt"),
        (lambda: g.Gpu24Linear(W, store="triton", name="q_proj"), "q_proj: the GPU 2:4 path needs a CUDA device"),
        (lambda: g.Gpu24Linear(W.float(), ops=FakeCslt(), name="k"), "k: the GPU 2:4 path takes float16 or bfloat16"),
        (lambda: g.Gpu24Linear(W[:, :60], ops=FakeCslt(), name="k"), "cuSPARSELt needs rows a multiple of 16"),
        (lambda: g.Gpu24Linear(W, ops=FakeCslt(), store="fast", name="k"), "unknown store 'fast'"),
        (lambda: g.Gpu24Linear(W, ops=FakeCslt(), crossover=-1, name="k"), "crossover must be >= 0"),
        (lambda: g.Gpu24Linear(torch.ones(16, 16, dtype=torch.float16), ops=FakeCslt(), name="v"),
         "v is not 2:4: row 0, columns 0-3 hold 4 nonzeros"),
        (lambda: g.Gpu24Linear(W, ops=FakeCslt(), crossover=0, name="o")(torch.randn(2, 60).half()),
         "o: x has shape (2, 60) but the weight takes 64 input features"),
        (lambda: g.Gpu24Linear(W, ops=FakeCslt(), crossover=0, name="o")(torch.randn(2, 64)),
         "o: x is torch.float32 but the weight is torch.float16"),
    ]
    for make, fragment in cases:
        with pytest.raises(RoseRuntimeError) as e:
            make()
        assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)
    if not torch.cuda.is_available():
        assert "CUDA available: False" in g.TorchCslt().why_not(torch.device("cpu"))


# ---- whole models ----------------------------------------------------------------------------------------------

def pruned_tiny(dtype=torch.float16, seed=0):
    from conftest import tiny_model
    from rose.masks import nm_mask

    model = tiny_model("llama", seed=seed, init=0.2)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and "lm_head" not in name:
                m.weight.masked_fill_(nm_mask(m.weight.abs(), 2, 4), 0.0)
    return model.to(dtype).eval()


def test_sparsify_gpu_swaps_every_24_linear_and_keeps_the_function(interpreter):
    import copy

    dense = pruned_tiny()
    model = copy.deepcopy(dense)
    model.model.layers[1].mlp.down_proj.weight.data[0, :4] = 1.0      # one layer that is not 2:4: stays dense
    report = g.sparsify_gpu(model, ops=FakeCslt(), algos=g.AlgoCache())
    assert len(report["sparse"]) == 13 and report["forms"] == {"shared": 13}
    assert report["dense"] == {"model.layers.1.mlp.down_proj": "not 2:4"}
    assert isinstance(model.model.layers[0].self_attn.q_proj, g.Gpu24Linear)
    assert not isinstance(model.lm_head, g.Gpu24Linear) and model.rose_gpu24 is report
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.contiguous and layer.self_attn.k_proj.contiguous
    assert not layer.self_attn.o_proj.contiguous and not layer.mlp.down_proj.contiguous
    # 56.25% (the stand-in's buffer) + the masks, whose rows are padded to 16 bytes: 16 bytes per 64 columns here
    # (12.5%), 6.25% at widths that are multiples of 128 (every LLaMA shape)
    held = sum(m.compressed.nbytes + m.masks.nbytes for m in model.modules() if isinstance(m, g.Gpu24Linear))
    assert report["weight_bytes"] == held and 0.6 < held / report["dense_weight_bytes"] < 0.69
    model.model.layers[1].mlp.down_proj.weight.data[0, :4] = dense.model.layers[1].mlp.down_proj.weight.data[0, :4]
    ids = torch.randint(0, 70, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_logits = dense.float()(ids).logits
        for n in (24, 5):                                          # cuSPARSELt (24 tokens), the kernel (5)
            logits = model(ids[:, :n]).logits.float()
            assert float((logits - ref_logits[:, :n]).norm() / ref_logits[:, :n].norm()) < 1e-2
    calls = layer.mlp.up_proj.calls
    assert calls["triton"] == 1 and calls["cusparselt"] == 1
    with pytest.raises(RoseRuntimeError, match="model.embed_tokens is a Embedding"):
        g.sparsify_gpu(pruned_tiny(), names=["model.embed_tokens"], ops=FakeCslt())
    with pytest.raises(RoseRuntimeError, match="is not 2:4"):
        g.sparsify_gpu(pruned_tiny(), names=["lm_head"], ops=FakeCslt())


def test_graphed_generation_through_the_24_layers(interpreter):
    """runtime.generate over a model of Gpu24Linear layers (Deferred capture): prefill through cuSPARSELt's path,
    decode through the kernel, greedy tokens as the eager DynamicCache loop gives them."""
    import copy

    from runtime.generate import Deferred, GraphedGenerator, cache_kwarg
    from transformers import DynamicCache

    model = pruned_tiny()
    g.sparsify_gpu(model, ops=FakeCslt(), algos=g.AlgoCache())
    ids = torch.randint(0, 70, (1, 20), generator=torch.Generator().manual_seed(1))
    kw = cache_kwarg(model)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        tok = model(input_ids=ids, **{kw: cache}, use_cache=True).logits[:, -1:].argmax(-1)
        toks = [tok]
        for _ in range(6):
            tok = model(input_ids=tok, **{kw: cache}, use_cache=True).logits[:, -1:].argmax(-1)
            toks.append(tok)
    gen = GraphedGenerator(copy.deepcopy(model), max_len=40, capture=Deferred())
    assert torch.equal(gen.generate(ids, 6), torch.cat(toks, 1))


def test_layout_report_with_the_stand_in():
    report = g.cslt_layout_report([(16, 32), (32, 64)], ops=FakeCslt(), device="cpu")
    for item in report["shapes"]:
        assert item["values_first_shareable"] and item["meta_bytes"] == item["shape"][0] * item["shape"][1] // 8 + 8
        assert item["meta_plain_nibbles_match"] == 1.0    # the stand-in's metadata is the plain encoding
        assert not item["values_first_bitwise"]   # the stand-in stores sparse groups' zeros on the high columns
    tiled = g.cslt_layout_report([(16, 32)], ops=FakeCslt(layout="tiled"), device="cpu")["shapes"][0]
    assert not tiled["values_first_shareable"] and tiled["meta_plain_nibbles_match"] == 1.0


def test_load_gpu24_reads_the_semi_structured_export(tmp_path, interpreter):
    from conftest import make_pruned
    from export.api import export_all

    pruned = make_pruned(tmp_path, "2:4", hidden=64)
    export_all(pruned, tmp_path / "exp", "hf,semi-structured,packed24", dtype="float16")
    for fmt in ("semi-structured", "packed24"):
        model = g.load_gpu24(tmp_path / "exp" / fmt, device="cpu", ops=FakeCslt(), algos=g.AlgoCache())
        assert len(model.rose_gpu24["sparse"]) == 14 and next(model.parameters()).dtype == torch.float16
        ids = torch.randint(0, 70, (1, 20))
        dense = g.load_gpu24.__globals__["torch"]  # noqa: F841  (keeps the import local to this test)
        from transformers import AutoModelForCausalLM

        ref_model = AutoModelForCausalLM.from_pretrained(tmp_path / "exp" / "hf", dtype=torch.float32)
        with torch.no_grad():
            a, b = model(ids).logits.float(), ref_model(ids).logits
        assert float((a - b).norm() / b.norm()) < 1e-2
    with pytest.raises(RoseRuntimeError, match="neither a semi-structured nor a packed24 export"):
        g.load_gpu24(tmp_path / "exp" / "hf", device="cpu", ops=FakeCslt())
    with pytest.raises(RoseRuntimeError, match="float16 or bfloat16"):
        g.load_gpu24(tmp_path / "exp" / "packed24", device="cpu", dtype=torch.float32, ops=FakeCslt())
    if not torch.cuda.is_available():
        with pytest.raises(RoseRuntimeError, match="needs a CUDA device with cuSPARSELt"):
            g.load_gpu24(tmp_path / "exp" / "semi-structured")


def test_expansion_kernel_matches_unpack_and_compiles_for_hopper(interpreter, tmp_path):
    """runtime.triton24.expand (store="triton" prefill) rebuilds the dense weight bit for bit in the interpreter,
    into a buffer or a larger scratch, and builds for sm_90 with 16-byte loads and stores (fresh process, no
    interpreter)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    for dtype in (torch.float16, torch.bfloat16):
        for rows, cols in [(37, 76), (64, 256), (5, 388)]:
            W = random_24(rows, cols, dtype, seed=rows)
            p = t24.pack_dense(W)
            assert torch.equal(t24.expand(p).view(torch.int16), t24.unpack(p).view(torch.int16))
            scratch = torch.full((rows * cols + 9,), float("nan"), dtype=dtype)
            assert torch.equal(t24.expand(p, out=scratch), t24.unpack(p))
    with pytest.raises(RoseRuntimeError, match="out must be a contiguous"):
        t24.expand(t24.pack_dense(random_24(8, 16, torch.float16)), out=torch.empty(10, dtype=torch.float16))
    code = ("from runtime._triton24_kernels import compile_expand_for_sm as c; ptx = c(90).asm['ptx']; "
            "print('ld.global.v4' in ptx, 'st.global.v4' in ptx)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.split() == ["True", "True"], done.stderr[-2000:]


# ---- on a GPU ----------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("store", g.STORES)
def test_gpu24_on_cuda(store):
    """The real layer: every form and token count against x W^T in fp32 (TF32 off), outputs fully written."""
    torch.backends.cuda.matmul.allow_tf32 = False
    W = random_24(256, 512, torch.float16, seed=9).cuda()
    layer = g.Gpu24Linear(W, store=store, name="probe")
    for rows in (1, 7, 16, 17, 100, 512):
        x = torch.randn(rows, 512, device="cuda").half()
        y = layer(x)
        assert torch.isfinite(y).all() and close(y, ref(x, W).cuda(), 2e-3), (store, rows)
    if store == "auto":
        assert layer.form in ("shared", "cusparselt")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu24_graphed_generation_on_cuda():
    """CUDA graphs over a 2:4 tiny LLaMA: the same greedy tokens as eager decoding of the same layers."""
    from runtime.generate import Deferred, GraphedGenerator

    model = pruned_tiny().cuda()
    g.sparsify_gpu(model)
    ids = torch.randint(0, 70, (1, 40), device="cuda")
    eager = GraphedGenerator(model, 64, capture=Deferred())
    graphed = GraphedGenerator(model, 64)
    assert torch.equal(graphed.generate(ids, 10), eager.generate(ids, 10)), graphed.graph_error
    assert graphed.graph_error is None and graphed.captures == 2
