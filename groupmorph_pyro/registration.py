"""Register one group: prepare -> infer (amortised, or tiled) -> refine (per-case SVI) -> summarise -> sample.

:func:`register` is that pipeline; each step is a function of its own here, and settings travel as
the config objects (:class:`~groupmorph_pyro.config.Config` and its sections). The group's
transformation (latents -> maps, inverse maps, det J, warped group) is asked of the model's
:class:`~groupmorph_pyro.group.GroupTransform`.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pyro
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from tqdm.auto import tqdm

from .checks import InputError, check_integer, check_positive
from .config import Config, RegisterConfig
from .group import GroupTransform
from .likelihoods import group_nmi, is_order_free
from .metrics import landmark_report
from .model import (CaseGuide, GroupMorphGuide, GroupMorphModel, build_model, chunked_elbo_loss, chunked_map_loss,
                    has_map_loss, latent_chunk, map_loss, serve_guide)
from .optim import Adam, NesterovSGD, ladder_minimum
from .priors import SPACING_EXPONENTS, DCTGaussianField, compact
from .posterior import landmark_posterior, sample_posterior, to_inference_data, uncertainty_maps
from .preprocess import normalize_group, sliding_window
from .results import RegistrationResult, package_version
from .spatial import (control_factor, jacobian_determinant, level_shape, map_points, resample_grid, resize_displacement,
                      warp)
from .volumes import affine_spacing

__all__ = ["RegistrationResult", "normalize_group", "PreparedGroup", "Posterior", "elbo_loss", "FITS", "fit_case", "mean_fit", "fit_pyramid", "fit_scale", "correlated_start", "median_curvature", "correlated_family", "prepare",
           "fit_model", "level_model", "posterior_transform", "infer", "refine", "nmi_report", "summarise", "add_posterior_samples",
           "posterior_state", "register"]


@dataclass
class PreparedGroup:
    """One validated group ready to register (the output of :func:`prepare`).

    Attributes:
        images: ``(K, D, H, W)`` raw intensities (float32 numpy); raw: the same as a ``(1, K, D, H, W)`` tensor;
        x: ``(1, K, D, H, W)`` normalised to [0, 1] (what the model and network see), on ``device``
        (None once :func:`register` has no more use for it);
        config: the settings; model: the Pyro model; transform: its GroupTransform for ``fixed``
        (chunked for full-resolution grids); fixed: fixed timepoint (None in all-moving mode);
        steps: per-case SVI steps of the last phase (0: none); landmarks: ``(K, L, 3)`` voxels or None;
        affine: 4x4 voxel -> world (mm); fit_model: the model the per-case fit from zero ends on:
        ``model`` itself, or for images larger than ``register.fit_voxels`` its twin on a control grid
        (:func:`fit_model`).
    """

    images: np.ndarray
    raw: torch.Tensor
    x: torch.Tensor
    config: Config
    model: GroupMorphModel
    transform: GroupTransform
    fixed: int | None
    steps: int
    device: torch.device
    landmarks: np.ndarray | None
    affine: np.ndarray
    fit_model: GroupMorphModel | None = None

    @property
    def spacing(self) -> tuple:
        """Voxel size in mm along the array axes (column norms of the affine)."""
        return affine_spacing(self.affine)

    @property
    def shape(self) -> tuple:
        """The image grid ``(D, H, W)``."""
        return tuple(self.raw.shape[2:])


@dataclass
class Posterior:
    """The posterior over the latent fields: ``loc``, ``scale`` ``(1, K_lat, 3, d, h, w)`` on the latent
    grid of ``model`` (its voxels), the guide that samples it (the amortised network, a per-case guide,
    or None: N(loc, scale²)) and the model it is a posterior of (None: the group's ``model``, on the
    image grid; a control-grid model after a per-case fit of a large group)."""

    loc: torch.Tensor
    scale: torch.Tensor
    guide: object = None
    model: GroupMorphModel | None = None


def elbo_loss(model, guide, images: torch.Tensor, fixed, particles: int = 8, seed: int = 0,
              chunk: int | None = None) -> float:
    """Negative ELBO per voxel, averaged over ``particles`` draws with a fixed seed (common random
    numbers, so two guides are compared on the same noise). Leaves the global RNG untouched. Runs
    without autograd: no graph is kept (measured at 64×64×34, K = 6: 1747 instead of 4212 bytes per
    voxel added at the peak of a 4-particle estimate, more than an SVI step's 3983). ``chunk``: latent
    timepoints at a time (:func:`~groupmorph_pyro.model.chunked_elbo_loss`, a CaseGuide in all-to-one
    mode; :func:`~groupmorph_pyro.model.latent_chunk` decides); None: Pyro's Trace_ELBO in one batch."""
    with torch.random.fork_rng(devices=[images.device] if images.device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        if chunk is None:
            loss = Trace_ELBO(num_particles=particles).loss(model, guide, images, fixed)
        else:
            loss = float(chunked_elbo_loss(model, guide, images, fixed, particles=particles, chunk=chunk))
    return loss / images.shape[1:].numel()


SGD_MOMENTUM = 0.9  # Nesterov momentum of fit_case's fit="map-sgd" (fine-tuning a network's posterior)

FITS = ("svi", "map", "map-sgd")
"""How :func:`fit_case` fits: ``"svi"`` mean and log σ by Adam; ``"map"`` the mean as a point estimate
(MAP, a Delta guide; σ stays) by Adam; ``"map-sgd"`` likewise by SGD with Nesterov momentum."""


def fit_case(model: GroupMorphModel, images: torch.Tensor, fixed, loc: torch.Tensor, scale: torch.Tensor,
             settings: RegisterConfig | None = None, steps: int | None = None, elbo: str = "trace",
             progress: bool | str = False, fit: str = "svi") -> tuple[CaseGuide, dict]:
    """Per-case SVI: refine a :class:`CaseGuide` initialised at (loc, scale) on this group alone.

    The guide's mean is whitened with the model's prior spectrum (see CaseGuide). The step follows
    ``settings.schedule`` (constant, or cosine from ``lr`` to 0 over ``steps``); with
    ``settings.average`` the guide's parameters are averaged over that final fraction of the steps
    (iterate averaging: the stochastic ELBO gradient leaves the last iterate noisy). Then the ELBO of
    the initial and the refined posterior are compared with common random numbers
    (``settings.guard_particles`` particles each), and the refined one is kept only if it is not
    worse, so fine-tuning never makes the case's ELBO worse.

    Args:
        model: a GroupMorphModel; images: ``(1, K, D, H, W)`` in [0, 1]; fixed: fixed timepoint or None;
        loc, scale: ``(1, K_lat, 3, D, H, W)`` initial posterior (voxels);
        settings: ``lr`` (step of the whitened mean), ``scale_lr`` (Adam's on log σ; None = ``lr``),
            ``schedule``, ``average``, ``guard_particles``, ``steps`` (default :class:`RegisterConfig`);
        steps: SVI steps (default ``settings.steps``); elbo: ``"trace"`` or ``"meanfield"``;
        progress: a progress bar (True, or its label; False: none);
        fit: one of :data:`FITS`: ``"svi"`` (mean and σ), ``"map"`` (the mean as a point estimate, σ
            stays ``scale``; the guard then compares log joints at the two means) or ``"map-sgd"``
            (as ``"map"``, by SGD with Nesterov momentum :data:`SGD_MOMENTUM`: a step proportional to
            the gradient).
    Returns:
        (guide, info) with info keys ``losses`` (per step, per voxel), ``steps_run``,
        ``elbo_loss_before`` / ``elbo_loss_after`` (negative ELBO per voxel), ``kept`` ("refined"/"initial"),
        ``diverged`` (a non-finite loss stopped the run), ``seconds`` (the whole call) and
        ``guard_seconds`` (of which the two ELBO evaluations).
    """
    settings = settings or RegisterConfig()
    steps = settings.steps if steps is None else steps
    if isinstance(steps, bool) or int(steps) != steps or steps < 0:
        raise InputError(f"steps: expected an integer >= 0, got {steps!r}")
    if fit not in FITS:
        raise InputError(f"fit_case: fit: expected one of {list(FITS)}, got {fit!r}")
    steps, point = int(steps), fit != "svi"
    clock = time.perf_counter()
    prior = model.prior_distribution(loc.shape[3:], loc.device)  # also the steps' model's
    # σ per voxel only when its steps change it (a point estimate, or no steps, keep the shape given)
    new_guide = functools.partial(CaseGuide, loc, scale, prior, point=point, compact=point or not steps)
    guide = new_guide()  # the initial posterior; rebuilt from (loc, scale) if the guard keeps it
    chunk = latent_chunk(model, guide, loc.shape[3:])  # full-resolution grids: a few latents at a time
    before = elbo_loss(model, guide, images, fixed, settings.guard_particles, chunk=chunk)
    guard_seconds = time.perf_counter() - clock
    step = _step_loss(model, guide, prior, images, fixed, chunk, elbo)
    label = progress if isinstance(progress, str) else "per-case SVI"
    losses, diverged = _run_steps(step, _optimizer(guide, settings, fit), steps, settings,
                                  tqdm(range(steps), desc=label, disable=not progress or not steps, leave=False),
                                  images.shape[1:].numel())
    after = before  # no step taken: the guide is the initial one, whose ELBO is known
    if losses or diverged:
        guard_clock = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Encountered NaN")
            after = elbo_loss(model, guide, images, fixed, settings.guard_particles, chunk=chunk)
        guard_seconds += time.perf_counter() - guard_clock
    kept = "refined"
    if not after <= before:  # also catches NaN
        del guide
        guide = new_guide()
        after, kept = before, "initial"
    info = {"losses": losses, "steps_run": len(losses), "elbo_loss_before": before, "elbo_loss_after": after,
            "kept": kept, "diverged": diverged, "seconds": time.perf_counter() - clock, "guard_seconds": guard_seconds}
    return guide, info


def _step_loss(model: GroupMorphModel, guide: CaseGuide, prior, images: torch.Tensor, fixed, chunk, elbo: str):
    """One SVI step's loss as a call of no arguments that also back-propagates it: one chunk of
    latents at a time on full-resolution grids (:func:`~groupmorph_pyro.model.chunked_map_loss`), the
    MAP loss without Pyro's tracing for a point-estimate mean (:func:`~groupmorph_pyro.model.map_loss`),
    else Pyro's (mean-field) Trace_ELBO."""
    exact = has_map_loss(model, guide, prior)
    if chunk is not None and exact:  # value and gradient, a chunk at a time (it back-propagates itself)
        return functools.partial(chunked_map_loss, model, guide, images, fixed, prior=prior, chunk=chunk)
    if exact:
        loss_fn = functools.partial(map_loss, prior=prior)
    else:
        loss_fn = (TraceMeanField_ELBO() if elbo == "meanfield" else Trace_ELBO()).differentiable_loss

    def step():
        loss = loss_fn(model, guide, images, fixed)
        if torch.isfinite(loss):
            loss.backward()
        return loss
    return step


def _optimizer(guide: CaseGuide, settings: RegisterConfig, fit: str):
    """The optimiser of ``fit`` (:data:`FITS`): the whitened mean at ``settings.lr`` (SGD with Nesterov
    momentum for ``"map-sgd"``, else Adam), and for ``"svi"`` log σ by Adam at ``settings.scale_lr``."""
    if fit == "map-sgd":
        return NesterovSGD([{"params": [guide.whitened], "lr": settings.lr}], momentum=SGD_MOMENTUM)
    groups = [{"params": [guide.whitened], "lr": settings.lr}]
    if fit == "svi":
        groups.append({"params": [guide.log_scale], "lr": settings.lr if settings.scale_lr is None else settings.scale_lr})
    return Adam(groups)


def _run_steps(step, optim, steps: int, settings: RegisterConfig, bar, n_vox: int) -> tuple[list, bool]:
    """``steps`` optimiser steps on ``step()``'s loss with ``settings.schedule`` and iterate averaging
    over the final ``settings.average`` of the steps (the averaged parameters are left in place).
    Returns (losses per voxel, whether a non-finite loss stopped the run)."""
    peaks = [group["lr"] for group in optim.param_groups]
    fitted = [p for group in optim.param_groups for p in group["params"]]  # the optimised parameters (averaged)
    average_from = steps - int(round(settings.average * steps)) if settings.average else None
    averaged, n_avg, losses, diverged = None, 0, [], False
    for i in bar:
        if settings.schedule == "cosine":
            for group, peak in zip(optim.param_groups, peaks):
                group["lr"] = peak * 0.5 * (1 + math.cos(math.pi * i / steps))
        optim.zero_grad()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Encountered NaN")  # handled: reported as `diverged`
            loss = step()
        if not torch.isfinite(loss):  # diverged: stop, the guard restores the initial posterior
            diverged = True
            break
        optim.step()
        if average_from is not None and i >= average_from:  # running mean of the optimised parameters, in place
            n_avg += 1
            if averaged is None:
                averaged = [p.detach().clone() for p in fitted]
            else:
                for a, p in zip(averaged, fitted):
                    a.add_(p.detach().sub(a).div_(n_avg))
        losses.append(loss.detach().item() / n_vox)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    if averaged is not None and not diverged:
        with torch.no_grad():
            for p, a in zip(fitted, averaged):
                p.copy_(a)
    optim.zero_grad()  # the guard needs neither the gradients nor the optimiser's moments
    return losses, diverged


def prepare(images, config: Config | None = None, guide: GroupMorphGuide | None = None, fixed: int | None = None,
            finetune_steps: int | None = None, device: str | torch.device = "cpu", likelihood=None, prior=None,
            landmarks=None, affine=None) -> PreparedGroup:
    """Validate a group and build what registering it needs (arguments as :func:`register`)."""
    images = np.asarray(images.detach().cpu() if isinstance(images, torch.Tensor) else images, dtype=np.float32)
    config = config or Config()
    mcfg = config.model
    k = images.shape[0] if images.ndim == 4 else -1
    if k != mcfg.num_timepoints:
        raise InputError(f"K: the model expects {mcfg.num_timepoints} timepoints, got {k} (images shape {images.shape})")
    if not np.isfinite(images).all():
        raise InputError(f"images: expected finite intensities, got {int((~np.isfinite(images)).sum())} NaN/inf voxels")
    if finetune_steps is not None and (int(finetune_steps) != finetune_steps or finetune_steps < 0):
        raise InputError(f"finetune_steps: expected an integer >= 0, got {finetune_steps!r}")
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise InputError(f"affine: expected a 4x4 voxel -> world matrix, got shape {affine.shape}")
    if not np.isfinite(affine).all():
        raise InputError("affine: expected finite entries, got NaN/inf")
    model = build_model(mcfg, likelihood=likelihood, prior=prior, spacing=affine_spacing(affine))  # prior per mm
    transform = model.transform(fixed, chunk="auto")  # validates fixed against the mode (all-to-one: default 0)
    if landmarks is not None:
        landmarks = np.asarray(landmarks, dtype=np.float64)
        if landmarks.ndim != 3 or landmarks.shape[0] != k or landmarks.shape[2] != 3:
            raise InputError(f"landmarks: expected ({k}, L, 3) voxel coordinates, got shape {landmarks.shape}")
    device = torch.device(device)
    x = normalize_group(images, config.data.percentiles).to(device)
    raw = torch.from_numpy(images)[None].to(device)
    fitted = fit_model(model, config, images.shape[1:], affine_spacing(affine), guide is None and prior is None)
    default_steps = config.register.sample_steps if fitted.control_factor > 1 else config.register.steps
    steps = default_steps if finetune_steps is None and guide is None else int(finetune_steps or 0)
    return PreparedGroup(images, raw, x, config, model, transform, transform.fixed, steps, device, landmarks, affine,
                         fitted)


def fit_model(model: GroupMorphModel, config: Config, shape, spacing, from_zero: bool = True) -> GroupMorphModel:
    """The model a per-case fit from zero ends on: for images on ``shape`` ``(D, H, W)`` with more voxels
    than ``register.fit_voxels``, ``model``'s twin whose latents live on the control grid of
    :func:`~groupmorph_pyro.spatial.control_factor` (its prior's weights moved there, its likelihood
    reading the full-resolution images at ``register.sample_points`` random points per step: see
    :class:`~groupmorph_pyro.model.GroupMorphModel`); ``model`` itself otherwise, i.e. for grids within
    the budget, for fine-tuning a network's posterior (``from_zero`` False, also for a custom prior),
    for likelihoods that need whole images (``lncc``, custom ones), and for priors registered without
    spacing exponents.

    On the control grid the squarings run on a grid ``d`` times coarser than it: the larger of
    ``round(model.integration_downsize / f)`` (about as many image voxels apart as on the image grid)
    and the smallest ``d`` whose grid has at most ``register.integration_voxels`` voxels (0: no
    limit), so that their cost stays bounded however large the control grid."""
    factor = control_factor(shape, config.register.fit_voxels) if from_zero else 1
    if factor == 1 or not is_order_free(model.likelihood) or config.model.prior not in SPACING_EXPONENTS:
        return model
    downsize = max(round(config.model.integration_downsize / factor),
                   control_factor(level_shape(shape, factor), config.register.integration_voxels))
    return build_model(dataclasses.replace(config.model, integration_downsize=downsize * factor),
                       likelihood=model.likelihood, spacing=spacing, control_factor=factor,
                       points=config.register.sample_points)


def infer(group: PreparedGroup, guide: GroupMorphGuide | None = None) -> Posterior:
    """The starting posterior: one amortised network pass (on overlapping tiles when
    ``register.window`` is set), or N(0, σ₀²) with σ₀ = ``register.init_scale`` without a network."""
    cfg = group.config
    if guide is None:
        zero = torch.zeros((1,) * 6, device=group.device)  # expanded views: no memory per voxel
        model = group.fit_model or group.model
        shape = (1, group.transform.num_latent, 3, *model.latent_shape(group.shape))
        return Posterior(zero.expand(shape), torch.full_like(zero, cfg.register.init_scale).expand(shape), model=model)
    guide = guide.to(group.device).eval().set_runtime(**cfg.runtime.options())
    with torch.no_grad():
        if cfg.register.window:
            loc, scale = sliding_window(lambda t: guide.distribution_params(t, group.fixed), group.x,
                                        cfg.register.window, cfg.register.overlap)
        else:
            loc, scale = guide.distribution_params(group.x, group.fixed)
    return Posterior(loc, scale, guide)


def refine(group: PreparedGroup, start: Posterior, progress: bool = False) -> tuple[Posterior, dict | None]:
    """Per-case SVI for ``group.steps`` steps from ``start`` (:func:`fit_case`); returns the refined
    posterior and the fit's report, or ``start`` and None when no steps are asked for.

    From a network's posterior (``start.guide`` set) the mean's peak step is ``register.finetune_lr``
    instead of ``register.lr`` (1.0, Adam's from zero): the network's start is close already.

    Without a network (``start.guide`` is None) and with ``register.pyramid`` coarser than [1] or a
    control grid, the mean is first fitted coarse to fine (:func:`fit_pyramid`) and the last SVI
    phase starts there.

    From zero the mean is fitted as a point estimate (MAP: a Delta guide, no sampling noise from σ in
    its gradient) at every level when the σ reset follows (:func:`mean_fit`), and the σ phase
    (:func:`fit_scale`) then gives the posterior's spread around it. From a network's posterior the
    mean is fitted as a point estimate too and the network's σ is kept; that fine-tuning moves the
    whitened mean by SGD with Nesterov momentum (step ``register.finetune_lr``) rather than Adam,
    whose first steps move every whitened coordinate by about its step, gradient or not, and roughen
    a mean that is close already.
    """
    if group.steps <= 0:
        return start, None
    cfg = group.config.register
    from_network = start.guide is not None
    if from_network:  # a network's posterior is close already: smaller steps (register.finetune_lr)
        cfg = dataclasses.replace(cfg, lr=cfg.finetune_lr)
    fit = mean_fit(group, start)
    levels = []
    model = start.model or group.model  # the model on the latents' grid (a control grid for large images)
    if not from_network and (len(cfg.pyramid) > 1 or model.control_factor > 1):  # a control grid: its own level too
        loc, levels = fit_pyramid(group.model, group.x, group.fixed, start.loc, cfg, group.config.train.elbo, progress,
                                  fit, factor=model.control_factor,
                                  level_model=functools.partial(level_model, group) if model.control_factor > 1 else None)
        start = Posterior(loc, start.scale, model=model)
        del loc
    case, info = fit_case(model, group.x, group.fixed, start.loc, start.scale, cfg,
                          group.steps, group.config.train.elbo, progress, fit=fit)
    info["fit"] = fit
    start = None  # the start's fields are not needed any more (memory)
    if cfg.scale_reset and not from_network:
        case, info["scale_phase"] = fit_scale(model, group.x, group.fixed, case, cfg)
        info["elbo_loss_after"] = info["scale_phase"]["elbo_loss_after"]
    if levels:
        info["levels"] = levels
    with torch.no_grad():
        loc, scale = case.distribution_params()
    return Posterior(loc, scale, case, model), info


def level_model(group: PreparedGroup, factor: int) -> GroupMorphModel:
    """The model of a coarse pyramid level ``factor`` times coarser than the images when the fit ends
    on a control grid (:func:`fit_model`): the group's model as for images of that level's voxel size
    (``model.prior_units: mm``: the prior's weights per mm at ``factor`` × the voxel size; ``voxel``:
    the group's model), the likelihood over the level's whole grid."""
    if group.config.model.prior_units != "mm":
        return group.model
    spacing = tuple(factor * h for h in group.spacing)
    return build_model(group.config.model, likelihood=group.model.likelihood, spacing=spacing)


def mean_fit(group: PreparedGroup, start: Posterior) -> str:
    """How :func:`refine` fits the mean (:data:`FITS`): ``"map-sgd"`` when fine-tuning a network's
    posterior (``start.guide`` set); from zero ``"map"`` when the σ phase resets σ to the prior's
    mean-field optimum (``register.scale_reset`` and a prior with a DCT spectrum), else ``"svi"``
    (mean and σ together)."""
    if start.guide is not None:
        return "map-sgd"
    model = start.model or group.model
    return "map" if _resets_scale(model.prior_distribution(start.loc.shape[3:], group.device),
                                  group.config.register) else "svi"


def _resets_scale(prior, settings: RegisterConfig) -> bool:
    """Whether the σ phase (:func:`fit_scale`) resets σ to the prior's mean-field optimum: asked for
    (``settings.scale_reset``) and possible (a prior with a DCT spectrum)."""
    return bool(settings.scale_reset and isinstance(prior, DCTGaussianField))


def fit_scale(model: GroupMorphModel, images: torch.Tensor, fixed, case: CaseGuide,
              settings: RegisterConfig) -> tuple[CaseGuide, dict]:
    """The posterior's spread around a fitted mean: σ set to the prior's mean-field optimum
    ``1 / sqrt(diag Λ)`` (``settings.scale_reset``; priors with a DCT spectrum; otherwise σ stays the
    guide's), then, with ``settings.covariance == "dct"``, the correlated family of precision
    ``Λ + h I``. Steps on log σ during the mean's fit leave σ far below its ELBO optimum; neither
    phase takes steps of its own.

    The correlated family starts from the diagonal posterior (:func:`correlated_start`, whose
    curvature is 0 after the reset: the prior's covariance) and adds the likelihood's curvature ``h``,
    one number for the whole field, chosen by the ELBO (``settings.scale_particles`` particles, common
    random numbers) on the ladder
    ``c · mean(diag Λ)``, ``c = settings.curvature · 3^j`` (:func:`~groupmorph_pyro.optim.ladder_minimum`;
    ``settings.curvature`` 0: ``h`` stays the start's). The correlated posterior replaces the
    diagonal one when its ELBO is better: a diagonal Normal's marginal sd is far below the posterior's
    when the prior correlates neighbours (the calibration benchmark, ``benchmarks/results/calibration*.json``).

    Returns:
        (guide, ``{"steps_run", "elbo_loss_before", "elbo_loss_after", "kept", "seconds", "guard_seconds",
        "reset", "covariance"}``; ``steps_run`` is 0, ``elbo_loss_before`` the diagonal posterior's;
        ``covariance`` is the family kept, ``"diagonal"`` or ``"dct"``; with ``"dct"`` tried,
        ``"correlated": {"elbo_loss", "seconds", "curvature_median", "curvature_fraction", "tried"}``:
        the chosen ``h`` (median over latents and components), its ``c``, and ``[[c, elbo_loss], ...]``
        of every rung evaluated).
    """
    clock = time.perf_counter()
    model, beta = spread_model(model, settings.scale_beta)
    with torch.no_grad():
        loc, scale = case.distribution_params()
    prior = model.prior_distribution(loc.shape[3:], loc.device)
    reset = _resets_scale(prior, settings)
    if reset:
        scale = prior.precision_diagonal(loc.device, loc.dtype).rsqrt().expand_as(loc)
    guide = CaseGuide(loc, scale, prior, compact=True)
    chunk = latent_chunk(model, guide, loc.shape[3:])
    diagonal = elbo_loss(model, guide, images, fixed, settings.scale_particles, chunk=chunk)
    seconds = time.perf_counter() - clock
    report = {"steps_run": 0, "elbo_loss_before": diagonal, "elbo_loss_after": diagonal, "kept": "refined",
              "seconds": seconds, "guard_seconds": seconds, "reset": reset, "covariance": "diagonal", "beta": beta}
    if settings.covariance == "dct" and isinstance(prior, DCTGaussianField):
        clock = time.perf_counter()
        with torch.no_grad():
            loc, sigma = guide.distribution_params()  # the diagonal posterior's (its mean as the guide stores it)
            start = median_curvature(prior, sigma).to(sigma.dtype)
        unit = float(prior.precision_diagonal(loc.device, torch.float64).mean())
        guard = 0.0

        def family(c: float) -> CaseGuide:  # the correlated posterior with curvature start + c · mean(diag Λ)
            with torch.no_grad():
                modulation, spectrum = correlated_family(prior, sigma, start + c * unit)
            return CaseGuide(loc, modulation, prior, spectrum, compact=True)  # σ and s as they broadcast

        def loss_at(c: float) -> float:
            nonlocal guard
            candidate = family(c)
            guard_clock = time.perf_counter()
            loss = elbo_loss(model, candidate, images, fixed, settings.scale_particles, chunk=chunk)
            guard += time.perf_counter() - guard_clock
            return loss

        if settings.curvature > 0:
            chosen, tried = ladder_minimum(loss_at, settings.curvature)
        else:
            chosen, tried = 0.0, [[0.0, loss_at(0.0)]]
        corr, corr_loss = family(chosen), dict((c, loss) for c, loss in tried)[chosen]
        seconds = time.perf_counter() - clock
        report["correlated"] = {"elbo_loss": corr_loss, "seconds": seconds,
                                "curvature_median": float((start + chosen * unit).median()),
                                "curvature_fraction": chosen, "tried": tried}
        report["seconds"] += seconds
        report["guard_seconds"] += guard  # the rungs' ELBO estimates
        if corr_loss <= diagonal:  # the ELBO decides between the two families
            guide = corr
            report.update(covariance="dct", elbo_loss_after=corr_loss)
    return guide, report


def spread_model(model: GroupMorphModel, beta: float | None) -> tuple[GroupMorphModel, float | None]:
    """The model whose ELBO :func:`fit_scale` scores the posterior's spread with: ``model`` with its
    likelihood's per-voxel weight set to ``beta`` (``register.scale_beta``), or ``model`` itself when
    ``beta`` is None or its likelihood has no weight ``beta`` (a custom callable). Returns (model, the β
    used, or None when the likelihood has none)."""
    weight = getattr(model.likelihood, "beta", None)
    if not isinstance(weight, (int, float)):
        return model, None
    if beta is None:
        return model, float(weight)
    likelihood = copy.copy(model.likelihood)
    likelihood.beta = check_positive("register.scale_beta", beta)
    return model.with_likelihood(likelihood), float(beta)


def correlated_start(prior: DCTGaussianField, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Start of the correlated posterior family from a fitted diagonal one (:func:`fit_scale`).

    A diagonal Normal's ELBO optimum for a Gaussian posterior of precision ``P`` is
    ``σ_i² = 1 / P_ii``; with ``P = Λ + diag(h)`` this gives the likelihood's curvature per voxel,
    ``h_i = 1/σ_i² − Λ_ii``. With its median ``h`` per latent and component (clamped at 0), the
    correlated family :class:`~groupmorph_pyro.priors.CorrelatedNormal` starts at
    :func:`correlated_family` of that ``h``: exactly ``(Λ + h I)⁻¹`` where the curvature is constant,
    the diagonal fit's spread elsewhere.

    Args:
        prior: the model's DCT prior on this grid; sigma: ``(B, K_lat, 3, D, H, W)`` fitted sd (voxels), > 0.
    Returns:
        (modulation ``a`` like sigma, spectrum ``s`` like sigma, curvature ``h`` ``(B, K_lat, 3)``).
    """
    h = median_curvature(prior, sigma)
    modulation, spectrum = correlated_family(prior, sigma, h)
    return modulation, spectrum, h.to(sigma.dtype)


def median_curvature(prior: DCTGaussianField, sigma: torch.Tensor) -> torch.Tensor:
    """The likelihood's curvature a diagonal fit implies, ``h_i = 1/σ_i² − Λ_ii``, as its median over
    the grid per latent and component, clamped at 0 (:func:`correlated_start`).

    Args:
        prior: the model's DCT prior on this grid; sigma: ``(B, K_lat, 3, D, H, W)`` fitted sd (voxels), > 0.
    Returns:
        ``(B, K_lat, 3)`` float64 (a view where σ is shared).
    """
    shape = _check_sigma(prior, sigma, "correlated_start")
    sigma = compact(sigma)  # a σ shared by latents or components (e.g. the σ phase's reset) is computed once
    diag = prior.precision_diagonal(sigma.device, torch.float64)  # (D, H, W)
    excess = (sigma.double().pow(-2) - diag).expand(*sigma.shape[:3], *diag.shape).flatten(3)  # (B', K', 3', N)
    h = excess.median(dim=-1).values.clamp_min(0.0)  # (B', K', 3'): 1 along the dims σ is shared over
    return h.expand(shape[:3])


def correlated_family(prior: DCTGaussianField, sigma: torch.Tensor, curvature) -> tuple[torch.Tensor, torch.Tensor]:
    """The correlated posterior :class:`~groupmorph_pyro.priors.CorrelatedNormal` of precision
    ``Λ + h I`` where a diagonal fit's spread matches it: spectrum ``s(k) = 1 / sqrt(λ(k) + h)`` and
    modulation ``a_i = σ_i sqrt(Λ_ii + h)`` (with σ the prior's mean-field optimum ``1 / sqrt(Λ_ii)``,
    exactly ``(Λ + h I)⁻¹`` up to its diagonal's variation over the grid).

    Args:
        prior: the model's DCT prior on this grid; sigma: ``(B, K_lat, 3, D, H, W)`` sd (voxels), > 0,
            or a view that broadcasts to it; curvature: ``h >= 0``, a float or a tensor
            broadcastable to ``(B, K_lat, 3)`` (per latent and component).
    Returns:
        (modulation ``a`` like sigma, spectrum ``s`` like sigma), views where they broadcast.
    """
    shape = _check_sigma(prior, sigma, "correlated_family")
    h = torch.as_tensor(curvature, dtype=torch.float64, device=sigma.device)
    if not torch.isfinite(h).all() or (h < 0).any():
        raise InputError(f"correlated_family: expected a finite curvature >= 0, got {curvature!r}")
    try:
        hb = torch.broadcast_to(h, shape[:3])[..., None, None, None]
    except RuntimeError:
        raise InputError(f"correlated_family: curvature {tuple(h.shape)} does not broadcast to (B, K_lat, 3) "
                         f"{tuple(shape[:3])}") from None
    sigma = compact(sigma)
    hb = compact(hb)
    diag = prior.precision_diagonal(sigma.device, torch.float64)  # (D, H, W)
    eig = prior.precision_eigenvalues(sigma.device, torch.float64)  # (D, H, W)
    spectrum = (eig + hb).rsqrt()
    modulation = sigma.double() * (diag + hb).sqrt()
    return (modulation.to(sigma.dtype).expand(shape), spectrum.to(sigma.dtype).expand(shape))  # views


def _check_sigma(prior: DCTGaussianField, sigma: torch.Tensor, name: str) -> torch.Size:
    """``sigma``'s shape ``(B, K_lat, 3, D, H, W)`` on the prior's grid, finite and > 0."""
    if tuple(sigma.shape[-3:]) != tuple(prior.spatial_shape) or sigma.dim() != 6:
        raise InputError(f"{name}: expected sigma (B, K_lat, 3, {', '.join(map(str, prior.spatial_shape))}), "
                         f"got {tuple(sigma.shape)}")
    small = compact(sigma)
    if not torch.isfinite(small).all() or (small <= 0).any():
        raise InputError(f"{name}: expected a finite sigma > 0")
    return sigma.shape


MIN_LEVEL_SIZE = 12  # voxels: coarser pyramid levels are skipped


def fit_pyramid(model: GroupMorphModel, images: torch.Tensor, fixed, loc: torch.Tensor, settings: RegisterConfig,
                elbo: str = "trace", progress: bool = False, fit: str = "svi", factor: int = 1,
                level_model=None) -> tuple[torch.Tensor, list]:
    """Coarse-to-fine start for per-case SVI: the same model on coarser grids.

    For each shrink factor f of ``settings.pyramid`` except the last (1): the images are blurred and
    resampled to :func:`~groupmorph_pyro.spatial.level_shape` (f times fewer voxels per axis), the
    current mean is moved to that grid (:func:`~groupmorph_pyro.spatial.resize_displacement`, voxel
    units rescaled) and :func:`fit_case` runs ``settings.coarse_steps`` steps there (levels with an axis
    shorter than ``MIN_LEVEL_SIZE`` = 12 voxels are skipped), under the model's
    prior on the coarse grid and σ starting from ``settings.init_scale`` (``fit`` as :func:`fit_case`'s). A coarse step costs about
    f³ times less than a full-resolution one, and the coarse grids see large motions as small ones.

    With ``factor`` f > 1 (the fit ends on a control grid f times coarser, :func:`fit_model`) the
    levels are ``settings.pyramid`` times f, the last one the control grid itself (its images
    resampled there, ``coarse_steps`` steps), each level's model is ``level_model(level factor)``
    (default ``model``) and the mean is returned on the control grid.

    Args:
        images: ``(1, K, D, H, W)`` in [0, 1]; loc: ``(1, K_lat, 3, d, h, w)`` starting mean (voxels of its grid).
    Returns:
        (the mean on the grid f times coarser than the images, ``(1, K_lat, 3, d, h, w)`` voxels; per-level
        reports ``{"factor", "shape", "steps_run", "kept", "seconds", "guard_seconds"}``).
    """
    full = tuple(images.shape[2:])
    reports = []
    factor = check_integer("factor", factor, 1)
    for level in settings.pyramid if factor > 1 else settings.pyramid[:-1]:
        level = int(level) * factor
        shape = level_shape(full, level)
        if min(shape) < MIN_LEVEL_SIZE:
            continue  # too coarse to hold the anatomy (small volumes run the finer levels only)
        level_loc = _resize_latents(loc, shape)
        scale = torch.full_like(level_loc, settings.init_scale)
        case, info = fit_case(level_model(level) if level_model else model, resample_grid(images, shape), fixed,
                              level_loc, scale, settings, settings.coarse_steps, elbo,
                              progress and f"per-case SVI, level 1/{level}", fit=fit)
        with torch.no_grad():
            loc = case.distribution_params()[0]
        reports.append({"factor": level, "shape": list(shape), "steps_run": info["steps_run"], "kept": info["kept"],
                        "seconds": info["seconds"], "guard_seconds": info["guard_seconds"]})
    with torch.no_grad():
        return _resize_latents(loc, level_shape(full, factor)), reports


def _resize_latents(loc: torch.Tensor, shape) -> torch.Tensor:
    """:func:`~groupmorph_pyro.spatial.resize_displacement` of every field of ``(B, K_lat, 3, D, H, W)``."""
    b, k_lat = loc.shape[:2]
    return resize_displacement(loc.reshape(b * k_lat, 3, *loc.shape[3:]), shape).reshape(b, k_lat, 3, *shape)


def nmi_report(group: PreparedGroup, warped: torch.Tensor, start: Posterior | None = None,
               finetune: dict | None = None) -> dict:
    """The group's mean pairwise NMI (``model.bins``, ``model.histogram``) on the normalised images:
    ``{"before": unregistered, "after": of warped, "start": warped by the maps of the posterior a
    fine-tuning started from (None without fine-tuning; "before" for a start from zero)}``.

    Args:
        warped: ``(1, K, D, H, W)`` the normalised group ``group.x`` warped by the posterior mean's maps.
    """
    mcfg, t = group.config.model, group.transform
    nmi = lambda w: float(group_nmi(w, mcfg.bins, histogram=mcfg.histogram)[0])  # noqa: E731
    with torch.no_grad():
        report = {"before": nmi(group.x), "after": nmi(warped), "start": None}
        if finetune is not None:
            report["start"] = report["before"] if _from_identity(start) else nmi(t.warp(group.x, t.displacements(start.loc)))
    return report


def _from_identity(start: Posterior) -> bool:
    """Whether ``start`` is the start from zero (its maps are the identity)."""
    return not compact(start.loc).any()


class _Kept:
    """The sink :func:`summarise` uses without one of the caller's: each named array of every
    timepoint kept in one ``(K, ...)`` array, allocated when the name first arrives."""

    def __init__(self, num_timepoints: int):
        self.num_timepoints, self.arrays = num_timepoints, {}

    def __call__(self, k: int, arrays: dict) -> None:
        for name, value in arrays.items():
            if name not in self.arrays:
                self.arrays[name] = np.empty((self.num_timepoints, *value.shape), value.dtype)
            self.arrays[name][k] = value


def summarise(group: PreparedGroup, posterior: Posterior, seconds: float, amortized: bool,
              start: Posterior | None = None, finetune: dict | None = None, sink=None) -> RegistrationResult:
    """Maps, inverse maps, det J and the warped group of the posterior mean at full resolution, one
    timepoint at a time, with the summary: NMI before/after, folding, settings, landmark distances
    and the fine-tuning report (compared with the ``start`` posterior it refined).

    Args:
        seconds: the timed inference so far; the time spent computing the forward maps is added.
        sink: ``sink(k, arrays)`` receives timepoint k's full-resolution outputs (a dict of numpy
            arrays: ``"inverse_displacement"`` (3, D, H, W) first for every timepoint, then
            ``"displacement"`` (3, D, H, W), ``"warped"`` and ``"jacobian"`` (D, H, W); voxels, as
            :class:`RegistrationResult` holds them), and the result holds none of them (its four
            field attributes are None): memory for one timepoint's maps, e.g.
            :class:`~groupmorph_pyro.outputs.FolderWriter` writing them as they come. None: the
            result holds them all.
    """
    mcfg, t = group.config.model, posterior_transform(group, posterior)
    model = posterior.model or group.model
    num = group.raw.shape[1]
    kept = _Kept(num) if sink is None else None
    emit = kept or sink
    cpu = lambda v: v.detach().cpu().numpy()  # noqa: E731
    lm = None if group.landmarks is None else torch.as_tensor(np.asarray(group.landmarks, dtype=np.float64))
    common, mapped, warped_x, folded = [], [], [], []
    with torch.no_grad():
        for k in range(num):  # the inverse maps first: every landmark set in the common frame
            inv = t.timepoint_displacement(posterior.loc, k, group.shape, inverse=True)
            if lm is not None:
                common.append(map_points(lm[k:k + 1], inv))
            emit(k, {"inverse_displacement": cpu(inv[0])})
            del inv
        for k in range(num):
            clock = time.perf_counter()
            disp = t.timepoint_displacement(posterior.loc, k, group.shape)
            seconds += time.perf_counter() - clock
            warped_x.append(warp(group.x[:, k:k + 1], disp, check=False)[:, 0])
            jac = jacobian_determinant(disp)[0]
            folded.append(int(torch.count_nonzero(jac <= 0)))
            if lm is not None:  # every set mapped into image k
                mapped.append(torch.cat([map_points(c, disp) for c in common]))
            emit(k, {"displacement": cpu(disp[0]), "warped": cpu(warp(group.raw[:, k:k + 1], disp, check=False)[0, 0]),
                     "jacobian": cpu(jac)})
            del disp, jac
    nmi = nmi_report(group, torch.stack(warped_x, dim=1), start, finetune)
    del warped_x
    voxels = math.prod(group.shape)
    summary = {
        "seconds": seconds,
        "nmi_before": nmi["before"],
        "nmi_after": nmi["after"],
        "folding_percent": [100.0 * n / voxels for n in folded],
        "folding_percent_all": 100.0 * sum(folded) / (voxels * num),
        "amortized": amortized,
        "per_case_steps": group.steps,
        "final_loss_per_voxel": finetune["losses"][-1] if finetune and finetune["losses"] else None,
        "fixed": group.fixed,
        "mode": mcfg.mode,
        "diffeomorphic": mcfg.diffeomorphic,
        "device": str(group.device),
        "package_version": package_version(),
        "model": copy.deepcopy(vars(mcfg)),
        "latent_grid": list(posterior.loc.shape[3:]),
        "control_factor": model.control_factor,
        "sample_points": model.points,
    }
    own = lambda v: cpu(v.contiguous() if 0 in v.stride() else v)  # noqa: E731  (an expanded σ or start: its own array)
    fields = kept.arrays if kept else {}
    result = RegistrationResult(fields.get("warped"), fields.get("displacement"), fields.get("inverse_displacement"),
                                fields.get("jacobian"), own(posterior.loc[0]), own(posterior.scale[0]), summary)
    if lm is not None:
        summary["landmarks"] = landmark_report(group.landmarks, spacing=group.spacing, mapped=torch.stack(mapped))
    if finetune is not None:
        summary["finetune"] = _finetune_report(group, start, finetune, nmi, summary)
    return result


def _finetune_report(group: PreparedGroup, start: Posterior, finetune: dict, nmi: dict, summary: dict) -> dict:
    """What per-case refinement changed against the posterior it started from (NMI, landmarks)."""
    report = {key: finetune[key] for key in ("steps_run", "elbo_loss_before", "elbo_loss_after", "kept", "diverged",
                                             "seconds", "guard_seconds", "fit")}
    for key in ("levels", "scale_phase"):  # coarse levels and the σ steps, each with its seconds
        if key in finetune:
            report[key] = finetune[key]
    report.update(nmi_before=nmi["start"], nmi_after=nmi["after"], nmi_gain=nmi["after"] - nmi["start"])
    if group.landmarks is not None:
        if _from_identity(start):  # the identity's landmarks are reported already
            before = summary["landmarks"]["identity"]
        else:
            with torch.no_grad():
                disp0 = group.transform.displacements(start.loc)
                inv0 = group.transform.inverse_displacements(start.loc)
            before = landmark_report(group.landmarks, disp0[0].cpu(), inv0[0].cpu(), group.spacing)["registered"]
        report.update(landmarks_before_mm=before["mean_mm"],
                      landmarks_after_mm=summary["landmarks"]["registered"]["mean_mm"])
    return report


def posterior_transform(group: PreparedGroup, posterior: Posterior):
    """The :class:`~groupmorph_pyro.group.GroupTransform` of the posterior's model (its latent grid's
    integration), computing a few maps at a time on full-resolution grids."""
    return (posterior.model or group.model).transform(group.fixed, chunk="auto")


def posterior_state(group: PreparedGroup, posterior: Posterior) -> dict:
    """The posterior as numpy arrays and settings (the form :mod:`groupmorph_pyro.posterior` stores and
    draws from): the mean, and the correlated family's per-voxel modulation and spectrum when the
    guide is a per-case guide of that family (``family`` "dct"), else the marginal sd (``family``
    "diagonal": a network's posterior, a diagonal or point-estimate per-case guide, or no guide);
    with the transformation's settings on the latent grid and the image grid's shape."""
    t = posterior_transform(group, posterior)
    guide = posterior.guide
    cpu = lambda v: compact(v.detach())[0].cpu().numpy()  # noqa: E731  (on the CPU: the tensor's memory, no copy)
    state = {"loc": posterior.loc.detach()[0].cpu().numpy(), "family": "diagonal",
             "sigma": cpu(posterior.scale), "spectrum": None, "num_timepoints": t.num_timepoints, "mode": t.mode,
             "fixed": t.fixed, "diffeomorphic": t.diffeomorphic, "integration_steps": t.integration_steps,
             "integration_downsize": t.integration_downsize, "shape": list(group.shape)}
    if isinstance(guide, CaseGuide) and guide.correlated and not guide.point:
        state.update(family="dct", sigma=cpu(guide.log_scale.exp()), spectrum=cpu(guide.log_spectrum.exp()))
    return state


def add_posterior_samples(group: PreparedGroup, posterior: Posterior, result: RegistrationResult, samples: int) -> None:
    """Draw ``samples`` joint posterior samples and add uncertainty maps, the landmarks' posterior
    and arviz InferenceData to ``result`` (and their headline numbers to its summary). Samples of a
    posterior on a control grid are drawn there and their maps moved to the image grid."""
    guide, model = posterior.guide, posterior.model or group.model
    if guide is None:  # no network and no per-case steps: sample the starting posterior N(loc, scale²)
        guide = CaseGuide(posterior.loc, posterior.scale,
                          model.prior_distribution(posterior.loc.shape[3:], posterior.loc.device))
    draws = sample_posterior(model, guide, group.x, group.fixed, samples)
    result.uncertainty = uncertainty_maps(draws, group.raw, group.spacing, group.transform)
    positions = None
    if group.landmarks is not None:
        lp = landmark_posterior(draws, group.landmarks, group.affine, posterior_transform(group, posterior), group.shape)
        result.landmark_posterior = {"mean_mm": lp["mean"], "cov_mm2": lp["cov"]}
        positions = lp["positions"]
    result.inference_data = to_inference_data(draws, group.x, group.spacing, group.transform, positions)
    result.summary["samples"] = int(samples)
    result.summary["folding_probability_max"] = float(result.uncertainty["folding_probability"].max())
    result.summary["displacement_std_mm_mean"] = float(result.uncertainty["displacement_std_mm"].mean())


def register(images, config: Config | None = None, guide: GroupMorphGuide | None = None, fixed: int | None = None,
             finetune_steps: int | None = None, device: str | torch.device = "cpu", seed: int = 0,
             progress: bool = False, likelihood=None, prior=None, samples: int = 0, landmarks=None,
             affine=None, sink=None) -> RegistrationResult:
    """Register a group of K images.

    With ``guide`` (trained): one amortised pass gives the posterior; ``finetune_steps > 0`` then
    refines it by per-case SVI. Without ``guide``: per-case SVI from zero, coarse to fine
    (``config.register.pyramid``), then ``finetune_steps`` (default ``config.register.steps``)
    full-resolution steps and the σ reset (:func:`refine`). Images with more voxels per timepoint
    than ``config.register.fit_voxels`` are fitted on a control grid (:func:`fit_model`): the pyramid's
    levels, the control grid's own among them, on resampled images, then ``finetune_steps`` (default
    ``config.register.sample_steps``) steps reading the full-resolution images at
    ``config.register.sample_points`` random points each; the maps are computed at full resolution once.

    Args:
        images: ``(K, D, H, W)`` raw intensities (numpy or tensor), same grid.
        config: settings (model section must match the guide's, except that an all-moving guide may serve
            an all-to-one ``config.model.mode``: :class:`~groupmorph_pyro.model.FixedFrameGuide`); default:
            the package defaults (:class:`Config`) with K from images.
            ``config.runtime`` (precision, channels_last, compile) is applied to ``guide`` in place,
            ``config.register.window`` runs the network on overlapping tiles (full-resolution volumes).
        fixed: fixed timepoint in all-to-one mode (default 0); must be None in all-moving mode.
        device: torch device for the computation.
        likelihood, prior: custom callables overriding the config's (see GroupMorphModel).
        samples: draw this many posterior samples for uncertainty maps and InferenceData.
        landmarks: ``(K, L, 3)`` 0-based voxel coordinates: landmark distances in the summary
            (before/after fine-tuning) and, with ``samples``, the landmarks' posterior.
        affine: voxel -> world matrix (default identity: 1 mm voxels) giving the spacing for landmark
            distances and uncertainty maps, the frame of landmark posteriors and, with
            ``model.prior_units: mm`` (the default), the prior's weights per voxel.
        seed: seeds Pyro's random streams (torch, numpy, random) for a reproducible result.
        sink: ``sink(k, arrays)`` receives each timepoint's full-resolution maps, inverse maps, det J
            and warped image as they are computed, and the result holds none of them (:func:`summarise`;
            :class:`~groupmorph_pyro.outputs.FolderWriter` writes them to a folder): the memory of
            one timepoint's outputs instead of K. None: the result holds them.
    Returns:
        :class:`RegistrationResult` (posterior-mean fields unless ``sink``; posterior products when ``samples``).
    """
    if int(samples) != samples or samples < 0:
        raise InputError(f"samples: expected an integer >= 0, got {samples!r}")
    config = config or Config()
    guide = serve_guide(guide, config.model.mode, config.model.diffeomorphic)  # an all-moving network serves all-to-one (FixedFrameGuide)
    group = prepare(images, config, guide, fixed, finetune_steps, device, likelihood, prior, landmarks, affine)
    say = _stage if progress else (lambda message: None)
    pyro.set_rng_seed(seed)
    clock = time.perf_counter()
    say(_plan(group, guide))
    start = infer(group, guide)
    posterior, finetune = refine(group, start, progress)
    state = posterior_state(group, posterior)
    if not samples:  # only sampling needs the guide (a per-case one holds its whitened mean: memory)
        posterior = Posterior(posterior.loc, posterior.scale, model=posterior.model)
    if group.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - clock
    say(f"fit took {seconds:.1f} s; computing the maps, inverse maps, det J and NMI at full resolution")
    result = summarise(group, posterior, seconds, guide is not None, start, finetune, sink)
    result.posterior = state
    if samples:
        say(f"drawing {samples} posterior samples (uncertainty maps, landmark posterior)")
        add_posterior_samples(group, posterior, result, samples)
    return result


def _plan(group: PreparedGroup, guide) -> str:
    """What :func:`register` is about to do, in one line."""
    if guide is not None:
        return "amortised network pass"
    if not group.steps:
        return "no network and no per-case steps: identity posterior"
    model = group.fit_model or group.model
    f = model.control_factor
    levels = " -> ".join(f"1/{p * f}" if p * f > 1 else "full" for p in group.config.register.pyramid)
    if f == 1:
        return f"per-case SVI from zero (resolutions {levels}; {group.steps} full-resolution steps)"
    grid = "x".join(map(str, model.latent_shape(group.shape)))
    return (f"per-case SVI from zero on a control grid 1/{f} ({grid}; resolutions {levels}), then {group.steps} steps "
            f"reading the full-resolution images at {model.points} points each")


def _stage(message: str) -> None:
    """One progress line on stderr (shown with ``progress=True``, i.e. without ``--quiet``)."""
    print(f"groupmorph: {message}", file=sys.stderr, flush=True)
