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
])
def test_prune_config_validates_itself(kwargs, fragment):
    """A library caller gets the CLI's one-line errors (the CLI builds its config the same way)."""
    from rose.config import PruneConfig

    with pytest.raises(RoseError, match=fragment) as err:
        PruneConfig(**kwargs)
    assert "\n" not in str(err.value)
