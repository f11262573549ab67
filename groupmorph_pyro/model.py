"""GroupMorph as a Pyro program: generative model and variational guides (same site names).

Site names: ``"z"`` (latent fields, batch ``(B, K_lat)``, event ``(3, D, H, W)``) inside plates
``"groups"`` (dim −2) and ``"timepoints"`` (dim −1); ``"likelihood"`` (a ``pyro.factor``).
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import warnings

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
import torch.nn.functional as F
from pyro.nn import PyroModule, PyroParam

from .checks import InputError, check_arity, check_bool, check_integer, check_positive, check_tensor
from .group import GroupTransform, check_mode, latent_indices, relative_to_fixed, timepoints_per_batch, warp_group
from .likelihoods import (ORDER_FREE, GroupNMI, GroupSimilarity, check_likelihood, is_order_free,
                          sampled_log_likelihood)
from .networks import UNet3D, check_compile, check_precision, network_autocast
from .preprocess import crop_to_shape, pad_to_multiple
from .priors import (CorrelatedNormal, DCTGaussianField, LaplacianNormal, compact, control_grid_options, dct3, idct3,
                     make_prior, voxel_prior_options)
from .spatial import level_shape, random_points

__all__ = ["LocalParamsModule", "GroupMorphModel", "GroupMorphGuide", "FixedFrameGuide", "serve_guide", "CaseGuide", "build_model", "prior_options_for", "build_guide",
           "build_likelihood", "map_loss", "has_map_loss", "latent_chunk", "chunked_map_loss", "chunked_elbo_loss"]


class LocalParamsModule(PyroModule):
    """PyroModule whose parameters live in the module, never in Pyro's global param store.

    Pyro's ``module_local_params`` setting is switched on only while this module is built and
    called, so two guides (e.g. a trained one and a per-case one, or two checkpoints) never
    silently share parameters by name, and a plain torch optimizer over ``.parameters()`` is the
    single owner of the state.
    """

    def __init__(self, name: str = ""):
        with pyro.settings.context(module_local_params=True):
            super().__init__(name)

    def __call__(self, *args, **kwargs):
        with pyro.settings.context(module_local_params=True):
            return super().__call__(*args, **kwargs)


def _check_images(images: torch.Tensor, num_timepoints: int) -> torch.Tensor:
    check_tensor("images", images, ndim=5, layout="(B, K, D, H, W)")
    if images.shape[1] != num_timepoints:
        raise InputError(f"images: expected K={num_timepoints} timepoints on dim 1, got {tuple(images.shape)}")
    return images


class GroupMorphModel(PyroModule):
    """Generative model of a group of K images (no learnable parameters)::

        for b in groups:                                           plate "groups"     (dim −2)
            for k in latent timepoints (k ≠ p, or every k):        plate "timepoints" (dim −1)
                z[b, k] ~ N(0, (λ_v I + λ_u L)⁻¹)                  site "z", event (3, D, H, W)
            v_k = 0 for k = p (all-to-one) | v = z − mean_k z (all-moving)
            φ_k = exp(v_k)  (scaling and squaring)  |  Id + v_k  (non-diffeomorphic)
            x ~ ∝ exp(β · N_vox · mean_{i≠j} NMI(x_i∘φ_i, x_j∘φ_j))  factor "likelihood"
        displacement = φ − Id, jacobian = det Jφ     deterministic sites, only when
                                                     ``record_deterministic`` is set (posterior sampling)

    Args:
        num_timepoints: K.
        mode: ``"all-to-one"`` or ``"all-moving"`` (pairwise = all-to-one with K=2).
        diffeomorphic: z is a velocity (True) or a displacement (False).
        integration_steps: scaling-and-squaring steps T.
        integration_downsize: the squarings run on a grid this many times coarser and the maps are
            resampled back (1, the default: the full grid; see :func:`~groupmorph_pyro.spatial.integrate_velocity`).
        jitter: the likelihood compares the group read on the voxel lattice shifted by a random
            sub-voxel offset, a new one per evaluation (see :class:`~groupmorph_pyro.group.GroupTransform`);
            False, the default here (the paper's), reads it on the lattice.
        prior: callable ``prior(spatial_shape: tuple, device) -> distribution`` with event shape
            ``(3, D, H, W)`` (e.g. ``priors.make_prior("bending", lambda_b=2.0)``, a lambda around
            :class:`~groupmorph_pyro.priors.BendingNormal`, or your own Pyro distribution); default
            the paper's :class:`LaplacianNormal` (λ_u = 1, λ_v = 0.01).
            Give it an analytic KL (``torch.distributions.register_kl``) to use TraceMeanField_ELBO.
        likelihood: callable ``likelihood(warped: (B, K, D, H, W)) -> (B,)`` log-likelihood up to a
            constant (e.g. :class:`~groupmorph_pyro.likelihoods.GroupSimilarity`); default
            :class:`GroupNMI` with β = 1.
        control_factor: 1 (the default): the latents live on the image grid; f > 1: on the control grid
            f times coarser (:meth:`latent_shape`), each map integrated there (the squarings on the
            control grid made ``round(integration_downsize / f)`` times coarser, at least 1: about
            ``integration_downsize`` image voxels apart, as on the image grid, or the control grid's own
            spacing where that is coarser) and interpolated wherever the images are read. Needs ``points``.
        points: 0 (the default): the likelihood sees the whole warped group; S >= 1: each evaluation
            reads the group at about S points drawn at random over the grid (stratified:
            :func:`~groupmorph_pyro.spatial.random_points`), only those points warped
            (:meth:`~groupmorph_pyro.group.GroupTransform.read_group`), and the likelihood of the whole
            grid is estimated from them (``β · N_vox · similarity`` of the samples; a similarity of
            :data:`~groupmorph_pyro.likelihoods.ORDER_FREE`). Its cost is set by S and the latent grid,
            not by the image grid; the random points also do ``jitter``'s work, which is then unused.

    Both are checked when the model is built (signature) and when it runs (shapes).
    """

    def __init__(self, num_timepoints: int, mode: str = "all-to-one", diffeomorphic: bool = True,
                 integration_steps: int = 7, prior: Callable | None = None, likelihood: Callable | None = None,
                 integration_downsize: int = 1, jitter: bool = False, control_factor: int = 1, points: int = 0):
        super().__init__()
        check_mode(mode, num_timepoints, None if mode == "all-moving" else 0)
        self.num_timepoints = int(num_timepoints)
        self.mode = mode
        self.diffeomorphic = bool(diffeomorphic)
        self.integration_steps = int(integration_steps)
        self.integration_downsize = check_integer("integration_downsize", integration_downsize, 1)
        self.jitter = check_bool("jitter", jitter)
        self.control_factor = check_integer("control_factor", control_factor, 1)
        self.points = check_integer("points", points, 0)
        if self.control_factor > 1 and not self.points:
            raise InputError(f"control_factor {self.control_factor}: the likelihood of a control-grid model reads the "
                             f"images at sample points; expected points >= 1, got 0")
        if prior is not None:
            check_arity("prior", prior, 2, "prior(spatial_shape: tuple, device) -> distribution with event (3, D, H, W)")
        if likelihood is not None:
            check_likelihood(likelihood)
        self.prior = prior or make_prior("laplacian")
        self.likelihood = likelihood or GroupNMI()
        if self.points and not is_order_free(self.likelihood):
            raise InputError(f"points: a likelihood read at sample points needs a similarity in {ORDER_FREE}, got "
                             f"{getattr(self.likelihood, 'name', type(self.likelihood).__name__)!r}")
        self.record_deterministic = False  # set by posterior sampling: adds "displacement" and "jacobian" sites

    def latent_shape(self, spatial_shape) -> tuple:
        """The grid of the latent fields for images on ``spatial_shape`` ``(D, H, W)``: the same grid, or
        with ``control_factor`` f > 1 the control grid f times coarser (:func:`~groupmorph_pyro.spatial.level_shape`)."""
        return level_shape(tuple(spatial_shape), self.control_factor)

    def forward(self, images: torch.Tensor, fixed: int | None = None) -> torch.Tensor:
        """Run the generative story on ``images`` ``(B, K, D, H, W)`` in [0, 1].

        Returns:
            ``(B, K, 3, d, h, w)`` displacements ``φ_k − Id`` on the latent grid (:meth:`latent_shape`:
            the image grid unless ``control_factor`` > 1), in its voxels.
        """
        _check_images(images, self.num_timepoints)
        transform = self.transform(fixed, jitter=self.jitter)
        b = images.shape[0]
        prior = self.prior_distribution(self.latent_shape(images.shape[2:]), images.device)
        with pyro.plate("groups", b, dim=-2):
            with pyro.plate("timepoints", transform.num_latent, dim=-1):
                z = pyro.sample("z", prior)
            disp, log_lik = self._log_likelihood(transform, z, images)
            pyro.factor("likelihood", log_lik.unsqueeze(-1))
        if self.record_deterministic:  # outside the plates: whole-tensor events, on the image grid
            disp = transform.resized(disp, images.shape[2:])
            pyro.deterministic("displacement", disp, event_dim=disp.dim())
            jac = transform.jacobians(disp)
            pyro.deterministic("jacobian", jac, event_dim=jac.dim())
        return disp

    def _log_likelihood(self, transform: GroupTransform, z: torch.Tensor, images: torch.Tensor):
        """``(disp, log p(x | z))``: the maps of ``z`` ``(B, K_lat, 3, d, h, w)`` on its grid and the
        likelihood ``(B,)`` of the group they warp (:meth:`forward`'s, and :func:`map_loss`'s). With
        ``points`` S, the group is read at S points drawn anew per call
        (:meth:`~groupmorph_pyro.group.GroupTransform.read_group`) and the likelihood of the whole grid
        estimated from them (:func:`~groupmorph_pyro.likelihoods.sampled_log_likelihood`)."""
        if tuple(z.shape[3:]) != self.latent_shape(images.shape[2:]):
            raise InputError(f"latents {tuple(z.shape)} are not on the latent grid {self.latent_shape(images.shape[2:])} "
                             f"of images {tuple(images.shape)} (control_factor {self.control_factor})")
        if not self.points:
            disp, warped = transform(z, images)
            return disp, _checked_log_lik(self, warped)
        disp = transform.displacements(z)
        points = random_points(images.shape[2:], self.points, images.device, images.dtype)
        values = transform.read_group(disp, images, points)
        return disp, sampled_log_likelihood(self.likelihood, values, images.shape[2:].numel())

    def with_likelihood(self, likelihood: Callable) -> "GroupMorphModel":
        """A copy of this model (same prior, mode, variant) whose likelihood is ``likelihood``
        (e.g. :class:`~groupmorph_pyro.likelihoods.SubsampledLikelihood` of this one); ``self`` is unchanged."""
        check_likelihood(likelihood)
        other = copy.copy(self)
        other.likelihood = likelihood
        return other

    def transform(self, fixed: int | None = None, chunk=None, jitter: bool = False) -> GroupTransform:
        """The group's transformation (latents -> maps, warped group) for fixed timepoint ``fixed``
        (all-to-one; None = 0) under this model's mode and variant; ``chunk`` and ``jitter`` as in
        GroupTransform (the model's own likelihood passes ``self.jitter``; reports and validation
        read the group on the lattice)."""
        downsize = max(1, round(self.integration_downsize / self.control_factor))  # of the latent grid (see control_factor)
        return GroupTransform(self.num_timepoints, self.mode, fixed, self.diffeomorphic, self.integration_steps, chunk,
                              downsize, jitter)

    def prior_distribution(self, spatial_shape, device=None):
        """The prior of one latent field on a ``(D, H, W)`` grid (event shape ``(3, D, H, W)``), checked."""
        prior = self.prior(tuple(spatial_shape), device)
        event = (3, *spatial_shape)
        if tuple(getattr(prior, "event_shape", ())) != event:
            raise InputError(f"prior: expected a distribution with event shape {event} (3, D, H, W), "
                             f"got {type(prior).__name__} with event shape {tuple(getattr(prior, 'event_shape', ()))}")
        return prior


class GroupMorphGuide(LocalParamsModule):
    """Amortised guide ``q(z | x) = N(μ, diag σ²)`` from a 3D U-Net over the K images on channels.

    ``μ = α · tanh(conv(features))`` (α voxels), ``σ² = softplus(conv(features))``. In all-to-one
    mode the input channels are rotated so that the fixed image comes first (the network is told
    which timepoint is fixed by position), which lets one network serve any fixed timepoint.

    With ``cascade`` S > 1 (a recursive cascade, still one pass): S U-Nets of the same channels, each
    after the first seeing the group warped by the mean so far, ``x_k ∘ (Id + μ_k)`` (first order in μ;
    in all-to-one mode the fixed image stays put), and adding its head's output to the mean's
    pre-activation: ``μ = α · tanh(m_1 + … + m_S)``, ``m_s = conv_s(U-Net_s(x ∘ (Id + α·tanh(m_1 + … + m_{s−1}))))``.
    The variance comes from the first U-Net's features. Every stage's head starts at zero, so the
    cascade starts at the identity like one U-Net, and S = 1 is the paper's guide (same state dict).

    Args:
        num_timepoints: K; mode: as the model; alpha: bound on ``|μ|`` in voxels;
        encoder, decoder: U-Net channels; init_softplus_bias: initial pre-softplus variance
            (−10 gives σ ≈ 0.007 voxels); cascade: number of U-Nets S (integer >= 1).
    """

    def __init__(self, num_timepoints: int, mode: str = "all-to-one", alpha: float = 15.0,
                 encoder=(16, 32, 32, 32), decoder=(32, 32, 32, 32, 32, 16, 16), init_softplus_bias: float = -10.0,
                 cascade: int = 1):
        super().__init__()
        check_mode(mode, num_timepoints, None if mode == "all-moving" else 0)
        self.num_timepoints, self.mode = int(num_timepoints), mode
        self.alpha = check_positive("alpha", alpha)
        self.cascade = check_integer("cascade", cascade, 1)
        self.unet = UNet3D(self.num_timepoints, encoder, decoder)
        self.mean_head = _head(self.unet.out_channels, 3 * self.num_timepoints, 0.0)
        self.var_head = _head(self.unet.out_channels, 3 * self.num_timepoints, init_softplus_bias)
        self.refine = nn.ModuleList()  # stages 2..S of the cascade: a U-Net and a mean head each
        for _ in range(self.cascade - 1):
            unet = UNet3D(self.num_timepoints, encoder, decoder)
            self.refine.append(nn.Sequential(unet, _head(unet.out_channels, 3 * self.num_timepoints, 0.0)))
        self.precision, self.channels_last, self.compile_backend = "fp32", False, None
        self._compiled = None  # (id(self), compiled callable): a copy of the guide recompiles its own

    def set_runtime(self, precision: str = "fp32", channels_last: bool = False, compile=False) -> "GroupMorphGuide":
        """Choose how the network runs (in place; speed and memory only, outputs agree to rounding).

        Args:
            precision: ``"fp32"`` or ``"bf16"`` (autocast of the U-Net and heads; the mean and
                variance nonlinearities, fields, integration and likelihood stay fp32).
            channels_last: store conv weights and inputs as ``channels_last_3d``.
            compile: ``False``, ``True`` (inductor) or a ``torch.compile`` backend name; the U-Net
                and heads are compiled on first use (each new input shape compiles again).
        Returns:
            self. The state dict is unchanged (checkpoints stay loadable by eager fp32 guides).
        """
        precision, backend = check_precision(precision), check_compile(compile)
        if (precision, bool(channels_last), backend) == (self.precision, self.channels_last, self.compile_backend):
            return self  # unchanged: keep the compiled network (register calls this for every group)
        self.precision, self.channels_last, self.compile_backend = precision, bool(channels_last), backend
        self.to(memory_format=torch.channels_last_3d if self.channels_last else torch.contiguous_format)
        self._compiled = None
        return self

    def runtime(self) -> dict:
        """The current :meth:`set_runtime` settings (``compile`` as a backend name or False)."""
        return {"precision": self.precision, "channels_last": self.channels_last,
                "compile": self.compile_backend or False}

    def _head_outputs(self, x: torch.Tensor):
        """Pre-activation mean and variance ``(B, 3K, D, H, W)`` each, from images ``(B, K, D, H, W)``
        rotated so that the fixed one (all-to-one) comes first."""
        feats = self.unet(x)
        mean = self.mean_head(feats)
        for stage in self.refine:
            mean = mean + stage(self._moved(x, mean))
        return mean, self.var_head(feats)

    def _moved(self, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """The group ``(B, K, D, H, W)`` warped by the first-order maps ``Id + α·tanh(mean)`` of the
        pre-activation ``mean`` ``(B, 3K, D, H, W)`` (voxels); in all-to-one mode channel 0, the fixed
        image, is not moved."""
        b, k = x.shape[:2]
        disp = (self.alpha * torch.tanh(mean)).reshape(b, k, 3, *x.shape[2:])
        if self.mode == "all-to-one":
            disp = torch.cat([torch.zeros_like(disp[:, :1]), disp[:, 1:]], dim=1)
        return warp_group(x, disp.to(x.dtype))

    def _network(self):
        if self.compile_backend is None:
            return self._head_outputs
        if self._compiled is None or self._compiled[0] != id(self):
            self._compiled = (id(self), torch.compile(self._head_outputs, backend=self.compile_backend))
        return self._compiled[1]

    def distribution_params(self, images: torch.Tensor, fixed: int | None = None):
        """Guide mean and scale for the latent timepoints.

        Args:
            images: ``(B, K, D, H, W)`` in [0, 1].
        Returns:
            ``(loc, scale)``, each ``(B, K_lat, 3, D, H, W)`` in voxels.
        """
        _check_images(images, self.num_timepoints)
        fixed = check_mode(self.mode, self.num_timepoints, fixed)
        shift = fixed or 0
        x, shape = pad_to_multiple(torch.roll(images, -shift, dims=1), self.unet.divisor)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        if self.precision == "bf16" and x.device.type == "cpu":
            warnings.warn("precision 'bf16' on the CPU: bf16 3D convolutions can be far slower than fp32 on CPUs "
                          "without native bf16 support (75x slower in benchmarks/README.md); use it on a GPU",
                          RuntimeWarning, stacklevel=2)
        with network_autocast(x.device.type, self.precision):
            mean, var = self._network()(x)
        b, k = images.shape[:2]
        loc = self.alpha * torch.tanh(mean.float())
        scale = F.softplus(var.float()).clamp_min(1e-12).sqrt()
        loc, scale = (torch.roll(crop_to_shape(t, shape).reshape(b, k, 3, *shape), shift, dims=1) for t in (loc, scale))
        idx = latent_indices(self.num_timepoints, self.mode, fixed)
        return loc[:, idx], scale[:, idx]

    def forward(self, images: torch.Tensor, fixed: int | None = None) -> torch.Tensor:
        loc, scale = self.distribution_params(images, fixed)
        with pyro.plate("groups", images.shape[0], dim=-2):
            with pyro.plate("timepoints", loc.shape[1], dim=-1):
                return pyro.sample("z", dist.Normal(loc, scale).to_event(4))


def _head(channels_in: int, channels_out: int, bias: float) -> nn.Conv3d:
    """A guide head: 3³ convolution with near-zero weights (std 1e-5) and a constant bias."""
    head = nn.Conv3d(channels_in, channels_out, 3, padding=1)
    nn.init.normal_(head.weight, std=1e-5)
    nn.init.constant_(head.bias, bias)
    return head


class FixedFrameGuide(nn.Module):
    """An all-moving :class:`GroupMorphGuide` served as an all-to-one guide for any fixed timepoint.

    The network runs once in all-moving mode; :func:`~groupmorph_pyro.group.relative_to_fixed` turns
    its K fields into the K − 1 fields of the chosen fixed timepoint's frame. Training all-moving is
    one task for the network (all-to-one training with a random fixed timepoint is K tasks in one
    network, which learns far slower), and this serves every fixed timepoint from
    that one network. Parameters are the wrapped guide's (same state dict under ``moving.``).
    The conversion is second order in the fields (exact for translations); for smooth fields of up to
    2 voxels its error against the exact composition is measured in tests/test_serving.py.

    Args:
        moving: a GroupMorphGuide trained in all-moving mode; diffeomorphic: as the model (velocities
            or displacements: the composition's second-order term differs).
    """

    mode = "all-to-one"

    def __init__(self, moving: GroupMorphGuide, diffeomorphic: bool = True):
        super().__init__()
        self.diffeomorphic = bool(diffeomorphic)
        if not isinstance(moving, GroupMorphGuide) or moving.mode != "all-moving":
            raise InputError(f"FixedFrameGuide: expected a GroupMorphGuide in all-moving mode, got "
                             f"{getattr(moving, 'mode', type(moving).__name__)!r}")
        self.moving = moving
        self.num_timepoints, self.alpha = moving.num_timepoints, moving.alpha

    def set_runtime(self, **options) -> "FixedFrameGuide":
        """:meth:`GroupMorphGuide.set_runtime` of the wrapped guide; returns self."""
        self.moving.set_runtime(**options)
        return self

    def runtime(self) -> dict:
        return self.moving.runtime()

    def distribution_params(self, images: torch.Tensor, fixed: int | None = None):
        """``(loc, scale)``, each ``(B, K − 1, 3, D, H, W)`` in voxels, in the frame of ``fixed``
        (default 0); images ``(B, K, D, H, W)`` in [0, 1]."""
        fixed = check_mode("all-to-one", self.num_timepoints, fixed)
        return relative_to_fixed(*self.moving.distribution_params(images, None), fixed, self.diffeomorphic)

    def forward(self, images: torch.Tensor, fixed: int | None = None) -> torch.Tensor:
        loc, scale = self.distribution_params(images, fixed)
        with pyro.plate("groups", images.shape[0], dim=-2):
            with pyro.plate("timepoints", loc.shape[1], dim=-1):
                return pyro.sample("z", dist.Normal(loc, scale).to_event(4))


def serve_guide(guide, mode: str, diffeomorphic: bool = True):
    """The amortised guide to use for a model in ``mode``: ``guide`` itself when the modes agree,
    a :class:`FixedFrameGuide` for an all-moving guide asked to serve all-to-one; anything else
    (an all-to-one guide for an all-moving model) is refused. ``None`` passes through."""
    if guide is None or getattr(guide, "mode", None) == mode:
        return guide
    if mode == "all-to-one" and getattr(guide, "mode", None) == "all-moving":
        return FixedFrameGuide(guide, diffeomorphic)
    raise InputError(f"guide: trained in {getattr(guide, 'mode', None)!r} mode cannot serve a {mode!r} model "
                     f"(an all-moving network serves any fixed timepoint; the converse has no common frame)")


_MIN_EIGENVALUE = 0.01  # floor on the per-case guide's whitening spectrum (see CaseGuide)


class CaseGuide(LocalParamsModule):
    """Per-case guide: free variational parameters for one batch of groups (per-case SVI).

    The mean is stored whitened in the prior's DCT basis, ``μ = IDCT(w / sqrt(λ(k)))`` with ``λ(k)``
    the prior's precision eigenvalues, which preconditions gradient steps (smooth modes move first,
    as the prior allows); σ is stored as ``log σ``. The spectrum is shifted up so that its smallest
    eigenvalue is at least 0.01: the (nearly) unpenalised constant mode of a prior with a tiny λ_v
    (e.g. the VoxelMorph baseline) would otherwise take steps of size lr / sqrt(λ_v).

    Args:
        loc: ``(B, K_lat, 3, D, H, W)`` initial mean (voxels), e.g. zeros or the amortised output.
        scale: initial σ, same shape (or broadcastable), > 0.
        prior: the model's prior on this grid (a :class:`~groupmorph_pyro.priors.DCTGaussianField`,
            whose spectrum whitens the mean); None or another distribution: the paper's Laplacian
            prior's spectrum (λ_u = 1, λ_v = 0.01).
        spectrum: None (the default) for the diagonal Normal ``N(μ, σ²)``; or a per-frequency
            colouring ``s > 0`` broadcastable to loc, for the correlated family
            :class:`~groupmorph_pyro.priors.CorrelatedNormal` ``z = μ + σ ⊙ IDCT(s ⊙ ε)`` (then σ is
            the per-voxel modulation, and :meth:`distribution_params` returns the marginal sd).
        point: True for a point estimate: q is a Delta at the mean (SVI with it is MAP estimation of
            the mean: the ELBO becomes the log joint at μ); σ is kept but neither used nor changed.
            Not with ``spectrum``.
        compact: False (the default) stores log σ and the log spectrum per voxel, latent and component
            (parameters to optimise); True keeps them in the broadcastable shape given (a σ shared by
            every latent and component stays one ``(D, H, W)`` grid: :func:`~groupmorph_pyro.priors.compact`),
            for posteriors whose σ is not optimised (a point estimate, or the σ phase without steps),
            which saves 2 × 3·K_lat floats per voxel at full resolution. Same distribution either way.
    """

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, prior=None, spectrum: torch.Tensor | None = None,
                 point: bool = False, compact: bool = False):
        super().__init__()
        check_tensor("loc", loc, ndim=6, layout="(B, K_lat, 3, D, H, W)")
        self.point = check_bool("point", point)
        self.compact = check_bool("compact", compact)
        if point and spectrum is not None:
            raise InputError("CaseGuide: a point estimate (point=True) has no spectrum; got one")
        if not isinstance(prior, DCTGaussianField):
            prior = LaplacianNormal(loc.shape[3:])
        if tuple(prior.spatial_shape) != tuple(loc.shape[3:]):
            raise InputError(f"CaseGuide: prior grid {tuple(prior.spatial_shape)} does not match loc {tuple(loc.shape)}")
        eig = prior.precision_eigenvalues(loc.device, torch.float64)
        eig = eig + (_MIN_EIGENVALUE - eig.min()).clamp_min(0.0)
        self.register_buffer("_eig", eig.to(loc.dtype), persistent=False)
        self.whitened = PyroParam(dct3(loc.detach()) * self._sqrt_eig(loc))
        self.log_scale = PyroParam(self._stored_log("scale", scale, loc))
        if spectrum is not None:
            if not torch.isfinite(spectrum).all() or (spectrum <= 0).any():
                raise InputError("CaseGuide: expected a finite spectrum > 0, got min "
                                 f"{float(spectrum.min()) if spectrum.numel() else 'empty'}")
            self.log_spectrum = PyroParam(self._stored_log("spectrum", spectrum, loc))
        else:
            self.log_spectrum = None

    def _stored_log(self, name: str, value: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        """``log value`` broadcast to loc's shape: per voxel, or (``compact``) as small as it broadcasts."""
        try:
            value = torch.broadcast_to(value.detach().to(loc.dtype), loc.shape)
        except RuntimeError:
            raise InputError(f"CaseGuide: {name} {tuple(value.shape)} does not broadcast to loc {tuple(loc.shape)}") from None
        return compact(value).log() if self.compact else value.log().clone()

    def _latents(self, tensor: torch.Tensor, latents) -> torch.Tensor:
        """``tensor`` (``(B, K_lat or 1, ...)``) restricted to the latent timepoints ``latents`` (a slice; None: all)."""
        return tensor if latents is None or tensor.shape[1] == 1 else tensor[:, latents]

    def mean(self, whitened: torch.Tensor | None = None) -> torch.Tensor:
        """μ = IDCT(w / sqrt(λ')) ``(B, n, 3, D, H, W)`` (voxels) of the whitened mean ``w`` (default the
        guide's; or a slice of its latents)."""
        w = self.whitened if whitened is None else whitened
        return idct3(w / self._sqrt_eig(w))

    def _sqrt_eig(self, ref: torch.Tensor) -> torch.Tensor:
        return self._eig.to(ref.device, ref.dtype).sqrt()

    @property
    def correlated(self) -> bool:
        """True for the :class:`~groupmorph_pyro.priors.CorrelatedNormal` family (a spectrum is set)."""
        return self.log_spectrum is not None

    def distribution(self, latents: slice | None = None) -> dist.TorchDistribution:
        """q(z): ``Normal(μ, σ).to_event(4)``, ``CorrelatedNormal(μ, σ, s)`` or (``point``) ``Delta(μ)``,
        batch ``(B, K_lat)``; with ``latents`` (a slice) the factor of those latent timepoints only
        (the latents are independent under q), batch ``(B, n)``."""
        loc = self.mean(self._latents(self.whitened, latents))
        if self.point:
            return dist.Delta(loc, event_dim=4)
        scale = self._latents(self.log_scale, latents).exp()
        if self.correlated:
            return CorrelatedNormal(loc, scale, self._latents(self.log_spectrum, latents).exp())
        return dist.Normal(loc, scale).to_event(4)

    def point_log_prior(self, prior: DCTGaussianField, whitened: torch.Tensor | None = None) -> torch.Tensor:
        """``log p(μ)`` ``(B, K_lat)`` under ``prior`` (the DCT prior this guide was whitened with), read off the
        whitened mean: ``μ̂ = w / sqrt(λ')`` in the DCT basis, so ``μᵀΛμ = Σ_k (λ(k) / λ'(k)) w(k)²`` (``λ'``
        the floored spectrum, equal to ``λ`` above the floor); no transform of μ, no stencil. ``whitened``:
        the guide's (default) or a slice of its latents, ``(B, n, 3, D, H, W)`` -> ``(B, n)``."""
        if not isinstance(prior, DCTGaussianField) or tuple(prior.spatial_shape) != tuple(self.whitened.shape[3:]):
            raise InputError(f"point_log_prior: expected the DCT prior on the guide's grid {tuple(self.whitened.shape[3:])}, "
                             f"got {type(prior).__name__} on {tuple(getattr(prior, 'spatial_shape', ()))}")
        w = self.whitened if whitened is None else whitened
        ratio = prior.precision_eigenvalues(w.device, torch.float64) / self._eig.to(w.device, torch.float64)
        quadratic = (w.pow(2) * ratio.to(w.dtype)).sum(dim=(-4, -3, -2, -1))
        n = w.shape[-4:].numel()
        const = 0.5 * prior.log_det_precision(w.device, torch.float64) - 0.5 * n * math.log(2 * math.pi)
        return -0.5 * quadratic + const.to(w.dtype)

    def distribution_params(self):
        """``(loc, scale)``, each ``(B, K_lat, 3, D, H, W)`` in voxels; scale is the marginal sd (for a
        point estimate: the stored σ, which its fit leaves unchanged)."""
        q = self.distribution()
        sd = compact(q.variance).sqrt() if self.correlated else self.log_scale.exp()  # compact: once per distinct σ
        return q.mean, sd.expand_as(q.mean)

    def forward(self, images: torch.Tensor, fixed: int | None = None) -> torch.Tensor:
        q = self.distribution()
        if images.shape[0] != q.batch_shape[0] or any(c > n for c, n in zip(q.event_shape[1:], images.shape[2:])):
            raise InputError(f"CaseGuide: parameters {tuple(q.batch_shape + q.event_shape)} do not fit images "
                             f"{tuple(images.shape)}")
        with pyro.plate("groups", q.batch_shape[0], dim=-2):
            with pyro.plate("timepoints", q.batch_shape[1], dim=-1):
                return pyro.sample("z", q)


