"""Register one group: amortised guide pass and/or per-case SVI; fields, Jacobians, summary."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pyro
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from tqdm.auto import tqdm

from .checks import InputError
from .config import Config
from .group import assemble_fields, check_mode, displacements, inverse_displacements, latent_indices, warp_group
from .likelihoods import group_nmi
from .metrics import folding_percent
from .model import CaseGuide, GroupMorphGuide, build_model
from .preprocess import percentile_normalize, sliding_window
from .spatial import jacobian_determinant

__all__ = ["RegistrationResult", "normalize_group", "fit_case", "register"]


@dataclass
class RegistrationResult:
    """Output of :func:`register` for one group of K images on a (D, H, W) grid.

    Attributes:
        warped: ``(K, D, H, W)`` input intensities warped into the common frame, ``x_k ∘ φ_k``.
        displacement: ``(K, 3, D, H, W)`` ``φ_k − Id`` in voxels (array axis order).
        inverse_displacement: ``(K, 3, D, H, W)`` ``φ_k⁻¹ − Id`` in voxels.
        jacobian: ``(K, D, H, W)`` ``det Jφ_k``.
        loc, scale: ``(K_lat, 3, D, H, W)`` posterior mean and sd of the latent fields (voxels).
        summary: seconds, NMI before/after, folding, settings (JSON-serialisable).
    """

    warped: np.ndarray
    displacement: np.ndarray
    inverse_displacement: np.ndarray
    jacobian: np.ndarray
    loc: np.ndarray
    scale: np.ndarray
    summary: dict = field(default_factory=dict)


def normalize_group(images, percentiles=(1.0, 99.0)) -> torch.Tensor:
    """``(K, D, H, W)`` raw intensities -> ``(1, K, D, H, W)`` float32 tensor, each timepoint in [0, 1]."""
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[0] < 2:
        raise InputError(f"images: expected (K >= 2, D, H, W), got shape {arr.shape}")
    return torch.from_numpy(np.stack([percentile_normalize(a, *percentiles) for a in arr]))[None]


def fit_case(model, images: torch.Tensor, fixed, loc: torch.Tensor, scale: torch.Tensor, steps: int, lr: float,
             lambda_u: float, lambda_v: float, elbo: str = "trace", progress: bool = False) -> tuple[CaseGuide, list]:
    """Per-case SVI: refine a :class:`CaseGuide` initialised at (loc, scale) on this group alone.

    Args:
        model: a GroupMorphModel; images: ``(1, K, D, H, W)`` in [0, 1];
        loc, scale: ``(1, K_lat, 3, D, H, W)`` initial posterior (voxels); steps: SVI steps; lr: Adam step.
    Returns:
        (fitted guide, list of per-step losses per voxel).
    """
    guide = CaseGuide(loc, scale, lambda_u, lambda_v)
    loss_fn = (TraceMeanField_ELBO() if elbo == "meanfield" else Trace_ELBO()).differentiable_loss
    optim = torch.optim.Adam(guide.parameters(), lr=lr)
    n_vox = images.shape[1:].numel()
    losses = []
    bar = tqdm(range(int(steps)), desc="per-case SVI", disable=not progress, leave=False)
    for _ in bar:
        optim.zero_grad()
        loss = loss_fn(model, guide, images, fixed)
        loss.backward()
        optim.step()
        losses.append(loss.detach().item() / n_vox)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return guide, losses


def register(images, config: Config | None = None, guide: GroupMorphGuide | None = None, fixed: int | None = None,
             finetune_steps: int | None = None, device: str | torch.device = "cpu", seed: int = 0,
             progress: bool = False, likelihood=None, prior=None) -> RegistrationResult:
    """Register a group of K images.

    With ``guide`` (trained): one amortised pass gives the posterior; ``finetune_steps > 0`` then
    refines it by per-case SVI. Without ``guide``: per-case SVI from zero for ``finetune_steps``
    (default ``config.register.steps``).

    Args:
        images: ``(K, D, H, W)`` raw intensities (numpy or tensor), same grid.
        config: settings (model section must match the guide's); default: paper defaults with K from images.
        fixed: fixed timepoint in all-to-one mode (default 0); must be None in all-moving mode.
        device: torch device for the computation.
        likelihood, prior: custom callables overriding the config's (see GroupMorphModel).
    Returns:
        :class:`RegistrationResult` (posterior-mean fields).
    """
    images = np.asarray(images.detach().cpu() if isinstance(images, torch.Tensor) else images, dtype=np.float32)
    config = config or Config()
    mcfg = config.model
    k = images.shape[0] if images.ndim == 4 else -1
    if k != mcfg.num_timepoints:
        raise InputError(f"K: the model expects {mcfg.num_timepoints} timepoints, got {k} (images shape {images.shape})")
    if mcfg.mode == "all-to-one" and fixed is None:
        fixed = 0
    fixed = check_mode(mcfg.mode, k, fixed)
    steps = config.register.steps if finetune_steps is None and guide is None else int(finetune_steps or 0)
    if not np.isfinite(images).all():
        raise InputError(f"images: expected finite intensities, got {int((~np.isfinite(images)).sum())} NaN/inf voxels")
    device = torch.device(device)
    pyro.set_rng_seed(seed)
    x = normalize_group(images, config.data.percentiles).to(device)
    raw = torch.from_numpy(images)[None].to(device)
    model = build_model(mcfg, likelihood=likelihood, prior=prior)
    k_lat = len(latent_indices(k, mcfg.mode, fixed))

    start = time.perf_counter()
    if guide is not None:
        guide = guide.to(device).eval()
        with torch.no_grad():
            if config.register.window:
                loc, scale = sliding_window(lambda t: guide.distribution_params(t, fixed), x,
                                            config.register.window, config.register.overlap)
            else:
                loc, scale = guide.distribution_params(x, fixed)
    else:
        loc = torch.zeros(1, k_lat, 3, *x.shape[2:], device=device)
        scale = torch.full_like(loc, config.register.init_scale)
    losses = []
    if steps > 0:
        case, losses = fit_case(model, x, fixed, loc, scale, steps, config.register.lr, mcfg.lambda_u,
                                mcfg.lambda_v, config.train.elbo, progress)
        with torch.no_grad():
            loc, scale = case.distribution_params()
    with torch.no_grad():
        fields = assemble_fields(loc, k, mcfg.mode, fixed)
        disp = displacements(fields, mcfg.diffeomorphic, mcfg.integration_steps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        inv = inverse_displacements(fields, mcfg.diffeomorphic, mcfg.integration_steps)
        warped = warp_group(raw, disp)[0]
        jac = jacobian_determinant(disp[0])
        nmi_before = float(group_nmi(x, mcfg.bins)[0])
        nmi_after = float(group_nmi(warp_group(x, disp), mcfg.bins)[0])

    summary = {
        "seconds": seconds,
        "nmi_before": nmi_before,
        "nmi_after": nmi_after,
        "folding_percent": [folding_percent(j) for j in jac],
        "folding_percent_all": folding_percent(jac),
        "amortized": guide is not None,
        "per_case_steps": steps,
        "final_loss_per_voxel": losses[-1] if losses else None,
        "fixed": fixed,
        "mode": mcfg.mode,
        "diffeomorphic": mcfg.diffeomorphic,
        "device": str(device),
        "model": dict(vars(mcfg)),
    }
    cpu = lambda t: t.detach().cpu().numpy()  # noqa: E731
    return RegistrationResult(cpu(warped), cpu(disp[0]), cpu(inv[0]), cpu(jac), cpu(loc[0]), cpu(scale[0]), summary)
