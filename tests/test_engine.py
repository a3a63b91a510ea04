"""The sequential calibration engine on tiny random models of three layouts (LLaMA, OPT, GPT-2 Conv1D)."""
import functools

import pytest
import torch
from transformers import AutoModelForCausalLM

from rose.arch import all_sublayers, decoder_layers, get_weight, set_weight
from rose.best_order import guard_layer, token_error
from rose.calibrate import capture_inputs, prune_model, run_layer, sublayer_record
from rose.config import PruneConfig, Sparsity
from rose.masks import is_nm

from conftest import tiny_model

EXPECTED = {"llama": 7, "opt": 6, "gpt2": 4}


def calib(n=4, seqlen=32, seed=0):
    return torch.randint(1, 70, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["llama", "opt", "gpt2"])
def test_finds_layers_and_linears(kind):
    model = tiny_model(kind)
    assert len(decoder_layers(model)) == 2
    subs = all_sublayers(model)
    assert len(subs) == 2 * EXPECTED[kind]
    assert not any("lm_head" in n or "embed" in n or "wte" in n for n in subs)


@pytest.mark.parametrize("kind", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("method,pattern", [("sparsegpt", "2:4"), ("wanda", "0.5"), ("rose", "4:8"),
                                            ("magnitude", "2:4"), ("rose", "0.6")])
def test_prunes_every_sublayer_and_nothing_else(kind, method, pattern):
    model = tiny_model(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = Sparsity.parse(pattern)
    records = prune_model(model, calib(), PruneConfig(method=method, sparsity=s), progress=False)
    subs = all_sublayers(model)
    assert len(records) == len(subs)
    pruned_names = {f"{n}.weight" for n in subs}
    for name, mod in subs.items():
        W = get_weight(mod)
        if s.is_nm:
            assert is_nm(W, s.n, s.m), name
        assert abs(float((W == 0).float().mean()) - s.ratio) < 0.02, name
    for k, v in model.state_dict().items():  # embeddings, lm_head, norms, biases: untouched
        if k not in pruned_names:
            assert torch.equal(v, before[k]), k
    assert all(0 <= r["rel_error"] < 1 for r in records)


def test_capture_inputs_match_the_embeddings():
    model = tiny_model("llama")
    ids = calib(n=2)
    inputs, kwargs = capture_inputs(model, ids, "cpu")
    assert len(inputs) == 2 and inputs[0].shape == (1, 32, 64)
    assert torch.allclose(inputs[1][0], model.model.embed_tokens(ids[1]))
    assert kwargs["use_cache"] is False


def test_next_layer_sees_pruned_outputs(monkeypatch):
    """Sequential: layer 1 is calibrated on the outputs of the *pruned* layer 0, exactly as the pruned model runs."""
    import rose.calibrate as engine

    seen = {}
    real = engine.prune_weight

    def spy(W, stats, cfg):
        seen.setdefault(len(seen), stats.H.clone())
        return real(W, stats, cfg)

    monkeypatch.setattr(engine, "prune_weight", spy)
    model = tiny_model("llama")
    ids = calib()
    prune_model(model, ids, PruneConfig(method="sparsegpt", sparsity=Sparsity.parse("0.7")), progress=False)
    H_layer1_q = seen[7]  # sublayers of layer 0 come first (7 of them), then layer 1's q_proj
    xs = []
    hook = model.model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, a, o: xs.append(a[0][0]))
    with torch.no_grad():
        for row in ids:
            model(row.unsqueeze(0), use_cache=False)
    hook.remove()
    X = torch.cat(xs)
    assert torch.allclose(H_layer1_q, 2 / X.shape[0] * X.T @ X, rtol=1e-4, atol=1e-5)
    dense = tiny_model("llama")
    xd = []
    hook = dense.model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, a, o: xd.append(a[0][0]))
    with torch.no_grad():
        dense(ids[:1], use_cache=False)
    hook.remove()
    assert not torch.allclose(xd[0], xs[0], atol=1e-3)  # and those inputs differ from the dense model's


def test_gpt2_conv1d_groups_run_along_inputs():
    model = tiny_model("gpt2")
    prune_model(model, calib(), PruneConfig(method="sparsegpt", sparsity=Sparsity.parse("2:4")), progress=False)
    conv = model.transformer.h[0].mlp.c_fc          # Conv1D stores (in, out)
    assert is_nm(conv.weight.data.t(), 2, 4)
    assert not is_nm(conv.weight.data, 2, 4)


def test_saved_model_reloads_with_same_weights(tmp_path):
    model = tiny_model("llama")
    prune_model(model, calib(), PruneConfig(method="wanda", sparsity=Sparsity.parse("2:4")), progress=False)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_token_error_is_per_token_relative():
    y = [torch.tensor([[[3.0, 4.0], [300.0, 400.0]]])]          # token norms 5 and 500
    off = [torch.tensor([[[3.0, 4.0 + 5.0], [300.0, 400.0 + 5.0]]])]
    # the large token's error is tiny relative to its norm; the small token's equals its norm: (1 + 1e-4) / 2
    assert abs(token_error(off, y) - (1.0 + 1e-4) / 2) < 1e-7  # float32 arithmetic
    assert token_error(y, y) == 0.0


