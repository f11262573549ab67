"""Dataset readers: DIR-Lab 4DCT raw images and landmarks, image series, manifests.

Every reader returns volumes with their affine (voxel -> world mm) and never reorients: array
axis order is the file's own (DIR-Lab: x, y, z = the raw file's fastest to slowest axis).
Landmark arrays are ``(L, 3)`` **0-based** voxel coordinates in that axis order; DIR-Lab text
files hold 1-based ``x y z`` indices, converted on read and write.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml
from scipy.ndimage import affine_transform, gaussian_filter

from .checks import InputError, check_spacing
from .files import atomic_write_text
from .volumes import Volume, load_volume

__all__ = [
    "DIRLAB_CASES", "read_dirlab_image", "read_landmarks", "write_landmarks", "check_landmarks_in_image",
    "resample_to_spacing", "read_series", "SeriesEntry", "load_manifest", "split_entries", "entry_landmarks",
    "read_landmark_files",
    "write_manifest", "load_mni152",
]

# (size x, y, z in voxels), (spacing x, y, z in mm): the DIR-Lab 4DCT documentation's table.
DIRLAB_CASES = {
    1: ((256, 256, 94), (0.97, 0.97, 2.5)),
    2: ((256, 256, 112), (1.16, 1.16, 2.5)),
    3: ((256, 256, 104), (1.15, 1.15, 2.5)),
    4: ((256, 256, 99), (1.13, 1.13, 2.5)),
    5: ((256, 256, 106), (1.10, 1.10, 2.5)),
    6: ((512, 512, 128), (0.97, 0.97, 2.5)),
    7: ((512, 512, 136), (0.97, 0.97, 2.5)),
    8: ((512, 512, 128), (0.97, 0.97, 2.5)),
    9: ((512, 512, 128), (0.97, 0.97, 2.5)),
    10: ((512, 512, 120), (0.97, 0.97, 2.5)),
}

_CASE_RE = re.compile(r"case(\d+)", re.IGNORECASE)


def read_dirlab_image(path, case: int | None = None, shape: Sequence[int] | None = None,
                      spacing: Sequence[float] | None = None) -> Volume:
    """Read a DIR-Lab raw image ``caseN_TXX_s.img`` (little-endian int16, no header, x fastest).

    Args:
        path: the .img file.
        case: DIR-Lab case number (default: parsed from the file name) selecting size and spacing
            from :data:`DIRLAB_CASES`; ``shape``/``spacing`` (x, y, z) override the table.
    Returns:
        :class:`~groupmorph_pyro.volumes.Volume` with data ``(X, Y, Z)`` float32 (HU as stored) and a
        diagonal affine of the spacing.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if shape is None or spacing is None:
        if case is None:
            m = _CASE_RE.search(path.name)
            if not m:
                raise InputError(f"{path}: cannot tell the DIR-Lab case from the name (expected 'caseN_...'); pass case=N")
            case = int(m.group(1))
        if case not in DIRLAB_CASES:
            raise InputError(f"{path}: DIR-Lab case must be 1..10, got {case}")
        shape = shape or DIRLAB_CASES[case][0]
        spacing = spacing or DIRLAB_CASES[case][1]
    shape = tuple(int(n) for n in shape)
    spacing = check_spacing(spacing)
    expected = int(np.prod(shape)) * 2
    actual = path.stat().st_size
    if actual != expected:
        raise InputError(f"{path}: expected {expected} bytes (int16 {shape[0]}x{shape[1]}x{shape[2]}), got {actual} "
                         f"(truncated file or wrong case?)")
    data = np.fromfile(path, dtype="<i2").reshape(shape[::-1]).transpose(2, 1, 0)
    return Volume(np.ascontiguousarray(data, dtype=np.float32), np.diag([*spacing, 1.0]), str(path))


