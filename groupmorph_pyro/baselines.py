"""Baselines run through the same outputs and evaluation as GroupMorph (paper Table 1).

Every baseline returns a :class:`~groupmorph_pyro.registration.RegistrationResult` with
``displacement`` ``φ_k − Id`` and ``inverse_displacement`` in voxels, in this package's convention
(``warped_k = x_k ∘ φ_k``, all-to-one: ``φ_p = Id``):

* :func:`identity` — no registration;
* :func:`elastix_all_to_one` — Elastix (``itk-elastix``) pairwise B-spline with a normalised
  mutual information metric, every timepoint to the fixed one;
* :func:`elastix_groupwise` — Elastix group-wise: one 4D registration of the stacked group with
  ``VarianceOverLastDimensionMetric`` and a ``BSplineStackTransform`` whose mean is subtracted,
  so the common frame is the group average (like GroupMorph's all-moving mode);
* :func:`ants_all_to_one` — ANTs (``antspyx``) affine + SyN with Mattes mutual information, every
  timepoint to the fixed one; ANTs' own inverse warp gives the inverse maps;
* :func:`pairwise_groupmorph` — VoxelMorph(-diff) as in the paper: the K = 2 all-to-one instance of
  our model, one pair (fixed, k) at a time, per-case SVI (λ_v → 1e-6: the paper's λ_v = 0 gives an
  improper prior whose normaliser is undefined; 1e-6 leaves the optimum unchanged in practice).
"""
from __future__ import annotations

import copy
import tempfile
import time

import numpy as np
import torch

from .checks import InputError, check_spacing
from .config import Config
from .group import check_mode
from .registration import register
from .results import RegistrationResult
from .spatial import invert_displacement, jacobian_determinant, warp

__all__ = ["identity", "elastix_all_to_one", "elastix_groupwise", "ants_all_to_one", "pairwise_groupmorph",
           "result_from_displacements", "ELASTIX_BSPLINE", "ELASTIX_GROUPWISE", "ANTS_SYN"]

# Elastix parameters in the spirit of the paper's DCE-MRI configuration (B-spline, NMI).
ELASTIX_BSPLINE = {
    "Metric": ["NormalizedMutualInformation"],
    "NumberOfHistogramBins": ["32"],
    "FinalGridSpacingInPhysicalUnits": ["10"],
    "MaximumNumberOfIterations": ["500"],
    "NumberOfResolutions": ["3"],
}


def result_from_displacements(images: np.ndarray, disp: np.ndarray, seconds: float, method: str,
                              fixed: int | None, inverse: np.ndarray | None = None) -> RegistrationResult:
    """Build a result (warped images, Jacobians, summary) from ``(K, 3, D, H, W)`` voxel
    displacements; the inverse maps are ``inverse`` (same shape) when the method gives them, else
    computed by fixed-point iteration."""
    d = torch.from_numpy(np.ascontiguousarray(disp, dtype=np.float32))
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
    with torch.no_grad():
        warped = warp(x, d)[:, 0]
        inv = (invert_displacement(d, iterations=30) if inverse is None
               else torch.from_numpy(np.ascontiguousarray(inverse, dtype=np.float32)))
        jac = jacobian_determinant(d)
    summary = {"seconds": seconds, "method": method, "fixed": fixed,
               "folding_percent_all": float(100.0 * (jac <= 0).double().mean())}
    empty = np.zeros((0,), np.float32)
    return RegistrationResult(warped.numpy(), d.numpy(), inv.numpy(), jac.numpy(), empty, empty, summary)


def identity(images) -> RegistrationResult:
    """No registration: zero displacements."""
    images = np.asarray(images, dtype=np.float32)
    return result_from_displacements(images, np.zeros((images.shape[0], 3, *images.shape[1:]), np.float32), 0.0,
                                     "identity", None)


ELASTIX_GROUPWISE = {
    "FinalGridSpacingInPhysicalUnits": ["10"],
    "MaximumNumberOfIterations": ["500"],
    "NumberOfResolutions": ["3"],
    "SubtractMean": ["true"],
}


def _itk():
    try:
        import itk
    except ImportError as exc:
        raise InputError("the Elastix baselines need itk-elastix: pip install 'groupmorph_pyro[baselines]'") from exc
    return itk


def _to_itk(itk, array: np.ndarray, spacing):
    """numpy (..., D, H, W) -> ITK image; ITK index order is the reversed array order (x = last axis)."""
    image = itk.image_from_array(np.ascontiguousarray(array, dtype=np.float32))
    image.SetSpacing([float(s) for s in spacing[::-1]] + [1.0] * (array.ndim - 3))
    return image


def _parameter_object(itk, default: str, settings: dict):
    params = itk.ParameterObject.New()
    pmap = params.GetDefaultParameterMap(default, int(settings["NumberOfResolutions"][0]))
    for key, value in settings.items():
        pmap[key] = list(value)
    params.AddParameterMap(pmap)
    return params


