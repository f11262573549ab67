import numpy as np
import pytest
import torch

from groupmorph_pyro.checks import InputError
from groupmorph_pyro.metrics import folding_percent, landmark_distances, pairwise_rmse, summarize_distances

SHAPE = (10, 12, 8)
SPACING = (0.97, 0.97, 2.5)


def constant_fields(shifts):
    """φ_k = Id + d_k with constant d_k (voxels): exact inverse Id − d_k."""
    d = torch.tensor(shifts, dtype=torch.float64)[:, :, None, None, None].expand(-1, -1, *SHAPE).contiguous()
    return d, -d


def test_landmark_distance_of_pure_translations_is_analytic():
    rng = np.random.default_rng(0)
    ref = rng.uniform(3, 6, size=(4, 3))  # 4 landmarks in the common frame
    t = np.array([[0.0, 0, 0], [1.0, 0, 0], [0, 2.0, 0], [0, 0, 1.0]])  # image k = translated by t_k
    landmarks = ref[None] + t[:, None]  # (K=4, L=4, 3)
    s = np.asarray(SPACING)
    # identity: ‖l_j − l_i‖ = ‖t_j − t_i‖ in mm, for all ordered pairs
    ident = landmark_distances(landmarks, spacing=SPACING)
    expected = [np.linalg.norm((t[j] - t[i]) * s) for i in range(4) for j in range(4) if i != j]
    assert np.allclose(ident, np.repeat(np.array(expected)[:, None], 4, axis=1))
    # perfect registration: φ_k = Id + t_k -> zero error
    d, inv = constant_fields(t)
    assert np.allclose(landmark_distances(landmarks, d, inv, SPACING), 0.0, atol=1e-9)
    # half-way registration: residual (t_j − t_i)/2
    d, inv = constant_fields(t / 2)
    half = summarize_distances(landmark_distances(landmarks, d, inv, SPACING))
    assert half["mean_mm"] == pytest.approx(np.mean(expected) / 2)
    assert half["n"] == 4 * 3 * 4


def test_folding_and_rmse():
    jac = torch.ones(2, 4, 4, 4)
    jac[0, 0, 0, :2] = -1
    jac[1, 1, 1, 1] = 0
    assert folding_percent(jac) == pytest.approx(100 * 3 / 128)
    imgs = np.stack([np.zeros((2, 2, 2)), np.full((2, 2, 2), 3.0)])
    assert pairwise_rmse(imgs) == pytest.approx(3.0)


def test_bad_landmarks():
    with pytest.raises(InputError, match=r"expected \(K >= 2, L, 3\)"):
        landmark_distances(np.zeros((1, 5, 3)))
