"""Posterior sampling: maps, sample behaviour, fine-tuning guard, InferenceData, CLI."""
import json
import math

import arviz as az
import numpy as np
import pytest
import torch
from pyro.infer import Trace_ELBO

from groupmorph_pyro.checks import InputError
from groupmorph_pyro.cli import main
from groupmorph_pyro.config import Config
from groupmorph_pyro.data import write_landmarks
from groupmorph_pyro.volumes import save_nifti
from groupmorph_pyro.model import CaseGuide, GroupMorphModel
from groupmorph_pyro.posterior import (
    landmark_posterior, sample_posterior, save_inference_data, to_inference_data, uncertainty_maps,
)
from groupmorph_pyro.config import RegisterConfig
from groupmorph_pyro.model import build_guide
from groupmorph_pyro.group import GroupTransform
from groupmorph_pyro.registration import elbo_loss, fit_case, normalize_group, register
from groupmorph_pyro.synthetic import breathing_phantom
from test_priors import dense_precision

SHAPE = (12, 12, 12)


@pytest.fixture(scope="module")
def group():
    return breathing_phantom((20, 20, 20), 3, amplitude=2.0, num_landmarks=6, seed=4)


def _case_guide(scale):
    loc = torch.zeros(1, 2, 3, *SHAPE)
    loc[:, :, 0] = 0.5
    return CaseGuide(loc, torch.full_like(loc, scale))


def test_samples_differ_when_sigma_positive_and_coincide_when_sigma_vanishes():
    model, x = GroupMorphModel(3), torch.rand(1, 3, *SHAPE)
    wide = sample_posterior(model, _case_guide(0.5), x, 0, 4)["displacement"]
    narrow = sample_posterior(model, _case_guide(1e-7), x, 0, 4)["displacement"]
    assert wide.shape == narrow.shape == (4, 1, 3, 3, *SHAPE)
    assert (wide[0] - wide[1]).abs().max() > 0.1
    assert (narrow - narrow[0]).abs().max() < 1e-4
    assert torch.equal(wide[:, :, 0], torch.zeros_like(wide[:, :, 0]))  # fixed timepoint: identity in every sample


def test_uncertainty_map_shapes_and_units():
    s, k = 6, 2
    g = torch.Generator().manual_seed(0)
    disp = torch.zeros(s, 1, k, 3, *SHAPE)
    disp[:, 0, 1, 2] = torch.randn(s, 1, 1, 1, generator=g).expand(s, *SHAPE)  # only axis 2 of timepoint 1 varies
    jac = torch.ones(s, 1, k, *SHAPE)
    jac[:3, 0, 1, 0, 0, 0] = -1.0  # folds in half of the samples at one voxel
    samples = {"displacement": disp, "jacobian": jac}
    raw = torch.rand(1, k, *SHAPE) * 1000
    maps = uncertainty_maps(samples, raw, (1.0, 1.0, 2.5), GroupTransform(k))
    for name in ("displacement_std_mm", "warped_std", "folding_probability"):
        assert maps[name].shape == (k, *SHAPE)
    expected_mm = disp[:, 0, 1, 2, 0, 0, 0].double().std(unbiased=False) * 2.5  # voxels -> mm on axis 2
    assert np.allclose(maps["displacement_std_mm"][1], float(expected_mm), rtol=1e-5)
    assert np.allclose(maps["displacement_std_mm"][0], 0.0)
    assert maps["folding_probability"][1, 0, 0, 0] == pytest.approx(0.5)
    assert maps["folding_probability"].sum() == pytest.approx(0.5)
    assert maps["warped_std"][0].max() == pytest.approx(0.0, abs=1e-3)  # identity in every sample
    assert maps["warped_std"][1].max() > 1.0  # intensity units (raw images scaled by 1000)


