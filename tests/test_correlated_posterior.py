"""The correlated posterior family (``register.covariance: dct``): CorrelatedNormal against a dense
float64 covariance built from SciPy's DCT, its start from a diagonal fit against the dense
``(Λ + h I)⁻¹``, and the per-case σ phase that chooses between the two families by the ELBO."""
import math

import numpy as np
import pytest
import scipy.fft
import scipy.stats
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from groupmorph_pyro.checks import InputError
from groupmorph_pyro.config import Config
from groupmorph_pyro.model import CaseGuide, GroupMorphModel
from groupmorph_pyro.priors import BendingNormal, CorrelatedNormal, LaplacianNormal
from groupmorph_pyro.registration import correlated_family, correlated_start, register
from groupmorph_pyro.synthetic import breathing_phantom
from test_research_api import dense_laplacian

SHAPE = (3, 4, 5)


def dense_dct(shape):
    """The orthonormal 3D DCT-II of a C-ordered (D, H, W) array as one (N, N) matrix, from SciPy."""
    mats = [scipy.fft.dct(np.eye(n), norm="ortho", axis=0) for n in shape]
    return np.kron(np.kron(mats[0], mats[1]), mats[2])


def dense_covariance(scale, spectrum):
    """``A Cᵀ diag(s²) C A`` for one component: scale and spectrum (D, H, W) arrays."""
    c = dense_dct(scale.shape)
    a = np.diag(scale.reshape(-1))
    return a @ c.T @ np.diag(spectrum.reshape(-1) ** 2) @ c @ a


def _fields(seed=0):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(2, 3, *SHAPE, generator=g, dtype=torch.float64)
    coords = torch.stack(torch.meshgrid(*[torch.linspace(0, 1, n, dtype=torch.float64) for n in SHAPE], indexing="ij"))
    scale = (0.3 + coords[0] + 0.5 * coords[1] * coords[2]).expand(2, 3, *SHAPE) * torch.tensor([1.0, 0.7, 1.4]).double()[:, None, None, None]
    spectrum = 1.0 / (0.2 + coords.sum(0) + 0.1 * torch.rand(3, *SHAPE, generator=g, dtype=torch.float64))
    return loc, scale.contiguous(), spectrum


def test_log_prob_variance_and_entropy_equal_a_dense_gaussian():
    loc, scale, spectrum = _fields()
    q = CorrelatedNormal(loc, scale, spectrum)
    assert q.batch_shape == (2,) and q.event_shape == (3, *SHAPE)
    z = loc + torch.randn(4, *loc.shape, dtype=torch.float64)
    expected_lp = np.zeros((4, 2))
    expected_ent, expected_var = 0.0, np.zeros((2, 3, *SHAPE))
    for b in range(2):
        for c in range(3):
            cov = dense_covariance(scale[b, c].numpy(), spectrum[c].numpy())
            mvn = scipy.stats.multivariate_normal(loc[b, c].reshape(-1).numpy(), cov)
            expected_lp[:, b] += mvn.logpdf(z[:, b, c].reshape(4, -1).numpy())
            expected_var[b, c] = np.diag(cov).reshape(SHAPE)
            if b == 0:
                expected_ent += mvn.entropy()
    np.testing.assert_allclose(q.log_prob(z).numpy(), expected_lp, rtol=1e-9)
    np.testing.assert_allclose(q.variance.numpy(), expected_var, rtol=1e-9)
    np.testing.assert_allclose(q.entropy().numpy(), [expected_ent] * 2, rtol=1e-9)


def test_samples_have_the_dense_covariance():
    loc, scale, spectrum = _fields(1)
    q = CorrelatedNormal(loc[0, :1], scale[0, :1], spectrum[:1])  # one component: event (1, D, H, W)
    torch.manual_seed(0)
    n = 40000
    z = q.rsample((n,)).reshape(n, -1).numpy()
    cov = dense_covariance(scale[0, 0].numpy(), spectrum[0].numpy())
    np.testing.assert_allclose(z.mean(0), loc[0, 0].reshape(-1).numpy(), atol=5 * math.sqrt(cov.diagonal().max() / n))
    err = np.abs(np.cov(z, rowvar=False) - cov).max()
    assert err < 0.05 * cov.diagonal().max(), err  # sampling error ~ 1/sqrt(n) of the variance


