"""Swapping priors and likelihoods: by name (config) and by a few lines of code."""
import itertools
import math
import warnings

import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import MultivariateNormal, kl_divergence

from groupmorph_pyro.checks import InputError
from groupmorph_pyro.config import Config, ModelConfig
from groupmorph_pyro.likelihoods import SIMILARITIES, GroupSimilarity, lncc, mutual_information, ssd
from groupmorph_pyro.model import GroupMorphGuide, GroupMorphModel, build_model
from groupmorph_pyro.priors import PRIORS, BendingNormal, LaplacianNormal, apply_laplacian
from test_priors import dense_precision

SHAPE = (8, 8, 8)
TINY = (3, 4, 2)


def dense_laplacian(shape):
    return dense_precision(shape, 1.0, 0.0)


def test_bending_prior_log_prob_and_kl_equal_dense():
    lb, lv = 0.7, 0.2
    p = BendingNormal(TINY, lb, lv)
    n = math.prod(TINY)
    lap = dense_laplacian(TINY)
    prec = lv * torch.eye(n, dtype=torch.float64) + lb * lap @ lap
    mvn = MultivariateNormal(torch.zeros(n, dtype=torch.float64), precision_matrix=prec)
    z = torch.randn(4, 3, *TINY, dtype=torch.float64)
    assert torch.allclose(p.log_prob(z), mvn.log_prob(z.reshape(4, 3, n)).sum(-1), rtol=1e-10)
    assert torch.allclose(apply_laplacian(z[0, 0]).reshape(-1), lap @ z[0, 0].reshape(-1))
    # diag Λ: the per-case σ reset's 1/sqrt(diag Λ) (bending is the default prior)
    assert torch.allclose(p.precision_diagonal(dtype=torch.float64).reshape(-1), torch.diagonal(prec), rtol=1e-12)
    loc, scale = torch.randn(3, *TINY, dtype=torch.float64), 0.2 + torch.rand(3, *TINY, dtype=torch.float64)
    kl = kl_divergence(dist.Normal(loc, scale).to_event(4), p)
    dense = sum(kl_divergence(MultivariateNormal(loc[c].reshape(-1), scale_tril=torch.diag(scale[c].reshape(-1))), mvn)
                for c in range(3))
    assert torch.allclose(kl, dense, rtol=1e-8)


def test_diagonal_prior_is_independent_normal():
    p = LaplacianNormal(TINY, 0.0, 0.25)  # the "diagonal" prior
    z = torch.randn(3, *TINY)
    assert torch.allclose(p.log_prob(z), dist.Normal(0.0, 2.0).log_prob(z).sum(), rtol=1e-5)


def test_similarities_rank_aligned_above_misaligned():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 16, 16, 16, generator=g), 3, 1, 1)[:, 0]
    x = (x - x.min()) / (x.max() - x.min())
    y = torch.roll(x, 2, -1)
    for name, fn in SIMILARITIES.items():
        assert fn(x, x) > fn(x, y), name
    assert torch.allclose(ssd(x, x), torch.zeros(1))
    assert lncc(x, x).item() > 0.95  # 1 up to the eps that guards flat windows
    assert lncc(x, 0.5 * x + 0.2) > lncc(x, y) + 0.3  # (nearly) invariant to local affine intensity maps
    assert mutual_information(x, 1 - x) > mutual_information(x, y)


@pytest.mark.parametrize("prior, likelihood, reduction",
                         list(itertools.product(PRIORS, sorted(SIMILARITIES), ["pairs", "template"])))
def test_every_prior_and_likelihood_trains_one_svi_step(prior, likelihood, reduction):
    cfg = ModelConfig(num_timepoints=3, prior=prior, likelihood=likelihood, reduction=reduction,
                      encoder=[4], decoder=[4])
    model = build_model(cfg)
    guide = GroupMorphGuide(3, encoder=(4,), decoder=(4,))
    optim = torch.optim.Adam(guide.parameters(), lr=1e-3)
    images = torch.rand(1, 3, *SHAPE)
    before = [p.detach().clone() for p in guide.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for elbo in (Trace_ELBO(), TraceMeanField_ELBO()):
            optim.zero_grad()
            loss = elbo.differentiable_loss(model, guide, images, 0)
            loss.backward()
            optim.step()
            assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, guide.parameters()))


def test_custom_prior_and_likelihood_plug_in_without_editing_the_package():
    calls = []

    def my_similarity(a, b):  # negative mean absolute difference, (B,)
        calls.append(a.shape)
        return -(a - b).abs().flatten(1).mean(1)

    def my_prior(shape, device):
        return dist.Normal(torch.zeros(3, *shape, device=device), 2.0).to_event(4)

    model = GroupMorphModel(3, prior=my_prior, likelihood=GroupSimilarity(my_similarity, "template", beta=2.0))
    guide = GroupMorphGuide(3, encoder=(4,), decoder=(4,))
    loss = Trace_ELBO().differentiable_loss(model, guide, torch.rand(2, 3, *SHAPE), 1)
    assert torch.isfinite(loss) and calls and calls[0] == (2, *SHAPE)

    def plain_likelihood(warped):  # any callable (B, K, D, H, W) -> (B,)
        return -warped.var(dim=1).flatten(1).sum(1)

    loss = TraceMeanField_ELBO().differentiable_loss(GroupMorphModel(3, likelihood=plain_likelihood), guide,
                                                     torch.rand(1, 3, *SHAPE), 0)
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: GroupMorphModel(3, likelihood=lambda a, b: a), r"likelihood: expected a callable with signature likelihood\(warped"),
        (lambda: GroupMorphModel(3, likelihood="nmi"), r"likelihood: expected a callable"),
        (lambda: GroupMorphModel(3, prior=lambda shape: None), r"prior: expected a callable with signature prior\(spatial_shape"),
        (lambda: GroupSimilarity(lambda a: a), r"similarity: expected a callable with signature sim\(a"),
        (lambda: GroupSimilarity("ncc"), r"likelihood: expected one of \['lncc', 'mi', 'nmi', 'ssd'\]"),
        (lambda: GroupSimilarity("nmi", reduction="median"), r"reduction: expected one of"),
        (lambda: Config.from_dict({"model": {"prior": "tv"}}), r"model.prior: expected one of"),
        (lambda: Config.from_dict({"model": {"likelihood": "ncc"}}), r"model.likelihood"),
    ],
)
def test_wrong_signature_or_name_fails_clearly(build, match):
    with pytest.raises(InputError, match=match):
        build()


@pytest.mark.parametrize(
    "model, match",
    [
        (GroupMorphModel(3, likelihood=lambda w: w.sum()), r"likelihood: expected a tensor of shape \(B,\) = \(1,\), got \(\)"),
        (GroupMorphModel(3, prior=lambda s, d: LaplacianNormal((4, 4, 4))), r"prior: expected a distribution with event shape \(3, 8, 8, 8\)"),
    ],
)
def test_wrong_output_shapes_fail_clearly(model, match):
    guide = GroupMorphGuide(3, encoder=(4,), decoder=(4,))
    with pytest.raises(InputError, match=match):
        Trace_ELBO().differentiable_loss(model, guide, torch.rand(1, 3, *SHAPE), 0)
