"""rose's Triton 2:4 decode kernel (runtime/triton24.py) on the CPU.

The packers and input checks need neither a GPU nor Triton. The kernel itself runs in Triton's interpreter on CPU
tensors: the `triton` package from PyPI installs beside the CPU build of torch, and Triton must be imported with
TRITON_INTERPRET=1 in the environment (and still see it when a kernel runs), so this module imports it with the
variable set and the kernel tests set it again while they run (the `interpreter` fixture); it is put back between
tests. Without Triton (or with one whose interpreter cannot run the kernel: use triton>=3.9), or when something
imported it earlier without the variable, the kernel tests skip and say why. One test compiles the kernel for
sm_90 through Triton's NVIDIA backend, which needs no GPU.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from runtime import RoseRuntimeError
from runtime import triton24 as t24


def _import_triton_for_interpreter() -> str | None:
    """None when Triton's interpreter can run the kernel here, else why not."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed (pip install triton)"
        try:  # Triton 3.9 imports this on a kernel's first call and checks the variable then too
            import triton.experimental.gluon  # noqa: F401
        except ImportError:
            pass
        try:
            from runtime import _triton24_kernels
        except ImportError as exc:
            return f"triton cannot be imported ({exc})"
        return _triton24_kernels.interpreter_problem()
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


WHY_NOT = _import_triton_for_interpreter()


@pytest.fixture
def interpreter(monkeypatch):
    """Kernel tests: Triton's interpreter on CPU tensors (skipped, with the reason, where it cannot run)."""
    if WHY_NOT is not None:
        pytest.skip(WHY_NOT)
    monkeypatch.setenv("TRITON_INTERPRET", "1")


DTYPES = [torch.float16, torch.bfloat16]
EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}   # one unit in the last place, relative


def random_24(rows: int, cols: int, dtype: torch.dtype, seed: int = 0, sparse_groups: bool = True) -> torch.Tensor:
    """A 2:4 weight with every kind of group: two nonzeros, one, none, and a stored -0.0 beside one nonzero."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols // 4, 4, generator=g)
    keep = torch.zeros_like(W, dtype=torch.bool).scatter_(2, torch.rand(W.shape, generator=g).topk(2, dim=2).indices,
                                                          True)
    W = torch.where(keep, W, torch.zeros(()))
    if sparse_groups:
        kind = torch.randint(0, 8, (rows, cols // 4), generator=g)
        first = keep.float().argmax(dim=2, keepdim=True)
        only_one = torch.zeros_like(keep).scatter_(2, first, True)
        W = torch.where((kind == 1).unsqueeze(-1), W * only_one, W)                 # one nonzero
        W = torch.where((kind == 2).unsqueeze(-1), torch.zeros(()), W)              # none
        minus = torch.where(only_one, W, torch.full((), -0.0))
        W = torch.where((kind == 3).unsqueeze(-1) & (keep | only_one), minus, W)    # one nonzero and a -0.0
    return W.reshape(rows, cols).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def reference(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T (+ b) in fp32 from the same rounded values: what the kernel computes before its one rounding."""
    y = x.reshape(-1, x.shape[-1]).float() @ W.float().T
    if bias is not None:
        y += bias.float()
    return y.reshape(*x.shape[:-1], W.shape[0])


def assert_rounded_from(y: torch.Tensor, ref: torch.Tensor) -> None:
    """y is ref rounded to y's dtype, up to one unit in the last place (fp32 sums in another order)."""
    assert y.shape == ref.shape and y.dtype in EPS
    assert torch.isfinite(y.float()).all()
    tol = EPS[y.dtype] * ref.abs() + 1e-6 * ref.abs().max()
    bad = (y.float() - ref).abs() > tol
    assert not bad.any(), f"{int(bad.sum())} of {y.numel()} elements off, worst {float((y.float() - ref).abs().max())}"