def test_a_flat_spectrum_is_the_diagonal_normal():
    loc, scale, _ = _fields(2)
    q = CorrelatedNormal(loc, scale, torch.ones(()).double())
    z = loc + scale * torch.randn_like(loc)
    diag = torch.distributions.Normal(loc, scale)
    assert torch.allclose(q.log_prob(z), diag.log_prob(z).sum((-4, -3, -2, -1)), rtol=1e-10)
    assert torch.allclose(q.variance, scale.pow(2), rtol=1e-10)


def dense_prior_precision(prior):
    """The prior's precision Λ on SHAPE as a dense float64 matrix, from the graph Laplacian L:
    λ_v I + λ_b L² (bending) or λ_v I + λ_u L (Laplacian)."""
    n = math.prod(SHAPE)
    lap = dense_laplacian(SHAPE).numpy()
    if isinstance(prior, BendingNormal):
        return prior.lambda_v * np.eye(n) + prior.lambda_b * lap @ lap
    return prior.lambda_v * np.eye(n) + prior.lambda_u * lap


@pytest.mark.parametrize("prior", [BendingNormal(SHAPE, 0.7, 0.05), LaplacianNormal(SHAPE, 1.0, 0.01)])
def test_start_from_a_diagonal_fit_is_the_dense_posterior_of_constant_curvature(prior):
    """σ_i² = 1 / (Λ_ii + h) is the diagonal optimum under precision Λ + h I: the start must recover h
    and give exactly the marginal variances of the dense (Λ + h I)⁻¹."""
    n = math.prod(SHAPE)
    prec = dense_prior_precision(prior)
    hs = np.array([[0.5, 3.0, 12.0], [0.0, 1.0, 7.5]])  # (K_lat, 3)
    sigma = torch.tensor(1.0 / np.sqrt(np.diag(prec)[None, None] + hs[..., None])).reshape(1, 2, 3, *SHAPE)
    modulation, spectrum, h = correlated_start(prior, sigma)
    np.testing.assert_allclose(h[0].numpy(), hs, rtol=1e-9, atol=1e-9)
    var = CorrelatedNormal(torch.zeros_like(sigma), modulation, spectrum).variance
    for k in range(2):
        for c in range(3):
            post = np.linalg.inv(prec + hs[k, c] * np.eye(n))
            np.testing.assert_allclose(var[0, k, c].reshape(-1).numpy(), np.diag(post), rtol=1e-8)


@pytest.mark.parametrize("prior", [BendingNormal(SHAPE, 0.7, 0.05), LaplacianNormal(SHAPE, 1.0, 0.01)])
def test_family_at_a_curvature_has_the_dense_marginal_variances(prior):
    """From the σ phase's reset σ_i = 1 / sqrt(Λ_ii), the family at curvature h has marginal variance
    ``(Λ_ii + h) / Λ_ii · [(Λ + h I)⁻¹]_ii`` (its modulation times the dense posterior's diagonal), per
    latent and component; at h = 0 the prior's own marginal variances."""
    n = math.prod(SHAPE)
    prec = dense_prior_precision(prior)
    diag = np.diag(prec)
    sigma = torch.tensor(diag ** -0.5).reshape(1, 1, 1, *SHAPE).expand(1, 2, 3, *SHAPE)  # the reset: a shared view
    hs = np.array([[0.0, 0.4, 3.0], [1.5, 9.0, 0.05]])
    modulation, spectrum = correlated_family(prior, sigma, torch.tensor(hs)[None])
    assert modulation.shape == spectrum.shape == sigma.shape
    var = CorrelatedNormal(torch.zeros(sigma.shape, dtype=torch.float64), modulation, spectrum).variance
    for k in range(2):
        for c in range(3):
            h = hs[k, c]
            expected = (diag + h) / diag * np.diag(np.linalg.inv(prec + h * np.eye(n)))
            np.testing.assert_allclose(var[0, k, c].reshape(-1).numpy(), expected, rtol=1e-8)
    same, same_spectrum = correlated_family(prior, sigma, 0.4)  # a float curvature: every latent and component
    assert torch.allclose(same[0, 1, 2], modulation[0, 0, 1]) and torch.allclose(same_spectrum[0, 1, 0], spectrum[0, 0, 1])
    with pytest.raises(InputError, match="curvature >= 0"):
        correlated_family(prior, sigma, -1.0)
    with pytest.raises(InputError, match="does not broadcast"):
        correlated_family(prior, sigma, torch.ones(2))
    with pytest.raises(InputError, match="expected sigma"):
        correlated_family(prior, sigma[..., :2], 1.0)