def test_landmark_posterior_and_inference_data_round_trip(tmp_path):
    model, x = GroupMorphModel(3), torch.rand(1, 3, *SHAPE)
    samples = sample_posterior(model, _case_guide(0.3), x, 0, 5)
    landmarks = torch.rand(3, 4, 3) * 10 + 0.5
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    lp = landmark_posterior(samples, landmarks, affine, model.transform(0))
    assert lp["positions"].shape == (5, 3, 4, 3) and lp["cov"].shape == (3, 4, 3, 3)
    assert np.allclose(lp["mean"][0], landmarks[0].numpy() * [2.0, 2.0, 3.0])  # fixed timepoint: exact, in mm
    assert np.allclose(lp["cov"][0], 0.0) and (np.diagonal(lp["cov"][1], axis1=-2, axis2=-1) > 0).all()
    idata = to_inference_data(samples, x, (2.0, 2.0, 3.0), model.transform(0), lp["positions"])
    save_inference_data(idata, tmp_path / "posterior.nc")
    back = az.from_netcdf(tmp_path / "posterior.nc")
    pos = back.posterior["landmark_position"]
    assert pos.dims == ("chain", "draw", "timepoint", "landmark", "axis")
    assert np.allclose(pos.values, idata.posterior["landmark_position"].values)
    assert list(back.posterior["axis"].values) == ["x", "y", "z"]
    summary = az.summary(back, var_names=["landmark_position"], kind="stats")
    assert len(summary) == 3 * 4 * 3


@pytest.mark.parametrize("lr", [0.2, 50.0])
def test_finetuning_never_makes_the_elbo_worse(group, lr):
    cfg = Config()
    cfg.model.num_timepoints = 3
    model = GroupMorphModel(3)
    x = normalize_group(group.images)
    loc, scale = torch.zeros(1, 2, 3, *x.shape[2:]), torch.full((1, 2, 3, *x.shape[2:]), 0.05)
    guide, info = fit_case(model, x, 0, loc, scale, RegisterConfig(lr=lr), steps=8)
    assert info["elbo_loss_after"] <= info["elbo_loss_before"]
    # the guide returned is the one whose ELBO was reported
    assert elbo_loss(model, guide, x, 0, RegisterConfig().guard_particles) == pytest.approx(info["elbo_loss_after"], rel=1e-5)
    if lr > 1:
        assert info["kept"] == "initial" and info["diverged"]
    else:  # it learns: 8 steps must improve the ELBO clearly (fails when the updates do nothing)
        assert info["kept"] == "refined" and info["elbo_loss_after"] < info["elbo_loss_before"] - 0.5, info


def test_finetuning_an_amortised_posterior_improves_its_log_joint(group):
    """Fine-tuning from a (random, near-identity) network's posterior moves the mean as a point estimate
    by SGD; the guard compares log joints at the two means, and the refined mean must win by a margin."""
    cfg = Config()
    cfg.model.num_timepoints, cfg.model.encoder, cfg.model.decoder = 3, [4, 4], [4, 4, 4]
    torch.manual_seed(1)
    res = register(group.images, cfg, build_guide(cfg.model), finetune_steps=5)
    ft = res.summary["finetune"]
    assert ft["fit"] == "map-sgd" and ft["steps_run"] == 5
    assert ft["kept"] == "refined" and ft["elbo_loss_after"] < ft["elbo_loss_before"] - 1e-3, ft


def test_the_sigma_phase_follows_fits_from_zero_only(group):
    """Fine-tuning a network's posterior keeps the network's σ (no reset, no covariance choice); a fit
    from zero resets σ to the prior's mean-field optimum without steps, then picks the family."""
    cfg = Config()
    cfg.model.num_timepoints, cfg.model.encoder, cfg.model.decoder = 3, [4, 4], [4, 4, 4]
    torch.manual_seed(1)
    guide = build_guide(cfg.model)
    skipped = register(group.images, cfg, guide, finetune_steps=3).summary["finetune"]
    assert "scale_phase" not in skipped and skipped["steps_run"] == 3
    from_zero = register(group.images, cfg, finetune_steps=3).summary["finetune"]
    assert from_zero["scale_phase"]["steps_run"] == 0 and from_zero["scale_phase"]["reset"]
    assert from_zero["elbo_loss_after"] == from_zero["scale_phase"]["elbo_loss_after"]
    assert from_zero["scale_phase"]["covariance"] in ("diagonal", "dct")


