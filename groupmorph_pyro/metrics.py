"""Registration metrics: landmark distance (METHOD.md convention), folding, RMSE, NMI."""
from __future__ import annotations

import numpy as np
import torch

from .checks import InputError, check_spacing, check_tensor
from .spatial import map_points

__all__ = [
    "map_landmarks", "landmark_distances", "summarize_distances", "folding_percent", "pairwise_rmse", "landmark_report",
]


def map_landmarks(landmarks: torch.Tensor, disp: torch.Tensor, inverse_disp: torch.Tensor) -> torch.Tensor:
    """Map every timepoint's landmarks into every other timepoint: ``φ_i(φ_j⁻¹(l_j))``.

    Args:
        landmarks: ``(K, L, 3)`` voxel coordinates (0-based) of L landmarks in each image.
        disp: ``(K, 3, D, H, W)`` ``φ_k − Id`` in voxels; inverse_disp: ``φ_k⁻¹ − Id``, same shape.
    Returns:
        ``(K, K, L, 3)``: entry ``[i, j]`` is landmark set j mapped into image i (voxels), in the
        promoted dtype of landmarks and fields (each field is interpolated in its own dtype, one
        timepoint at a time: float64 landmarks on float32 full-resolution fields copy no field).
    """
    check_tensor("landmarks", landmarks, ndim=3, layout="(K, L, 3)")
    k = landmarks.shape[0]
    if disp.shape[0] != k or inverse_disp.shape != disp.shape or landmarks.shape[-1] != 3:
        raise InputError(
            f"map_landmarks: expected landmarks (K, L, 3) and fields (K, 3, D, H, W) with the same K, "
            f"got {tuple(landmarks.shape)}, {tuple(disp.shape)}, {tuple(inverse_disp.shape)}"
        )
    dtype = torch.promote_types(landmarks.dtype, disp.dtype)
    common = torch.cat([map_points(landmarks[j : j + 1].to(dtype), inverse_disp[j : j + 1])
                        for j in range(k)])  # (K, L, 3): l_j in the common frame
    out = []
    for i in range(k):
        field = disp[i : i + 1]  # one field, sampled at each set's points in turn (an expanded
        out.append(torch.cat([map_points(common[j : j + 1], field) for j in range(k)]))  # batch would copy it K times
    return torch.stack(out, dim=0)  # [i, j]: set j in image i


def landmark_distances(landmarks, disp=None, inverse_disp=None, spacing=(1.0, 1.0, 1.0), mapped=None) -> np.ndarray:
    """Distances ``‖φ_i(φ_j⁻¹(l_j)) − l_i‖`` in mm for all ordered pairs ``i ≠ j``.

    Args:
        landmarks: ``(K, L, 3)`` voxel coordinates; disp / inverse_disp: ``(K, 3, D, H, W)`` voxels,
            or None for the identity (no registration).
        spacing: voxel size in mm along the array axes.
        mapped: instead of the fields, :func:`map_landmarks`' ``(K, K, L, 3)`` voxel coordinates (e.g.
            assembled one timepoint's maps at a time).
    Returns:
        ``(K*(K-1), L)`` array of distances in mm, pairs in row-major order (i, j), i ≠ j.
    """
    spacing = torch.tensor(check_spacing(spacing), dtype=torch.float64)
    lm = torch.as_tensor(np.asarray(landmarks, dtype=np.float64))
    k = lm.shape[0] if lm.dim() == 3 else 0
    if lm.dim() != 3 or lm.shape[-1] != 3 or k < 2:
        raise InputError(f"landmarks: expected (K >= 2, L, 3) voxel coordinates, got {tuple(lm.shape)}")
    if mapped is not None:
        mapped = torch.as_tensor(mapped, dtype=torch.float64)
        if mapped.shape != (k, *lm.shape):
            raise InputError(f"mapped: expected (K, K, L, 3) = {(k, *lm.shape)}, got {tuple(mapped.shape)}")
    elif disp is None:
        mapped = lm[None, :].expand(k, k, *lm.shape[1:])
    else:
        mapped = map_landmarks(lm, torch.as_tensor(disp), torch.as_tensor(inverse_disp))  # float64 (lm's), per timepoint
    diff = (mapped - lm[:, None]) * spacing  # [i, j] - l_i
    dist = diff.norm(dim=-1)  # (K, K, L)
    rows = [dist[i, j] for i in range(k) for j in range(k) if i != j]
    return torch.stack(rows).numpy()


def summarize_distances(distances: np.ndarray) -> dict:
    """Mean ± sd, median and 95th percentile (mm) over all pairs and landmarks:
    ``{"mean_mm", "sd_mm", "median_mm", "p95_mm", "n"}``."""
    d = np.asarray(distances, dtype=np.float64).ravel()
    return {"mean_mm": float(d.mean()), "sd_mm": float(d.std()), "median_mm": float(np.median(d)),
            "p95_mm": float(np.percentile(d, 95)), "n": int(d.size)}


def folding_percent(jacobian) -> float:
    """Percentage of voxels with ``det J <= 0`` (any shape)."""
    j = torch.as_tensor(jacobian)
    return 100.0 * int(torch.count_nonzero(j <= 0)) / max(1, j.numel())  # a count: no float copy of the grid


def pairwise_rmse(images) -> float:
    """Root mean square intensity difference averaged over ordered pairs i ≠ j. ``images``: ``(K, ...)``."""
    x = torch.as_tensor(images, dtype=torch.float64)
    k = x.shape[0]
    vals = [((x[i] - x[j]) ** 2).mean().sqrt() for i in range(k) for j in range(k) if i != j]
    return float(torch.stack(vals).mean())


def landmark_report(landmarks, disp=None, inverse_disp=None, spacing=(1.0, 1.0, 1.0), mapped=None) -> dict:
    """The landmark summary used everywhere (register's summary.json, evaluation tables, the demo):
    distance before (identity) and after a registration, each ``{"mean_mm", "sd_mm", "n"}`` over all
    ordered pairs i ≠ j and landmarks.

    Args:
        landmarks: ``(K, L, 3)`` 0-based voxel coordinates; disp, inverse_disp: ``(K, 3, D, H, W)``
            ``φ_k − Id`` and ``φ_k⁻¹ − Id`` in voxels (None: only the identity row);
        spacing: voxel size in mm along the array axes;
        mapped: the registered landmarks as :func:`landmark_distances` takes them, instead of the fields.
    Returns:
        ``{"identity": {...}, "registered": {...}}`` (``registered`` only with fields).
    """
    report = {"identity": summarize_distances(landmark_distances(landmarks, spacing=spacing))}
    if disp is not None or mapped is not None:
        report["registered"] = summarize_distances(landmark_distances(landmarks, disp, inverse_disp, spacing, mapped))
    return report
