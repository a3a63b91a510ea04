"""`--permute` (rose/permute.py, rose/arch.py): the free input-channel permutations leave a model's logits unchanged
(grouped-query attention, biases), the search never lets N:M keep less, the statistics follow the columns, and the
option works with every method, keeping N:M exact."""
from __future__ import annotations

import itertools

import pytest
import torch

from rose.arch import all_sublayers, decoder_layers, free_permutations, get_weight, linear_sublayers, permute_channels
from rose.calibrate import capture_inputs, collect_stats, prune_model
from rose.config import PruneConfig
from rose.masks import is_nm
from rose.methods import METHODS
from rose.offload import calibration_mode
from rose.permute import _deals, _top_sum, balanced_permutation, kept_saliency, permute_layer

from conftest import one_line_error, run_cli, tiny_model


def qwen2_model():
    """A tiny Qwen2: grouped-query attention with biases on q, k and v (v's rows carry their bias along)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=80, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.2)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.bias.normal_()   # from_config leaves biases at zero, which would prove nothing
    return model


def model_of(kind: str):
    return qwen2_model() if kind == "qwen2" else tiny_model(kind, init=0.2)


def calib(n=4, seqlen=32, seed=0):
    return torch.randint(1, 70, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (1, 2)])
def test_the_search_is_a_permutation_that_never_keeps_less(n, m):
    g = torch.Generator().manual_seed(3)
    S = torch.rand(24, 16 * m, generator=g) ** 4       # skewed saliency, so that pairings matter
    perm = balanced_permutation(S, n, m, rounds=8, generator=torch.Generator().manual_seed(1))
    assert sorted(perm.tolist()) == list(range(16 * m))
    assert kept_saliency(S[:, perm], n, m) > kept_saliency(S, n, m)     # here it finds more
    # where no deal keeps more (every column alike), nothing moves: float rounding trades nothing
    flat = torch.full((4, 4 * m), 0.1)
    assert torch.equal(balanced_permutation(flat, n, m, rounds=5), torch.arange(4 * m))


@pytest.mark.parametrize("m,keep", [(4, 1), (4, 2), (4, 3), (8, 2), (8, 4), (8, 7), (2, 1)])
def test_fast_top_sums_match_topk(m, keep):
    X = torch.randn(5, 7, m, 3)
    assert torch.allclose(_top_sum(X, keep), X.topk(keep, dim=-2).values.sum(-2), atol=1e-6)


@pytest.mark.parametrize("m", [2, 4, 8])
def test_the_deals_split_2m_columns_into_two_groups_identity_first(m):
    A, B = _deals(m)
    assert A[0].tolist() == list(range(m)) and B[0].tolist() == list(range(m, 2 * m))
    for a, b in zip(A.tolist(), B.tolist()):
        assert sorted(a + b) == list(range(2 * m))
    if m <= 4:   # every way, each once (column 0 fixes which group is which)
        assert len(A) == len(list(itertools.combinations(range(2 * m), m))) // 2


@pytest.mark.parametrize("kind", ["llama", "qwen2", "opt"])
def test_free_permutations_leave_the_logits_unchanged(kind):
    model = model_of(kind)
    cfg = model.config
    ids = torch.randint(0, 70, (2, 24), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        before = model(ids).logits
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for layer in decoder_layers(model):
            groups = free_permutations(model, layer)
            for group in groups:
                permute_channels(layer, group, [torch.randperm(group.width, generator=g) for _ in group.tied])
        after = model(ids).logits
    moved = {k.split(".")[-2] for k, v in model.state_dict().items() if not torch.equal(v, state[k])}
    producers = {p.split(".")[-1] for gr in groups for p in gr.producers}
    consumers = {gr.consumer.split(".")[-1] for gr in groups}
    assert moved == producers | consumers, moved            # exactly the consumers and the producers moved
    if kind != "opt":   # grouped-query attention: the query heads that share a value head share its permutation
        assert cfg.num_attention_heads > cfg.num_key_value_heads and len(groups[1].tied[0]) == 2
    assert torch.allclose(after, before, atol=1e-5, rtol=0), float((after - before).abs().max())


def test_the_statistics_follow_the_columns():
    """After `permute_layer`, the consumers' statistics equal those collected afresh on the permuted layer."""
    model = tiny_model("llama", init=0.2)
    cfg = PruneConfig(method="sparsegpt", sparsity="2:4", permute=True, permute_rounds=4)
    layer = decoder_layers(model)[0]
    subs = linear_sublayers(model, layer)
    with calibration_mode(model), torch.no_grad():
        inputs, kwargs = capture_inputs(model, calib(), "cpu")
        stats, outs = collect_stats(layer, subs, inputs, kwargs, "cpu")
        records = permute_layer(model, layer, stats, cfg, seed=0)
        fresh, outs_after = collect_stats(layer, subs, inputs, kwargs, "cpu")
    assert set(records) == {"mlp.down_proj", "self_attn.o_proj"}
    assert all(r["moved"] > 0 and r["lost_after"] < r["lost_before"] for r in records.values()), records
    for name in subs:
        assert torch.allclose(stats[name].H, fresh[name].H, atol=1e-4), name
        assert torch.allclose(stats[name].sq_norm, fresh[name].sq_norm, atol=1e-5), name
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(outs, outs_after))   # the same layer function


