"""Posterior sampling of deformation fields: uncertainty maps, landmark posteriors, arviz export.

Samples come from the variational posterior q(z | x) (amortised guide or per-case guide) through
``pyro.infer.Predictive`` on the model, which records the deterministic sites ``"displacement"``
(``φ_k − Id``, voxels, ``(B, K, 3, D, H, W)``) and ``"jacobian"`` (``det Jφ_k``, ``(B, K, D, H, W)``).
"""
from __future__ import annotations

import numpy as np
import torch
from pyro.infer import Predictive

from .checks import InputError, check_integer, check_spacing
from .files import atomic_write
from .group import GroupTransform
from .likelihoods import group_nmi
from .priors import CorrelatedNormal
from .spatial import map_points

__all__ = ["sample_posterior", "uncertainty_maps", "landmark_posterior", "to_inference_data", "save_inference_data",
           "state_transform", "draw_latents"]


def sample_posterior(model, guide, images: torch.Tensor, fixed, num_samples: int) -> dict:
    """Draw ``num_samples`` joint samples of every timepoint's field from the guide.

    Args:
        model: a GroupMorphModel; guide: GroupMorphGuide or CaseGuide; images: ``(1, K, D, H, W)`` in [0, 1].
    Returns:
        ``{"z": (S, 1, K_lat, 3, D, H, W), "displacement": (S, 1, K, 3, D, H, W), "jacobian": (S, 1, K, D, H, W)}``
        tensors (displacements in voxels).
    """
    if int(num_samples) != num_samples or num_samples < 1:
        raise InputError(f"samples: expected an integer >= 1, got {num_samples!r}")
    record = model.record_deterministic
    model.record_deterministic = True
    try:
        predictive = Predictive(model, guide=guide, num_samples=int(num_samples),
                                return_sites=["z", "displacement", "jacobian"])
        with torch.no_grad():
            out = predictive(images, fixed)
    finally:
        model.record_deterministic = record
    n = int(num_samples)
    # Predictive pads whole-tensor deterministic sites with singleton plate dims: drop them.
    return {"z": out["z"], "displacement": out["displacement"].reshape(n, *out["displacement"].shape[-6:]),
            "jacobian": out["jacobian"].reshape(n, *out["jacobian"].shape[-5:])}


def uncertainty_maps(samples: dict, raw_images: torch.Tensor, spacing, transform: GroupTransform) -> dict:
    """Per-timepoint posterior maps.

    Args:
        samples: output of :func:`sample_posterior`; raw_images: ``(1, K, D, H, W)`` intensities;
        spacing: voxel size (mm) along the array axes; transform: the group's transformation (warps).
    Returns:
        numpy arrays ``(K, D, H, W)``: ``displacement_std_mm`` (sqrt of the summed per-axis
        variances of ``φ_k − Id``, in mm), ``warped_std`` (sd of ``x_k ∘ φ_k`` in input intensity
        units) and ``folding_probability`` (fraction of samples with ``det J ≤ 0``).
    """
    s = torch.tensor(check_spacing(spacing), dtype=torch.float64)
    disp = samples["displacement"][:, 0].double()  # (S, K, 3, D, H, W)
    var_mm = (disp.var(0, unbiased=False) * (s**2)[:, None, None, None]).sum(1)  # (K, D, H, W)
    warped = torch.stack([transform.warp(raw_images, d[None].to(raw_images.dtype))[0]
                          for d in samples["displacement"][:, 0]])
    folding = (samples["jacobian"][:, 0] <= 0).double().mean(0)
    return {
        "displacement_std_mm": var_mm.sqrt().float().numpy(),
        "warped_std": warped.double().std(0, unbiased=False).float().numpy(),
        "folding_probability": folding.float().numpy(),
    }


def landmark_posterior(samples: dict, landmarks, affine: np.ndarray, transform: GroupTransform, shape=None) -> dict:
    """Posterior of each timepoint's landmarks mapped into the common frame, ``φ_k⁻¹(l_k)``.

    Args:
        samples: from :func:`sample_posterior`; landmarks: ``(K, L, 3)`` 0-based voxel coordinates of
            the image grid; affine: voxel -> world (mm) matrix of the group; transform: the
            transformation that the samples' latents ``"z"`` belong to (its K, mode, fixed timepoint,
            variant and latent grid); shape: the image grid ``(D, H, W)`` when the latents live on a
            coarser control grid (their inverse maps are computed there and resized to it, as
            :meth:`GroupTransform.inverse_displacements` does); None: the latents' own grid.
    Returns:
        ``{"positions": (S, K, L, 3) world mm, "mean": (K, L, 3), "cov": (K, L, 3, 3) mm²}``.
    """
    lm = torch.as_tensor(np.asarray(landmarks, dtype=np.float32))
    k = transform.num_timepoints
    if lm.dim() != 3 or lm.shape[0] != k or lm.shape[-1] != 3:
        raise InputError(f"landmarks: expected ({k}, L, 3), got {tuple(lm.shape)}")
    a = torch.as_tensor(np.asarray(affine), dtype=torch.float64)
    out = []
    for z in samples["z"]:  # (1, K_lat, 3, D, H, W)
        inv = transform.inverse_displacements(z, shape)[0]
        common = map_points(lm, inv).double()  # (K, L, 3) voxels
        out.append(common @ a[:3, :3].T + a[:3, 3])
    pos = torch.stack(out)  # (S, K, L, 3)
    centred = pos - pos.mean(0)
    cov = torch.einsum("skli,sklj->klij", centred, centred) / max(pos.shape[0] - 1, 1)
    return {"positions": pos.numpy(), "mean": pos.mean(0).numpy(), "cov": cov.numpy()}