def map_loss(model: GroupMorphModel, guide: CaseGuide, images: torch.Tensor, fixed: int | None = None,
             prior: DCTGaussianField | None = None) -> torch.Tensor:
    """``−log p(x, z = μ)`` of a point-estimate guide, summed over the batch: Trace_ELBO's loss for it
    (the Delta's log q is 0), computed without Pyro's tracing and with the prior term read off the
    whitened mean (:meth:`CaseGuide.point_log_prior`): the per-case MAP step's objective, cheaper
    than tracing model and guide. Needs what :func:`has_map_loss` checks.

    Args:
        model: a GroupMorphModel; guide: a ``CaseGuide(point=True)``; images: ``(B, K, D, H, W)``;
        prior: ``model.prior_distribution`` on the grid (built here when None).
    Returns:
        a scalar tensor (nats).
    """
    _check_images(images, model.num_timepoints)
    prior = model.prior_distribution(model.latent_shape(images.shape[2:]), images.device) if prior is None else prior
    if not has_map_loss(model, guide, prior):
        raise InputError("map_loss: expected a GroupMorphModel (forward not overridden, no recorded sites), a "
                         "CaseGuide(point=True) and a model prior with a DCT spectrum")
    z = guide.distribution().mean
    if images.shape[0] != z.shape[0] or tuple(z.shape[3:]) != model.latent_shape(images.shape[2:]):
        raise InputError(f"map_loss: guide {tuple(z.shape)} does not fit images {tuple(images.shape)}")
    _, log_lik = model._log_likelihood(model.transform(fixed, jitter=model.jitter), z, images)
    return -(guide.point_log_prior(prior).sum() + log_lik.sum())


