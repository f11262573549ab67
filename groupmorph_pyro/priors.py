"""Priors over velocity/displacement fields.

:class:`LaplacianNormal` is the paper's prior ``z ~ N(0, Λ⁻¹)``, ``Λ = λ_v I + λ_u L`` with ``L``
the graph Laplacian of the voxel grid (6-neighbourhood, free/Neumann boundary), applied
independently to each of the 3 vector components:

    zᵀΛz = λ_v Σ_i z[i]² + λ_u Σ_{edges (i, j)} (z[i] − z[j])²      (each edge once)

``L`` is diagonalised by the orthonormal 3D DCT-II, with eigenvalues
``μ(k) = Σ_axes 2 − 2 cos(π k_a / n_a)``. So ``log|Λ| = Σ_k log(λ_v + λ_u μ(k))`` is exact and
cheap, and an exact sample is ``IDCT(ε / sqrt(λ_v + λ_u μ))`` with white ``ε``.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import torch
from pyro.distributions import TorchDistribution, constraints
from torch.distributions import Independent, Normal, register_kl

from .checks import InputError, Registry, check_integer, check_positive, check_spatial_shape

__all__ = [
    "DCTGaussianField", "LaplacianNormal", "BendingNormal", "PRIORS", "make_prior", "CorrelatedNormal",
    "dct_matrix", "dct3", "idct3", "laplacian_eigenvalues", "laplacian_quadratic_form", "apply_laplacian",
    "SPACING_EXPONENTS", "mean_voxel_size", "voxel_prior_options", "control_grid_options", "compact",
]


@lru_cache(maxsize=64)
def _dct_matrix_cached(n: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    c = math.sqrt(2.0 / n) * torch.cos(math.pi * k * (2 * j + 1) / (2 * n))
    c[0] /= math.sqrt(2.0)
    return c.to(device=device, dtype=dtype)


def dct_matrix(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``C`` (n, n): row k is the k-th eigenvector of the path Laplacian.

    ``C @ C.T == I``; ``C[k, j] = sqrt(2/n) c_k cos(π k (2j+1) / 2n)`` with ``c_0 = 1/sqrt(2)``.
    """
    return _dct_matrix_cached(int(n), str(torch.device(device or "cpu")), dtype)


def _apply_axes(x: torch.Tensor, transpose: bool) -> torch.Tensor:
    d, h, w = x.shape[-3:]
    cd, ch, cw = (dct_matrix(n, x.device, x.dtype) for n in (d, h, w))
    if transpose:
        cd, ch, cw = cd.T, ch.T, cw.T
    return torch.einsum("ad,bh,cw,...dhw->...abc", cd, ch, cw, x)


