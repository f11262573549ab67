"""What 4DCT and breast DCE users derive from a stored registration: point trajectories over the
timepoints, ventilation (local volume change) between two timepoints, the mid-position image, and
enhancement curves per region with subtraction images.

Everything reads the maps of a ``groupmorph register`` output folder
(:class:`~groupmorph_pyro.transfer.StoredRegistration`) with the conventions of
:mod:`groupmorph_pyro.transfer`: ``φ_k`` carries a point of the common frame to the matching point of
timepoint k, points of timepoint I go to J by ``φ_J ∘ φ_I⁻¹``, and every timepoint lives on the
group's grid. Points are 0-based voxel coordinates in array axis order.

The array functions (:func:`trajectory`, :func:`ventilation`, :func:`midposition`, :func:`curves`)
come first; the file functions the CLI runs (``write_*``) check every input before they write
anything, and write atomically.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .checks import InputError
from .data import read_landmarks
from .files import atomic_write_text, write_json
from .outputs import load_posterior_state, read_summary
from .plots import curves_figure, slices_figure
from .posterior import draw_latents, state_transform
from .spatial import compose, invert_displacement, jacobian_determinant, map_points, warp
from .transfer import (Frame, StoredRegistration, between_frames, check_frame, check_frames, check_label_map,
                       check_new_outputs, label_dtype, largest_weight_labels, load_registration, read_csv_points,
                       transfer_field, transfer_image, transfer_points, voxels_to_world)
from .volumes import affine_spacing, load_volume, same_grid, save_nifti

__all__ = ["trajectory", "ventilation", "ventilation_summary", "midposition", "curves", "label_probabilities",
           "sampled_fields", "trajectory_samples", "ventilation_sd",
           "write_trajectory", "write_ventilation", "write_midposition", "write_curves", "write_label_probabilities",
           "tissue_fraction", "check_hu", "PERCENTILES", "VENTILATION_METHODS", "TISSUE_FRACTION_FLOOR"]

PERCENTILES = (5, 25, 50, 75, 95)
"""Percentiles of the ventilation summary (per label and over the whole mask)."""

VENTILATION_METHODS = ("jacobian", "hu")
"""How :func:`ventilation` measures volume change: from the map's det J, or from CT densities."""

TISSUE_FRACTION_FLOOR = 0.01
"""The smallest tissue fraction ``1 + HU / 1000`` the ``hu`` ventilation divides by (−990 HU)."""


def trajectory(reg: StoredRegistration, points: np.ndarray, frame: Frame) -> np.ndarray:
    """Points given in timepoint ``frame``'s image followed through every timepoint.

    Args:
        reg: the stored registration.
        points: ``(L, 3)`` 0-based voxel coordinates in ``frame`` (a timepoint or ``"common"``).
    Returns:
        ``(K, L, 3)`` float64 voxel coordinates: row k is where each point is in timepoint k
        (``φ_k(φ_frame⁻¹(p))``; the points themselves in row ``frame``).
    """
    frame = check_frame(reg, frame, "frame (--frame)")
    rows = [np.asarray(points, dtype=np.float64) if k == frame else transfer_points(points, reg, frame, k)
            for k in range(reg.num_timepoints)]
    return np.stack(rows)


