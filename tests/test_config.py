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
