"""Apply a stored registration to other data: images, label maps and points, between any two timepoints.

Reads a ``groupmorph register`` output folder (:func:`~groupmorph_pyro.outputs.write_registration`):
the maps ``φ_k`` (``displacement_<k>.nii.gz``) and their inverses (``inverse_displacement_<k>.nii.gz``).
``φ_k`` carries a point of the common frame to the matching point of image k (``warped_k = x_k ∘ φ_k``);
in all-to-one mode the common frame is the fixed image's frame. Every timepoint lives on the group's
grid (the first input's grid with ``register --resample``). Moving data from timepoint I to J:

* an image (or label map) on I's grid gives one on J's grid by resampling (pull-back)::

      out(q) = img(φ_I(φ_J⁻¹(q)))        q a voxel of J's grid

* points of I go to J by the forward map (push-forward): ``p ↦ φ_J(φ_I⁻¹(p))``.

``"common"`` may stand for I or J: its map is the identity. Points are 0-based voxel coordinates in
array axis order unless a file format says otherwise (DIR-Lab text: 1-based ``x y z`` voxel
indices; CSV: world mm columns ``x, y, z`` along the NIfTI (RAS) axes).
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from scipy.ndimage import map_coordinates

from .checks import InputError
from .data import read_landmarks, write_landmarks
from .files import atomic_write_text
from .outputs import check_outputs, output_paths, read_summary
from .spatial import compose, identity_grid, map_points, warp
from .volumes import load_displacement, load_volume, read_grid, same_grid, save_nifti

__all__ = ["StoredRegistration", "load_registration", "transfer_field", "transfer_image", "transfer_labels",
           "transfer_points", "apply_registration", "apply_to_file", "check_frame", "check_frames", "largest_weight_labels",
           "read_csv_points", "label_dtype", "Frame",
           "between_frames", "check_label_map", "voxels_to_world", "check_new_outputs",
           "IMAGE_INTERPOLATIONS", "LABEL_INTERPOLATIONS"]

Frame = Union[int, str]
IMAGE_INTERPOLATIONS = ("linear", "bspline", "nearest")
LABEL_INTERPOLATIONS = ("linear", "nearest")
"""Label maps: ``linear`` = each label's indicator resampled trilinearly, then the label of largest
weight per voxel (smooth boundaries, no new label values); ``nearest`` = nearest neighbour."""


@dataclass
class StoredRegistration:
    """The maps of a registration output folder.

    Attributes:
        folder: where they were read from.
        affine: 4x4 voxel -> world (mm, NIfTI RAS) of the group's grid (every timepoint and the common frame).
        displacement: ``(K, 3, D, H, W)`` float64 ``φ_k − Id`` in voxels (array axis order).
        inverse_displacement: ``(K, 3, D, H, W)`` float64 ``φ_k⁻¹ − Id`` in voxels.
        mode: ``"all-to-one"`` or ``"all-moving"`` (None when summary.json does not say); fixed: the
            fixed timepoint in all-to-one mode.
    """

    folder: str
    affine: np.ndarray
    displacement: np.ndarray
    inverse_displacement: np.ndarray
    mode: str | None = None
    fixed: int | None = None

    @property
    def num_timepoints(self) -> int:
        return int(self.displacement.shape[0])

    @property
    def shape(self) -> tuple:
        """``(D, H, W)`` of the group's grid."""
        return tuple(self.displacement.shape[2:])


