"""check_finite: a tensor that passed is not read again until it changes in place."""
import pytest
import torch

from groupmorph_pyro.checks import InputError, check_finite, check_tensor


def test_a_tensor_changed_in_place_after_passing_is_checked_again():
    x = torch.rand(4, 4)
    check_tensor("x", x)
    x[1, 2] = float("nan")  # in place: the version counter moves
    with pytest.raises(InputError, match=r"x: expected finite values, got 1 NaN/inf entries"):
        check_tensor("x", x)


def test_views_and_copies_are_checked_on_their_own():
    x = torch.rand(8)
    check_finite("x", x)
    y = x.clone()
    y[0] = float("inf")
    with pytest.raises(InputError, match="1 NaN/inf"):
        check_finite("y", y)
    with pytest.raises(InputError, match="1 NaN/inf"):
        check_finite("view", y.view(2, 4))


def test_a_passed_tensor_is_not_read_again(monkeypatch):
    x = torch.rand(16)
    check_finite("x", x)
    calls = []
    real = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: calls.append(t) or real(t))
    check_finite("x", x)
    assert calls == []
    x.add_(1.0)
    check_finite("x", x)
    assert len(calls) == 1


def test_parameters_changed_by_an_optimiser_and_inference_mode_tensors_are_checked_again():
    w = torch.zeros(3, requires_grad=True)
    check_finite("w", w)
    with torch.no_grad():
        w[0] = float("nan")
    with pytest.raises(InputError, match="1 NaN/inf"):
        check_finite("w", w)
    with torch.inference_mode():
        z = torch.full((3,), float("nan"))
    for _ in range(2):
        with pytest.raises(InputError, match="3 NaN/inf"):
            check_finite("z", z)


def test_the_check_reads_large_tensors_in_pieces_and_finds_a_nan_in_any_of_them(monkeypatch):
    import groupmorph_pyro.checks as checks

    monkeypatch.setattr(checks, "_FINITE_PIECE", 7)
    x = torch.rand(5, 6, 4)
    check_finite("x", x)
    for index in [(0, 0, 0), (2, 3, 1), (4, 5, 3)]:  # first piece, a middle one, the last (short) one
        y = x.clone()
        y[index] = float("inf")
        with pytest.raises(InputError, match="got 1 NaN/inf"):
            check_finite("y", y)
    z = x.clone().transpose(0, 2)  # not contiguous: read whole
    z[1, 1, 1] = float("nan")
    with pytest.raises(InputError, match="got 1 NaN/inf"):
        check_finite("z", z)
