"""Issue 15's promises, each tried as a hostile or clumsy user would: --overwrite never deletes what is not rose's,
the swap survives a kill at any point, loaders refuse damaged files in one line, bad inputs are one-line errors
before any heavy work, outputs get ordinary permissions, transformers refuses rose's packed folders loudly."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, make_pruned, one_line_error, run_cli as run

# ---- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    return make_pruned(tmp_path_factory.mktemp("safety"), "2:4", hidden=64)


@pytest.fixture(scope="module")
def exported(pruned, tmp_path_factory) -> Path:
    from export.api import export_all

    out = tmp_path_factory.mktemp("safety-exp") / "out"
    export_all(pruned, out, "hf,packed24,semi-structured")
    return out


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def copy_of(src: Path, tmp_path: Path, name: str = "copy") -> Path:
    """A copy of an export output (its manifest included), to damage."""
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


# ---- --out and --overwrite -----------------------------------------------------------------------------------

def test_out_may_not_be_or_contain_or_lie_inside_an_input(pruned, tmp_path):
    before = snapshot(pruned)
    parent = pruned.parent
    cases = [
        (["export", "--pruned", pruned, "--out", parent], "contains the input --pruned"),
        (["export", "--pruned", pruned, "--out", f"{parent}/logs/../{pruned.name}"], "is the input --pruned"),
        (["export", "--pruned", f"{pruned}/", "--out", pruned], "is the input --pruned"),
        (["export", "--pruned", pruned, "--out", pruned / "inside"], "lies inside the input --pruned"),
        (["prune", "--model", pruned, "--calib", parent / "calib.txt", "--out", pruned, "--nsamples", 2, "--seqlen",
          16], "is the input --model"),
    ]
    link = tmp_path / "link"
    link.symlink_to(pruned, target_is_directory=True)
    cases.append((["export", "--pruned", pruned, "--out", link], "is the input --pruned"))
    for args, fragment in cases:
        one_line_error(run(*args, "--overwrite"), fragment)
    assert snapshot(pruned) == before


def test_out_may_not_hold_the_calibration_file(pruned, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    calib = data / "calib.txt"
    shutil.copy(pruned.parent / "calib.txt", calib)
    one_line_error(run("prune", "--model", pruned, "--calib", calib, "--out", tmp_path, "--overwrite", "--nsamples",
                       2, "--seqlen", 16), "contains the input --calib")
    assert calib.is_file()
    held_out = data / "eval.txt"  # the perplexity text of --eval is an input too
    shutil.copy(pruned.parent / "calib.txt", held_out)
    one_line_error(run("prune", "--model", pruned, "--calib", pruned.parent / "calib.txt", "--eval", "--eval-data",
                       held_out, "--out", data, "--overwrite", "--nsamples", 2, "--seqlen", 16),
                   "contains the input --eval-data")
    assert calib.is_file() and held_out.is_file()


def test_overwrite_refuses_a_directory_rose_did_not_write(pruned, tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("four years")
    one_line_error(run("export", "--pruned", pruned, "--out", mine, "--formats", "hf", "--overwrite"),
                   f"{mine} is not one")
    assert (mine / "thesis.txt").read_text() == "four years"
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("export X=1")
    monkeypatch.setenv("HOME", str(home))
    one_line_error(run("export", "--pruned", pruned, "--out", "~", "--formats", "hf", "--overwrite"), "is not one")
    assert (home / ".bashrc").is_file()
    fake = tmp_path / "fake"  # a marker file that is not rose's JSON does not count
    fake.mkdir()
    (fake / "manifest.json").write_text("my notes")
    one_line_error(run("export", "--pruned", pruned, "--out", fake, "--formats", "hf", "--overwrite"), "is not one")
    assert (fake / "manifest.json").read_text() == "my notes"
    empty = tmp_path / "empty"  # an empty directory holds nothing to lose
    empty.mkdir()
    assert run("export", "--pruned", pruned, "--out", empty, "--formats", "hf", "--overwrite", "-q").exit_code == 0


KILLER = """
import os, sys
from pathlib import Path
import rose.outputs as o
out, step, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
if mode == "fallback":
    o._exchange = lambda a, b: False
