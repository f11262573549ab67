"""Dataset preparation: DIR-Lab folders and image series -> NIfTI groups + landmarks + manifest.

Also writes synthetic twins in the original formats (raw DIR-Lab ``.img`` + landmark text; one
NIfTI per DCE timepoint at anisotropic spacing), so the whole pipeline runs without real data.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np

from .checks import InputError
from .data import (
    SeriesEntry, check_landmarks_in_image, read_dirlab_image, read_landmarks, read_series, write_landmarks,
    write_manifest,
)
from .volumes import save_nifti
from .synthetic import breathing_phantom, dce_phantom

__all__ = ["find_dirlab_files", "crop_window", "prepare_dirlab", "prepare_series", "write_dirlab_twin", "write_dce_twin"]

PAPER_PHASES = ("T00", "T10", "T20", "T30", "T40", "T50")


def find_dirlab_files(folder, case: int) -> dict:
    """Locate a case's files anywhere under ``folder``.

    Returns:
        ``{"images": {"T00": path, ...}, "landmarks": {"T00": path, ...}, "landmarks300": {"T00": path, "T50": path}}``
        (``landmarks``: the 4D-75 sets).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such DIR-Lab folder")
    pats = {
        "images": re.compile(rf"^case{case}_(T\d\d)(_s)?\.img$", re.IGNORECASE),
        "landmarks": re.compile(rf"^case{case}_4D-75_(T\d\d)\.txt$", re.IGNORECASE),
        "landmarks300": re.compile(rf"^case{case}_300_(T\d\d)_xyz\.txt$", re.IGNORECASE),
    }
    found = {k: {} for k in pats}
    for p in sorted(folder.rglob("*")):
        for kind, pat in pats.items():
            m = pat.match(p.name)
            if m:
                found[kind][m.group(1).upper()] = p
    if not found["images"]:
        raise InputError(f"{folder}: no DIR-Lab images case{case}_TXX_s.img found")
    return found


def crop_window(size: int, crop: int, points: np.ndarray) -> int:
    """Start of a ``crop``-long window on an axis of ``size`` voxels that contains every point
    (0-based coordinates), centred on the points' extent; fails if they do not fit."""
    if size <= crop:
        return 0
    lo, hi = float(points.min()), float(points.max())
    if hi - lo > crop - 1:
        raise InputError(f"landmarks span {hi - lo + 1:.0f} voxels, more than the crop of {crop}")
    start = int(round((lo + hi) / 2 - crop / 2))
    start = min(max(start, int(np.ceil(hi)) - crop + 1, 0), int(np.floor(lo)), size - crop)
    return start