def test_register_reports_finetune_gain_and_landmarks(group):
    cfg = Config()
    cfg.model.num_timepoints = 3
    res = register(group.images, cfg, finetune_steps=5, landmarks=group.landmarks, affine=group.affine, samples=3)
    ft = res.summary["finetune"]
    assert {"nmi_before", "nmi_after", "nmi_gain", "landmarks_before_mm", "landmarks_after_mm", "steps_run"} <= set(ft)
    assert res.summary["landmarks"]["identity"]["mean_mm"] == pytest.approx(ft["landmarks_before_mm"])
    assert res.uncertainty["displacement_std_mm"].shape == (3, 20, 20, 20)
    assert res.landmark_posterior["cov_mm2"].shape == (3, 6, 3, 3)


def test_cli_samples_and_landmarks(tmp_path, group):
    paths, lms = [], []
    for k in range(3):
        paths.append(str(tmp_path / f"t{k}.nii.gz"))
        save_nifti(paths[-1], group.images[k], group.affine)
        lms.append(str(tmp_path / f"l{k}.txt"))
        write_landmarks(lms[-1], group.landmarks[k])
    out = tmp_path / "out"
    rc = main(["register", *paths, "--out", str(out), "--finetune-steps", "3", "--samples", "3", "--landmarks", *lms, "--quiet"])
    assert rc == 0
    for k in range(3):
        for name in ("displacement_std_mm", "warped_std", "folding_probability"):
            assert (out / f"{name}_{k}.nii.gz").exists()
        assert (out / f"uncertainty_{k}.png").read_bytes()[:4] == b"\x89PNG"
    assert az.from_netcdf(out / "posterior.nc").posterior["landmark_position"].shape == (1, 3, 3, 6, 3)
    assert np.asarray(json.loads((out / "landmarks_posterior.json").read_text())["cov_mm2"]).shape == (3, 6, 3, 3)
    rc = main(["register", *paths, "--out", str(tmp_path / "bad"), "--landmarks", *lms[:2], "--quiet"])
    assert rc == 2 and not (tmp_path / "bad").exists()


def test_samples_without_network_or_steps_sample_the_starting_posterior(group):
    cfg = Config()
    cfg.model.num_timepoints = 3
    cfg.register.init_scale = 0.2
    res = register(group.images, cfg, finetune_steps=0, samples=3)
    assert res.summary["per_case_steps"] == 0 and np.allclose(res.displacement, 0.0)
    assert res.uncertainty["displacement_std_mm"][1:].mean() > 0.0
    assert np.allclose(res.uncertainty["displacement_std_mm"][0], 0.0)  # the fixed timepoint