def hook(name):
    if name == step:
        os._exit(9)
o._step = hook
with o.atomic_output(out, overwrite=True) as tmp:
    (tmp / "manifest.json").write_text('{"formats": {}, "version": 2}')
    (tmp / "payload.bin").write_bytes(b"new" * 1000)
"""


@pytest.mark.parametrize("mode,step", [("exchange", "exchange"), ("exchange", "exchanged"),
                                       ("fallback", "ready"), ("fallback", "moved-old"), ("fallback", "moved-new"),
                                       ("fallback", "rename-never-reached")])
def test_a_kill_at_any_point_of_the_swap_loses_nothing(tmp_path, mode, step):
    """The process dies (os._exit: no cleanup runs) at each point of the swap. Right after, on the exchange path the
    output is always there, old or new and complete; on the fallback path a kill between its renames can leave it
    missing, and the next run that writes it restores a complete copy. Either way no hidden copy stays behind."""
    from rose.outputs import recover

    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"formats": {}, "version": 1}')
    (out / "payload.bin").write_bytes(b"old" * 1000)
    old, new = snapshot(out), {"manifest.json": b'{"formats": {}, "version": 2}', "payload.bin": b"new" * 1000}
    done = subprocess.run([sys.executable, "-c", KILLER, str(out), step, mode], cwd=ROOT, capture_output=True)
    killed = step != "rename-never-reached"
    assert done.returncode == (9 if killed else 0), done.stderr
    if mode == "exchange":
        assert out.is_dir() and snapshot(out) in (old, new)
    recover(out)  # what the next run does first
    assert snapshot(out) in (old, new)
    assert snapshot(out) == (new if step in ("exchanged", "moved-old", "moved-new", "rename-never-reached") else old)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_stale_partial_outputs_of_killed_runs_are_removed(pruned, tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / ".out.rose-999999-abc.partial"   # no process has this id
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    live = tmp_path / f".out.rose-{os.getppid()}-xyz.partial"  # a running process's: left alone
    live.mkdir()
    r = run("export", "--pruned", pruned, "--out", out, "--formats", "hf", "-q")
    assert r.exit_code == 0, r.output
    assert not stale.exists() and live.exists() and (out / "manifest.json").is_file()
    assert f"removed {stale}, left by a killed run" in r.output  # said, even under -q, not done in silence


def test_a_previous_copy_restored_from_a_killed_swap_still_needs_overwrite(pruned, tmp_path):
    """Where the swap is two renames (no renameat2), a kill between them leaves only the hidden previous copy; the
    next run puts it back first, so writing over it still takes --overwrite."""
    out = tmp_path / "out"
    assert run("export", "--pruned", pruned, "--out", out, "--formats", "hf", "-q").exit_code == 0
    before = (out / "manifest.json").read_bytes()
    out.rename(tmp_path / ".out.rose-999999-abc.old")  # what the killed run left
    r = run("export", "--pruned", pruned, "--out", out, "--formats", "hf", "-q")
    assert r.exit_code == 2
    restored, error = [ln for ln in r.output.splitlines() if ln.strip()]
    assert restored.endswith("restored the previous copy that a killed run left in .out.rose-999999-abc.old")
    assert error.startswith("Error: output") and "already exists" in error
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_full_disk_is_one_line_and_leaves_nothing(pruned, tmp_path, monkeypatch):
    import errno

    import export.source

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export.source.shutil, "copy2", full)
    out = tmp_path / "out"
    one_line_error(run("export", "--pruned", pruned, "--out", out, "--formats", "hf", "-q"), "no space left on the device")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []

    import safetensors.torch

    def rust_full(*a, **k):  # what safetensors raises (its own exception type) on ENOSPC
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                           "\"No space left on device\" })")

    monkeypatch.undo()
    monkeypatch.setattr(safetensors.torch, "save_file", rust_full)
    one_line_error(run("export", "--pruned", pruned, "--out", out, "--formats", "packed24", "-q"),
                   "no space left on the device")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.slow  # an ONNX export per umask
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_ordinary_permissions(pruned, tmp_path, umask):
    """Outputs follow the user's umask, as `save_pretrained` into a normal directory would: a server running as
    another user can read every file, the ONNX graph included (no 0700/0600 left over from the temporary dirs)."""
    old = os.umask(umask)
    try:
        out = tmp_path / "out"
        assert run("export", "--pruned", pruned, "--out", out, "--formats", "hf,packed24,onnx", "-q").exit_code == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".safetensors", ".onnx", ".json"}
    assert {p.stat().st_mode & 0o777 for p in files} == {0o666 & ~umask}
    assert {p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_dir()} == {0o777 & ~umask}


# ---- loaders -------------------------------------------------------------------------------------------------

def _rewrite(path: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


K = "model.layers.0.self_attn.k_proj"
Q = "model.layers.0.self_attn.q_proj"  # 64 x 64: packed in the semi-structured export too


def _loaders():
    from runtime.cpu24 import load_packed24_cpu
    from runtime.packed24 import load_packed24

    return [load_packed24, load_packed24_cpu]


def _swap_pair(t: torch.Tensor) -> None:
    """Row 0, first byte: move one kept column inside the first group (two bits stay two): a different model."""
    b = int(t[0, 0])
    low = b & 15
    moved = {0b0011: 0b0101, 0b0101: 0b0011, 0b1001: 0b1010, 0b1010: 0b1001, 0b0110: 0b1100, 0b1100: 0b0110}[low]
    t[0, 0] = (b & 0xF0) | moved


def _break_pattern(t: torch.Tensor) -> None:
    """Two flipped bits that keep the row's bit count: one group keeps three, the next one."""
    b = int(t[0, 0])
    lo, hi = b & 15, b >> 4
    free = next(i for i in range(4) if not lo >> i & 1)
    kept = next(i for i in range(4) if hi >> i & 1)
    t[0, 0] = (lo | 1 << free) | ((hi & ~(1 << kept)) << 4)


