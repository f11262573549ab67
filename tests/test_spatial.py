import numpy as np
import pytest
import torch

from conftest import smooth_field, smooth_image
from groupmorph_pyro.checks import InputError
from groupmorph_pyro.spatial import (
    compose, identity_grid, integrate_velocity, invert_displacement, jacobian_determinant, map_points, warp,
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


def test_level_shape_keeps_the_end_voxels():
    from groupmorph_pyro.spatial import level_shape

    assert level_shape((43, 53, 45), 1) == (43, 53, 45)
    assert level_shape((43, 53, 45), 2) == (22, 27, 23)
    assert level_shape((43, 53, 45), 4) == (11, 14, 12)  # round(10.5) = 10 (banker's rounding), + 1
    assert level_shape((9, 9, 9), 8) == (4, 4, 4)  # never below 4 voxels


def _affine_field(shape, matrix, offset):
    """Displacement ``A p + c`` (voxels) on a grid, float64: trilinear interpolation is exact for it."""
    g = identity_grid(shape, dtype=torch.float64)
    return (torch.einsum("ij,j...->i...", matrix, g) + offset.view(3, 1, 1, 1))[None]


def test_resize_displacement_of_an_affine_field_matches_the_closed_form():
    """A field u(p) = A p + c on a 21x17x13 grid moved to the level-2 grid (11x9x7): new voxel q sits at
    old position q * r (r = 20/10, 16/8, 12/6) and its displacement in new voxels is u(q r) / r."""
    from groupmorph_pyro.spatial import level_shape, resize_displacement

    a = torch.tensor([[0.1, 0.02, -0.03], [0.0, -0.05, 0.03], [0.01, 0.04, 0.08]], dtype=torch.float64)
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    coarse = resize_displacement(_affine_field((21, 17, 13), a, c), level_shape((21, 17, 13), 2))
    r = torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64).view(3, 1, 1, 1)
    q = identity_grid((11, 9, 7), dtype=torch.float64)
    expected = (torch.einsum("ij,j...->i...", a, q * r) + c.view(3, 1, 1, 1)) / r
    assert coarse.shape == (1, 3, 11, 9, 7)
    assert torch.allclose(coarse[0], expected, atol=1e-10)
    # and back up: a field on the coarse grid refined to 21x17x13 is the same physical motion
    fine = resize_displacement(coarse, (21, 17, 13))
    assert torch.allclose(fine, _affine_field((21, 17, 13), a, c), atol=1e-10)


def test_resample_grid_blurs_only_when_coarsening_and_keeps_constants():
    from groupmorph_pyro.spatial import resample_grid

    x = torch.rand(2, 1, 20, 16, 12, dtype=torch.float64)
    assert resample_grid(x, (20, 16, 12)) is x
    const = torch.full((1, 2, 20, 16, 12), 3.25, dtype=torch.float64)
    assert torch.allclose(resample_grid(const, (7, 6, 5)), torch.full((1, 2, 7, 6, 5), 3.25, dtype=torch.float64))
    # a linear ramp along an axis is kept by blur (symmetric kernel) away from the edges, and by trilinear sampling
    ramp = torch.arange(21, dtype=torch.float64).view(1, 1, 21, 1, 1).expand(1, 1, 21, 9, 9).contiguous()
    out = resample_grid(ramp, (11, 9, 9))
    assert torch.allclose(out[0, 0, 2:-2, 4, 4], torch.arange(2, 9, dtype=torch.float64) * 2.0, atol=1e-9)
    # the blur really happens: coarsened by 2 (new voxels on even old ones), a one-voxel checkerboard
    # aliases to all zeros without it and averages to its mean, 0.5, with it
    checker = (identity_grid((21, 21, 21)).sum(0) % 2)[None, None].double()
    smooth = resample_grid(checker, (11, 11, 11))[0, 0, 3:-3, 3:-3, 3:-3]
    assert (smooth - 0.5).abs().max() < 0.05
    assert resample_grid(checker, (11, 11, 11), antialias=False).abs().max() < 1e-6


def test_resample_grid_of_a_batch_equals_a_float64_numpy_blur_and_trilinear_reference_per_volume():
    """Coarsening a (B, C) batch: each volume blurred separably (Gaussian of sd 0.5 · ratio, radius
    ceil(3 sd), edges repeated) and sampled trilinearly at old voxel i · (n_old − 1) / (n_new − 1),
    as an explicit NumPy computation does for each volume on its own."""
    import math

    from scipy.ndimage import map_coordinates

    from groupmorph_pyro.spatial import resample_grid

    old, new = (23, 17, 14), (8, 9, 5)
    p = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in old], indexing="ij"))
    volumes = np.stack([np.stack([np.sin(p[0] / (2 + b) + c) * np.cos(p[1] / 3) + 0.05 * p[2] * (c + 1)
                                  for c in range(3)]) for b in range(2)])  # (2, 3, D, H, W), varies in space
    out = resample_grid(torch.from_numpy(volumes), new).numpy()
    ratios = [(o - 1) / (n - 1) for o, n in zip(old, new)]
    for b in range(2):
        for c in range(3):
            ref = volumes[b, c]
            for axis, ratio in enumerate(ratios):
                sd = 0.5 * ratio
                if ratio <= 1:
                    continue
                radius = int(math.ceil(3 * sd))
                taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sd) ** 2)
                taps /= taps.sum()
                padded = np.pad(ref, [(radius, radius) if a == axis else (0, 0) for a in range(3)], mode="edge")
                ref = sum(w * np.take(padded, np.arange(i, i + old[axis]), axis=axis) for i, w in enumerate(taps))
            at = np.stack(np.meshgrid(*[np.arange(n) * r for n, r in zip(new, ratios)], indexing="ij"))
            expected = map_coordinates(ref, at, order=1, mode="nearest")
            assert np.allclose(out[b, c], expected, atol=1e-10), (b, c)


def test_shift_field_equals_a_float64_trilinear_reference_with_clamped_neighbours():
    """shift_field(f, δ)[p] = f(p + δ), trilinear with the border voxel repeated, against an explicit
    float64 loop over the 8 corners (indices clamped into the grid), on an anisotropic random field with
    offsets of both signs; δ = 0 returns the field; bad offsets are refused."""
    import numpy as np

    from groupmorph_pyro.spatial import shift_field
    rng = np.random.default_rng(4)
    f = rng.normal(size=(2, 5, 7, 4))
    delta = (0.3, -0.45, 0.8)
    want = np.zeros_like(f)
    shape = f.shape[1:]
    for p in np.ndindex(*shape):
        q = np.array(p) + np.array(delta)
        lo = np.floor(q).astype(int)
        w = q - lo
        for corner in np.ndindex(2, 2, 2):
            idx = tuple(int(np.clip(lo[a] + corner[a], 0, shape[a] - 1)) for a in range(3))
            weight = np.prod([w[a] if corner[a] else 1 - w[a] for a in range(3)])
            want[(slice(None), *p)] += weight * f[(slice(None), *idx)]
    got = shift_field(torch.from_numpy(f), delta).numpy()
    assert np.abs(got - want).max() < 1e-12
    assert torch.equal(shift_field(torch.from_numpy(f), (0.0, 0.0, 0.0)), torch.from_numpy(f))
    with pytest.raises(InputError, match=r"shift_field: expected 3 offsets in \(-1, 1\) voxels, got \[0.5, 1.0, 0.0\]"):
        shift_field(torch.from_numpy(f), (0.5, 1.0, 0.0))
    with pytest.raises(InputError, match="shift_field: expected a field"):
        shift_field(torch.zeros(4, 4), (0.1, 0.1, 0.1))
