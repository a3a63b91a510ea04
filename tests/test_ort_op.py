"""rose's onnxruntime custom-operator library (cpp/ort_op.cpp, runtime/ort.py): `rose.Sparse24MatMul` against
numpy on odd shapes, 1 and 2 intra-op threads, fp32 and bf16 values, few and many tokens, every code path;
corrupt or mis-sized packed weights give onnxruntime errors; no PyTorch anywhere in the library; an onnxruntime
without the needed C API gets one clear line; every OrtApi slot the library declares is called."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from runtime import cpu24
from runtime.errors import RoseRuntimeError

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from runtime import ort as rort  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def library():
    """Build the library as `make install` does (make rebuilds it only when a source changed)."""
    if shutil.which("make") is None or shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no make or C++ compiler")
    run = subprocess.run(["make", "-s", "-C", str(ROOT / "cpp")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    return rort.library_path()


def random24(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A random 2:4 matrix; some groups keep fewer than two nonzeros."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    keep = W.abs().reshape(rows, cols // 4, 4).topk(2, dim=-1).indices
    W = W * torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(2, keep, True).reshape(rows, cols)
    W[torch.rand(rows, cols, generator=g) < 0.05] = 0.0
    return W


def bf16_tensor(values: torch.Tensor, name: str):
    raw = values.contiguous().view(torch.int16).numpy().tobytes()
    return helper.make_tensor(name, TensorProto.BFLOAT16, list(values.shape), raw, raw=True)


def model(rows: int, cols: int, values, masks, bias=None, *, attrs: dict | None = None, weights_as_inputs=False,
          x_type=TensorProto.FLOAT, node_name="layer0") -> bytes:
    """One Sparse24MatMul node: x -> y. `values`/`masks`/`bias` are tensors (initializers) or TensorProtos; with
    `weights_as_inputs` values and masks are graph inputs instead."""
    attrs = {"rows": rows, "cols": cols} if attrs is None else attrs
    inits, inputs = [], [helper.make_tensor_value_info("x", x_type, None)]
    for name, t in (("w.values", values), ("w.masks", masks), ("b", bias)):
        if t is None:
            continue
        if weights_as_inputs and name != "b":
            dtype = TensorProto.INT32 if name == "w.masks" else TensorProto.FLOAT
            inputs.append(helper.make_tensor_value_info(name, dtype, None))
        elif isinstance(t, TensorProto):
            inits.append(t)
        else:
            inits.append(numpy_helper.from_array(np.asarray(t), name))
    node = helper.make_node("Sparse24MatMul", ["x", "w.values", "w.masks"] + (["b"] if bias is not None else []),
                            ["y"], domain="rose", name=node_name, **attrs)
    graph = helper.make_graph([node], "one-linear", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                           None)], initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("rose", 1)],
                          ir_version=10)
    return m.SerializeToString()


def raw_session(model_bytes: bytes, threads: int = 1):
    """A plain onnxruntime session (not runtime.ort's), so errors are onnxruntime's own exceptions."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.register_custom_ops_library(str(rort.library_path()))
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def packed(W: torch.Tensor, dtype=torch.float32):
    values, masks = cpu24.pack(W.to(dtype))
    return values, masks


def rel(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))


SHAPES = [(1, 4), (9, 12), (37, 100), (70, 260), (130, 132)]
TOKENS = [1, 2, 3, 7, 8, 9, 17, 33]


@pytest.mark.parametrize("threads", [1, 2])
def test_matches_numpy_fp32(threads):
    """Rows not a multiple of 8, 1-33 tokens, 2-D and 3-D inputs, bias or not."""
    rng = np.random.default_rng(threads)
    for i, (rows, cols) in enumerate(SHAPES):
        W = random24(rows, cols, i)
        values, masks = packed(W)
        bias = rng.standard_normal(rows).astype(np.float32) if i % 2 else None
        sess = rort.session(model(rows, cols, values, masks, bias), threads=threads)
        for M in TOKENS:
            shape = (M, cols) if M % 2 else (1, M, cols)
            x = rng.standard_normal(shape).astype(np.float32)
            (y,) = sess.run(None, {"x": x})
            ref = x.astype(np.float64) @ W.double().numpy().T + (bias if bias is not None else 0.0)
            assert y.shape == shape[:-1] + (rows,) and y.dtype == np.float32
            assert rel(y, ref) <= 1e-5, (rows, cols, M)


