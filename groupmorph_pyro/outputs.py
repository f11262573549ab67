"""Registration outputs on disk: what ``groupmorph register`` writes for one group.

Outputs are written atomically (temporary file + rename), never over an input file, and only
after every output has been computed, so a failure leaves no partial results.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .checks import InputError
from .files import atomic_write, write_json
from .plots import uncertainty_figure
from .volumes import displacement_to_world, save_nifti

__all__ = ["write_registration", "output_paths", "check_outputs"]


def write_registration(result, out_dir, affine: np.ndarray, input_paths: Sequence = ()) -> list:
    """Write a :class:`~groupmorph_pyro.results.RegistrationResult` to ``out_dir``.

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
    targets = [p for p, _, _ in plan] + extra + [out_dir / "summary.json"]
    check_outputs(targets, input_paths)
    for path, data, intent in plan:
        save_nifti(path, data, affine, intent)
    if getattr(result, "uncertainty", None):
        for i in range(k):
            uncertainty_figure(out_dir / f"uncertainty_{i}.png", result.warped[i],
                               result.uncertainty["displacement_std_mm"][i], result.jacobian[i], title=f"timepoint {i}",
                               identity=result.summary.get("fixed") == i and result.summary.get("mode") == "all-to-one")
    if getattr(result, "inference_data", None) is not None:
        atomic_write(out_dir / "posterior.nc", result.inference_data.to_netcdf)
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


def output_paths(out_dir, num_timepoints: int) -> list[Path]:
    """The files :func:`write_registration` always writes for K timepoints (fields, Jacobians, summary)."""
    out_dir = Path(out_dir)
    names = [f"{n}_{i}.nii.gz" for i in range(num_timepoints) for n in ("warped", "displacement", "jacobian")]
    return [out_dir / n for n in names] + [out_dir / "summary.json"]


def check_outputs(targets: Sequence, input_paths: Sequence = ()) -> None:
    """Refuse outputs that would overwrite an input file (checked before any work or writing)."""
    inputs = {Path(p).resolve() for p in input_paths}
    clash = [str(p) for p in targets if Path(p).resolve() in inputs]
    if clash:
        raise InputError(f"refusing to overwrite input file(s) {clash}: choose another --out")
