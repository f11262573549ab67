"""The result of registering one group: the type that registration, baselines, peers, evaluation
and the writers share (numpy arrays only; no torch, no files)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["RegistrationResult", "package_version"]


def package_version() -> str:
    """``"groupmorph_pyro <version>"`` of the installed distribution (setup.cfg's version), which the
    outputs record as what made them."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"groupmorph_pyro {version('groupmorph_pyro')}"
    except PackageNotFoundError:
        return "groupmorph_pyro (not installed: version unknown)"


@dataclass
class RegistrationResult:
    """Output of a registration of one group of K images on a (D, H, W) grid.

    Attributes:
        warped: ``(K, D, H, W)`` input intensities warped into the common frame, ``x_k ∘ φ_k``.
        displacement: ``(K, 3, D, H, W)`` ``φ_k − Id`` in voxels (array axis order).
        inverse_displacement: ``(K, 3, D, H, W)`` ``φ_k⁻¹ − Id`` in voxels.
        jacobian: ``(K, D, H, W)`` ``det Jφ_k``.
        loc, scale: ``(K_lat, 3, D, H, W)`` posterior mean and sd of the latent fields (voxels).
        summary: seconds, NMI before/after, folding, fine-tuning gain, settings (JSON-serialisable).
        uncertainty, landmark_posterior, inference_data: posterior products when samples were drawn.
        posterior: the fitted posterior, enough to draw fields later (numpy arrays and settings:
            :func:`groupmorph_pyro.registration.posterior_state`); None for methods without one.
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
    posterior: dict | None = None  # loc, sigma (and spectrum), transformation settings
