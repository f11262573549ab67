"""Image-similarity likelihoods.

NMI definition used throughout: ``NMI(A, B) = 2 I(A; B) / (H(A) + H(B))`` in [0, 1], computed
from a differentiable Gaussian Parzen-window joint histogram of intensities in [0, 1] (images are
expected 1–99 percentile normalised, see :mod:`groupmorph_pyro.preprocess`). ``bins`` centres sit
at ``(b + ½)/bins``; the kernel width is ``sigma = sigma_ratio / bins`` (default one half bin width).

Group likelihood (paper): ``log p(x | z) = β · N_vox · mean_{i≠j} NMI(φ_i∘x_i, φ_j∘x_j) + const``.
The factor ``N_vox`` (voxels per image) makes ``β`` a *per-voxel* weight, on the same footing as
the prior's log-density which Pyro sums over voxels (VoxelMorph averages both per voxel instead,
which is the same optimum with ``β`` scaled).
"""
from __future__ import annotations

import torch

from .checks import InputError, check_positive, check_tensor

__all__ = ["parzen_weights", "nmi", "group_nmi", "GroupNMI"]

_EPS = 1e-10


def parzen_weights(x: torch.Tensor, bins: int = 32, sigma_ratio: float = 0.5) -> torch.Tensor:
    """Soft bin memberships of each voxel.

    Args:
        x: ``(B, N)`` intensities (expected in [0, 1]).
        bins: number of histogram bins (>= 2).
        sigma_ratio: Gaussian kernel width in bin widths.
    Returns:
        ``(B, N, bins)`` non-negative weights, each voxel's row summing to 1.
    """
    if int(bins) != bins or bins < 2:
        raise InputError(f"bins: expected an integer >= 2, got {bins!r}")
    centres = (torch.arange(bins, device=x.device, dtype=x.dtype) + 0.5) / bins
    sigma = sigma_ratio / bins
    w = torch.exp(-0.5 * ((x[..., None] - centres) / sigma) ** 2)  # (B, N, bins)
    return w / (w.sum(-1, keepdim=True) + _EPS)


def _entropy(p: torch.Tensor, dims) -> torch.Tensor:
    return -(p * (p + _EPS).log()).sum(dim=dims)


def _nmi_from_weights(wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """NMI from Parzen weights ``(B, N, bins)`` x2 -> ``(B,)``."""
    joint = torch.einsum("bni,bnj->bij", wa, wb) / wa.shape[1]  # (B, bins, bins)
    pa, pb = joint.sum(-1), joint.sum(-2)  # (B, bins)
    ha, hb, hab = _entropy(pa, -1), _entropy(pb, -1), _entropy(joint, (-2, -1))
    return 2.0 * (ha + hb - hab) / (ha + hb + _EPS)


def nmi(a: torch.Tensor, b: torch.Tensor, bins: int = 32, sigma_ratio: float = 0.5) -> torch.Tensor:
    """Differentiable NMI between image batches.

    Args:
        a, b: ``(B, *spatial)`` intensities in [0, 1], same shape.
        bins: histogram bins; sigma_ratio: kernel width in bins.
    Returns:
        ``(B,)`` NMI in [0, 1] (1 for a perfect one-to-one intensity relation, 0 for independence).
    """
    check_tensor("a", a)
    check_tensor("b", b)
    if a.shape != b.shape or a.dim() < 2:
        raise InputError(f"nmi: expected a and b of equal shape (B, ...), got {tuple(a.shape)} and {tuple(b.shape)}")
    wa = parzen_weights(a.reshape(a.shape[0], -1), bins, sigma_ratio)
    wb = parzen_weights(b.reshape(b.shape[0], -1), bins, sigma_ratio)
    return _nmi_from_weights(wa, wb)


def group_nmi(images: torch.Tensor, bins: int = 32, sigma_ratio: float = 0.5) -> torch.Tensor:
    """Mean NMI over ordered pairs ``i ≠ j`` of a group (NMI is symmetric, so over unordered pairs).

    Args:
        images: ``(B, K, D, H, W)`` aligned images, K >= 2, intensities in [0, 1].
    Returns:
        ``(B,)`` mean pairwise NMI.
    """
    check_tensor("images", images, ndim=5, layout="(B, K, D, H, W)")
    b, k = images.shape[:2]
    if k < 2:
        raise InputError(f"group_nmi: expected K >= 2 timepoints on dim 1, got K={k}")
    w = [parzen_weights(images[:, i].reshape(b, -1), bins, sigma_ratio) for i in range(k)]
    pairs = [_nmi_from_weights(w[i], w[j]) for i in range(k) for j in range(i + 1, k)]
    return torch.stack(pairs, dim=-1).mean(-1)


class GroupNMI:
    """Group NMI log-likelihood: ``β · N_vox · group_nmi(warped)``.

    Call signature (the contract for any likelihood plugged into the model):
    ``likelihood(warped: (B, K, D, H, W)) -> (B,)`` log-likelihood up to a constant.

    Args:
        beta: per-voxel weight β (> 0).
        bins: Parzen histogram bins.
        sigma_ratio: Parzen kernel width in bins.
    """

    def __init__(self, beta: float = 1.0, bins: int = 32, sigma_ratio: float = 0.5):
        self.beta = check_positive("beta", beta)
        self.bins = int(bins)
        self.sigma_ratio = check_positive("sigma_ratio", sigma_ratio)

    def similarity(self, warped: torch.Tensor) -> torch.Tensor:
        """Mean pairwise NMI ``(B,)`` of the warped group ``(B, K, D, H, W)``."""
        return group_nmi(warped, self.bins, self.sigma_ratio)

    def __call__(self, warped: torch.Tensor) -> torch.Tensor:
        n_vox = warped.shape[2:].numel()
        return self.beta * n_vox * self.similarity(warped)
