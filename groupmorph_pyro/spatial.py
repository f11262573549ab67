"""Geometry of displacement fields: warping, composition, integration, Jacobians.

Conventions (used by the whole package):

* A displacement field ``u`` has shape ``(B, 3, D, H, W)`` and is in **voxels**; channel ``c`` is
  the displacement along tensor axis ``2 + c`` (D, H, W). It represents ``φ = Id + u``.
* Warping samples the image at the mapped position: ``warp(x, u)(p) = x(p + u(p)) = x(φ(p))``.
  (METHOD.md writes this ``φ∘x``.)
* ``compose(a, b)`` is the displacement of ``φ_a ∘ φ_b``: ``c(p) = b(p) + a(p + b(p))``, so
  ``warp(warp(x, a), b) == warp(x, compose(a, b))``.
* Outside the grid, fields and images are extended by their border value.

:func:`sample` is the single place in the package that calls ``grid_sample``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .checks import InputError, check_integer, check_spacing, check_tensor

__all__ = [
    "identity_grid",
    "sample",
    "warp",
    "compose",
    "directional_derivative",
    "integrate_velocity",
    "invert_displacement",
    "jacobian_determinant",
    "map_points",
    "level_shape",
    "control_factor",
    "random_points",
    "resample_grid",
    "resize_displacement",
    "shift_field",
]


def identity_grid(spatial_shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates of every grid point.

    Returns:
        ``(3, D, H, W)`` tensor whose channel ``c`` holds the index along axis ``c``.
    """
    axes = [torch.arange(n, device=device, dtype=dtype) for n in spatial_shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def sample(volume: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Interpolate ``volume`` at voxel coordinates ``coords`` (the package's only grid_sample call).

    Args:
        volume: ``(B, C, D, H, W)`` values on the grid.
        coords: ``(B, 3, *out)`` voxel coordinates (channel = tensor axis D, H, W), where ``out`` is
            any 3D shape, e.g. the grid itself or ``(N, 1, 1)`` for N points.
        mode: ``"bilinear"`` (trilinear) or ``"nearest"``.
    Returns:
        ``(B, C, *out)`` interpolated values; positions outside the grid take the border value.
    """
    if volume.dim() != 5 or coords.dim() != 5 or coords.shape[1] != 3 or coords.shape[0] != volume.shape[0]:
        raise InputError(
            f"sample: expected volume (B, C, D, H, W) and coords (B, 3, d, h, w), "
            f"got {tuple(volume.shape)} and {tuple(coords.shape)}"
        )
    return _sample_at(volume, lambda c: coords[:, c], coords.shape[2:], mode)


def _sample_at(volume: torch.Tensor, coordinate, out_shape, mode: str) -> torch.Tensor:
    """:func:`sample` at the voxel coordinates ``coordinate(c)`` ``(B, *out_shape)`` along each axis c,
    written straight into grid_sample's grid, so only one axis's coordinates exist apart from it."""
    # grid_sample wants (B, d, h, w, 3) ordered (x=W, y=H, z=D)
    grid = volume.new_empty((volume.shape[0], *out_shape, 3))
    for c, n in enumerate(volume.shape[2:]):
        # align_corners=True: index 0 -> -1, index n-1 -> +1 (a size-1 axis maps everything to 0).
        scale = 2.0 / (n - 1) if n > 1 else 0.0
        grid[..., 2 - c] = coordinate(c) * scale - (1.0 if n > 1 else 0.0)
    return F.grid_sample(volume, grid, mode=mode, padding_mode="border", align_corners=True)


def shift_field(field: torch.Tensor, delta: Sequence[float], check: bool = True) -> torch.Tensor:
    """A lattice field read at ``p + delta`` for one constant sub-voxel offset: trilinear, border
    replicated, i.e. what :func:`sample` gives at ``identity_grid + delta``, computed as three
    separable two-tap interpolations instead of a ``grid_sample``.

    Args:
        field: ``(..., D, H, W)`` values on the grid (an image, or a displacement's components).
        delta: 3 offsets in voxels along (D, H, W), each in (−1, 1).
        check: validate the inputs (False on hot paths whose callers checked them already).
    Returns:
        ``(..., D, H, W)``: ``out[p] = field(p + delta)``.
    """
    if not check:
        return _shift_field(field, delta)
    check_tensor("field", field)
    if field.dim() < 3:
        raise InputError(f"shift_field: expected a field (..., D, H, W), got shape {tuple(field.shape)}")
    delta = [float(d) for d in delta]
    if len(delta) != 3 or not all(-1 < d < 1 for d in delta):
        raise InputError(f"shift_field: expected 3 offsets in (-1, 1) voxels, got {delta!r}")
    return _shift_field(field, delta)


def _shift_field(field: torch.Tensor, delta: Sequence[float]) -> torch.Tensor:
    """:func:`shift_field` without input validation (internal hot path)."""
    for axis, d in enumerate(delta):
        dim = field.dim() - 3 + axis
        n = field.shape[dim]
        if d == 0 or n == 1:
            continue
        if d > 0:  # neighbour p + 1, the last voxel repeated
            neighbour = torch.cat([field.narrow(dim, 1, n - 1), field.narrow(dim, n - 1, 1)], dim)
        else:  # neighbour p − 1, the first voxel repeated
            neighbour = torch.cat([field.narrow(dim, 0, 1), field.narrow(dim, 0, n - 1)], dim)
        field = torch.lerp(field, neighbour, abs(d))
    return field


def _check_field(name: str, disp: torch.Tensor) -> torch.Tensor:
    check_tensor(name, disp, ndim=5, layout="(B, 3, D, H, W)")
    if disp.shape[1] != 3:
        raise InputError(f"{name}: expected 3 vector components on dim 1 (B, 3, D, H, W), got {tuple(disp.shape)}")
    return disp


def warp(image: torch.Tensor, disp: torch.Tensor, mode: str = "bilinear", check: bool = True) -> torch.Tensor:
    """Warp images by displacement fields: ``out(p) = image(p + disp(p))``.

    Args:
        image: ``(B, C, D, H, W)`` images (any channels, e.g. intensities or another field).
        disp: ``(B, 3, D, H, W)`` displacement in voxels on the same grid.
        check: validate the inputs (False on hot paths whose callers checked the shapes already).
    Returns:
        ``(B, C, D, H, W)`` warped images.
    """
    if not check:
        return _warp(image, disp, mode)
    check_tensor("image", image, ndim=5, layout="(B, C, D, H, W)")
    _check_field("disp", disp)
    if image.shape[0] != disp.shape[0] or image.shape[2:] != disp.shape[2:]:
        raise InputError(
            f"warp: image {tuple(image.shape)} and disp {tuple(disp.shape)} must share batch and grid (B, ·, D, H, W)"
        )
    return _warp(image, disp, mode)


def _warp(image: torch.Tensor, disp: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """:func:`warp` without input validation (internal hot path)."""
    shape = disp.shape[2:]
    axes = [torch.arange(n, device=disp.device, dtype=disp.dtype).view([-1 if a == c else 1 for a in range(3)])
            for c, n in enumerate(shape)]  # the identity's coordinate along each axis, broadcast
    return _sample_at(image, lambda c: disp[:, c] + axes[c], shape, mode)


def compose(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Displacement of ``φ_a ∘ φ_b``: ``c(p) = b(p) + a(p + b(p))``.

    Args:
        a, b: ``(B, 3, D, H, W)`` displacements in voxels.
    Returns:
        ``(B, 3, D, H, W)`` displacement in voxels.
    """
    _check_field("a", a)
    _check_field("b", b)
    if a.shape != b.shape:
        raise InputError(f"compose: a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return b + _warp(a, b)


def integrate_velocity(v: torch.Tensor, steps: int = 7, downsize: int = 1) -> torch.Tensor:
    """Exponentiate a stationary velocity field by scaling and squaring.

    ``u ← v / 2**steps``, then ``steps`` times ``u ← compose(u, u)``; ``Id + u ≈ exp(v)``.
    With ``downsize`` f > 1 the squarings run on the grid f times coarser (:func:`level_shape`,
    VoxelMorph's ``int_downsize``): ``v`` is resampled there (:func:`resize_displacement`,
    trilinear, no blur), integrated, and the displacement resampled back to the full grid.

    Args:
        v: ``(B, 3, D, H, W)`` velocity in voxels.
        steps: number of squarings T (>= 0; 0 returns ``v``, whatever ``downsize``).
        downsize: integer f >= 1 (1: integrate on v's own grid).
    Returns:
        ``(B, 3, D, H, W)`` displacement of ``exp(v)`` in voxels of v's grid.
    """
    _check_field("v", v)
    if int(steps) != steps or steps < 0:
        raise InputError(f"steps: expected an integer >= 0, got {steps!r}")
    coarse = level_shape(v.shape[2:], check_integer("downsize", downsize, 1)) if steps else tuple(v.shape[2:])
    if coarse != tuple(v.shape[2:]):
        return resize_displacement(integrate_velocity(resize_displacement(v, coarse), steps), v.shape[2:])
    u = v / (2 ** int(steps))
    for _ in range(int(steps)):
        u = u + _warp(u, u)
    return u


def invert_displacement(disp: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """Numerical inverse of ``Id + disp`` by fixed-point iteration ``w ← -disp(p + w)``.

    For diffeomorphic fields prefer ``integrate_velocity(-v)``; this is for displacement
    (non-diffeomorphic) models and converges when ``|∇disp| < 1``.

    Args:
        disp: ``(B, 3, D, H, W)`` displacement in voxels.
        iterations: number of fixed-point steps.
    Returns:
        ``(B, 3, D, H, W)`` displacement ``w`` with ``(Id + disp) ∘ (Id + w) ≈ Id``.
    """
    _check_field("disp", disp)
    w = -disp
    for _ in range(int(iterations)):
        w = -_warp(disp, w)
    return w


def jacobian_determinant(disp: torch.Tensor, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """Determinant of the Jacobian of ``φ = Id + disp``.

    Derivatives are central differences in the interior and one-sided at the borders.

    Args:
        disp: ``(B, 3, D, H, W)`` displacement in the units of ``spacing`` (voxels with the default
            spacing, mm when ``spacing`` is in mm and ``disp`` is in mm).
        spacing: grid spacing along (D, H, W).
    Returns:
        ``(B, D, H, W)`` determinant (dimensionless); values <= 0 mark folding.
    """
    _check_field("disp", disp)
    s = check_spacing(spacing)
    if min(disp.shape[2:]) < 2:
        raise InputError(f"jacobian_determinant: every grid axis needs >= 2 voxels, got {tuple(disp.shape[2:])}")
    depth = disp.shape[2]
    rows = max(1, _SLAB_VOXELS // max(1, disp.shape[0] * disp.shape[3] * disp.shape[4]))
    if rows >= depth:
        return _determinant(disp, s)
    # slabs of `rows` slices along D, each with one neighbouring slice either side (where there is one):
    # central differences inside a slab read the same voxels as on the whole grid, and the halo slices,
    # whose one-sided differences differ, are cut off; the gradients' temporaries stay slab-sized
    slabs = []
    for start in range(0, depth, rows):
        lo, hi = max(0, start - 1), min(depth, start + rows + 1)  # at least 2 slices
        det = _determinant(disp[:, :, lo:hi], s)
        slabs.append(det[:, start - lo:start - lo + min(rows, depth - start)])
    return torch.cat(slabs, dim=1)


_SLAB_VOXELS = 1 << 21  # voxels per slab of jacobian_determinant (its nine gradients are slab-sized temporaries)


def _determinant(disp: torch.Tensor, s: tuple) -> torch.Tensor:
    """det J of ``Id + disp`` on its whole grid (:func:`jacobian_determinant` without the checks and slabs)."""
    # grads[c][j] = d disp_c / d x_j, each (B, D, H, W)
    grads = [torch.gradient(disp[:, c], spacing=list(s), dim=(1, 2, 3), edge_order=1) for c in range(3)]
    j = [[grads[c][k] + (1.0 if c == k else 0.0) for k in range(3)] for c in range(3)]
    return (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
        + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    )


def directional_derivative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(Da) b``: the derivative of the field ``a`` along the field ``b``, ``Σ_j ∂a_i/∂x_j · b_j``.

    Derivatives are central differences in the interior and one-sided at the borders (as
    :func:`jacobian_determinant`). With ``(Da)b − (Db)a`` it gives the Lie bracket of two velocity
    fields (second-order term of the Baker–Campbell–Hausdorff series).

    Args:
        a, b: ``(B, 3, D, H, W)`` fields in voxels (channel order = array axes); every axis >= 2 voxels.
    Returns:
        ``(B, 3, D, H, W)`` in voxels.
    """
    _check_field("a", a)
    _check_field("b", b)
    if a.shape != b.shape or min(a.shape[2:]) < 2:
        raise InputError(f"directional_derivative: a and b must have one shape with every axis >= 2 voxels, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    grads = torch.gradient(a, dim=(2, 3, 4), edge_order=1)  # grads[j][:, i] = ∂a_i / ∂x_j
    return sum(g * b[:, j:j + 1] for j, g in enumerate(grads))


def map_points(points: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
    """Apply ``φ = Id + disp`` to points: ``p ↦ p + disp(p)`` (trilinear interpolation of ``disp``).

    Args:
        points: ``(B, N, 3)`` voxel coordinates (0-based, tensor axis order D, H, W).
        disp: ``(B, 3, D, H, W)`` displacement in voxels.
    Returns:
        ``(B, N, 3)`` mapped voxel coordinates in the promoted dtype of points and disp (the field is
        interpolated in its own dtype, so float64 points on a float32 field copy no field).
    """
    _check_field("disp", disp)
    check_tensor("points", points, ndim=3, layout="(B, N, 3)")
    if points.shape[-1] != 3 or points.shape[0] != disp.shape[0]:
        raise InputError(f"map_points: expected points (B={disp.shape[0]}, N, 3), got {tuple(points.shape)}")
    dtype = torch.promote_types(points.dtype, disp.dtype)
    coords = points.to(disp.dtype).permute(0, 2, 1)[..., None, None]  # (B, 3, N, 1, 1)
    values = sample(disp, coords)[..., 0, 0]  # (B, 3, N)
    return points.to(dtype) + values.permute(0, 2, 1).to(dtype)


def level_shape(spatial_shape: Sequence[int], factor: int) -> tuple:
    """Grid of a pyramid level ``factor`` times coarser: ``round((n − 1) / factor) + 1`` voxels per
    axis (at least 4), so that the first and last voxel centres stay where they were."""
    if int(factor) != factor or factor < 1:
        raise InputError(f"pyramid factor: expected an integer >= 1, got {factor!r}")
    return tuple(max(4, int(round((n - 1) / factor)) + 1) if factor > 1 else int(n) for n in spatial_shape)


def control_factor(spatial_shape: Sequence[int], max_voxels: int) -> int:
    """The smallest pyramid factor f whose grid (:func:`level_shape`) has at most ``max_voxels``
    voxels: 1 for grids within the budget (and for ``max_voxels`` 0, no budget), larger for larger
    grids (512×512×136 within 2¹⁹ voxels: f = 5, a 103×103×28 grid)."""
    shape = tuple(int(n) for n in spatial_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"control_factor: expected a 3D shape of positive sizes, got {spatial_shape!r}")
    budget = check_integer("max_voxels", max_voxels, 0)
    factor = 1
    while budget and math.prod(level_shape(shape, factor)) > budget and factor < max(shape):
        factor += 1
    return factor


def random_points(spatial_shape: Sequence[int], count: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """About ``count`` points spread over the grid by stratified sampling: the extent ``[0, n − 1]``
    of each axis is cut into ``c`` equal cells (``c`` proportional to the extent, their product
    ``≈ count``) and one point is drawn uniformly inside each cell (continuous coordinates, between
    voxel centres too), from torch's global generator (Pyro's seed fixes them). Every region is
    sampled in every draw, so an average over the points varies less between draws than over as
    many independent uniform points.

    Returns:
        ``(S, 3)`` voxel coordinates, ``S = c_D · c_H · c_W`` (within a few percent of ``count``).
    """
    shape = tuple(int(n) for n in spatial_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"random_points: expected a 3D shape of positive sizes, got {spatial_shape!r}")
    count = check_integer("count", count, 1)
    extent = [max(n - 1, 0) for n in shape]
    spread = [e for e in extent if e > 0]
    density = (count / math.prod(spread)) ** (1.0 / len(spread)) if spread else 0.0
    cells = [max(1, int(round(e * density))) if e > 0 else 1 for e in extent]
    axes = [torch.arange(c, device=device, dtype=dtype) for c in cells]
    corner = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # (S, 3) cell indices
    size = torch.tensor([e / c for e, c in zip(extent, cells)], device=device, dtype=dtype)
    return (corner + torch.rand(corner.shape, device=device, dtype=dtype)) * size


def _gaussian_blur(volume: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, D, H, W)`` with per-axis sd (voxels); edges replicated."""
    for axis, sd in enumerate(sigmas):
        if sd <= 0:
            continue
        radius = int(math.ceil(3 * sd))
        t = torch.arange(-radius, radius + 1, device=volume.device, dtype=volume.dtype)
        kernel = torch.exp(-0.5 * (t / sd) ** 2)
        kernel = kernel / kernel.sum()
        moved = volume.movedim(2 + axis, -1)
        flat = moved.reshape(-1, 1, moved.shape[-1])
        flat = F.conv1d(F.pad(flat, (radius, radius), mode="replicate"), kernel.view(1, 1, -1))
        volume = flat.reshape(moved.shape).movedim(-1, 2 + axis)
    return volume


def resample_grid(volume: torch.Tensor, spatial_shape: Sequence[int], antialias: bool = True) -> torch.Tensor:
    """Resample ``(B, C, D, H, W)`` onto a grid of ``spatial_shape`` covering the same extent:
    new voxel ``i`` sits at old voxel ``i · (n_old − 1) / (n_new − 1)`` along each axis (trilinear,
    ``F.interpolate`` on the regular lattice; :func:`sample` is for arbitrary positions).

    Args:
        antialias: when coarsening, blur first with a Gaussian of sd ``0.5 · ratio`` old voxels
            (``ratio`` = old voxels per new voxel) so that fine texture does not alias.
    Returns:
        ``(B, C, *spatial_shape)``.
    """
    check_tensor("volume", volume, ndim=5, layout="(B, C, D, H, W)")
    old = volume.shape[2:]
    new = tuple(int(n) for n in spatial_shape)
    if len(new) != 3 or min(new) < 1:
        raise InputError(f"resample_grid: expected a 3D shape of positive sizes, got {spatial_shape!r}")
    if new == tuple(old):
        return volume
    return _resample(volume, new, antialias)


def _resample(volume: torch.Tensor, new: tuple, antialias: bool) -> torch.Tensor:
    """:func:`resample_grid` of a checked volume onto another grid ``new``."""
    old = tuple(volume.shape[2:])
    ratios = [(o - 1) / (n - 1) if n > 1 else 0.0 for o, n in zip(old, new)]
    sigmas = [0.5 * r if r > 1 else 0.0 for r in ratios]
    if antialias and any(sigmas) and volume.shape[0] * volume.shape[1] > 1:
        # one (1, 1, D, H, W) volume at a time: the blur's temporaries (padded lines, the convolution's
        # buffers) stay one volume's size, and the coarse results are small
        b, c = volume.shape[:2]
        parts = [_resample(v, new, antialias) for v in volume.reshape(b * c, 1, *old).split(1)]
        return torch.cat(parts).reshape(b, c, *new)
    if antialias:
        volume = _gaussian_blur(volume, sigmas)
    # trilinear on a regular lattice: F.interpolate with align_corners=True puts new voxel i at old
    # i·(n_old − 1)/(n_new − 1), the same positions as sample() at these coordinates would, and its
    # backward is a cheap scatter onto the lattice instead of grid_sample's general one
    return F.interpolate(volume, size=new, mode="trilinear", align_corners=True)


def resize_displacement(disp: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """A displacement / velocity field ``(B, 3, D, H, W)`` in voxels, moved to a grid of
    ``spatial_shape`` over the same extent (:func:`resample_grid`, no blur), its components rescaled
    to the new voxel size (``× (n_new − 1) / (n_old − 1)`` along each axis)."""
    _check_field("disp", disp)
    old = disp.shape[2:]
    out = resample_grid(disp, spatial_shape, antialias=False)
    scale = torch.tensor([(n - 1) / (o - 1) if o > 1 else 1.0 for n, o in zip(out.shape[2:], old)],
                         device=disp.device, dtype=disp.dtype)
    return out * scale.view(1, 3, 1, 1, 1)