def ventilation(reg: StoredRegistration, source: Frame, target: Frame, method: str = "jacobian",
                images: np.ndarray | None = None) -> np.ndarray:
    """Local volume change from timepoint ``source`` to ``target``, on ``source``'s grid.

    The tissue at a voxel q of ``source`` lies at ``ψ(q) = φ_target(φ_source⁻¹(q))`` in ``target``.

    * ``method="jacobian"``: ``det J_ψ(q) − 1`` (central differences inside, one-sided at the
      borders). The determinant is the same in voxels and in mm.
    * ``method="hu"``: the same quantity from CT densities, for images in Hounsfield units: with the
      tissue fraction ``f = 1 + HU / 1000`` (air −1000 HU: 0, water 0 HU: 1; floored at
      :data:`TISSUE_FRACTION_FLOOR`) and the tissue mass kept, ``f_source(q) / f_target(ψ(q)) − 1``
      (``target`` read at ``ψ(q)`` by trilinear interpolation). It reads the densities, so it
      reflects volume change the fields smooth away, and image noise.

    ``+0.2`` means the tissue there takes 20 % more volume in ``target`` than in ``source``.

    Args:
        method: ``jacobian`` or ``hu``.
        images: with ``hu``, the ``(K, D, H, W)`` timepoints in HU on the registration's grid.
    Returns:
        ``(D, H, W)`` float64, dimensionless.
    """
    source, target = _check_ventilation(reg, source, target, method)
    if method == "jacobian":
        field = transfer_field(reg, target, source)  # q + u(q) = φ_target(φ_source⁻¹(q)) on source's grid
        return jacobian_determinant(torch.from_numpy(field)[None])[0].numpy() - 1.0
    images = _check_images(images, reg)
    moved = transfer_image(images[target], reg, target, source)  # target's HU at ψ(q)
    return tissue_fraction(images[source]) / tissue_fraction(moved) - 1.0


def _check_ventilation(reg: StoredRegistration, source: Frame, target: Frame, method: str) -> tuple:
    """The checked frames of a ventilation ``method`` (``hu`` needs two timepoints, which have images)."""
    source, target = check_frames(reg, source, target)
    if method not in VENTILATION_METHODS:
        raise InputError(f"method (--method): expected one of {VENTILATION_METHODS}, got {method!r}")
    if method == "hu" and "common" in (source, target):
        raise InputError("method hu: expected two timepoints (the common frame has no image)")
    return source, target


def tissue_fraction(hu: np.ndarray) -> np.ndarray:
    """``1 + HU / 1000``, the tissue (non-air) fraction of a CT voxel, floored at
    :data:`TISSUE_FRACTION_FLOOR`: float64."""
    return np.maximum(1.0 + np.asarray(hu, dtype=np.float64) / 1000.0, TISSUE_FRACTION_FLOOR)


def check_hu(values: np.ndarray, where: str) -> None:
    """Refuse images that are not CT in HU: the median inside the mask must lie in (−1000, 0) HU
    (lung parenchyma is about −900 to −500 HU)."""
    median = float(np.median(values))
    if not -1000.0 < median < 0.0:
        raise InputError(f"method hu: expected CT in HU inside {where} (lung: about -900 to -500 HU), got a median of "
                         f"{median:.4g}; give the images in HU or use --method jacobian")


def _check_labels(name: str, labels: np.ndarray, shape: tuple) -> np.ndarray:
    """An integer label map on the grid ``shape`` with at least one voxel above 0 (0 = outside)."""
    labels = np.asarray(labels)
    if labels.shape != tuple(shape):
        raise InputError(f"{name}: expected an array on the registration's grid {tuple(shape)}, got shape {labels.shape}")
    if not np.isfinite(labels).all() or not np.array_equal(labels, np.round(labels)):
        raise InputError(f"{name}: expected integer labels (0 = outside), got non-integer or NaN values")
    if (labels < 0).any():
        raise InputError(f"{name}: expected labels >= 0 (0 = outside), got {int(labels.min())}")
    if not (labels > 0).any():
        raise InputError(f"{name}: no voxel inside (every voxel is 0); expected labels >= 1 where it applies")
    return labels.astype(np.int64)


