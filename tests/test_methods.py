"""The three baselines and the SparseGPT solver on random layers: patterns, exactness, quality, edge cases."""
import logging

import pytest
import torch

from rose.config import PruneConfig, Sparsity
from rose.masks import is_nm
from rose.methods import METHODS, prune_weight
from rose.solver import reconstruction_error, sparsegpt
from rose.stats import InputStats

from conftest import correlated_inputs, hessian

ROWS, COLS = 48, 320  # 320 = 2.5 blocks of 128: exercises the short last block


def layer(seed=0, cols=COLS, rows=ROWS, tokens=2048):
    torch.manual_seed(seed)
    W = torch.randn(rows, cols)
    X = correlated_inputs(cols, tokens, seed)
    stats = InputStats(cols, "cpu")
    for chunk in X.split(256):
        stats.add(chunk)
    return W, X, stats


def cfg(method, sparsity):
    return PruneConfig(method=method, sparsity=Sparsity.parse(sparsity) if isinstance(sparsity, str) else sparsity)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "rose"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "3:8"])
def test_every_group_has_n_zeros(method, pattern):
    W, _, stats = layer()
    s = Sparsity.parse(pattern)
    W_new = prune_weight(W, stats, cfg(method, pattern)).weight
    assert is_nm(W_new, s.n, s.m)
    assert (W_new == 0).sum() == W.numel() * s.n // s.m  # random weights: exactly N zeros per group


@pytest.mark.parametrize("p", [0.3, 0.5, 0.7])
def test_unstructured_exact(p):
    W, _, stats = layer()
    k = int(W.numel() * p)
    assert int((prune_weight(W, stats, cfg("magnitude", str(p))).weight == 0).sum()) == k
    wanda = prune_weight(W, stats, cfg("wanda", str(p))).weight
    assert ((wanda == 0).sum(1) == int(COLS * p)).all()              # Wanda: per output row
    solved = prune_weight(W, stats, cfg("sparsegpt", str(p))).weight
    for i1 in range(0, COLS, 128):                                   # SparseGPT: per block of 128
        blk = solved[:, i1:i1 + 128]
        assert abs(int((blk == 0).sum()) - int(blk.numel() * p)) <= 1


def test_magnitude_zeroes_the_smallest():
    """The released ROSE baselines zeroed the largest weights; ours must zero the smallest."""
    W, _, stats = layer()
    W_new = prune_weight(W, stats, cfg("magnitude", "0.5")).weight
    assert W_new.abs().max() == W.abs().max()
    assert W[W_new == 0].abs().max() <= W[W_new != 0].abs().min()
    wanda = prune_weight(W, stats, cfg("wanda", "2:4")).weight
    score = (W.abs() * stats.col_norm).reshape(ROWS, -1, 4)
    kept = (wanda != 0).reshape(ROWS, -1, 4)
    assert (score.masked_fill(~kept, float("inf")).min(2).values >= score.masked_fill(kept, -1).max(2).values).all()


@pytest.mark.parametrize("pattern", ["0.5", "2:4", "4:8", "0.7"])
def test_sparsegpt_beats_magnitude_and_wanda(pattern):
    W, X, stats = layer(seed=3)
    H = hessian(X)
    errors = {m: reconstruction_error(W, prune_weight(W, stats, cfg(m, pattern)).weight, H)
              for m in ("magnitude", "wanda", "sparsegpt")}
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors
    assert errors["sparsegpt"] < 0.9 * errors["wanda"], errors


def test_reconstruction_error_matches_explicit_products():
    W, X, stats = layer(seed=1)
    W_new = prune_weight(W, stats, cfg("sparsegpt", "0.5")).weight
    direct = torch.linalg.norm(X @ W.T - X @ W_new.T) / torch.linalg.norm(X @ W.T)
    assert reconstruction_error(W, W_new, stats.H) == pytest.approx(float(direct), rel=1e-3)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_sparsity_zero_leaves_weights_unchanged(method):
    W, _, stats = layer()
    stats.H[:, 5] = stats.H[5, :] = 0  # even with a dead input
    W_new = prune_weight(W, stats, cfg(method, Sparsity(ratio=0.0))).weight
    assert torch.equal(W_new, W)


def test_group_moving_permutation_gives_valid_nm_in_original_coordinates():
    W, _, stats = layer(cols=256)
    g = torch.Generator().manual_seed(0)
    groups = torch.randperm(256 // 4, generator=g)
    within = torch.stack([torch.randperm(4, generator=g) for _ in groups])  # shuffle inside groups too
    perm = (groups.unsqueeze(1) * 4 + within).flatten()
    W_new = sparsegpt(W, stats.H, Sparsity.parse("2:4"), perm=perm)
    assert is_nm(W_new, 2, 4)
    plain = sparsegpt(W, stats.H, Sparsity.parse("2:4"))
    assert not torch.equal(W_new, plain)  # the order did change the solve


def test_identity_permutation_is_bit_identical():
    W, _, stats = layer()
    a = sparsegpt(W, stats.H, Sparsity.parse("0.5"))
    b = sparsegpt(W, stats.H, Sparsity.parse("0.5"), perm=torch.arange(COLS))
    assert torch.equal(a, b)


def test_dead_inputs_are_zeroed():
    W, _, stats = layer()
    stats.H[:, 7] = 0
    stats.H[7, :] = 0
    W_new = sparsegpt(W, stats.H, Sparsity.parse("0.5"))
    assert (W_new[:, 7] == 0).all()


def test_not_positive_definite_retries_with_more_damping(caplog):
    W = torch.randn(8, 3)
    H = torch.diag(torch.tensor([1.0, 1.0, -0.5]))
    with caplog.at_level(logging.WARNING, logger="rose.solver"):
        W_new = sparsegpt(W, H, Sparsity.parse("0.5"), blocksize=3)
    assert torch.isfinite(W_new).all()
    assert "not positive definite" in caplog.text


def test_hopeless_hessian_is_a_clear_error():
    H = torch.full((4, 4), float("nan"))
    with pytest.raises(RuntimeError, match="percdamp"):
        sparsegpt(torch.randn(4, 4), H, Sparsity.parse("0.5"))
