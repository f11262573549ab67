"""Image-similarity likelihoods.

NMI definition used throughout: ``NMI(A, B) = 2 I(A; B) / (H(A) + H(B))`` in [0, 1], computed
from a differentiable Gaussian Parzen-window joint histogram of intensities in [0, 1] (images are
expected 1–99 percentile normalised, see :mod:`groupmorph_pyro.preprocess`). ``bins`` centres sit
at ``(b + ½)/bins``; the kernel width is ``sigma = sigma_ratio / bins`` (default one half bin width).

Two histogram kernels (``histogram=``):

* ``"gaussian"`` (default, the paper): dense ``(voxels × bins)`` Gaussian weights per image and an
  einsum per pair — simple and matmul-friendly, but autograd keeps several ``N × bins`` tensors
  per image (about 0.7 GB per 96³ image at 32 bins).
* ``"bspline"``: cubic B-spline Parzen window (support 4 bins, sd ≈ 0.58 bin, partition of unity)
  accumulated by scatter-add into each pair's ``bins × bins`` joint histogram. A custom autograd
  function recomputes the 4 weights per voxel in the backward pass, so nothing of size
  ``N × bins`` is ever stored (memory O(N) per image instead of O(N · bins)).
* ``"quadratic"``: the same with the quadratic B-spline window (support 3 bins, sd = 0.5 bin,
  continuously differentiable): 9 instead of 16 tap products per voxel and pair.

Both kernels accumulate the joint histograms over chunks of 2¹⁸ voxels, so without autograd (the
NMI summaries of a full-resolution registration) the temporaries stay O(chunk · bins).

Group likelihood (paper): ``log p(x | z) = β · N_vox · mean_{i≠j} NMI(φ_i∘x_i, φ_j∘x_j) + const``.
The factor ``N_vox`` (voxels per image) makes ``β`` a *per-voxel* weight, on the same footing as
the prior's log-density which Pyro sums over voxels (VoxelMorph averages both per voxel instead,
which is the same optimum with ``β`` scaled).

Research API: :class:`GroupSimilarity` combines any pairwise similarity
``sim(a: (B, D, H, W), b: (B, D, H, W)) -> (B,)`` (built in: ``"nmi"``, ``"mi"``, ``"lncc"``,
``"ssd"``; or your own function) with a group reduction: ``"pairs"`` (mean over pairs i ≠ j, the
paper) or ``"template"`` (each warped image against the mean warped image). Any callable
``likelihood(warped: (B, K, D, H, W)) -> (B,)`` can be passed to the model instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import InputError, Registry, check_arity, check_integer, check_positive, check_tensor

__all__ = [
    "parzen_weights", "bspline_weights", "joint_histograms", "nmi", "mutual_information", "lncc", "ssd", "group_nmi",
    "HISTOGRAMS",
    "SIMILARITIES", "REDUCTIONS", "GroupSimilarity", "GroupNMI", "check_likelihood",
    "ORDER_FREE", "SubsampledLikelihood", "subsample_likelihood", "sampled_log_likelihood", "is_order_free",
    "check_order_free",
]

_EPS = 1e-10


def _check_bins(bins) -> int:
    if int(bins) != bins or bins < 2:
        raise InputError(f"bins: expected an integer >= 2, got {bins!r}")
    return int(bins)


def parzen_weights(x: torch.Tensor, bins: int = 32, sigma_ratio: float = 0.5) -> torch.Tensor:
    """Soft bin memberships of each voxel.

    Args:
        x: ``(B, N)`` intensities (expected in [0, 1]).
        bins: number of histogram bins (>= 2).
        sigma_ratio: Gaussian kernel width in bin widths.
    Returns:
        ``(B, N, bins)`` non-negative weights, each voxel's row summing to 1.
    """
    bins = _check_bins(bins)
    centres = (torch.arange(bins, device=x.device, dtype=x.dtype) + 0.5) / bins
    sigma = sigma_ratio / bins
    w = torch.exp(-0.5 * ((x[..., None] - centres) / sigma) ** 2)  # (B, N, bins)
    return w / (w.sum(-1, keepdim=True) + _EPS)


HISTOGRAMS = ("gaussian", "bspline", "quadratic")
_ORDERS = {"bspline": 3, "quadratic": 2}  # B-spline degree of each compact kernel (taps = degree + 1)


def _check_histogram(histogram) -> str:
    if histogram not in HISTOGRAMS:
        raise InputError(f"histogram: expected one of {HISTOGRAMS}, got {histogram!r}")
    return histogram
_CHUNK = 1 << 18  # voxels per chunk of histogram accumulation (bounds temporaries; all chunks' graphs are kept)


def _bspline_taps(x: torch.Tensor, bins: int, derivative: bool = False, order: int = 3):
    """B-spline Parzen taps in structure-of-arrays layout (the histogram kernel's form of
    :func:`bspline_weights`): cubic (``order`` 3, 4 taps) or quadratic (2, 3 taps).

    Args:
        x: ``(..., N)`` intensities (clamped to [0, 1]); bins: number of bins.
    Returns:
        ``(first, weight[, dweight])``: ``first`` ``(..., N)`` int64, the bin of each voxel's first
        tap, *unclamped* (cubic: in ``[−2, bins − 2]``, quadratic: in ``[−1, bins − 1]``; the taps are
        ``first + 0..order``), and ``weight`` (and ``d weight / d x``) ``(..., order + 1, N)``, the
        taps on the second-to-last axis.
    """
    s = x.clamp(0.0, 1.0) * bins - 0.5  # position in bin units; centre of bin b at s = b
    if order == 2:  # nearest centre c, offset d in [−½, ½): B₂ at d + 1, d, d − 1
        c = (s + 0.5).floor()
        d = s - c
        w = torch.stack([0.5 * (0.5 - d) ** 2, 0.75 - d * d, 0.5 * (0.5 + d) ** 2], -2)
        first = c.long() - 1
        if not derivative:
            return first, w
        inside = ((x >= 0) & (x <= 1)).to(x.dtype).unsqueeze(-2) * bins  # dd/dx (0 where clamped)
        return first, w, torch.stack([d - 0.5, -2.0 * d, d + 0.5], -2) * inside
    f = s.floor()
    u = s - f
    u2, u3 = u * u, u * u * u
    w = torch.stack([(1 - u) ** 3, 3 * u3 - 6 * u2 + 4, -3 * u3 + 3 * u2 + 3 * u + 1, u3], -2) / 6.0
    first = f.long() - 1
    if not derivative:
        return first, w
    inside = ((x >= 0) & (x <= 1)).to(x.dtype).unsqueeze(-2) * bins  # du/dx (0 where clamped)
    dw = torch.stack([-0.5 * (1 - u) ** 2, 1.5 * u2 - 2 * u, -1.5 * u2 + u + 0.5, 0.5 * u2], -2) * inside
    return first, w, dw


def bspline_weights(x: torch.Tensor, bins: int = 32, derivative: bool = False, order: int = 3):
    """B-spline Parzen weights: cubic (``order`` 3, 4 bins per voxel) or quadratic (2, 3 bins).

    Args:
        x: ``(..., N)`` intensities (clamped to [0, 1]); bins: number of bins (>= 2).
        derivative: also return ``d weight / d x``; order: 3 or 2.
    Returns:
        ``(index, weight[, dweight])``, each ``(..., N, order + 1)``: bin indices (int64, clamped to
        ``[0, bins)``, so mass beyond the edge bins folds into them) and weights summing to 1 per voxel.
    """
    bins = _check_bins(bins)
    if order not in _ORDERS.values():
        raise InputError(f"bspline_weights: expected order 2 or 3, got {order!r}")
    first, *weights = _bspline_taps(x, bins, derivative, order)
    index = (first[..., None] + torch.arange(order + 1, device=x.device)).clamp_(0, bins - 1)
    return (index, *(w.transpose(-1, -2) for w in weights))


def _pairs(k: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


_PAD = 2  # the taps of intensities in [0, 1] reach 2 bins beyond either edge


def _fold(bins: int, like: torch.Tensor) -> torch.Tensor:
    """``(bins, bins + 2·_PAD)`` 0/1 matrix: padded bin ``p`` -> bin ``clamp(p − _PAD, 0, bins − 1)``
    (the mass of the taps beyond the edges folds into the edge bins)."""
    target = (torch.arange(bins + 2 * _PAD, device=like.device) - _PAD).clamp(0, bins - 1)
    return (target[None] == torch.arange(bins, device=like.device)[:, None]).to(like.dtype)


def _pair_base(first: torch.Tensor, i: int, j: int, padded: int) -> torch.Tensor:
    """Flat index ``(B, N)`` of each voxel's first tap pair (0, 0) in the ``padded × padded`` joint
    histogram of pair (i, j) (``first``: ``(B, K, N)``); tap pair (a, b) sits ``_tap_offsets(padded, T)[T a + b]``
    further (T taps), so each of the T² is one scatter/gather on a shifted view, with no ``T²·N`` index
    tensor (a fused scatter over such an index is several times slower)."""
    return (first[:, i] + _PAD) * padded + (first[:, j] + _PAD)


def _tap_offsets(padded: int, taps: int = 4) -> list[int]:
    return [a * padded + b for a in range(taps) for b in range(taps)]


class _BSplineJoint(torch.autograd.Function):
    """Joint histograms ``(B, P, bins, bins)`` (counts / N) of all pairs i < j of ``x: (B, K, N)``.

    Each pair's T² tap products per voxel (T = ``order`` + 1 taps: 16 cubic, 9 quadratic) are
    scattered into a histogram padded by ``_PAD`` bins on every side (so the tap indices need no
    clamping), which is then folded onto the edge bins; taps are laid out ``(T, N)`` so that every
    elementwise operation runs on contiguous voxels.
    """

    @staticmethod
    def forward(ctx, x, bins, order=3):
        b, k, n = x.shape
        padded, taps = bins + 2 * _PAD, order + 1
        out = x.new_zeros(b, len(_pairs(k)), padded * padded)
        offsets = _tap_offsets(padded, taps)
        for start in range(0, n, _CHUNK):
            first, w = _bspline_taps(x[:, :, start:start + _CHUNK], bins, order=order)  # (B, K, c), (B, K, T, c)
            for p, (i, j) in enumerate(_pairs(k)):
                base = _pair_base(first, i, j, padded)
                for tap, offset in enumerate(offsets):
                    out[:, p, offset:].scatter_add_(1, base, w[:, i, tap // taps] * w[:, j, tap % taps])
        fold = _fold(bins, x)
        ctx.save_for_backward(x)
        ctx.bins, ctx.order = bins, order
        return fold @ out.view(b, -1, padded, padded) @ fold.T / n

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        bins, order = ctx.bins, ctx.order
        b, k, n = x.shape
        padded, taps = bins + 2 * _PAD, order + 1
        fold = _fold(bins, x)
        g = (fold.T @ grad @ fold / n).reshape(b, -1, padded * padded)  # dL/d padded histogram
        gx = torch.zeros_like(x)
        offsets = _tap_offsets(padded, taps)
        span = range(taps)
        for start in range(0, n, _CHUNK):
            sl = slice(start, min(n, start + _CHUNK))
            first, w, dw = _bspline_taps(x[:, :, sl], bins, derivative=True, order=order)  # (B, K, c), (B, K, T, c)
            for p, (i, j) in enumerate(_pairs(k)):
                base = _pair_base(first, i, j, padded)
                t = [g[:, p, offset:].gather(1, base) for offset in offsets]  # dL/d tap product (a, b)
                wi, wj, dwi, dwj = w[:, i], w[:, j], dw[:, i], dw[:, j]  # (B, T, c)
                rows = [sum(wj[:, q] * t[taps * a + q] for q in span) for a in span]  # Σ_b w_j[b] t[a, b]
                cols = [sum(wi[:, a] * t[taps * a + q] for a in span) for q in span]  # Σ_a w_i[a] t[a, b]
                gx[:, i, sl] += sum(dwi[:, a] * rows[a] for a in span)
                gx[:, j, sl] += sum(dwj[:, q] * cols[q] for q in span)
        return gx, None, None


def joint_histograms(images: torch.Tensor, bins: int = 32, sigma_ratio: float = 0.5,
                     histogram: str = "gaussian") -> torch.Tensor:
    """Normalised joint intensity histograms of every pair ``i < j`` of a group.

    Args:
        images: ``(B, K, *spatial)`` intensities in [0, 1], K >= 2.
        histogram: ``"gaussian"`` (dense weights, ``sigma_ratio``), ``"bspline"`` (cubic, compact, lean)
            or ``"quadratic"`` (the quadratic B-spline: compact, 9 instead of 16 taps per pair).
    Returns:
        ``(B, K(K−1)/2, bins, bins)``, each histogram summing to 1, pairs in order (0,1), (0,2), ….
    """
    _check_histogram(histogram)
    b, k = images.shape[:2]
    x = images.reshape(b, k, -1)
    if histogram in _ORDERS:
        return _BSplineJoint.apply(x, _check_bins(bins), _ORDERS[histogram])
    joint = 0.0
    for start in range(0, x.shape[-1], _CHUNK):  # bounds the (voxels x bins) weights when no graph is kept
        w = [parzen_weights(x[:, i, start:start + _CHUNK], bins, sigma_ratio) for i in range(k)]  # (B, c, bins)
        joint = joint + torch.stack([torch.einsum("bni,bnj->bij", w[i], w[j]) for i, j in _pairs(k)], 1)
    return joint / x.shape[-1]


def _entropy(p: torch.Tensor, dims) -> torch.Tensor:
    return -(p * (p + _EPS).log()).sum(dim=dims)


def _joint_entropies(joint: torch.Tensor):
    """``(H(A), H(B), H(A, B))`` in nats from joint histograms ``(..., bins, bins)``."""
    pa, pb = joint.sum(-1), joint.sum(-2)
    return _entropy(pa, -1), _entropy(pb, -1), _entropy(joint, (-2, -1))


def _nmi_from_joint(joint: torch.Tensor) -> torch.Tensor:
    ha, hb, hab = _joint_entropies(joint)
    return 2.0 * (ha + hb - hab) / (ha + hb + _EPS)


def _check_pair(a, b):
    check_tensor("a", a)
    check_tensor("b", b)
    if a.shape != b.shape or a.dim() < 2:
        raise InputError(f"expected a and b of equal shape (B, ...), got {tuple(a.shape)} and {tuple(b.shape)}")


def mutual_information(a: torch.Tensor, b: torch.Tensor, bins: int = 32, sigma_ratio: float = 0.5,
                       histogram: str = "gaussian") -> torch.Tensor:
    """Parzen-window mutual information ``I(A; B) = H(A) + H(B) − H(A, B)`` in nats, ``(B,)``."""
    _check_pair(a, b)
    ha, hb, hab = _joint_entropies(joint_histograms(torch.stack([a, b], 1), bins, sigma_ratio, histogram)[:, 0])
    return ha + hb - hab


def lncc(a: torch.Tensor, b: torch.Tensor, window: int = 9, eps: float = 1e-6) -> torch.Tensor:
    """Local normalised cross-correlation (squared, as in VoxelMorph), mean over voxels, in [0, 1].

    ``cc = cov² / (var_a · var_b + eps)`` per window; ``eps`` guards flat windows (where cc → 0)
    and is small against the local variances of images in [0, 1].

    Args:
        a, b: ``(B, D, H, W)``; window: cubic window size in voxels (odd; reduced to the largest
            odd size that fits a smaller grid).
    Returns:
        ``(B,)``.
    """
    _check_pair(a, b)
    if a.dim() != 4:
        raise InputError(f"lncc: expected (B, D, H, W) images, got {tuple(a.shape)}")
    if int(window) != window or window < 1 or window % 2 == 0:
        raise InputError(f"lncc window: expected an odd integer >= 1, got {window!r}")
    smallest = min(a.shape[-3:])
    window = min(int(window), smallest if smallest % 2 else smallest - 1)  # grids smaller than the window
    pool = lambda t: F.avg_pool3d(t[:, None], window, stride=1, padding=window // 2, count_include_pad=False)[:, 0]  # noqa: E731
    ma, mb = pool(a), pool(b)
    cov = pool(a * b) - ma * mb
    va, vb = pool(a * a) - ma * ma, pool(b * b) - mb * mb
    cc = cov * cov / (va.clamp_min(0) * vb.clamp_min(0) + eps)
    return cc.mean(dim=(-3, -2, -1))


def ssd(a: torch.Tensor, b: torch.Tensor, sigma: float = 0.1) -> torch.Tensor:
    """Gaussian log-likelihood per voxel up to a constant: ``−mean((a − b)²) / (2σ²)``, ``(B,)``."""
    _check_pair(a, b)
    return -(a - b).pow(2).reshape(a.shape[0], -1).mean(-1) / (2 * sigma**2)


def nmi(a: torch.Tensor, b: torch.Tensor, bins: int = 32, sigma_ratio: float = 0.5,
        histogram: str = "gaussian") -> torch.Tensor:
    """Differentiable NMI between image batches.

    Args:
        a, b: ``(B, *spatial)`` intensities in [0, 1], same shape.
        bins: histogram bins; sigma_ratio: Gaussian kernel width in bins; histogram: ``"gaussian"``
            or ``"bspline"`` (see the module docstring).
    Returns:
        ``(B,)`` NMI in [0, 1] (1 for a perfect one-to-one intensity relation, 0 for independence).
    """
    _check_pair(a, b)
    return _nmi_from_joint(joint_histograms(torch.stack([a, b], 1), bins, sigma_ratio, histogram)[:, 0])


def group_nmi(images: torch.Tensor, bins: int = 32, sigma_ratio: float = 0.5, histogram: str = "gaussian") -> torch.Tensor:
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
    return _nmi_from_joint(joint_histograms(images, bins, sigma_ratio, histogram)).mean(-1)


SIMILARITIES = Registry("similarity", ("a", "b"))
"""Named similarities: ``SIMILARITIES.get(name)(a, b, **options) -> (B,)`` on ``(B, D, H, W)``
images (larger = more similar). The function's keyword parameters are its options
(``model.likelihood_options`` in a config); add one with ``SIMILARITIES.register("name")(fn)``."""
for _name, _fn in (("nmi", nmi), ("mi", mutual_information), ("lncc", lncc), ("ssd", ssd)):
    SIMILARITIES.register(_name)(_fn)
REDUCTIONS = ("pairs", "template")
ORDER_FREE = ("nmi", "mi", "ssd")
"""Built-in similarities that depend on the voxels' intensity pairs only, not on where the voxels
are (histograms, means): a random subset of voxels estimates them. Not ``"lncc"`` (local windows)."""


class GroupSimilarity:
    """Group log-likelihood ``β · N_vox · reduce(sim)`` from a pairwise similarity.

    Call signature (the contract for any likelihood plugged into the model):
    ``likelihood(warped: (B, K, D, H, W)) -> (B,)`` log-likelihood up to a constant.

    Args:
        similarity: a name in :data:`SIMILARITIES` or a function ``sim(a, b) -> (B,)`` on
            ``(B, D, H, W)`` images (larger = more similar).
        reduction: ``"pairs"`` (mean over pairs i ≠ j; the paper) or ``"template"`` (mean over k of
            ``sim(x_k, mean_j x_j)``).
        beta: per-voxel weight β (> 0).
        **options: passed to the similarity (e.g. ``bins`` for NMI/MI, ``window`` for LNCC,
            ``sigma`` for SSD).
    """

    def __init__(self, similarity="nmi", reduction: str = "pairs", beta: float = 1.0, **options):
        if isinstance(similarity, str):
            if similarity not in SIMILARITIES:
                raise InputError(f"likelihood: expected one of {sorted(SIMILARITIES)} or a function, got {similarity!r}")
            self.name, fn = similarity, SIMILARITIES.get(similarity)
            self.order_free = similarity in ORDER_FREE  # a random subset of voxels estimates it
            SIMILARITIES.check_options(similarity, options, "likelihood_options")
        elif callable(similarity):
            self.name, fn = getattr(similarity, "__name__", "custom"), similarity
            self.order_free = False  # unknown: a user's similarity may use neighbourhoods
            check_arity("similarity", fn, 2, "sim(a: (B, D, H, W), b: (B, D, H, W)) -> (B,)")
        else:
            raise InputError(f"likelihood: expected a name or a function sim(a, b), got {type(similarity).__name__}")
        if reduction not in REDUCTIONS:
            raise InputError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
        self.fn, self.reduction, self.options = fn, reduction, options
        self.beta = check_positive("beta", beta)

    def similarity(self, warped: torch.Tensor) -> torch.Tensor:
        """Reduced similarity ``(B,)`` of the warped group ``(B, K, D, H, W)``."""
        check_tensor("warped", warped, ndim=5, layout="(B, K, D, H, W)")
        k = warped.shape[1]
        if k < 2:
            raise InputError(f"group similarity: expected K >= 2 timepoints on dim 1, got K={k}")
        if self.reduction == "template":
            template = warped.mean(1)
            vals = [self.fn(warped[:, i], template, **self.options) for i in range(k)]
        else:
            vals = [self.fn(warped[:, i], warped[:, j], **self.options) for i in range(k) for j in range(i + 1, k)]
        return torch.stack(vals, dim=-1).mean(-1)

    def __call__(self, warped: torch.Tensor) -> torch.Tensor:
        return self.beta * warped.shape[2:].numel() * self.similarity(warped)


class GroupNMI(GroupSimilarity):
    """The paper's likelihood: ``β · N_vox · mean_{i≠j} NMI`` (Parzen histogram with ``bins``;
    ``histogram="bspline"`` for the memory-lean kernel)."""

    def __init__(self, beta: float = 1.0, bins: int = 32, sigma_ratio: float = 0.5, histogram: str = "gaussian"):
        super().__init__("nmi", "pairs", beta, bins=int(bins), sigma_ratio=check_positive("sigma_ratio", sigma_ratio),
                         histogram=_check_histogram(histogram))

    def similarity(self, warped: torch.Tensor) -> torch.Tensor:
        return group_nmi(warped, **self.options)  # shares Parzen weights across pairs


def is_order_free(likelihood) -> bool:
    """Whether ``likelihood`` is a :class:`GroupSimilarity` whose similarity is in :data:`ORDER_FREE`
    (it ignores where the voxels are, so a random subset of them estimates it)."""
    return isinstance(likelihood, GroupSimilarity) and bool(getattr(likelihood, "order_free", False))


def check_order_free(likelihood, what: str):
    """``likelihood`` if :func:`is_order_free`, else an InputError naming ``what`` needed it."""
    if not is_order_free(likelihood):
        name = getattr(likelihood, "name", type(likelihood).__name__)
        raise InputError(f"{what}: expected a GroupSimilarity with a similarity in {ORDER_FREE} "
                         f"(they ignore where voxels are), got {name!r}")
    return likelihood


class SubsampledLikelihood:
    """Stochastic estimate of a group likelihood from ``voxels`` voxels drawn at random (uniformly,
    with replacement; a new draw per call from torch's global generator, so Pyro's seed fixes it).

    ``log p ≈ β · N_vox · sim(warped at the drawn voxels)``: the same scale as the full likelihood
    (``N_vox`` is the whole grid's voxel count). For the histogram similarities the estimate is
    consistent but biased: an ``M``-sample Parzen histogram's NMI sits slightly above the full
    volume's, by about 1/M (tests/test_likelihoods.py pins the size of that bias). A model built with it
    (:meth:`~groupmorph_pyro.model.GroupMorphModel.with_likelihood`) takes SVI steps on random voxels of
    the image grid; ELBO comparisons and summaries should use the full likelihood.

    Args:
        likelihood: a :class:`GroupSimilarity` whose similarity is a built-in in :data:`ORDER_FREE`.
        voxels: voxels per draw, ``M >= 1``; a grid with ``N_vox <= M`` voxels is used whole.
    """

    def __init__(self, likelihood: GroupSimilarity, voxels: int):
        check_order_free(likelihood, "subsampled likelihood")
        self.likelihood, self.voxels = likelihood, check_integer("voxels", voxels, 1)

    def __call__(self, warped: torch.Tensor) -> torch.Tensor:
        """``(B,)`` log-likelihood estimate of ``warped`` ``(B, K, D, H, W)``."""
        check_tensor("warped", warped, ndim=5, layout="(B, K, D, H, W)")
        b, k = warped.shape[:2]
        n = warped.shape[2:].numel()
        if n <= self.voxels:
            return self.likelihood(warped)
        index = torch.randint(n, (self.voxels,), device=warped.device)
        return sampled_log_likelihood(self.likelihood, warped.reshape(b, k, n).index_select(-1, index), n)


def sampled_log_likelihood(likelihood: GroupSimilarity, values: torch.Tensor, voxels: int) -> torch.Tensor:
    """``β · voxels · reduce(sim)`` of a group read at ``S`` sample points: the group likelihood of a
    grid of ``voxels`` voxels estimated from the intensities at those points (consistent, with the
    ``≈ 1/S`` upward bias of a Parzen histogram's NMI; see :class:`SubsampledLikelihood`).

    Args:
        likelihood: a :class:`GroupSimilarity` whose similarity is in :data:`ORDER_FREE`;
        values: ``(B, K, S)`` intensities of the K images at the same S points; voxels: N >= 1.
    Returns:
        ``(B,)`` log-likelihood estimate.
    """
    check_order_free(likelihood, "sampled likelihood")
    if not isinstance(values, torch.Tensor) or values.dim() != 3 or values.shape[1] < 2:
        raise InputError(f"sampled likelihood: expected values (B, K >= 2, S), got "
                         f"{tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__}")
    b, k, s = values.shape
    return likelihood.beta * check_integer("voxels", voxels, 1) * likelihood.similarity(values.reshape(b, k, 1, 1, s))


def subsample_likelihood(likelihood, voxels: int):
    """``likelihood`` estimated on ``voxels`` random voxels per call (:class:`SubsampledLikelihood`)
    when it allows it; returned unchanged when ``voxels`` is 0 or the likelihood is not a
    :class:`GroupSimilarity` in :data:`ORDER_FREE` (custom callables, LNCC)."""
    if not voxels or not is_order_free(likelihood):
        return likelihood
    return SubsampledLikelihood(likelihood, voxels)


def check_likelihood(likelihood) -> None:
    """Validate a user likelihood: callable as ``likelihood(warped)``."""
    if not callable(likelihood):
        raise InputError(f"likelihood: expected a callable likelihood(warped: (B, K, D, H, W)) -> (B,), got {likelihood!r}")
    check_arity("likelihood", likelihood, 1, "likelihood(warped: (B, K, D, H, W)) -> (B,)")