def ventilation_summary(values: np.ndarray, mask: np.ndarray, spacing: Sequence[float]) -> dict:
    """Figures of a ventilation map inside a mask, over the whole mask and per label (lobes).

    Args:
        values: ``(D, H, W)`` det J − 1 (:func:`ventilation`).
        mask: ``(D, H, W)`` integer labels, 0 outside; each label ≥ 1 is summarised on its own.
        spacing: voxel size (mm) of the source grid.
    Returns:
        ``{"all": figures, "labels": {"<label>": figures}}``; figures: ``voxels``, ``volume_ml`` (at the
        source timepoint), ``volume_change_ml`` (sum of det J − 1 times the voxel volume), ``mean``,
        ``sd`` and ``p5`` … ``p95`` (:data:`PERCENTILES`) of det J − 1.
    """
    mask = _check_labels("mask", mask, np.shape(values))
    voxel_ml = float(np.prod(spacing)) / 1000.0

    def figures(v: np.ndarray) -> dict:
        out = {"voxels": int(v.size), "volume_ml": v.size * voxel_ml, "volume_change_ml": float(v.sum()) * voxel_ml,
               "mean": float(v.mean()), "sd": float(v.std())}
        out.update({f"p{p}": float(q) for p, q in zip(PERCENTILES, np.percentile(v, PERCENTILES))})
        return out

    labels = [int(v) for v in np.unique(mask) if v > 0]
    return {"all": figures(values[mask > 0]), "labels": {str(v): figures(values[mask == v]) for v in labels}}


def _check_images(images, reg: StoredRegistration) -> np.ndarray:
    images = np.asarray(images)
    expected = (reg.num_timepoints, *reg.shape)
    if images.shape != expected:
        raise InputError(f"images: expected the K = {reg.num_timepoints} timepoints on the registration's grid, "
                         f"shape {expected}, got {images.shape}")
    if not np.isfinite(images).all():
        raise InputError(f"images: expected finite values, got {int((~np.isfinite(images)).sum())} NaN/inf voxels")
    return images


def midposition(reg: StoredRegistration, images: np.ndarray, iterations: int = 20) -> np.ndarray:
    """The mid-position image: every timepoint moved to the group's mean position and averaged.

    The mean position of a common-frame point y is ``m(y) = (1/K) Σ_k φ_k(y)`` (the time-weighted
    mean for timepoints of equal duration, as in 4DCT phases). Timepoint k seen from the mean
    position is ``x_k ∘ φ_k ∘ m⁻¹`` (``m⁻¹`` by fixed-point iteration, ``iterations`` steps; each
    image interpolated once, trilinearly), and the mid-position image is their mean.

    Args:
        images: ``(K, D, H, W)`` the timepoints, each on its own grid (the registration's).
    Returns:
        ``(D, H, W)`` float32 on the group's grid, in the images' intensities.
    """
    images = _check_images(images, reg)
    mean = torch.from_numpy(reg.displacement.mean(axis=0))[None]  # (1, 3, D, H, W): m − Id, voxels
    to_mean = invert_displacement(mean, iterations)  # m⁻¹ − Id
    total = np.zeros(reg.shape)
    for k in range(reg.num_timepoints):
        field = compose(torch.from_numpy(reg.displacement[k])[None], to_mean)  # φ_k ∘ m⁻¹ − Id
        x = torch.from_numpy(np.ascontiguousarray(images[k], dtype=np.float64))[None, None]
        total += warp(x, field)[0, 0].numpy()
    return (total / reg.num_timepoints).astype(np.float32)


def curves(reg: StoredRegistration, images: np.ndarray, labels: np.ndarray, frame: Frame) -> dict:
    """Mean intensity per region at every timepoint, before and after registration.

    ``labels`` is drawn on timepoint ``frame``'s image. Before: every timepoint read where it lies
    (the motion left in). After: every timepoint moved to ``frame``
    (:func:`~groupmorph_pyro.transfer.transfer_image`, trilinear) and read there.

    Args:
        images: ``(K, D, H, W)`` the timepoints on the registration's grid.
        labels: ``(D, H, W)`` integer labels in ``frame``, 0 outside.
    Returns:
        a dict: ``labels`` the label values ≥ 1 (ascending) and ``voxels`` their sizes; ``before`` and
        ``after`` ``(K, n)`` float64 mean intensities; ``subtraction_before`` ``(K, D, H, W)`` float32
        ``x_k − x_0``, and ``subtraction_after`` the same with both timepoints moved to ``frame``.
    """
    frame = check_frame(reg, frame, "frame (--frame)")
    images = _check_images(images, reg)
    labels = _check_labels("labels", labels, reg.shape)
    values = [int(v) for v in np.unique(labels) if v > 0]
    moved = np.stack([images[k].astype(np.float32) if k == frame else transfer_image(images[k], reg, k, frame)
                      for k in range(reg.num_timepoints)])
    masks = [labels == v for v in values]

    def means(group: np.ndarray) -> np.ndarray:
        return np.array([[float(group[k][m].mean()) for m in masks] for k in range(group.shape[0])])

    return {"labels": values, "voxels": [int(m.sum()) for m in masks], "before": means(images), "after": means(moved),
            "subtraction_before": (images - images[:1]).astype(np.float32),
            "subtraction_after": (moved - moved[:1]).astype(np.float32)}


