"""Evaluation of registrations as in the paper's Table 1: per series RMSE and NMI between aligned
timepoints, landmark distance (mm, mean ± sd over all ordered pairs), % det J ≤ 0, seconds.

Two entry points: :func:`evaluate_output` reads a ``groupmorph register`` output folder;
:func:`evaluate_manifest` registers every series of a manifest split and evaluates it. Both give
rows (dicts) that :func:`write_table` writes as JSON and CSV.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch

from .batch import SeriesRun, register_manifest
from .checks import InputError
from .config import Config
from .data import read_landmark_files
from .files import atomic_write_text, write_json
from .likelihoods import group_nmi
from .metrics import folding_percent, landmark_report, pairwise_rmse
from .outputs import read_summary
from .preprocess import normalize_group
from .spatial import invert_displacement
from .volumes import load_displacement, load_group, load_volume

__all__ = ["group_metrics", "landmark_columns", "evaluate_output", "evaluate_manifest", "write_table", "COLUMNS"]

COLUMNS = ["series", "method", "rmse_before", "rmse_after", "nmi_before", "nmi_after", "landmark_mm_before",
           "landmark_sd_before", "landmark_mm_after", "landmark_sd_after", "landmark_median_after", "landmark_p95_after",
           "folding_percent", "seconds"]


def group_metrics(images: np.ndarray, warped: np.ndarray, jacobian: np.ndarray | None = None, bins: int = 32) -> dict:
    """RMSE (input intensity units) and NMI between aligned timepoints, before and after, and folding.

    Args:
        images, warped: ``(K, D, H, W)`` intensities before and after registration; jacobian: ``(K, D, H, W)``.
    """
    nmi = lambda g: float(group_nmi(normalize_group(g), bins)[0])  # noqa: E731
    row = {"rmse_before": pairwise_rmse(images), "rmse_after": pairwise_rmse(warped),
           "nmi_before": nmi(images), "nmi_after": nmi(warped)}
    row["folding_percent"] = folding_percent(jacobian) if jacobian is not None else None
    return row


def landmark_columns(landmarks, disp, inv, spacing) -> dict:
    """:func:`~groupmorph_pyro.metrics.landmark_report` as the table's landmark columns (mm): mean and
    sd before and after, median and 95th percentile after."""
    report = landmark_report(landmarks, disp, inv, spacing)
    before, after = report["identity"], report["registered"]
    return {"landmark_mm_before": before["mean_mm"], "landmark_sd_before": before["sd_mm"],
            "landmark_mm_after": after["mean_mm"], "landmark_sd_after": after["sd_mm"],
            "landmark_median_after": after["median_mm"], "landmark_p95_after": after["p95_mm"]}


def evaluate_output(folder, images=None, landmarks=None, series: str = "", method: str = "",
                    landmark_files=None) -> dict:
    """Evaluate a ``groupmorph register`` output folder.

    Args:
        folder: holds ``warped_<k>``, ``displacement_<k>``, ``jacobian_<k>`` (.nii.gz) and ``summary.json``.
        images: the K input paths (default: ``summary.json["inputs"]``).
        landmarks: ``(K, L, 3)`` 0-based voxel coordinates (optional). The inverse maps are the stored
            ``inverse_displacement_<k>`` (folders written before them: fixed-point inverses of the maps).
        landmark_files: instead of ``landmarks``, K DIR-Lab text files, read on the images' grid.
    Returns:
        one row with the :data:`COLUMNS` keys.
    """
    folder = Path(folder)
    summary = read_summary(folder)
    paths = list(images or summary.get("inputs") or [])
    if len(paths) < 2:
        raise InputError(f"{folder}: input images unknown (summary.json has no 'inputs'); pass them explicitly")
    raw, affine, vols = load_group(paths)
    k = raw.shape[0]
    if landmark_files:
        landmarks = read_landmark_files(landmark_files, raw.shape[1:])
    missing = [f"{n}_{i}.nii.gz" for n in ("warped", "displacement", "jacobian") for i in range(k)
               if not (folder / f"{n}_{i}.nii.gz").is_file()]
    if missing:
        raise InputError(f"{folder}: missing output file(s) {missing}")
    warped = np.stack([load_volume(folder / f"warped_{i}.nii.gz").data for i in range(k)])
    jac = np.stack([load_volume(folder / f"jacobian_{i}.nii.gz").data for i in range(k)])
    method = method or ("groupmorph" if summary.get("amortized") else "groupmorph-per-case")
    row = {"series": series or folder.name, "method": method, **group_metrics(raw, warped, jac),
           "seconds": summary.get("seconds")}
    if landmarks is not None:
        disp = np.stack([load_displacement(folder / f"displacement_{i}.nii.gz", affine) for i in range(k)])  # voxels
        disp_t = torch.from_numpy(disp).double()
        if all((folder / f"inverse_displacement_{i}.nii.gz").is_file() for i in range(k)):  # stored since outputs_version 2
            inv = torch.from_numpy(np.stack([load_displacement(folder / f"inverse_displacement_{i}.nii.gz", affine)
                                             for i in range(k)])).double()
        else:
            inv = invert_displacement(disp_t, iterations=30)
        row.update(landmark_columns(landmarks, disp_t, inv, vols[0].spacing))
    return {c: row.get(c) for c in COLUMNS}


def evaluate_manifest(manifest, out_dir, config: Config | None = None, guide=None, split: str = "test",
                      fixed: int | None = None, finetune_steps: int | None = None, device="cpu",
                      progress: bool = False) -> list[dict]:
    """Register and evaluate every series of ``split`` in a manifest; outputs under ``out_dir/<series>``.

    Runs :func:`~groupmorph_pyro.batch.register_manifest` (so a rerun skips finished series) and
    scores each series from its folder (:func:`evaluate_output`: the stored maps and inverse maps).
    """
    rows = []

    def score(run: SeriesRun) -> None:
        e = run.entry
        landmarks = {"landmarks": run.landmarks} if run.result is not None else {"landmark_files": e.landmarks}
        rows.append(evaluate_output(run.folder, e.images, series=e.name, method=_method(guide), **landmarks))

    register_manifest(manifest, out_dir, config, guide, split, fixed, finetune_steps, device, progress=progress,
                      on_series=score)
    return rows


def _method(guide) -> str:
    return "groupmorph" if guide is not None else "groupmorph-per-case"


def write_table(rows: list[dict], out_dir) -> tuple[Path, Path]:
    """Write ``evaluation.json`` and ``evaluation.csv`` (columns :data:`COLUMNS`) atomically."""
    out_dir = Path(out_dir)
    write_json(out_dir / "evaluation.json", rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    for r in rows:
        writer.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in COLUMNS})
    atomic_write_text(out_dir / "evaluation.csv", buf.getvalue())
    return out_dir / "evaluation.json", out_dir / "evaluation.csv"