def _guard_case(fallback_kind: str):
    """Layer 0 of a tiny LLaMA after a 0.7 prune, with a fallback that is either the dense weight (error 0)
    or all zeros (worse than the pruned weight): the guard must keep whichever reaches the dense outputs."""
    from rose.methods import Candidate

    model = tiny_model("llama")
    layer = decoder_layers(model)[0]
    subs = {n: m for n, m in all_sublayers(model).items() if n.startswith("model.layers.0.")}
    inputs, kwargs = capture_inputs(model, calib(), "cpu")
    run = functools.partial(run_layer, layer, kwargs=kwargs)
    with torch.no_grad():
        targets = run(inputs)
        dense = {n: get_weight(m).clone() for n, m in subs.items()}
        names = ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.o_proj"]
        pruned = {}
        for n in names:
            W = dense[n]
            pruned[n] = W.masked_fill(W.abs() < W.abs().quantile(0.7), 0)
            set_weight(subs[n], pruned[n])
        fallback = {n: Candidate(dense[n] if fallback_kind == "dense" else torch.zeros_like(dense[n]), 0.4,
                                 "identity") for n in names}
        outs, decision = guard_layer(run, subs, {n: c.weight for n, c in fallback.items()}, inputs, targets)
    info = {"order": "diag_h", "candidate_errors": {"identity": 0.4, "diag_h": 0.5}}
    recs = [sublayer_record(0, n, subs[n], dict(info), 0.5, 0.0, fallback.get(n), decision) for n in subs]
    return subs, dense, pruned, recs, outs, targets


def test_layer_guard_keeps_sparsegpt_when_its_layer_output_is_closer():
    subs, dense, pruned, recs, outs, targets = _guard_case("dense")
    assert token_error(outs, targets) < 1e-10
    for n in pruned:
        assert torch.equal(get_weight(subs[n]), dense[n])
    by_name = {r["name"]: r for r in recs}
    assert by_name["model.layers.0.mlp.down_proj"]["sparsity"] == 0.0   # recomputed from the kept (dense) weight
    assert all(r["layer_guard"]["kept"] == "sparsegpt" for r in recs)
    assert by_name["model.layers.0.mlp.down_proj"]["order"] == "identity"
    assert by_name["model.layers.0.mlp.down_proj"]["order_before_guard"] == "diag_h"
    assert by_name["model.layers.0.mlp.down_proj"]["rel_error"] == 0.4
    assert by_name["model.layers.0.self_attn.q_proj"]["order"] == "diag_h"  # no fallback: untouched


def test_layer_guard_keeps_the_best_orders_when_they_are_closer():
    subs, dense, pruned, recs, outs, targets = _guard_case("zeros")
    for n in pruned:
        assert torch.equal(get_weight(subs[n]), pruned[n])
    g = recs[0]["layer_guard"]
    assert g["kept"] == "best" and g["error_best"] <= g["error_sparsegpt"]
    assert abs(token_error(outs, targets) - g["error_best"]) < 1e-6
    assert all(r["order"] == "diag_h" for r in recs)


def test_order_best_records_the_layer_guard():
    model = tiny_model("llama")
    records = prune_model(model, calib(), PruneConfig(method="rose", sparsity=Sparsity.parse("2:4"), order="best"),
                          progress=False)
    guarded = [r for r in records if "layer_guard" in r]
    assert guarded, "diag(H) should beat the identity somewhere, so some layer is checked"
    for r in guarded:
        g = r["layer_guard"]
        assert min(g["error_best"], g["error_sparsegpt"]) == (g["error_best"] if g["kept"] == "best"
                                                               else g["error_sparsegpt"])
    assert not any("sparsegpt_weight" in r for r in records)  # the fallback tensors never reach the recipe
    for name, mod in all_sublayers(model).items():
        assert is_nm(get_weight(mod), 2, 4), name


def test_layer_guard_targets_are_the_dense_models_hidden_states(monkeypatch):
    """Layer 1 is judged against the *dense* model's layer-1 output, not the pruned stream's; and at layer 0, where
    both runs see the same inputs, every sublayer left in the identity order is SparseGPT's solution exactly."""
    import rose.best_order as best_order

    seen = []
    real = best_order.guard_layer

    def spy(run, subs, fallbacks, inputs, targets):
        seen.append([t.clone() for t in targets])
        return real(run, subs, fallbacks, inputs, targets)

    monkeypatch.setattr(best_order, "guard_layer", spy)
    ids = calib()
    model = tiny_model("llama")
    records = prune_model(model, ids, PruneConfig(method="rose", sparsity=Sparsity.parse("0.7"), order="best"),
                          progress=False)
    dense = tiny_model("llama")
    outs = []
    hook = decoder_layers(dense)[1].register_forward_hook(
        lambda m, a, o: outs.append(o[0] if isinstance(o, (tuple, list)) else o))
    with torch.no_grad():
        for row in ids:
            dense(row.unsqueeze(0), use_cache=False)
    hook.remove()
    assert len(seen) == 2
    for got, want in zip(seen[1], outs):
        assert torch.allclose(got, want, atol=1e-5)
    sgpt = tiny_model("llama")
    prune_model(sgpt, ids, PruneConfig(method="sparsegpt", sparsity=Sparsity.parse("0.7")), progress=False)
    subs, ref = all_sublayers(model), all_sublayers(sgpt)
    identity0 = [f"model.layers.0.{r['name']}" for r in records if r["layer"] == 0 and r["order"] == "identity"]
    assert identity0
    for name in identity0:
        assert torch.equal(get_weight(subs[name]), get_weight(ref[name])), name
