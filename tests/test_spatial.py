import numpy as np
import pytest
import torch

from conftest import smooth_field, smooth_image
from groupmorph_pyro.checks import InputError
from groupmorph_pyro.spatial import (
    compose, integrate_velocity, invert_displacement, jacobian_determinant, map_points, warp,
)

SHAPE = (12, 14, 10)


def test_zero_field_is_identity():
    x = smooth_image(SHAPE)
    assert torch.allclose(warp(x, torch.zeros(1, 3, *SHAPE)), x, atol=1e-6)
    assert torch.equal(integrate_velocity(torch.zeros(1, 3, *SHAPE)), torch.zeros(1, 3, *SHAPE))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_integer_translation_samples_the_right_voxel(axis):
    x = torch.rand(1, 1, *SHAPE)
    disp = torch.zeros(1, 3, *SHAPE)
    disp[:, axis] = 2.0  # out(p) = x(p + 2 e_axis)
    out = warp(x, disp)
    expected = torch.roll(x, -2, dims=2 + axis)
    sl = [slice(None)] * 5
    sl[2 + axis] = slice(0, SHAPE[axis] - 2)
    assert torch.allclose(out[tuple(sl)], expected[tuple(sl)], atol=1e-5)


def test_exp_v_compose_exp_minus_v_is_identity():
    v = smooth_field((24, 24, 24), amplitude=2.0)
    fwd, inv = integrate_velocity(v), integrate_velocity(-v)
    assert fwd.abs().max() > 1.5  # a real deformation
    for a, b in ((fwd, inv), (inv, fwd)):
        err = compose(a, b)
        assert err[..., 3:-3, 3:-3, 3:-3].abs().max() < 0.04, err.abs().max()
        assert err.abs().mean() < 0.01


def test_warp_of_warp_is_warp_of_composition():
    a, b = smooth_field(SHAPE, 1.5, seed=1), smooth_field(SHAPE, 1.5, seed=2)
    x = smooth_image(SHAPE)
    lhs, rhs = warp(warp(x, a), b), warp(x, compose(a, b))
    assert (lhs - rhs)[..., 2:-2, 2:-2, 2:-2].abs().max() < 0.02


def test_invert_displacement():
    u = smooth_field((16, 16, 16), amplitude=1.5)
    w = invert_displacement(u)
    assert compose(u, w)[..., 2:-2, 2:-2, 2:-2].abs().max() < 0.02


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.97, 0.97, 2.5)])
def test_jacobian_of_affine_field(spacing):
    a = torch.tensor([[0.10, 0.02, -0.05], [0.03, -0.20, 0.04], [0.00, 0.06, 0.15]], dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) * s for n, s in zip(SHAPE, spacing)],
                                      indexing="ij"))
    disp = torch.einsum("ij,j...->i...", a, grid)[None]  # mm, u(x) = A x
    det = jacobian_determinant(disp, spacing)
    expected = torch.linalg.det(torch.eye(3, dtype=torch.float64) + a)
    assert det.shape == (1, *SHAPE)
    assert torch.allclose(det, expected.expand_as(det), atol=1e-10)


def test_jacobian_detects_folding():
    disp = torch.zeros(1, 3, *SHAPE)
    disp[:, 0] = -2.0 * torch.arange(SHAPE[0], dtype=torch.float32)[:, None, None]  # x -> -x: det = -1
    assert (jacobian_determinant(disp) < 0).all()


def test_gradcheck_warp_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 4, 5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    # fractional offsets away from integer voxel positions (trilinear interpolation is piecewise smooth)
    disp = (0.3 + 0.4 * torch.rand(1, 3, 4, 5, 3, dtype=torch.float64, generator=g)).requires_grad_(True)
    assert torch.autograd.gradcheck(warp, (x, disp), eps=1e-6, atol=1e-5)


def test_map_points_constant_shift():
    disp = torch.zeros(1, 3, *SHAPE)
    disp[:, 1] = 1.5
    pts = torch.tensor([[[3.0, 4.2, 5.0], [7.5, 2.0, 1.0]]])
    assert torch.allclose(map_points(pts, disp), pts + torch.tensor([0.0, 1.5, 0.0]))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: warp(torch.rand(1, 1, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4)), r"3 vector components"),
        (lambda: warp(torch.rand(1, 1, 4, 4, 4), torch.zeros(1, 3, 4, 4, 5)), r"must share batch and grid"),
        (lambda: warp(torch.rand(4, 4, 4), torch.zeros(1, 3, 4, 4, 4)), r"expected shape \(B, C, D, H, W\)"),
        (lambda: warp(torch.rand(1, 1, 4, 4, 4), torch.full((1, 3, 4, 4, 4), float("nan"))), r"NaN"),
        (lambda: warp(torch.ones(1, 1, 4, 4, 4, dtype=torch.int64), torch.zeros(1, 3, 4, 4, 4)), r"floating-point"),
        (lambda: integrate_velocity(torch.zeros(1, 3, 4, 4, 4), steps=-1), r"steps"),
        (lambda: jacobian_determinant(torch.zeros(1, 3, 4, 4, 4), spacing=(1.0, 0.0, 1.0)), r"spacing"),
        (lambda: map_points(torch.zeros(1, 5, 2), torch.zeros(1, 3, 4, 4, 4)), r"\(B=1, N, 3\)"),
    ],
)
def test_bad_input_names_expected_and_actual(call, match):
    with pytest.raises(InputError, match=match):
        call()
