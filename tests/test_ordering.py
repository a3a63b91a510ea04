"""ROSE's order: a permutation of the right shape, whole groups, exact reduction to SparseGPT, and a real win."""
import pytest
import torch

from rose.config import PruneConfig, Sparsity
from rose.masks import is_nm
from rose.methods import prune_weight
from rose.ordering import block_quantiles, hessian_diag_order, rose_order
from rose.solver import reconstruction_error
from rose.stats import InputStats

from conftest import correlated_inputs, hessian


def stats_for(X):
    st = InputStats(X.shape[1], "cpu")
    for chunk in X.split(128):
        st.add(chunk)
    return st


def columnar_layer(rows=64, cols=512, hot=(256, 384), seed=0):
    """One block of columns carries most of the magnitude, as in the paper's motivating figure."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.1
    W[:, hot[0]:hot[1]] *= 20
    X = correlated_inputs(cols, 2048, seed)
    return W, X


def assert_permutation(perm, n):
    assert perm.dtype == torch.long and perm.shape == (n,)
    assert torch.equal(torch.sort(perm).values, torch.arange(n))


@pytest.mark.parametrize("sparsity", ["0.5", "0.7", "2:4", "4:8"])
@pytest.mark.parametrize("mode", ["both", "columns", "blocks"])
def test_order_is_a_block_preserving_permutation(sparsity, mode):
    W, X = columnar_layer()
    s = Sparsity.parse(sparsity)
    o = rose_order(W, stats_for(X).sq_norm, s, mode=mode, threshold=0.0)
    assert o.reordered
    assert_permutation(o.perm, W.shape[1])
    start = 0
    for width in o.blocks:  # every solver block is one original block of 128
        members = o.perm[start:start + width]
        assert len(set((members // 128).tolist())) == 1
        start += width
    if s.is_nm:  # whole groups move: each aligned run of M holds one original group, in order unless sorted
        runs = o.perm.reshape(-1, s.m)
        assert (runs // s.m == runs[:, :1] // s.m).all()
        assert (runs.diff(dim=1) == 1).all()


def test_within_group_sort_keeps_groups_contiguous():
    W, X = columnar_layer()
    o = rose_order(W, stats_for(X).sq_norm, Sparsity.parse("2:4"), threshold=0.0, within_group="sort")
    runs = o.perm.reshape(-1, 4)
    assert (runs // 4 == runs[:, :1] // 4).all()
    assert not (runs.diff(dim=1) == 1).all()  # some group was re-sorted


@pytest.mark.parametrize("sparsity", ["2:4", "4:8", "0.5"])
@pytest.mark.parametrize("within", ["keep", "sort"])
def test_nm_masks_valid_in_original_coordinates_after_rose(sparsity, within):
    W, X = columnar_layer(cols=576, hot=(128, 256))
    cfg = PruneConfig(method="rose", sparsity=Sparsity.parse(sparsity), rose_threshold=0.0,
                      rose_within_group=within)
    result = prune_weight(W, stats_for(X), cfg)
    W_new, info = result.weight, result.info
    assert info["reordered"]
    s = cfg.sparsity
    if s.is_nm:
        assert is_nm(W_new, s.n, s.m)
    else:
        assert abs(float((W_new == 0).float().mean()) - 0.5) < 1e-3


@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_rose_order_none_is_sparsegpt_bit_for_bit(sparsity):
    W, X = columnar_layer()
    st = stats_for(X)
    s = Sparsity.parse(sparsity)
    a = prune_weight(W, st, PruneConfig(method="sparsegpt", sparsity=s)).weight
    result = prune_weight(W, st, PruneConfig(method="rose", sparsity=s, rose_order="none"))
    b, info = result.weight, result.info
    assert torch.equal(a, b) and not info["reordered"]
    # threshold 1: the relative range of block losses never exceeds 1, so the ablation's third point is SparseGPT
    result = prune_weight(W, st, PruneConfig(method="rose", sparsity=s, rose_threshold=1.0))
    c, info = result.weight, result.info
    assert torch.equal(a, c) and not info["reordered"] and info["relative_range"] > 0.5


@pytest.mark.parametrize("sparsity", ["0.5", "0.7", "2:4"])
def test_rose_beats_sparsegpt_on_a_columnar_layer(sparsity):
    W, X = columnar_layer()
    st = stats_for(X)
    s = Sparsity.parse(sparsity)
    H = hessian(X)
    gpt = prune_weight(W, st, PruneConfig(method="sparsegpt", sparsity=s)).weight
    result = prune_weight(W, st, PruneConfig(method="rose", sparsity=s))
    rose, info = result.weight, result.info
    assert info["reordered"] and info["relative_range"] > 0.5
    assert reconstruction_error(W, rose, H) < reconstruction_error(W, gpt, H)


def test_threshold_gates_reordering():
    W, X = columnar_layer()
    e = stats_for(X).sq_norm
    s = Sparsity.parse("0.5")
    o = rose_order(W, e, s)
    assert o.reordered and 0.5 < o.relative_range <= 1
    assert not rose_order(W, e, s, threshold=1.0).reordered
    flat = torch.randn(64, 512, generator=torch.Generator().manual_seed(1))
    f = rose_order(flat, torch.ones(512), s)
    assert f.relative_range < 0.5 and not f.reordered and torch.equal(f.perm, torch.arange(512))


def test_short_last_block_is_scaled_by_its_width():
    """576 = 4.5 x 128 (SmolLM2): the 64-column block's loss is scaled by 128/64 so blocks compare fairly."""
    W = torch.ones(8, 576)  # every column identical: scaled block losses are all equal
    o = rose_order(W, torch.ones(576), Sparsity.parse("0.5"), threshold=-1.0)
    assert o.relative_range == pytest.approx(0.0, abs=1e-9)
    assert sorted(o.blocks) == [64, 128, 128, 128, 128]
    W[:, 512:] *= 3  # now the short block is the heaviest per column: it must go first
    o = rose_order(W, torch.ones(576), Sparsity.parse("0.5"), threshold=0.0)
    assert o.blocks[0] == 64 and set(o.perm[:64].tolist()) == set(range(512, 576))
    W_new = prune_weight(W + torch.randn(8, 576) * 0.01, stats_for(torch.randn(256, 576)),
                         PruneConfig(method="rose", sparsity=Sparsity.parse("0.5"), rose_threshold=0.0)).weight
    assert abs(float((W_new == 0).float().mean()) - 0.5) < 0.01


