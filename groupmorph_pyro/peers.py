"""External peers: the ``voxelmorph`` package (PyTorch, ≥ 0.3.4), trained on the same data.

The paper's VoxelMorph rows are reproduced in-house by :func:`~groupmorph_pyro.baselines.pairwise_groupmorph`
(our K = 2 model). This module adds the reference implementation as an independent peer:
``voxelmorph.nn.models.VxmPairwise`` (neurite ``BasicUNet``, scaling-and-squaring integration),
trained unsupervised with the package's own local NCC similarity and an L2 spatial-gradient penalty
on the velocity field — the usual VoxelMorph recipe — on random patches of the same training groups
our guide sees (random fixed/moving pair per iteration).

Conventions match ours (checked by a test with a known translation): ``warped = source(p + u(p))``
with ``u`` in voxels, channel ``c`` along array axis ``c``. So for fixed ``p`` and moving ``k``,
``model(source=x_k, target=x_p)`` is our ``φ_k − Id``.

``voxelmorph`` is optional (``pip install 'groupmorph_pyro[baselines]'``); every function says so
clearly when it is missing.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .baselines import result_from_displacements
from .checks import InputError, check_positive
from .group import check_mode
from .files import atomic_write
from .preprocess import crop_to_shape, extract_patch, normalize_group, pad_to_multiple, random_patch_corner
from .results import RegistrationResult

__all__ = ["VoxelMorphSettings", "build_voxelmorph", "train_voxelmorph", "save_voxelmorph", "load_voxelmorph",
           "voxelmorph_all_to_one"]

_KIND = "voxelmorph-package"


def _packages():
    try:
        import neurite
        import voxelmorph
    except ImportError as exc:
        raise InputError("the VoxelMorph peer needs the voxelmorph package (>= 0.3.4, PyTorch): "
                         "pip install 'groupmorph_pyro[baselines]'") from exc
    return voxelmorph, neurite


@dataclass
class VoxelMorphSettings:
    """Network and training settings of the peer (stored in its checkpoint)."""

    features: list = field(default_factory=lambda: [16, 16, 16, 16, 16])  # BasicUNet widths per level
    integration_steps: int = 7  # scaling and squaring (0 = displacement network, plain VoxelMorph)
    smoothness: float = 1.0  # weight of the L2 gradient penalty on the velocity (voxels)
    ncc_window: int = 9  # local NCC window (voxels)
    lr: float = 1e-4
    patch_size: list = field(default_factory=lambda: [64, 64, 64])
    iterations: int = 0  # iterations trained so far
    seed: int = 0

    @property
    def multiple(self) -> int:
        """Input sizes must be multiples of this (the U-Net halves the grid len(features) times)."""
        return 2 ** len(self.features)

    def validate(self) -> "VoxelMorphSettings":
        if not self.features or any(int(f) < 1 for f in self.features):
            raise InputError(f"voxelmorph features: expected positive integers, got {self.features!r}")
        if int(self.integration_steps) < 0:
            raise InputError(f"voxelmorph integration_steps: expected an integer >= 0, got {self.integration_steps!r}")
        check_positive("voxelmorph smoothness", self.smoothness, allow_zero=True)
        check_positive("voxelmorph lr", self.lr)
        if len(self.patch_size) != 3 or any(int(p) % self.multiple for p in self.patch_size):
            raise InputError(f"voxelmorph patch_size: expected 3 multiples of {self.multiple}, got {self.patch_size!r}")
        return self


def build_voxelmorph(settings: VoxelMorphSettings | None = None) -> torch.nn.Module:
    """A fresh ``VxmPairwise`` (3D, one source and one target channel)."""
    vxm, _ = _packages()
    s = (settings or VoxelMorphSettings()).validate()
    return vxm.nn.models.VxmPairwise(ndim=3, source_channels=1, target_channels=1,
                                     nb_features=[int(f) for f in s.features],
                                     integration_steps=int(s.integration_steps))


def _objective(neurite, settings: VoxelMorphSettings):
    ncc = neurite.nn.modules.NCC(window_size=int(settings.ncc_window))
    grad = neurite.nn.modules.SpatialGradient(penalty="l2")

    def loss(model, source, target):
        field, warped = model(source, target, return_warped_source=True, return_field_type="velocity")
        return -ncc(warped, target).mean() + float(settings.smoothness) * grad(field)

    return loss


def train_voxelmorph(groups, iterations: int, settings: VoxelMorphSettings | None = None, model=None,
                     device: str | torch.device = "cpu", progress: bool = True, checkpoint=None):
    """Train the peer on random (fixed, moving) pairs drawn from the same groups as GroupMorph.

    Args:
        groups: list of ``(K, D, H, W)`` tensors in [0, 1] (e.g. :func:`~groupmorph_pyro.train.load_training_groups`).
        iterations: Adam steps (batch 1) to run now.
        settings: network/objective settings; ``settings.iterations`` counts steps across calls.
        model: continue training this network (else a fresh one).
        checkpoint: write the trained network here (atomically) at the end.
    Returns:
        ``(model, settings)`` with ``settings.iterations`` advanced.
    """
    _, neurite = _packages()
    settings = settings or VoxelMorphSettings()
    settings.validate()
    if int(iterations) < 0:
        raise InputError(f"iterations: expected an integer >= 0, got {iterations!r}")
    if not groups:
        raise InputError("groups: expected at least one (K, D, H, W) training group, got none")
    for i, g in enumerate(groups):
        if not isinstance(g, torch.Tensor) or g.dim() != 4 or g.shape[0] < 2:
            raise InputError(f"groups[{i}]: expected a (K >= 2, D, H, W) tensor, got {getattr(g, 'shape', type(g))}")
    device = torch.device(device)
    model = (model or build_voxelmorph(settings)).to(device).train()
    optim = torch.optim.Adam(model.parameters(), lr=float(settings.lr))
    objective = _objective(neurite, settings)
    gen = torch.Generator().manual_seed(int(settings.seed) + int(settings.iterations))
    patch = [int(p) for p in settings.patch_size]
    # volumes smaller than the patch: replicate-pad once, up to a multiple of the patch
    groups = [pad_to_multiple(g[None], max(patch))[0][0] if any(p > n for p, n in zip(patch, g.shape[1:])) else g
              for g in groups]
    bar = tqdm(range(int(iterations)), desc="voxelmorph", disable=not progress)
    for it in bar:
        g = groups[int(torch.randint(len(groups), (1,), generator=gen))]
        corner = random_patch_corner(g.shape[1:], patch, gen)
        pair = torch.randperm(g.shape[0], generator=gen)[:2]
        x = extract_patch(g, corner, patch)[pair].to(device)[:, None]  # (2, 1, d, h, w): moving, fixed
        optim.zero_grad()
        loss = objective(model, x[:1], x[1:])
        loss.backward()
        optim.step()
        if it % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    settings.iterations = int(settings.iterations) + int(iterations)
    if checkpoint is not None:
        save_voxelmorph(checkpoint, model, settings)
    return model.eval(), settings


def save_voxelmorph(path, model, settings: VoxelMorphSettings) -> None:
    """Write ``{kind, settings, state}`` atomically; :func:`load_voxelmorph` rebuilds from it alone."""
    state = {"kind": _KIND, "settings": asdict(settings), "state": model.state_dict()}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_voxelmorph(path, device: str | torch.device = "cpu"):
    """Rebuild ``(model, settings)`` from a file written by :func:`save_voxelmorph`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such voxelmorph checkpoint")
    state = torch.load(path, map_location=device, weights_only=False)
    if not isinstance(state, dict) or state.get("kind") != _KIND:
        raise InputError(f"{path}: not a voxelmorph-peer checkpoint (kind {state.get('kind') if isinstance(state, dict) else None!r})")
    settings = VoxelMorphSettings(**state["settings"])
    model = build_voxelmorph(settings)
    model.load_state_dict(state["state"])
    return model.to(device).eval(), settings


