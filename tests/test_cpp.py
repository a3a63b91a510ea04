"""The C++ 2:4 CPU kernel (cpp/): the core under sanitizers, the PyTorch operators on every code path against an
independent pure-PyTorch reference, Sparse24Linear and whole-model conversion, loading packed24, and errors."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, make_pruned, random24, rel, tiny_model
from runtime.errors import RoseRuntimeError as RoseError

from runtime import cpu24
from runtime import cpu24_reference as ref

ISA = cpu24.ensure_ops()
_RANK = {"scalar": 1, "avx2": 2, "avx512": 3}
# a path the CPU lacks would silently run the next one down: skip it instead, saying so
PATHS = [pytest.param(path, marks=pytest.mark.skipif(_RANK.get(ISA, 0) < rank, reason=f"this CPU has no {path} "
                                                     f"(its best path is {ISA})"))
         for path, rank in _RANK.items()]



@pytest.mark.slow
def test_kernel_core_under_sanitizers(tmp_path):
    """The plain C++ test (no PyTorch), built with AddressSanitizer and UndefinedBehaviorSanitizer; it covers every
    code path the CPU has, odd shapes, strided inputs, bias, 1-3 threads, bf16 and the packing errors."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "test_sparse24"
    subprocess.run([cxx, "-std=c++17", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-fsanitize=address,undefined",
                    "-fno-sanitize-recover=all", str(ROOT / "cpp" / "sparse24.cpp"),
                    str(ROOT / "cpp" / "test_sparse24.cpp"), "-o", str(exe)], check=True)
    # ROSE24_BLOCKED_FROM=1: the many-token AVX-512 path (block decoding, micro-kernel) at every token count
    for env in ({"ROSE24_ISA": ""}, {"ROSE24_ISA": "scalar"}, {"ROSE24_ISA": "", "ROSE24_BLOCKED_FROM": "1"}):
        run = subprocess.run([str(exe)], capture_output=True, text=True, env={**os.environ, **env})
        assert run.returncode == 0 and "all passed" in run.stdout, run.stdout + run.stderr


def test_ops_are_the_cpp_build_and_use_pytorchs_threads():
    assert ISA in ("avx512", "avx2", "scalar"), f"the C++ kernel did not build here ({ISA})"
    old = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert torch.ops.rose.sparse24_parallel_threads() == n  # 1 would mean built without OpenMP
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("rows,cols", [(1, 4), (9, 12), (37, 100), (70, 260), (128, 64)])
def test_pack_matches_reference_and_round_trips(rows, cols):
    for dtype in (torch.float32, torch.bfloat16):
        W = random24(rows, cols, rows, dtype)
        values, masks = torch.ops.rose.sparse24_pack(W)
        rv, rm = ref.pack(W)
        assert torch.equal(values, rv) and torch.equal(masks, rm)
        assert torch.equal(torch.ops.rose.sparse24_unpack(values, masks, rows, cols), W)
        assert torch.equal(ref.unpack(values, masks, rows, cols), W)


