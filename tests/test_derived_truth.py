"""The derived outputs of a real registration against the phantoms' known truth: the mid-position image
of a breathing phantom, its landmark trajectories and its local volume change, and the enhancement
curves of a DCE phantom. Each must beat what the unregistered data give."""
import numpy as np
import pytest
import torch

from groupmorph_pyro.config import Config
from groupmorph_pyro.derived import curves, midposition, trajectory, ventilation
from groupmorph_pyro.outputs import write_registration
from groupmorph_pyro.registration import register
from groupmorph_pyro.spatial import integrate_velocity, invert_displacement, jacobian_determinant, warp
from groupmorph_pyro.synthetic import breathing_phantom, dce_phantom
from groupmorph_pyro.transfer import load_registration
from groupmorph_pyro.volumes import save_nifti

K = 4


def _register(tmp_path, group, name):
    cfg = Config()
    cfg.model.num_timepoints = group.images.shape[0]
    result = register(group.images, cfg, seed=0, affine=group.affine)
    inputs = [tmp_path / f"{name}_{k}.nii.gz" for k in range(group.images.shape[0])]
    for k, path in enumerate(inputs):
        save_nifti(path, group.images[k], group.affine)
    write_registration(result, tmp_path / name, group.affine, inputs, itk=False)
    return load_registration(tmp_path / name)


@pytest.fixture(scope="module")
def breathing(tmp_path_factory):
    """A noise-free breathing phantom (phase 0 is the reference: its velocity is 0) registered with the defaults."""
    group = breathing_phantom((40, 40, 32), K, amplitude=3.0, noise=0.0, seed=3)
    assert np.abs(group.velocities[0]).max() == 0
    return group, _register(tmp_path_factory.mktemp("breathing"), group, "reg")


def _rmse(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)))


def test_midposition_is_closer_to_the_phantom_at_its_mean_position_than_any_phase(breathing):
    """Truth: the reference (phase 0) seen from the mean position M = (1/K) Σ_k ψ_k⁻¹ of its points."""
    group, reg = breathing
    inv = integrate_velocity(-torch.from_numpy(group.velocities).double())  # ψ_k⁻¹ − Id, (K, 3, D, H, W)
    to_mean = invert_displacement(inv.mean(0, keepdim=True))  # M⁻¹ − Id
    truth = warp(torch.from_numpy(group.images[:1]).double()[None], to_mean)[0, 0].numpy()
    got = midposition(reg, group.images)
    phases = [_rmse(group.images[k], truth) for k in range(K)]
    assert _rmse(got, truth) < 0.6 * min(phases), (_rmse(got, truth), phases)
    ncc = lambda a, b: float(np.corrcoef(a.ravel(), b.ravel())[0, 1])  # noqa: E731
    assert ncc(got, truth) > max(ncc(group.images[k], truth) for k in range(K))


def test_trajectories_follow_the_landmarks_within_the_registration_error(breathing):
    group, reg = breathing
    spacing = np.asarray(group.spacing)
    path = trajectory(reg, group.landmarks[0], 0)  # the landmarks of phase 0 followed through every phase
    error = np.linalg.norm((path - group.landmarks) * spacing, axis=-1)[1:]  # mm, phases 1..K-1
    identity = np.linalg.norm((group.landmarks[:1] - group.landmarks) * spacing, axis=-1)[1:]
    assert error.mean() < 0.35 * identity.mean(), (error.mean(), identity.mean())
    np.testing.assert_array_equal(path[0], group.landmarks[0])


def test_ventilation_tracks_the_known_local_volume_change(breathing):
    """Truth: det J − 1 of ψ_J⁻¹ (phase 0's tissue carried to phase J), inside the moving region."""
    group, reg = breathing
    j = K - 1
    inv = integrate_velocity(-torch.from_numpy(group.velocities[j:j + 1]).double())
    truth = jacobian_determinant(inv)[0].numpy() - 1
    got = ventilation(reg, 0, j)
    moving = np.linalg.norm(group.velocities[j], axis=0) > 0.5  # voxels that move by more than half a voxel
    assert moving.sum() > 1000
    r = np.corrcoef(got[moving], truth[moving])[0, 1]
    error = np.abs(got[moving] - truth[moving]).mean()
    assert r > 0.5 and error < 0.6 * np.abs(truth[moving]).mean(), (r, error, np.abs(truth[moving]).mean())


def test_curves_after_registration_are_closer_to_the_known_uptake(tmp_path):
    """Truth: each timepoint moved back by its true map (x_k ∘ ψ_k⁻¹, the curve a perfect registration
    gives through the same trilinear resampling) read in the enhancing lesion and the gland, drawn in
    timepoint 0 (velocity 0, the reference frame) from the same phantom without motion."""
    moving = dce_phantom((48, 48, 32), K, amplitude=2.5, noise=0.0, seed=2)
    still = dce_phantom((48, 48, 32), K, amplitude=0.0, noise=0.0, seed=2)  # same seed: same anatomy and uptake
    np.testing.assert_array_equal(moving.images[0], still.images[0])
    rise = still.images[-1] - still.images[0]
    labels = np.where(rise > 0.35, 1, np.where((rise > 0.15) & (rise < 0.3), 2, 0))  # lesion, gland
    assert (labels == 1).sum() > 30 and (labels == 2).sum() > 300
    inv = integrate_velocity(-torch.from_numpy(moving.velocities))
    back = warp(torch.from_numpy(moving.images)[:, None], inv)[:, 0].numpy()
    truth = np.array([[back[k][labels == v].mean() for v in (1, 2)] for k in range(K)])
    out = curves(_register(tmp_path, moving, "dce"), moving.images, labels, 0)
    before = np.abs(out["before"] - truth)[1:]  # timepoints 1..K-1 (0 is the reference)
    after = np.abs(out["after"] - truth)[1:]
    assert after[:, 0].mean() < 0.6 * before[:, 0].mean(), (after, before)  # the lesion: small, motion shifts it
    assert after[:, 1].max() < 0.02, after  # the gland: large, its mean barely moves either way