@pytest.mark.parametrize("threads", [1, 2])
def test_many_tokens(threads):
    """Prefill sizes: several blocks of rows and columns in the many-token path, the last ones partial (rows not a
    multiple of 8 or 128, an odd panel count), tokens not a multiple of its 12, 3-D inputs, bias or not."""
    rng = np.random.default_rng(7)
    for rows, cols, bias_on in ((203, 520, True), (1003, 264, False), (64, 64, True)):
        W = random24(rows, cols, rows)
        values, masks = packed(W)
        bias = rng.standard_normal(rows).astype(np.float32) if bias_on else None
        sess = rort.session(model(rows, cols, values, masks, bias), threads=threads)
        for shape in ((150, cols), (2, 37, cols), (32, cols)):
            x = rng.standard_normal(shape).astype(np.float32)
            (y,) = sess.run(None, {"x": x})
            ref = x.astype(np.float64) @ W.double().numpy().T + (bias if bias is not None else 0.0)
            assert y.shape == shape[:-1] + (rows,)
            assert rel(y, ref) <= 1e-5, (rows, cols, shape)


def test_bf16_values():
    """bf16 values, fp32 activations and accumulation: equal to the product with the bf16-rounded weights."""
    rng = np.random.default_rng(3)
    rows, cols = 70, 132
    W = random24(rows, cols, 3)
    values, masks = packed(W, torch.bfloat16)
    Wb = W.to(torch.bfloat16).double().numpy()
    bias = rng.standard_normal(rows).astype(np.float32)
    for threads in (1, 2):
        sess = rort.session(model(rows, cols, bf16_tensor(values, "w.values"), masks, bias), threads=threads)
        for M in (1, 5, 12, 33, 70):
            x = rng.standard_normal((M, cols)).astype(np.float32)
            (y,) = sess.run(None, {"x": x})
            assert rel(y, x.astype(np.float64) @ Wb.T + bias) <= 1e-5, (M, threads)


def test_empty_input_and_weights_as_graph_inputs():
    """Zero tokens give an empty output; packed weights fed as graph inputs (not initializers) are checked on every
    call instead of once, so a good pair works and a corrupt one fails the call."""
    W = random24(20, 16, 0)
    values, masks = packed(W)
    sess = raw_session(model(20, 16, values, masks))
    (y,) = sess.run(None, {"x": np.zeros((0, 16), np.float32)})
    assert y.shape == (0, 20)
    sess = raw_session(model(20, 16, values, masks, weights_as_inputs=True))
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    feeds = {"x": x, "w.values": values.numpy(), "w.masks": masks.numpy()}
    (y,) = sess.run(None, feeds)
    assert rel(y, x.astype(np.float64) @ W.double().numpy().T) <= 1e-5
    bad = masks.numpy().copy()
    bad[1] ^= 1 << 9  # panel 0, group 1 (G = 4), row 2 (bits 8-11): one bit flipped
    with pytest.raises(Exception, match=r"rose\.Sparse24MatMul node 'layer0': masks are corrupt: row 2, "
                                        r"columns 4-7 does not keep exactly 2 of 4"):
        sess.run(None, {**feeds, "w.masks": bad})
    (y2,) = sess.run(None, feeds)  # the session is still usable
    assert np.array_equal(y, y2)


def corrupt_cases():
    """(name, model bytes, expected message regex) for damaged or mis-sized packed weights."""
    rows, cols = 20, 16  # 3 panels (the last one half padding), 4 groups
    W = random24(rows, cols, 1)
    values, masks = packed(W)
    m = masks.numpy()
    cases = []
    bad = m.copy()
    bad[1 * 4 + 3] |= 0xF << 4 * 5  # panel 1, row 13, group 3: four bits
    cases.append(("bad nibble", model(rows, cols, values, bad), r"masks are corrupt: row 13, columns 12-15"))
    bad = m.copy()
    bad[2 * 4 + 0] &= ~(0xF << 4 * 6)  # panel 2, row 22 (padding), group 0: no bits
    cases.append(("bad padding nibble", model(rows, cols, values, bad), r"masks are corrupt: padding row 22"))
    cases.append(("short values", model(rows, cols, values[:-1], m),
                  r"values must be 1-D with 192 elements for a 20x16 weight, got shape \(191,\)"))
    cases.append(("2-D values", model(rows, cols, values.reshape(12, 16), m),
                  r"values must be 1-D with 192 elements .* got shape \(12, 16\)"))
    cases.append(("long masks", model(rows, cols, values, np.concatenate([m, m[:1]])),
                  r"masks must be 1-D with 12 elements for a 20x16 weight, got shape \(13,\)"))
    cases.append(("rows attribute too large", model(rows + 8, cols, values, m),
                  r"values must be 1-D with 256 elements for a 28x16 weight"))
    cases.append(("int64 masks", model(rows, cols, values, m.astype(np.int64)), r"masks|Input2|Type"))
    cases.append(("float16 values", model(rows, cols, values.numpy().astype(np.float16), m), r"Input1|Type|values"))
    cases.append(("no rows attribute", model(rows, cols, values, m, attrs={"cols": cols}),
                  r"rose\.Sparse24MatMul needs the int attribute 'rows'"))
    cases.append(("cols not a multiple of 4", model(rows, 18, values, m, attrs={"rows": rows, "cols": 18}),
                  r"needs rows > 0 and cols a positive multiple of 4, got rows=20 cols=18"))
    cases.append(("negative rows", model(rows, cols, values, m, attrs={"rows": -8, "cols": cols}),
                  r"needs rows > 0 and cols a positive multiple of 4, got rows=-8 cols=16"))
    return cases


