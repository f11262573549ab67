"""An all-moving network served as all-to-one (any fixed timepoint): group.relative_to_fixed,
model.FixedFrameGuide / serve_guide, register() and ``groupmorph register --mode all-to-one``."""
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from groupmorph_pyro.checks import InputError
from groupmorph_pyro.cli import main
from groupmorph_pyro.config import Config
from groupmorph_pyro.group import GroupTransform, relative_to_fixed
from groupmorph_pyro.metrics import landmark_distances
from groupmorph_pyro.model import FixedFrameGuide, GroupMorphGuide, serve_guide
from groupmorph_pyro.registration import register
from groupmorph_pyro.spatial import compose
from groupmorph_pyro.synthetic import breathing_phantom
from groupmorph_pyro.train import train

K, SHAPE = 4, (14, 16, 12)
SMALL = dict(encoder=(4, 8), decoder=(8, 8, 4))


def _translation_guide(shifts) -> GroupMorphGuide:
    """An all-moving guide whose mean is the constant field ``shifts[k]`` (voxels) for every input."""
    guide = GroupMorphGuide(len(shifts), "all-moving", **SMALL)
    with torch.no_grad():
        guide.mean_head.weight.zero_()
        target = torch.as_tensor(np.asarray(shifts, dtype=np.float32)).reshape(-1)  # (K*3,), k-major
        guide.mean_head.bias.copy_(torch.atanh(target / guide.alpha))
    return guide


def _reference(loc, scale, p, diffeomorphic):
    """float64 NumPy: the second-order latent of φ_k ∘ φ_p⁻¹, written with np.gradient per component."""
    v = loc - loc.mean(axis=1, keepdims=True)

    def along(a, b):  # (Da) b for one field, (3, D, H, W)
        out = np.zeros_like(a)
        for i in range(3):
            d = np.gradient(a[i], edge_order=1)  # d[j] = ∂a_i / ∂x_j
            out[i] = d[0] * b[0] + d[1] * b[1] + d[2] * b[2]
        return out

    locs, scales = [], []
    for bi in range(loc.shape[0]):
        row_l, row_s = [], []
        for k in range(loc.shape[1]):
            if k == p:
                continue
            vk, vp = v[bi, k], v[bi, p]
            if diffeomorphic:
                row_l.append(vk - vp + 0.5 * (along(vp, vk) - along(vk, vp)))
            else:
                row_l.append(vk - vp + along(vp, vp) - along(vk, vp))
            row_s.append(np.sqrt(scale[bi, k] ** 2 + scale[bi, p] ** 2))
        locs.append(row_l)
        scales.append(row_s)
    return np.array(locs), np.array(scales)


@pytest.mark.parametrize("diffeomorphic", [True, False])
def test_relative_to_fixed_matches_an_explicit_loop(diffeomorphic):
    rng = np.random.default_rng(0)
    loc = gaussian_filter(rng.normal(size=(2, K, 3, *SHAPE)), sigma=(0, 0, 0, 2, 2, 2)) * 5
    scale = rng.uniform(0.1, 2.0, size=loc.shape)
    for p in range(K):
        rel_loc, rel_scale = relative_to_fixed(torch.from_numpy(loc), torch.from_numpy(scale), p, diffeomorphic)
        ref_loc, ref_scale = _reference(loc, scale, p, diffeomorphic)
        assert rel_loc.shape == (2, K - 1, 3, *SHAPE)
        np.testing.assert_allclose(rel_loc.numpy(), ref_loc, atol=1e-10)
        np.testing.assert_allclose(rel_scale.numpy(), ref_scale, atol=1e-12)


def test_relative_to_fixed_rejects_bad_input():
    loc = torch.zeros(1, K, 3, *SHAPE)
    with pytest.raises(InputError, match="timepoint index in \\[0, 3\\], got 4"):
        relative_to_fixed(loc, loc, 4)
    with pytest.raises(InputError, match="one shape"):
        relative_to_fixed(loc, loc[:, :2], 0)


