"""Register one group: amortised guide pass and/or per-case SVI; fields, Jacobians, summary."""
from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import pyro
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from tqdm.auto import tqdm

from .checks import InputError
from .config import Config
from .group import (assemble_fields, check_mode, displacements, inverse_displacements, jacobians, latent_indices,
                    warp_group)
from .likelihoods import group_nmi
from .metrics import folding_percent, landmark_distances, landmark_report, summarize_distances
from .model import CaseGuide, GroupMorphGuide, build_model
from .preprocess import percentile_normalize, sliding_window
from .posterior import landmark_posterior, sample_posterior, to_inference_data, uncertainty_maps

__all__ = ["RegistrationResult", "normalize_group", "elbo_loss", "fit_case", "register"]


@dataclass
class RegistrationResult:
    """Output of :func:`register` for one group of K images on a (D, H, W) grid.

    Attributes:
        warped: ``(K, D, H, W)`` input intensities warped into the common frame, ``x_k ∘ φ_k``.
        displacement: ``(K, 3, D, H, W)`` ``φ_k − Id`` in voxels (array axis order).
        inverse_displacement: ``(K, 3, D, H, W)`` ``φ_k⁻¹ − Id`` in voxels.
        jacobian: ``(K, D, H, W)`` ``det Jφ_k``.
        loc, scale: ``(K_lat, 3, D, H, W)`` posterior mean and sd of the latent fields (voxels).
        summary: seconds, NMI before/after, folding, fine-tuning gain, settings (JSON-serialisable).
        uncertainty, landmark_posterior, inference_data: posterior products when samples were drawn.
    """

    warped: np.ndarray
    displacement: np.ndarray
    inverse_displacement: np.ndarray
    jacobian: np.ndarray
    loc: np.ndarray
    scale: np.ndarray
    summary: dict = field(default_factory=dict)
    uncertainty: dict | None = None  # (K, D, H, W) maps: displacement_std_mm, warped_std, folding_probability
    landmark_posterior: dict | None = None  # mean_mm (K, L, 3), cov_mm2 (K, L, 3, 3), world mm, common frame
    inference_data: object = None  # arviz.InferenceData of the posterior samples


def normalize_group(images, percentiles=(1.0, 99.0)) -> torch.Tensor:
    """``(K, D, H, W)`` raw intensities -> ``(1, K, D, H, W)`` float32 tensor, each timepoint in [0, 1]."""
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[0] < 2:
        raise InputError(f"images: expected (K >= 2, D, H, W), got shape {arr.shape}")
    return torch.from_numpy(np.stack([percentile_normalize(a, *percentiles) for a in arr]))[None]


def elbo_loss(model, guide, images: torch.Tensor, fixed, particles: int = 8, seed: int = 0) -> float:
    """Negative ELBO per voxel, averaged over ``particles`` draws with a fixed seed (common random
    numbers, so two guides are compared on the same noise). Leaves the global RNG untouched."""
    with torch.random.fork_rng(devices=[images.device] if images.device.type == "cuda" else []):
        torch.manual_seed(seed)
        loss = Trace_ELBO(num_particles=particles).loss(model, guide, images, fixed)
    return loss / images.shape[1:].numel()


