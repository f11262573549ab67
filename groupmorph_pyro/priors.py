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

from .checks import InputError, check_positive, check_spatial_shape

__all__ = ["LaplacianNormal", "dct_matrix", "dct3", "idct3", "laplacian_eigenvalues", "laplacian_quadratic_form"]


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


class LaplacianNormal(TorchDistribution):
    """Gaussian field prior ``N(0, Λ⁻¹)``, ``Λ = λ_v I + λ_u L``, per vector component.

    Args:
        spatial_shape: grid size ``(D, H, W)``.
        lambda_u: weight of the Laplacian (smoothness), >= 0.
        lambda_v: weight of the identity (magnitude), > 0 so that the density is proper.
        batch_shape: batch shape (e.g. ``(B, K)`` inside plates); set by :meth:`expand`.
        device: device of samples drawn by :meth:`rsample` (log_prob follows its argument).

    Event shape is ``(3, D, H, W)``: a vector field in voxels. ``log_prob`` is exact (normaliser
    included); ``rsample`` draws exact samples via the DCT.
    """

    arg_constraints = {}
    support = constraints.independent(constraints.real, 4)
    has_rsample = True

    def __init__(self, spatial_shape, lambda_u=1.0, lambda_v=0.01, batch_shape=(), device=None, validate_args=None):
        self.spatial_shape = check_spatial_shape(spatial_shape)
        self.lambda_u = check_positive("lambda_u", lambda_u, allow_zero=True)
        self.lambda_v = check_positive("lambda_v", lambda_v)
        self.device = torch.device(device or "cpu")
        super().__init__(torch.Size(batch_shape), torch.Size((3, *self.spatial_shape)), validate_args=validate_args)

    # --- helpers -------------------------------------------------------------------------------
    def precision_eigenvalues(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """``λ_v + λ_u μ`` on the DCT grid, shape (D, H, W)."""
        mu = laplacian_eigenvalues(self.spatial_shape, device=device, dtype=torch.float64)
        return (self.lambda_v + self.lambda_u * mu).to(dtype)

    def log_det_precision(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """``log|Λ|`` of the full event (3 components), a scalar."""
        return (3.0 * self.precision_eigenvalues(device, torch.float64).log().sum()).to(dtype)

    def quadratic_form(self, z: torch.Tensor) -> torch.Tensor:
        """``zᵀΛz`` summed over the event dims. ``(..., 3, D, H, W) -> (...)``."""
        lap = laplacian_quadratic_form(z).sum(-1)
        return self.lambda_v * z.pow(2).sum(dim=(-4, -3, -2, -1)) + self.lambda_u * lap

    def precision_diagonal(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """Diagonal of ``Λ`` per voxel, ``λ_v + λ_u deg(i)``, shape (D, H, W)."""
        return self.lambda_v + self.lambda_u * _degree(self.spatial_shape, device, dtype)

    # --- Distribution API ----------------------------------------------------------------------
    def expand(self, batch_shape, _instance=None):
        return LaplacianNormal(
            self.spatial_shape, self.lambda_u, self.lambda_v, batch_shape, self.device, validate_args=False
        )

    @property
    def mean(self):
        return torch.zeros(self.batch_shape + self.event_shape, device=self.device)

    @property
    def variance(self):
        inv = 1.0 / self.precision_eigenvalues(self.device, torch.float64)
        d, h, w = self.spatial_shape
        cd, ch, cw = (dct_matrix(n, self.device, torch.float64).pow(2) for n in (d, h, w))
        var = torch.einsum("ad,bh,cw,abc->dhw", cd, ch, cw, inv).float()
        return var.expand(self.batch_shape + self.event_shape)

    def rsample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape) + self.batch_shape + self.event_shape
        eps = torch.randn(shape, device=self.device)
        return idct3(eps * self.precision_eigenvalues(self.device).rsqrt())

    def log_prob(self, value):
        if value.shape[-4:] != self.event_shape:
            raise InputError(
                f"LaplacianNormal.log_prob: expected trailing shape {tuple(self.event_shape)} (3, D, H, W), "
                f"got {tuple(value.shape)}"
            )
        n = self.event_shape.numel()
        logdet = self.log_det_precision(value.device, value.dtype)
        return -0.5 * self.quadratic_form(value) + 0.5 * logdet - 0.5 * n * math.log(2 * math.pi)

    def entropy(self):
        n = self.event_shape.numel()
        h = 0.5 * n * (1.0 + math.log(2 * math.pi)) - 0.5 * self.log_det_precision(self.device)
        return h.expand(self.batch_shape)


@register_kl(Independent, LaplacianNormal)
def _kl_independent_normal_laplacian(q, p):
    """Analytic ``KL(N(μ, diag σ²) || N(0, Λ⁻¹))`` over the 4 event dims, shape = batch shape.

    ``½ [tr(Λ diag σ²) + μᵀΛμ − n − Σ log σ² − log|Λ|]``, ``tr(Λ diag σ²) = Σ_i Λ_ii σ_i²``.
    """
    base = q.base_dist
    while isinstance(base, Independent):
        base = base.base_dist
    if not isinstance(base, Normal) or q.event_shape != p.event_shape:
        raise NotImplementedError(
            f"KL to LaplacianNormal needs Normal(loc, scale).to_event(4) with event shape {tuple(p.event_shape)}, "
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