def _check_state(state: dict, reg: StoredRegistration) -> None:
    if tuple(state["shape"]) != reg.shape or state["num_timepoints"] != reg.num_timepoints:
        raise InputError(f"{reg.folder}: the stored posterior is for K = {state['num_timepoints']} on {tuple(state['shape'])}, "
                         f"the maps for K = {reg.num_timepoints} on {reg.shape}")


def sampled_fields(state: dict, reg: StoredRegistration, source: Frame, target: Frame, samples: int, seed: int = 0):
    """For each of ``samples`` posterior draws, the field ``u`` on ``target``'s grid with
    ``q + u(q) = φ_source(φ_target⁻¹(q))`` under that draw's maps (as
    :func:`~groupmorph_pyro.transfer.transfer_field` for the posterior mean): ``(1, 3, D, H, W)``
    float32 voxels, one at a time."""
    source, target = check_frames(reg, source, target)
    _check_state(state, reg)
    t = state_transform(state)
    with torch.no_grad():
        for z in draw_latents(state, samples, seed):
            outer = None if source == "common" else t.timepoint_displacement(z, source, reg.shape)
            inner = None if target == "common" else t.timepoint_displacement(z, target, reg.shape, inverse=True)
            yield between_frames(outer, inner, reg.shape, dtype=z.dtype)


def trajectory_samples(reg: StoredRegistration, state: dict, points: np.ndarray, frame: Frame, samples: int,
                       seed: int = 0) -> np.ndarray:
    """:func:`trajectory` under ``samples`` draws of the stored posterior (``state``).

    Returns:
        ``(S, K, L, 3)`` float64 voxel coordinates: draw s's ``φ_k(φ_frame⁻¹(p))`` (the points
        themselves in row ``frame``).
    """
    frame = check_frame(reg, frame, "frame (--frame)")
    _check_state(state, reg)
    pts = torch.from_numpy(np.asarray(points, dtype=np.float64))[None]  # (1, L, 3)
    t, out = state_transform(state), []
    with torch.no_grad():
        for z in draw_latents(state, samples, seed):
            common = pts if frame == "common" else map_points(pts, t.timepoint_displacement(z, frame, reg.shape, inverse=True))
            out.append(torch.cat([pts if k == frame else map_points(common, t.timepoint_displacement(z, k, reg.shape))
                                  for k in range(reg.num_timepoints)]).numpy())
    return np.stack(out)


def ventilation_sd(reg: StoredRegistration, state: dict, source: Frame, target: Frame, samples: int,
                   seed: int = 0, method: str = "jacobian", images: np.ndarray | None = None) -> np.ndarray:
    """The posterior sd of :func:`ventilation` (``method``, ``images`` as there) at every voxel of
    ``source``'s grid, over ``samples`` draws of the stored posterior: ``(D, H, W)`` float64."""
    source, target = _check_ventilation(reg, source, target, method)
    if method == "hu":
        images = _check_images(images, reg)
        fraction = tissue_fraction(images[source])
        target_image = torch.from_numpy(np.ascontiguousarray(images[target], dtype=np.float32))[None, None]
    total = np.zeros(reg.shape)
    squares = np.zeros(reg.shape)
    n = 0
    for field in sampled_fields(state, reg, target, source, samples, seed):
        if method == "hu":
            v = fraction / tissue_fraction(warp(target_image, field)[0, 0].numpy()) - 1.0
        else:
            v = jacobian_determinant(field.double())[0].numpy() - 1.0
        total += v
        squares += v * v
        n += 1
    return np.sqrt(np.maximum(squares / n - (total / n) ** 2, 0.0))