@pytest.mark.parametrize("damage,fragment", [
    (lambda t: _swap_pair(t[f"{K}.bitmask"]), "does not match its size and sha256 in manifest.json"),
    (lambda t: t[f"{K}.compressed"].view(torch.int32)[0, 0].__ixor__(1), "does not match its size and sha256"),
])
def test_hashes_catch_damage_that_keeps_the_format_valid(exported, tmp_path, damage, fragment):
    d = copy_of(exported, tmp_path)
    _rewrite(d / "packed24" / "model.safetensors", damage)
    for load in _loaders():
        with pytest.raises(Exception, match=fragment) as err:
            load(d / "packed24")
        assert type(err.value).__name__ == "RoseRuntimeError" and "\n" not in str(err.value)
        assert str(d / "packed24" / "model.safetensors") in str(err.value)
        load(d / "packed24", verify=False)  # the documented escape hatch loads it unchecked


@pytest.mark.parametrize("damage,fragment", [
    (lambda t: _break_pattern(t[f"{K}.bitmask"]), f"{K}.bitmask does not keep exactly two of four in row 0, "
                                                 f"columns 0-3"),
    (lambda t: t[f"{K}.compressed"].__setitem__((1, 1), float("nan")), f"{K}.compressed holds NaN"),
    (lambda t: t["model.norm.weight"].__setitem__(0, float("inf")), "model.norm.weight holds NaN or infinite"),
    (lambda t: t.__setitem__(f"{K}.shape", torch.tensor([[64], [32]])), f"{K}.shape says [64, 32]"),
    (lambda t: t.pop(f"{K}.bitmask"), f"{K}.compressed has no {K}.bitmask"),
    (lambda t: t.__setitem__(f"{K}.compressed", t[f"{K}.compressed"][:-1]), f"{K}.compressed has shape"),
    (lambda t: t.__setitem__(f"{K}.compressed", t["model.layers.0.self_attn.q_proj.compressed"].clone()),
     f"{K}.compressed has shape"),
    (lambda t: t.pop("model.norm.weight"), "no weights for ['model.norm.weight']"),
])
def test_structure_is_checked_even_without_a_manifest(exported, tmp_path, damage, fragment):
    d = copy_of(exported, tmp_path)
    (d / "manifest.json").unlink()
    _rewrite(d / "packed24" / "model.safetensors", damage)
    for load in _loaders():
        with pytest.raises(Exception, match=fragment.replace("[", r"\[").replace("]", r"\]")) as err:
            load(d / "packed24")
        assert type(err.value).__name__ == "RoseRuntimeError" and "\n" not in str(err.value)


