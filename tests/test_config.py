import pytest

from rose.config import Sparsity
from rose.errors import RoseError


@pytest.mark.parametrize("text,ratio,n,m", [("0.5", 0.5, 0, 0), ("2:4", 0.5, 2, 4), ("4:8", 0.5, 4, 8),
                                            ("1:4", 0.25, 1, 4), (".7", 0.7, 0, 0)])
def test_parse_valid(text, ratio, n, m):
    s = Sparsity.parse(text)
    assert (s.ratio, s.n, s.m) == (ratio, n, m)
    assert s.is_nm == bool(m)


@pytest.mark.parametrize("text,fragment", [("2:2", "0 < N < M"), ("5:4", "0 < N < M"), ("0:4", "0 < N < M"),
                                           ("1.2", "0 < p < 1"), ("0", "0 < p < 1"), ("-0.1", "0 < p < 1"),
                                           ("half", "neither")])
def test_parse_invalid(text, fragment):
    with pytest.raises(RoseError, match=fragment):
        Sparsity.parse(text)


def test_str_round_trip():
    for text in ("2:4", "0.5", "0.7"):
        assert str(Sparsity.parse(text)) == text


def test_prune_config_defaults_and_text_sparsity():
    from rose.config import PruneConfig

    cfg = PruneConfig(sparsity="2:4")
    assert cfg.sparsity == Sparsity(0.5, 2, 4) and cfg.method == PruneConfig.default("method") == "rose"
    assert cfg.to_dict()["sparsity"] == "2:4"


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(method="obs"), "unknown --method 'obs'"),
    (dict(method="sparsegpt", order="best"), "--order best applies to --method rose only"),
    (dict(sparsity="3:3"), "0 < N < M"),
    (dict(nsamples=0), "--nsamples must be an integer >= 1"),
    (dict(seqlen=1), "--seqlen must be an integer >= 2"),
    (dict(percdamp=0.0), "--percdamp must be > 0"),
    (dict(device="tpu"), "unknown --device 'tpu'"),
    (dict(rose_order="diagonal"), "unknown --rose-order 'diagonal'"),
    (dict(rose_scaler="1/k"), "unknown --rose-scaler"),
    (dict(refit=True, refit_steps=0), "--refit-steps must be an integer >= 1"),
    (dict(refit_steps=2.5), "--refit-steps must be an integer >= 1"),
    (dict(refit=True, refit_lr=0.0), "--refit-lr must be > 0"),
    (dict(refit=True, refit_lr=-1e-4), "--refit-lr must be > 0"),
    (dict(refit=True, nsamples=8, refit_samples=9), r"--refit-samples must be an integer from 1 to --nsamples \(8\)"),
    (dict(refit=True, refit_samples=0), "--refit-samples must be an integer from 1"),
    (dict(refit=True, refit_loss="l1"), "unknown --refit-loss 'l1'"),
    (dict(method="rose", sparsity="4:8", blocksize=100), "--blocksize 100 must be a multiple of M=8 for 4:8"),
    (dict(sparsity="0.5", permute=True), "--permute needs an N:M --sparsity"),
    (dict(sparsity="2:4", permute=True, permute_rounds=0), "--permute-rounds must be an integer >= 1"),
])
def test_prune_config_validates_itself(kwargs, fragment):
    """A library caller gets the CLI's one-line errors (the CLI builds its config the same way)."""
    from rose.config import PruneConfig

    with pytest.raises(RoseError, match=fragment) as err:
        PruneConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_refit_defaults_live_in_one_place():
    from rose.config import DEFAULT_REFIT_LR, DEFAULT_REFIT_STEPS, PruneConfig
    from rose.clikit import prune_options

    cfg = PruneConfig(refit=True)
    assert (cfg.refit_steps, cfg.refit_lr, cfg.refit_samples, cfg.refit_loss) == (
        DEFAULT_REFIT_STEPS, DEFAULT_REFIT_LR, None, "relative")
    assert PruneConfig().refit is False
    params = {p.name: p.default for p in prune_options(lambda **kw: None).__click_params__}
    assert params["refit_steps"] == DEFAULT_REFIT_STEPS and params["refit_lr"] == DEFAULT_REFIT_LR
    assert params["refit"] is False and params["refit_samples"] is None