def label_probabilities(reg: StoredRegistration, state: dict, labels: np.ndarray, source: Frame, target: Frame,
                        samples: int, seed: int = 0) -> tuple[list, np.ndarray]:
    """A label map carried from ``source`` to ``target`` under posterior samples: the probability of
    each label at every voxel of ``target``'s grid.

    Each of ``samples`` draws of the stored posterior (``state``,
    :func:`~groupmorph_pyro.outputs.load_posterior_state`) moves the label map as
    :func:`~groupmorph_pyro.transfer.transfer_labels` does under that draw's maps (every label's
    indicator resampled trilinearly, each voxel taking the label of largest weight, ties to the
    smaller label; :func:`sampled_fields`); a label's probability at a voxel is the fraction of draws
    that give the voxel that label. Draws that all equal the posterior mean give the mean's label map.

    Args:
        labels: ``(D, H, W)`` integer label map in ``source`` (0 = background, kept as a label).
    Returns:
        ``(values, probabilities)``: the label values present, ascending, and ``(L, D, H, W)`` float32
        probabilities in that order (summing to 1 at every voxel).
    """
    source, target = check_frames(reg, source, target)
    labels = check_label_map(labels, reg)
    values = [int(v) for v in np.unique(labels)]
    counts = np.zeros((len(values), *labels.shape), np.int32)
    n = 0
    for field in sampled_fields(state, reg, source, target, samples, seed):
        best = largest_weight_labels(labels, values, field[0].double().numpy())
        for i in range(len(values)):
            counts[i] += best == i
        n += 1
    return values, (counts / n).astype(np.float32)


# ---- files -----------------------------------------------------------------------------------------

def _sibling(out: Path, suffix: str) -> Path:
    """``out`` with its extension (``.nii.gz``, ``.csv``, ...) replaced by ``suffix``."""
    name = out.name[:-len(".nii.gz")] if out.name.endswith(".nii.gz") else out.stem
    return out.with_name(name + suffix)


def _on_grid(path, reg: StoredRegistration, what: str) -> np.ndarray:
    vol = load_volume(path)
    if not same_grid(vol.data.shape, vol.affine, reg.shape, reg.affine):
        raise InputError(f"{path}: {what} is not on the registration's grid (shape {vol.data.shape} vs {reg.shape}, "
                         f"affine {'equal' if np.allclose(vol.affine, reg.affine, atol=1e-4) else 'different'}); "
                         f"expected the grid of {Path(reg.folder) / 'warped_0.nii.gz'}")
    return vol.data


def group_images(reg: StoredRegistration, paths: Sequence | None = None) -> tuple[np.ndarray, list]:
    """The K timepoints as ``(K, D, H, W)`` float32 and their paths: ``paths`` when given, else the
    inputs ``summary.json`` records; each must be on the registration's grid."""
    if paths is None:
        paths = read_summary(reg.folder).get("inputs")
        if not paths:
            raise InputError(f"{reg.folder}: summary.json does not name the inputs; give the K timepoints with --images")
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise InputError(f"{reg.folder}: the registration's inputs are gone ({missing[0]}, {len(missing)} of "
                             f"{len(paths)}); give the K timepoints with --images")
    if len(paths) != reg.num_timepoints:
        raise InputError(f"--images: expected K = {reg.num_timepoints} files, one per timepoint, got {len(paths)}")
    return np.stack([_on_grid(p, reg, "timepoint image").astype(np.float32) for p in paths]), list(paths)