@pytest.mark.parametrize("case", corrupt_cases(), ids=lambda c: c[0])
def test_corrupt_packed_weights_fail_session_creation(case):
    """A damaged initializer fails when the session is created (one onnxruntime error naming node and problem),
    through onnxruntime directly and through runtime.ort.session (one line, RoseRuntimeError)."""
    _, model_bytes, pattern = case
    with pytest.raises(Exception, match=pattern):
        raw_session(model_bytes)
    with pytest.raises(RoseRuntimeError, match=pattern) as err:
        rort.session(model_bytes)
    assert "\n" not in str(err.value)


def test_bad_inputs_fail_the_call():
    W = random24(20, 16, 2)
    values, masks = packed(W)
    bias = np.ones(20, np.float32)
    sess = raw_session(model(20, 16, values, masks, bias))
    with pytest.raises(Exception, match=r"X's last dimension must be cols=16, got shape \(3, 12\)"):
        sess.run(None, {"x": np.zeros((3, 12), np.float32)})
    with pytest.raises(Exception, match=r"X's last dimension must be cols=16, got shape \(\)"):
        sess.run(None, {"x": np.zeros((), np.float32)})
    with pytest.raises(Exception, match="tensor\\(double\\)|Unexpected input data type"):
        sess.run(None, {"x": np.zeros((3, 16), np.float64)})
    sess = raw_session(model(20, 16, values, masks, np.ones(19, np.float32)))
    with pytest.raises(Exception, match=r"bias must be 1-D with 20 elements, got shape \(19,\)"):
        sess.run(None, {"x": np.zeros((3, 16), np.float32)})


def test_session_with_own_options():
    """runtime.ort.session registers the library on the caller's SessionOptions (thread count kept or set); options
    that already carry it give one clear line instead of onnxruntime's registry message."""
    W = random24(16, 8, 3)
    values, masks = packed(W)
    model_bytes = model(16, 8, values, masks)
    x = np.ones((2, 8), np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    (y,) = rort.session(model_bytes, options=options).run(None, {"x": x})
    assert rel(y, x.astype(np.float64) @ W.double().numpy().T) <= 1e-5
    with pytest.raises(RoseRuntimeError, match="registered twice on these SessionOptions"):
        rort.session(model_bytes, options=rort.session_options(threads=2))
    with pytest.raises(RoseRuntimeError, match="threads must be at least 1"):
        rort.session(model_bytes, threads=0)


def test_library_path_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setattr(rort, "LIBRARY", tmp_path / "librose_ort.so")
    with pytest.raises(RoseRuntimeError, match=r"is not built: run `make install`") as err:
        rort.library_path()
    assert "\n" not in str(err.value)
    with pytest.raises(RoseRuntimeError, match="make install"):
        rort.session(b"")


def test_no_pytorch_dependency(tmp_path, library):
    """ldd shows no libtorch or libc10, and a process that never imports torch runs the operator."""
    if shutil.which("ldd"):
        libs = subprocess.run(["ldd", str(library)], capture_output=True, text=True, check=True).stdout
        assert "libtorch" not in libs and "libc10" not in libs and "python" not in libs, libs
    W = random24(37, 100, 5)
    values, masks = packed(W)
    (tmp_path / "m.onnx").write_bytes(model(37, 100, values, masks))
    x = np.random.default_rng(1).standard_normal((3, 100)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "want.npy", x.astype(np.float64) @ W.double().numpy().T)
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        from runtime.ort import session
        sess = session({str(tmp_path / "m.onnx")!r}, threads=2)
        y, = sess.run(None, {{"x": np.load({str(tmp_path / "x.npy")!r})}})
        want = np.load({str(tmp_path / "want.npy")!r})
        assert float(np.abs(y - want).max() / np.abs(want).max()) < 1e-5
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr


def test_too_old_onnxruntime_gets_one_clear_line():
    """The test hook ROSE_ORT_API_VERSION asks for a C API newer than this onnxruntime has: registering fails with
    the library's message (run in a child process so the failed registration cannot affect this one)."""
    script = textwrap.dedent("""
        import onnxruntime as ort
        from runtime import ort as rort
        so = ort.SessionOptions()
        try:
            so.register_custom_ops_library(str(rort.library_path()))
        except Exception as exc:
            print("ORT:", str(exc).strip().splitlines()[0])
        try:
            rort.session_options()
        except rort.RoseRuntimeError as exc:
            print("ROSE:", exc)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "ROSE_ORT_API_VERSION": "999"})
    assert run.returncode == 0, run.stderr
    lines = dict(line.split(": ", 1) for line in run.stdout.strip().splitlines())
    want = (r"rose's onnxruntime operators need C API version 999 \(onnxruntime 1\.999 or newer\); this "
            r"onnxruntime is " + re.escape(ort.__version__))
    assert re.search(want, lines["ORT"]), lines
    assert re.search(want, lines["ROSE"]) and lines["ROSE"].startswith(f"onnxruntime {ort.__version__} cannot load")


def declared_slots() -> dict[int, str]:
    text = (ROOT / "cpp" / "ort_abi.h").read_text()
    slots = {int(i): name for name, i in re.findall(r"X\((\w+), (\d+),", text)}
    assert len(slots) >= 15, slots  # the regex found the table
    return slots


def test_every_declared_slot_is_called(tmp_path):
    """ROSE_ORT_TRACE=1 makes the library report each OrtApi slot on its first call (index and name). One child
    process walks every path (registration, kernel creation with constant weights, the kernel on the thread pool,
    a missing attribute, unloading) and must report them all, under the indices and names ort_abi.h declares."""
    rows, cols = 200, 64
    W = random24(rows, cols, 9)
    values, masks = packed(W)
    (tmp_path / "ok.onnx").write_bytes(model(rows, cols, values, masks, np.ones(rows, np.float32)))
    (tmp_path / "bad.onnx").write_bytes(model(rows, cols, values, masks, attrs={"cols": cols}))
    script = textwrap.dedent(f"""
        import numpy as np
        from runtime.ort import session
        s = session({str(tmp_path / "ok.onnx")!r}, threads=2)
        for m in (1, 64):  # few tokens, many tokens: both on the pool
            s.run(None, {{"x": np.ones((m, {cols}), np.float32)}})
        try:
            session({str(tmp_path / "bad.onnx")!r})
        except Exception as exc:
            print("failed as expected")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "ROSE_ORT_TRACE": "1"})
    assert run.returncode == 0 and "failed as expected" in run.stdout, run.stdout + run.stderr
    called = {int(i): name for i, name in re.findall(r"rose_ort: slot (\d+) (\w+)", run.stderr)}
    declared = declared_slots()
    assert called == declared, (f"never called: {sorted(set(declared) - set(called))}, "
                                f"unexpected: {sorted(set(called) - set(declared))}")
    assert "checking masks of rose.Sparse24MatMul node 'layer0'" in run.stderr  # once, at creation
    assert run.stderr.count("checking masks") == 1, run.stderr


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


