"""End to end on the embedded SmolLM2-135M: prune with a few calibration samples, save, reload, check sparsity."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from rose.arch import all_sublayers, get_weight
from rose.masks import is_nm
from rose.models import load_model

from conftest import VALID, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    if not VALID.is_file():
        pytest.skip(f"shared calibration file {VALID} is missing")
    out = tmp_path_factory.mktemp("smol") / "rose24"
    r = run_cli("prune", "--model", "smollm2-135m", "--method", "rose", "--sparsity", "2:4", "--calib", VALID,
                "--nsamples", 2, "--seqlen", 64, "--quiet", "--out", out)
    assert r.exit_code == 0, r.output
    return out


def test_reload_and_every_pruned_weight_is_2_4(pruned_dir):
    model = AutoModelForCausalLM.from_pretrained(pruned_dir)
    subs = all_sublayers(model)
    assert len(subs) == 30 * 7
    for name, mod in subs.items():
        W = get_weight(mod)
        assert is_nm(W, 2, 4), name
        assert float((W == 0).float().mean()) == pytest.approx(0.5, abs=1e-3), name
    dense, _ = load_model("smollm2-135m")
    pruned_names = {f"{n}.weight" for n in subs}
    untouched = dense.state_dict()
    for key, value in model.state_dict().items():  # embeddings (tied with lm_head) and norms never change
        if key not in pruned_names:
            assert torch.equal(value, untouched[key]), key
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_recipe_records_the_run(pruned_dir):
    recipe = json.loads((pruned_dir / "rose_recipe.json").read_text())
    assert recipe["model"] == "smollm2-135m"
    assert recipe["config"]["calib"] == str(VALID) and recipe["config"]["nsamples"] == 2
    assert len(recipe["layers"]) == 210 and recipe["results"]["sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert 0 <= recipe["results"]["columnar_fraction"] <= 1
    assert all(0 <= r["rel_error"] < 1 for r in recipe["layers"])


def test_pruned_model_still_speaks(pruned_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pruned_dir)
    model = AutoModelForCausalLM.from_pretrained(pruned_dir)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == 49152