def test_the_loop_with_permute_computes_the_same_function_until_pruned(monkeypatch):
    """With a method that prunes nothing, `--permute` alone must leave the model's logits where they were."""
    import rose.calibrate as calibrate
    from rose.methods import Pruned

    model = tiny_model("llama", init=0.2)
    ids = calib(2, 24, seed=5)
    with torch.no_grad():
        before = model(ids).logits
    monkeypatch.setattr(calibrate, "prune_weight", lambda W, stats, cfg: Pruned(W.clone()))
    records = prune_model(model, calib(), PruneConfig(method="magnitude", sparsity="2:4", permute=True,
                                                      permute_rounds=4), progress=False)
    with torch.no_grad():
        after = model(ids).logits
    assert sum("permutation" in r for r in records) == 4            # down_proj and o_proj of both layers
    assert torch.allclose(after, before, atol=1e-5, rtol=0), float((after - before).abs().max())


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_permute_works_with_every_method_and_keeps_nm_exact(method, pattern):
    n, m = map(int, pattern.split(":"))
    model = tiny_model("llama", init=0.2)
    records = prune_model(model, calib(), PruneConfig(method=method, sparsity=pattern, nsamples=4, seqlen=32,
                                                      permute=True, permute_rounds=4), progress=False)
    for name, mod in all_sublayers(model).items():
        W = get_weight(mod)
        assert is_nm(W, n, m) and int((W == 0).sum()) == W.numel() * n // m, name   # exactly N of every M
    perms = [r["permutation"] for r in records if "permutation" in r]
    assert len(perms) == 4 and all(p["lost_after"] <= p["lost_before"] for p in perms)
    assert any(p["lost_after"] < p["lost_before"] for p in perms)


def test_permute_cli_records_it_and_refuses_what_it_cannot_do(tiny_dir, calib_file, tmp_path):
    import json

    llama = tiny_dir("llama")
    out = tmp_path / "out"
    base = ["prune", "--method", "wanda", "--calib", calib_file, "--nsamples", 2, "--seqlen", 32, "--quiet"]
    result = run_cli(*base, "--model", llama, "--sparsity", "2:4", "--permute", "--out", out)
    assert result.exit_code == 0, result.output
    recipe = json.loads((out / "rose_recipe.json").read_text())
    assert recipe["config"]["permute"] is True and recipe["config"]["permute_rounds"] == 20
    summary = recipe["results"]["permutation"]
    assert summary["sublayers"] == 4 and summary["mean_lost_after"] <= summary["mean_lost_before"]
    one_line_error(run_cli(*base, "--model", llama, "--sparsity", "0.5", "--permute", "--out", tmp_path / "a"),
                   "--permute needs an N:M --sparsity")
    one_line_error(run_cli(*base, "--model", tiny_dir("gpt2"), "--sparsity", "2:4", "--permute",
                           "--out", tmp_path / "b"), "--permute does not know the free permutations of model type")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_heads_narrower_than_a_group_are_left_alone_and_recorded():
    """Head size 12 with 4:8: an N:M group would straddle two heads, so o_proj is not permuted (and says why)."""
    model = tiny_model("llama", hidden=48, init=0.2)
    assert model.config.head_dim == 12
    records = prune_model(model, calib(), PruneConfig(method="wanda", sparsity="4:8", nsamples=4, seqlen=32,
                                                      permute=True, permute_rounds=2), progress=False)
    o = [r["permutation"] for r in records if r["name"] == "self_attn.o_proj"]
    down = [r["permutation"] for r in records if r["name"] == "mlp.down_proj"]
    assert o == [{"skipped": "width 12 is not a multiple of 8"}] * 2 and all("lost_after" in d for d in down)
    assert all(is_nm(get_weight(mod), 4, 8) for mod in all_sublayers(model).values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_permute_on_cuda_matches_the_cpu():
    """The layer and its statistics sit on the GPU; the search runs on the CPU: the same permutations either way."""
    cfg = dict(method="wanda", sparsity="2:4", nsamples=4, seqlen=32, permute=True, permute_rounds=4)
    cpu, gpu = tiny_model("llama", init=0.2), tiny_model("llama", init=0.2)
    rec_cpu = prune_model(cpu, calib(), PruneConfig(**cfg), progress=False)
    rec_gpu = prune_model(gpu, calib(), PruneConfig(device="cuda", **cfg), progress=False)
    assert [r.get("permutation", {}).get("moved") for r in rec_cpu] == [r.get("permutation", {}).get("moved")
                                                                         for r in rec_gpu]
    for name, mod in all_sublayers(gpu).items():
        assert get_weight(mod).device.type == "cpu" and is_nm(get_weight(mod), 2, 4), name
