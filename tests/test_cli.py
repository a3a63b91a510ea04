"""The CLI end to end on a tiny model directory, and every bad input as a one-line error with exit code 2."""
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from rose.masks import is_nm

from conftest import one_line_error, run_cli as run


def prune_args(model_dir, calib_file, out, *extra):
    return ["prune", "--model", model_dir, "--calib", calib_file, "--nsamples", 4, "--seqlen", 32, "--out", out,
            "--quiet", *extra]


def test_prune_writes_model_and_recipe(tiny_dir, calib_file, tmp_path):
    out = tmp_path / "pruned"
    r = run(*prune_args(tiny_dir("llama"), calib_file, out, "--method", "rose", "--sparsity", "2:4", "--eval",
                        "--eval-data", calib_file, "--eval-seqlen", 32, "--max-tokens", 128))
    assert r.exit_code == 0, r.output
    recipe = json.loads((out / "rose_recipe.json").read_text())
    cfg = recipe["config"]
    assert (cfg["method"], cfg["sparsity"], cfg["nsamples"], cfg["seqlen"], cfg["seed"]) == ("rose", "2:4", 4, 32, 0)
    assert cfg["calib"] == str(calib_file) and "torch" in recipe["versions"]
    assert int(recipe["versions"]["torch_threads"]) >= 1
    assert len(recipe["layers"]) == 14 and {"rel_error", "sparsity", "relative_range", "reordered", "order"} <= set(
        recipe["layers"][0])
    assert recipe["results"]["eval"]["windows"] == 4 and recipe["results"]["eval"]["perplexity"] > 1
    model = AutoModelForCausalLM.from_pretrained(out)
    for i in range(2):
        assert is_nm(model.model.layers[i].mlp.down_proj.weight, 2, 4)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary leftovers


def test_prune_with_refit_and_two_eval_texts(tiny_dir, calib_file, tmp_path):
    out = tmp_path / "pruned"
    r = run(*prune_args(tiny_dir("llama"), calib_file, out, "--method", "sparsegpt", "--sparsity", "2:4", "--refit",
                        "--refit-steps", 8, "--refit-lr", 1e-3, "--refit-samples", 2, "--eval", "--eval-data",
                        calib_file, "--eval-data", "pydoc", "--eval-seqlen", 32, "--max-tokens", 64))
    assert r.exit_code == 0, r.output
    recipe = json.loads((out / "rose_recipe.json").read_text())
    cfg = recipe["config"]
    assert (cfg["refit"], cfg["refit_steps"], cfg["refit_lr"], cfg["refit_samples"], cfg["refit_loss"]) == (
        True, 8, 1e-3, 2, "relative")
    fits = {r["layer"]: r["refit"] for r in recipe["layers"]}
    assert sorted(fits) == [0, 1] and all({"error_before", "error_after", "kept"} <= set(f) for f in fits.values())
    assert recipe["results"]["refit"]["layers"] == 2
    assert recipe["results"]["eval"]["data"] == str(calib_file)
    assert [e["data"] for e in recipe["results"]["eval_extra"]] == ["pydoc"]
    model = AutoModelForCausalLM.from_pretrained(out)
    for i in range(2):
        assert is_nm(model.model.layers[i].mlp.down_proj.weight, 2, 4)
    one_line_error(run(*prune_args(tiny_dir("llama"), calib_file, tmp_path / "o2", "--refit", "--refit-samples", 5)),
                   "--refit-samples must be an integer from 1 to --nsamples (4)")