def test_case_guide_reports_the_marginal_sd_and_samples_the_correlated_family():
    loc, scale, spectrum = _fields(3)
    loc, scale = loc[:1, None].float(), scale[:1, None].float()  # (1, 1, 3, D, H, W)
    guide = CaseGuide(loc, scale, BendingNormal(SHAPE), spectrum.float())
    assert guide.correlated
    m, sd = guide.distribution_params()
    expected = np.sqrt([np.diag(dense_covariance(scale[0, 0, c].double().numpy(), spectrum[c].numpy())).reshape(SHAPE)
                        for c in range(3)])
    np.testing.assert_allclose(sd[0, 0].detach().numpy(), expected, rtol=1e-4)
    assert torch.allclose(m, loc, atol=1e-5)
    plain = CaseGuide(loc, scale, BendingNormal(SHAPE))
    assert not plain.correlated and torch.equal(plain.distribution_params()[1], plain.log_scale.exp())
    with pytest.raises(InputError, match="spectrum > 0"):
        CaseGuide(loc, scale, BendingNormal(SHAPE), -spectrum.float())


def test_elbos_with_the_correlated_guide_agree_between_trace_and_meanfield():
    """TraceMeanField_ELBO has no analytic KL for this family and falls back to the sampled one: with the
    same seed both estimators give the same value."""
    images = torch.rand(1, 2, *SHAPE)
    model = GroupMorphModel(2, diffeomorphic=False)
    _, scale, spectrum = _fields(4)
    guide = CaseGuide(torch.zeros(1, 1, 3, *SHAPE), 0.1 * scale[:1, None].float(), model.prior_distribution(SHAPE),
                      spectrum.float())
    torch.manual_seed(0)
    a = Trace_ELBO().loss(model, guide, images, 0)
    torch.manual_seed(0)
    b = TraceMeanField_ELBO().loss(model, guide, images, 0)
    assert math.isfinite(a) and a == pytest.approx(b, rel=1e-5)


def test_bad_input_is_refused():
    loc, scale, spectrum = _fields()
    with pytest.raises(InputError, match="broadcast"):
        CorrelatedNormal(loc, scale[..., :2], spectrum)
    with pytest.raises(InputError, match="trailing shape"):
        CorrelatedNormal(loc, scale, spectrum).log_prob(loc[..., :2])
    with pytest.raises(InputError, match="expected sigma"):
        correlated_start(BendingNormal(SHAPE), scale)
    with pytest.raises(InputError, match="sigma > 0"):
        correlated_start(BendingNormal(SHAPE), torch.zeros(1, 1, 3, *SHAPE))
    cfg = Config()
    cfg.register.covariance = "full"
    with pytest.raises(InputError, match="register.covariance"):
        cfg.register.validate()


