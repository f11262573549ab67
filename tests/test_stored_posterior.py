"""The fitted posterior stored in a registration folder (posterior.npz) and the draws made from it later:
the round trip, the draws' covariance against a dense float64 reference of the correlated family, and
the label probabilities of `apply --samples`."""
import json
import re

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.fft import idctn

from groupmorph_pyro.checks import InputError
from groupmorph_pyro.cli import main
from groupmorph_pyro.config import Config
from groupmorph_pyro.derived import label_probabilities, trajectory, trajectory_samples, ventilation_sd
from groupmorph_pyro.outputs import POSTERIOR_FILE, load_posterior_state, save_posterior_state, write_registration
from groupmorph_pyro.posterior import draw_latents, state_transform
from groupmorph_pyro.registration import register
from groupmorph_pyro.synthetic import breathing_phantom
from groupmorph_pyro.transfer import load_registration, transfer_labels
from groupmorph_pyro.volumes import load_volume, save_nifti

GRID = (3, 4, 2)


def _state(family, seed=0):
    rng = np.random.default_rng(seed)
    state = {"loc": rng.normal(size=(2, 3, *GRID)).astype(np.float32), "family": family,
             "sigma": rng.uniform(0.5, 1.5, size=(1, 1, *GRID)).astype(np.float32), "spectrum": None,
             "num_timepoints": 3, "mode": "all-to-one", "fixed": 0, "diffeomorphic": True, "integration_steps": 7,
             "integration_downsize": 1, "shape": (6, 8, 4)}
    if family == "dct":
        state["spectrum"] = rng.uniform(0.2, 2.0, size=(1, 1, *GRID)).astype(np.float32)
    return state


def test_a_state_round_trips_through_the_file(tmp_path):
    for family in ("diagonal", "dct"):
        state = _state(family)
        save_posterior_state(tmp_path / POSTERIOR_FILE, state)
        back = load_posterior_state(tmp_path)
        for name in ("loc", "sigma", "spectrum"):
            if state[name] is None:
                assert name not in back
            else:
                np.testing.assert_array_equal(back[name], state[name])
        assert {k: back[k] for k in ("family", "mode", "fixed", "shape", "integration_downsize")} == \
               {"family": family, "mode": "all-to-one", "fixed": 0, "shape": (6, 8, 4), "integration_downsize": 1}
        assert state_transform(back).integration_downsize == 1 and state_transform(back).num_latent == 2


def _dense_idct(shape):
    """The orthonormal 3D inverse DCT (type II's inverse) as a dense matrix, float64."""
    n = int(np.prod(shape))
    return np.stack([idctn(np.eye(n)[i].reshape(shape), norm="ortho").ravel() for i in range(n)], axis=1)


@pytest.mark.parametrize("family", ["diagonal", "dct"])
def test_draws_have_the_stored_mean_and_covariance(family):
    """Covariance of one component of one latent field, 24 voxels: diag(σ²), or A Cᵀ diag(s²) C A
    (A = diag σ, C the DCT) built from a dense float64 matrix, against 4000 draws."""
    state = _state(family)
    draws = torch.stack([z[0, 1, 2] for z in draw_latents(state, 4000, seed=3)]).double().reshape(4000, -1).numpy()
    loc = state["loc"][1, 2].ravel()
    a = np.diag(state["sigma"][0, 0].ravel().astype(np.float64))
    if family == "dct":
        c = _dense_idct(GRID)  # z = loc + a ⊙ IDCT(s ⊙ ε)
        s = np.diag(state["spectrum"][0, 0].ravel().astype(np.float64))
        cov = a @ c @ s @ s @ c.T @ a
    else:
        cov = a @ a
    sd = np.sqrt(np.diag(cov))
    assert np.abs(draws.mean(0) - loc).max() < 5 * sd.max() / np.sqrt(4000)
    assert np.abs(np.cov(draws.T) - cov).max() < 0.12 * np.abs(cov).max()
    if family == "dct":
        assert np.abs(cov - np.diag(np.diag(cov))).max() > 0.2 * np.diag(cov).max()  # neighbours are correlated