def has_map_loss(model, guide, prior=None) -> bool:
    """Whether :func:`map_loss` equals Trace_ELBO's loss for ``(model, guide)``: the package's model
    (its ``forward`` not overridden by a subclass, no deterministic sites recorded), a point-estimate
    :class:`CaseGuide` and a prior with a DCT spectrum (what the guide whitens with); ``prior``: the
    model's prior on the guide's grid when the caller has it (built here when None)."""
    if not (isinstance(model, GroupMorphModel) and type(model).forward is GroupMorphModel.forward
            and not model.record_deterministic and isinstance(guide, CaseGuide) and guide.point):
        return False
    prior = model.prior_distribution(tuple(guide.whitened.shape[3:])) if prior is None else prior
    return isinstance(prior, DCTGaussianField)


def latent_chunk(model, guide, spatial_shape) -> int | None:
    """Latent timepoints at a time of the memory-bounded per-case path (:func:`chunked_map_loss`,
    :func:`chunked_elbo_loss`): :func:`~groupmorph_pyro.group.timepoints_per_batch` of the grid (the
    maps :class:`~groupmorph_pyro.group.GroupTransform` integrates together under ``chunk="auto"``)
    when that is fewer than the guide's latents and the path applies: the package's model (``forward``
    not overridden, no recorded sites) in all-to-one mode and a :class:`CaseGuide`. None otherwise
    (small grids: one batch, Pyro's ELBO and :func:`map_loss`, which are faster).

    Args:
        spatial_shape: ``(D, H, W)`` of the grid the guide lives on.
    """
    if not _chunkable(model, guide):
        return None
    chunk = timepoints_per_batch(spatial_shape)
    return chunk if chunk < guide.whitened.shape[1] else None