def test_iterate_averaging_returns_the_mean_of_the_last_iterates_and_cosine_ends_at_zero(group, monkeypatch):
    """average=0.5 over 6 steps: the guide keeps the mean of the parameters after steps 4, 5, 6;
    the cosine schedule starts at lr and decays towards 0."""
    model = GroupMorphModel(3)
    x = normalize_group(group.images)
    loc, scale = torch.zeros(1, 2, 3, *x.shape[2:]), torch.full((1, 2, 3, *x.shape[2:]), 0.05)
    seen, lrs = [], []
    from groupmorph_pyro.optim import Adam
    step = Adam.step

    def recording_step(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        seen.append([p.detach().clone() for g in self.param_groups for p in g["params"]])
        lrs.append(self.param_groups[0]["lr"])
        return out

    monkeypatch.setattr(Adam, "step", recording_step)
    settings = RegisterConfig(lr=0.05, schedule="cosine", average=0.5)
    guide, info = fit_case(model, x, 0, loc, scale, settings, steps=6)
    assert info["kept"] == "refined" and len(seen) == 6
    expected = [torch.stack([s[i] for s in seen[3:]]).mean(0) for i in range(2)]
    for p, e in zip(guide.parameters(), expected):
        assert torch.allclose(p, e, atol=1e-6)
    assert not torch.allclose(expected[0], seen[-1][0])  # the average is not just the last iterate
    assert lrs[0] == pytest.approx(0.05) and lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.05 * 0.1


def test_coarse_to_fine_reaches_the_full_resolution_result_in_fewer_full_steps():
    """Per-case from zero on a 24^3 phantom: the pyramid [2, 1] (100 half-resolution steps, then 30 full)
    lands within 0.2 mm of 120 full-resolution steps (measured: 0.65 vs 0.56 mm, identity 1.79 mm), and
    both at least halve the identity error."""
    g = breathing_phantom((24, 24, 24), 3, amplitude=3.0, num_landmarks=30, seed=5)
    results = {}
    for name, pyramid, steps in (("full", [1], 120), ("pyramid", [2, 1], 30)):
        cfg = Config()
        cfg.model.num_timepoints, cfg.model.prior = 3, "laplacian"  # bending: pyramid 0.33, full only 0.60 mm
        cfg.register.scale_reset = False  # mean and σ by SVI, as measured; with the MAP mean: full 0.16, pyramid 0.38 mm
        cfg.register.pyramid, cfg.register.coarse_steps = pyramid, 100
        res = register(g.images, cfg, finetune_steps=steps, landmarks=g.landmarks, affine=g.affine, seed=0)
        results[name] = res.summary["landmarks"]
        if name == "pyramid":
            levels = res.summary["finetune"]["levels"]
            assert [lv["factor"] for lv in levels] == [2] and levels[0]["shape"] == [13, 13, 13]
            assert levels[0]["steps_run"] == 100 and res.summary["finetune"]["steps_run"] == 30
        else:
            assert "levels" not in res.summary["finetune"]
    identity = results["full"]["identity"]["mean_mm"]
    full, pyr = results["full"]["registered"]["mean_mm"], results["pyramid"]["registered"]["mean_mm"]
    assert full <= 0.5 * identity and pyr <= 0.5 * identity, (identity, full, pyr)
    assert abs(full - pyr) < 0.2, (full, pyr)


def test_fit_scale_resets_sigma_to_the_priors_mean_field_optimum_and_keeps_the_mean(group):
    """σ_i = 1/sqrt(Λ_ii) with Λ = 0.01 I + L (6-neighbour graph Laplacian): 1/sqrt(6.01) inside,
    1/sqrt(5.01) on a face, 1/sqrt(3.01) at a corner; the mean stays. Without the reset σ stays too."""
    from groupmorph_pyro.registration import fit_scale

    model = GroupMorphModel(3)
    x = normalize_group(group.images)
    loc = torch.zeros(1, 2, 3, *x.shape[2:])
    loc[:, :, 0] = torch.linspace(-1, 1, x.shape[2]).view(-1, 1, 1)
    case = CaseGuide(loc, torch.full_like(loc, 0.05), model.prior_distribution(loc.shape[3:]))
    reset, info = fit_scale(model, x, 0, case, RegisterConfig(covariance="diagonal"))
    _, scale = reset.distribution_params()
    assert info["reset"] and info["steps_run"] == 0
    assert scale[0, 0, 0, 5, 5, 5].item() == pytest.approx(6.01 ** -0.5, rel=1e-5)
    assert scale[0, 1, 2, 0, 5, 5].item() == pytest.approx(5.01 ** -0.5, rel=1e-5)
    assert scale[0, 0, 1, 0, 0, 0].item() == pytest.approx(3.01 ** -0.5, rel=1e-5)
    assert torch.allclose(reset.distribution_params()[0], case.distribution_params()[0], atol=1e-6)  # the mean stays
    kept, info = fit_scale(model, x, 0, case, RegisterConfig(scale_reset=False, covariance="diagonal"))
    assert not info["reset"] and torch.allclose(kept.distribution_params()[1], torch.full_like(loc, 0.05))


def test_foreground_mask_keeps_the_body_and_drops_the_air():
    from groupmorph_pyro.plots import foreground_mask

    image = np.zeros((10, 10, 10))
    image[2:8, 3:7, 1:9] = 0.6 + 0.01 * np.arange(8)  # a body with some texture, air = 0
    mask = foreground_mask(image)
    assert mask[2:8, 3:7, 1:9].all() and mask.sum() == 6 * 4 * 8
    assert foreground_mask(np.full((4, 4, 4), 3.0)).all()  # a constant image: nothing to mask


def test_a_point_guide_makes_the_elbo_the_negative_log_joint_at_the_mean():
    """CaseGuide(point=True) is a Delta at the mean: with a likelihood that is 0 everywhere the ELBO loss
    is -log p(μ) exactly, against a dense float64 Gaussian with Λ = 0.01 I + L (no entropy term)."""

    shape = (4, 5, 3)
    model = GroupMorphModel(3, likelihood=lambda warped: warped.sum(dim=(1, 2, 3, 4)) * 0.0)
    zz, yy, xx = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    loc = torch.zeros(1, 2, 3, *shape, dtype=torch.float64)
    for k in range(2):
        for c in range(3):
            loc[0, k, c] = torch.from_numpy(np.sin(3 * zz + k) * xx - 0.7 * c * yy ** 2 + 0.2 * k)
    guide = CaseGuide(loc.float(), torch.full(loc.shape, 0.3), model.prior_distribution(shape), point=True)
    x = torch.rand(1, 3, *shape)
    loss = Trace_ELBO().loss(model, guide, x, 0)
    prec = dense_precision(shape, 1.0, 0.01).numpy()
    _, logdet = np.linalg.slogdet(prec)
    z = guide.distribution().mean.detach().double().reshape(6, -1).numpy()  # the mean the guide stores (float32 round trip)
    expected = sum(0.5 * logdet - 0.5 * v @ prec @ v - 0.5 * v.size * np.log(2 * np.pi) for v in z)
    assert loss == pytest.approx(-expected, rel=1e-4)
    assert torch.allclose(guide.distribution().sample(), guide.distribution().mean)  # no spread
    assert torch.allclose(guide.distribution_params()[1], torch.full(loc.shape, 0.3))


def test_a_map_fit_moves_only_the_mean_and_register_uses_it_from_zero_only(group, monkeypatch):
    """fit_case(fit="map") learns the mean and leaves σ; register fits the mean as a point estimate by
    Adam at every level of a fit from zero when the σ reset follows (by SVI on mean and σ without the
    reset), and by SGD when fine-tuning a network's posterior, whose σ it keeps."""
    import groupmorph_pyro.registration as R

    model = GroupMorphModel(3)
    x = normalize_group(group.images)
    loc, scale = torch.zeros(1, 2, 3, *x.shape[2:]), torch.full((1, 2, 3, *x.shape[2:]), 0.05)
    guide, info = fit_case(model, x, 0, loc, scale, RegisterConfig(lr=0.1), steps=8, fit="map")
    new_loc, new_scale = guide.distribution_params()
    assert info["kept"] == "refined" and info["elbo_loss_after"] < info["elbo_loss_before"]
    assert new_loc.abs().max() > 0.05 and torch.allclose(new_scale, scale, rtol=1e-6, atol=0)  # σ untouched

    calls = []
    fit = R.fit_case

    def recording(*args, **kwargs):
        calls.append((args[9] if len(args) > 9 else kwargs.get("progress", False), kwargs["fit"]))
        return fit(*args, **kwargs)

    monkeypatch.setattr(R, "fit_case", recording)
    g = breathing_phantom((24, 24, 24), 3, amplitude=2.0, num_landmarks=6, seed=4)
    cfg = Config()
    cfg.model.num_timepoints, cfg.register.coarse_steps = 3, 2
    for reset, expected in ((True, "map"), (False, "svi")):
        cfg.register.scale_reset = reset
        calls.clear()
        summary = register(g.images, cfg, finetune_steps=2).summary["finetune"]
        assert summary["fit"] == expected and ("scale_phase" in summary) is reset
        assert [c[1] for c in calls] == [expected, expected]  # the coarse level, then the full grid
    cfg.register.scale_reset = True
    cfg.model.encoder, cfg.model.decoder = [4, 4], [4, 4, 4]
    torch.manual_seed(1)
    calls.clear()
    guide = build_guide(cfg.model)
    res = register(g.images, cfg, guide, finetune_steps=2)
    assert res.summary["finetune"]["fit"] == "map-sgd" and [c[1] for c in calls] == ["map-sgd"]
    with torch.no_grad():
        _, network_scale = guide.distribution_params(normalize_group(g.images), 0)
    assert np.allclose(res.scale, network_scale[0].numpy(), rtol=1e-5)


def test_sgd_moves_the_whitened_mean_along_its_gradient(group):
    """fit_case(fit="map-sgd"): Nesterov momentum 0.9 from rest, so the first step is exactly
    -lr (1 + 0.9) g with g the gradient of the negative log joint in the whitened coordinates, computed
    here by Pyro's loss on a fresh point guide (no jitter: the loss is deterministic). Adam's first step
    (fit="map": about -lr sign(g) everywhere) is not proportional to g."""
    model = GroupMorphModel(3)
    x = normalize_group(group.images)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(0, 1, n) for n in x.shape[2:]], indexing="ij"))
    loc = (0.4 * torch.sin(3 * grid + torch.arange(3.0).view(3, 1, 1, 1)))[None, None].repeat(1, 2, 1, 1, 1, 1)
    scale = torch.full_like(loc, 0.05)
    reference = CaseGuide(loc, scale, model.prior_distribution(loc.shape[3:], loc.device), point=True)
    Trace_ELBO().differentiable_loss(model, reference, x, 0).backward()
    g = reference.whitened.grad.detach()
    lr = 1e-4
    for fit in ("map-sgd", "map"):
        settings = RegisterConfig(lr=lr, schedule="constant", average=0, guard_particles=1)
        case, info = fit_case(model, x, 0, loc, scale, settings, steps=1, fit=fit)
        assert info["kept"] == "refined", info
        step = case.whitened.detach() - reference.whitened.detach()
        proportional = torch.allclose(step, -lr * 1.9 * g, rtol=1e-3, atol=1e-6 * float(g.abs().max()) * lr)
        assert proportional is (fit == "map-sgd"), (fit, float((step + lr * 1.9 * g).abs().max()))