def test_pack_from_packed24_export_needs_no_dense_weight():
    from export.packed24 import pack24

    W = random24(37, 100)
    compressed, bitmask = pack24(W)
    values, masks = torch.ops.rose.sparse24_pack_bitmask(compressed, bitmask, 37, 100)
    dv, dm = torch.ops.rose.sparse24_pack(W)
    assert torch.equal(torch.ops.rose.sparse24_unpack(values, masks, 37, 100), W)
    assert torch.equal(values, dv) and torch.equal(masks, dm)
    assert all(torch.equal(a, b) for a, b in zip(ref.pack_bitmask(compressed, bitmask, 37, 100), (values, masks)))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_fp32_every_path(path, threads):
    """Random shapes (rows and columns not multiples of the vector width), M from 1 to 33, with and without bias."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(threads)
        for i, (rows, cols) in enumerate([(1, 4), (9, 12), (23, 36), (70, 260), (130, 132)]):
            W = random24(rows, cols, i)
            bias = torch.randn(rows, generator=g) if i % 2 else None
            mod = cpu24.Sparse24Linear.from_dense(W, bias, isa=path, dense_from=0)
            for M in (1, 2, 3, 7, 8, 9, 17, 33):
                x = torch.randn(M, cols, generator=g)
                assert rel(mod(x), torch.nn.functional.linear(x, W, bias)) <= 1e-5, (path, rows, cols, M)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("path", PATHS)
def test_linear_bf16_against_rounded_weights(path):
    """bf16 values, fp32 accumulation: equal to the dense product of the bf16-rounded weights (fp32 in and out),
    and within bf16 rounding of it for bf16 inputs."""
    W = random24(70, 132, 3)
    Wb = W.to(torch.bfloat16)
    mod = cpu24.Sparse24Linear.from_dense(W, dtype=torch.bfloat16, isa=path, dense_from=0)
    assert mod.values.dtype == torch.bfloat16
    for M in (1, 5, 12):
        x = torch.randn(M, 132)
        assert rel(mod(x), x @ Wb.float().T) <= 1e-5
        xb = x.to(torch.bfloat16)
        y = mod(xb)
        assert y.dtype == torch.bfloat16 and rel(y, xb.float() @ Wb.float().T) <= 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tile_bytes", [64 * 4 * 16, 8 << 20])
def test_tiled_blas_path_for_many_tokens(dtype, tile_bytes):
    """From `dense_from` tokens on, calls go through dense tiles and BLAS (several tiles, or one): the same answer
    as the kernel, in fp32 for fp32 inputs whatever the weights' dtype, with 3-D inputs too."""
    W = random24(700, 64, 5)
    bias = torch.randn(700)
    x = torch.randn(2, 20, 64)
    mod = cpu24.Sparse24Linear.from_dense(W, bias, dtype=dtype, dense_from=0)
    want = x @ W.to(dtype).float().T + bias
    assert rel(mod(x), want) <= 1e-5
    args = (mod.values, mod.masks, 700, 64, mod.bias, 0, 8, tile_bytes)
    tiled = torch.ops.rose.sparse24_linear(x, *args)
    assert tiled.shape == (2, 20, 700) and tiled.dtype == torch.float32 and rel(tiled, want) <= 1e-5
    xb = x.to(torch.bfloat16)
    yb = torch.ops.rose.sparse24_linear(xb, *args)
    assert yb.dtype == torch.bfloat16 and rel(yb, xb.float() @ W.to(dtype).float().T + bias) <= 1e-2


def test_explicit_dense_from_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("ROSE24_DENSE_FROM", "3")
    W = random24(16, 32)
    assert cpu24.Sparse24Linear.from_dense(W).dense_from == 3
    assert cpu24.Sparse24Linear.from_dense(W, dense_from=0).dense_from == 0
    monkeypatch.delenv("ROSE24_DENSE_FROM")
    assert cpu24.Sparse24Linear.from_dense(W).dense_from == cpu24.default_dense_from(torch.float32)
    assert cpu24.default_dense_from(torch.float32) == (0 if ISA == "avx512" else 256)


def test_3d_and_non_contiguous_inputs():
    W = random24(40, 48, 7)
    mod = cpu24.Sparse24Linear.from_dense(W, dense_from=0)
    x3 = torch.randn(3, 5, 48)
    y3 = mod(x3)
    assert y3.shape == (3, 5, 40) and rel(y3, x3 @ W.T) <= 1e-5
    xt = torch.randn(48, 6).t()                     # columns strided
    assert not xt.is_contiguous() and rel(mod(xt), xt @ W.T) <= 1e-5
    xs = torch.randn(6, 96)[:, ::2]                 # every other column
    assert rel(mod(xs), xs @ W.T) <= 1e-5
    xr = torch.randn(12, 48)[::2]                   # rows strided
    assert rel(mod(xr), xr @ W.T) <= 1e-5
    assert mod(torch.randn(0, 48)).shape == (0, 40)