def fit_case(model, images: torch.Tensor, fixed, loc: torch.Tensor, scale: torch.Tensor, steps: int, lr: float,
             lambda_u: float, lambda_v: float, elbo: str = "trace", progress: bool = False, patience: int = 50,
             eval_particles: int = 8) -> tuple[CaseGuide, dict]:
    """Per-case SVI: refine a :class:`CaseGuide` initialised at (loc, scale) on this group alone.

    Stops early when an exponential moving average of the loss has not improved for ``patience``
    steps, never before ``2 * patience`` steps (the loss has an early transient while σ adapts;
    0 disables). Then the ELBO of the initial and the refined posterior are compared with
    common random numbers, and the refined one is kept only if it is not worse, so fine-tuning
    never makes the case's ELBO worse.

    Args:
        model: a GroupMorphModel; images: ``(1, K, D, H, W)`` in [0, 1];
        loc, scale: ``(1, K_lat, 3, D, H, W)`` initial posterior (voxels); steps: max SVI steps; lr: Adam step.
    Returns:
        (guide, info) with info keys ``losses`` (per step, per voxel), ``steps_run``,
        ``elbo_loss_before`` / ``elbo_loss_after`` (negative ELBO per voxel), ``kept`` ("refined"/"initial"),
        ``diverged`` (a non-finite loss stopped the run).
    """
    # Whitening only preconditions the steps; a floor on λ_v keeps the (nearly) unpenalised constant
    # mode from taking steps of size lr / sqrt(λ_v) when λ_v is tiny (e.g. the VoxelMorph baseline).
    guide = CaseGuide(loc, scale, lambda_u, max(lambda_v, 0.01))
    initial = copy.deepcopy(guide.state_dict())
    before = elbo_loss(model, guide, images, fixed, eval_particles)
    loss_fn = (TraceMeanField_ELBO() if elbo == "meanfield" else Trace_ELBO()).differentiable_loss
    optim = torch.optim.Adam(guide.parameters(), lr=lr)
    n_vox = images.shape[1:].numel()
    losses, ema, best, wait = [], None, float("inf"), 0
    bar = tqdm(range(int(steps)), desc="per-case SVI", disable=not progress, leave=False)
    diverged = False
    for _ in bar:
        optim.zero_grad()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Encountered NaN")  # handled: reported as `diverged`
            loss = loss_fn(model, guide, images, fixed)
        if not torch.isfinite(loss):  # diverged: stop, the guard below restores the initial posterior
            diverged = True
            break
        loss.backward()
        optim.step()
        losses.append(loss.detach().item() / n_vox)
        ema = losses[-1] if ema is None else 0.9 * ema + 0.1 * losses[-1]
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if ema < best - 1e-4 * abs(best):
            best, wait = ema, 0
        else:
            wait += 1
        if patience and wait >= patience and len(losses) >= 2 * patience:  # warm-up: early transients
            break
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Encountered NaN")
        after = elbo_loss(model, guide, images, fixed, eval_particles)
    kept = "refined"
    if not after <= before:  # also catches NaN
        guide.load_state_dict(initial)
        after, kept = before, "initial"
    info = {"losses": losses, "steps_run": len(losses), "elbo_loss_before": before, "elbo_loss_after": after,
            "kept": kept, "diverged": diverged}
    return guide, info