def prepare_dirlab(folder, out_dir, case: int, phases: Sequence[str] = PAPER_PHASES, crop: int | None = 256,
                   shape=None, spacing=None, split: str = "test") -> Path:
    """Convert a DIR-Lab case to NIfTI + landmarks + ``manifest.yaml`` in ``out_dir``.

    The in-plane (x, y) crop to ``crop x crop`` (the paper's 256x256; None = no crop) keeps every
    landmark (4D-75 and 300-point sets); landmarks are shifted accordingly, and the NIfTI affine's
    translation records the crop so world coordinates are unchanged. ``shape``/``spacing`` override
    the case table (for non-standard files such as the synthetic twin).

    Writes ``case<N>_<TXX>.nii.gz``, ``case<N>_<TXX>_landmarks.txt`` (1-based x y z),
    ``case<N>_<TXX>_landmarks300.txt`` where available, and ``manifest.yaml`` (one series named
    ``case<N>`` with ``split``); returns the manifest path.
    """
    out_dir = Path(out_dir)
    files = find_dirlab_files(folder, case)
    missing = [t for t in phases if t not in files["images"]]
    if missing:
        raise InputError(f"{folder}: case {case} lacks image(s) for phase(s) {missing}")
    vols = {t: read_dirlab_image(files["images"][t], case, shape, spacing) for t in phases}
    grid = vols[phases[0]].data.shape
    lms = {t: read_landmarks(files["landmarks"][t], grid) for t in phases if t in files["landmarks"]}
    lms300 = {t: read_landmarks(p, grid) for t, p in files["landmarks300"].items()}
    all_pts = np.concatenate(list(lms.values()) + list(lms300.values())) if (lms or lms300) else np.zeros((0, 3))
    offset = np.zeros(3)
    if crop is not None:
        for axis in (0, 1):
            pts = all_pts[:, axis] if len(all_pts) else np.array([grid[axis] / 2])
            offset[axis] = crop_window(grid[axis], crop, pts)
    x0, y0 = int(offset[0]), int(offset[1])
    cx = crop if crop is not None else grid[0]
    cy = crop if crop is not None else grid[1]
    entry = SeriesEntry(f"case{case}", [], [], split)
    for t in phases:
        vol = vols[t]
        data = vol.data[x0 : x0 + cx, y0 : y0 + cy]
        affine = vol.affine.copy()
        affine[:3, 3] += vol.affine[:3, :3] @ offset
        img_path = out_dir / f"case{case}_{t}.nii.gz"
        save_nifti(img_path, data, affine)
        entry.images.append(str(img_path))
        if t in lms:
            shifted = lms[t] - offset
            check_landmarks_in_image(shifted, data.shape, f"case{case} {t} landmarks after cropping")
            lm_path = out_dir / f"case{case}_{t}_landmarks.txt"
            write_landmarks(lm_path, shifted)
            entry.landmarks.append(str(lm_path))
        if t in lms300:
            write_landmarks(out_dir / f"case{case}_{t}_landmarks300.txt", lms300[t] - offset)
    if entry.landmarks and len(entry.landmarks) != len(entry.images):
        raise InputError(f"{folder}: case {case} has landmarks for {len(entry.landmarks)} of {len(phases)} phases")
    manifest = out_dir / "manifest.yaml"
    write_manifest(manifest, [entry])
    return manifest


def prepare_series(series: dict, out_dir, spacing: float = 1.0, split: str = "train") -> Path:
    """Resample image series (NIfTI files or DICOM folders per timepoint) to ``spacing`` mm and
    write them as NIfTI with a manifest. ``series``: ``{name: [timepoint paths, ...]}``."""
    out_dir = Path(out_dir)
    entries = []
    for name, paths in series.items():
        vols = read_series(paths, spacing)
        entry = SeriesEntry(name, [], [], split)
        for k, vol in enumerate(vols):
            path = out_dir / f"{name}_t{k}.nii.gz"
            save_nifti(path, vol.data, vol.affine)
            entry.images.append(str(path))
        entries.append(entry)
    manifest = out_dir / "manifest.yaml"
    write_manifest(manifest, entries)
    return manifest


def write_dirlab_twin(folder, case: int = 1, shape=(64, 64, 40), spacing=(2.0, 2.0, 2.5), num_phases: int = 6,
                      num_landmarks: int = 75, seed: int = 0) -> dict:
    """Write a synthetic DIR-Lab-format case: ``case<N>_TXX_s.img`` (int16 HU-like, x fastest) and
    ``case<N>_4D-75_TXX.txt`` (1-based, sub-voxel) for phases T00, T10, ... Returns the geometry."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = breathing_phantom(shape, num_phases, num_landmarks=num_landmarks, spacing=spacing, seed=seed)
    for k in range(num_phases):
        t = f"T{10 * k:02d}"
        hu = np.clip(np.round(g.images[k] * 1400.0 - 1000.0), -1024, 3071).astype("<i2")
        hu.transpose(2, 1, 0).tofile(folder / f"case{case}_{t}_s.img")
        write_landmarks(folder / f"case{case}_4D-75_{t}.txt", g.landmarks[k])
    return {"shape": tuple(shape), "spacing": tuple(spacing), "phases": [f"T{10 * k:02d}" for k in range(num_phases)]}


def write_dce_twin(folder, name: str = "patient0", shape=(48, 48, 16), spacing=(1.0, 1.0, 3.0), num_timepoints: int = 6,
                   seed: int = 0) -> list:
    """Write a synthetic DCE-MRI series as one NIfTI per timepoint at anisotropic spacing."""
    g = dce_phantom(shape, num_timepoints, spacing=spacing, seed=seed, num_landmarks=10)
    paths = []
    for k in range(num_timepoints):
        p = Path(folder) / f"{name}_t{k}.nii.gz"
        save_nifti(p, g.images[k] * 1000.0, g.affine)
        paths.append(p)
    return paths