def load_registration(folder) -> StoredRegistration:
    """Read the maps and inverse maps of a ``groupmorph register`` output folder.

    Fails with one line when the folder is not a registration output, lacks a timepoint's files, or
    was written before the inverse maps were stored (``summary.json`` without ``outputs_version``).
    """
    folder = Path(folder)
    summary = read_summary(folder)
    k = 0
    while (folder / f"displacement_{k}.nii.gz").is_file():
        k += 1
    if k < 2:
        raise InputError(f"{folder}: not a registration output folder (expected displacement_0.nii.gz, "
                         f"displacement_1.nii.gz, ...; found {k})")
    if not (folder / "inverse_displacement_0.nii.gz").is_file():
        raise InputError(f"{folder}: written by an older groupmorph_pyro without the inverse maps "
                         f"(no inverse_displacement_<k>.nii.gz): run groupmorph register again")
    missing = [str(p.name) for p in output_paths(folder, k, itk=False) if not p.is_file()]
    if missing:
        raise InputError(f"{folder}: incomplete registration output, missing {missing}")
    shape, affine = read_grid(folder / "displacement_0.nii.gz")
    disp = np.stack([load_displacement(folder / f"displacement_{i}.nii.gz", affine) for i in range(k)])
    inv = np.stack([load_displacement(folder / f"inverse_displacement_{i}.nii.gz", affine) for i in range(k)])
    if disp.shape[2:] != shape or inv.shape != disp.shape:
        raise InputError(f"{folder}: fields disagree in shape: {disp.shape} and {inv.shape}")
    fixed = summary.get("fixed")
    return StoredRegistration(str(folder), affine, disp, inv, summary.get("mode"),
                              None if fixed is None else int(fixed))


def check_frame(reg: StoredRegistration, value, name: str) -> Frame:
    """A timepoint index in ``[0, K)`` or ``"common"`` (strings of digits are indices)."""
    if isinstance(value, str):
        if value.strip().lower() == "common":
            return "common"
        if value.strip().lstrip("-").isdigit():
            value = int(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < reg.num_timepoints:
        return int(value)
    raise InputError(f"{name}: expected a timepoint 0..{reg.num_timepoints - 1} or 'common', got {value!r}")


def check_frames(reg: StoredRegistration, source, target) -> tuple[Frame, Frame]:
    """:func:`check_frame` of a source (``--from``) and a target (``--to``) frame."""
    return check_frame(reg, source, "source (--from)"), check_frame(reg, target, "target (--to)")


def _field(reg: StoredRegistration, k: Frame, inverse: bool) -> torch.Tensor | None:
    """``(1, 3, D, H, W)`` float64 ``φ_k − Id`` (or ``φ_k⁻¹ − Id``); None for the common frame (identity)."""
    if k == "common":
        return None
    return torch.from_numpy(reg.inverse_displacement[k] if inverse else reg.displacement[k])[None]


def between_frames(outer: torch.Tensor | None, inner: torch.Tensor | None, shape, dtype=torch.float64) -> torch.Tensor:
    """``φ_source ∘ φ_target⁻¹ − Id`` ``(1, 3, D, H, W)`` from ``outer`` (``φ_source − Id``) and ``inner``
    (``φ_target⁻¹ − Id``), each ``(1, 3, D, H, W)`` or None for the common frame's identity (zeros of
    ``dtype`` on ``shape`` when both are)."""
    if outer is None and inner is None:
        return torch.zeros((1, 3, *shape), dtype=dtype)
    if outer is None or inner is None:
        return inner if outer is None else outer
    return compose(outer, inner)


def transfer_field(reg: StoredRegistration, source: Frame, target: Frame) -> np.ndarray:
    """The resampling field that moves data on ``source``'s grid to ``target``'s grid.

    Returns:
        ``(3, D, H, W)`` float64 displacement ``u`` in voxels on the target grid with
        ``out(q) = img(q + u(q))``, i.e. ``q + u(q) = φ_source(φ_target⁻¹(q))``.
    """
    source, target = check_frames(reg, source, target)
    return between_frames(_field(reg, source, inverse=False), _field(reg, target, inverse=True), reg.shape)[0].numpy()


def _check_on_grid(name: str, volume: np.ndarray, reg: StoredRegistration) -> np.ndarray:
    volume = np.asarray(volume)
    if volume.shape != reg.shape:
        raise InputError(f"{name}: expected an array on the registration's grid {reg.shape}, got shape {volume.shape}")
    if not np.isfinite(volume).all():
        raise InputError(f"{name}: expected finite values, got {int((~np.isfinite(volume)).sum())} NaN/inf voxels")
    return volume


def _resample(volume: np.ndarray, field: np.ndarray, mode: str) -> np.ndarray:
    """``volume(q + field(q))`` on the grid; ``mode`` ``linear`` / ``nearest`` (via
    :func:`~groupmorph_pyro.spatial.warp`) or ``bspline`` (cubic B-spline); the border value extends outside."""
    if mode == "bspline":
        coords = identity_grid(volume.shape, dtype=torch.float64).numpy() + field
        return map_coordinates(volume.astype(np.float64), coords, order=3, mode="nearest")
    x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float64))[None, None]
    u = torch.from_numpy(field)[None]
    return warp(x, u, mode="bilinear" if mode == "linear" else "nearest")[0, 0].numpy()