def test_errors_are_one_line_and_name_the_layer():
    W = random24(16, 32)
    W[5, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(RoseError, match=r"^model.layers.3.mlp.up_proj: the weight is not 2:4: more than two "
                                        r"nonzeros in row 5, columns 8-11$"):
        cpu24.Sparse24Linear.from_dense(W, name="model.layers.3.mlp.up_proj")
    with pytest.raises(RoseError, match="columns a multiple of 4"):
        cpu24.Sparse24Linear.from_dense(torch.zeros(8, 10), name="odd")
    with pytest.raises(RoseError, match="float32 or bfloat16"):
        cpu24.Sparse24Linear.from_dense(torch.zeros(8, 8), dtype=torch.float16)
    W2 = random24(16, 32)                                   # several bad groups: the first in row order is named
    W2[9, 0:3] = 1.0
    W2[2, 28:31] = 1.0
    for op in (torch.ops.rose.sparse24_pack, ref.pack):
        with pytest.raises(RuntimeError, match="in row 2, columns 28-31"):
            op(W2)
    mod = cpu24.Sparse24Linear.from_dense(random24(16, 32), name="q_proj")
    with pytest.raises(RoseError) as err:
        mod(torch.randn(2, 31))
    assert str(err.value) == "q_proj: the input's last dimension is 31 but the weight has 32 columns"
    with pytest.raises(RoseError, match="q_proj: the input must be float32 or bfloat16"):
        mod(torch.randn(2, 32, dtype=torch.float64))
    bad = torch.zeros(8, 2, dtype=torch.uint8)
    bad[0, 0] = 0x37
    with pytest.raises(RoseError, match="exactly two of four in row 0, columns 0-3"):
        cpu24.Sparse24Linear.from_packed24(torch.zeros(8, 8), bad, (8, 16))


def test_fallback_without_the_cpp_build_warns_once_and_agrees(tmp_path):
    """Where the kernel cannot be built, one warning and the pure-PyTorch operators, with the same results."""
    script = tmp_path / "fallback.py"
    script.write_text(
        "import warnings, torch\n"
        "from runtime import cpu24\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    print(cpu24.ensure_ops(), cpu24.ensure_ops())\n"
        "print(len(w), str(w[0].message).count(chr(10)))\n"
        "W = torch.randn(20, 16) * (torch.arange(16) % 4 < 2)\n"
        "m = cpu24.Sparse24Linear.from_dense(W)\n"
        "x = torch.randn(3, 16)\n"
        "print(float((m(x) - x @ W.T).abs().max()) < 1e-5)\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "ROSE24_DISABLE_CPP": "1", "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["pytorch-fallback", "pytorch-fallback", "1", "0", "True"], run.stdout


def _greedy(model, ids, steps=8):
    return model.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=0)


def test_sparsify_model_matches_dense_and_keeps_no_dense_copy():
    from rose.arch import all_sublayers
    from rose.masks import nm_mask

    model = tiny_model("llama", hidden=64, inter=128)
    with torch.no_grad():
        for m in all_sublayers(model).values():
            m.weight.masked_fill_(nm_mask(m.weight.abs(), 2, 4), 0.0)
    ids = torch.randint(1, 80, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    dense_tokens = _greedy(model, ids)
    dense_bytes = sum(m.weight.nbytes for m in all_sublayers(model).values())
    names = cpu24.sparsify(model)
    assert len(names) == 2 * 7 and all(isinstance(model.get_submodule(n), cpu24.Sparse24Linear) for n in names)
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if ".layers." in n)
    with torch.no_grad():
        assert rel(model(ids).logits, want) <= 1e-5
    assert torch.equal(_greedy(model, ids), dense_tokens)
    packed = sum(model.get_submodule(n).weight_bytes for n in names)
    assert packed <= 0.56 * dense_bytes, packed / dense_bytes


def test_sparsify_names_a_layer_that_is_not_24():
    model = tiny_model("llama", hidden=64, inter=128)
    with pytest.raises(RoseError, match=r"^model.layers.0.self_attn.q_proj: the weight is not 2:4"):
        cpu24.sparsify(model)


def test_load_packed24_straight_into_sparse_modules(tmp_path):
    from export.api import export_all

    pruned = make_pruned(tmp_path, "2:4", hidden=64)
    export_all(pruned, tmp_path / "out", formats=["packed24"])
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(pruned).eval()
    model = cpu24.load_packed24_cpu(tmp_path / "out" / "packed24")
    assert sum(isinstance(m, cpu24.Sparse24Linear) for m in model.modules()) == 14
    assert not any(p.device.type == "meta" for p in model.parameters())
    ids = torch.randint(1, 80, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel(model(ids).logits, dense(ids).logits) <= 1e-5
    assert torch.equal(_greedy(model, ids), _greedy(dense, ids))
    with pytest.raises(RoseError, match="is not a packed24 directory"):
        cpu24.load_packed24_cpu(tmp_path)