def test_existing_output_needs_overwrite(tiny_dir, calib_file, tmp_path):
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    one_line_error(run(*prune_args(tiny_dir(), calib_file, out)), "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"
    # --overwrite replaces only what rose wrote: a directory of the user's is refused, by name
    one_line_error(run(*prune_args(tiny_dir(), calib_file, out, "--overwrite")), "is not one")
    assert (out / "keep.txt").read_text() == "precious"
    fresh = tmp_path / "fresh"
    assert run(*prune_args(tiny_dir(), calib_file, fresh)).exit_code == 0
    (fresh / "extra.bin").write_bytes(b"x")
    assert run(*prune_args(tiny_dir(), calib_file, fresh, "--overwrite")).exit_code == 0
    assert not (fresh / "extra.bin").exists() and (fresh / "rose_recipe.json").exists()


def test_failed_run_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    import rose.api

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(rose.api.Recipe, "save", boom)
    out = tmp_path / "pruned"
    calib = tmp_path / "c.txt"
    calib.write_text("some words here and there\n" * 50)
    r = run(*prune_args(tiny_dir(), calib, out))
    assert r.exit_code != 0
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("sparsity,fragment", [("2:2", "0 < N < M"), ("5:4", "0 < N < M"), ("1.2", "0 < p < 1"),
                                               ("0", "0 < p < 1"), ("-0.1", "0 < p < 1")])
def test_bad_sparsity(tiny_dir, calib_file, tmp_path, sparsity, fragment):
    one_line_error(run(*prune_args(tiny_dir(), calib_file, tmp_path / "o", "--sparsity", sparsity)), fragment)


def test_unknown_model(calib_file, tmp_path, monkeypatch):
    import rose.models

    monkeypatch.setattr(rose.models, "hub_reachable", lambda: False)
    one_line_error(run(*prune_args("no-such-org/no-such-model-xyz", calib_file, tmp_path / "o")), "cannot load model")
    one_line_error(run(*prune_args(tmp_path / "missing-dir", calib_file, tmp_path / "o")), "not a directory")


def test_width_not_multiple_of_m_names_the_layer(tiny_dir, calib_file, tmp_path):
    model = tiny_dir("llama", hidden=40, inter=80)  # 40 % 16 = 8
    one_line_error(run(*prune_args(model, calib_file, tmp_path / "o", "--sparsity", "8:16")),
                   "model.layers.0.self_attn.q_proj")


def test_empty_and_short_calibration(tiny_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    one_line_error(run(*prune_args(tiny_dir(), empty, tmp_path / "o")), "holds no text")
    short = tmp_path / "short.txt"
    short.write_text("too short\n")
    one_line_error(run(*prune_args(tiny_dir(), short, tmp_path / "o")), "too few")
    one_line_error(run(*prune_args(tiny_dir(), tmp_path / "nope.txt", tmp_path / "o")), "does not exist")


def test_hub_names_offline_are_one_line(tiny_dir, tmp_path, monkeypatch):
    import rose.data

    monkeypatch.setattr(rose.data, "hub_reachable", lambda: False)
    r = run("prune", "--model", tiny_dir(), "--calib", "wikitext2", "--nsamples", 2, "--seqlen", 16,
            "--out", tmp_path / "o", "--quiet")
    one_line_error(r, "cannot load data 'wikitext2'")


def test_order_best_needs_rose(tiny_dir, calib_file, tmp_path):
    one_line_error(run(*prune_args(tiny_dir(), calib_file, tmp_path / "o", "--method", "sparsegpt",
                                   "--order", "best")), "--method rose")


def test_cuda_without_cuda(tiny_dir, calib_file, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    one_line_error(run(*prune_args(tiny_dir(), calib_file, tmp_path / "o", "--device", "cuda")), "needs CUDA")


def test_eval_command(tiny_dir, calib_file):
    r = run("eval", "--model", tiny_dir(), "--data", calib_file, "--seqlen", 32, "--max-tokens", 96, "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.output.strip().splitlines()[-1])
    assert result["windows"] == 3 and result["perplexity"] > 1 and "eval_extra" not in result
    r = run("eval", "--model", tiny_dir(), "--data", calib_file, "--data", "pydoc", "--seqlen", 32, "--max-tokens",
            96, "--json")
    both = json.loads(r.output.strip().splitlines()[-1])
    assert both["perplexity"] == result["perplexity"] and both["eval_extra"][0]["data"] == "pydoc"
    assert both["eval_extra"][0]["perplexity"] != result["perplexity"]


def test_pydoc_is_a_built_in_text():
    from pydoc_data.topics import topics

    from rose.data import load_rows

    rows = load_rows("pydoc", "test")
    assert rows == load_rows("pydoc", "train") and len(rows) == len([t for t in topics.values() if t.strip()])
    assert rows[0] == topics[sorted(topics)[0]] and any('The "if" statement' in r for r in rows)


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "rose_export", "prune", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--sparsity" in out.stdout and "2:4" in out.stdout