@pytest.mark.parametrize("kwargs, match", [
    ({"fit": "sgd"}, r"fit_case: fit: expected one of \['svi', 'map', 'map-sgd'\], got 'sgd'"),
    ({"steps": -1}, r"steps: expected an integer >= 0, got -1"),
    ({"steps": True}, r"steps: expected an integer >= 0, got True"),
])
def test_fit_case_refuses_bad_arguments(kwargs, match):
    loc = torch.zeros(1, 2, 3, *SHAPE)
    with pytest.raises(InputError, match=match):
        fit_case(GroupMorphModel(3), torch.rand(1, 3, *SHAPE), 0, loc, torch.ones_like(loc), **{"steps": 1, **kwargs})


def test_bad_point_estimates_are_refused():
    loc = torch.zeros(1, 2, 3, *SHAPE)
    with pytest.raises(ValueError, match="point: expected True or False, got 1"):
        CaseGuide(loc, torch.ones_like(loc), point=1)
    with pytest.raises(ValueError, match="a point estimate"):
        CaseGuide(loc, torch.ones_like(loc), spectrum=torch.ones_like(loc), point=True)


def _point_guide(model, shape, k_lat, seed=0):
    gen = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.linspace(0, 1, n) for n in shape], indexing="ij")
    smooth = torch.stack([torch.sin(3 * axes[0] + c) * torch.cos(2 * axes[1]) + axes[2] for c in range(3)])
    loc = 0.6 * smooth[None, None] + 0.05 * torch.randn(1, k_lat, 3, *shape, generator=gen)  # varies in space
    return CaseGuide(loc, torch.full_like(loc, 0.1), model.prior_distribution(shape), point=True)