def _chunkable(model, guide) -> bool:
    """Whether the chunked per-case path computes what Pyro's ELBO of ``(model, guide)`` would."""
    return (isinstance(model, GroupMorphModel) and type(model).forward is GroupMorphModel.forward
            and not model.record_deterministic and model.mode == "all-to-one" and not model.points
            and isinstance(guide, CaseGuide))


def _latent_slices(num_latent: int, chunk: int) -> list[slice]:
    chunk = check_integer("chunk", chunk, 1)
    return [slice(start, min(start + chunk, num_latent)) for start in range(0, num_latent, chunk)]


def _checked_log_lik(model: GroupMorphModel, warped: torch.Tensor) -> torch.Tensor:
    """The model's likelihood of the warped group ``(B, K, D, H, W)``, checked to be ``(B,)``."""
    log_lik = model.likelihood(warped)
    if not isinstance(log_lik, torch.Tensor) or log_lik.shape != (warped.shape[0],):
        got = tuple(log_lik.shape) if isinstance(log_lik, torch.Tensor) else type(log_lik).__name__
        raise InputError(f"likelihood: expected a tensor of shape (B,) = ({warped.shape[0]},), got {got}")
    return log_lik


def chunked_map_loss(model: GroupMorphModel, guide: CaseGuide, images: torch.Tensor, fixed: int | None = None,
                     prior: DCTGaussianField | None = None, chunk: int = 1) -> torch.Tensor:
    """:func:`map_loss` and its gradient, ``chunk`` latent timepoints at a time: the memory-bounded
    per-case MAP step of full-resolution grids (512×512×136). Returns the loss (a detached scalar,
    nats) and **accumulates its gradient into** ``guide.whitened.grad`` itself (call no ``backward``).

    In all-to-one mode each moving image depends on its own latent only, and the likelihood on the
    latents only through the warped group. So: (1) without autograd, each chunk's mean is
    integrated and its images warped (one jitter offset δ for the whole evaluation); (2) the
    likelihood of the assembled group is differentiated with respect to the warped images only
    (``K`` floats per voxel); (3) each chunk is recomputed with autograd and back-propagated with its
    part of that gradient, plus its prior term. Autograd never holds more than one chunk's graph,
    at the cost of a second forward pass of the maps. Same value and gradient as
    ``map_loss(...).backward()`` for the same random draws (tests/test_chunked.py).

    Args:
        model: the package's GroupMorphModel in all-to-one mode; guide: a ``CaseGuide(point=True)``;
        images: ``(B, K, D, H, W)``; prior: the model's prior on the grid (built when None); chunk: >= 1.
    """
    _check_images(images, model.num_timepoints)
    prior = model.prior_distribution(tuple(images.shape[2:]), images.device) if prior is None else prior
    if not (has_map_loss(model, guide, prior) and _chunkable(model, guide)):
        raise InputError("chunked_map_loss: expected the package's GroupMorphModel in all-to-one mode, a "
                         "CaseGuide(point=True) and a model prior with a DCT spectrum")
    w = guide.whitened
    if images.shape[0] != w.shape[0] or images.shape[2:] != w.shape[3:]:
        raise InputError(f"chunked_map_loss: guide {tuple(w.shape)} does not fit images {tuple(images.shape)}")
    transform = model.transform(fixed, jitter=model.jitter)
    idx, parts = transform.latent_indices, _latent_slices(w.shape[1], chunk)
    delta = transform.draw_offset()  # before the likelihood's own draws, as in the model's forward
    with torch.no_grad():
        moving = torch.cat([transform.warp_latents(guide.mean(w[:, part]), images[:, idx[part]], delta)
                            for part in parts], dim=1)
    warped = transform.with_fixed(moving, images, delta).requires_grad_()
    del moving
    neg_log_lik = -_checked_log_lik(model, warped).sum()
    neg_log_lik.backward()
    upstream, loss = warped.grad, neg_log_lik.detach()
    del warped
    if w.grad is None:
        w.grad = torch.zeros_like(w)
    for part in parts:
        w_part = w[:, part].detach().requires_grad_()
        warped_part = transform.warp_latents(guide.mean(w_part), images[:, idx[part]], delta)
        log_prior = guide.point_log_prior(prior, w_part).sum()
        ((upstream[:, idx[part]] * warped_part).sum() - log_prior).backward()
        w.grad[:, part] += w_part.grad
        loss = loss - log_prior.detach()
    return loss


