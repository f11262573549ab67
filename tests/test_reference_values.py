"""Numeric kernels pinned to VALUES from independent references written differently from the
library (float64 NumPy with explicit loops, closed forms, matrix exponentials), with fields that
vary in space and anisotropic grids. Property tests (NMI(x, x) maximal, exp(v)∘exp(−v) ≈ Id) live
beside the kernels; these catch wrong formulas that keep the properties."""
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from groupmorph_pyro.checks import InputError
from groupmorph_pyro.config import Config
from groupmorph_pyro.likelihoods import (GroupNMI, GroupSimilarity, SubsampledLikelihood, bspline_weights, group_nmi,
                                         joint_histograms, mutual_information, nmi)
from groupmorph_pyro.metrics import landmark_distances
from groupmorph_pyro.model import GroupMorphModel, build_model
from groupmorph_pyro.preprocess import sliding_window
from groupmorph_pyro.spatial import integrate_velocity, jacobian_determinant, map_points

EPS = 1e-10  # the library's guard inside log and the weight normaliser


# ---------------------------------------------------------------- histograms, NMI, MI

def _images(n=(6, 7, 5), seed=0):
    """Two spatially varying images in [0, 1] with a nonlinear, noisy relation."""
    rng = np.random.default_rng(seed)
    d, h, w = np.meshgrid(*(np.linspace(0, 1, k) for k in n), indexing="ij")
    a = (0.5 + 0.45 * np.sin(3 * d + 2 * h - w)).clip(0, 1)
    b = (a**2 + 0.1 * rng.standard_normal(a.shape)).clip(0, 1)
    return a, b


def _gaussian_weights_np(x, bins, sigma_ratio):
    """Dense Parzen weights by loops: voxel i, bin c centred at (c + 1/2)/bins, sd sigma_ratio/bins."""
    x = np.asarray(x, dtype=np.float64).ravel()
    w = np.zeros((x.size, bins))
    for i, v in enumerate(x):
        for c in range(bins):
            w[i, c] = math.exp(-0.5 * ((v - (c + 0.5) / bins) / (sigma_ratio / bins)) ** 2)
        w[i] /= w[i].sum() + EPS
    return w


def _cubic_bspline(t):
    t = abs(t)
    if t < 1:
        return (4 - 6 * t**2 + 3 * t**3) / 6
    if t < 2:
        return (2 - t) ** 3 / 6
    return 0.0


def _quadratic_bspline(t):
    t = abs(t)
    if t < 0.5:
        return 0.75 - t**2
    if t < 1.5:
        return (1.5 - t) ** 2 / 2
    return 0.0


def _bspline_weights_np(x, bins, kernel="bspline"):
    """Dense B-spline weights (cubic, or ``kernel="quadratic"``): bin c centred at (c + 1/2)/bins,
    mass beyond the edges folded in; every bin within 3 of the position is visited."""
    spline = _quadratic_bspline if kernel == "quadratic" else _cubic_bspline
    x = np.clip(np.asarray(x, dtype=np.float64).ravel(), 0, 1)
    w = np.zeros((x.size, bins))
    for i, v in enumerate(x):
        s = v * bins - 0.5
        for c in range(int(math.floor(s)) - 3, int(math.floor(s)) + 4):
            w[i, min(max(c, 0), bins - 1)] += spline(s - c)
    return w


def _nmi_mi_np(wa, wb):
    """(NMI = 2 I / (H(A) + H(B)), I in nats) of the joint histogram wa.T @ wb / N, entropies by loops."""
    joint = wa.T @ wb / wa.shape[0]
    pa, pb = joint.sum(1), joint.sum(0)
    ha = -sum(p * math.log(p + EPS) for p in pa)
    hb = -sum(p * math.log(p + EPS) for p in pb)
    hab = -sum(p * math.log(p + EPS) for p in joint.ravel())
    mi = ha + hb - hab
    return 2 * mi / (ha + hb), mi


@pytest.mark.parametrize("bins, sigma_ratio", [(8, 0.5), (16, 0.8)])
def test_gaussian_nmi_and_mi_equal_a_float64_loop_reference(bins, sigma_ratio):
    a, b = _images()
    want_nmi, want_mi = _nmi_mi_np(_gaussian_weights_np(a, bins, sigma_ratio), _gaussian_weights_np(b, bins, sigma_ratio))
    ta, tb = (torch.from_numpy(v).float()[None] for v in (a, b))
    assert float(nmi(ta, tb, bins, sigma_ratio)) == pytest.approx(want_nmi, rel=1e-4)
    assert float(mutual_information(ta, tb, bins, sigma_ratio)) == pytest.approx(want_mi, rel=1e-4)
    group = torch.stack([ta, tb], 1)
    assert float(group_nmi(group, bins, sigma_ratio)) == pytest.approx(want_nmi, rel=1e-4)