def read_landmarks(path, shape: Sequence[int] | None = None, one_based: bool = True) -> np.ndarray:
    """Read a landmark text file: one ``x y z`` per line (spaces, tabs or commas).

    Args:
        path: e.g. ``case1_4D-75_T00.txt`` or ``Case1_300_T00_xyz.txt``.
        shape: image size (X, Y, Z); when given, every point must lie inside the image.
        one_based: the file holds 1-based indices (DIR-Lab); converted to 0-based.
    Returns:
        ``(L, 3)`` float64 0-based voxel coordinates.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise InputError(f"{path}: cannot read landmarks ({exc.strerror})") from exc
    points = []
    for no, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        cols = [c for c in re.split(r"[\s,]+", text) if c]
        if len(cols) != 3:
            raise InputError(f"{path}:{no}: expected 3 columns (x y z), got {len(cols)}: {line.strip()!r}")
        try:
            points.append([float(c) for c in cols])
        except ValueError as exc:
            raise InputError(f"{path}:{no}: expected numbers, got {line.strip()!r}") from exc
    if not points:
        raise InputError(f"{path}: no landmarks found")
    pts = np.asarray(points, dtype=np.float64) - (1.0 if one_based else 0.0)
    if shape is not None:
        check_landmarks_in_image(pts, shape, str(path))
    return pts


def check_landmarks_in_image(points: np.ndarray, shape: Sequence[int], source: str = "landmarks") -> None:
    """Fail naming ``source`` if any 0-based point lies outside ``[0, n-1]`` on an axis."""
    hi = np.asarray(shape, dtype=np.float64) - 1
    bad = np.where(((points < 0) | (points > hi)).any(axis=1))[0]
    if len(bad):
        i = int(bad[0])
        raise InputError(f"{source}: {len(bad)} landmark(s) outside the image of size {tuple(shape)}, "
                         f"first #{i + 1} at 1-based ({', '.join(f'{x:.4g}' for x in points[i] + 1)})")


def write_landmarks(path, points: np.ndarray, one_based: bool = True) -> None:
    """Write ``(L, 3)`` 0-based points as DIR-Lab text (1-based ``x y z``, tab-separated)."""
    pts = np.asarray(points, dtype=np.float64) + (1.0 if one_based else 0.0)
    atomic_write_text(path, "".join("\t".join(f"{v:.6g}" for v in p) + "\n" for p in pts))


def resample_to_spacing(vol: Volume, spacing: float | Sequence[float] = 1.0, order: int = 1) -> Volume:
    """Resample to exactly ``spacing`` mm, keeping voxel 0's centre; the affine is updated.

    The new grid has ``floor((n − 1) · s / t) + 1`` voxels per axis (old spacing s, target t), so
    it covers the old field of view (centre to centre) without extrapolating.

    Args:
        vol: input volume; spacing: target spacing (one number = isotropic); order: spline order.
    """
    target = np.asarray(check_spacing([spacing] * 3 if np.isscalar(spacing) else spacing))
    ratio = target / np.asarray(vol.spacing)  # old voxels per new voxel
    shape = [int(np.floor((n - 1) / r + 1e-6)) + 1 for n, r in zip(vol.data.shape, ratio)]
    data = affine_transform(vol.data, np.diag(ratio), output_shape=shape, order=order, mode="nearest")
    affine = vol.affine.copy()
    affine[:3, :3] = vol.affine[:3, :3] * ratio  # column c scales with axis c's voxel size
    return Volume(data.astype(np.float32), affine, vol.path)


def _read_dicom_series(folder: Path) -> Volume:
    try:
        import pydicom
    except ImportError as exc:
        raise InputError(f"{folder}: reading DICOM needs pydicom: pip install 'groupmorph_pyro[dicom]'") from exc
    files = sorted(p for p in folder.iterdir() if p.is_file())
    slices = []
    for p in files:
        try:
            ds = pydicom.dcmread(p)
            ds.pixel_array  # noqa: B018  (decode now, to report the file)
        except Exception:
            continue
        slices.append(ds)
    if len(slices) < 2:
        raise InputError(f"{folder}: expected a DICOM series of >= 2 slices, found {len(slices)}")
    orient = np.asarray(slices[0].ImageOrientationPatient, dtype=np.float64)
    row, col = orient[:3], orient[3:]
    normal = np.cross(row, col)
    slices.sort(key=lambda s: float(np.dot(normal, np.asarray(s.ImagePositionPatient, dtype=np.float64))))
    pos = [np.asarray(s.ImagePositionPatient, dtype=np.float64) for s in slices]
    steps = np.diff([np.dot(normal, p) for p in pos])
    if np.ptp(steps) > 1e-3 * max(abs(steps.mean()), 1e-6):
        raise InputError(f"{folder}: slices are not evenly spaced (gaps {steps.min():.3f}..{steps.max():.3f} mm)")
    dr, dc = (float(v) for v in slices[0].PixelSpacing)  # row spacing, column spacing
    vol = np.stack([s.pixel_array.astype(np.float32) * float(getattr(s, "RescaleSlope", 1))
                    + float(getattr(s, "RescaleIntercept", 0)) for s in slices], axis=-1)  # (rows, cols, slices)
    vol = vol.transpose(1, 0, 2)  # (cols = i along `row`, rows = j along `col`, slices)
    affine_lps = np.eye(4)
    affine_lps[:3, 0], affine_lps[:3, 1], affine_lps[:3, 2] = row * dc, col * dr, normal * steps.mean()
    affine_lps[:3, 3] = pos[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps  # DICOM LPS -> NIfTI RAS
    return Volume(np.ascontiguousarray(vol), affine, str(folder))


def read_series(paths: Sequence, spacing: float | Sequence[float] | None = 1.0) -> list[Volume]:
    """Read one volume per timepoint (a NIfTI file, or a folder holding one DICOM series).

    Args:
        paths: K entries; spacing: resample each to this voxel size in mm (None keeps the grid).
    Returns:
        K volumes (check they share a grid with :func:`groupmorph_pyro.volumes.load_group` semantics).
    """
    vols = []
    for p in map(Path, paths):
        vol = _read_dicom_series(p) if p.is_dir() else load_volume(p)
        vols.append(resample_to_spacing(vol, spacing) if spacing is not None else vol)
    ref = vols[0]
    for v in vols[1:]:
        if not np.allclose(v.spacing, ref.spacing, rtol=1e-3):
            fmt = lambda sp: "(" + ", ".join(f"{x:.4g}" for x in sp) + ")"  # noqa: E731
            raise InputError(f"{v.path}: spacing {fmt(v.spacing)} mm differs from {ref.path} {fmt(ref.spacing)} mm "
                             f"(mixed spacings in one series)")
    return vols


@dataclass
class SeriesEntry:
    """One row of a manifest: a group of K images, optional K landmark files, a split name."""

    name: str
    images: list
    landmarks: list = field(default_factory=list)
    split: str = "train"


def load_manifest(path, num_timepoints: int | None = None) -> list[SeriesEntry]:
    """Read a manifest (CSV or YAML) of series; relative paths are relative to the manifest.

    CSV columns: ``name``, ``split`` (optional), ``image_0 .. image_{K-1}``, ``landmarks_0 ..``
    (optional). YAML: a list (or ``{series: [...]}``) of mappings with ``name``, ``split``,
    ``images: [...]``, ``landmarks: [...]``. Every series must have the same K (or
    ``num_timepoints``) and every listed file must exist.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such manifest")
    base = path.parent
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        raw = []
        for r in rows:
            imgs = [r[k] for k in sorted((k for k in r if k and k.startswith("image_")), key=lambda s: int(s[6:]))]
            lms = [r[k] for k in sorted((k for k in r if k and k.startswith("landmarks_")), key=lambda s: int(s[10:]))]
            raw.append({"name": r.get("name", ""), "split": r.get("split") or "train", "images": imgs,
                        "landmarks": [x for x in lms if x]})
    else:
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise InputError(f"{path}: not valid YAML: {exc}") from exc
        raw = data.get("series", []) if isinstance(data, dict) else data
        if not isinstance(raw, list):
            raise InputError(f"{path}: expected a list of series, got {type(raw).__name__}")
    entries = []
    for i, r in enumerate(raw, 1):
        name = str(r.get("name") or f"series_{i}")
        images = [x for x in (r.get("images") or [])]
        if any(x in (None, "") for x in images) or len(images) < 2:
            raise InputError(f"{path}: series {name!r} has missing timepoints ({sum(1 for x in images if x)} image paths)")
        lms = list(r.get("landmarks") or [])
        if lms and len(lms) != len(images):
            raise InputError(f"{path}: series {name!r} has {len(images)} images but {len(lms)} landmark files")
        resolve = lambda p: str(Path(p) if Path(p).is_absolute() else base / p)  # noqa: E731
        images, lms = [resolve(p) for p in images], [resolve(p) for p in lms]
        for f in images + lms:
            if not Path(f).exists():
                raise InputError(f"{path}: series {name!r}: missing file {f}")
        entries.append(SeriesEntry(name, images, lms, str(r.get("split") or "train")))
    if not entries:
        raise InputError(f"{path}: manifest lists no series")
    k = num_timepoints or len(entries[0].images)
    for e in entries:
        if len(e.images) != k:
            raise InputError(f"{path}: series {e.name!r} has {len(e.images)} timepoints, expected {k}")
    return entries