def transfer_image(image: np.ndarray, reg: StoredRegistration, source: Frame, target: Frame,
                   interpolation: str = "linear") -> np.ndarray:
    """Move an image on ``source``'s grid to ``target``'s grid (``out = img ∘ φ_source ∘ φ_target⁻¹``).

    Args:
        image: ``(D, H, W)`` intensities on the registration's grid.
        interpolation: ``linear`` (trilinear, as ``warped_<k>``), ``bspline`` (cubic) or ``nearest``.
    Returns:
        ``(D, H, W)`` float32 on the target grid.
    """
    if interpolation not in IMAGE_INTERPOLATIONS:
        raise InputError(f"interpolation: expected one of {IMAGE_INTERPOLATIONS}, got {interpolation!r}")
    image = _check_on_grid("image", image, reg)
    return _resample(image, transfer_field(reg, source, target), interpolation).astype(np.float32)


def label_dtype(values: np.ndarray):
    """The smallest integer type holding every label value."""
    lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
    for dtype in (np.uint8, np.int16, np.int32):
        if np.iinfo(dtype).min <= lo and hi <= np.iinfo(dtype).max:
            return dtype
    return np.int64


def check_label_map(labels: np.ndarray, reg: StoredRegistration) -> np.ndarray:
    """A label map on the registration's grid with finite, integer values (returned as an array)."""
    labels = _check_on_grid("labels", labels, reg)
    if not np.array_equal(labels, np.round(labels)):
        bad = labels[labels != np.round(labels)]
        raise InputError(f"labels: expected integer label values, got {bad.size} non-integer voxels (e.g. {bad.flat[0]:.4g}); "
                         f"use --image for intensities")
    return labels


def transfer_labels(labels: np.ndarray, reg: StoredRegistration, source: Frame, target: Frame,
                    interpolation: str = "linear") -> np.ndarray:
    """Move a label map on ``source``'s grid to ``target``'s grid; labels stay labels.

    Args:
        labels: ``(D, H, W)`` integer-valued label map on the registration's grid.
        interpolation: ``linear``: every label's indicator is resampled trilinearly and each voxel takes
            the label of largest weight (ties: the smaller label); ``nearest``: nearest neighbour.
    Returns:
        ``(D, H, W)`` labels (the smallest integer dtype that holds them); only values present in
        ``labels`` occur (a label thinner than a voxel may vanish).
    """
    if interpolation not in LABEL_INTERPOLATIONS:
        raise InputError(f"labels: interpolation must be one of {LABEL_INTERPOLATIONS}, got {interpolation!r}")
    labels = check_label_map(labels, reg)
    values = np.unique(labels)
    field = transfer_field(reg, source, target)
    if interpolation == "nearest":
        out = _resample(labels.astype(np.float64), field, "nearest")
    else:
        out = values[largest_weight_labels(labels, values, field)]
    return np.round(out).astype(label_dtype(values))


def largest_weight_labels(labels: np.ndarray, values, field: np.ndarray) -> np.ndarray:
    """Where a label map lands under a resampling field, labels kept as labels: every label's
    indicator resampled trilinearly (``img(q + field(q))``), each voxel taking the label of largest
    weight, ties to the earlier of ``values``.

    Args:
        labels: ``(D, H, W)`` label map; values: its label values, ascending; field: ``(3, D, H, W)``
            float64 displacement (voxels), as :func:`transfer_field`.
    Returns:
        ``(D, H, W)`` int64 index into ``values`` at every voxel.
    """
    best = np.full(labels.shape, -1.0)
    out = np.zeros(labels.shape, np.int64)
    for i, value in enumerate(values):  # one indicator at a time: memory of two volumes, not one per label
        weight = _resample((labels == value).astype(np.float64), field, "linear")
        better = weight > best
        out[better], best[better] = i, weight[better]
    return out


