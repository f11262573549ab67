"""Per-case registration of large grids: latents on a control grid, the likelihood read at random points.

Each kernel is pinned to an independent reference: the prior's weights to closed forms and to the
image grid's energy of the same smooth field, ``read_group`` to the dense warp of the upsampled maps
at lattice points, the sampled likelihood to the dense one over every voxel, ``map_loss`` of a
control-grid model to Pyro's Trace_ELBO. The end-to-end test registers a phantom forced onto a control
grid and must recover most of the known motion."""
import math

import numpy as np
import pytest
import torch
from pyro.infer import Trace_ELBO

from groupmorph_pyro.checks import InputError
from groupmorph_pyro.config import Config
from groupmorph_pyro.group import GroupTransform
from groupmorph_pyro.likelihoods import GroupNMI, GroupSimilarity, sampled_log_likelihood
from groupmorph_pyro.model import CaseGuide, GroupMorphModel, build_model, map_loss
from groupmorph_pyro.preprocess import normalize_group
from groupmorph_pyro.priors import control_grid_options, make_prior
from groupmorph_pyro.registration import fit_model, prepare, register
from groupmorph_pyro.spatial import control_factor, level_shape, random_points, resize_displacement
from groupmorph_pyro.synthetic import breathing_phantom

from conftest import smooth_field, smooth_image


def test_control_grid_options_closed_form():
    # weight_c = weight · f**(exponent + 3): bending λ_b f, λ_v f⁵; Laplacian λ_u f³, λ_v f⁵
    assert control_grid_options("bending", {"lambda_b": 2.0, "lambda_v": 0.01}, 3) == pytest.approx(
        {"lambda_b": 6.0, "lambda_v": 2.43})
    assert control_grid_options("laplacian", {"lambda_u": 1.5, "lambda_v": 0.02}, 2) == pytest.approx(
        {"lambda_u": 12.0, "lambda_v": 0.64})
    assert control_grid_options("diagonal", {"lambda_v": 0.5}, 1) == {"lambda_v": 0.5}
    assert control_grid_options("bending", {}, 2) == pytest.approx({"lambda_b": 12.0, "lambda_v": 0.032})  # defaults


@pytest.mark.parametrize("name, options", [("bending", {"lambda_b": 0.96, "lambda_v": 0.006}),
                                           ("laplacian", {"lambda_u": 1.0, "lambda_v": 0.01})])
def test_control_grid_prior_has_the_image_grids_energy_for_a_smooth_field(name, options):
    """The control prior's quadratic form of the field on the control grid (control voxels) equals the
    image grid prior's of the same field (image voxels) within a few percent (a smooth field that varies
    in every direction; the remainder is the discretisation of the two grids)."""
    full, f = (61, 73, 65), 2
    grid = torch.meshgrid(*[torch.linspace(0, 1, n, dtype=torch.float64) for n in full], indexing="ij")
    u = torch.stack([3 * torch.sin(2 * math.pi * grid[0]) * torch.cos(math.pi * grid[1]),
                     2 * torch.cos(2 * math.pi * grid[2]) + grid[0],
                     2 * torch.sin(math.pi * grid[0] * grid[1])])[None]
    coarse = level_shape(full, f)
    fine_energy = float(make_prior(name, **options)(full).quadratic_form(u))
    coarse_energy = float(make_prior(name, **control_grid_options(name, options, f))(coarse)
                          .quadratic_form(resize_displacement(u, coarse)))
    assert coarse_energy == pytest.approx(fine_energy, rel=0.05)
    # without the f³ volume factor it would be 8 times smaller
    assert coarse_energy > 4 * fine_energy / f ** 3


@pytest.mark.parametrize("shape, budget, factor", [((48, 48, 48), 2 ** 19, 1), ((99, 123, 105), 2 ** 19, 2),
                                                   ((149, 185, 157), 2 ** 19, 3), ((512, 512, 136), 2 ** 19, 5),
                                                   ((512, 512, 136), 0, 1), ((40, 40, 40), 21 ** 3, 2)])
def test_control_factor(shape, budget, factor):
    assert control_factor(shape, budget) == factor
    if factor > 1:  # the smallest factor within the budget
        assert math.prod(level_shape(shape, factor)) <= budget < math.prod(level_shape(shape, factor - 1))