def test_draws_repeat_with_their_seed_and_leave_the_global_random_state_alone():
    state = _state("dct")
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    first = [z.clone() for z in draw_latents(state, 3, seed=5)]
    assert torch.equal(torch.rand(3), expected)
    second = list(draw_latents(state, 3, seed=5))
    assert all(torch.equal(a, b) for a, b in zip(first, second)) and not torch.equal(first[0], first[1])
    with pytest.raises(InputError, match=r"samples: expected an integer >= 1, got 0"):
        next(draw_latents(state, 0))


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A breathing phantom registered with the defaults and written (posterior.npz included); a label
    map of its lungs' vessels in phase 0 and, as truth, that map carried to phase 3 by the true motion."""
    root = tmp_path_factory.mktemp("stored_posterior")
    group = breathing_phantom((40, 40, 32), 4, amplitude=3.0, noise=0.02, seed=5)
    cfg = Config()
    cfg.model.num_timepoints = 4
    result = register(group.images, cfg, seed=0, affine=group.affine)
    write_registration(result, root / "reg", group.affine, itk=False)
    clean = breathing_phantom((40, 40, 32), 4, amplitude=3.0, noise=0.0, seed=5).images
    labels = np.where(clean[0] > 0.4, 2, np.where(clean[0] > 0.3, 1, 0))  # bright structures, their rim
    from groupmorph_pyro.spatial import integrate_velocity, warp

    true_map = integrate_velocity(torch.from_numpy(group.velocities[3:4]).double())  # phase 3 shows ref at q + u(q)
    truth = warp(torch.from_numpy(labels).double()[None, None], true_map, mode="nearest")[0, 0].numpy().round()
    return {"root": root, "reg": root / "reg", "group": group, "labels": labels, "truth": truth, "result": result}


def test_register_stores_the_posterior_it_ends_on(registered):
    state = load_posterior_state(registered["reg"])
    result = registered["result"]
    np.testing.assert_array_equal(state["loc"], result.loc)
    assert state["family"] == "dct" and state["spectrum"] is not None  # the default per-case posterior
    assert state["shape"] == (40, 40, 32) and state["num_timepoints"] == 4


def test_one_tight_draw_carries_labels_like_the_stored_maps(registered):
    """σ → 0: every draw is the mean, so the probabilities are the one-hot map of the label map the
    stored (posterior-mean) maps carry (transfer_labels)."""
    reg = load_registration(registered["reg"])
    state = dict(load_posterior_state(registered["reg"]), sigma=np.full((1, 1, 1, 1, 1), 1e-6, np.float32))
    values, probs = label_probabilities(reg, state, registered["labels"], 0, 3, samples=2)
    assert values == [0, 1, 2] and probs.shape == (3, 40, 40, 32)
    mean_map = transfer_labels(registered["labels"], reg, 0, 3)
    onehot = np.stack([mean_map == v for v in values])
    assert set(np.unique(probs)) <= {0.0, 1.0}
    assert (probs.astype(bool) == onehot).all(0).mean() > 0.999  # float32 draws against the stored maps: near-ties
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-6)


def test_probabilities_score_better_than_the_unmoved_labels(registered):
    """Brier score against the labels carried by the true motion, over the voxels near any boundary:
    the probabilities beat the label map left where it was. (They do not beat the posterior mean's
    own label map on this phantom, whose registration error is below the posterior's spread: the
    issue notes give both scores.)"""
    reg = load_registration(registered["reg"])
    state = load_posterior_state(registered["reg"])
    values, probs = label_probabilities(reg, state, registered["labels"], 0, 3, samples=16)
    truth = registered["truth"]
    onehot = np.stack([truth == v for v in values]).astype(np.float64)
    unmoved = np.stack([registered["labels"] == v for v in values]).astype(np.float64)
    from scipy.ndimage import binary_dilation

    edges = np.zeros(truth.shape, bool)
    for v in values:
        region = truth == v
        edges |= binary_dilation(region, iterations=2) & ~region
    brier = lambda p: float(((p - onehot) ** 2).sum(0)[edges].mean())  # noqa: E731
    assert brier(probs) < 0.7 * brier(unmoved), (brier(probs), brier(unmoved))
    np.testing.assert_allclose(probs * 16, np.round(probs * 16), atol=1e-4)  # fractions of the 16 draws
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-6)


def test_cli_writes_probabilities_the_best_label_and_their_order(registered, tmp_path, capsys):
    labels = tmp_path / "labels.nii.gz"
    save_nifti(labels, registered["labels"].astype(np.int16), registered["group"].affine, dtype=np.int16)
    out = tmp_path / "probs.nii.gz"
    assert main(["apply", str(registered["reg"]), "--from", "0", "--to", "3", "--labels", str(labels),
                 "--samples", "3", "--out", str(out)]) == 0
    probs = np.asarray(nib.load(out).dataobj)
    table = json.loads((tmp_path / "probs.json").read_text())
    best = load_volume(tmp_path / "probs_labels.nii.gz").data
    assert probs.shape == (40, 40, 32, 3) and table["labels"] == [0, 1, 2] and table["samples"] == 3
    np.testing.assert_array_equal(best, np.asarray(table["labels"])[probs.argmax(-1)])
    assert "under 3 posterior samples" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["image", "zero", "no-posterior"])