def _check_near_grid(points: np.ndarray, shape) -> None:
    """Points may leave the grid by up to half its size per axis (motion carries border points out;
    the maps continue with their border values there); farther out means wrong units or axes."""
    n = np.asarray(shape, dtype=np.float64)
    bad = np.where(((points < -0.5 * n) | (points > 1.5 * n - 1)).any(axis=1))[0]
    if len(bad):
        i = int(bad[0])
        raise InputError(f"points: {len(bad)} point(s) far outside the grid of size {tuple(shape)} (more than half its "
                         f"size beyond a border; wrong units or axes?), first #{i + 1} at 0-based voxel "
                         f"({', '.join(f'{x:.4g}' for x in points[i])})")


def transfer_points(points: np.ndarray, reg: StoredRegistration, source: Frame, target: Frame) -> np.ndarray:
    """Map points of ``source`` to ``target``: ``p ↦ φ_target(φ_source⁻¹(p))``.

    Args:
        points: ``(L, 3)`` 0-based voxel coordinates (array axis order), inside the grid or less than
            half its size outside (the maps continue with their border values there).
    Returns:
        ``(L, 3)`` float64 voxel coordinates in the target frame (each map interpolated trilinearly).
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise InputError(f"points: expected (L, 3) voxel coordinates, got shape {pts.shape}")
    if not np.isfinite(pts).all():
        raise InputError("points: expected finite coordinates, got NaN/inf")
    _check_near_grid(pts, reg.shape)
    source, target = check_frames(reg, source, target)
    p = torch.from_numpy(pts)[None]
    inverse, forward = _field(reg, source, inverse=True), _field(reg, target, inverse=False)
    if inverse is not None:
        p = map_points(p, inverse)
    if forward is not None:
        p = map_points(p, forward)
    return p[0].numpy()


def apply_registration(registration, source: Frame, target: Frame, *, image=None, labels=None, points=None,
                       interpolation: str = "linear") -> np.ndarray:
    """Apply a registration to one image, label map or point set (arrays), from ``source`` to ``target``.

    Args:
        registration: a :class:`StoredRegistration` or a ``groupmorph register`` output folder.
        source, target: timepoint indices (0-based) or ``"common"``.
        image / labels / points: exactly one; see :func:`transfer_image`, :func:`transfer_labels`,
            :func:`transfer_points`.
        interpolation: for images (``linear``, ``bspline``, ``nearest``) and labels (``linear``, ``nearest``).
    Returns:
        the moved image ``(D, H, W)`` float32, label map ``(D, H, W)`` integers or points ``(L, 3)`` voxels.
    """
    given = [name for name, v in (("image", image), ("labels", labels), ("points", points)) if v is not None]
    if len(given) != 1:
        raise InputError(f"apply_registration: expected exactly one of image, labels, points, got {given or 'none'}")
    reg = registration if isinstance(registration, StoredRegistration) else load_registration(registration)
    if image is not None:
        return transfer_image(image, reg, source, target, interpolation)
    if labels is not None:
        return transfer_labels(labels, reg, source, target, interpolation)
    return transfer_points(points, reg, source, target)


# ---- files -----------------------------------------------------------------------------------------

def _volume_on_grid(path, reg: StoredRegistration, source: Frame) -> np.ndarray:
    vol = load_volume(path)
    if not same_grid(vol.data.shape, vol.affine, reg.shape, reg.affine):
        where = "the common frame" if source == "common" else f"timepoint {source}"
        raise InputError(f"{path}: grid differs from {where}'s (shape {vol.data.shape} vs {reg.shape}, affine "
                         f"{'equal' if np.allclose(vol.affine, reg.affine, atol=1e-4) else 'different'}); "
                         f"expected an image on the grid of {Path(reg.folder) / 'warped_0.nii.gz'}")
    return vol.data


def read_csv_points(path, reg: StoredRegistration) -> tuple[list, list, np.ndarray]:
    """``(header, rows, (L, 3) voxel coordinates)`` of a CSV with world-mm columns x, y, z (RAS)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise InputError(f"{path}: cannot read points ({exc.strerror})") from exc
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None) or []
    names = [h.strip().lower() for h in header]
    if not all(c in names for c in "xyz"):
        raise InputError(f"{path}: expected a CSV header with columns x, y, z (world mm, RAS), got {header}")
    cols = [names.index(c) for c in "xyz"]
    rows, world = [], []
    for no, row in enumerate(reader, 2):
        if not any(cell.strip() for cell in row):
            continue
        try:
            world.append([float(row[c]) for c in cols])
        except (ValueError, IndexError) as exc:
            raise InputError(f"{path}:{no}: expected numbers in columns x, y, z, got {row}") from exc
        rows.append(row)
    if not rows:
        raise InputError(f"{path}: no points found")
    world = np.asarray(world)
    vox = (np.linalg.inv(reg.affine) @ np.c_[world, np.ones(len(world))].T)[:3].T
    return header, rows, vox