def _deformation_field(itk, image, transform) -> np.ndarray:
    """Transformix deformation field as numpy (..., D, H, W, dims); transformix writes its files to a
    temporary folder, never to the current directory."""
    with tempfile.TemporaryDirectory(prefix="transformix-") as tmp:
        field = itk.transformix_deformation_field(image, transform, output_directory=tmp)
        return np.asarray(itk.array_from_image(field)).copy()


def _field_to_voxels(field: np.ndarray, spacing) -> np.ndarray:
    """ITK deformation field (..., D, H, W, >=3) in (x, y, z) mm -> (..., 3, D, H, W) voxels along array axes."""
    return np.stack([field[..., 2 - c] / spacing[c] for c in range(3)], axis=-4).astype(np.float32)


def elastix_all_to_one(images, spacing, fixed: int = 0, parameters: dict | None = None) -> RegistrationResult:
    """Elastix pairwise B-spline registration of every timepoint to ``fixed``.

    Args:
        images: ``(K, D, H, W)``; spacing: voxel size (mm) along the array axes;
        parameters: overrides of :data:`ELASTIX_BSPLINE` (Elastix parameter-map strings).
    Returns:
        result with ``seconds`` = total Elastix time for the series.
    """
    itk = _itk()
    images = np.asarray(images, dtype=np.float32)
    spacing = check_spacing(spacing)
    k = images.shape[0]
    check_mode("all-to-one", k, fixed)
    params = _parameter_object(itk, "bspline", {**ELASTIX_BSPLINE, **(parameters or {})})
    disp = np.zeros((k, 3, *images.shape[1:]), np.float32)
    start = time.perf_counter()
    fixed_image = _to_itk(itk, images[fixed], spacing)
    for i in range(k):
        if i == fixed:
            continue
        moving = _to_itk(itk, images[i], spacing)
        _, transform = itk.elastix_registration_method(fixed_image, moving, parameter_object=params, log_to_console=False)
        field = _deformation_field(itk, moving, transform)  # (D, H, W, 3)
        disp[i] = _field_to_voxels(field, spacing)
    return result_from_displacements(images, disp, time.perf_counter() - start, "elastix-bspline-nmi", fixed)


def elastix_groupwise(images, spacing, parameters: dict | None = None) -> RegistrationResult:
    """Elastix group-wise registration (4D, variance over the group, B-spline stack, mean subtracted).

    Args:
        images: ``(K, D, H, W)``; spacing: voxel size (mm); parameters: overrides of :data:`ELASTIX_GROUPWISE`.
    Returns:
        result in the all-moving convention (no fixed timepoint).
    """
    itk = _itk()
    images = np.asarray(images, dtype=np.float32)
    spacing = check_spacing(spacing)
    check_mode("all-moving", images.shape[0], None)
    settings = {**ELASTIX_GROUPWISE, **(parameters or {})}
    levels = int(settings["NumberOfResolutions"][0])
    # never smooth or shrink along the group axis (ITK's Gaussian pyramid needs >= 4 samples there)
    schedule = [str(f) for r in range(levels) for f in (2 ** (levels - 1 - r),) * 3 + (0,)]
    settings.setdefault("FixedImagePyramidSchedule", schedule)
    settings.setdefault("MovingImagePyramidSchedule", schedule)
    params = _parameter_object(itk, "groupwise", settings)
    start = time.perf_counter()
    stack = _to_itk(itk, images, spacing)  # ITK (x, y, z, t)
    _, transform = itk.elastix_registration_method(stack, stack, parameter_object=params, log_to_console=False)
    field = _deformation_field(itk, stack, transform)  # (K, D, H, W, 4)
    return result_from_displacements(images, _field_to_voxels(field, spacing), time.perf_counter() - start,
                                     "elastix-groupwise", None)


ANTS_SYN = {"type_of_transform": "SyN", "reg_iterations": (100, 70, 50), "aff_metric": "mattes",
            "syn_metric": "mattes"}
"""ANTs settings (``ants.registration`` keyword arguments): affine + SyN, Mattes MI, 100/70/50
iterations at shrink factors 4/2/1 (antspyx's default SyN runs 40/20/0, never at full resolution)."""


def _ants():
    try:
        import ants
    except ImportError as exc:
        raise InputError("the ANTs baseline needs antspyx: pip install 'groupmorph_pyro[baselines]'") from exc
    return ants


def _ants_field(ants, fixed, moving, transforms, invert, folder, spacing) -> np.ndarray:
    """Compose an ANTs transform list into one displacement field on ``fixed``'s grid, as
    ``(3, D, H, W)`` voxels along the array axes (antspyx keeps numpy's axis order; mm / spacing)."""
    path = ants.apply_transforms(fixed, moving, transforms, whichtoinvert=invert, compose=f"{folder}/composed_")
    field = ants.image_read(path).numpy()  # (D, H, W, 3) physical mm along the array axes (identity direction)
    return np.stack([field[..., c] / spacing[c] for c in range(3)]).astype(np.float32)