@pytest.mark.parametrize("kernel, order", [("bspline", 3), ("quadratic", 2)])
@pytest.mark.parametrize("bins", [4, 8, 32])
def test_bspline_weights_and_bins_equal_the_closed_form_spline(bins, kernel, order):
    x = torch.tensor([0.0, 0.013, 0.2, 0.5, 0.51, 0.77, 0.999, 1.0, 0.5 / bins, 1.5 / bins], dtype=torch.float64)
    index, weight = bspline_weights(x, bins, order=order)
    assert index.shape == (x.numel(), order + 1)
    dense = torch.zeros(x.numel(), bins, dtype=torch.float64).scatter_add_(1, index, weight)
    assert np.allclose(dense.numpy(), _bspline_weights_np(x.numpy(), bins, kernel), atol=1e-12)


@pytest.mark.parametrize("kernel", ["bspline", "quadratic"])
def test_bspline_nmi_equals_a_float64_loop_reference(kernel):
    a, b = _images(seed=1)
    want, want_mi = _nmi_mi_np(_bspline_weights_np(a, 8, kernel), _bspline_weights_np(b, 8, kernel))
    ta, tb = (torch.from_numpy(v).float()[None] for v in (a, b))
    assert float(nmi(ta, tb, 8, histogram=kernel)) == pytest.approx(want, rel=1e-4)
    assert float(mutual_information(ta, tb, 8, histogram=kernel)) == pytest.approx(want_mi, rel=1e-4)