def register(images, config: Config | None = None, guide: GroupMorphGuide | None = None, fixed: int | None = None,
             finetune_steps: int | None = None, device: str | torch.device = "cpu", seed: int = 0,
             progress: bool = False, likelihood=None, prior=None, samples: int = 0, landmarks=None,
             affine=None) -> RegistrationResult:
    """Register a group of K images.

    With ``guide`` (trained): one amortised pass gives the posterior; ``finetune_steps > 0`` then
    refines it by per-case SVI. Without ``guide``: per-case SVI from zero for ``finetune_steps``
    (default ``config.register.steps``).

    Args:
        images: ``(K, D, H, W)`` raw intensities (numpy or tensor), same grid.
        config: settings (model section must match the guide's); default: paper defaults with K from images.
            ``config.runtime`` (precision, channels_last, compile) is applied to ``guide`` in place,
            ``config.register.window`` runs the network on overlapping tiles (full-resolution volumes).
        fixed: fixed timepoint in all-to-one mode (default 0); must be None in all-moving mode.
        device: torch device for the computation.
        likelihood, prior: custom callables overriding the config's (see GroupMorphModel).
        samples: draw this many posterior samples for uncertainty maps and InferenceData.
        landmarks: ``(K, L, 3)`` 0-based voxel coordinates: landmark distances in the summary
            (before/after fine-tuning) and, with ``samples``, the landmarks' posterior.
        affine: voxel -> world matrix (default identity: 1 mm voxels) giving the spacing for landmark
            distances and uncertainty maps, and the frame of landmark posteriors.
        seed: seeds Pyro's random streams (torch, numpy, random) for a reproducible result.
    Returns:
        :class:`RegistrationResult` (posterior-mean fields; posterior products when ``samples``).
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
        guide = guide.to(device).eval().set_runtime(**config.runtime.options())
        with torch.no_grad():
            if config.register.window:
                loc, scale = sliding_window(lambda t: guide.distribution_params(t, fixed), x,
                                            config.register.window, config.register.overlap)
            else:
                loc, scale = guide.distribution_params(x, fixed)
    else:
        loc = torch.zeros(1, k_lat, 3, *x.shape[2:], device=device)
        scale = torch.full_like(loc, config.register.init_scale)
    sampler, finetune = guide, None
    loc0 = loc
    if steps > 0:
        case, finetune = fit_case(model, x, fixed, loc, scale, steps, config.register.lr, mcfg.lambda_u,
                                  mcfg.lambda_v, config.train.elbo, progress, config.register.patience)
        sampler = case
        with torch.no_grad():
            loc, scale = case.distribution_params()
    chunk = _timepoints_per_batch(x.shape[2:])
    with torch.no_grad():  # large volumes: a few timepoints at a time (bounded temporaries at full resolution)
        fields = assemble_fields(loc, k, mcfg.mode, fixed)
        disp = displacements(fields, mcfg.diffeomorphic, mcfg.integration_steps, chunk=chunk)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        inv = inverse_displacements(fields, mcfg.diffeomorphic, mcfg.integration_steps, chunk=chunk)
        del fields
        warped = warp_group(raw, disp, chunk)[0]
        jac = jacobians(disp, chunk=chunk)[0]
        nmi_before = float(group_nmi(x, mcfg.bins, histogram=mcfg.histogram)[0])
        nmi_after = float(group_nmi(warp_group(x, disp, chunk), mcfg.bins, histogram=mcfg.histogram)[0])

    summary = {
        "seconds": seconds,
        "nmi_before": nmi_before,
        "nmi_after": nmi_after,
        "folding_percent": [folding_percent(j) for j in jac],
        "folding_percent_all": folding_percent(jac),
        "amortized": guide is not None,
        "per_case_steps": steps,
        "final_loss_per_voxel": finetune["losses"][-1] if finetune and finetune["losses"] else None,
        "fixed": fixed,
        "mode": mcfg.mode,
        "diffeomorphic": mcfg.diffeomorphic,
        "device": str(device),
        "model": dict(vars(mcfg)),
    }
    spacing = _spacing(affine)
    if finetune is not None:  # the posterior fine-tuning started from
        with torch.no_grad():
            fields0 = assemble_fields(loc0, k, mcfg.mode, fixed)
            disp0 = displacements(fields0, mcfg.diffeomorphic, mcfg.integration_steps, chunk=chunk)
            nmi0 = float(group_nmi(warp_group(x, disp0, chunk), mcfg.bins, histogram=mcfg.histogram)[0])
        summary["finetune"] = {key: finetune[key] for key in
                               ("steps_run", "elbo_loss_before", "elbo_loss_after", "kept", "diverged")}
        summary["finetune"].update(nmi_before=nmi0, nmi_after=nmi_after, nmi_gain=nmi_after - nmi0)
    cpu = lambda t: t.detach().cpu().numpy()  # noqa: E731
    result = RegistrationResult(cpu(warped), cpu(disp[0]), cpu(inv[0]), cpu(jac), cpu(loc[0]), cpu(scale[0]), summary)
    if landmarks is not None:
        landmarks = np.asarray(landmarks, dtype=np.float64)
        summary["landmarks"] = landmark_report(landmarks, result, spacing)
        if finetune is not None:
            with torch.no_grad():
                inv0 = inverse_displacements(fields0, mcfg.diffeomorphic, mcfg.integration_steps, chunk=chunk)[0].cpu()
            before = summarize_distances(landmark_distances(landmarks, disp0[0].cpu(), inv0, spacing))
            summary["finetune"].update(landmarks_before_mm=before["mean_mm"],
                                       landmarks_after_mm=summary["landmarks"]["registered"]["mean_mm"])
    if samples:
        if sampler is None:  # no network and no per-case steps: sample the starting posterior N(0, init_scale²)
            sampler = CaseGuide(loc, scale, mcfg.lambda_u, mcfg.lambda_v)
        draws = sample_posterior(model, sampler, x, fixed, samples)
        result.uncertainty = uncertainty_maps(draws, raw, spacing)
        positions = None
        if landmarks is not None:
            lp = landmark_posterior(draws, landmarks, _affine(affine), k, mcfg.mode, fixed, mcfg.diffeomorphic,
                                    mcfg.integration_steps)
            result.landmark_posterior = {"mean_mm": lp["mean"], "cov_mm2": lp["cov"]}
            positions = lp["positions"]
        result.inference_data = to_inference_data(draws, x, spacing, positions)
        summary["samples"] = int(samples)
        summary["folding_probability_max"] = float(result.uncertainty["folding_probability"].max())
        summary["displacement_std_mm_mean"] = float(result.uncertainty["displacement_std_mm"].mean())
    return result


_BATCH_VOXELS = 1 << 25  # voxels per batch of maps integrated together (~0.4 GB per 3-component float32 batch)


def _timepoints_per_batch(shape) -> int:
    """Maps integrated in one batch: all of them for small grids (faster: measured 2.8 s vs 3.6 s one
    at a time for K=6 at 128×128×64 on 2 CPU cores), one at a time for 512×512×136."""
    return max(1, _BATCH_VOXELS // int(np.prod(shape)))


def _affine(affine) -> np.ndarray:
    return np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)


def _spacing(affine) -> tuple:
    return tuple(float(v) for v in np.linalg.norm(_affine(affine)[:3, :3], axis=0))
