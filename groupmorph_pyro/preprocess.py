"""Intensity and grid preprocessing (pure functions on tensors / arrays)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .checks import InputError

__all__ = [
    "percentile_normalize", "normalize_group", "pad_to_multiple", "crop_to_shape", "random_patch_corner", "extract_patch",
    "tile_starts", "sliding_window",
]


def percentile_normalize(x, lower: float = 1.0, upper: float = 99.0):
    """Clip to the [lower, upper] percentiles and rescale to [0, 1].

    Args:
        x: a volume (numpy array or tensor, any shape); each call normalises the whole input.
        lower, upper: percentiles in [0, 100], lower < upper.
    Returns:
        float32 array/tensor of the same shape in [0, 1] (all zeros for a constant image).
    """
    if not 0 <= lower < upper <= 100:
        raise InputError(f"percentiles: expected 0 <= lower < upper <= 100, got ({lower}, {upper})")
    is_tensor = isinstance(x, torch.Tensor)
    arr = x.detach().cpu().numpy() if is_tensor else np.asarray(x)
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise InputError(f"percentile_normalize: expected finite intensities, got {int((~np.isfinite(arr)).sum())} NaN/inf voxels")
    lo, hi = np.percentile(arr, [lower, upper])
    out = np.clip((arr - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(arr)
    out = out.astype(np.float32)
    return torch.from_numpy(out).to(x.device) if is_tensor else out


def normalize_group(images, percentiles=(1.0, 99.0)) -> torch.Tensor:
    """``(K, D, H, W)`` raw intensities -> ``(1, K, D, H, W)`` float32 tensor, each timepoint
    normalised to [0, 1] on its own (:func:`percentile_normalize`)."""
    arr = np.asarray(images.detach().cpu() if isinstance(images, torch.Tensor) else images)
    if arr.ndim != 4 or arr.shape[0] < 2:
        raise InputError(f"images: expected (K >= 2, D, H, W), got shape {arr.shape}")
    return torch.from_numpy(np.stack([percentile_normalize(a, *percentiles) for a in arr]))[None]


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Pad the last 3 axes at their end (edge replication) to multiples of ``multiple``.

    Args:
        x: ``(B, C, D, H, W)``.
    Returns:
        (padded tensor, original (D, H, W)) — undo with :func:`crop_to_shape`.
    """
    shape = tuple(x.shape[-3:])
    pads = [(-n) % multiple for n in shape]
    if any(pads):
        x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]), mode="replicate")
    return x, shape


def crop_to_shape(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Crop the last 3 axes of ``x`` to ``shape`` (D, H, W), keeping the origin corner."""
    d, h, w = shape
    return x[..., :d, :h, :w]


def random_patch_corner(shape: Sequence[int], patch: Sequence[int], generator: torch.Generator | None = None):
    """Random corner of a ``patch``-sized box inside a grid of ``shape`` (0 where the grid is smaller)."""
    return tuple(
        int(torch.randint(0, max(n - p, 0) + 1, (1,), generator=generator)) for n, p in zip(shape, patch)
    )


def extract_patch(x: torch.Tensor, corner: Sequence[int], patch: Sequence[int]) -> torch.Tensor:
    """Crop ``(..., D, H, W)`` at ``corner`` to ``patch``; pad with edge values where the grid is smaller."""
    (d0, h0, w0), (pd, ph, pw) = corner, patch
    out = x[..., d0 : d0 + pd, h0 : h0 + ph, w0 : w0 + pw]
    short = [p - n for p, n in zip(patch, out.shape[-3:])]
    if any(short):
        lead = out.shape[:-3]
        out5 = out.reshape(-1, 1, *out.shape[-3:])
        out5 = F.pad(out5, (0, short[2], 0, short[1], 0, short[0]), mode="replicate")
        out = out5.reshape(*lead, *patch)
    return out


def tile_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start indices of windows covering ``[0, size)`` with at least ``overlap`` (fraction) overlap."""
    if window >= size:
        return [0]
    step = max(1, int(window * (1 - overlap)))
    starts = list(range(0, size - window, step))
    return starts + [size - window]


def sliding_window(fn, x: torch.Tensor, window: Sequence[int], overlap: float = 0.25):
    """Apply ``fn`` on overlapping 3D tiles of ``x`` and average the overlaps (deterministic).

    Args:
        fn: ``(B, C, d, h, w) -> tuple of tensors (..., d, h, w)`` (e.g. the guide's mean and scale).
        x: ``(B, C, D, H, W)``; window: tile size (d, h, w); overlap: fraction in [0, 1).
    Returns:
        tuple of tensors ``(..., D, H, W)``, each voxel the mean over the tiles covering it.
    """
    if not 0 <= overlap < 1:
        raise InputError(f"overlap: expected a fraction in [0, 1), got {overlap}")
    shape = x.shape[-3:]
    window = [min(int(w), n) for w, n in zip(window, shape)]
    sums, count = None, torch.zeros(shape, device=x.device, dtype=x.dtype)
    for d0 in tile_starts(shape[0], window[0], overlap):
        for h0 in tile_starts(shape[1], window[1], overlap):
            for w0 in tile_starts(shape[2], window[2], overlap):
                sl = (slice(d0, d0 + window[0]), slice(h0, h0 + window[1]), slice(w0, w0 + window[2]))
                outs = fn(x[(..., *sl)])
                outs = outs if isinstance(outs, tuple) else (outs,)
                if sums is None:
                    sums = [o.new_zeros((*o.shape[:-3], *shape)) for o in outs]
                for acc, o in zip(sums, outs):
                    acc[(..., *sl)] += o
                count[sl] += 1
    for acc in sums:
        acc.div_(count)  # in place: no second full-size copy of each output
    return tuple(sums)
