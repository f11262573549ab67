"""Image volumes on disk: NIfTI (any nibabel format) in and out; the only module that imports nibabel.

Volumes are read into float32 arrays in the file's array axis order with their voxel -> world
affine (no reorientation); writes are atomic (:mod:`groupmorph_pyro.files`).
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from typing import Sequence

import nibabel as nib
import numpy as np
from nibabel.fileholders import FileHolder
from scipy.ndimage import affine_transform

from .checks import InputError
from .files import atomic_write

__all__ = ["Volume", "affine_spacing", "load_volume", "load_group", "save_nifti", "load_displacement",
           "read_world_displacement",
           "displacement_to_world", "displacement_to_itk", "same_grid", "read_grid", "RAS_TO_LPS", "GZIP_LEVEL"]

GZIP_LEVEL = 0
"""zlib level of the ``.nii.gz`` files :func:`save_nifti` writes: 0 stores the volume uncompressed
inside the gzip stream (written at disk speed; float32 fields and images compress little)."""
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
"""World coordinates: NIfTI's RAS+ (nibabel, this package) -> ITK's LPS+ (ITK, SimpleITK, ANTs, Slicer)."""


def affine_spacing(affine) -> tuple:
    """Voxel size in mm along the array axes of a 4x4 voxel -> world matrix (its column norms)."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0))


@dataclass
class Volume:
    """A 3D image: ``data`` (D, H, W) float32 in array axis order, ``affine`` 4x4 voxel->world (mm)."""

    data: np.ndarray
    affine: np.ndarray
    path: str = ""

    @property
    def spacing(self) -> tuple:
        """Voxel size in mm along the array axes (column norms of the affine)."""
        return affine_spacing(self.affine)


