"""Group-level geometry: which timepoints are latent, from latents to per-timepoint maps.

Shapes: ``B`` groups, ``K`` timepoints, latent fields ``z`` of shape ``(B, K_lat, 3, D, H, W)`` in
voxels, with ``K_lat = K − 1`` (all-to-one, fixed timepoint ``p``) or ``K`` (all-moving).
The per-timepoint field ``v_k`` is ``0`` for ``k = p`` (all-to-one) and otherwise ``z_k``; in
all-moving mode the mean over k is subtracted, so the common frame is the group's log-Euclidean
(geodesic) average. ``φ_k = exp(v_k)`` (diffeomorphic) or ``Id + v_k``, and
``warped_k = x_k ∘ φ_k`` lives in the common frame (that of ``x_p`` in all-to-one mode).

:class:`GroupTransform` owns this path for one (K, mode, fixed timepoint, variant): the model, the
registration, training's monitoring and the posterior code all ask it; the functions below are
its pure building blocks.
"""
from __future__ import annotations

import torch

from .checks import InputError, check_bool, check_integer, check_tensor
from .spatial import (directional_derivative, integrate_velocity, invert_displacement, jacobian_determinant,
                      resize_displacement, sample, shift_field, warp)

__all__ = ["MODES", "GroupTransform", "check_mode", "latent_indices", "assemble_fields", "relative_to_fixed", "displacements",
           "inverse_displacements", "jacobians", "warp_group", "timepoints_per_batch"]

MODES = ("all-to-one", "all-moving")


def check_mode(mode: str, num_timepoints: int, fixed: int | None) -> int | None:
    """Validate (mode, K, fixed); returns the fixed index (None in all-moving mode)."""
    if mode not in MODES:
        raise InputError(f"mode: expected one of {MODES}, got {mode!r}")
    if int(num_timepoints) != num_timepoints or num_timepoints < 2:
        raise InputError(f"K: expected at least 2 timepoints, got {num_timepoints!r}")
    if mode == "all-moving":
        if fixed is not None:
            raise InputError(f"fixed: all-moving mode has no fixed timepoint, got fixed={fixed!r}")
        return None
    fixed = 0 if fixed is None else fixed
    if int(fixed) != fixed or not 0 <= fixed < num_timepoints:
        raise InputError(f"fixed: expected a timepoint index in [0, {num_timepoints - 1}], got {fixed!r}")
    return int(fixed)


def latent_indices(num_timepoints: int, mode: str, fixed: int | None) -> list[int]:
    """Timepoints that carry a latent field, in increasing order."""
    fixed = check_mode(mode, num_timepoints, fixed)
    return [k for k in range(num_timepoints) if k != fixed]


def _check_latents(z: torch.Tensor, num_timepoints: int, mode: str, fixed: int | None) -> None:
    """Latents ``z`` must be ``(B, K_lat, 3, D, H, W)`` for (K, mode, fixed)."""
    idx = latent_indices(num_timepoints, mode, fixed)
    if z.dim() != 6 or z.shape[1] != len(idx) or z.shape[2] != 3:
        raise InputError(f"z: expected (B, {len(idx)}, 3, D, H, W) for K={num_timepoints} in {mode}, got {tuple(z.shape)}")


def assemble_fields(z: torch.Tensor, num_timepoints: int, mode: str, fixed: int | None) -> torch.Tensor:
    """Per-timepoint fields ``v`` from latents.

    Args:
        z: ``(B, K_lat, 3, D, H, W)`` latent fields in voxels.
    Returns:
        ``(B, K, 3, D, H, W)``: zero at the fixed timepoint (all-to-one), zero-mean over K (all-moving).
    """
    _check_latents(z, num_timepoints, mode, fixed)
    if mode == "all-moving":
        return z - z.mean(dim=1, keepdim=True)
    parts = list(z.unbind(1))
    parts.insert(check_mode(mode, num_timepoints, fixed), torch.zeros_like(parts[0]))
    return torch.stack(parts, dim=1)