def test_random_points_are_stratified_inside_the_grid():
    shape = (20, 31, 12)
    torch.manual_seed(3)
    points = random_points(shape, 1000)
    assert points.shape[1] == 3 and abs(len(points) - 1000) <= 60
    extent = torch.tensor([n - 1.0 for n in shape])
    assert (points >= 0).all() and (points <= extent).all()
    # one point per cell: the cells' indices are all different and cover the partition
    cells = [int(round((n - 1) * (1000 / float(extent.prod())) ** (1 / 3))) for n in shape]
    index = (points / (extent / torch.tensor(cells))).floor().long().clamp_max(torch.tensor(cells) - 1)
    flat = (index[:, 0] * cells[1] + index[:, 1]) * cells[2] + index[:, 2]
    assert len(points) == math.prod(cells) and len(flat.unique()) == len(points)
    torch.manual_seed(3)
    assert torch.equal(random_points(shape, 1000), points)  # torch's generator fixes them


@pytest.mark.parametrize("mode, fixed", [("all-to-one", 1), ("all-moving", None)])
def test_read_group_equals_the_dense_warp_of_the_upsampled_maps_at_lattice_points(mode, fixed):
    full, k = (17, 21, 19), 3
    coarse = level_shape(full, 2)
    transform = GroupTransform(k, mode, fixed, integration_steps=4)
    n_lat = transform.num_latent
    z = smooth_field(coarse, amplitude=1.5, seed=1, batch=n_lat).double().reshape(1, n_lat, 3, *coarse)
    images = torch.cat([smooth_image(full, seed=s) for s in range(k)], dim=1).double()  # (1, K, D, H, W)
    disp = transform.displacements(z)  # control grid
    dense = transform.warp(images, transform.resized(disp, full))  # (1, K, D, H, W)
    gen = torch.Generator().manual_seed(0)
    lattice = torch.stack([torch.randint(n, (200,), generator=gen) for n in full], dim=1)
    values = transform.read_group(disp, images, lattice.double())
    assert values.shape == (1, k, 200)
    expected = dense[0][:, lattice[:, 0], lattice[:, 1], lattice[:, 2]]
    assert torch.allclose(values[0], expected, atol=1e-10)
    assert (values[0] - images[0][:, lattice[:, 0], lattice[:, 1], lattice[:, 2]]).abs().max() > 1e-3  # maps moved them
    assert torch.equal(transform.displacements(z, full), transform.resized(disp, full))


def test_read_group_rejects_mismatched_inputs():
    transform = GroupTransform(3)
    disp, images = torch.zeros(1, 3, 3, 5, 5, 5), torch.zeros(1, 3, 9, 9, 9)
    with pytest.raises(InputError, match=r"points: expected shape \(S, 3\)"):
        transform.read_group(disp, images, torch.zeros(4))
    with pytest.raises(InputError, match="read_group: expected maps"):
        transform.read_group(disp, torch.zeros(1, 4, 9, 9, 9), torch.zeros(4, 3))
    with pytest.raises(InputError, match="read_group: expected maps"):
        transform.read_group(disp, images, torch.zeros(4, 2))


def test_sampled_log_likelihood_over_every_voxel_is_the_dense_likelihood():
    warped = torch.cat([smooth_image((9, 10, 11), seed=s) for s in range(3)], dim=1).double()
    for likelihood in (GroupNMI(2.0, 16, histogram="quadratic"), GroupSimilarity("ssd", "template", 1.5)):
        n = warped.shape[2:].numel()
        values = warped.reshape(1, 3, n)[..., torch.randperm(n)]  # the order of the points does not matter
        assert sampled_log_likelihood(likelihood, values, n).item() == pytest.approx(likelihood(warped).item(), rel=1e-9)
        # a subset estimates the whole grid's likelihood: scaled by the grid's voxels, not the sample's
        assert sampled_log_likelihood(likelihood, values[..., :500], 4 * n).item() == pytest.approx(
            4 * n * likelihood.beta * likelihood.similarity(values[..., :500].reshape(1, 3, 1, 1, 500)).item())


def test_sampled_log_likelihood_rejects_bad_input():
    with pytest.raises(InputError, match=r"sampled likelihood: expected a GroupSimilarity with a similarity in"):
        sampled_log_likelihood(GroupSimilarity("lncc"), torch.rand(1, 3, 10), 10)
    with pytest.raises(InputError, match=r"expected values \(B, K >= 2, S\), got \(1, 1, 10\)"):
        sampled_log_likelihood(GroupNMI(), torch.rand(1, 1, 10), 10)
    with pytest.raises(InputError, match="voxels: expected an integer >= 1, got 0"):
        sampled_log_likelihood(GroupNMI(), torch.rand(1, 3, 10), 0)


@pytest.fixture(scope="module")
def phantom():
    return breathing_phantom((32, 32, 24), 3, seed=2, num_landmarks=20)


def _control_model(factor=2, points=3000):
    cfg = Config()
    cfg.model.num_timepoints = 3
    return cfg, build_model(cfg.model, spacing=(2.0, 2.0, 2.5), control_factor=factor, points=points)


