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
from .volumes import displacement_to_itk, displacement_to_world, save_nifti

__all__ = ["write_registration", "output_paths", "check_outputs", "read_summary", "FIELD_FILES", "ITK_FILES",
           "OUTPUTS_VERSION"]

FIELD_FILES = ("warped", "displacement", "inverse_displacement", "jacobian")
"""Per-timepoint NIfTI files every registration output folder holds: ``<name>_<k>.nii.gz``."""
ITK_FILES = ("transform_{k}_itk", "inverse_{k}_itk")
"""Per-timepoint ITK-convention displacement fields (LPS mm), ``<name>.nii.gz``; written unless ``itk=False``."""
OUTPUTS_VERSION = 2
"""``summary.json["outputs_version"]``: 2 adds the stored inverse maps and the ITK fields (folders
without the key were written before them)."""


def write_registration(result, out_dir, affine: np.ndarray, input_paths: Sequence = (), itk: bool = True) -> list:
    """Write a :class:`~groupmorph_pyro.results.RegistrationResult` to ``out_dir``.

    Files (k = 0-based timepoint, in input order; every grid is the group's, ``affine``):

    * ``warped_<k>.nii.gz``: input intensities in the common frame, ``x_k ∘ φ_k``;
    * ``displacement_<k>.nii.gz`` / ``inverse_displacement_<k>.nii.gz``: ``φ_k − Id`` / ``φ_k⁻¹ − Id``
      in world mm along the NIfTI (RAS) axes, shape (X, Y, Z, 1, 3), intent "vector":
      ``d = A[:3,:3] @ u_vox`` (this package's convention, read back by :mod:`groupmorph_pyro.transfer`);
    * ``jacobian_<k>.nii.gz``: ``det Jφ_k``;
    * with ``itk`` (default): ``transform_<k>_itk.nii.gz`` (``φ_k − Id`` on the common frame's grid) and
      ``inverse_<k>_itk.nii.gz`` (``φ_k⁻¹ − Id`` on image k's grid) in LPS mm, as
      ``itk::DisplacementFieldTransform`` reads them (:func:`~groupmorph_pyro.volumes.displacement_to_itk`);
    * ``summary.json`` (with ``outputs_version``);
    * with posterior samples also ``displacement_std_mm_<k>``, ``warped_std_<k>``,
      ``folding_probability_<k>`` (.nii.gz), ``uncertainty_<k>.png``, ``posterior.nc`` (arviz) and,
      with landmarks, ``landmarks_posterior.json``.

    Refuses to write over any input file. Returns the written paths.
    """
    out_dir = Path(out_dir)
    k = result.warped.shape[0]
    world = lambda u: displacement_to_world(u, affine)[..., None, :]  # noqa: E731
    same = lambda a: a  # noqa: E731
    arrays = {"warped": (result.warped, None, same), "displacement": (result.displacement, "vector", world),
              "inverse_displacement": (result.inverse_displacement, "vector", world),
              "jacobian": (result.jacobian, None, same)}
    if itk:
        itk_field = lambda u: displacement_to_itk(u, affine)  # noqa: E731
        arrays[ITK_FILES[0]] = (result.displacement, "vector", itk_field)
        arrays[ITK_FILES[1]] = (result.inverse_displacement, "vector", itk_field)
    # (path, array, conversion, intent); conversions run one file at a time while writing (memory)
    plan = [(_per_timepoint(out_dir, name, i), data[i], convert, intent)
            for i in range(k) for name, (data, intent, convert) in arrays.items()]
    extra = []
    if getattr(result, "uncertainty", None):
        for name, maps in result.uncertainty.items():
            plan += [(out_dir / f"{name}_{i}.nii.gz", maps[i], same, None) for i in range(k)]
        extra += [out_dir / f"uncertainty_{i}.png" for i in range(k)]
    if getattr(result, "inference_data", None) is not None:
        extra.append(out_dir / "posterior.nc")
    if getattr(result, "landmark_posterior", None):
        extra.append(out_dir / "landmarks_posterior.json")
    targets = [p for p, *_ in plan] + extra + [out_dir / "summary.json"]
    check_outputs(targets, input_paths)
    for path, data, convert, intent in plan:
        save_nifti(path, convert(data), affine, intent)
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
    summary = dict(result.summary, outputs_version=OUTPUTS_VERSION)
    if input_paths:
        summary["inputs"] = [str(Path(p).resolve()) for p in input_paths]
    write_json(out_dir / "summary.json", summary)
    return [str(p) for p in targets]


def _per_timepoint(out_dir: Path, name: str, k: int) -> Path:
    """``out_dir/<name>_<k>.nii.gz`` for :data:`FIELD_FILES`, or ``out_dir/<name with k>.nii.gz`` for :data:`ITK_FILES`."""
    return out_dir / (name.format(k=k) + ".nii.gz" if "{k}" in name else f"{name}_{k}.nii.gz")


def output_paths(out_dir, num_timepoints: int, itk: bool = True) -> list[Path]:
    """The files :func:`write_registration` always writes for K timepoints (fields, Jacobians, summary)."""
    out_dir = Path(out_dir)
    names = FIELD_FILES + (ITK_FILES if itk else ())
    return [_per_timepoint(out_dir, n, i) for i in range(num_timepoints) for n in names] + [out_dir / "summary.json"]


def check_outputs(targets: Sequence, input_paths: Sequence = ()) -> None:
    """Refuse outputs that would overwrite an input file (checked before any work or writing)."""
    inputs = {Path(p).resolve() for p in input_paths}
    clash = [str(p) for p in targets if Path(p).resolve() in inputs]
    if clash:
        raise InputError(f"refusing to overwrite input file(s) {clash}: choose another --out")


def read_summary(folder) -> dict:
    """``summary.json`` of a registration output folder; one line naming the folder when there is none
    or it cannot be read as a JSON object."""
    import json

    folder = Path(folder)
    path = folder / "summary.json"
    if not path.is_file():
        raise InputError(f"{folder}: not a registration output folder (no summary.json)")
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from exc
    if not isinstance(summary, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(summary).__name__}")
    return summary