def test_hessian_diag_order_moves_whole_groups():
    H = torch.diag(torch.arange(16.0))
    o = hessian_diag_order(H, Sparsity.parse("2:4"))
    assert o.perm.tolist() == [12, 13, 14, 15, 8, 9, 10, 11, 4, 5, 6, 7, 0, 1, 2, 3]


def test_order_best_never_worse_than_identity():
    W, X = columnar_layer(seed=2)
    st = stats_for(X)
    s = Sparsity.parse("0.7")
    result = prune_weight(W, st, PruneConfig(method="rose", sparsity=s, order="best"))
    best, info = result.weight, result.info
    gpt = prune_weight(W, st, PruneConfig(method="sparsegpt", sparsity=s)).weight
    assert set(info["candidate_errors"]) >= {"identity", "diag_h"}
    assert reconstruction_error(W, best, st.H) <= reconstruction_error(W, gpt, st.H) + 1e-6


def test_reference_scaler_weights_sample_k_by_one_over_k():
    st = InputStats(2, "cpu")
    xs = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    for x in xs:
        st.add(x)
    expected = sum((x ** 2).sum(0) / (k + 1) for k, x in enumerate(xs)) / len(xs)
    assert torch.allclose(st.reference_scaler, expected)
    assert torch.allclose(st.sq_norm, torch.cat(xs).pow(2).mean(0))  # uniform: every token the same


@pytest.mark.parametrize("shape", [(64, 576), (33, 256), (5, 50)])   # short last block; all full; one short block
@pytest.mark.parametrize("p", [0.05, 0.5, 0.7])
def test_block_quantiles_match_the_sort_definition(shape, p):
    S = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    S[:, :4] = 0.0  # ties
    t = block_quantiles(S, p, 128)
    for i1 in range(0, shape[1], 128):
        blk = S[:, i1:i1 + 128]
        expected = torch.sort(blk.flatten()).values[int(blk.numel() * p)]
        assert torch.all(t[0, i1:i1 + 128] == expected)