def voxelmorph_all_to_one(images, model, settings: VoxelMorphSettings | None = None, fixed: int = 0,
                          percentiles=(1.0, 99.0), device: str | torch.device = "cpu") -> RegistrationResult:
    """Register every timepoint to ``fixed`` with a trained ``VxmPairwise``.

    Args:
        images: ``(K, D, H, W)`` raw intensities; each is 1–99 percentile normalised, like our input.
        model, settings: from :func:`train_voxelmorph` or :func:`load_voxelmorph`.
    Returns:
        result in our convention (``φ_fixed = Id``), ``seconds`` = network time for the series.
    """
    settings = settings or VoxelMorphSettings()
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise InputError(f"images: expected (K, D, H, W), got shape {images.shape}")
    if not np.isfinite(images).all():
        raise InputError(f"images: expected finite intensities, got {int((~np.isfinite(images)).sum())} NaN/inf voxels")
    k = images.shape[0]
    check_mode("all-to-one", k, fixed)
    device = torch.device(device)
    x = normalize_group(images, percentiles)[0][:, None]
    x, shape = pad_to_multiple(x, settings.multiple)
    x = x.to(device)
    model = model.to(device).eval()
    disp = np.zeros((k, 3, *images.shape[1:]), np.float32)
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(k):
            if i != fixed:
                u = model(x[i:i + 1], x[fixed:fixed + 1], return_field_type="displacement")
                disp[i] = crop_to_shape(u, shape)[0].cpu().numpy()
    name = "voxelmorph-package" + ("-diff" if settings.integration_steps else "")
    return result_from_displacements(images, disp, time.perf_counter() - start, name, fixed)