def test_packed24_loads_verified_and_exactly(exported, pruned):
    from runtime.cpu24 import load_packed24_cpu
    from runtime.packed24 import load_packed24
    from runtime.verify import verify_files
    from safetensors.torch import load_file

    assert verify_files(exported / "packed24")
    source = load_file(pruned / "model.safetensors")
    model = load_packed24(exported / "packed24")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in source.items())
    assert model.config.hidden_act == "silu" and not hasattr(model.config, "rose_format")
    ids = torch.randint(1, 70, (1, 9))
    with torch.no_grad():
        assert torch.allclose(load_packed24_cpu(exported / "packed24")(ids).logits, model(ids).logits, atol=1e-5)


def test_semi_structured_loader_checks_too(exported, tmp_path):
    from runtime.semi import load_dense

    assert load_dense(exported / "semi-structured").config.hidden_act == "silu"
    d = copy_of(exported, tmp_path)
    _rewrite(d / "semi-structured" / "model.safetensors",
             lambda t: t[f"{Q}.packed"].view(torch.int16)[0, 0].__ixor__(1))
    with pytest.raises(Exception, match="does not match its size and sha256"):
        load_dense(d / "semi-structured")
    (d / "manifest.json").unlink()
    _rewrite(d / "semi-structured" / "model.safetensors",
             lambda t: t[f"{Q}.packed"].__setitem__((0, 0), float("nan")))
    with pytest.raises(Exception, match="holds NaN"):
        load_dense(d / "semi-structured")


@pytest.mark.parametrize("fmt", ["packed24", "semi-structured"])
def test_transformers_refuses_rose_packed_folders_loudly(exported, tmp_path, fmt):
    """transformers would build these models with every packed weight random (only a load report): the config makes
    it fail instead, naming rose's loader; the quantization entry is dropped here so that the check does not depend
    on which compressed-tensors is installed (0.14 makes transformers refuse it anyway)."""
    from transformers import AutoModelForCausalLM

    d = copy_of(exported / fmt, tmp_path, fmt)
    config = json.loads((d / "config.json").read_text())
    config.pop("quantization_config", None)
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match=f"rose {fmt} export: transformers cannot load this folder"):
        AutoModelForCausalLM.from_pretrained(d)
    line = one_line_error(run("eval", "--model", d, "--data", ROOT / "README.md", "--seqlen", 16),
                          f"rose's {fmt} export")
    import runtime

    named = re.findall(r"runtime\.(\w+)\(", line)
    assert named and all(hasattr(runtime, n) for n in named), line  # the loader it names exists


def test_packed24_stays_readable_by_legacy_compressed_tensors_with_the_marker(exported, pruned):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from safetensors.torch import load_file

    d = exported / "packed24"
    assert json.loads((d / "config.json").read_text())["rose_format"]["name"] == "packed24"
    dense = dict(ModelCompressor.from_pretrained(str(d)).sparsity_compressor.decompress(str(d)))
    source = load_file(pruned / "model.safetensors")
    assert dense.keys() == source.keys() and all(torch.equal(dense[k], source[k]) for k in source)


# ---- inputs that used to end in tracebacks -------------------------------------------------------------------

@pytest.mark.parametrize("damage,fragment", [
    (lambda d: os.truncate(d / "model.safetensors", 1000), "model.safetensors cannot be read"),
    (lambda d: (d / "config.json").write_text("{oops"), "config.json cannot be read as JSON"),
    (lambda d: (d / "rose_recipe.json").write_text("[1, 2"), "rose_recipe.json is damaged"),
])
def test_export_of_a_damaged_pruned_directory_is_one_line(pruned, tmp_path, damage, fragment):
    d = tmp_path / "damaged"
    shutil.copytree(pruned, d)
    damage(d)
    out = tmp_path / "out"
    one_line_error(run("export", "--pruned", d, "--out", out, "--formats", "hf"), fragment)
    assert not out.exists()