@pytest.mark.parametrize("prior_name, options", [("laplacian", {"lambda_v": 0.002}), ("bending", {})])
def test_map_loss_equals_trace_elbo_and_its_prior_term_the_dense_density(prior_name, options):
    """The per-case MAP step's loss (model.map_loss, no Pyro tracing, prior read off the whitened mean)
    against Pyro's Trace_ELBO on the same point guide and jitter draw; its prior term against a dense
    float64 Gaussian (the Laplacian prior with λ_v = 0.002 puts the guide's spectrum floor to work)."""
    from groupmorph_pyro.model import has_map_loss, map_loss
    from groupmorph_pyro.priors import make_prior
    shape = (5, 6, 4)
    model = GroupMorphModel(3, prior=make_prior(prior_name, **options), jitter=True)
    x = torch.rand(1, 3, *shape, generator=torch.Generator().manual_seed(1))
    guide = _point_guide(model, shape, 2)
    assert has_map_loss(model, guide)
    torch.manual_seed(5)
    ours = map_loss(model, guide, x, 0)
    ours.backward()
    grad = guide.whitened.grad.clone()
    guide.whitened.grad = None
    torch.manual_seed(5)
    ref = Trace_ELBO().differentiable_loss(model, guide, x, 0)
    ref.backward()
    assert torch.allclose(ours, ref, rtol=1e-5)
    assert torch.allclose(grad, guide.whitened.grad, rtol=1e-4, atol=1e-6 * grad.abs().max())
    prior = model.prior_distribution(shape)
    mu = guide.distribution().mean.detach().double().reshape(2, 3, -1)
    if prior_name == "laplacian":
        lam = dense_precision(shape, 1.0, 0.002)
    else:  # bending: λ_v I + λ_b L² (its defaults)
        lap = dense_precision(shape, 1.0, 0.0)
        lam = prior.lambda_v * torch.eye(lap.shape[0], dtype=torch.float64) + prior.lambda_b * lap @ lap
    n = lam.shape[0]
    dense = (-0.5 * torch.einsum("lci,ij,lcj->l", mu, lam, mu)
             + 3 * (0.5 * torch.logdet(lam) - 0.5 * n * math.log(2 * math.pi)))
    assert torch.allclose(guide.point_log_prior(prior).double()[0], dense, rtol=1e-5)