def test_bad_sample_requests_exit_2_with_one_line(registered, tmp_path, capsys, case):
    labels = tmp_path / "labels.nii.gz"
    save_nifti(labels, registered["labels"].astype(np.int16), registered["group"].affine, dtype=np.int16)
    reg = registered["reg"]
    if case == "no-posterior":
        import shutil

        reg = tmp_path / "copy"
        shutil.copytree(registered["reg"], reg)
        (reg / POSTERIOR_FILE).unlink()
    argv, expected = {
        "image": (["--image", str(labels), "--samples", "2"], "--samples: only with --labels"),
        "zero": (["--labels", str(labels), "--samples", "0"], "--samples: expected an integer >= 1, got 0"),
        "no-posterior": (["--labels", str(labels), "--samples", "2"], "no posterior.npz"),
    }[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["apply", str(reg), "--from", "0", "--to", "1", "--out", str(tmp_path / "p.nii.gz"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("groupmorph: error: ") and err.count("\n") == 1 and re.search(expected, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_tight_draws_follow_the_stored_maps_and_have_no_spread(registered):
    reg = load_registration(registered["reg"])
    state = dict(load_posterior_state(registered["reg"]), sigma=np.full((1, 1, 1, 1, 1), 1e-6, np.float32))
    points = registered["group"].landmarks[1][:10].astype(np.float64)
    draws = trajectory_samples(reg, state, points, 1, samples=2)
    assert draws.shape == (2, 4, 10, 3)
    np.testing.assert_allclose(draws[0], trajectory(reg, points, 1), atol=2e-3)  # float32 maps against the stored
    assert ventilation_sd(reg, state, 0, 3, samples=3).max() < 1e-3
    hu = 1000.0 * (registered["group"].images.astype(np.float32) - 1.0)  # intensities as CT densities
    assert ventilation_sd(reg, state, 0, 3, samples=3, method="hu", images=hu).max() < 1e-3
    with pytest.raises(InputError, match=r"method \(--method\): expected one of \('jacobian', 'hu'\), got 'density'"):
        ventilation_sd(reg, state, 0, 3, samples=3, method="density", images=hu)


def test_trajectory_bands_hold_the_true_landmarks(registered):
    """90 % bands (5th to 95th percentile of 20 draws) of phase 0's landmarks followed to every phase,
    against the landmarks' true positions; the rate goes in the issue notes."""
    reg = load_registration(registered["reg"])
    state = load_posterior_state(registered["reg"])
    lm = registered["group"].landmarks.astype(np.float64)
    draws = trajectory_samples(reg, state, lm[0], 0, samples=20, seed=1)[:, 1:]  # phases 1..3
    lo, hi = np.percentile(draws, 5, axis=0), np.percentile(draws, 95, axis=0)
    inside = ((lm[1:] >= lo) & (lm[1:] <= hi)).all(-1)  # all three axes inside
    assert inside.mean() > 0.5, inside.mean()
    assert (hi - lo).mean() > 0.01  # the bands have a width
    sd = ventilation_sd(reg, state, 0, 3, samples=4)
    assert np.isfinite(sd).all() and sd.mean() > 1e-3
    hu = 1000.0 * (registered["group"].images.astype(np.float32) - 1.0)
    sd_hu = ventilation_sd(reg, state, 0, 3, samples=4, method="hu", images=hu)
    assert np.isfinite(sd_hu).all() and sd_hu.mean() > 1e-3


def test_cli_adds_spread_columns_and_maps_with_samples(registered, tmp_path, capsys):
    import csv

    from groupmorph_pyro.data import write_landmarks

    write_landmarks(tmp_path / "lm.txt", registered["group"].landmarks[0][:5])
    assert main(["trajectory", str(registered["reg"]), "--points", str(tmp_path / "lm.txt"), "--frame", "0",
                 "--samples", "3", "--out", str(tmp_path / "t.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert len(rows) == 20 and {"sd_x", "x_p5", "z_p95"} <= set(rows[0])
    assert all(float(r["x_p5"]) <= float(r["x_p95"]) for r in rows)
    mask = tmp_path / "mask.nii.gz"
    save_nifti(mask, (registered["labels"] > 0).astype(np.uint8), registered["group"].affine, dtype=np.uint8)
    assert main(["ventilation", str(registered["reg"]), "--from", "0", "--to", "3", "--mask", str(mask),
                 "--samples", "2", "--out", str(tmp_path / "v.nii.gz")]) == 0
    summary = json.loads((tmp_path / "v.json").read_text())
    sd = load_volume(tmp_path / "v_sd.nii.gz").data
    assert summary["samples"] == 2 and summary["all"]["sd_mean"] == pytest.approx(float(sd[sd > 0].mean()), rel=0.05)
    assert "posterior sd" in capsys.readouterr().out