def voxels_to_world(affine: np.ndarray, vox: np.ndarray) -> np.ndarray:
    """``(L, 3)`` 0-based voxel coordinates -> ``(L, 3)`` world mm (NIfTI RAS) under the 4x4 ``affine``."""
    return (affine @ np.c_[vox, np.ones(len(vox))].T)[:3].T


def _write_csv_points(path, header: list, rows: list, vox: np.ndarray, affine: np.ndarray) -> None:
    world = voxels_to_world(affine, vox)
    cols = [[h.strip().lower() for h in header].index(c) for c in "xyz"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row, p in zip(rows, world):
        row = list(row)
        for c, v in zip(cols, p):
            row[c] = f"{v:.6f}"
        writer.writerow(row)
    atomic_write_text(path, buf.getvalue())


def check_new_outputs(reg: StoredRegistration, targets, inputs=()) -> None:
    """Refuse (before any work) output paths that are one of ``inputs`` or a file of the registration folder."""
    folder = Path(reg.folder)
    protected = [*inputs, *output_paths(folder, reg.num_timepoints), *[p for p in folder.glob("*") if p.is_file()]]
    check_outputs(targets, protected)


def apply_to_file(registration_dir, source: Frame, target: Frame, out, *, image=None, labels=None, points=None,
                  interpolation: str = "linear") -> Path:
    """:func:`apply_registration` on files; what ``groupmorph apply`` runs.

    Args:
        registration_dir: a ``groupmorph register`` output folder.
        image / labels: a NIfTI file on ``source``'s grid (the registration's grid), written to ``out``
            as NIfTI on the target grid (labels as integers). points: DIR-Lab text (1-based voxel
            ``x y z``) or ``.csv`` with world-mm columns x, y, z (other columns are kept), written to
            ``out`` in the same format.
        out: the output file; never one of the inputs or of the registration's files.
    Returns:
        ``out``. Everything is checked before anything is written; the write is atomic.
    """
    given = [(name, v) for name, v in (("image", image), ("labels", labels), ("points", points)) if v is not None]
    if len(given) != 1:
        raise InputError(f"expected exactly one of --image, --labels, --points, got {[n for n, _ in given] or 'none'}")
    kind, path = given[0]
    reg = load_registration(registration_dir)
    source, target = check_frames(reg, source, target)
    check_new_outputs(reg, [out], [path])
    out = Path(out)
    if kind == "points":
        if Path(path).suffix.lower() == ".csv":
            header, rows, vox = read_csv_points(path, reg)
            moved = transfer_points(vox, reg, source, target)
            _write_csv_points(out, header, rows, moved, reg.affine)
        else:
            moved = transfer_points(read_landmarks(path), reg, source, target)
            write_landmarks(out, moved)
        return out
    data = _volume_on_grid(path, reg, source)
    if kind == "image":
        save_nifti(out, transfer_image(data, reg, source, target, interpolation), reg.affine)
    else:
        moved = transfer_labels(data, reg, source, target, interpolation)
        save_nifti(out, moved, reg.affine, dtype=moved.dtype)
    return out