@pytest.mark.parametrize("fixed", [0, 2])
def test_translations_are_served_exactly(fixed):
    """Constant fields commute, so exp(v_k − v_p) = exp(v_k) ∘ exp(−v_p): the served maps are the
    translations t_k − t_p, and the fixed timepoint's map is the identity."""
    shifts = np.array([[0.5, -1.0, 0.25], [1.5, 0.5, -0.75], [-1.0, 0.0, 1.0], [0.25, 2.0, 0.0]])
    guide = _translation_guide(shifts)
    cfg = Config()
    cfg.model.num_timepoints, cfg.model.mode = K, "all-to-one"
    cfg.model.encoder, cfg.model.decoder = list(SMALL["encoder"]), list(SMALL["decoder"])
    images = np.random.default_rng(1).random((K, *SHAPE)).astype(np.float32)
    res = register(images, cfg, guide, fixed=fixed, finetune_steps=0)
    assert res.summary["fixed"] == fixed and res.summary["mode"] == "all-to-one"
    for k in range(K):
        expected = (shifts[k] - shifts[fixed]).reshape(3, 1, 1, 1)
        np.testing.assert_allclose(res.displacement[k], np.broadcast_to(expected, res.displacement[k].shape), atol=2e-5)
    # the latents are the differences (K - 1 of them) with sd sqrt(σ_k² + σ_p²)
    sigma = float(torch.nn.functional.softplus(guide.var_head.bias[0].detach()).sqrt())
    np.testing.assert_allclose(res.scale, np.sqrt(2) * sigma, rtol=1e-4)


def _smooth_fields(seed: int, amplitude: float, shape=SHAPE) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    v = gaussian_filter(rng.normal(size=(1, K, 3, *shape)), sigma=(0, 0, 0, 3, 3, 3))
    return torch.from_numpy(amplitude * v / np.abs(v).max()).float()


@pytest.mark.parametrize("diffeomorphic", [True, False])
def test_served_maps_approximate_the_exact_composition(diffeomorphic):
    """φ'_k from the served latent against φ_k ∘ φ_p⁻¹ for smooth fields that vary in space (up to 2
    voxels): on average within 0.02 voxels (velocities; 0.08 for displacements, measured 0.011–0.014
    and 0.037–0.072), 2.5 times closer than the first-order difference v_k − v_p (0.057–0.076 and
    0.15–0.22 voxels here) and far closer than the all-moving map φ_k alone."""
    v = _smooth_fields(2, 2.0)
    moving = GroupTransform(K, "all-moving", diffeomorphic=diffeomorphic)
    disp, inv = moving.displacements(v)[0], moving.inverse_displacements(v)[0]
    for p in (0, 3):
        loc, _ = relative_to_fixed(v, torch.ones_like(v), p, diffeomorphic)
        served = GroupTransform(K, "all-to-one", p, diffeomorphic=diffeomorphic).displacements(loc)[0]
        centred = v - v.mean(dim=1, keepdim=True)
        first = GroupTransform(K, "all-to-one", p, diffeomorphic=diffeomorphic).displacements(
            centred[:, [k for k in range(K) if k != p]] - centred[:, p:p + 1])[0]
        for k in range(K):
            exact = compose(disp[k:k + 1], inv[p:p + 1])[0]
            err = float((served[k] - exact).norm(dim=0).mean())
            assert err < (0.02 if diffeomorphic else 0.08), (p, k, err)
            if k != p:
                assert float((first[k] - exact).norm(dim=0).mean()) > 2.5 * err
                assert float((disp[k] - exact).norm(dim=0).mean()) > 8 * err


def test_serve_guide_passes_matching_modes_and_refuses_the_converse():
    moving = GroupMorphGuide(K, "all-moving", **SMALL)
    to_one = GroupMorphGuide(K, "all-to-one", **SMALL)
    assert serve_guide(None, "all-to-one") is None
    assert serve_guide(to_one, "all-to-one") is to_one and serve_guide(moving, "all-moving") is moving
    served = serve_guide(moving, "all-to-one")
    assert isinstance(served, FixedFrameGuide) and served.moving is moving
    with pytest.raises(InputError, match="'all-to-one' mode cannot serve a 'all-moving' model"):
        serve_guide(to_one, "all-moving")
    with pytest.raises(InputError, match="all-moving mode"):
        FixedFrameGuide(to_one)
    images = torch.rand(1, K, *SHAPE)
    with pytest.raises(InputError, match="fixed"):
        served.distribution_params(images, K)