def split_entries(manifest, split: str, num_timepoints: int | None = None) -> list[SeriesEntry]:
    """The series of ``split`` in a manifest (:func:`load_manifest`); an error when there are none."""
    entries = [e for e in load_manifest(manifest, num_timepoints) if e.split == split]
    if not entries:
        raise InputError(f"{manifest}: no series with split {split!r}")
    return entries


def read_landmark_files(paths: Sequence, shape: Sequence[int] | None = None) -> np.ndarray:
    """``(K, L, 3)`` 0-based landmarks from K DIR-Lab text files (one per timepoint), each point
    inside a ``(D, H, W)`` grid when ``shape`` is given; files with different point counts are an error."""
    landmarks = [read_landmarks(p, shape) for p in paths]
    if len({len(lm) for lm in landmarks}) > 1:
        raise InputError(f"landmarks: files {[str(p) for p in paths]} hold different numbers of points "
                         f"{[len(lm) for lm in landmarks]}")
    return np.stack(landmarks)


def entry_landmarks(entry: SeriesEntry, shape: Sequence[int]) -> np.ndarray | None:
    """``(K, L, 3)`` 0-based landmarks of a series on a ``(D, H, W)`` grid, or None without landmark files."""
    return read_landmark_files(entry.landmarks, shape) if entry.landmarks else None