def to_inference_data(samples: dict, images: torch.Tensor, spacing, transform: GroupTransform,
                      landmark_positions: np.ndarray | None = None, timepoint_names=None):
    """Samples as ``arviz.InferenceData`` with named dims.

    Variables (one chain, S draws): ``mean_displacement_mm`` (timepoint, axis), ``nmi`` (scalar:
    the group's mean pairwise NMI after warping ``images`` (1, K, D, H, W) with each *sampled*
    field, which is rougher than the posterior mean and so usually scores lower than the
    registered NMI in summary.json), and with landmarks ``landmark_position`` (timepoint,
    landmark, axis) in world mm.
    """
    import arviz as az

    disp = samples["displacement"][:, 0].double()  # (S, K, 3, D, H, W)
    s = torch.tensor(check_spacing(spacing), dtype=torch.float64)
    k = disp.shape[1]
    names = list(timepoint_names or [f"t{i}" for i in range(k)])
    posterior = {"mean_displacement_mm": (disp.mean(dim=(-3, -2, -1)) * s).numpy()[None]}
    with torch.no_grad():
        nmis = [float(group_nmi(transform.warp(images, d[None].to(images.dtype)))[0])
                for d in samples["displacement"][:, 0]]
    posterior["nmi"] = np.asarray(nmis)[None]
    dims = {"mean_displacement_mm": ["timepoint", "axis"]}
    coords = {"timepoint": names, "axis": ["x", "y", "z"]}
    if landmark_positions is not None:
        posterior["landmark_position"] = np.asarray(landmark_positions)[None]
        dims["landmark_position"] = ["timepoint", "landmark", "axis"]
        coords["landmark"] = np.arange(landmark_positions.shape[2])
    return az.from_dict(posterior=posterior, dims=dims, coords=coords)


def save_inference_data(idata, path) -> None:
    """Write InferenceData to netCDF atomically (temporary file + rename)."""
    atomic_write(path, idata.to_netcdf)


# ---- drawing from a stored posterior ---------------------------------------------------------------
#
# A posterior state (:func:`groupmorph_pyro.registration.posterior_state`, stored by
# :func:`groupmorph_pyro.outputs.save_posterior_state`) is a dict of numpy arrays and settings, enough
# to draw the latent fields again without the images or the fit: ``loc`` (K_lat, 3, d, h, w) the mean
# and ``sigma`` its per-voxel sd (``family`` "diagonal": N(loc, sigma²)) or modulation with
# ``spectrum`` (``family`` "dct": :class:`~groupmorph_pyro.priors.CorrelatedNormal`), each in the
# smallest shape that broadcasts to loc; and the transformation's settings (``num_timepoints``,
# ``mode``, ``fixed``, ``diffeomorphic``, ``integration_steps``, ``integration_downsize`` on the latent
# grid, ``shape`` the image grid).

def state_transform(state: dict) -> GroupTransform:
    """The :class:`~groupmorph_pyro.group.GroupTransform` the state's latents belong to (one map at a
    time on full-resolution grids)."""
    return GroupTransform(state["num_timepoints"], state["mode"], state["fixed"], state["diffeomorphic"],
                          state["integration_steps"], "auto", state["integration_downsize"])


def draw_latents(state: dict, num_samples: int, seed: int = 0):
    """``num_samples`` draws of the latent fields, each ``(1, K_lat, 3, d, h, w)`` float32 (voxels of the
    latent grid), one at a time, from a generator of their own seeded with ``seed`` (the global random
    state is not used)."""
    n = check_integer("samples", num_samples, 1)
    loc = torch.from_numpy(np.asarray(state["loc"], dtype=np.float32))[None]
    sigma = torch.from_numpy(np.asarray(state["sigma"], dtype=np.float32))[None]
    if state["family"] == "dct":
        draw = CorrelatedNormal(loc, sigma, torch.from_numpy(np.asarray(state["spectrum"], dtype=np.float32))[None]).from_noise
    else:
        draw = lambda eps: loc + sigma * eps  # noqa: E731
    generator = torch.Generator().manual_seed(int(seed))
    for _ in range(n):
        yield draw(torch.randn(loc.shape, generator=generator))