def chunked_elbo_loss(model: GroupMorphModel, guide: CaseGuide, images: torch.Tensor, fixed: int | None = None,
                      prior=None, particles: int = 1, chunk: int = 1) -> torch.Tensor:
    """Trace_ELBO's loss ``−(log p(x, z) − log q(z))`` for a :class:`CaseGuide`, averaged over
    ``particles`` draws ``z ~ q``, summed over the batch, computed ``chunk`` latent timepoints at a
    time (call it under ``torch.no_grad()``): q and the prior factor over the latents and, in
    all-to-one mode, each moving image depends on its own latent, so a particle's latents are drawn,
    scored and used to warp their images chunk by chunk, and only the warped group (``K`` floats per
    voxel) is held for the likelihood. The memory-bounded guard of full-resolution grids
    (:func:`~groupmorph_pyro.registration.elbo_loss`); the same estimator as Trace_ELBO (noise drawn in
    another order, so another draw for one seed).

    Args:
        model: the package's GroupMorphModel in all-to-one mode; guide: a CaseGuide (any family);
        images: ``(B, K, D, H, W)``; prior: the model's prior on the grid (built when None);
        particles, chunk: >= 1.
    Returns:
        a scalar tensor (nats).
    """
    _check_images(images, model.num_timepoints)
    if not _chunkable(model, guide):
        raise InputError("chunked_elbo_loss: expected the package's GroupMorphModel in all-to-one mode and a CaseGuide")
    w = guide.whitened
    if images.shape[0] != w.shape[0] or images.shape[2:] != w.shape[3:]:
        raise InputError(f"chunked_elbo_loss: guide {tuple(w.shape)} does not fit images {tuple(images.shape)}")
    prior = model.prior_distribution(tuple(images.shape[2:]), images.device) if prior is None else prior
    transform = model.transform(fixed, jitter=model.jitter)
    idx, parts = transform.latent_indices, _latent_slices(w.shape[1], chunk)
    total = images.new_zeros(())
    for _ in range(check_integer("particles", particles, 1)):
        delta = transform.draw_offset()
        moving, log_ratio = [], images.new_zeros(())
        for part in parts:
            q = guide.distribution(part)
            z = q.rsample()
            log_ratio = log_ratio + (prior.log_prob(z) - q.log_prob(z)).sum()
            moving.append(transform.warp_latents(z, images[:, idx[part]], delta))
            del z, q
        warped = transform.with_fixed(torch.cat(moving, dim=1), images, delta)
        del moving
        total = total - (_checked_log_lik(model, warped).sum() + log_ratio)
    return total / particles