def test_map_loss_is_refused_where_it_would_differ():
    from groupmorph_pyro.model import has_map_loss, map_loss

    class Extra(GroupMorphModel):
        def forward(self, images, fixed=None):
            return super().forward(images, fixed)

    shape = (5, 6, 4)
    model = GroupMorphModel(2)
    guide = _point_guide(model, shape, 1)
    svi = CaseGuide(guide.distribution().mean.detach(), torch.full((1, 1, 3, *shape), 0.1), model.prior_distribution(shape))

    class Custom(torch.distributions.Independent):  # a prior without a DCT spectrum
        def __init__(self, spatial_shape, device=None):
            base = torch.distributions.Normal(torch.zeros(3, *spatial_shape), torch.ones(3, *spatial_shape))
            super().__init__(base, 4)

    assert has_map_loss(model, guide) and not has_map_loss(model, svi)
    assert not has_map_loss(Extra(2), guide) and not has_map_loss(GroupMorphModel(2, prior=Custom), guide)
    with pytest.raises(InputError, match="point=True"):
        map_loss(model, svi, torch.rand(1, 2, *shape))
    with pytest.raises(InputError, match="does not fit"):
        map_loss(model, guide, torch.rand(1, 2, 6, 6, 4))


def test_fit_case_takes_its_map_steps_with_map_loss(monkeypatch):
    import groupmorph_pyro.registration as registration
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return registration.map_loss.__wrapped__(*args, **kwargs)

    counted.__wrapped__ = registration.map_loss
    monkeypatch.setattr(registration, "map_loss", counted)
    shape = (6, 6, 6)
    model = GroupMorphModel(2)
    x = torch.rand(1, 2, *shape, generator=torch.Generator().manual_seed(0))
    loc = torch.zeros(1, 1, 3, *shape)
    fit_case(model, x, 0, loc, torch.full_like(loc, 0.05), RegisterConfig(), steps=3, fit="map")
    assert len(calls) == 3
    fit_case(model, x, 0, loc, torch.full_like(loc, 0.05), RegisterConfig(), steps=3)  # SVI on mean and σ: Pyro's
    assert len(calls) == 3