def test_per_case_posterior_widens_when_the_correlated_family_wins():
    """End to end on a phantom: with ``covariance: dct`` the σ phase keeps whichever family has the better
    ELBO; the correlated one must not lose on the ELBO, the mean is the same as the diagonal run's, and the
    posterior samples' sd follows the reported marginal sd. The bending prior's weights in voxels
    (λ_b 1, λ_v 0.01), with which the correlated family wins on this small phantom."""
    g = breathing_phantom((20, 20, 20), 3, seed=1, num_landmarks=10)
    out = {}
    for cov in ("diagonal", "dct"):
        cfg = Config().with_timepoints(3)
        cfg.model.prior_units, cfg.model.prior_options = "voxel", {"lambda_b": 1.0, "lambda_v": 0.01}
        cfg.register.covariance = cov
        out[cov] = register(g.images, cfg, seed=0, samples=12)
    diag, corr = (out[c].summary["finetune"]["scale_phase"] for c in ("diagonal", "dct"))
    assert diag["covariance"] == "diagonal" and "correlated" not in diag
    assert corr["covariance"] == "dct", corr  # on this phantom the correlated family wins by a margin
    assert corr["elbo_loss_after"] < diag["elbo_loss_after"] - 0.02
    assert np.allclose(out["dct"].displacement, out["diagonal"].displacement, atol=1e-4)
    sd = {c: out[c].summary["displacement_std_mm_mean"] for c in out}
    assert sd["dct"] > 2 * sd["diagonal"], sd