def build_likelihood(cfg) -> GroupSimilarity:
    """Likelihood named by a :class:`~groupmorph_pyro.config.ModelConfig` (likelihood, reduction, beta, bins, histogram)."""
    if cfg.likelihood == "nmi" and cfg.reduction == "pairs" and not cfg.likelihood_options:
        return GroupNMI(cfg.beta, cfg.bins, histogram=cfg.histogram)
    options = dict(cfg.likelihood_options)
    if cfg.likelihood in ("nmi", "mi"):
        options.setdefault("bins", cfg.bins)
        options.setdefault("histogram", cfg.histogram)
    return GroupSimilarity(cfg.likelihood, cfg.reduction, cfg.beta, **options)


def prior_options_for(cfg, spacing=None) -> dict:
    """The voxel-unit weights of the prior a :class:`~groupmorph_pyro.config.ModelConfig` names, for a
    group with voxel size ``spacing`` (mm, 3 axes; None = 1 mm): ``cfg.prior_options`` as given with
    ``prior_units: voxel``, scaled by :func:`~groupmorph_pyro.priors.voxel_prior_options` with ``mm``."""
    if cfg.prior_units == "voxel":
        return dict(cfg.prior_options)
    return voxel_prior_options(cfg.prior, cfg.prior_options, (1.0, 1.0, 1.0) if spacing is None else spacing)


