"""The refit after pruning (rose/refit.py) on tiny random models: masks kept exactly, layer errors never worse,
every method, determinism, and the dense stream it reads."""
import pytest
import torch

from rose.arch import all_sublayers, decoder_layers, get_weight
from rose.calibrate import capture_inputs, prune_model
from rose.config import PruneConfig
from rose.dense_stream import token_error
from rose.masks import is_nm
from rose.refit import layer_loss, window_order

from conftest import tiny_model

REFIT = dict(refit=True, refit_steps=16, refit_lr=1e-3)   # tiny models: few steps, a larger step size


def calib(n=4, seqlen=32, seed=0):
    return torch.randint(1, 70, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def pruned(kind="llama", **cfg):
    model = tiny_model(kind)
    records = prune_model(model, calib(), PruneConfig(**cfg), progress=False)
    return model, records


def weights(model):
    return {n: get_weight(m).clone() for n, m in all_sublayers(model).items()}


def layer_errors(records):
    return {r["layer"]: r["refit"] for r in records}


@pytest.mark.parametrize("kind", ["llama", "opt", "gpt2"])
def test_refit_keeps_the_masks_exactly_and_changes_only_kept_weights(kind):
    plain, _ = pruned(kind, method="sparsegpt", sparsity="2:4")
    model, records = pruned(kind, method="sparsegpt", sparsity="2:4", **REFIT)
    before, after = weights(plain), weights(model)
    assert any(f["kept"] == "refit" for f in layer_errors(records).values())
    for name, W in after.items():
        assert is_nm(W, 2, 4), name
        assert abs(float((W == 0).float().mean()) - 0.5) < 1e-6, name
    layer0 = [n for n in after if ".0." in n]
    for name in layer0:   # layer 0 is pruned on the same inputs with or without the refit: same mask, new values
        assert torch.equal(after[name] == 0, before[name] == 0), name
    assert any(not torch.equal(after[n], before[n]) for n in layer0)
    dense = tiny_model(kind).state_dict()
    linear = {f"{n}.weight" for n in after}
    for k, v in model.state_dict().items():  # norms, biases, embeddings: untouched
        if k not in linear:
            assert torch.equal(v, dense[k]), k
    assert all(p.requires_grad for p in model.parameters())   # restored after training


@pytest.mark.parametrize("method,extra", [("magnitude", {}), ("wanda", {}), ("sparsegpt", {}), ("rose", {}),
                                          ("rose", {"order": "best"})])
@pytest.mark.parametrize("pattern", ["2:4", "0.7"])
def test_refit_with_every_method_never_worsens_a_layer(method, extra, pattern):
    model, records = pruned(method=method, sparsity=pattern, **extra, **REFIT)
    fits = layer_errors(records)
    assert sorted(fits) == [0, 1]
    for f in fits.values():
        assert (f["error_after"] < f["error_before"]) == (f["kept"] == "refit")
    assert any(f["kept"] == "refit" for f in fits.values())
    for r in records:
        W = get_weight(all_sublayers(model)[f"model.layers.{r['layer']}.{r['name']}"])
        assert r["sparsity"] == round(float((W == 0).float().mean()), 6)
        if pattern == "2:4":
            assert is_nm(W, 2, 4)
        else:
            assert abs(r["sparsity"] - 0.7) < 0.02


def test_a_refit_that_hurts_is_undone_bit_for_bit():
    """A far too large step makes every layer worse: each keeps its pruned weights, so the model is exactly the
    one pruned without the refit."""
    plain, _ = pruned(method="sparsegpt", sparsity="2:4")
    model, records = pruned(method="sparsegpt", sparsity="2:4", refit=True, refit_steps=4, refit_lr=10.0)
    for f in layer_errors(records).values():
        assert f["kept"] == "pruned" and f["error_after"] > f["error_before"]
    for name, W in weights(model).items():
        assert torch.equal(W, weights(plain)[name]), name


def test_recorded_errors_are_the_layers_distance_to_the_dense_outputs():
    """Layer 0 sees the same inputs on both streams: its recorded errors are the pruned and the refitted layer's
    `token_error` to the dense layer's outputs."""
    ids = calib()
    dense = tiny_model("llama")
    plain = tiny_model("llama")
    prune_model(plain, ids, PruneConfig(method="wanda", sparsity="2:4"), progress=False)
    model = tiny_model("llama")
    records = prune_model(model, ids, PruneConfig(method="wanda", sparsity="2:4", **REFIT), progress=False)
    with torch.no_grad():
        inputs, kwargs = capture_inputs(dense, ids, "cpu")

        def layer0(m):
            return [decoder_layers(m)[0](x, **kwargs) for x in inputs]

        def first(outs):
            return [o[0] if isinstance(o, (tuple, list)) else o for o in outs]

        target = first(layer0(dense))
        fit = layer_errors(records)[0]
        assert fit["kept"] == "refit"
        assert fit["error_before"] == pytest.approx(token_error(first(layer0(plain)), target), rel=1e-4)
        assert fit["error_after"] == pytest.approx(token_error(first(layer0(model)), target), rel=1e-4)


def test_refit_targets_are_the_dense_models_hidden_states(monkeypatch):
    """Without a layer guard, the loop still carries the dense stream for the refit: layer 1 is fitted to the dense
    model's layer-1 outputs, from the pruned model's layer-1 inputs."""
    import rose.calibrate as engine

    seen = []
    real = engine.refit_layer

    def spy(layer, run, subs, inputs, targets, before, cfg, index):
        seen.append(([x.clone() for x in inputs], [t.clone() for t in targets]))
        return real(layer, run, subs, inputs, targets, before, cfg, index)

    monkeypatch.setattr(engine, "refit_layer", spy)
    ids = calib()
    model = tiny_model("llama")
    prune_model(model, ids, PruneConfig(method="magnitude", sparsity="2:4", **REFIT), progress=False)
    dense = tiny_model("llama")
    outs, ins = [], []
    hook = decoder_layers(dense)[1].register_forward_hook(
        lambda m, a, o: outs.append(o[0] if isinstance(o, (tuple, list)) else o))
    hook_in = decoder_layers(model)[1].register_forward_pre_hook(lambda m, a: ins.append(a[0]))
    with torch.no_grad():
        for row in ids:
            dense(row.unsqueeze(0), use_cache=False)
            model(row.unsqueeze(0), use_cache=False)
    hook.remove(), hook_in.remove()
    assert len(seen) == 2
    for got, want in zip(seen[1][1], outs):
        assert torch.allclose(got, want, atol=1e-5)
    for got, want in zip(seen[1][0], ins):   # the pruned (and refitted) model's own hidden states
        assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(seen[1][0][0], seen[1][1][0], atol=1e-3)


def test_refit_is_deterministic_for_a_seed():
    a, _ = pruned(method="sparsegpt", sparsity="2:4", **REFIT)
    b, _ = pruned(method="sparsegpt", sparsity="2:4", **REFIT)
    c, _ = pruned(method="sparsegpt", sparsity="2:4", seed=1, **REFIT)   # same windows, another order of them
    wa, wb, wc = weights(a), weights(b), weights(c)
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    assert any(not torch.equal(wa[n], wc[n]) for n in wa)


def test_window_order_passes_over_the_chosen_samples():
    order = window_order(3, 8, seed=0, layer=0)
    assert len(order) == 8 and sorted(order[:3]) == [0, 1, 2] and sorted(order[3:6]) == [0, 1, 2]
    assert set(order[6:]) <= {0, 1, 2}
    assert window_order(1, 5, seed=0, layer=0) == [0] * 5
    assert window_order(5, 5, seed=0, layer=0) != window_order(5, 5, seed=0, layer=1)


def test_relative_loss_is_the_guards_token_error():
    g = torch.Generator().manual_seed(0)
    y, t = torch.randn(1, 7, 16, generator=g), torch.randn(1, 7, 16, generator=g) * 5
    assert float(layer_loss(y, t, "relative")) == pytest.approx(token_error([y], [t]), rel=1e-6)
    assert float(layer_loss(y, t, "mse")) == pytest.approx(float(((y - t) ** 2).mean()), rel=1e-6)


def test_recipe_summary_of_the_refit():
    from rose.api import summarize

    _, records = pruned(method="sparsegpt", sparsity="2:4", **REFIT)
    s = summarize(records)["refit"]
    fits = layer_errors(records).values()
    assert s["layers"] == 2 and s["kept"] == sum(f["kept"] == "refit" for f in fits)
    assert s["mean_error_after"] < s["mean_error_before"]
    assert "refit" not in summarize(pruned(method="sparsegpt", sparsity="2:4")[1])


def test_refit_norms_trains_the_rest_of_the_layer_too():
    model, records = pruned(method="sparsegpt", sparsity="2:4", refit_norms=True, **REFIT)
    dense = tiny_model("llama").state_dict()
    state = model.state_dict()
    assert layer_errors(records)[0]["kept"] == "refit"
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(state[norm], dense[norm])
    assert torch.equal(state["model.norm.weight"], dense["model.norm.weight"])   # outside the decoder layers
    for name, W in weights(model).items():
        assert is_nm(W, 2, 4), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_refit_on_cuda_keeps_the_masks():
    model = tiny_model("llama")
    records = prune_model(model, calib(), PruneConfig(method="sparsegpt", sparsity="2:4", device="cuda", **REFIT),
                          progress=False)
    assert any(f["kept"] == "refit" for f in layer_errors(records).values())
    for name, W in weights(model).items():
        assert W.device.type == "cpu" and is_nm(W, 2, 4), name
