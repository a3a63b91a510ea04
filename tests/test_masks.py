import torch

from rose.masks import is_nm, nm_mask, row_mask, smallest_mask


def test_smallest_mask_hand_computed():
    s = torch.tensor([[4.0, 1.0, 3.0], [0.5, 6.0, 2.0]])
    assert smallest_mask(s, 3).tolist() == [[False, True, False], [True, False, True]]


def test_row_mask_hand_computed():
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 6.0, 2.0, 7.0]])
    assert row_mask(s, 0.5).tolist() == [[False, True, False, True], [True, False, True, False]]


def test_nm_mask_hand_computed():
    s = torch.tensor([[1.0, 5.0, 2.0, 7.0, 9.0, 0.1, 3.0, 4.0]])
    assert nm_mask(s, 2, 4).tolist() == [[True, False, True, False, False, True, True, False]]


def test_is_nm():
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 0.0, 1.0]])
    assert is_nm(w, 2, 4)
    w[1, 2] = 5.0
    assert not is_nm(w, 2, 4)
