"""Registration outputs on disk: what ``groupmorph register`` writes for one group.

Outputs are written atomically (temporary file + rename), never over an input file, into a staging
folder that is moved into place once every output has been computed, so a failure leaves no partial
results.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from .checks import InputError, check_integer
from .files import atomic_write, write_json
from .plots import uncertainty_figure
from .volumes import displacement_to_itk, displacement_to_world, load_volume, save_nifti

__all__ = ["FolderWriter", "write_registration", "output_paths", "check_outputs", "read_summary", "FIELD_FILES", "ITK_FILES",
           "OUTPUTS_VERSION", "POSTERIOR_FILE", "save_posterior_state", "load_posterior_state"]

FIELD_FILES = ("warped", "displacement", "inverse_displacement", "jacobian")
"""Per-timepoint NIfTI files every registration output folder holds: ``<name>_<k>.nii.gz``."""
ITK_FILES = ("transform_{k}_itk", "inverse_{k}_itk")
"""Per-timepoint ITK-convention displacement fields (LPS mm), ``<name>.nii.gz``; written unless ``itk=False``."""
OUTPUTS_VERSION = 2
"""``summary.json["outputs_version"]``: 2 adds the stored inverse maps and the ITK fields (folders
without the key were written before them)."""


class FolderWriter:
    """Writes a registration's output folder (the files :func:`write_registration` lists) while the
    registration computes it: pass it as :func:`~groupmorph_pyro.registration.register`'s ``sink``,
    which hands it each timepoint's full-resolution arrays as they are computed, then call
    :meth:`finish` with the result. Files go to ``<out_dir>/.partial/`` first and are moved into
    ``out_dir`` by :meth:`finish`, ``summary.json`` last, so a failed registration leaves no output
    files (use it as a context manager: an exception removes ``.partial``).

    Args:
        out_dir: the output folder (created); affine: the group's voxel -> world matrix (4×4);
        num_timepoints: K; input_paths: files it refuses to overwrite (checked here, before any work);
        itk: also write the ITK-convention fields.
    """

    STAGE = ".partial"

    def __init__(self, out_dir, affine: np.ndarray, num_timepoints: int, input_paths: Sequence = (), itk: bool = True):
        self.out_dir, self.num_timepoints = Path(out_dir), check_integer("num_timepoints", num_timepoints, 2)
        self.affine = np.asarray(affine, dtype=np.float64)
        if self.affine.shape != (4, 4) or not np.isfinite(self.affine).all():
            raise InputError(f"affine: expected a finite 4x4 matrix, got shape {self.affine.shape}")
        self.input_paths, self.itk = list(input_paths), bool(itk)
        check_outputs(output_paths(self.out_dir, self.num_timepoints, self.itk), self.input_paths)
        world = lambda u: displacement_to_world(u, self.affine)[..., None, :]  # noqa: E731
        itk_field = lambda u: displacement_to_itk(u, self.affine)  # noqa: E731
        same = lambda a: a  # noqa: E731
        # array name -> [(file name, conversion (one file at a time: memory), NIfTI intent)]
        self.files = {"warped": [("warped", same, None)], "jacobian": [("jacobian", same, None)],
                      "displacement": [("displacement", world, "vector")],
                      "inverse_displacement": [("inverse_displacement", world, "vector")]}
        if self.itk:
            self.files["displacement"].append((ITK_FILES[0], itk_field, "vector"))
            self.files["inverse_displacement"].append((ITK_FILES[1], itk_field, "vector"))
        self.stage = self.out_dir / self.STAGE
        shutil.rmtree(self.stage, ignore_errors=True)  # what an interrupted run left
        self.created = not self.out_dir.exists()  # removed again by discard() if still empty
        self.stage.mkdir(parents=True)
        self.staged: list[Path] = []

    def __enter__(self) -> FolderWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.discard()

    def discard(self) -> None:
        """Remove the staged files, and ``out_dir`` itself if this writer created it and it is empty
        (nothing is left but what was there before)."""
        shutil.rmtree(self.stage, ignore_errors=True)
        if self.created and self.out_dir.is_dir() and not any(self.out_dir.iterdir()):
            self.out_dir.rmdir()

    def __call__(self, k: int, arrays: dict) -> None:
        """Write timepoint k's arrays (names as :class:`~groupmorph_pyro.results.RegistrationResult`'s
        fields, one timepoint each, voxels) to the staging folder."""
        if not 0 <= int(k) < self.num_timepoints:
            raise InputError(f"k: expected a timepoint 0..{self.num_timepoints - 1}, got {k}")
        unknown = sorted(set(arrays) - set(self.files))
        if unknown:
            raise InputError(f"unknown output array(s) {unknown}: expected some of {sorted(self.files)}")
        for name, data in arrays.items():
            for file, convert, intent in self.files[name]:
                path = _per_timepoint(self.stage, file, int(k))
                save_nifti(path, convert(data), self.affine, intent)
                self.staged.append(path)

    def finish(self, result) -> list:
        """Write the result's posterior products and ``summary.json``, and move every staged file into
        ``out_dir``. Refuses (and discards) when a field file of some timepoint was never written.
        Returns the written paths."""
        k, out, stage = self.num_timepoints, self.out_dir, self.stage
        staged = set(self.staged)
        missing = [p.name for p in output_paths(stage, k, self.itk)[:-1] if p not in staged]
        if missing:
            self.discard()
            raise InputError(f"{out}: output file(s) never computed: {missing}")
        extra = []
        if getattr(result, "uncertainty", None):
            for name, maps in result.uncertainty.items():
                for i in range(k):
                    save_nifti(stage / f"{name}_{i}.nii.gz", maps[i], self.affine)
                    extra.append(f"{name}_{i}.nii.gz")
            for i in range(k):  # the result's arrays, or (streamed) the files staged from them
                read = lambda n: (getattr(result, n)[i] if getattr(result, n, None) is not None  # noqa: E731
                                  else load_volume(stage / f"{n}_{i}.nii.gz").data)
                uncertainty_figure(stage / f"uncertainty_{i}.png", read("warped"),
                                   result.uncertainty["displacement_std_mm"][i], read("jacobian"), title=f"timepoint {i}",
                                   identity=result.summary.get("fixed") == i and result.summary.get("mode") == "all-to-one")
                extra.append(f"uncertainty_{i}.png")
        if getattr(result, "inference_data", None) is not None:
            atomic_write(stage / "posterior.nc", result.inference_data.to_netcdf)
            extra.append("posterior.nc")
        if getattr(result, "posterior", None) is not None:
            save_posterior_state(stage / POSTERIOR_FILE, result.posterior)
            extra.append(POSTERIOR_FILE)
        if getattr(result, "landmark_posterior", None):
            lp = result.landmark_posterior
            write_json(stage / "landmarks_posterior.json", {
                "frame": "common frame (fixed image in all-to-one mode), world mm",
                "mean_mm": np.asarray(lp["mean_mm"]).tolist(), "cov_mm2": np.asarray(lp["cov_mm2"]).tolist()})
            extra.append("landmarks_posterior.json")
        names = [p.name for p in self.staged] + extra
        check_outputs([out / n for n in extra], self.input_paths)
        for name in names:
            os.replace(stage / name, out / name)
        summary = dict(result.summary, outputs_version=OUTPUTS_VERSION)
        if self.input_paths:
            summary["inputs"] = [str(Path(p).resolve()) for p in self.input_paths]
        write_json(out / "summary.json", summary)
        self.discard()
        return [str(out / n) for n in names] + [str(out / "summary.json")]


def write_registration(result, out_dir, affine: np.ndarray, input_paths: Sequence = (), itk: bool = True) -> list:
    """Write a :class:`~groupmorph_pyro.results.RegistrationResult` to ``out_dir``
    (:class:`FolderWriter`; a registration run with ``sink=FolderWriter(...)`` writes the same files
    without holding the full-resolution fields).

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
    * ``posterior.npz`` when the result holds its posterior (:func:`save_posterior_state`; every
      ``register`` result does): what ``apply --samples`` and the derived commands draw from;
    * with posterior samples also ``displacement_std_mm_<k>``, ``warped_std_<k>``,
      ``folding_probability_<k>`` (.nii.gz), ``uncertainty_<k>.png``, ``posterior.nc`` (arviz) and,
      with landmarks, ``landmarks_posterior.json``.

    Refuses to write over any input file. Returns the written paths.
    """
    fields = {name: getattr(result, name) for name in FIELD_FILES}
    none = [name for name, value in fields.items() if value is None]
    if none:
        raise InputError(f"write_registration: the result holds no {none} (a registration with a sink wrote them "
                         "as it ran: finish that FolderWriter instead)")
    with FolderWriter(out_dir, affine, result.warped.shape[0], input_paths, itk) as writer:
        for k in range(result.warped.shape[0]):
            writer(k, {name: value[k] for name, value in fields.items()})
        return writer.finish(result)


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


POSTERIOR_FILE = "posterior.npz"
"""The fitted posterior in a registration folder (:func:`save_posterior_state`; drawn from by
:func:`groupmorph_pyro.posterior.draw_latents`)."""
_STATE_FORMAT = 1
_SETTINGS = ("family", "num_timepoints", "mode", "fixed", "diffeomorphic", "integration_steps",
             "integration_downsize", "shape")


def save_posterior_state(path, state: dict) -> None:
    """Write a posterior state (:func:`groupmorph_pyro.registration.posterior_state`: ``loc``, ``sigma``,
    optionally ``spectrum``, and the transformation's settings) as ``.npz`` (the arrays in float32, the
    settings as JSON), atomically."""
    arrays = {name: np.asarray(state[name], dtype=np.float32) for name in ("loc", "sigma", "spectrum")
              if state.get(name) is not None}
    settings = {name: state[name] for name in _SETTINGS}
    settings["format"] = _STATE_FORMAT

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, settings=np.array(json.dumps(settings)), **arrays)

    atomic_write(path, write)


def load_posterior_state(folder) -> dict:
    """The posterior state stored in a registration folder (:data:`POSTERIOR_FILE`); one line naming
    the folder when it has none (a registration written without it, e.g. by a peer) or it is unreadable."""
    path = Path(folder) / POSTERIOR_FILE
    if not path.is_file():
        raise InputError(f"{folder}: no {POSTERIOR_FILE} (the fitted posterior); posterior samples need a folder "
                         f"written by groupmorph register")
    try:
        with np.load(path) as data:
            settings = json.loads(str(data["settings"]))
            state = {name: data[name] for name in ("loc", "sigma", "spectrum") if name in data.files}
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{path}: not a readable posterior ({exc})") from exc
    if settings.get("format") != _STATE_FORMAT or "loc" not in state or "sigma" not in state:
        raise InputError(f"{path}: expected posterior format {_STATE_FORMAT} with loc and sigma, got format "
                         f"{settings.get('format')!r} with {sorted(state)}")
    state.update({name: settings[name] for name in _SETTINGS})
    state["shape"] = tuple(state["shape"])
    return state