def test_served_guide_gives_posterior_samples_and_finetunes():
    g = breathing_phantom((16, 16, 16), K, amplitude=1.5, num_landmarks=6, seed=4)
    guide = _translation_guide(np.zeros((K, 3)))
    cfg = Config()
    cfg.model.num_timepoints, cfg.model.mode = K, "all-to-one"
    res = register(g.images, cfg, guide, fixed=1, finetune_steps=2, samples=3, landmarks=g.landmarks)
    assert res.loc.shape == (K - 1, 3, 16, 16, 16) and res.summary["per_case_steps"] == 2
    assert res.uncertainty["displacement_std_mm"].shape == (K, 16, 16, 16)
    assert np.all(res.uncertainty["displacement_std_mm"][1] == 0)  # the fixed timepoint does not move


@pytest.fixture
def moving_checkpoint(tmp_path):
    cfg = Config()
    cfg.model.num_timepoints, cfg.model.mode = 3, "all-moving"
    cfg.model.encoder, cfg.model.decoder = [4], [4]
    cfg.train.iterations, cfg.train.patch_size, cfg.train.device = 1, [16, 16, 16], "cpu"
    cfg.train.output_dir = str(tmp_path / "run")
    cfg.data.synthetic = {"num_groups": 1, "shape": [20, 20, 20], "num_landmarks": 5}
    return train(cfg, progress=False)


def test_cli_serves_an_all_moving_checkpoint_for_any_fixed_timepoint(tmp_path, moving_checkpoint, capsys):
    g = breathing_phantom((20, 20, 20), 3, amplitude=1.5, num_landmarks=5, seed=5)
    paths = []
    for k in range(3):
        paths.append(tmp_path / f"t{k}.nii.gz")
        nib.save(nib.Nifti1Image(g.images[k], np.eye(4)), paths[-1])
    common = ["register", *map(str, paths), "--checkpoint", str(moving_checkpoint), "--quiet", "--no-itk"]
    assert main([*common, "--out", str(tmp_path / "o2"), "--mode", "all-to-one", "--fixed", "2"]) == 0
    summary = json.loads((tmp_path / "o2" / "summary.json").read_text())
    assert summary["mode"] == "all-to-one" and summary["fixed"] == 2 and summary["amortized"]
    disp = nib.load(tmp_path / "o2" / "displacement_2.nii.gz").get_fdata()
    assert np.abs(disp).max() == 0  # the fixed timepoint's map is the identity
    # --fixed without --mode: refused with the way out
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "bad"), "--fixed", "1"]) == 2
    assert "--mode all-to-one" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_served_registration_keeps_the_pairwise_landmark_error():
    """The pairwise landmark error does not depend on the frame: the served all-to-one maps give the
    all-moving maps' error up to the first-order composition (smooth fields, up to 2 voxels)."""
    g = breathing_phantom((16, 16, 16), K, amplitude=2.0, num_landmarks=20, seed=6)
    v = _smooth_fields(7, 2.0, (16, 16, 16))
    moving = GroupTransform(K, "all-moving")
    ref = landmark_distances(g.landmarks, moving.displacements(v)[0].double(), moving.inverse_displacements(v)[0].double())
    for p in range(K):
        loc, _ = relative_to_fixed(v, torch.ones_like(v), p)
        t = GroupTransform(K, "all-to-one", p)
        got = landmark_distances(g.landmarks, t.displacements(loc)[0].double(), t.inverse_displacements(loc)[0].double())
        assert abs(got.mean() - ref.mean()) < 0.02 * ref.mean(), (p, got.mean(), ref.mean())


def test_directional_derivative_of_an_affine_field_is_exact():
    """a(x) = A x + c has Da = A everywhere (central and one-sided differences are exact), so
    (Da) b = A b for any b, here a field that varies in space."""
    from groupmorph_pyro.spatial import directional_derivative

    rng = np.random.default_rng(8)
    A = rng.normal(size=(3, 3))
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in SHAPE], indexing="ij"))
    a = np.einsum("ij,j...->i...", A, grid) + rng.normal(size=(3, 1, 1, 1))
    b = rng.normal(size=(3, *SHAPE))
    got = directional_derivative(torch.from_numpy(a)[None], torch.from_numpy(b)[None])[0].numpy()
    np.testing.assert_allclose(got, np.einsum("ij,j...->i...", A, b), atol=1e-10)
    with pytest.raises(InputError, match="one shape"):
        directional_derivative(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 3, 4, 4, 5))