def test_known_histograms_give_closed_form_values():
    """Two intensity levels at bin centres, narrow kernel: identical images share ln 2 nats
    (NMI 1); a checkerboard against halves is independent (MI 0, NMI 0)."""
    n = 16
    half = torch.tensor([0.25] * (n // 2) + [0.75] * (n // 2)).reshape(1, 2, 2, 4)
    checker = torch.tensor([0.25, 0.75] * (n // 2)).reshape(1, 2, 2, 4)
    assert float(mutual_information(half, half, bins=2, sigma_ratio=0.05)) == pytest.approx(math.log(2), rel=1e-6)
    assert float(nmi(half, half, bins=2, sigma_ratio=0.05)) == pytest.approx(1.0, abs=1e-6)
    assert float(mutual_information(half, checker, bins=2, sigma_ratio=0.05)) == pytest.approx(0.0, abs=1e-6)
    assert float(nmi(half, checker, bins=2, sigma_ratio=0.05)) == pytest.approx(0.0, abs=1e-6)
    joint = joint_histograms(torch.stack([half, checker], 1), bins=2, sigma_ratio=0.05)[0, 0]
    assert np.allclose(joint.numpy(), 0.25, atol=1e-6)


def test_independent_random_images_have_near_zero_mutual_information():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(1, 40, 40, 40, generator=g), torch.rand(1, 40, 40, 40, generator=g)
    assert float(mutual_information(a, b, bins=8)) < 2e-3
    assert float(nmi(a, b, bins=8)) < 2e-3


def test_subsampled_nmi_likelihood_equals_a_float64_reference_on_the_drawn_voxels():
    """β · N_vox · mean pairwise NMI of the voxels drawn by torch.randint (uniform, with
    replacement; every image at the same voxels), against the loop reference on those voxels."""
    a, b = _images(seed=2)
    c = (0.3 + 0.6 * a**3).clip(0, 1)
    group = torch.from_numpy(np.stack([a, b, c])).float()[None]  # (1, 3, 6, 7, 5): 210 voxels
    torch.manual_seed(5)
    got = float(SubsampledLikelihood(GroupNMI(beta=2.0, bins=8), 60)(group))
    torch.manual_seed(5)
    index = torch.randint(210, (60,)).numpy()
    flat = [v.ravel()[index] for v in (a, b, c)]
    w = [_gaussian_weights_np(v, 8, 0.5) for v in flat]
    want = np.mean([_nmi_mi_np(w[i], w[j])[0] for i, j in ((0, 1), (0, 2), (1, 2))]) * 2.0 * 210
    assert got == pytest.approx(want, rel=1e-4)


def test_subsampled_ssd_of_a_constant_difference_is_exact():
    """SSD of b = a + 0.05 is −0.05² / (2σ²) per voxel at every voxel, so any draw gives the full
    value β · N_vox · that (scaled by all voxels, not by the drawn ones)."""
    a, _ = _images()
    group = torch.from_numpy(np.stack([a, a + 0.05])).float()[None]
    lik = GroupSimilarity("ssd", beta=3.0, sigma=0.1)
    torch.manual_seed(0)
    got = float(SubsampledLikelihood(lik, 17)(group))
    assert got == pytest.approx(3.0 * a.size * -(0.05**2) / (2 * 0.1**2), rel=1e-4)


# ---------------------------------------------------------------- geometry

def _coords(shape):
    return np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij"))  # (3, D, H, W)


def _affine_field(a, c, shape):
    """u(p) = A p + c in voxels, (1, 3, D, H, W) float64."""
    return torch.from_numpy(np.einsum("ij,j...->i...", a, _coords(shape)) + np.asarray(c)[:, None, None, None])[None]


A = np.array([[0.05, -0.02, 0.01], [0.03, -0.04, 0.02], [-0.01, 0.02, 0.06]])  # not symmetric: catches axis swaps


def test_jacobian_determinant_of_an_affine_field_is_det_of_i_plus_a():
    u = _affine_field(A, [0.3, -1.0, 2.0], (5, 6, 7))
    jac = jacobian_determinant(u)
    assert np.allclose(jac.numpy(), np.linalg.det(np.eye(3) + A), atol=1e-12)


def test_jacobian_determinant_of_a_smooth_field_equals_numpy_gradients():
    shape = (6, 7, 8)
    p = _coords(shape)
    u = np.stack([0.3 * np.sin(p[1] / 2) * p[2] / 8, 0.2 * np.cos(p[0] / 3 + p[2] / 4), 0.25 * np.sin(p[0] * p[1] / 20)])
    jac = jacobian_determinant(torch.from_numpy(u)[None])[0].numpy()
    g = np.array([np.gradient(u[c], edge_order=1) for c in range(3)])  # g[c, j] = d u_c / d x_j
    m = np.moveaxis(g, (0, 1), (-2, -1)) + np.eye(3)
    assert np.allclose(jac, np.linalg.det(m), atol=1e-10)


def test_float64_points_on_a_float32_field_are_mapped_in_float64_without_copying_the_field():
    """map_points interpolates the field in its own dtype and adds in the promoted one: float64 points on a
    float32 field give float64 positions equal to the float64 computation to float32's rounding."""
    from groupmorph_pyro.spatial import map_points

    shape = (9, 7, 8)
    p = _coords(shape)
    u = np.stack([0.3 * np.sin(p[1] / 2) * p[2] / 8, 0.2 * np.cos(p[0] / 3 + p[2] / 4), 0.25 * np.sin(p[0] * p[1] / 20)])
    points = torch.tensor([[[1.25, 2.5, 3.75], [7.9, 0.1, 6.5], [4.0, 3.0, 2.0]]], dtype=torch.float64)
    exact = map_points(points, torch.from_numpy(u)[None])
    mixed = map_points(points, torch.from_numpy(u.astype(np.float32))[None])
    assert mixed.dtype == torch.float64
    assert torch.allclose(mixed, exact, atol=1e-6)
    fine = points + 1e-9  # not representable in float32: a zero float32 field must return them exactly
    assert torch.equal(map_points(fine, torch.zeros(1, 3, *shape)), fine)


@pytest.mark.parametrize("slab_voxels", [2 * 56, 4 * 56, 6 * 56, 8 * 56])  # slabs of 1, 2, 3, 4 slices (B = 2 of 7×8)
def test_jacobian_determinant_in_slabs_equals_numpy_gradients_of_the_whole_grid(monkeypatch, slab_voxels):
    """Large grids are computed slab by slab along D (bounded temporaries); every slab size, the last
    slab short or not, gives the whole grid's central and border differences."""
    import groupmorph_pyro.spatial as spatial

    shape = (9, 7, 8)
    p = _coords(shape)
    u = np.stack([0.3 * np.sin(p[1] / 2) * p[2] / 8 + 0.1 * p[0] ** 2 / 9,
                  0.2 * np.cos(p[0] / 3 + p[2] / 4), 0.25 * np.sin(p[0] * p[1] / 20)])
    batch = np.stack([u, -0.5 * u])
    monkeypatch.setattr(spatial, "_SLAB_VOXELS", slab_voxels)
    jac = jacobian_determinant(torch.from_numpy(batch)).numpy()
    for b in range(2):
        g = np.array([np.gradient(batch[b, c], edge_order=1) for c in range(3)])
        m = np.moveaxis(g, (0, 1), (-2, -1)) + np.eye(3)
        assert np.allclose(jac[b], np.linalg.det(m), atol=1e-10)
    disp = torch.from_numpy(batch).requires_grad_(True)  # the slabs keep autograd's graph
    jacobian_determinant(disp).sum().backward()
    monkeypatch.setattr(spatial, "_SLAB_VOXELS", 1 << 21)
    whole = torch.from_numpy(batch).requires_grad_(True)
    jacobian_determinant(whole).sum().backward()
    assert torch.allclose(disp.grad, whole.grad, atol=1e-12)


@pytest.mark.parametrize("downsize, shape, centre", [(1, (21, 21, 21), (10.0, 10.0, 10.0)),
                                                     (2, (21, 17, 25), (10.0, 8.0, 12.0)),
                                                     (3, (21, 17, 25), (10.0, 8.0, 12.0))])
def test_exp_of_a_linear_velocity_is_the_matrix_exponential(downsize, shape, centre):
    """v(p) = A (p − c): exp(v)(p) = c + expm(A)(p − c); trilinear interpolation is exact for linear
    fields, so scaling and squaring matches away from the border to (A/2^T)² accuracy, also when the
    squarings run on a coarser grid (``downsize``; an anisotropic grid, so each axis is rescaled
    differently on the way down and back)."""
    centre = np.array(centre)
    v = _affine_field(A, -A @ centre, shape)
    u = integrate_velocity(v, 7, downsize)[0].numpy()
    want = np.einsum("ij,j...->i...", scipy.linalg.expm(A) - np.eye(3), _coords(shape) - centre[:, None, None, None])
    inner = (slice(None), *(slice(int(c) - 4, int(c) + 5) for c in centre))
    assert np.abs(u[inner] - want[inner]).max() < 2e-4
    assert np.abs(want[inner]).max() > 0.3  # the check is not trivially small


def test_integration_downsize_sees_the_velocity_only_at_the_coarse_grid_points():
    """With downsize 2 on 21 voxels the coarse grid's points sit on the even voxels (i · 20/10): a
    velocity that lives on odd voxels only integrates to the identity, and one that is linear on the
    even voxels (zig-zag in between) integrates to the linear field's expm."""
    shape, centre = (21, 21, 21), np.array([10.0, 10.0, 10.0])
    odd = np.zeros(shape, dtype=bool)
    odd[1::2, :, :] = True
    rng = np.random.default_rng(0)
    v = torch.from_numpy(np.where(odd, rng.normal(size=(3, *shape)), 0.0))[None]
    assert integrate_velocity(v, 7, 2).abs().max() < 1e-12 and integrate_velocity(v, 7, 1).abs().max() > 0.1
    # the package default, downsize 3: on 22 voxels the coarse points sit on every third voxel (i · 21/7)
    transform = build_model(Config().with_timepoints(2).model).transform(0)
    off = (np.arange(22) % 3 != 0)[:, None, None] & np.ones((22, 22, 22), dtype=bool)
    z = torch.from_numpy(np.where(off, rng.normal(size=(3, 22, 22, 22)), 0.0)).float()[None, None]  # (1, K_lat, 3, D, H, W)
    assert transform.displacements(z).abs().max() < 1e-5 and transform.inverse_displacements(z).abs().max() < 1e-5
    assert integrate_velocity(z[0], 7, 1).abs().max() > 0.1
    with pytest.raises(InputError, match=r"downsize: expected an integer >= 1, got 0"):
        integrate_velocity(v, 7, 0)
    with pytest.raises(InputError, match=r"integration_downsize: expected an integer >= 1, got 1.5"):
        GroupMorphModel(2, integration_downsize=1.5)
    linear = _affine_field(A, -A @ centre, shape)
    u = integrate_velocity(linear + v, 7, 2)[0].numpy()
    want = np.einsum("ij,j...->i...", scipy.linalg.expm(A) - np.eye(3), _coords(shape) - centre[:, None, None, None])
    inner = (slice(None), slice(6, 15), slice(6, 15), slice(6, 15))
    assert np.abs(u[inner] - want[inner]).max() < 2e-4


def test_map_points_samples_an_affine_field_at_the_right_axes_on_an_anisotropic_grid():
    shape = (6, 9, 12)
    c = np.array([0.5, -0.25, 1.0])
    u = _affine_field(A, c, shape)
    pts = np.array([[1.3, 2.7, 4.1], [4.9, 0.2, 10.6], [2.0, 7.5, 0.4]])
    mapped = map_points(torch.from_numpy(pts)[None], u)[0].numpy()
    assert np.allclose(mapped, pts + pts @ A.T + c, atol=1e-10)


def test_landmark_distance_with_affine_maps_on_an_anisotropic_grid():
    """K = 2: φ_0 = Id, φ_1 = Id + A p + c (its inverse is affine too). Landmark set j mapped into
    image i is φ_i(φ_j⁻¹(l_j)); distances in mm with spacing (1, 2, 3.5)."""
    shape, spacing = (10, 11, 12), np.array([1.0, 2.0, 3.5])
    c = np.array([0.4, -0.3, 0.2])
    m = np.eye(3) + A
    m_inv = np.linalg.inv(m)
    disp = torch.cat([torch.zeros(1, 3, *shape, dtype=torch.float64), _affine_field(A, c, shape)])
    inv = torch.cat([torch.zeros(1, 3, *shape, dtype=torch.float64), _affine_field(m_inv - np.eye(3), -m_inv @ c, shape)])
    lm = np.array([[[2.0, 3.0, 4.0], [5.5, 6.1, 7.2]], [[3.1, 2.2, 5.3], [6.0, 5.0, 8.0]]])
    d = landmark_distances(lm, disp, inv, spacing)  # rows: (0, 1), (1, 0)
    to0 = m_inv @ (lm[1] - c).T  # l_1 mapped into image 0: φ_0(φ_1⁻¹(l_1))
    to1 = (m @ lm[0].T).T + c  # l_0 mapped into image 1: φ_1(φ_0⁻¹(l_0))
    want = np.stack([np.linalg.norm((to0.T - lm[0]) * spacing, axis=1), np.linalg.norm((to1 - lm[1]) * spacing, axis=1)])
    assert np.allclose(d, want, atol=1e-9)


# ---------------------------------------------------------------- tiled inference

@pytest.mark.parametrize("window, overlap", [((8, 8, 8), 0.25), ((5, 7, 9), 0.5), ((16, 16, 16), 0.0)])
def test_sliding_window_with_a_pointwise_function_equals_the_untiled_result(window, overlap):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 12, 14, 16, generator=g)

    def fn(t):  # pointwise, two outputs with the guide's layout (B, K, 3, d, h, w)
        return torch.stack([2 * t + 1] * 3, 2), torch.stack([t**2] * 3, 2)

    tiled = sliding_window(fn, x, window, overlap)
    for got, want in zip(tiled, fn(x)):
        assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("kernel", ["bspline", "quadratic"])
@pytest.mark.parametrize("chunk", [7, 1 << 18])
def test_bspline_joint_histograms_of_a_batch_equal_the_loop_reference_edges_chunks_and_gradient(monkeypatch, chunk, kernel):
    """The lean kernel (padded 4×4 taps folded onto the edge bins, accumulated chunk by chunk) on
    B = 2 groups of K = 3 with intensities at and beyond 0 and 1 (1–99 % clipping puts many voxels
    there): every pair's joint histogram equals the float64 loop reference, and its gradient equals
    central differences of that reference."""
    import groupmorph_pyro.likelihoods as lik
    monkeypatch.setattr(lik, "_CHUNK", chunk)  # 7: 40 voxels span 6 chunks, one partial
    rng = np.random.default_rng(5)
    x = rng.uniform(0.0, 1.0, size=(2, 3, 40))
    x[:, :, :6] = [0.0, 1.0, -0.1, 1.2, 0.0, 1.0]  # edges and clamped values
    bins = 6

    def reference(v):  # (B, K, N) -> (B, pairs, bins, bins)
        return np.stack([np.stack([_bspline_weights_np(g[i], bins, kernel).T @ _bspline_weights_np(g[j], bins, kernel) / g.shape[-1]
                                   for i, j in ((0, 1), (0, 2), (1, 2))]) for g in v])

    t = torch.from_numpy(x).reshape(2, 3, 2, 4, 5).requires_grad_(True)
    joint = joint_histograms(t, bins, histogram=kernel)
    assert np.allclose(joint.detach().numpy(), reference(x), atol=1e-12)
    weights = rng.normal(size=joint.shape)
    (joint * torch.from_numpy(weights)).sum().backward()
    grad = t.grad.reshape(2, 3, 40).numpy()
    h = 1e-6
    for b, k, n in [(0, 0, 10), (1, 2, 25), (1, 1, 39), (0, 2, 6)]:  # interior voxels (away from 0, 1 and knots)
        up, down = x.copy(), x.copy()
        up[b, k, n] += h
        down[b, k, n] -= h
        numeric = ((reference(up) - reference(down)) * weights).sum() / (2 * h)
        assert grad[b, k, n] == pytest.approx(numeric, rel=1e-5, abs=1e-8)
    assert np.all(grad[:, :, 2:4] == 0)  # clamped intensities do not move the histogram