def _read_points(path, reg: StoredRegistration) -> np.ndarray:
    """``(L, 3)`` voxel coordinates from DIR-Lab text (1-based voxel x y z) or a CSV with world-mm columns x, y, z."""
    if Path(path).suffix.lower() == ".csv":
        return read_csv_points(path, reg)[2]
    return read_landmarks(path)


def write_trajectory(registration_dir, points, frame: Frame, out, samples: int = 0, seed: int = 0) -> tuple[Path, Path]:
    """:func:`trajectory` of a points file, written as CSV and PNG; what ``groupmorph trajectory`` runs.

    Args:
        points: DIR-Lab text (1-based voxel ``x y z``) or ``.csv`` with world-mm columns x, y, z (RAS).
        out: the CSV: columns ``timepoint, point, x, y, z`` (world mm, RAS, under the posterior-mean
            maps; ``point`` 0-based in file order), one row per timepoint and point. Beside it
            ``<out stem>.png``: x, y and z over the timepoints, one line per point.
        samples: S > 0 adds, from S draws of the stored posterior (:func:`trajectory_samples`), the
            columns ``sd_x, sd_y, sd_z`` (mm) and ``x_p5, x_p95, y_p5, y_p95, z_p5, z_p95`` (the
            draws' 5th and 95th percentiles, mm), drawn as 90 % bands in the PNG.
    Returns:
        the CSV and PNG paths.
    """
    reg = load_registration(registration_dir)
    frame = check_frame(reg, frame, "frame (--frame)")
    out = Path(out)
    figure = _sibling(out, ".png")
    check_new_outputs(reg, [out, figure], [points])
    state = load_posterior_state(registration_dir) if samples else None
    vox = _read_points(points, reg)
    world = np.stack([voxels_to_world(reg.affine, p) for p in trajectory(reg, vox, frame)])  # (K, L, 3) mm
    header, bands = ["timepoint", "point", "x", "y", "z"], None
    if samples:
        draws = trajectory_samples(reg, state, vox, frame, samples, seed)  # (S, K, L, 3) voxels
        draws = np.stack([[voxels_to_world(reg.affine, p) for p in d] for d in draws])  # mm
        sd, lo, hi = draws.std(0), np.percentile(draws, 5, axis=0), np.percentile(draws, 95, axis=0)
        header += ["sd_x", "sd_y", "sd_z", "x_p5", "x_p95", "y_p5", "y_p95", "z_p5", "z_p95"]
        bands = {axis: (lo[:, :, c], hi[:, :, c]) for c, axis in enumerate(("x (mm)", "y (mm)", "z (mm)"))}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for k in range(world.shape[0]):
        for i, p in enumerate(world[k]):
            row = [k, i, *(f"{v:.6f}" for v in p)]
            if samples:
                row += [f"{v:.6f}" for v in sd[k, i]]
                row += [f"{v:.6f}" for c in range(3) for v in (lo[k, i, c], hi[k, i, c])]
            writer.writerow(row)
    atomic_write_text(out, buf.getvalue())
    panels = {axis: world[:, :, c] for c, axis in enumerate(("x (mm)", "y (mm)", "z (mm)"))}
    note = f", 90 % bands of {samples} posterior samples" if samples else ""
    curves_figure(figure, panels, xlabel="timepoint", bands=bands,
                  title=f"{world.shape[1]} points from timepoint {frame}{note}")
    return out, figure