def test_eval_of_a_truncated_checkpoint_is_one_line(pruned, tmp_path):
    d = tmp_path / "damaged"
    shutil.copytree(pruned, d)
    os.truncate(d / "model.safetensors", 1000)
    one_line_error(run("eval", "--model", d, "--data", pruned.parent / "calib.txt", "--seqlen", 16),
                   "damaged or truncated")


def test_seqlen_beyond_the_context_is_refused(pruned, tmp_path):
    calib = pruned.parent / "calib.txt"
    one_line_error(run("eval", "--model", pruned, "--data", calib, "--seqlen", 512),
                   "--seqlen 512 is longer than")
    one_line_error(run("prune", "--model", pruned, "--calib", calib, "--seqlen", 300, "--nsamples", 1,
                       "--out", tmp_path / "o"), "context of 256 tokens")
    one_line_error(run("prune", "--model", pruned, "--calib", calib, "--seqlen", 16, "--nsamples", 1, "--eval",
                       "--eval-data", calib, "--eval-seqlen", 1024, "--out", tmp_path / "o"), "--eval-seqlen 1024")
    assert not (tmp_path / "o").exists()


def test_inputs_are_checked_before_the_model_is_loaded(pruned, tmp_path, monkeypatch):
    import rose.api
    import rose.models

    def never(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(rose.models, "load_model", never)
    monkeypatch.setattr(rose.api, "load_model", never)
    one_line_error(run("eval", "--model", pruned, "--data", tmp_path / "missing.txt", "--seqlen", 16),
                   "does not exist")
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet at all")
    r = run("eval", "--model", pruned, "--data", bad, "--seqlen", 16)
    one_line_error(r, "cannot load data")  # one line: datasets' own log lines are silenced
    one_line_error(run("prune", "--model", pruned, "--calib", bad, "--nsamples", 1, "--seqlen", 16,
                       "--out", tmp_path / "o"), "Parquet magic bytes")


# ---- onnxruntime-genai ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_onnxruntime_genai_generates_pytorchs_greedy_tokens(tmp_path):
    """`onnx`, `onnx-packed24` and `onnx-sparse24` carry a genai_config.json with which onnxruntime_genai.Model(dir)
    generates the same greedy tokens as PyTorch (a tiny model whose greedy tokens vary: initializer range 0.2)."""
    og = pytest.importorskip("onnxruntime_genai")
    import numpy as np
    from transformers import AutoModelForCausalLM

    from export.api import export_all

    pruned = make_pruned(tmp_path, "2:4", hidden=64, init=0.2)
    manifest = export_all(pruned, tmp_path / "out", "onnx,onnx-packed24,onnx-sparse24")
    prompt = [5, 9, 13, 22, 7]
    model = AutoModelForCausalLM.from_pretrained(pruned).eval()
    want = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=0)[0].tolist()
    assert len(set(want[len(prompt):])) > 5  # a greedy path that would show a difference
    for fmt in ("onnx", "onnx-packed24", "onnx-sparse24"):  # the last on rose's operator library
        assert manifest["formats"][fmt]["genai_config"] == "genai_config.json"
        genai = og.Model(str(tmp_path / "out" / fmt))
        params = og.GeneratorParams(genai)
        params.set_search_options(max_length=len(want), do_sample=False)
        gen = og.Generator(genai, params)
        gen.append_tokens(np.array([prompt], dtype=np.int32))
        while not gen.is_done():
            gen.generate_next_token()
        assert [int(t) for t in gen.get_sequence(0)] == want, fmt


def test_a_loader_refuses_another_format_and_reads_unmarked_older_exports(exported, tmp_path):
    from runtime.packed24 import load_packed24

    with pytest.raises(Exception, match="is not a packed24 export .its config.json says semi-structured"):
        load_packed24(exported / "semi-structured")
    d = copy_of(exported / "packed24", tmp_path, "packed24")  # alone: no manifest beside it
    config = json.loads((d / "config.json").read_text())
    config.update(config.pop("rose_format")["replaced"])  # as rose wrote packed24 before the marker
    (d / "config.json").write_text(json.dumps(config))
    assert load_packed24(d).config.hidden_act == "silu"