def ants_all_to_one(images, spacing, fixed: int = 0, settings: dict | None = None) -> RegistrationResult:
    """ANTs (antspyx) registration of every timepoint to ``fixed``: affine + SyN (:data:`ANTS_SYN`).

    Args:
        images: ``(K, D, H, W)``; spacing: voxel size (mm) along the array axes;
        settings: overrides of :data:`ANTS_SYN` (``ants.registration`` keyword arguments).
    Returns:
        result with ``seconds`` = total ANTs time for the series (registration and field composition);
        inverse maps from ANTs' inverse transforms. ANTs' files go to a temporary folder.
    """
    ants = _ants()
    images = np.asarray(images, dtype=np.float32)
    spacing = check_spacing(spacing)
    k = images.shape[0]
    check_mode("all-to-one", k, fixed)
    settings = {**ANTS_SYN, **(settings or {})}
    disp = np.zeros((k, 3, *images.shape[1:]), np.float32)
    inv = np.zeros_like(disp)
    start = time.perf_counter()
    fixed_image = ants.from_numpy(np.ascontiguousarray(images[fixed]), spacing=tuple(spacing))
    for i in range(k):
        if i == fixed:
            continue
        moving = ants.from_numpy(np.ascontiguousarray(images[i]), spacing=tuple(spacing))
        with tempfile.TemporaryDirectory(prefix="ants-") as tmp:
            reg = ants.registration(fixed_image, moving, outprefix=f"{tmp}/reg_", **settings)
            disp[i] = _ants_field(ants, fixed_image, moving, reg["fwdtransforms"], None, tmp, spacing)
            inverse_invert = [t.endswith(".mat") for t in reg["invtransforms"]]
            inv[i] = _ants_field(ants, moving, fixed_image, reg["invtransforms"], inverse_invert, tmp, spacing)
    return result_from_displacements(images, disp, time.perf_counter() - start, "ants-syn-mattes", fixed, inv)


def pairwise_groupmorph(images, config: Config | None = None, fixed: int = 0, steps: int | None = None,
                        lambda_v: float = 1e-6, guide=None) -> RegistrationResult:
    """VoxelMorph(-diff) baseline: K = 2 all-to-one model applied to each pair (fixed, k).

    Without ``guide``: per-case SVI (``steps``) under the Laplacian prior (VoxelMorph's diffusion
    regulariser; λ_u from ``config`` when its prior is the Laplacian, else 1) with λ_v = ``lambda_v``,
    both per voxel (``model.prior_units: voxel``, as VoxelMorph's).
    With ``guide``: a trained K = 2 network (train one with ``model.num_timepoints: 2``,
    ``model.prior: laplacian`` and ``model.prior_options: {lambda_v: 1e-6}``; pass its checkpoint's config),
    plus ``steps`` of fine-tuning if given. ``config.model.diffeomorphic`` selects VoxelMorph-diff
    (True) or VoxelMorph (False).
    """
    images = np.asarray(images, dtype=np.float32)
    k = images.shape[0]
    check_mode("all-to-one", k, fixed)
    cfg = copy.deepcopy(config or Config())
    if guide is not None and (cfg.model.num_timepoints, cfg.model.mode) != (2, "all-to-one"):
        raise InputError(f"pairwise baseline: the network must be a K=2 all-to-one model, got K={cfg.model.num_timepoints} "
                         f"{cfg.model.mode}")
    if guide is None:  # VoxelMorph's diffusion regulariser: the Laplacian prior, whatever the package default
        lambda_u = cfg.model.prior_options.get("lambda_u", 1.0) if cfg.model.prior == "laplacian" else 1.0
        cfg.model.prior, cfg.model.prior_options = "laplacian", {"lambda_u": lambda_u, "lambda_v": lambda_v}
        cfg.model.prior_units = "voxel"  # VoxelMorph's weights are per voxel, whatever the spacing
    cfg.model.num_timepoints, cfg.model.mode = 2, "all-to-one"
    cfg.register.covariance = "diagonal"  # VoxelMorph's posterior is a diagonal Normal
    disp = np.zeros((k, 3, *images.shape[1:]), np.float32)
    start = time.perf_counter()
    for i in range(k):
        if i == fixed:
            continue
        res = register(images[[fixed, i]], cfg, guide, fixed=0, finetune_steps=steps)
        disp[i] = res.displacement[1]
    name = "voxelmorph-diff" if cfg.model.diffeomorphic else "voxelmorph"
    return result_from_displacements(images, disp, time.perf_counter() - start, name, fixed)