def write_ventilation(registration_dir, source: Frame, target: Frame, mask, out, samples: int = 0,
                      seed: int = 0, method: str = "jacobian", images: Sequence | None = None) -> tuple[Path, ...]:
    """:func:`ventilation` inside a mask, written as NIfTI, PNG and JSON; what ``groupmorph ventilation`` runs.

    Args:
        mask: NIfTI label map on the registration's grid (source's image): 0 outside, labels ≥ 1
            (e.g. lungs, or lobes) summarised each on its own.
        out: the NIfTI: the volume change inside the mask, 0 outside, on source's grid. Beside it
            ``<stem>.png`` (three orthogonal middle slices) and ``<stem>.json``
            (:func:`ventilation_summary`, with the frames, the method and the mask's path).
        samples: S > 0 adds ``<stem>_sd.nii.gz``, the posterior sd of each voxel's value over S draws
            of the stored posterior (:func:`ventilation_sd`; 0 outside the mask), and its mean over
            the mask and each label (``sd_mean``) to the JSON.
        method: ``jacobian`` (det J − 1 of the map) or ``hu`` (from CT densities in HU, which must have
            a median inside the mask between −1000 and 0 HU; :func:`ventilation`).
        images: with ``hu``, the K timepoint files (default: the inputs ``summary.json`` records).
    Returns:
        the NIfTI, PNG and JSON paths (and the sd's with samples).
    """
    reg = load_registration(registration_dir)
    source, target = _check_ventilation(reg, source, target, method)
    if source == target:
        raise InputError(f"--from and --to: expected two different timepoints, got {source} twice")
    out = Path(out)
    figure, table, spread = _sibling(out, ".png"), _sibling(out, ".json"), _sibling(out, "_sd.nii.gz")
    data, paths = group_images(reg, images) if method == "hu" else (None, [])
    check_new_outputs(reg, [out, figure, table, *([spread] if samples else [])], [mask, *paths])
    state = load_posterior_state(registration_dir) if samples else None
    labels = _check_labels(str(mask), _on_grid(mask, reg, "the mask"), reg.shape)
    if method == "hu":
        check_hu(data[source][labels > 0], f"the mask, timepoint {source}")
    values = ventilation(reg, source, target, method, data)
    summary = ventilation_summary(values, labels, affine_spacing(reg.affine))
    if samples:
        sd = ventilation_sd(reg, state, source, target, samples, seed, method, data)
        save_nifti(spread, np.where(labels > 0, sd, 0.0), reg.affine)
        summary["all"]["sd_mean"] = float(sd[labels > 0].mean())
        for value, figures in summary["labels"].items():
            figures["sd_mean"] = float(sd[labels == int(value)].mean())
        summary["samples"], summary["seed"] = int(samples), int(seed)
    inside = np.where(labels > 0, values, 0.0)
    save_nifti(out, inside, reg.affine)
    slices_figure(figure, np.where(labels > 0, values, np.nan), cmap="RdBu_r", limit=max(abs(summary["all"]["p5"]),
                  abs(summary["all"]["p95"]), 1e-3), label="volume change",
                  title=f"ventilation {source} → {target} ({method}): mean {summary['all']['mean']:+.3f}")
    quantity = {"jacobian": "det J - 1 of phi_to(phi_from^-1(q)) on the from timepoint's grid",
                "hu": "f_from(q) / f_to(phi_to(phi_from^-1(q))) - 1, f = 1 + HU/1000, on the from timepoint's grid"}
    write_json(table, {"registration": str(Path(registration_dir).resolve()), "from": source, "to": target,
                       "mask": str(Path(mask).resolve()), "method": method, "quantity": quantity[method],
                       **({"images": [str(Path(x).resolve()) for x in paths]} if paths else {}), **summary})
    return (out, figure, table, spread) if samples else (out, figure, table)


def write_midposition(registration_dir, out, images: Sequence | None = None) -> tuple[Path, Path]:
    """:func:`midposition` written as NIfTI and PNG (``<stem>.png``); what ``groupmorph midposition`` runs.

    Args:
        images: the K timepoint files (default: the inputs ``summary.json`` records).
    Returns:
        the NIfTI and PNG paths.
    """
    reg = load_registration(registration_dir)
    out = Path(out)
    figure = _sibling(out, ".png")
    data, paths = group_images(reg, images)
    check_new_outputs(reg, [out, figure], paths)
    image = midposition(reg, data)
    save_nifti(out, image, reg.affine)
    lo, hi = np.percentile(image, [1, 99])
    slices_figure(figure, image, cmap="gray", vmin=float(lo), vmax=float(hi), label="intensity",
                  title=f"mid-position image of {reg.num_timepoints} timepoints")
    return out, figure