def build_model(cfg, likelihood: Callable | None = None, prior: Callable | None = None,
                spacing=None, control_factor: int = 1, points: int = 0) -> GroupMorphModel:
    """Model from a :class:`~groupmorph_pyro.config.ModelConfig`; ``likelihood``/``prior`` override it.

    ``spacing``: the group's voxel size (mm, 3 axes; None = 1 mm), which sets the prior's voxel-unit
    weights when ``cfg.prior_units`` is ``"mm"`` (:func:`prior_options_for`); a ``prior`` given here is
    used as it is. ``control_factor`` f > 1: the latents live on the control grid f times coarser,
    under the config's prior with its weights moved there
    (:func:`~groupmorph_pyro.priors.control_grid_options`; a ``prior`` given here is refused), and the
    likelihood reads the images at ``points`` random points per evaluation (see :class:`GroupMorphModel`)."""
    options = prior_options_for(cfg, spacing)
    if check_integer("control_factor", control_factor, 1) > 1:
        if prior is not None:
            raise InputError("control_factor: a control grid moves the config's prior weights to it; a custom prior "
                             "callable cannot be moved (use control_factor 1)")
        options = control_grid_options(cfg.prior, options, control_factor)
    return GroupMorphModel(
        cfg.num_timepoints, cfg.mode, cfg.diffeomorphic, cfg.integration_steps,
        prior=prior or make_prior(cfg.prior, **options),
        likelihood=likelihood or build_likelihood(cfg), integration_downsize=cfg.integration_downsize,
        jitter=cfg.jitter, control_factor=control_factor, points=points,
    )


def build_guide(cfg) -> GroupMorphGuide:
    """Amortised guide from a :class:`~groupmorph_pyro.config.ModelConfig`."""
    return GroupMorphGuide(cfg.num_timepoints, cfg.mode, cfg.alpha, tuple(cfg.encoder), tuple(cfg.decoder),
                           cascade=cfg.cascade)