def test_control_model_map_loss_is_trace_elbos_loss(phantom):
    """map_loss of a point guide on the control grid equals Trace_ELBO's loss for the same random points."""
    _, model = _control_model()
    x = normalize_group(phantom.images, (1, 99)).double()
    shape = model.latent_shape(x.shape[2:])
    assert shape == level_shape((32, 32, 24), 2)
    loc = smooth_field(shape, amplitude=1.0, seed=4, batch=2).double().reshape(1, 2, 3, *shape)
    prior = model.prior_distribution(shape)
    guide = CaseGuide(loc, torch.full_like(loc, 0.1), prior, point=True)
    torch.manual_seed(7)
    ours = map_loss(model, guide, x, 0, prior).item()
    torch.manual_seed(7)
    pyros = Trace_ELBO().loss(model, guide, x, 0)
    assert ours == pytest.approx(pyros, rel=1e-9)
    torch.manual_seed(8)  # other points, another estimate of the same objective
    assert map_loss(model, guide, x, 0, prior).item() != pytest.approx(ours, rel=1e-9)


def test_control_model_forward_records_maps_on_the_image_grid(phantom):
    _, model = _control_model()
    x = normalize_group(phantom.images, (1, 99))
    assert model(x, 0).shape == (1, 3, 3, *model.latent_shape(x.shape[2:]))  # maps on the latent grid
    model.record_deterministic = True
    try:
        import pyro.poutine as poutine

        trace = poutine.trace(model).get_trace(x, 0)
    finally:
        model.record_deterministic = False
    assert trace.nodes["displacement"]["value"].shape == (1, 3, 3, 32, 32, 24)
    assert trace.nodes["jacobian"]["value"].shape == (1, 3, 32, 32, 24)


def test_control_model_rejects_what_it_cannot_do(phantom):
    with pytest.raises(InputError, match="control_factor 2: .* expected points >= 1, got 0"):
        GroupMorphModel(3, control_factor=2)
    with pytest.raises(InputError, match="points: a likelihood read at sample points needs a similarity in"):
        GroupMorphModel(3, likelihood=GroupSimilarity("lncc"), points=100)
    cfg, _ = _control_model()
    with pytest.raises(InputError, match="control_factor: a control grid moves the config's prior weights"):
        build_model(cfg.model, prior=make_prior("bending"), control_factor=2, points=10)
    _, model = _control_model()
    x = normalize_group(phantom.images, (1, 99))
    z = torch.zeros(1, 2, 3, 32, 32, 24)  # on the image grid, not the control grid
    with pytest.raises(InputError, match=r"latents \(1, 2, 3, 32, 32, 24\) are not on the latent grid"):
        model._log_likelihood(model.transform(0), z, x)


def test_fit_model_uses_a_control_grid_only_where_it_applies(phantom):
    cfg = Config()
    cfg.model.num_timepoints = 3
    cfg.register.fit_voxels = 4000
    spacing = (2.0, 2.0, 2.5)
    model = build_model(cfg.model, spacing=spacing)
    fitted = fit_model(model, cfg, (32, 32, 24), spacing)
    assert (fitted.control_factor, fitted.points) == (control_factor((32, 32, 24), 4000), cfg.register.sample_points)
    assert fitted.likelihood is model.likelihood
    assert fit_model(model, cfg, (32, 32, 24), spacing, from_zero=False) is model  # fine-tuning a network's posterior
    assert fit_model(model, cfg, (12, 12, 12), spacing) is model  # within the budget
    lncc = build_model(cfg.model, likelihood=GroupSimilarity("lncc"), spacing=spacing)
    assert fit_model(lncc, cfg, (32, 32, 24), spacing) is lncc  # needs whole images
    cfg.register.fit_voxels = 0
    assert fit_model(model, cfg, (32, 32, 24), spacing) is model  # no budget