def write_curves(registration_dir, labels, frame: Frame, out, images: Sequence | None = None) -> list[Path]:
    """:func:`curves` written as CSV, PNG and subtraction images; what ``groupmorph curves`` runs.

    Args:
        labels: NIfTI label map on timepoint ``frame``'s image (0 outside).
        out: the CSV: columns ``label, voxels, timepoint, before, after`` (mean intensity). Beside it
            ``<stem>.png`` (each label's curve before and after) and, for k ≥ 1,
            ``<stem>_subtraction_<k>_before.nii.gz`` and ``..._after.nii.gz`` (x_k − x_0; after: both
            moved to ``frame``).
        images: the K timepoint files (default: the inputs ``summary.json`` records).
    Returns:
        every path written.
    """
    reg = load_registration(registration_dir)
    frame = check_frame(reg, frame, "frame (--frame)")
    out = Path(out)
    stem = _sibling(out, "")
    subtractions = {(k, when): stem.with_name(f"{stem.name}_subtraction_{k}_{when}.nii.gz")
                    for k in range(1, reg.num_timepoints) for when in ("before", "after")}
    figure = _sibling(out, ".png")
    data, paths = group_images(reg, images)
    check_new_outputs(reg, [out, figure, *subtractions.values()], [*paths, labels])
    label_map = _on_grid(labels, reg, "the label map")
    result = curves(reg, data, label_map, frame)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["label", "voxels", "timepoint", "before", "after"])
    for i, (value, n) in enumerate(zip(result["labels"], result["voxels"])):
        for k in range(reg.num_timepoints):
            writer.writerow([value, n, k, f"{result['before'][k, i]:.6g}", f"{result['after'][k, i]:.6g}"])
    atomic_write_text(out, buf.getvalue())
    panels = {f"label {v}": np.stack([result["before"][:, i], result["after"][:, i]], axis=1)
              for i, v in enumerate(result["labels"])}
    curves_figure(figure, panels, xlabel="timepoint", legend=("before registration", "after registration"),
                  title=f"mean intensity per label (labels in timepoint {frame})")
    for (k, when), path in subtractions.items():
        save_nifti(path, result[f"subtraction_{when}"][k], reg.affine)
    return [out, figure, *subtractions.values()]


def write_label_probabilities(registration_dir, labels, source: Frame, target: Frame, samples: int, out,
                              seed: int = 0) -> tuple[Path, Path, Path]:
    """:func:`label_probabilities` of a label map file; what ``groupmorph apply --labels --samples`` runs.

    Args:
        labels: NIfTI label map on ``source``'s grid.
        out: the probabilities, a 4D NIfTI ``(X, Y, Z, L)`` float32 on ``target``'s grid, one volume per
            label value in ascending order (background 0 included). Beside it ``<stem>_labels.nii.gz``
            (the most probable label per voxel) and ``<stem>.json`` (the label values in volume order,
            samples, seed).
    Returns:
        the three paths.
    """
    reg = load_registration(registration_dir)
    source, target = check_frames(reg, source, target)
    out = Path(out)
    argmax, table = _sibling(out, "_labels.nii.gz"), _sibling(out, ".json")
    check_new_outputs(reg, [out, argmax, table], [labels])
    state = load_posterior_state(registration_dir)
    label_map = _on_grid(labels, reg, "the label map")
    values, probs = label_probabilities(reg, state, label_map, source, target, samples, seed)
    best = np.asarray(values)[np.argmax(probs, axis=0)]
    save_nifti(out, np.moveaxis(probs, 0, -1), reg.affine)
    save_nifti(argmax, best, reg.affine, dtype=label_dtype(np.asarray(values)))
    write_json(table, {"labels": values, "samples": int(samples), "seed": int(seed), "from": source, "to": target,
                       "volumes": "probability of each label, in the order of 'labels', along the fourth axis"})
    return out, argmax, table
