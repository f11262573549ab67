import warnings

import pyro
import pyro.poutine as poutine
from pyro.poutine.util import site_is_subsample
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from groupmorph_pyro.checks import InputError
from groupmorph_pyro.group import assemble_fields, latent_indices
from groupmorph_pyro.model import CaseGuide, GroupMorphGuide, GroupMorphModel

SHAPE = (8, 12, 8)
SMALL = dict(encoder=(4, 8), decoder=(8, 8, 4))


def _step(model, guide, images, fixed, elbo):
    optim = torch.optim.Adam(guide.parameters(), lr=1e-3)
    loss = elbo.differentiable_loss(model, guide, images, fixed)
    loss.backward()
    optim.step()
    return loss


@pytest.mark.parametrize("mode, fixed", [("all-to-one", 0), ("all-to-one", 2), ("all-moving", None)])
@pytest.mark.parametrize("diffeomorphic", [True, False])
@pytest.mark.parametrize("elbo", [Trace_ELBO(), TraceMeanField_ELBO()], ids=["trace", "meanfield"])
def test_svi_step_runs_without_warnings(mode, fixed, diffeomorphic, elbo):
    model = GroupMorphModel(3, mode, diffeomorphic)
    guide = GroupMorphGuide(3, mode, **SMALL)
    images = torch.rand(2, 3, *SHAPE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = _step(model, guide, images, fixed, elbo)
    assert torch.isfinite(loss)
    grads = [p.grad for p in guide.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_model_and_guide_share_site_names_and_shapes():
    model, guide = GroupMorphModel(4), GroupMorphGuide(4, **SMALL)
    images = torch.rand(1, 4, *SHAPE)
    gtr = poutine.trace(guide).get_trace(images, 1)
    mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(images, 1)
    latent = lambda tr: {n for n, s in tr.nodes.items() if s["type"] == "sample" and not s["is_observed"]
                         and not site_is_subsample(s)}
    g_sites, m_latent = latent(gtr), latent(mtr)
    assert g_sites == m_latent == {"z"}
    assert gtr.nodes["z"]["value"].shape == (1, 3, 3, *SHAPE)
    assert "likelihood" in mtr.nodes


def test_fixed_timepoint_has_identity_map_for_any_p():
    model, guide = GroupMorphModel(4), GroupMorphGuide(4, **SMALL)
    images = torch.rand(1, 4, *SHAPE)
    for p in range(4):
        z = guide(images, p)
        disp = poutine.condition(model, data={"z": z})(images, p)
        assert disp.shape == (1, 4, 3, *SHAPE)
        assert torch.equal(disp[:, p], torch.zeros_like(disp[:, p]))
        others = [k for k in range(4) if k != p]
        assert (disp[:, others].abs().amax(dim=(2, 3, 4, 5)) > 0).all()


@pytest.mark.parametrize("diffeomorphic, downsize", [(True, 1), (True, 2), (False, 1)])
def test_all_to_one_transform_computes_only_the_moving_maps_and_equals_the_whole_group_path(diffeomorphic, downsize):
    """GroupTransform integrates and warps only the K − 1 moving timepoints in all-to-one mode: the
    maps, inverse maps and warped group equal the pure functions run on all K assembled fields
    (zero at the fixed p), the fixed image passes through unchanged and its maps are exactly 0."""
    from groupmorph_pyro.group import GroupTransform, displacements, inverse_displacements, warp_group
    k, p = 4, 2
    grid = torch.stack(torch.meshgrid(*[torch.linspace(0, 1, n) for n in SHAPE], indexing="ij"))
    z = torch.stack([torch.stack([(c + 1) * (0.3 * i + 0.2) * torch.sin(3.0 * grid[c] + grid[(c + 1) % 3] + i)
                                  for c in range(3)]) for i in range(k - 1)])[None]  # (1, 3, 3, *SHAPE), varies in space
    images = torch.rand(1, k, *SHAPE)
    t = GroupTransform(k, "all-to-one", p, diffeomorphic, integration_downsize=downsize)
    v = assemble_fields(z, k, "all-to-one", p)
    want = displacements(v, diffeomorphic, 7, downsize=downsize)
    disp, warped = t(z, images)
    assert torch.allclose(disp, want, atol=1e-6) and torch.equal(disp[:, p], torch.zeros_like(disp[:, p]))
    assert torch.allclose(warped, warp_group(images, want), atol=1e-6) and torch.equal(warped[:, p], images[:, p])
    assert torch.allclose(t.displacements(z), want, atol=1e-6)
    inverse = t.inverse_displacements(z)
    assert torch.allclose(inverse, inverse_displacements(v, diffeomorphic, 7, downsize=downsize), atol=1e-6)
    assert torch.equal(inverse[:, p], torch.zeros_like(inverse[:, p]))
    assert (disp[:, [0, 1, 3]].abs().amax(dim=(2, 3, 4, 5)) > 0.3).all()


@pytest.mark.parametrize("mode, fixed", [("all-to-one", 2), ("all-moving", None)])
def test_jittered_transform_reads_every_image_and_field_at_the_shifted_lattice(mode, fixed):
    """With ``jitter`` the likelihood sees x_k(p + δ + u_k(p + δ)) for one δ ~ U(−½, ½)³ per call, the
    fixed image included (x_p(p + δ)); the reference reads the fields and images at p + δ with
    grid_sample (spatial.sample), not the separable shift the transform uses. The maps returned
    are the unshifted ones, and two calls draw two offsets."""
    from groupmorph_pyro.group import GroupTransform, displacements
    from groupmorph_pyro.spatial import identity_grid, sample
    k = 4
    grid = torch.stack(torch.meshgrid(*[torch.linspace(0, 1, n) for n in SHAPE], indexing="ij"))
    t = GroupTransform(k, mode, fixed, integration_downsize=2, jitter=True)
    z = torch.stack([torch.stack([(c + 1) * (0.3 * i + 0.2) * torch.sin(3.0 * grid[c] + grid[(c + 1) % 3] + i)
                                  for c in range(3)]) for i in range(t.num_latent)])[None]
    images = torch.rand(1, k, *SHAPE)
    disp = displacements(t.fields(z), True, 7, downsize=2)
    torch.manual_seed(3)
    delta = (torch.rand(3) - 0.5).view(1, 3, 1, 1, 1)
    torch.manual_seed(3)
    got_disp, warped = t(z, images)
    assert torch.allclose(got_disp, disp, atol=1e-6)
    at = identity_grid(SHAPE)[None] + delta  # (1, 3, *SHAPE): p + δ
    for i in range(k):
        u = sample(disp[:, i], at)  # u_i(p + δ)
        want = sample(images[:, i:i + 1], at + u)[:, 0]
        assert torch.allclose(warped[:, i], want, atol=1e-5), i
    assert delta.abs().max() > 0.1 and not torch.allclose(warped, t(z, images)[1])
    plain = GroupTransform(k, mode, fixed, integration_downsize=2)(z, images)[1]
    assert (warped - plain).abs().max() > 0.05
    with pytest.raises(InputError, match="jitter: expected True or False, got 1"):
        GroupTransform(k, mode, fixed, jitter=1)
    with pytest.raises(InputError, match="jitter: expected True or False, got 'yes'"):
        GroupMorphModel(k, mode, jitter="yes")


def test_jitter_removes_the_lattice_bias_of_nmi_towards_blurring_maps():
    """Two noisy copies of one smooth texture, aligned (the true map is the identity). Read on the
    lattice, NMI scores a wrong quarter-voxel shift of the moving image above the truth, because
    interpolating only the moving image averages its noise (measured 0.286 against 0.254). With the
    jittered lattice (both images interpolated alike, averaged over 32 offsets) the truth scores highest
    (0.399 against 0.373 and 0.319)."""
    import numpy as np
    from scipy.ndimage import gaussian_filter

    from groupmorph_pyro.group import GroupTransform
    from groupmorph_pyro.likelihoods import group_nmi
    rng = np.random.default_rng(0)
    ref = gaussian_filter(rng.standard_normal((24, 24, 24)), 2.0)
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    x = np.stack([ref + 0.05 * rng.standard_normal(ref.shape), ref + 0.05 * rng.standard_normal(ref.shape)])
    x = torch.tensor(x, dtype=torch.float32)[None].clamp(0, 1)

    def score(jitter, shift, draws):
        t = GroupTransform(2, "all-to-one", 0, diffeomorphic=False, jitter=jitter)
        z = torch.zeros(1, 1, 3, 24, 24, 24)
        z[:, :, :2] = shift
        torch.manual_seed(0)
        return float(np.mean([float(group_nmi(t(z, x)[1], 32, histogram="bspline")) for _ in range(draws)]))

    assert score(False, 0.25, 1) > score(False, 0.0, 1) + 0.02
    jittered = [score(True, s, 32) for s in (0.0, 0.25, 0.5)]
    assert jittered[0] > max(jittered[1:]) + 0.02, jittered


def test_guide_rotation_tells_the_network_which_image_is_fixed():
    guide = GroupMorphGuide(3, **SMALL)
    torch.nn.init.normal_(guide.mean_head.weight, std=0.1)
    images = torch.rand(1, 3, *SHAPE)
    loc0, _ = guide.distribution_params(images, 0)  # timepoints 1, 2
    loc1, _ = guide.distribution_params(images, 1)  # timepoints 0, 2
    assert loc0.shape == loc1.shape == (1, 2, 3, *SHAPE)
    assert not torch.allclose(loc0[:, 1], loc1[:, 1])  # timepoint 2's field depends on which one is fixed


def test_all_moving_fields_have_zero_mean():
    z = torch.randn(2, 4, 3, *SHAPE)
    v = assemble_fields(z, 4, "all-moving", None)
    assert torch.allclose(v.mean(1), torch.zeros_like(v[:, 0]), atol=1e-6)


def test_guide_mean_bounded_by_alpha_and_positive_scale():
    guide = GroupMorphGuide(2, alpha=15.0, **SMALL)
    torch.nn.init.normal_(guide.mean_head.weight, std=100.0)
    loc, scale = guide.distribution_params(torch.rand(1, 2, *SHAPE), 0)
    assert loc.abs().max() <= 15.0 and loc.abs().max() > 10.0
    assert (scale > 0).all()


def test_guide_pads_odd_grids():
    guide = GroupMorphGuide(2, **SMALL)
    loc, scale = guide.distribution_params(torch.rand(1, 2, 7, 9, 5), 0)
    assert loc.shape == scale.shape == (1, 1, 3, 7, 9, 5)


def test_pairwise_is_k2_all_to_one():
    assert latent_indices(2, "all-to-one", 1) == [0]
    model, guide = GroupMorphModel(2), GroupMorphGuide(2, **SMALL)
    assert torch.isfinite(Trace_ELBO().differentiable_loss(model, guide, torch.rand(1, 2, *SHAPE), 1))


def test_guides_never_share_parameters_through_the_param_store():
    a, b = GroupMorphGuide(2, **SMALL), GroupMorphGuide(2, **SMALL)
    images = torch.rand(1, 2, *SHAPE)
    with torch.no_grad():
        a.mean_head.bias.fill_(1.0)
        b.mean_head.bias.fill_(-1.0)
    la, lb = a.distribution_params(images, 0)[0], b.distribution_params(images, 0)[0]
    Trace_ELBO().differentiable_loss(GroupMorphModel(2), a, images, 0)
    assert len(pyro.get_param_store()) == 0
    assert not torch.allclose(la, lb)


def test_case_guide_starts_at_given_posterior():
    loc = torch.randn(1, 2, 3, *SHAPE)
    scale = torch.full_like(loc, 0.3)
    guide = CaseGuide(loc, scale)
    got_loc, got_scale = guide.distribution_params()
    assert torch.allclose(got_loc, loc, atol=1e-4) and torch.allclose(got_scale, scale)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: GroupMorphModel(1), r"K: expected at least 2"),
        (lambda: GroupMorphModel(3, mode="some-to-all"), r"mode: expected one of"),
        (lambda: GroupMorphModel(3)(torch.rand(1, 2, *SHAPE)), r"expected K=3 timepoints on dim 1, got \(1, 2, 8, 12, 8\)"),
        (lambda: GroupMorphModel(3)(torch.rand(1, 3, *SHAPE), 3), r"fixed: expected a timepoint index in \[0, 2\], got 3"),
        (lambda: GroupMorphModel(3, "all-moving")(torch.rand(1, 3, *SHAPE), 1), r"all-moving mode has no fixed"),
        (lambda: GroupMorphGuide(2, **SMALL).distribution_params(torch.rand(2, *SHAPE)), r"\(B, K, D, H, W\)"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(InputError, match=match):
        call()


def _np_warp(image, disp):
    """Reference warp in float64: ``image(p + disp(p))``, trilinear, edge values outside (scipy)."""
    import numpy as np
    from scipy.ndimage import map_coordinates

    return map_coordinates(image, np.indices(image.shape) + disp, order=1, mode="nearest")


@pytest.mark.parametrize("mode, fixed", [("all-to-one", 1), ("all-moving", None)])
def test_a_cascade_refines_the_mean_on_the_group_warped_by_its_first_stage(mode, fixed):
    """model.cascade 2: μ = α tanh(m₁ + m₂), m₂ from the second U-Net on the group warped by
    ``Id + α tanh(m₁)`` (the fixed image not moved). The reference warps in float64 with scipy, rolls
    and selects the latent timepoints by hand, and calls the stages' own modules."""
    import numpy as np

    torch.manual_seed(0)
    k, alpha = 3, 3.0
    guide = GroupMorphGuide(k, mode, alpha=alpha, cascade=2, **SMALL)
    with torch.no_grad():
        for head in (guide.mean_head, guide.refine[0][1]):
            torch.nn.init.normal_(head.weight, std=0.2)
    images = torch.rand(1, k, *SHAPE)
    loc, scale = guide.distribution_params(images, fixed)
    shift = fixed or 0
    x = torch.roll(images, -shift, dims=1)
    with torch.no_grad():
        m1 = guide.mean_head(guide.unet(x)).double().numpy().reshape(k, 3, *SHAPE)
        d1 = alpha * np.tanh(m1)
        if mode == "all-to-one":
            d1[0] = 0.0  # the fixed image (first after the roll) stays put
        moved = np.stack([_np_warp(x[0, t].double().numpy(), d1[t]) for t in range(k)])
        m2 = guide.refine[0](torch.from_numpy(moved[None]).float()).double().numpy().reshape(k, 3, *SHAPE)
    idx = latent_indices(k, mode, fixed)
    ref = np.roll(alpha * np.tanh(m1 + m2), shift, axis=0)[idx]
    first_only = np.roll(alpha * np.tanh(m1), shift, axis=0)[idx]
    assert np.abs(d1).max() > 0.5 and np.abs(ref - first_only).max() > 0.05  # both stages matter here
    np.testing.assert_allclose(loc[0].detach().double().numpy(), ref, atol=1e-4)
    assert loc.shape == scale.shape == (1, len(idx), 3, *SHAPE)


def test_a_cascade_starts_at_the_identity_and_one_stage_keeps_the_papers_state_dict():
    images = torch.rand(1, 3, *SHAPE)
    loc, _ = GroupMorphGuide(3, cascade=3, **SMALL).distribution_params(images, 0)
    assert loc.abs().max() < 1e-2  # every head starts near zero, so the cascade starts at φ = Id
    one = GroupMorphGuide(3, **SMALL).state_dict()
    assert not any(key.startswith("refine.") for key in one)
    assert set(GroupMorphGuide(3, cascade=2, **SMALL).state_dict()) - set(one) == {
        key for key in GroupMorphGuide(3, cascade=2, **SMALL).state_dict() if key.startswith("refine.0.")}
    with pytest.raises(InputError, match=r"cascade: expected an integer >= 1, got 0"):
        GroupMorphGuide(3, cascade=0, **SMALL)