def load_volume(path) -> Volume:
    """Read one 3D NIfTI (or any nibabel format). Errors name the file and the problem."""
    path = str(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"{path}: cannot read as an image ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        hint = " (a 4D series: split it into one 3D file per timepoint)" if data.ndim == 4 else ""
        raise InputError(f"{path}: expected a 3D volume, got shape {data.shape}{hint}")
    data = data.astype(np.float32)
    if not np.isfinite(data).all():
        raise InputError(f"{path}: expected finite intensities, got {int((~np.isfinite(data)).sum())} NaN/inf voxels")
    return Volume(data, np.asarray(img.affine, dtype=np.float64), path)


def read_grid(path) -> tuple[tuple, np.ndarray]:
    """``(spatial shape (3 ints), affine 4x4)`` of an image or field file, from its header only."""
    path = str(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    try:
        img = nib.load(path)
    except Exception as exc:
        raise InputError(f"{path}: cannot read as an image ({type(exc).__name__}: {exc})") from exc
    return tuple(int(n) for n in img.shape[:3]), np.asarray(img.affine, dtype=np.float64)


def _resample_to(vol: Volume, shape, affine) -> np.ndarray:
    """Trilinearly resample ``vol`` onto the grid (shape, affine); outside values = 0."""
    vox_to_vox = np.linalg.inv(vol.affine) @ affine
    return affine_transform(vol.data, vox_to_vox[:3, :3], vox_to_vox[:3, 3], output_shape=tuple(shape), order=1)


def load_group(paths: Sequence, resample: bool = False) -> tuple[np.ndarray, np.ndarray, list]:
    """Read K >= 2 volumes on one grid.

    Args:
        paths: K image files.
        resample: resample every image onto the first one's grid instead of failing on a mismatch.
    Returns:
        ``(images (K, D, H, W) float32, affine 4x4, [Volume, ...])``.
    """
    if len(paths) < 2:
        raise InputError(f"expected at least 2 images (K >= 2), got {len(paths)}")
    vols = [load_volume(p) for p in paths]
    ref = vols[0]
    for v in vols[1:]:
        if same_grid(v.data.shape, v.affine, ref.data.shape, ref.affine):
            continue
        if not resample:
            raise InputError(
                f"{v.path}: grid differs from {ref.path} (shape {v.data.shape} vs {ref.data.shape}, "
                f"affine {'equal' if np.allclose(v.affine, ref.affine, atol=1e-4) else 'different'}); "
                f"pass --resample to resample onto the first image's grid"
            )
        v.data = _resample_to(v, ref.data.shape, ref.affine).astype(np.float32)
        v.affine = ref.affine
    return np.stack([v.data for v in vols]), ref.affine, vols


def same_grid(shape_a, affine_a, shape_b, affine_b, atol: float = 1e-4) -> bool:
    """Whether two grids are the same: equal array shape and voxel -> world affines within ``atol`` mm."""
    return tuple(shape_a) == tuple(shape_b) and np.allclose(affine_a, affine_b, atol=atol)


def save_nifti(path, data: np.ndarray, affine: np.ndarray, intent: str | None = None, dtype=np.float32) -> None:
    """Write ``data`` (as ``dtype``, float32 by default) with ``affine`` to ``path`` atomically
    (temporary file + rename). The array is laid out in Fortran order first, the order NIfTI stores,
    so nibabel writes it without a strided copy per block. A ``.gz`` path is a gzip stream of
    level :data:`GZIP_LEVEL` (stored blocks: every NIfTI reader opens it)."""
    img = nib.Nifti1Image(np.asfortranarray(data, dtype=dtype), affine)
    if intent:
        img.header.set_intent(intent)
    img.header.set_xyzt_units("mm")

    def write(tmp) -> None:
        if not str(tmp).endswith(".gz"):
            nib.save(img, tmp)
            return
        with gzip.GzipFile(tmp, "wb", compresslevel=GZIP_LEVEL, mtime=0) as fh:
            img.to_file_map({"image": FileHolder(fileobj=fh)})

    atomic_write(path, write)


def displacement_to_world(disp_vox: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel displacement ``(3, D, H, W)`` -> world displacement in mm ``(D, H, W, 3)``: ``A[:3,:3] @ u``,
    in the displacement's floating dtype (float32 fields stay float32)."""
    disp_vox = np.asarray(disp_vox)
    dtype = disp_vox.dtype if np.issubdtype(disp_vox.dtype, np.floating) else np.float64
    return np.einsum("rc,c...->...r", np.asarray(affine, dtype=np.float64)[:3, :3].astype(dtype), disp_vox)


def displacement_to_itk(disp_vox: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel displacement ``(3, D, H, W)`` -> ITK displacement in LPS mm ``(D, H, W, 1, 3)``.

    This is the layout ITK's NIfTI reader turns into a vector image when the file's intent is
    "vector" (ITK then keeps the components as they are; it converts only the grid to LPS), i.e.
    what ``itk::DisplacementFieldTransform`` (SimpleITK, ANTs, Slicer) expects: ``T(x) = x + d(x)``
    with ``x`` and ``d`` in physical LPS millimetres. Components: ``d_LPS = diag(-1, -1, 1) A[:3,:3] u``.
    """
    lps = np.eye(4)
    lps[:3, :3] = RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)[:3, :3]  # one pass over the field
    return displacement_to_world(disp_vox, lps)[..., None, :]


def read_world_displacement(path, dtype=np.float64) -> np.ndarray:
    """A ``displacement_<k>.nii.gz`` written by :func:`~groupmorph_pyro.outputs.write_registration` as stored:
    world mm along the NIfTI (RAS) axes, ``(X, Y, Z, 3)`` in ``dtype``."""
    path = str(path)
    try:
        world = np.asarray(nib.load(path).dataobj, dtype=dtype)
    except Exception as exc:
        raise InputError(f"{path}: cannot read as a displacement field ({type(exc).__name__}: {exc})") from exc
    if world.ndim != 5 or world.shape[3:] != (1, 3):
        raise InputError(f"{path}: expected a displacement field of shape (X, Y, Z, 1, 3), got {world.shape}")
    return world[..., 0, :]


def load_displacement(path, affine: np.ndarray) -> np.ndarray:
    """Read a ``displacement_<k>.nii.gz`` written by :func:`~groupmorph_pyro.outputs.write_registration` (world mm,
    (X, Y, Z, 1, 3)) back to voxels ``(3, D, H, W)``: the inverse of :func:`displacement_to_world`."""
    return np.einsum("rc,...c->r...", np.linalg.inv(affine[:3, :3]), read_world_displacement(path))