def write_manifest(path, entries: Sequence[SeriesEntry]) -> None:
    """Write a YAML manifest (paths relative to its folder where possible)."""
    base = Path(path).resolve().parent

    def rel(p):
        p = Path(p).resolve()
        return str(p.relative_to(base)) if p.is_relative_to(base) else str(p)

    series = [{"name": e.name, "split": e.split, "images": [rel(p) for p in e.images],
               "landmarks": [rel(p) for p in e.landmarks]} for e in entries]
    atomic_write_text(path, yaml.safe_dump({"series": series}, sort_keys=False))


_MNI152_FILES = {"t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                 "grey": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
                 "white": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"}


def load_mni152(spacing: float = 2.0, margin: int = 2) -> dict:
    """The MNI152 (ICBM 2009a) T1 template and its grey / white matter maps, as shipped inside
    nilearn's wheel (no download), cropped to the head's bounding box plus ``margin`` voxels and
    resampled to ``spacing`` mm (Gaussian pre-filter against aliasing when coarsening).

    Args:
        spacing: isotropic voxel size in mm (the files are 2 mm or 1 mm, depending on nilearn's version).
        margin: voxels kept around the head.
    Returns:
        ``{"t1", "grey", "white"}``: :class:`Volume` objects on one grid (affine in mm); the grey and
        white matter probability maps scaled to [0, 1].
    Raises:
        InputError: nilearn is not installed (``pip install nilearn``) or lacks the files.
    """
    spacing = check_spacing([spacing] * 3)[0]
    try:
        from importlib.resources import files

        folder = files("nilearn.datasets") / "data"
    except ModuleNotFoundError as exc:
        raise InputError("load_mni152 needs nilearn (pip install nilearn; it ships the template)") from exc
    vols = {}
    for key, name in _MNI152_FILES.items():
        path = folder / name
        if not path.is_file():
            raise InputError(f"load_mni152: {name} not found in {folder} (nilearn version without the MNI152 files?)")
        vols[key] = load_volume(Path(str(path)))
    head = np.argwhere(vols["t1"].data > 0.05 * vols["t1"].data.max())
    lo = np.maximum(head.min(0) - margin, 0)
    hi = np.minimum(head.max(0) + margin + 1, vols["t1"].data.shape)
    out = {}
    for key, vol in vols.items():
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        affine = vol.affine.copy()
        affine[:3, 3] = vol.affine[:3, :3] @ lo + vol.affine[:3, 3]
        ratio = spacing / np.asarray(vol.spacing)
        data = vol.data[box].astype(np.float64)
        if (ratio > 1).any():
            data = gaussian_filter(data, 0.4 * np.maximum(ratio - 1, 0))
        out[key] = resample_to_spacing(Volume(data.astype(np.float32), affine, vol.path), spacing)
    for key in ("grey", "white"):  # probability maps, stored as 0-255 in some nilearn versions
        out[key].data = np.clip(out[key].data / max(float(out[key].data.max()), 1e-12), 0.0, 1.0)
    return out