_HAS_AVX2 = {"avx2", "fma"} <= _cpu_flags()  # what the library's AVX2 path needs (cpp/sparse24.cpp)


@pytest.mark.parametrize("isa", ["scalar", pytest.param("avx2", marks=pytest.mark.skipif(
    not _HAS_AVX2, reason="this CPU has no AVX2 and FMA: the library would run its scalar path instead"))])
def test_lower_code_paths(tmp_path, isa):
    """The kernel's AVX2 and scalar paths inside onnxruntime (ROSE24_ISA caps the path the library picks; a child
    process, since the library reads it once), fp32 and bf16 values, few and many tokens."""
    rng = np.random.default_rng(11)
    rows, cols = 37, 100
    W = random24(rows, cols, 4)
    bias = rng.standard_normal(rows).astype(np.float32)
    files = []
    for M in (9, 64):  # few tokens, many tokens
        np.save(tmp_path / f"x{M}.npy", rng.standard_normal((M, cols)).astype(np.float32))
    for dtype, ref_w in ((torch.float32, W), (torch.bfloat16, W.to(torch.bfloat16))):
        values, masks = packed(W, dtype)
        v = bf16_tensor(values, "w.values") if dtype == torch.bfloat16 else values
        path = tmp_path / f"{dtype}.onnx"
        path.write_bytes(model(rows, cols, v, masks, bias))
        for M in (9, 64):
            x = tmp_path / f"x{M}.npy"
            want = tmp_path / f"{dtype}-{M}.npy"
            np.save(want, np.load(x).astype(np.float64) @ ref_w.double().numpy().T + bias)
            files.append((str(path), str(x), str(want)))
    script = textwrap.dedent(f"""
        import numpy as np
        from runtime.ort import session
        for path, x, want in {files!r}:
            y, = session(path, threads=2).run(None, {{"x": np.load(x)}})
            want = np.load(want)
            err = float(np.abs(y - want).max() / np.abs(want).max())
            assert err < 1e-5, (path, x, err)
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "ROSE24_ISA": isa, "ROSE_ORT_TRACE": "1"})
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr
    paths = set(re.findall(r"rose_ort: kernel path (\w+)", run.stderr))
    assert paths == {isa}, paths
