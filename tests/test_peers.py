"""The external voxelmorph package as a peer: convention, wrapper, training, checkpoints, bad input."""
import numpy as np
import pytest
import torch

from conftest import smooth_field, smooth_image
from groupmorph_pyro.checks import InputError
from groupmorph_pyro.evaluation import landmark_columns
from groupmorph_pyro.preprocess import percentile_normalize
from groupmorph_pyro.spatial import warp
from groupmorph_pyro.synthetic import breathing_phantom

vxm = pytest.importorskip("voxelmorph")
from groupmorph_pyro.peers import (VoxelMorphSettings, build_voxelmorph, load_voxelmorph,  # noqa: E402
                                   save_voxelmorph, train_voxelmorph, voxelmorph_all_to_one)


def test_package_warp_convention_matches_ours():
    """The package's SpatialTransformer and our warp agree: warped(p) = x(p + u(p)), u in voxels, channel c = axis c."""
    x = smooth_image((16, 18, 20), seed=1)
    u = smooth_field((16, 18, 20), amplitude=2.0, seed=2)
    theirs = vxm.nn.modules.SpatialTransformer()(x, u)
    ours = warp(x, u)
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3), slice(3, -3))  # away from differing padding
    assert torch.allclose(theirs[inner], ours[inner], atol=1e-4)
    shifted = torch.zeros_like(u)
    shifted[:, 2] = 1.0  # +1 voxel along the last axis
    assert torch.allclose(vxm.nn.modules.SpatialTransformer()(x, shifted)[..., :-1], x[..., 1:], atol=1e-5)


class _Constant(torch.nn.Module):
    """Stands in for VxmPairwise: returns a fixed displacement, checks the padded input size."""

    def __init__(self, t, multiple):
        super().__init__()
        self.t, self.multiple, self.calls = t, multiple, []

    def forward(self, source, target, return_field_type="displacement"):
        assert all(n % self.multiple == 0 for n in source.shape[2:]) and source.shape == target.shape
        self.calls.append(return_field_type)
        return self.t.view(1, 3, 1, 1, 1).expand(1, 3, *source.shape[2:]).clone()


def test_wrapper_keeps_the_field_in_our_convention_and_crops_padding():
    g = breathing_phantom((24, 20, 18), 3, seed=0, num_landmarks=10)
    t = torch.tensor([1.0, -2.0, 0.5])
    settings = VoxelMorphSettings()
    net = _Constant(t, settings.multiple)
    res = voxelmorph_all_to_one(g.images, net, settings, fixed=1)
    assert res.displacement.shape == (3, 3, 24, 20, 18) and not res.displacement[1].any()
    assert np.allclose(res.displacement[[0, 2]], t.numpy()[None, :, None, None, None])
    assert net.calls == ["displacement", "displacement"]
    # a known translation of k gives a known landmark distance against the fixed timepoint
    lm = np.repeat(np.array([[[8.0, 8.0, 8.0]]], np.float32), 3, axis=0)
    lm[[0, 2]] += t.numpy()  # landmarks where φ_k maps the fixed timepoint's point: p + t
    cols = landmark_columns(lm, res.displacement, res.inverse_displacement, g.spacing)
    assert cols["landmark_mm_before"] > 1.0 and cols["landmark_mm_after"] < 1e-3


def test_voxelmorph_peer_learns_on_a_synthetic_group_and_round_trips(tmp_path):
    torch.manual_seed(0)
    g = breathing_phantom((32,) * 3, 3, seed=0, num_landmarks=20)
    groups = [torch.from_numpy(np.stack([percentile_normalize(a) for a in g.images]))]
    settings = VoxelMorphSettings(patch_size=[32, 32, 32], lr=1e-2)
    model, settings = train_voxelmorph(groups, 100, settings, progress=False, checkpoint=tmp_path / "vxm.pt")
    assert settings.iterations == 100
    res = voxelmorph_all_to_one(g.images, model, settings)
    cols = landmark_columns(g.landmarks, res.displacement, res.inverse_displacement, g.spacing)
    assert cols["landmark_mm_after"] < 0.95 * cols["landmark_mm_before"], cols
    assert res.summary["folding_percent_all"] < 0.1
    again, s2 = load_voxelmorph(tmp_path / "vxm.pt")
    assert s2 == settings
    assert np.allclose(voxelmorph_all_to_one(g.images, again, s2).displacement, res.displacement, atol=1e-6)


def test_voxelmorph_peer_bad_input(tmp_path):
    with pytest.raises(InputError, match="multiples of 32"):
        build_voxelmorph(VoxelMorphSettings(patch_size=[48, 48, 48]))
    with pytest.raises(InputError, match="no such voxelmorph checkpoint"):
        load_voxelmorph(tmp_path / "missing.pt")
    torch.save({"kind": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not a voxelmorph-peer checkpoint"):
        load_voxelmorph(tmp_path / "other.pt")
    with pytest.raises(InputError, match=r"groups\[0\]: expected a \(K >= 2, D, H, W\)"):
        train_voxelmorph([torch.zeros(8, 8, 8)], 1, progress=False)
    images = np.zeros((3, 8, 8, 8), np.float32)
    images[1, 0, 0, 0] = np.nan
    model = build_voxelmorph()
    with pytest.raises(InputError, match="1 NaN/inf voxels"):
        voxelmorph_all_to_one(images, model)
    with pytest.raises(InputError, match="fixed"):
        voxelmorph_all_to_one(np.zeros((3, 8, 8, 8), np.float32), model, fixed=3)
    settings = VoxelMorphSettings()
    model, _ = train_voxelmorph([torch.rand(2, 8, 8, 8)], 0, settings, progress=False)
    save_voxelmorph(tmp_path / "ok.pt", model, settings)
    assert load_voxelmorph(tmp_path / "ok.pt")[1] == settings