def dct3(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal 3D DCT-II over the last three axes. ``(..., D, H, W) -> (..., D, H, W)``."""
    return _apply_axes(x, transpose=False)


def idct3(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dct3` (its transpose). ``(..., D, H, W) -> (..., D, H, W)``."""
    return _apply_axes(x, transpose=True)


def laplacian_eigenvalues(spatial_shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Eigenvalues ``μ`` (D, H, W) of the free-boundary grid Laplacian, in DCT index order."""
    out = None
    for axis, n in enumerate(spatial_shape):
        m = 2.0 - 2.0 * torch.cos(math.pi * torch.arange(n, device=device, dtype=torch.float64) / n)
        shape = [1, 1, 1]
        shape[axis] = n
        m = m.reshape(shape)
        out = m if out is None else out + m
    return out.to(dtype)


def laplacian_quadratic_form(z: torch.Tensor) -> torch.Tensor:
    """``Σ_edges (z[i] − z[j])²`` over the last three axes (6-neighbourhood, each edge once).

    ``(..., D, H, W) -> (...)``.
    """
    total = z.new_zeros(z.shape[:-3])
    for dim in (-3, -2, -1):
        if z.shape[dim] > 1:
            total = total + torch.diff(z, dim=dim).pow(2).sum(dim=(-3, -2, -1))
    return total


def _degree(spatial_shape: Sequence[int], device, dtype) -> torch.Tensor:
    """Number of grid neighbours of each voxel (D, H, W): the diagonal of ``L``."""
    deg = torch.zeros(tuple(spatial_shape), device=device, dtype=dtype)
    for axis, n in enumerate(spatial_shape):
        if n == 1:
            continue
        d = torch.full((n,), 2.0, device=device, dtype=dtype)
        d[0] = d[-1] = 1.0
        shape = [1, 1, 1]
        shape[axis] = n
        deg = deg + d.reshape(shape)
    return deg


def apply_laplacian(z: torch.Tensor) -> torch.Tensor:
    """``L z`` over the last three axes (free boundary): ``(L z)_i = Σ_{j ∈ N(i)} (z_i − z_j)``.

    ``(..., D, H, W) -> (..., D, H, W)``.
    """
    out = torch.zeros_like(z)
    for dim in (-3, -2, -1):
        if z.shape[dim] > 1:
            d = torch.diff(z, dim=dim)  # z[i+1] − z[i]
            zero = torch.zeros_like(d.narrow(dim, 0, 1))
            out = out + torch.cat([zero, d], dim=dim) - torch.cat([d, zero], dim=dim)
    return out


class DCTGaussianField(TorchDistribution):
    """Zero-mean Gaussian field whose precision is a function of the grid Laplacian, ``Λ = f(L)``.

    Shared machinery for priors diagonalised by the 3D DCT: subclasses give the precision
    eigenvalues ``f(μ)``, the quadratic form ``zᵀΛz`` and ``diag Λ``; this class provides the
    exact ``log_prob``, DCT ``rsample``, variance, entropy, ``expand`` and the analytic KL from a
    diagonal Normal (for ``TraceMeanField_ELBO``). Event shape ``(3, D, H, W)``: a vector field in
    voxels, components independent.

    Subclass contract: ``_precision_from_mu(mu)`` (elementwise on the (D, H, W) eigenvalue grid),
    ``quadratic_form(z) -> (...)``, ``precision_diagonal(device, dtype) -> (D, H, W)``, and
    ``_kwargs()`` (constructor arguments other than shape, batch_shape and device).
    """

    arg_constraints = {}
    support = constraints.independent(constraints.real, 4)
    has_rsample = True

    def __init__(self, spatial_shape, batch_shape=(), device=None, validate_args=None):
        self.spatial_shape = check_spatial_shape(spatial_shape)
        self.device = torch.device(device or "cpu")
        super().__init__(torch.Size(batch_shape), torch.Size((3, *self.spatial_shape)), validate_args=validate_args)

    def _precision_from_mu(self, mu: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _kwargs(self) -> dict:
        raise NotImplementedError

    def quadratic_form(self, z: torch.Tensor) -> torch.Tensor:
        """``zᵀΛz`` summed over the event dims. ``(..., 3, D, H, W) -> (...)``."""
        raise NotImplementedError

    def precision_diagonal(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """Diagonal of ``Λ`` per voxel, shape (D, H, W)."""
        raise NotImplementedError

    def precision_eigenvalues(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """Eigenvalues of ``Λ`` on the DCT grid, shape (D, H, W)."""
        mu = laplacian_eigenvalues(self.spatial_shape, device=device, dtype=torch.float64)
        return self._precision_from_mu(mu).to(dtype)

    def log_det_precision(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """``log|Λ|`` of the full event (3 components), a scalar."""
        return (3.0 * self.precision_eigenvalues(device, torch.float64).log().sum()).to(dtype)

    def expand(self, batch_shape, _instance=None):
        return type(self)(self.spatial_shape, **self._kwargs(), batch_shape=batch_shape, device=self.device,
                          validate_args=False)

    @property
    def mean(self):
        return torch.zeros(self.batch_shape + self.event_shape, device=self.device)

    @property
    def variance(self):
        var = dct_marginal_variance(1.0 / self.precision_eigenvalues(self.device, torch.float64)).float()
        return var.expand(self.batch_shape + self.event_shape)

    def rsample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape) + self.batch_shape + self.event_shape
        eps = torch.randn(shape, device=self.device)
        return idct3(eps * self.precision_eigenvalues(self.device).rsqrt())

    def log_prob(self, value):
        if value.shape[-4:] != self.event_shape:
            raise InputError(
                f"{type(self).__name__}.log_prob: expected trailing shape {tuple(self.event_shape)} (3, D, H, W), "
                f"got {tuple(value.shape)}"
            )
        n = self.event_shape.numel()
        logdet = self.log_det_precision(value.device, value.dtype)
        return -0.5 * self.quadratic_form(value) + 0.5 * logdet - 0.5 * n * math.log(2 * math.pi)

    def entropy(self):
        n = self.event_shape.numel()
        h = 0.5 * n * (1.0 + math.log(2 * math.pi)) - 0.5 * self.log_det_precision(self.device)
        return h.expand(self.batch_shape)


def compact(tensor: torch.Tensor) -> torch.Tensor:
    """The smallest view of ``tensor`` that broadcasts back to it: size 1 along every dim it is
    expanded over (stride 0), e.g. ``(1, 1, 1, D, H, W)`` for a ``(D, H, W)`` grid expanded to
    ``(B, K_lat, 3, D, H, W)``. Full tensors come back unchanged. Lets per-voxel operations on a
    posterior's σ or spectrum run once per distinct value instead of once per latent and component."""
    for dim in range(tensor.dim()):
        if tensor.shape[dim] > 1 and tensor.stride(dim) == 0:
            tensor = tensor.narrow(dim, 0, 1)
    return tensor


def _event_sum(values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum over the last 4 (event) dims of ``values`` broadcast to ``shape``, without materialising
    it: each summed dim of size 1 counts ``shape[d]`` times. Returns ``shape[:-4]``."""
    values = values.reshape((1,) * (len(shape) - values.dim()) + tuple(values.shape))
    repeats = 1
    for dim in range(-4, 0):
        repeats *= shape[dim] if values.shape[dim] == 1 else 1
    return (values.sum(dim=(-4, -3, -2, -1)) * repeats).expand(shape[:-4])


def dct_marginal_variance(spectrum_sq: torch.Tensor) -> torch.Tensor:
    """Per-voxel variance of ``IDCT(s ⊙ ε)``, ε white: ``Σ_k s_k² C_k(i)²`` with ``C`` the 3D DCT.

    ``(..., D, H, W)`` of ``s²`` on the DCT grid -> ``(..., D, H, W)`` per voxel (same units²).
    """
    d, h, w = spectrum_sq.shape[-3:]
    cd, ch, cw = (dct_matrix(n, spectrum_sq.device, spectrum_sq.dtype).pow(2) for n in (d, h, w))
    return torch.einsum("ad,bh,cw,...abc->...dhw", cd, ch, cw, spectrum_sq)


class CorrelatedNormal(TorchDistribution):
    """Gaussian field ``z = loc + a ⊙ IDCT(s ⊙ ε)``, ε ~ N(0, I): a per-voxel sd ``a`` times a
    stationary field coloured by a per-frequency ``s`` (the variational family of the per-case
    guide's ``register.covariance: dct``).

    Covariance ``S = A Cᵀ diag(s²) C A`` (``A = diag a``, ``C`` the orthonormal 3D DCT). ``s ≡ 1``
    is ``N(loc, diag a²)``; ``a ≡ 1``, ``s² = 1 / (λ(k) + h)`` is exactly ``(Λ + h I)⁻¹`` for a DCT
    prior with eigenvalues ``λ(k)``, the posterior of that prior under a likelihood of constant
    curvature ``h``, whose spatial correlations a diagonal Normal cannot hold.

    Args:
        loc: ``(..., 3, D, H, W)`` mean (voxels); scale ``a`` and spectrum ``s``: > 0, broadcastable
            to it (``a`` in voxels, ``s`` dimensionless). Batch shape ``loc.shape[:-4]``, event ``(3, D, H, W)``.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive, "spectrum": constraints.positive}
    support = constraints.independent(constraints.real, 4)
    has_rsample = True

    def __init__(self, loc, scale, spectrum, validate_args=None):
        if loc.dim() < 4:
            raise InputError(f"CorrelatedNormal: expected loc (..., 3, D, H, W), got shape {tuple(loc.shape)}")
        try:
            shape = torch.broadcast_shapes(loc.shape, scale.shape, spectrum.shape)
        except RuntimeError:
            shape = None
        if shape != loc.shape:
            raise InputError(f"CorrelatedNormal: scale {tuple(scale.shape)} and spectrum {tuple(spectrum.shape)} "
                             f"must broadcast to loc {tuple(loc.shape)}")
        self.loc, self.scale, self.spectrum = loc, scale.expand(shape), spectrum.expand(shape)
        # the broadcast-free versions (a σ or spectrum shared by latents and components stays one grid)
        self._scale, self._spectrum = compact(self.scale), compact(self.spectrum)
        super().__init__(shape[:-4], shape[-4:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape) + self.event_shape
        return CorrelatedNormal(self.loc.expand(shape), self.scale.expand(shape), self.spectrum.expand(shape),
                                validate_args=False)

    @property
    def mean(self):
        return self.loc

    @property
    def variance(self):
        """Marginal variance per voxel and component, ``a_i² Σ_k s_k² C_k(i)²`` (voxels²)."""
        grid = self._spectrum.expand(*self._spectrum.shape[:-3], *self.event_shape[-3:])  # the DCT needs the grid
        return (self._scale.pow(2) * dct_marginal_variance(grid.pow(2))).expand(self.loc.shape)

    def rsample(self, sample_shape=torch.Size()):
        eps = torch.randn(torch.Size(sample_shape) + self.loc.shape, device=self.loc.device, dtype=self.loc.dtype)
        return self.from_noise(eps)

    def from_noise(self, eps: torch.Tensor) -> torch.Tensor:
        """The draw ``loc + a ⊙ IDCT(s ⊙ ε)`` of standard normal noise ``ε`` (loc's shape, or with leading sample dims)."""
        return self.loc + self.scale * idct3(self.spectrum * eps)

    def log_prob(self, value):
        if value.shape[-4:] != self.event_shape:
            raise InputError(f"CorrelatedNormal.log_prob: expected trailing shape {tuple(self.event_shape)} "
                             f"(3, D, H, W), got {tuple(value.shape)}")
        eps = dct3((value - self.loc) / self.scale) / self.spectrum
        return -0.5 * eps.pow(2).sum(dim=(-4, -3, -2, -1)) - self._log_det_sqrt() \
            - 0.5 * self.event_shape.numel() * math.log(2 * math.pi)

    def _log_det_sqrt(self) -> torch.Tensor:
        """``½ log|S| = Σ log a + Σ log s`` over the event, shape = batch shape."""
        shape = self.loc.shape
        return _event_sum(self._scale.log(), shape) + _event_sum(self._spectrum.log(), shape)

    def entropy(self):
        return 0.5 * self.event_shape.numel() * (1.0 + math.log(2 * math.pi)) + self._log_det_sqrt()


class LaplacianNormal(DCTGaussianField):
    """The paper's prior ``N(0, Λ⁻¹)``, ``Λ = λ_v I + λ_u L``, per vector component.

    Args:
        spatial_shape: grid size ``(D, H, W)``.
        lambda_u: weight of the Laplacian (smoothness), >= 0 (0 gives a diagonal Normal).
        lambda_v: weight of the identity (magnitude), > 0 so that the density is proper.
        batch_shape: batch shape (e.g. ``(B, K)`` inside plates); set by :meth:`expand`.
        device: device of samples drawn by :meth:`rsample` (log_prob follows its argument).

    ``log_prob`` is exact (normaliser included); ``rsample`` draws exact samples via the DCT.
    """

    def __init__(self, spatial_shape, lambda_u=1.0, lambda_v=0.01, batch_shape=(), device=None, validate_args=None):
        self.lambda_u = check_positive("lambda_u", lambda_u, allow_zero=True)
        self.lambda_v = check_positive("lambda_v", lambda_v)
        super().__init__(spatial_shape, batch_shape, device, validate_args)

    def _kwargs(self):
        return {"lambda_u": self.lambda_u, "lambda_v": self.lambda_v}

    def _precision_from_mu(self, mu):
        return self.lambda_v + self.lambda_u * mu

    def quadratic_form(self, z):
        lap = laplacian_quadratic_form(z).sum(-1)
        return self.lambda_v * z.pow(2).sum(dim=(-4, -3, -2, -1)) + self.lambda_u * lap

    def precision_diagonal(self, device=None, dtype=torch.float32):
        return self.lambda_v + self.lambda_u * _degree(self.spatial_shape, device, dtype)


class BendingNormal(DCTGaussianField):
    """Second-order (bending-energy-like) smoothness prior ``Λ = λ_v I + λ_b L²``.

    ``zᵀΛz = λ_v ‖z‖² + λ_b ‖L z‖²`` penalises curvature rather than gradients, so affine-like
    (linear) fields cost only through the boundary. Exact log-density: ``L²`` has the DCT
    eigenvectors with eigenvalues ``μ²``.

    Args:
        spatial_shape: ``(D, H, W)``; lambda_b: curvature weight >= 0; lambda_v: > 0.
    """

    def __init__(self, spatial_shape, lambda_b=1.0, lambda_v=0.01, batch_shape=(), device=None, validate_args=None):
        self.lambda_b = check_positive("lambda_b", lambda_b, allow_zero=True)
        self.lambda_v = check_positive("lambda_v", lambda_v)
        super().__init__(spatial_shape, batch_shape, device, validate_args)

    def _kwargs(self):
        return {"lambda_b": self.lambda_b, "lambda_v": self.lambda_v}

    def _precision_from_mu(self, mu):
        return self.lambda_v + self.lambda_b * mu.pow(2)

    def quadratic_form(self, z):
        return self.lambda_v * z.pow(2).sum(dim=(-4, -3, -2, -1)) + self.lambda_b * apply_laplacian(z).pow(2).sum(
            dim=(-4, -3, -2, -1))

    def precision_diagonal(self, device=None, dtype=torch.float32):
        deg = _degree(self.spatial_shape, device, dtype)
        return self.lambda_v + self.lambda_b * (deg.pow(2) + deg)  # (L²)_ii = deg_i² + deg_i


@register_kl(Independent, DCTGaussianField)
def _kl_independent_normal_dct_field(q, p):
    """Analytic ``KL(N(μ, diag σ²) || N(0, Λ⁻¹))`` over the 4 event dims, shape = batch shape.

    ``½ [tr(Λ diag σ²) + μᵀΛμ − n − Σ log σ² − log|Λ|]``, ``tr(Λ diag σ²) = Σ_i Λ_ii σ_i²``.
    """
    base = q.base_dist
    while isinstance(base, Independent):
        base = base.base_dist
    if not isinstance(base, Normal) or q.event_shape != p.event_shape:
        raise NotImplementedError(
            f"KL to {type(p).__name__} needs Normal(loc, scale).to_event(4) with event shape {tuple(p.event_shape)}, "
            f"got {type(base).__name__} with event shape {tuple(q.event_shape)}"
        )
    loc, scale = base.loc, base.scale
    loc, scale = torch.broadcast_tensors(loc, scale)
    var = scale.pow(2)
    diag = p.precision_diagonal(loc.device, loc.dtype)
    trace = (diag * var).sum(dim=(-4, -3, -2, -1))
    n = p.event_shape.numel()
    logdet = p.log_det_precision(loc.device, loc.dtype)
    log_var = 2.0 * scale.log().sum(dim=(-4, -3, -2, -1))
    return 0.5 * (trace + p.quadratic_form(loc) - n - log_var - logdet)


PRIORS = Registry("prior", ("spatial_shape", "device"))
"""Named priors: ``PRIORS.get(name)(spatial_shape, device, **options) -> DCTGaussianField``. The
entry's keyword parameters are its options (``model.prior_options`` in a config); add one with
``@PRIORS.register("name")``."""


@PRIORS.register("laplacian")
def _laplacian_prior(spatial_shape, device=None, lambda_u: float = 1.0, lambda_v: float = 0.01):
    """The paper's ``λ_v I + λ_u L``."""
    return LaplacianNormal(spatial_shape, lambda_u, lambda_v, device=device)


@PRIORS.register("diagonal")
def _diagonal_prior(spatial_shape, device=None, lambda_v: float = 0.01):
    """``λ_v I`` (no smoothness: the Laplacian prior with λ_u = 0)."""
    return LaplacianNormal(spatial_shape, 0.0, lambda_v, device=device)


@PRIORS.register("bending")
def _bending_prior(spatial_shape, device=None, lambda_b: float = 6.0, lambda_v: float = 0.001):
    """``λ_v I + λ_b L²`` (second-order smoothness). The defaults are weights per mm (see
    :func:`voxel_prior_options`), chosen on the Table 1 groups (docs/benchmarks.md): per mm, one pair
    of weights serves the DCE phantom at 1 mm and the anatomy at 2.5 and 3.5 mm."""
    return BendingNormal(spatial_shape, lambda_b, lambda_v, device=device)


SPACING_EXPONENTS = {"bending": {"lambda_b": -2, "lambda_v": 2}, "laplacian": {"lambda_u": 0, "lambda_v": 2},
                     "diagonal": {"lambda_v": 2}}
"""Per built-in prior, how each weight scales with the voxel size ``h`` (mm) when the weights are
given per mm (``model.prior_units: mm``): the voxel-unit weight is ``weight · h**exponent``."""


def mean_voxel_size(spacing) -> float:
    """The voxel size ``h`` (mm) the prior's weights per mm use: the geometric mean of ``spacing``,
    3 voxel sizes > 0 (mm) along the array axes."""
    values = tuple(float(v) for v in spacing) if spacing is not None else ()
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise InputError(f"spacing: expected 3 voxel sizes > 0 (mm), got {spacing!r}")
    return math.prod(values) ** (1.0 / 3.0)


def voxel_prior_options(name: str, options: dict, spacing) -> dict:
    """The voxel-unit weights of prior ``name`` whose ``options`` are given in physical units (mm).

    The prior's energy per voxel is then the continuum energy density of the velocity ``v`` in mm,
    ``λ_b |Δv|² + λ_v |v|²`` (bending; ``λ_u |∇v|² + λ_v |v|²`` for the Laplacian), with derivatives
    in mm, while the likelihood keeps its weight per voxel. For a field in voxels ``u = v / h`` and
    the grid operators ``L ≈ −h² Δ``, ``∇_grid ≈ h ∇``::

        λ_b |Δv|² = λ_b h⁻² |L u|²,    λ_u |∇v|² = λ_u |∇_grid u|²,    λ_v |v|² = λ_v h² |u|²,

    i.e. ``weight · h**SPACING_EXPONENTS[name][weight]``. At 1 mm the weights are unchanged. So a
    coarser scan of the same anatomy gets a weaker curvature penalty per voxel: the same smoothness
    in mm. Anisotropic voxels use the geometric mean of the spacing as ``h`` (:func:`mean_voxel_size`; the grid operators stay
    isotropic in voxels).

    Args:
        name: a prior of :data:`SPACING_EXPONENTS`; options: its weights (missing ones take the
            entry's defaults); spacing: voxel size (mm) along the 3 array axes, each > 0.
    Returns:
        the complete options (every weight of the entry) in voxel units.
    """
    if name not in SPACING_EXPONENTS:
        raise InputError(f"prior {name!r}: weights in mm need its spacing exponents; known for "
                         f"{sorted(SPACING_EXPONENTS)} (set model.prior_units: voxel for other priors)")
    h = mean_voxel_size(spacing)
    merged = {**PRIORS.options(name), **PRIORS.check_options(name, dict(options), "model.prior_options")}
    return {key: value * h ** SPACING_EXPONENTS[name].get(key, 0) for key, value in merged.items()}


def control_grid_options(name: str, options: dict, factor: int) -> dict:
    """The weights of prior ``name`` on a control grid ``factor`` times coarser than the image grid
    (:func:`~groupmorph_pyro.spatial.level_shape`), from its weights per image voxel ``options``.

    A smooth field ``u`` (image voxels) held on the control grid as ``u_c = u / f`` (control voxels)
    has, per image voxel, the energy its control-grid samples give with the grid spacing ``f``
    (:func:`voxel_prior_options` with ``h = f``); one control voxel stands for ``f³`` image voxels.
    So ``weight_c = weight · f**(exponent + 3)``: bending ``λ_b f``, ``λ_v f⁵``; Laplacian ``λ_u f³``.
    The prior on the control grid then matches the image grid's for fields smooth on the control
    grid's scale, and so does its balance with the likelihood of the whole image grid.

    Args:
        name: a prior of :data:`SPACING_EXPONENTS`; options: its weights per image voxel (missing
            ones take the entry's defaults); factor: integer f >= 1 (1 returns the options complete).
    Returns:
        the complete options on the control grid.
    """
    factor = check_integer("factor", factor, 1)
    return {key: value * factor ** 3 for key, value in voxel_prior_options(name, options, (factor,) * 3).items()}


def make_prior(name: str = "laplacian", **options):
    """The prior named ``name`` in :data:`PRIORS` with ``options``, as ``prior(spatial_shape, device)``.

    Unknown names or options, and invalid values (checked on a tiny grid), fail here, not at the
    first SVI step.
    """
    entry = PRIORS.get(name)
    PRIORS.check_options(name, options, "model.prior_options")
    entry((2, 2, 2), None, **options)  # validates the values (cheap: nothing is computed)

    def prior(spatial_shape, device=None):
        return entry(spatial_shape, device, **options)

    return prior
