"""Seeded synthetic groups with known motion and landmarks (tests, quick start, benchmarks).

:func:`breathing_phantom` builds a 4DCT-like thorax: body, two lungs with vessel-like texture,
spine, and a smooth diffeomorphic respiratory motion (mostly along the last axis, the
superior–inferior ``z`` of a NIfTI array) over K phases. Ground truth:

* reference anatomy ``R``; phase k is ``x_k = R ∘ ψ_k`` with ``ψ_k = exp(a_k · v)``,
  ``a_k = ((1 − cos(π t_k)) / 2)^γ`` (phase 0 = no motion, last phase = full amplitude);
* the seed draws the anatomy's texture **and the motion**: the peak amplitude (× U(0.7, 1.3)), the
  mix of directions (anterior–posterior and lateral shares), a smooth random component, and the
  phase timing (``t_k`` from random increments, exponent γ ~ U(0.6, 1.6)), so groups of other
  seeds are held-out motions, not only new textures;
* landmarks: reference points ``r`` (vessel voxels inside the lungs) appear in phase k at
  ``l_k = ψ_k⁻¹(r) = exp(−a_k v)(r)``, in voxel coordinates (0-based, array axis order).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from .checks import InputError, check_positive, check_spacing, check_spatial_shape
from .spatial import integrate_velocity, map_points, warp

__all__ = ["SyntheticGroup", "breathing_phantom", "dce_phantom", "anatomy_group"]


@dataclass
class SyntheticGroup:
    """A synthetic group.

    Attributes:
        images: ``(K, D, H, W)`` float32 intensities (roughly CT-like in [0, 1]).
        spacing: voxel size (mm) along the three array axes.
        affine: 4x4 voxel-to-world matrix (diagonal spacing).
        landmarks: ``(K, L, 3)`` float voxel coordinates (0-based) of L landmarks in each phase.
        velocities: ``(K, 3, D, H, W)`` true velocity of ``ψ_k`` in voxels.
    """

    images: np.ndarray
    spacing: tuple
    affine: np.ndarray
    landmarks: np.ndarray
    velocities: np.ndarray


def _check_timepoints(num_timepoints) -> None:
    if int(num_timepoints) != num_timepoints or num_timepoints < 2:
        raise InputError(f"num_timepoints: expected an integer >= 2, got {num_timepoints!r}")


def _ellipsoid(c, centre, radii):
    return sum(((ci - m) / r) ** 2 for ci, m, r in zip(c, centre, radii)) <= 1.0


def breathing_phantom(shape=(48, 48, 48), num_timepoints: int = 6, amplitude: float = 4.0,
                      num_landmarks: int = 75, spacing=(2.0, 2.0, 2.5), noise: float = 0.01,
                      seed: int = 0) -> SyntheticGroup:
    """4DCT-like breathing phantom with known motion and landmarks.

    Args:
        shape: grid ``(D, H, W)``; the last axis is superior–inferior. Each axis >= 16.
        num_timepoints: K >= 2 phases.
        amplitude: typical peak superior–inferior displacement in voxels at full exhale (each seed
            draws its own, between 0.7 and 1.3 times this).
        num_landmarks: L landmarks (vessel voxels inside the lungs).
        spacing: voxel size in mm.
        noise: standard deviation of independent Gaussian noise added per phase.
        seed: random seed (same seed, same group): texture, noise, landmarks and the motion.
    """
    shape = check_spatial_shape(shape, minimum=16)
    spacing = check_spacing(spacing)
    _check_timepoints(num_timepoints)
    check_positive("amplitude", amplitude, allow_zero=True)
    rng = np.random.default_rng(seed)
    c = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")

    body = _ellipsoid(c[:2], (0, 0), (0.9, 0.75))
    lungs = _ellipsoid(c, (-0.42, 0.0, 0.05), (0.32, 0.5, 0.75)) | _ellipsoid(c, (0.42, 0.0, 0.05), (0.32, 0.5, 0.75))
    spine = _ellipsoid(c[:2], (0.0, -0.6), (0.12, 0.1))
    texture = gaussian_filter(rng.standard_normal(shape), 1.5)
    texture /= texture.std()
    vessels = lungs & (texture > 1.2)
    ref = np.where(body, 0.55 + 0.04 * texture, 0.0)
    ref = np.where(lungs, 0.12 + 0.02 * texture, ref)
    ref = np.where(vessels, 0.5, ref)
    ref = np.where(spine, 0.95, ref)
    ref = gaussian_filter(ref, 0.6).astype(np.float32)

    # Smooth motion profile: strongest in the lungs' inferior part, fading outside; drawn from the seed.
    weight = gaussian_filter(lungs.astype(np.float64), 3.0) * (0.6 + 0.4 * (1 - c[2]) / 2)
    peak = amplitude * rng.uniform(0.7, 1.3)
    anterior, lateral = rng.uniform(0.1, 0.4), rng.uniform(0.05, 0.3)
    smooth = np.stack([gaussian_filter(rng.standard_normal(shape), [n / 6 for n in shape]) for _ in range(3)])
    smooth /= max(np.abs(smooth).max(), 1e-12)
    v = 0.25 * peak * weight * smooth  # smooth random component, up to a quarter of the peak
    v[2] += -peak * weight  # superior–inferior
    v[1] += anterior * peak * weight * c[1]  # anterior–posterior expansion
    v[0] += lateral * peak * weight * np.sign(c[0]) * np.abs(c[0])  # lateral
    t = np.concatenate([[0.0], np.cumsum(rng.uniform(0.5, 1.5, num_timepoints - 1))])
    a = ((1 - np.cos(np.pi * t / t[-1])) / 2) ** rng.uniform(0.6, 1.6)
    velocities = (a[:, None, None, None, None] * v[None]).astype(np.float32)

    candidates = np.argwhere(vessels & (np.abs(np.stack(c)).max(0) < 0.85))
    return _deform_group(np.broadcast_to(ref, (num_timepoints, *shape)), velocities, candidates, num_landmarks,
                         noise, spacing, rng)


def _deform_group(refs: np.ndarray, velocities: np.ndarray, candidates: np.ndarray, num_landmarks: int,
                  noise: float, spacing, rng) -> SyntheticGroup:
    """Images ``refs[k] ∘ exp(v_k)`` plus noise, and landmarks ``exp(-v_k)(r)`` for random candidates r."""
    k, shape = refs.shape[0], refs.shape[1:]
    if len(candidates) < num_landmarks:
        raise InputError(f"synthetic: grid {tuple(shape)} has {len(candidates)} landmark candidates, fewer than {num_landmarks}")
    ref_points = candidates[rng.choice(len(candidates), num_landmarks, replace=False)].astype(np.float32)
    with torch.no_grad():
        vel = torch.from_numpy(np.ascontiguousarray(velocities, dtype=np.float32))
        fwd, inv = integrate_velocity(vel), integrate_velocity(-vel)
        images = warp(torch.from_numpy(np.ascontiguousarray(refs, dtype=np.float32))[:, None], fwd)[:, 0].numpy()
        pts = torch.from_numpy(ref_points).expand(k, -1, -1).contiguous()
        landmarks = map_points(pts, inv).numpy()
    images = images + noise * rng.standard_normal(images.shape).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    return SyntheticGroup(images.astype(np.float32), spacing, affine, landmarks.astype(np.float32),
                          velocities.astype(np.float32))


def dce_phantom(shape=(48, 48, 32), num_timepoints: int = 6, amplitude: float = 2.5, num_landmarks: int = 30,
                spacing=(1.0, 1.0, 1.0), noise: float = 0.01, seed: int = 0) -> SyntheticGroup:
    """Breast DCE-MRI-like series: two breasts on a chest wall, fibroglandular texture, fat, an
    enhancing lesion; contrast uptake changes intensities over time (timepoint 0 = pre-contrast)
    and each timepoint has its own small smooth motion (``amplitude`` voxels at most).

    Args as :func:`breathing_phantom`; axes are (left–right, anterior–posterior, superior–inferior).
    """
    shape = check_spatial_shape(shape, minimum=16)
    spacing = check_spacing(spacing)
    _check_timepoints(num_timepoints)
    rng = np.random.default_rng(seed)
    c = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    breasts = _ellipsoid(c, (-0.45, 0.2, 0.0), (0.42, 0.75, 0.85)) | _ellipsoid(c, (0.45, 0.2, 0.0), (0.42, 0.75, 0.85))
    breasts &= c[1] > -0.4
    chest = c[1] <= -0.4
    texture = gaussian_filter(rng.standard_normal(shape), 1.5)
    texture /= texture.std()
    gland = breasts & (texture > 0.4)
    lesion = _ellipsoid(c, (0.45, 0.3, 0.1), (0.12, 0.12, 0.15))
    base = np.where(chest, 0.35 + 0.03 * texture, 0.0)
    base = np.where(breasts, 0.8 + 0.03 * texture, base)  # fat: bright on T1 without fat suppression
    base = np.where(gland, 0.3, base)
    t = np.arange(num_timepoints) / max(num_timepoints - 1, 1)
    uptake_lesion = 0.6 * (1 - np.exp(-8 * t)) * np.where(t > 0, 1, 0)  # fast wash-in
    uptake_gland = 0.25 * t  # slow, progressive
    refs = np.stack([gaussian_filter(base + ul * lesion + ug * gland, 0.6) for ul, ug in zip(uptake_lesion, uptake_gland)])

    velocities = np.zeros((num_timepoints, 3, *shape), dtype=np.float32)
    for k in range(1, num_timepoints):
        field = np.stack([gaussian_filter(rng.standard_normal(shape), 6.0) for _ in range(3)])
        velocities[k] = amplitude * field / np.abs(field).max()
    candidates = np.argwhere(gland & (np.abs(np.stack(c)).max(0) < 0.85))
    return _deform_group(refs, velocities, candidates, num_landmarks, noise, spacing, rng)


def anatomy_group(t1: np.ndarray, grey: np.ndarray, white: np.ndarray, num_timepoints: int = 4,
                  spacing=(2.0, 2.0, 2.0), amplitude_mm: float = 6.0, num_landmarks: int = 100,
                  noise: float = 0.01, seed: int = 0, smooth_mm: float | None = None) -> SyntheticGroup:
    """A DCE-like group made from real anatomy (e.g. the MNI152 T1 template and its grey / white
    matter maps, :func:`groupmorph_pyro.data.load_mni152`) with known motion and landmarks.

    Each timepoint k gets its own contrast and its own motion, both drawn from ``seed``:

    * contrast: ``R_k = (t1 + e_g,k · grey + e_w,k · white) ** γ_k`` rescaled to [0, 1], grey and
      white matter enhancing by different amounts (``e`` in [0, 0.5]) and a gamma ``γ_k`` in [0.7, 1.4]
      (timepoint 0 is the pre-contrast image, ``e = 0``, ``γ = 1``);
    * motion: ``x_k = R_k ∘ exp(v_k)`` with ``v_k`` a random small rotation / scaling about the
      centre plus smooth random components (Gaussian-filtered noise, σ = ``smooth_mm`` mm along every
      axis, or 4 voxels when ``smooth_mm`` is None), scaled so that
      the mean velocity magnitude inside the head (≈ the mean displacement) is ``amplitude_mm`` × a
      random factor in [0.6, 1.2]; the largest displacements are about 2-3× the mean. Every timepoint moves, timepoint 0 included;
    * landmarks: head voxels with a strong intensity gradient in ``t1`` (tissue boundaries),
      ``l_k = exp(−v_k)(r)`` as in :func:`breathing_phantom`.

    Args:
        t1, grey, white: ``(D, H, W)`` arrays on one grid (t1 any range; grey, white in [0, 1]).
        spacing: voxel size (mm) of that grid.
        smooth_mm: σ (mm) of the smooth motion component. A fixed value gives motion of the same
            spatial scale on any grid (the same physical problem at every voxel size); None filters
            with σ = 4 voxels, so a finer grid gets finer motion. Others as :func:`breathing_phantom`.
    """
    t1, grey, white = (np.asarray(a, dtype=np.float64) for a in (t1, grey, white))
    shape = check_spatial_shape(t1.shape, minimum=16)
    if grey.shape != shape or white.shape != shape:
        raise InputError(f"anatomy_group: grey {grey.shape} and white {white.shape} must match t1 {shape}")
    for name, a in (("t1", t1), ("grey", grey), ("white", white)):
        if not np.isfinite(a).all():
            raise InputError(f"anatomy_group: {name} has NaN/inf values")
    for name, a in (("grey", grey), ("white", white)):
        if a.min() < 0 or a.max() > 1 + 1e-6:
            raise InputError(f"anatomy_group: {name} must be a probability map in [0, 1], got values in "
                             f"[{a.min():.3g}, {a.max():.3g}]")
    spacing = check_spacing(spacing)
    _check_timepoints(num_timepoints)
    check_positive("amplitude_mm", amplitude_mm, allow_zero=True)
    if smooth_mm is not None:
        check_positive("smooth_mm", smooth_mm)
    sigma = 4.0 if smooth_mm is None else tuple(float(smooth_mm) / s for s in spacing)  # voxels along each axis
    rng = np.random.default_rng(seed)
    t1 = (t1 - t1.min()) / max(float(np.ptp(t1)), 1e-12)
    head = gaussian_filter((t1 > 0.05).astype(np.float64), 1.0) > 0.5
    refs = []
    for k in range(num_timepoints):
        e_g, e_w, gamma = (0.0, 0.0, 1.0) if k == 0 else (rng.uniform(0, 0.5), rng.uniform(0, 0.5), rng.uniform(0.7, 1.4))
        r = np.clip(t1 + e_g * grey + e_w * white, 0, None) ** gamma
        refs.append(r / r.max())
    refs = np.stack(refs)

    c = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij"))  # voxels from the centre
    mm = np.asarray(spacing)[:, None, None, None]
    velocities = np.zeros((num_timepoints, 3, *shape), dtype=np.float32)
    for k in range(num_timepoints):
        angle = rng.normal(0, 0.05, 3)  # radians, small rotation generator (skew-symmetric)
        skew = np.array([[0, -angle[2], angle[1]], [angle[2], 0, -angle[0]], [-angle[1], angle[0], 0]])
        linear = skew + np.diag(rng.normal(0, 0.03, 3))
        v_mm = np.einsum("ij,j...->i...", linear, c * mm)
        smooth = np.stack([gaussian_filter(rng.standard_normal(shape), sigma) for _ in range(3)])
        smooth /= np.abs(smooth).max()
        v_mm = v_mm / max(np.abs(v_mm[:, head]).mean(), 1e-12) + 1.5 * smooth / max(np.abs(smooth[:, head]).mean(), 1e-12)
        target = amplitude_mm * rng.uniform(0.6, 1.2)
        v_mm *= target / max(float(np.linalg.norm(v_mm[:, head], axis=0).mean()), 1e-12)
        velocities[k] = (v_mm / mm).astype(np.float32)  # mm -> voxels along each axis

    grad = np.linalg.norm(np.stack(np.gradient(gaussian_filter(t1, 1.0))), axis=0)
    inner = np.zeros(shape, bool)
    inner[tuple(slice(max(2, n // 8), n - max(2, n // 8)) for n in shape)] = True
    strong = head & inner & (grad > np.quantile(grad[head], 0.9))
    candidates = np.argwhere(strong)
    return _deform_group(refs, velocities, candidates, num_landmarks, noise, spacing, rng)
