"""File I/O: NIfTI groups in, registration outputs out (the only module that touches nibabel).

Outputs are written atomically (temporary file + rename), never over an input file, and only
after every output has been computed, so a failure leaves no partial results.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy.ndimage import affine_transform

from .checks import InputError

__all__ = ["Volume", "load_volume", "load_group", "save_nifti", "write_json", "atomic_write_text", "atomic_write",
           "load_displacement", "write_registration", "displacement_to_world"]


@dataclass
class Volume:
    """A 3D image: ``data`` (D, H, W) float32 in array axis order, ``affine`` 4x4 voxel->world (mm)."""

    data: np.ndarray
    affine: np.ndarray
    path: str = ""

    @property
    def spacing(self) -> tuple:
        """Voxel size in mm along the array axes (column norms of the affine)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))


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
        same_grid = v.data.shape == ref.data.shape and np.allclose(v.affine, ref.affine, atol=1e-4)
        if same_grid:
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


def atomic_write(path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``
    (atomic on one filesystem); the temporary file is removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_nifti(path, data: np.ndarray, affine: np.ndarray, intent: str | None = None) -> None:
    """Write ``data`` with ``affine`` to ``path`` atomically (temporary file + rename)."""
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    if intent:
        img.header.set_intent(intent)
    img.header.set_xyzt_units("mm")
    atomic_write(path, lambda tmp: nib.save(img, tmp))


def atomic_write_text(path, text: str) -> None:
    """Write a text file atomically (temporary file + rename)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path, obj) -> None:
    """Write JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


def displacement_to_world(disp_vox: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel displacement ``(3, D, H, W)`` -> world displacement in mm ``(D, H, W, 3)``: ``A[:3,:3] @ u``."""
    return np.einsum("rc,c...->...r", affine[:3, :3], disp_vox)


def load_displacement(path, affine: np.ndarray) -> np.ndarray:
    """Read a ``displacement_<k>.nii.gz`` written by :func:`write_registration` (world mm,
    (X, Y, Z, 1, 3)) back to voxels ``(3, D, H, W)``: the inverse of :func:`displacement_to_world`."""
    path = str(path)
    try:
        world = np.asarray(nib.load(path).dataobj, dtype=np.float64)
    except Exception as exc:
        raise InputError(f"{path}: cannot read as a displacement field ({type(exc).__name__}: {exc})") from exc
    if world.ndim != 5 or world.shape[3:] != (1, 3):
        raise InputError(f"{path}: expected a displacement field of shape (X, Y, Z, 1, 3), got {world.shape}")
    return np.einsum("rc,...c->r...", np.linalg.inv(affine[:3, :3]), world[..., 0, :])


def write_registration(result, out_dir, affine: np.ndarray, input_paths: Sequence = ()) -> list:
    """Write a :class:`~groupmorph_pyro.registration.RegistrationResult` to ``out_dir``.

    Files (k = 0-based timepoint, in input order): ``warped_<k>.nii.gz`` (input intensities in the
    common frame), ``displacement_<k>.nii.gz`` (``φ_k − Id`` in world mm, shape (X, Y, Z, 1, 3),
    NIfTI intent "vector": ``d = A[:3,:3] @ u_vox``), ``jacobian_<k>.nii.gz`` (``det Jφ_k``) and
    ``summary.json``; with posterior samples also ``displacement_std_mm_<k>``, ``warped_std_<k>``,
    ``folding_probability_<k>`` (.nii.gz), ``uncertainty_<k>.png``, ``posterior.nc`` (arviz) and,
    with landmarks, ``landmarks_posterior.json``. Refuses to write over any input file. Returns the
    written paths.
    """
    out_dir = Path(out_dir)
    k = result.warped.shape[0]
    plan = []
    for i in range(k):
        world = displacement_to_world(result.displacement[i], affine)[..., None, :]
        plan += [
            (out_dir / f"warped_{i}.nii.gz", result.warped[i], None),
            (out_dir / f"displacement_{i}.nii.gz", world, "vector"),
            (out_dir / f"jacobian_{i}.nii.gz", result.jacobian[i], None),
        ]
    extra = []
    if getattr(result, "uncertainty", None):
        for name, maps in result.uncertainty.items():
            plan += [(out_dir / f"{name}_{i}.nii.gz", maps[i], None) for i in range(k)]
        extra += [out_dir / f"uncertainty_{i}.png" for i in range(k)]
    if getattr(result, "inference_data", None) is not None:
        extra.append(out_dir / "posterior.nc")
    if getattr(result, "landmark_posterior", None):
        extra.append(out_dir / "landmarks_posterior.json")
    inputs = {Path(p).resolve() for p in input_paths}
    targets = [p for p, _, _ in plan] + extra + [out_dir / "summary.json"]
    clash = [str(p) for p in targets if p.resolve() in inputs]
    if clash:
        raise InputError(f"refusing to overwrite input file(s) {clash}: choose another --out")
    for path, data, intent in plan:
        save_nifti(path, data, affine, intent)
    if getattr(result, "uncertainty", None):
        from .plots import uncertainty_figure

        for i in range(k):
            uncertainty_figure(out_dir / f"uncertainty_{i}.png", result.warped[i],
                               result.uncertainty["displacement_std_mm"][i], result.jacobian[i], title=f"timepoint {i}")
    if getattr(result, "inference_data", None) is not None:
        from .posterior import save_inference_data

        save_inference_data(result.inference_data, out_dir / "posterior.nc")
    if getattr(result, "landmark_posterior", None):
        lp = result.landmark_posterior
        write_json(out_dir / "landmarks_posterior.json", {
            "frame": "common frame (fixed image in all-to-one mode), world mm",
            "mean_mm": np.asarray(lp["mean_mm"]).tolist(), "cov_mm2": np.asarray(lp["cov_mm2"]).tolist()})
    summary = dict(result.summary)
    if input_paths:
        summary["inputs"] = [str(Path(p).resolve()) for p in input_paths]
    write_json(out_dir / "summary.json", summary)
    return [str(p) for p in targets]