def relative_to_fixed(loc: torch.Tensor, scale: torch.Tensor, fixed: int,
                      diffeomorphic: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """All-moving latents re-expressed in the frame of timepoint ``fixed`` (an all-to-one posterior).

    All-moving maps ``φ_k`` send the common frame to image k; in the frame of image p the maps are
    ``φ_k ∘ φ_p⁻¹``. The mean is that composition's latent to second order:

    - velocities (``φ = exp(v)``): the Baker–Campbell–Hausdorff series
      ``log(exp(X) ∘ exp(Y)) ≈ X + Y + ½((DX)Y − (DY)X)`` with X = v_k, Y = −v_p, i.e.
      ``v_k − v_p + ½((Dv_p)v_k − (Dv_k)v_p)`` (exact for commuting fields, e.g. translations);
    - displacements (``φ = Id + u``): ``u_k − u_p + (Du_p)u_p − (Du_k)u_p``.

    ``D`` is the Jacobian by central differences (:func:`~groupmorph_pyro.spatial.directional_derivative`);
    the subtracted group mean of the all-moving model is applied first (it changes the brackets).
    The guide's fields are independent Normals; the sd is that of the first-order difference,
    ``sqrt(σ_k² + σ_p²)``.

    Args:
        loc, scale: ``(B, K, 3, D, H, W)`` all-moving guide mean and sd (voxels).
        fixed: the timepoint p that stays fixed, in [0, K − 1]; diffeomorphic: as the model.
    Returns:
        ``(loc, scale)``, each ``(B, K − 1, 3, D, H, W)`` (timepoints k ≠ p in increasing order, voxels).
    """
    if loc.dim() != 6 or loc.shape[2] != 3 or scale.shape != loc.shape:
        raise InputError(f"loc, scale: expected two (B, K, 3, D, H, W) tensors of one shape, got "
                         f"{tuple(loc.shape)} and {tuple(scale.shape)}")
    idx = latent_indices(loc.shape[1], "all-to-one", fixed)
    v = assemble_fields(loc, loc.shape[1], "all-moving", None)  # the model's fields: zero mean over K
    vp = v[:, fixed]  # (B, 3, D, H, W); one timepoint at a time below bounds the temporaries
    shared = None if diffeomorphic else vp - directional_derivative(vp, vp)  # the same for every k
    rel = []
    for k in idx:
        vk = v[:, k]
        if diffeomorphic:
            rel.append(vk - vp + 0.5 * (directional_derivative(vp, vk) - directional_derivative(vk, vp)))
        else:
            rel.append(vk - shared - directional_derivative(vk, vp))
    ref_scale = scale[:, fixed:fixed + 1]
    return torch.stack(rel, dim=1), (scale[:, idx].square() + ref_scale.square()).sqrt()


def _per_timepoint(fn, *tensors: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """``fn`` over the ``B·K`` maps of ``tensors`` (each ``(B, K, ...)``, flattened to ``(B·K, ...)``
    and sliced alike), ``chunk`` maps at a time (None: all in one batch). Chunking bounds the
    temporaries for full-resolution inference; with autograd it saves nothing (every chunk's graph
    is kept), so use it under ``torch.no_grad()``. Returns ``(B, K, *fn's output shape[1:])``."""
    b, k = tensors[0].shape[:2]
    flat = [t.reshape(b * k, *t.shape[2:]) for t in tensors]
    if chunk is None or chunk >= b * k:
        out = fn(*flat)
        return out.reshape(b, k, *out.shape[1:])
    if int(chunk) != chunk or chunk < 1:
        raise InputError(f"chunk: expected an integer >= 1 or None, got {chunk!r}")
    first = fn(*(f[:chunk] for f in flat))
    out = first.new_empty((b * k, *first.shape[1:]))
    out[:chunk] = first
    del first
    for start in range(chunk, b * k, chunk):
        out[start:start + chunk] = fn(*(f[start:start + chunk] for f in flat))
    return out.reshape(b, k, *out.shape[1:])


def displacements(fields: torch.Tensor, diffeomorphic: bool = True, steps: int = 7,
                  chunk: int | None = None, downsize: int = 1) -> torch.Tensor:
    """``φ_k − Id`` in voxels, ``(B, K, 3, D, H, W)`` from fields ``v`` of the same shape
    (``chunk``: timepoints integrated at a time, see :func:`_per_timepoint`; ``downsize``: squarings
    on a grid that many times coarser, see :func:`~groupmorph_pyro.spatial.integrate_velocity`)."""
    if not diffeomorphic:
        return fields
    return _per_timepoint(lambda v: integrate_velocity(v, steps, downsize), fields, chunk=chunk)


def inverse_displacements(fields: torch.Tensor, diffeomorphic: bool = True, steps: int = 7,
                          chunk: int | None = None, downsize: int = 1) -> torch.Tensor:
    """``φ_k⁻¹ − Id`` in voxels, ``(B, K, 3, D, H, W)``: ``exp(−v)``, or a fixed-point inverse."""
    if diffeomorphic:
        return _per_timepoint(lambda v: integrate_velocity(-v, steps, downsize), fields, chunk=chunk)
    return _per_timepoint(invert_displacement, fields, chunk=chunk)


def jacobians(disp: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """``det Jφ_k`` (dimensionless), ``(B, K, D, H, W)`` from displacements ``(B, K, 3, D, H, W)`` in voxels."""
    if disp.dim() != 6 or disp.shape[2] != 3:
        raise InputError(f"jacobians: expected displacements (B, K, 3, D, H, W), got {tuple(disp.shape)}")
    return _per_timepoint(jacobian_determinant, disp, chunk=chunk)


def warp_group(images: torch.Tensor, disp: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Warp each timepoint: ``(B, K, D, H, W)`` images, ``(B, K, 3, D, H, W)`` displacements (voxels)
    -> ``(B, K, D, H, W)``; ``chunk`` timepoints at a time (None: all, see :func:`_per_timepoint`)."""
    b, k = images.shape[:2]
    if disp.shape[:2] != (b, k) or disp.shape[3:] != images.shape[2:]:
        raise InputError(f"warp_group: images {tuple(images.shape)} and displacements {tuple(disp.shape)} do not match")
    return _per_timepoint(lambda img, d: warp(img[:, None], d, check=False)[:, 0], images, disp, chunk=chunk)


_BATCH_VOXELS = 1 << 25  # voxels per batch of maps integrated together (~0.4 GB per 3-component float32 batch)


def timepoints_per_batch(spatial_shape) -> int:
    """Maps integrated in one batch for a grid: all of them for small grids (faster: measured 2.8 s
    vs 3.6 s one at a time for K=6 at 128×128×64 on 2 CPU cores), one at a time for 512×512×136."""
    n = 1
    for v in spatial_shape:
        n *= int(v)
    return max(1, _BATCH_VOXELS // n)


class GroupTransform:
    """The group's transformation for one fixed timepoint: latents -> fields -> maps.

    ``z (B, K_lat, 3, D, H, W)`` -> fields ``v (B, K, 3, D, H, W)`` -> ``φ_k − Id``, ``φ_k⁻¹ − Id``
    (voxels), ``det Jφ_k`` and the warped group ``x_k ∘ φ_k`` (common frame), following the
    conventions of this module's docstring.

    Args:
        num_timepoints: K (>= 2).
        mode: ``"all-to-one"`` or ``"all-moving"``.
        fixed: fixed timepoint (all-to-one; default 0); must be None in all-moving mode.
        diffeomorphic: fields are velocities integrated by scaling and squaring (True) or
            displacements (False).
        integration_steps: scaling-and-squaring steps T.
        integration_downsize: the squarings run on a grid this many times coarser (1: full grid).
        chunk: maps computed at a time: None (all in one batch, e.g. under autograd), an integer, or
            ``"auto"`` (:func:`timepoints_per_batch` of the grid; for inference under ``no_grad``).
        jitter: :meth:`__call__` (what the likelihood sees) reads the whole group, the fixed image
            included, on the lattice shifted by one random offset ``δ ~ U(−½, ½)³`` voxels per call
            (torch's global generator, so Pyro's seed fixes it): ``x_k(p + δ + u_k(p + δ))``, the
            field itself read at ``p + δ`` (:func:`~groupmorph_pyro.spatial.shift_field`). Without
            it only the moving images are interpolated, and trilinear interpolation averages their
            noise by an amount set by the sub-voxel part of the map, so NMI rewards maps that blur
            rather than align (on the breathing phantom the fitted maps scored NMI 0.586 against the
            true maps' 0.566); averaged over δ, every image is interpolated alike. The maps returned
            are not shifted.
    """

    def __init__(self, num_timepoints: int, mode: str = "all-to-one", fixed: int | None = None,
                 diffeomorphic: bool = True, integration_steps: int = 7, chunk=None, integration_downsize: int = 1,
                 jitter: bool = False):
        self.fixed = check_mode(mode, num_timepoints, fixed)
        self.num_timepoints, self.mode = int(num_timepoints), mode
        self.diffeomorphic, self.integration_steps = bool(diffeomorphic), int(integration_steps)
        self.integration_downsize = check_integer("integration_downsize", integration_downsize, 1)
        self.jitter = check_bool("jitter", jitter)
        if not (chunk is None or chunk == "auto" or (isinstance(chunk, int) and chunk >= 1)):
            raise InputError(f"chunk: expected None, 'auto' or an integer >= 1, got {chunk!r}")
        self.chunk = chunk

    def __repr__(self) -> str:
        return (f"GroupTransform(K={self.num_timepoints}, mode={self.mode!r}, fixed={self.fixed}, "
                f"diffeomorphic={self.diffeomorphic}, integration_steps={self.integration_steps}, "
                f"integration_downsize={self.integration_downsize}, jitter={self.jitter})")

    @property
    def latent_indices(self) -> list[int]:
        """Timepoints that carry a latent field (K − 1 in all-to-one mode, K in all-moving)."""
        return latent_indices(self.num_timepoints, self.mode, self.fixed)

    @property
    def num_latent(self) -> int:
        return len(self.latent_indices)

    def _chunk(self, tensor: torch.Tensor):
        return self._chunk_for(tensor.shape[-3:])

    def _chunk_for(self, spatial_shape):
        return timepoints_per_batch(spatial_shape) if self.chunk == "auto" else self.chunk

    def fields(self, z: torch.Tensor) -> torch.Tensor:
        """Per-timepoint fields ``(B, K, 3, D, H, W)`` (voxels) from latents ``(B, K_lat, 3, D, H, W)``."""
        return assemble_fields(z, self.num_timepoints, self.mode, self.fixed)

    def _maps(self, z: torch.Tensor, fn) -> torch.Tensor:
        """``fn`` (forward or inverse maps of fields ``(B, n, 3, D, H, W)``) per timepoint. All-to-one:
        only the latent timepoints' maps are computed and the fixed one's, the identity, is inserted
        as zeros (``exp(0) = Id`` and the inverse of ``Id`` is ``Id``, exactly): K − 1 integrations, not K."""
        if self.mode == "all-to-one":
            _check_latents(z, self.num_timepoints, self.mode, self.fixed)
            return assemble_fields(fn(z), self.num_timepoints, self.mode, self.fixed)
        return fn(self.fields(z))

    def _forward(self, v: torch.Tensor) -> torch.Tensor:
        return displacements(v, self.diffeomorphic, self.integration_steps, self._chunk(v), self.integration_downsize)

    def displacements(self, z: torch.Tensor, shape=None) -> torch.Tensor:
        """``φ_k − Id`` in voxels, ``(B, K, 3, D, H, W)``, from latents ``z``. ``shape``: the image grid
        when ``z`` lives on a coarser control grid over the same extent (the maps integrated there, then
        :meth:`resized`); None: z's grid."""
        return self.resized(self._maps(z, self._forward), shape)

    def inverse_displacements(self, z: torch.Tensor, shape=None) -> torch.Tensor:
        """``φ_k⁻¹ − Id`` in voxels, ``(B, K, 3, D, H, W)``: ``exp(−v_k)``, or a fixed-point inverse
        (``shape`` as :meth:`displacements`)."""
        return self.resized(self._maps(z, self._inverse), shape)

    def _inverse(self, v: torch.Tensor) -> torch.Tensor:
        return inverse_displacements(v, self.diffeomorphic, self.integration_steps, self._chunk(v),
                                     self.integration_downsize)

    def timepoint_displacement(self, z: torch.Tensor, k: int, shape=None, inverse: bool = False) -> torch.Tensor:
        """Timepoint k's ``φ_k − Id`` (or, with ``inverse``, ``φ_k⁻¹ − Id``) in voxels, ``(B, 3, D, H, W)``:
        ``displacements(z, shape)[:, k]`` computed alone, so that full-resolution outputs need one
        timepoint's maps at a time (``shape`` as :meth:`displacements`). All-to-one: the fixed
        timepoint's map is the identity (zeros)."""
        k = check_integer("k", k, 0)
        if k >= self.num_timepoints:
            raise InputError(f"k: expected a timepoint 0..{self.num_timepoints - 1}, got {k}")
        grid = tuple(z.shape[3:]) if shape is None else tuple(int(n) for n in shape)
        if self.mode == "all-to-one":
            _check_latents(z, self.num_timepoints, self.mode, self.fixed)
            if k == self.fixed:
                return z.new_zeros((z.shape[0], 3, *grid))
            v = z[:, self.latent_indices.index(k)][:, None]
        else:
            v = self.fields(z)[:, k][:, None]
        return self.resized((self._inverse if inverse else self._forward)(v), shape)[:, 0]

    def resized(self, disp: torch.Tensor, shape=None) -> torch.Tensor:
        """Maps ``(B, K, 3, d, h, w)`` on a control grid moved to the grid ``shape`` over the same extent
        (:func:`~groupmorph_pyro.spatial.resize_displacement`: trilinear, in that grid's voxels), a few
        maps at a time (``chunk``); returned as they are when ``shape`` is None or their own grid."""
        if shape is None or tuple(int(n) for n in shape) == tuple(disp.shape[3:]):
            return disp
        shape = tuple(int(n) for n in shape)
        return _per_timepoint(lambda d: resize_displacement(d, shape), disp, chunk=self._chunk_for(shape))

    def read_group(self, disp: torch.Tensor, images: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """The group in the common frame read at ``points``: ``x_k(φ_k(p))`` for every timepoint k, the
        maps ``disp`` given on a control grid over the images' extent (the image grid itself or a
        coarser one; interpolated at the points, trilinear, and rescaled to image voxels). Only the
        points are warped: the cost is set by their number and the control grid, not the image grid.

        Args:
            disp: ``(B, K, 3, d, h, w)`` maps (:meth:`displacements` of the latents; control voxels).
            images: ``(B, K, D, H, W)``.
            points: ``(S, 3)`` image voxel coordinates, e.g. from
                :func:`~groupmorph_pyro.spatial.random_points`.

        Returns:
            ``(B, K, S)`` intensities; at lattice points, :meth:`warp` of ``resized(disp, (D, H, W))`` there.
        """
        check_tensor("points", points, ndim=2, layout="(S, 3)")
        if (points.shape[1] != 3 or images.dim() != 5 or disp.dim() != 6 or disp.shape[2] != 3
                or images.shape[:2] != disp.shape[:2]):
            raise InputError(f"read_group: expected maps (B, K, 3, d, h, w), images (B, K, D, H, W) of one (B, K) "
                             f"and points (S, 3), got {tuple(disp.shape)}, {tuple(images.shape)} and {tuple(points.shape)}")
        b, k = images.shape[:2]
        grid, fine = disp.shape[3:], images.shape[2:]
        ratio = torch.tensor([(c - 1) / (n - 1) if n > 1 else 1.0 for c, n in zip(grid, fine)],
                             device=points.device, dtype=points.dtype)  # control voxels per image voxel
        at = (points * ratio).t()[None, :, :, None, None].expand(b * k, 3, len(points), 1, 1)
        moved = sample(disp.reshape(b * k, 3, *grid), at) / ratio.view(1, 3, 1, 1, 1)  # (B·K, 3, S, 1, 1), image voxels
        coords = points.t()[None, :, :, None, None] + moved
        return sample(images.reshape(b * k, 1, *fine), coords).reshape(b, k, len(points))

    def jacobians(self, disp: torch.Tensor) -> torch.Tensor:
        """``det Jφ_k``, ``(B, K, D, H, W)``, from displacements ``(B, K, 3, D, H, W)`` (voxels)."""
        return jacobians(disp, chunk=self._chunk(disp))

    def warp(self, images: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
        """The group in the common frame, ``x_k ∘ φ_k``: images ``(B, K, D, H, W)``, displacements
        ``(B, K, 3, D, H, W)`` (voxels) -> ``(B, K, D, H, W)``."""
        return warp_group(images, disp, self._chunk(disp))

    def __call__(self, z: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(displacements (B, K, 3, D, H, W), warped group (B, K, D, H, W))`` for latents ``z`` and
        images ``(B, K, D, H, W)``: what the likelihood sees. All-to-one: the fixed image is passed
        through as it is (``φ_p = Id``; with ``jitter``, read at ``p + δ``), only the K − 1 others are warped."""
        delta = self.draw_offset()  # voxels, one offset per call
        if self.mode != "all-to-one":
            disp = self.displacements(z)
            return disp, self.warp(images, disp if delta is None else self._shifted(disp, delta))
        _check_latents(z, self.num_timepoints, self.mode, self.fixed)
        moving = self._forward(z)  # (B, K − 1, 3, D, H, W): the moving timepoints' maps
        disp = assemble_fields(moving, self.num_timepoints, self.mode, self.fixed)
        if images.shape[:2] != disp.shape[:2] or images.shape[2:] != disp.shape[3:]:
            raise InputError(f"images {tuple(images.shape)} do not match the displacements {tuple(disp.shape)}")
        warped = self._warp_moving(moving, images[:, self.latent_indices], delta)
        return disp, self.with_fixed(warped, images, delta)

    def draw_offset(self) -> list | None:
        """The sub-voxel offset δ ~ U(−½, ½)³ (voxels) of one likelihood evaluation with ``jitter``
        (torch's global generator), else None."""
        return torch.rand(3).sub_(0.5).tolist() if self.jitter else None

    def warp_latents(self, z: torch.Tensor, images: torch.Tensor, delta: list | None = None) -> torch.Tensor:
        """All-to-one: the moving timepoints of latents ``z`` ``(B, n, 3, D, H, W)`` (any n of the K − 1,
        e.g. one chunk of them), ``x_k ∘ φ_k`` for their images ``(B, n, D, H, W)``, read at ``p + δ``
        for an offset from :meth:`draw_offset` (None: on the lattice). Each map depends on its own
        latent only, so the group's warped moving images are these chunks side by side; with
        :meth:`with_fixed` they are what :meth:`__call__` gives for one δ."""
        if self.mode != "all-to-one":
            raise InputError(f"warp_latents: needs all-to-one mode (each map from its own latent), got {self.mode!r}")
        if z.dim() != 6 or z.shape[2] != 3 or images.shape[:2] != z.shape[:2] or images.shape[2:] != z.shape[3:]:
            raise InputError(f"warp_latents: expected latents (B, n, 3, D, H, W) and images (B, n, D, H, W) of one "
                             f"(B, n) and grid, got {tuple(z.shape)} and {tuple(images.shape)}")
        return self._warp_moving(self._forward(z), images, delta)

    def _warp_moving(self, moving: torch.Tensor, images: torch.Tensor, delta: list | None) -> torch.Tensor:
        if delta is not None:
            moving = self._shifted(moving, delta)
        return self.warp(images, moving)

    def with_fixed(self, warped_moving: torch.Tensor, images: torch.Tensor, delta: list | None = None) -> torch.Tensor:
        """All-to-one: the whole warped group ``(B, K, D, H, W)`` from its K − 1 warped moving images
        ``(B, K − 1, D, H, W)`` (latent order) and the group ``images``: the fixed image inserted as it
        is (``φ_p = Id``; read at ``p + δ`` with an offset)."""
        fixed_image = images[:, self.fixed]
        if delta is not None:
            fixed_image = shift_field(fixed_image, delta, check=False)
        warped = list(warped_moving.unbind(1))
        warped.insert(self.fixed, fixed_image)
        return torch.stack(warped, dim=1)

    @staticmethod
    def _shifted(disp: torch.Tensor, delta: list) -> torch.Tensor:
        """Displacements ``(B, n, 3, D, H, W)`` that read images at ``p + δ + u(p + δ)``: the field
        shifted by δ, plus δ."""
        offset = torch.tensor(delta, device=disp.device, dtype=disp.dtype).view(1, 1, 3, 1, 1, 1)
        return shift_field(disp, delta, check=False) + offset