# ---- the packers (no Triton needed) ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 4), (7, 36), (33, 200), (16, 256), (5, 388)])
def test_pack_dense_round_trip_is_bit_exact(dtype, rows, cols):
    W = random_24(rows, cols, dtype, seed=rows + cols)
    p = t24.pack_dense(W)
    assert p.values.shape == (rows, cols // 2) and p.values.dtype == dtype
    assert p.masks.shape == (rows, t24.mask_words(cols)) and p.masks.dtype == torch.int32
    assert p.masks.shape[1] * 4 % 16 == 0                       # rows of masks are whole 16-byte pieces
    nib = t24._nibbles(p.masks, cols)
    assert (t24._POPCOUNT[nib.long()] == 2).all()               # exactly two kept per group
    padding = p.masks.view(torch.uint8)[:, cols // 8 + (cols % 8 > 0):]
    assert not padding.any()
    assert torch.equal(bits(t24.unpack(p)), bits(W))            # -0.0 kept where there was room for it
    assert p.nbytes == rows * cols // 2 * 2 + p.masks.nbytes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(9, 44), (12, 128), (3, 260)])
def test_packed24_export_gives_the_same_bytes(dtype, rows, cols):
    """packed24 tensors -> kernel layout equals dense -> kernel layout, and the layout is packed24's own bytes."""
    from export.packed24 import pack24

    W = random_24(rows, cols, dtype, seed=cols)
    compressed, bitmask = pack24(W)
    a = t24.pack_packed24(compressed, bitmask, torch.tensor([[rows], [cols]]))
    b = t24.pack_dense(W)
    assert torch.equal(bits(a.values), bits(b.values)) and torch.equal(a.masks, b.masks)
    back_c, back_b = t24.to_packed24(b)
    assert torch.equal(bits(back_c), bits(compressed)) and torch.equal(back_b, bitmask)
    if cols % 128 == 0:                                         # no padding: the very same bytes
        assert torch.equal(b.masks.view(torch.uint8), bitmask)


def test_layout_is_documented_order():
    """Nibble q of word w is group 8w+q's mask, bit j = column 4g+j; values are the kept ones in column order."""
    W = torch.zeros(1, 40, dtype=torch.float16)
    W[0, [1, 3, 4, 6, 36, 37]] = torch.tensor([1, 2, 3, 4, 5, 6], dtype=torch.float16)   # groups 0, 1, 9
    p = t24.pack_dense(W)
    assert p.values[0, :4].tolist() == [1, 2, 3, 4] and p.values[0, 18:].tolist() == [5, 6]
    word0, word1 = int(p.masks[0, 0]) & 0xFFFFFFFF, int(p.masks[0, 1])
    assert word0 & 0xF == 0b1010 and (word0 >> 4) & 0xF == 0b0101
    assert all((word0 >> 4 * q) & 0xF == 0b0011 for q in range(2, 8))    # empty groups keep the lowest columns
    assert word1 & 0xF == 0b0011 and (word1 >> 4) & 0xF == 0b0011 and word1 >> 8 == 0


@pytest.mark.parametrize("bad,fragment", [
    (lambda W: W.float(), "float16 or bfloat16"),
    (lambda W: W[:, :10], "multiple of 4"),
    (lambda W: W[0], "2-D"),
])
def test_pack_dense_refuses_bad_weights(bad, fragment):
    with pytest.raises(RoseRuntimeError) as e:
        t24.pack_dense(bad(random_24(4, 16, torch.float16)), name="layers.0.mlp.up_proj")
    assert fragment in str(e.value) and "layers.0.mlp.up_proj" in str(e.value) and "\n" not in str(e.value)


def test_pack_dense_names_the_group_that_is_not_24():
    W = random_24(6, 32, torch.bfloat16)
    W[4, 12:16] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(RoseRuntimeError, match=r"^q_proj is not 2:4: row 4, columns 12-15 hold 3 nonzeros$"):
        t24.pack_dense(W, name="q_proj")


def test_pack_packed24_refuses_bad_tensors():
    from export.packed24 import pack24

    W = random_24(4, 24, torch.float16)
    c, b = pack24(W)
    b2 = b.clone()
    b2[2, 1] = 0b00010111                                   # row 2, group 2 keeps three columns
    with pytest.raises(RoseRuntimeError, match=r"does not keep exactly two of four in row 2, columns 8-11$"):
        t24.pack_packed24(c, b2, (4, 24))
    with pytest.raises(RoseRuntimeError, match="expected 48 kept values"):
        t24.pack_packed24(c[:, :-1], b, (4, 24))
    with pytest.raises(RoseRuntimeError, match="uint8 bitmask of 4x3"):
        t24.pack_packed24(c, b.to(torch.int16), (4, 24))
    with pytest.raises(RoseRuntimeError, match="float16 or bfloat16 kept values"):
        t24.pack_packed24(c.float(), b, (4, 24))
    with pytest.raises(RoseRuntimeError, match="multiple of 4"):
        t24.pack_packed24(c, b, (4, 22))


def test_module_holds_only_packed_tensors():
    W = random_24(64, 128, torch.float16)
    bias = torch.randn(64)
    m = t24.Sparse24TritonLinear.from_dense(W, bias, name="o_proj")
    assert set(dict(m.named_buffers())) == {"values", "masks", "locks"}
    assert set(m.state_dict()) == {"values", "masks", "bias"}            # the counters are not saved
    assert not any(t.numel() >= W.numel() for t in m.state_dict().values())
    assert m.bias.dtype == torch.float16 and m.weight_bytes < 0.6 * W.numel() * 2 + bias.numel() * 2
    assert torch.equal(bits(m.dense_weight()), bits(W))
    from export.packed24 import pack24

    c, b = pack24(W)
    m2 = t24.Sparse24TritonLinear.from_packed24(c, b, (64, 128), bias)
    assert torch.equal(m2.values, m.values) and torch.equal(m2.masks, m.masks)
    lin = torch.nn.Linear(128, 64, bias=False)
    lin.weight.data = W.float()
    m3 = t24.Sparse24TritonLinear.from_linear(lin, dtype=torch.bfloat16)
    assert m3.values.dtype == torch.bfloat16 and m3.bias is None
    assert "in_features=128, out_features=64" in repr(m3)


def test_inputs_it_does_not_take_are_one_line_errors():
    m = t24.Sparse24TritonLinear.from_dense(random_24(32, 64, torch.float16), name="mlp.down_proj")
    cases = [
        (torch.randn(17, 64).half(), "at most 16 rows (tokens) per call, got 17"),
        (torch.randn(2, 9, 64).half(), "got 18"),
        (torch.randn(2, 64), "x is torch.float32 but the weight is torch.float16"),
        (torch.randn(2, 64).bfloat16(), "x is torch.bfloat16 but the weight is torch.float16"),
        (torch.randn(2, 60).half(), "takes 64 input features"),
    ]
    for x, fragment in cases:
        with pytest.raises(RoseRuntimeError) as e:
            m(x)
        msg = str(e.value)
        assert fragment in msg and msg.startswith("mlp.down_proj:") and "\n" not in msg, msg
    with pytest.raises(RoseRuntimeError, match="bias must be a float vector of 32"):
        t24.linear(torch.randn(1, 64).half(), m.packed, torch.randn(31))
    with pytest.raises(RoseRuntimeError, match="out must be a contiguous"):
        t24.linear(torch.randn(1, 64).half(), m.packed, out=torch.empty(1, 32))
    assert t24.max_rows() == 16


def test_default_configs_for_llama_shapes():
    for rows, cols in [(4096, 4096), (11008, 4096), (4096, 11008), (1024, 4096), (14336, 4096), (4096, 14336)]:
        for m in (1, 2, 4, 8, 16):
            c = t24.pick_config(m, rows, cols)
            t24.check_config(c, m)
            tiles, steps = -(-rows // c.block_n), -(-cols // c.block_k)
            per = -(-steps // c.split)
            assert c.split * per >= steps > (c.split - 1) * per        # every split has work
            assert per >= t24.MIN_STEPS_PER_SPLIT or c.split == 1
            assert tiles * c.split >= 2 * t24.DEFAULT_SMS               # enough programs to fill an H200
            assert c.use_dot == (m > t24.FMA_MAX_ROWS)
    small = t24.pick_config(3, 40, 72)
    assert small.block_k == 128 and small.split == 1


def test_bad_configs_are_refused():
    x = torch.randn(3, 64).half()
    p = t24.pack_dense(random_24(16, 64, torch.float16))
    for cfg, fragment in [(t24.Config(True, 16, 16, 48), "powers of two"),
                          (t24.Config(True, 8, 16, 64), "block_m and block_n >= 16"),
                          (t24.Config(False, 4, 16, 64), "one row of x"),
                          (t24.Config(True, 2, 16, 64), "block_m >= rows")]:
        with pytest.raises(RoseRuntimeError, match=fragment):
            t24.linear(x, p, config=cfg)


# ---- the kernel, in Triton's interpreter ------------------------------------------------------------------------

CASES = [  # rows_out, cols, x shape (last dim = cols), bias, config (None: the default)
    (37, 76, (1, 76), True, None),                                  # odd rows, cols not a multiple of 8
    (45, 200, (3, 200), False, None),
    (16, 36, (16, 36), True, None),                                 # 16 tokens, one step
    (70, 132, (1, 7, 132), False, t24.Config(True, 16, 32, 64, 2)),  # 3-D x, 3 tiles, split K
    (40, 520, (2, 520), True, t24.Config(True, 16, 16, 64, 3, num_warps=2)),  # split 3 of uneven length
    (33, 200, (1, 200), True, t24.Config(False, 1, 16, 64, 2)),      # the FMA variant, split K
    (24, 1028, (1, 1, 1028), False, t24.Config(False, 1, 8, 512, 1)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols,xshape,has_bias,config", CASES)
def test_kernel_matches_reference(interpreter, dtype, rows, cols, xshape, has_bias, config):
    torch.manual_seed(rows * cols)
    W = random_24(rows, cols, dtype, seed=rows)
    x = torch.randn(xshape).to(dtype)
    bias = torch.randn(rows).to(dtype) if has_bias else None
    p = t24.pack_dense(W)
    y = t24.linear(x, p, bias, config=config)
    assert y.dtype == dtype and y.shape == (*xshape[:-1], rows)
    assert_rounded_from(y, reference(x, W, bias))
    assert not p.locks.any()                                    # split counters are reset for the next call


def test_kernel_poisoned_output_deterministic_split_and_module(interpreter):
    dtype = torch.float16
    W = random_24(48, 264, dtype, seed=3)
    bias = torch.randn(48).to(dtype)
    m = t24.Sparse24TritonLinear.from_dense(W, bias)
    x = torch.randn(2, 3, 264).to(dtype)
    ref = reference(x, W, bias)
    assert_rounded_from(m(x), ref)
    cfg = t24.Config(True, 16, 16, 64, 5)
    out = torch.full((6, 48), float("nan"), dtype=dtype)
    y1 = t24.linear(x, m.packed, m.bias, out=out, config=cfg)
    assert y1.data_ptr() == out.data_ptr() and y1.shape == (2, 3, 48)
    assert_rounded_from(y1, ref)                                # every element written, none left NaN
    y2 = t24.linear(x, m.packed, m.bias, config=cfg)
    assert torch.equal(bits(y1), bits(y2))                      # partials added in split order: same bits
    assert t24.linear(x[:0], m.packed).shape == (0, 3, 48)      # no rows: an empty result, no launch


def test_kernel_from_packed24_gives_the_dense_result(interpreter):
    from export.packed24 import pack24

    W = random_24(20, 68, torch.bfloat16, seed=5)
    c, b = pack24(W)
    m = t24.Sparse24TritonLinear.from_packed24(c, b, (20, 68))
    x = torch.randn(5, 68).bfloat16()
    assert_rounded_from(m(x), reference(x, W, None))


def test_gpu_script_dry_run(interpreter, tmp_path, capsys):
    """scripts/gpu_triton24.py: argument errors are one line with status 2; --dry-run runs the whole check on
    the CPU (shapes divided by 64) and writes the JSON and markdown it writes on the GPU, with empty timings."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_triton24.py"
    spec = importlib.util.spec_from_file_location("gpu_triton24", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for bad in (["--tokens", "0,4"], ["--tokens", "17"], ["--shapes", "4096x4094"], ["--shapes", "big"],
                ["--dtypes", "fp32"]):
        assert script.main(bad + ["--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("Error: ") and "\n" not in err, err
    rc = script.main(["--dry-run", "--out", str(tmp_path), "--shapes", "4096x4096,1024x4352", "--tokens", "1,5"])
    assert rc == 0
    report = json.loads((tmp_path / "triton24.json").read_text())
    assert report["ok"] and report["env"]["dry_run"] and report["copy_gbps"] is None
    assert [(c["dtype"], c["shape"], c["tokens"]) for c in report["cases"]] == [
        (d, s, m) for d in ("fp16", "bf16") for s in ("64x64", "16x68") for m in (1, 5)]
    for c in report["cases"]:
        assert c["check"]["ok"] and c["check"]["rel_err"] < script.TOL[c["dtype"]] and c["us"] == {}
        assert ("fma_rel_err" in c["check"]) == (c["tokens"] == 1) and c["check"]["bias"] == (c["tokens"] == 1)
    assert {s["shape"] for s in report["summary"]} == {"64x64", "16x68"}
    md = (tmp_path / "triton24.md").read_text()
    assert "| fp16 | 64x64 | 1 |" in md and "All correctness checks passed: yes" in md


def test_kernel_compiles_for_hopper(tmp_path):
    """The same source through Triton's NVIDIA backend for sm_90 (no GPU needed: Triton ships ptxas), in a fresh
    process without TRITON_INTERPRET: the default tensor-core config (fp16, split K) and bf16 with a bias use
    16-byte async copies and mma.sync, the split uses an acquire/release counter, nothing spills to local
    memory; the FMA variant builds too. There, CPU tensors are refused in one line."""
    if WHY_NOT is not None and "not installed" in WHY_NOT:
        pytest.skip(WHY_NOT)
    import json
    import subprocess
    from pathlib import Path

    code = r"""
import json, re, subprocess, sys
from pathlib import Path
import triton
from runtime._triton24_kernels import compile_for_sm
out = {}
for name, kw in {"fp16": {}, "bf16": {"dtype": "bf16", "has_bias": True},
                 "fma": {"use_dot": False, "block_m": 1, "block_n": 16, "block_k": 512}}.items():
    c = compile_for_sm(90, **kw)
    ptx = c.asm["ptx"]
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    sass = None
    if tool.is_file():
        Path("k.cubin").write_bytes(c.asm["cubin"])
        sass = subprocess.run([str(tool), "--dump-sass", "k.cubin"], capture_output=True, text=True).stdout
    out[name] = {"mma": "mma.sync.aligned.m16n8k16" in ptx,
                 "async16": bool(re.search(r"cp\.async\.cg\.shared\.global \[[^]]*\], \[[^]]*\], 0x10", ptx)),
                 "vec16": "ld.global.v4" in ptx, "counter": "atom.global.gpu.acq_rel.add" in ptx,
                 "spills": None if sass is None else bool(re.search(r"\b(STL|LDL)\b", sass))}
import torch
from runtime import RoseRuntimeError, triton24
p = triton24.pack_dense(torch.eye(8, dtype=torch.float16))
try:
    triton24.linear(torch.ones(1, 8, dtype=torch.float16), p)
    out["cpu_refused"] = None
except RoseRuntimeError as exc:
    out["cpu_refused"] = str(exc)
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=tmp_path)
    if res.returncode and "ModuleNotFoundError: No module named 'triton'" in res.stderr:
        pytest.skip("triton is not installed")
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    for name in ("fp16", "bf16"):
        assert got[name]["mma"] and got[name]["async16"] and got[name]["counter"], got
        assert got[name]["spills"] in (False, None), got
    assert got["fma"]["vec16"] and got["fma"]["counter"] and not got["fma"]["mma"], got
    assert got["fma"]["spills"] in (False, None), got
    # CPU tensors without the interpreter: one line that says what to do
    msg = got["cpu_refused"]
    assert msg and msg.startswith("x is on the CPU") and "TRITON_INTERPRET" in msg and "\n" not in msg, msg