def test_the_squarings_on_a_control_grid_stay_within_integration_voxels():
    """fit_model's twin integrates on the control grid made d times coarser: d = round(downsize / f)
    while that grid is within register.integration_voxels, the smallest d within it otherwise."""
    cfg = Config()
    cfg.model.num_timepoints = 3
    cfg.register.fit_voxels = 524288
    spacing = (2.0, 2.0, 2.5)
    model = build_model(cfg.model, spacing=spacing)
    shape = (512, 512, 136)  # control factor 5: a 103 x 103 x 28 grid of 297,052 voxels

    def squarings_grid(fitted):
        latent = fitted.latent_shape(shape)
        return level_shape(latent, fitted.transform().integration_downsize)

    fitted = fit_model(model, cfg, shape, spacing)
    assert fitted.latent_shape(shape) == (103, 103, 28)
    assert squarings_grid(fitted) == (52, 52, 15)  # d = 2: 40,560 voxels; d = 1 would be 297,052
    cfg.register.integration_voxels = 20000
    assert squarings_grid(fit_model(model, cfg, shape, spacing)) == (35, 35, 10)  # d = 3: 12,250
    cfg.register.integration_voxels = 0  # no limit: round(3 / 5) = 1, the control grid itself
    assert squarings_grid(fit_model(model, cfg, shape, spacing)) == (103, 103, 28)
    cfg.register.integration_voxels = 65536
    cfg.model.integration_downsize = 12  # coarser than the limit asks: round(12 / 5) = 2 is kept
    assert squarings_grid(fit_model(model, cfg, shape, spacing)) == (52, 52, 15)
    cfg.model.integration_downsize = 20
    assert squarings_grid(fit_model(model, cfg, shape, spacing)) == (27, 27, 8)  # d = round(20 / 5) = 4


def test_register_on_a_control_grid_recovers_the_motion(phantom):
    """End to end: a phantom forced onto a control grid 2x coarser (fit_voxels) is registered at full
    resolution; most of the known motion is recovered, without folding, and the outputs are on the image grid."""
    cfg = Config()
    cfg.model.num_timepoints = 3
    cfg.register.fit_voxels = 4000
    cfg.register.sample_points = 8000
    affine = np.diag([2.0, 2.0, 2.5, 1.0])
    res = register(phantom.images, cfg, landmarks=phantom.landmarks, affine=affine, samples=2)
    grid = level_shape((32, 32, 24), 2)
    assert res.summary["latent_grid"] == list(grid) and res.summary["control_factor"] == 2
    assert res.summary["sample_points"] == 8000
    assert res.loc.shape == (2, 3, *grid)
    assert res.displacement.shape == (3, 3, 32, 32, 24) and res.warped.shape == (3, 32, 32, 24)
    assert res.uncertainty["displacement_std_mm"].shape == (3, 32, 32, 24)
    lm = res.summary["landmarks"]
    assert lm["registered"]["mean_mm"] < 0.4 * lm["identity"]["mean_mm"]
    assert res.summary["folding_percent_all"] == 0.0
    assert res.summary["nmi_after"] > res.summary["nmi_before"]
    # the control grid's own level ran first on the images resampled there (the 4x coarser one is too small)
    assert [level["factor"] for level in res.summary["finetune"]["levels"]] == [2]
    # the landmarks' posterior is of the image grid's landmarks: its mean lies near the landmarks
    # mapped by the mean's inverse maps, φ_k⁻¹(l_k) (the posterior sd here is about half a voxel)
    from groupmorph_pyro.spatial import map_points

    mapped = map_points(torch.as_tensor(phantom.landmarks, dtype=torch.float64),
                        torch.as_tensor(res.inverse_displacement)).numpy() * np.array([2.0, 2.0, 2.5])
    gap = np.linalg.norm(res.landmark_posterior["mean_mm"] - mapped, axis=-1)
    assert gap.mean() < 1.0, gap.mean()


def test_prepare_builds_the_control_model_for_large_grids_only(phantom):
    cfg = Config()
    cfg.model.num_timepoints = 3
    small = prepare(phantom.images, cfg)
    assert small.fit_model is small.model
    cfg.register.fit_voxels = 3000
    large = prepare(phantom.images, cfg)
    assert large.fit_model.control_factor > 1 and large.model.control_factor == 1


@pytest.mark.parametrize("settings, message", [
    ({"fit_voxels": 10}, r"register.fit_voxels: expected 0 \(the image grid\) or at least 64"),
    ({"fit_voxels": -1}, r"register.fit_voxels: expected an integer >= 0, got -1"),
    ({"sample_points": 0}, r"register.sample_points: expected an integer >= 1, got 0"),
])
def test_config_rejects_bad_control_settings(settings, message):
    with pytest.raises(InputError, match=message):
        Config.from_dict({"register": settings})


def test_random_points_and_control_factor_reject_bad_input():
    with pytest.raises(InputError, match="random_points: expected a 3D shape of positive sizes"):
        random_points((4, 4), 10)
    with pytest.raises(InputError, match="count: expected an integer >= 1, got 0"):
        random_points((4, 4, 4), 0)
    with pytest.raises(InputError, match="control_factor: expected a 3D shape of positive sizes"):
        control_factor((0, 4, 4), 10)
    with pytest.raises(InputError, match="max_voxels: expected an integer >= 0, got -3"):
        control_factor((4, 4, 4), -3)
    with pytest.raises(InputError, match="factor: expected an integer >= 1, got 0"):
        control_grid_options("bending", {}, 0)