def test_start_takes_the_median_curvature_of_each_component():
    prior = BendingNormal(SHAPE)
    diag = prior.precision_diagonal(dtype=torch.float64)
    n = math.prod(SHAPE)
    h = torch.full((n,), 2.0, dtype=torch.float64)
    h[: n // 3] = 40.0  # a third of the voxels far stiffer: the median stays 2, the mean would be 14.7
    h[n // 3: n // 3 + 4] = -5.0  # a diagonal fit wider than the prior alone: h < 0 there, clamped only in the median
    sigma = (diag.reshape(-1) + h).clamp_min(1e-3).rsqrt().reshape(1, 1, 1, *SHAPE).expand(1, 1, 3, *SHAPE)
    modulation, spectrum, curvature = correlated_start(prior, sigma)
    assert torch.allclose(curvature, torch.full((1, 1, 3), 2.0, dtype=torch.float64))
    assert torch.allclose(spectrum[0, 0, 0], (prior.precision_eigenvalues(dtype=torch.float64) + 2.0).rsqrt())
    assert torch.allclose(modulation, sigma * (diag + 2.0).sqrt())


def test_sigma_phase_picks_the_curvature_of_best_elbo_on_its_ladder():
    """fit_scale evaluates rungs c · mean(diag Λ) from register.curvature and keeps the one of lowest ELBO
    loss, whose spectrum is 1 / sqrt(λ(k) + h); with curvature 0 the correlated posterior is the prior's
    covariance (h = 0, one rung). On a phantom the data narrow the posterior: the chosen h is above 0
    and its ELBO beats h = 0's."""
    from groupmorph_pyro.config import RegisterConfig
    from groupmorph_pyro.preprocess import normalize_group
    from groupmorph_pyro.registration import fit_scale

    g = breathing_phantom((16, 16, 16), 3, amplitude=2.0, seed=4, num_landmarks=4)
    model = GroupMorphModel(3)
    x = normalize_group(g.images)
    prior = model.prior_distribution(x.shape[2:])
    loc = torch.zeros(1, 2, 3, *x.shape[2:])
    case = CaseGuide(loc, torch.full_like(loc, 0.05), prior)
    searched, info = fit_scale(model, x, 0, case, RegisterConfig())
    flat, flat_info = fit_scale(model, x, 0, case, RegisterConfig(curvature=0.0))
    corr, corr0 = info["correlated"], flat_info["correlated"]
    assert corr0["tried"] == [[0.0, corr0["elbo_loss"]]] and corr0["curvature_median"] == pytest.approx(0.0, abs=1e-3)
    start = RegisterConfig().curvature
    assert len(corr["tried"]) >= 3 and [c for c, _ in corr["tried"][:2]] == pytest.approx([start, 3 * start])
    c, loss = min(corr["tried"], key=lambda t: t[1])
    assert corr["curvature_fraction"] == c and corr["elbo_loss"] == loss and c > 0
    assert loss < corr0["elbo_loss"] and info["covariance"] == "dct" and info["elbo_loss_after"] == loss
    unit = float(prior.precision_diagonal(dtype=torch.float64).mean())
    assert corr["curvature_median"] == pytest.approx(c * unit, rel=1e-3)
    expected = (prior.precision_eigenvalues(dtype=torch.float64) + c * unit).rsqrt()
    np.testing.assert_allclose(searched.log_spectrum.exp()[0, 0, 0].detach().double().numpy(), expected.numpy(), rtol=1e-4)
    _, sd = searched.distribution_params()
    _, sd0 = flat.distribution_params()
    assert (sd < sd0).all()  # curvature narrows every voxel's marginal sd
    assert info["beta"] == RegisterConfig().scale_beta
    with pytest.raises(InputError, match="register.curvature"):
        RegisterConfig(curvature=-0.1).validate()


def test_sigma_phase_scores_the_spread_with_its_own_likelihood_weight():
    """register.scale_beta replaces the likelihood's β in the σ phase's ELBO only: the loss it reports is
    the model's at that β (the same rung, the same random numbers, register.scale_particles particles),
    a stronger weight picks a larger curvature, and the model passed in keeps its β. None, or a
    likelihood without a β, keeps the model's."""
    from groupmorph_pyro.config import ModelConfig, RegisterConfig
    from groupmorph_pyro.model import build_model
    from groupmorph_pyro.preprocess import normalize_group
    from groupmorph_pyro.registration import elbo_loss, fit_scale, spread_model

    g = breathing_phantom((16, 16, 16), 3, amplitude=2.0, seed=4, num_landmarks=4)
    model = build_model(ModelConfig(num_timepoints=3, beta=5.0))
    x = normalize_group(g.images)
    loc = torch.zeros(1, 2, 3, *x.shape[2:])
    case = CaseGuide(loc, torch.full_like(loc, 0.05), model.prior_distribution(x.shape[2:]))
    weak, weak_info = fit_scale(model, x, 0, case, RegisterConfig(scale_beta=1.0))
    strong, strong_info = fit_scale(model, x, 0, case, RegisterConfig(scale_beta=25.0))
    assert model.likelihood.beta == 5.0 and weak_info["beta"] == 1.0 and strong_info["beta"] == 25.0
    assert strong_info["correlated"]["curvature_fraction"] > weak_info["correlated"]["curvature_fraction"]
    one, beta = spread_model(model, 1.0)
    assert beta == 1.0 and one.likelihood.beta == 1.0 and one.prior_distribution(x.shape[2:]) is not None
    particles = RegisterConfig().scale_particles
    assert weak_info["elbo_loss_after"] == pytest.approx(elbo_loss(one, weak, x, 0, particles), rel=1e-6)
    three, three_info = fit_scale(model, x, 0, case, RegisterConfig(scale_beta=1.0, scale_particles=3))
    assert three_info["elbo_loss_after"] == pytest.approx(elbo_loss(one, three, x, 0, 3), rel=1e-6)
    assert three_info["elbo_loss_after"] != pytest.approx(elbo_loss(one, three, x, 0, particles), rel=1e-6)
    same, beta = spread_model(model, None)
    assert same is model and beta == 5.0
    custom = GroupMorphModel(3, likelihood=lambda warped: warped.sum(dim=(1, 2, 3, 4)) * 0.0)
    assert spread_model(custom, 1.0) == (custom, None)
    with pytest.raises(InputError, match="register.scale_beta"):
        RegisterConfig(scale_beta=0.0).validate()
    with pytest.raises(InputError, match=r"register.scale_particles: expected an integer >= 1, got 0"):
        RegisterConfig(scale_particles=0).validate()
