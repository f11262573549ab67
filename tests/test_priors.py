import itertools
import math

import pyro.distributions as dist
import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from groupmorph_pyro.checks import InputError
from groupmorph_pyro.priors import LaplacianNormal, dct3, idct3

SHAPE = (3, 4, 2)


def dense_precision(shape, lambda_u, lambda_v):
    """Λ = λ_v I + λ_u L built edge by edge (6-neighbourhood, free boundary), float64."""
    idx = {c: i for i, c in enumerate(itertools.product(*[range(n) for n in shape]))}
    n = len(idx)
    lap = torch.zeros(n, n, dtype=torch.float64)
    for c, i in idx.items():
        for axis in range(3):
            nb = list(c)
            nb[axis] += 1
            j = idx.get(tuple(nb))
            if j is not None:
                lap[i, i] += 1
                lap[j, j] += 1
                lap[i, j] -= 1
                lap[j, i] -= 1
    return lambda_v * torch.eye(n, dtype=torch.float64) + lambda_u * lap


@pytest.mark.parametrize("lambda_u, lambda_v", [(1.0, 0.01), (0.5, 2.0), (0.0, 0.3)])
def test_log_prob_equals_dense_mvn(lambda_u, lambda_v):
    p = LaplacianNormal(SHAPE, lambda_u, lambda_v)
    n = math.prod(SHAPE)
    mvn = MultivariateNormal(torch.zeros(n, dtype=torch.float64), precision_matrix=dense_precision(SHAPE, lambda_u, lambda_v))
    z = torch.randn(5, 3, *SHAPE, dtype=torch.float64)
    expected = mvn.log_prob(z.reshape(5, 3, n)).sum(-1)
    assert torch.allclose(p.log_prob(z), expected, rtol=1e-10, atol=1e-8)


def test_dct_is_orthonormal_and_inverted():
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64)
    assert torch.allclose(idct3(dct3(x)), x)
    assert torch.allclose(dct3(x).pow(2).sum(), x.pow(2).sum())


def test_rsample_covariance_and_variance():
    p = LaplacianNormal(SHAPE, 1.0, 0.2)
    cov = torch.linalg.inv(dense_precision(SHAPE, 1.0, 0.2))
    s = p.rsample((40000,)).double().reshape(40000, 3, -1)
    emp = torch.einsum("sci,scj->ij", s, s) / (3 * 40000)
    assert (emp - cov).abs().max() < 0.05 * cov.diag().max()
    assert torch.allclose(p.variance[0].reshape(-1).double(), cov.diag(), rtol=1e-5)


def test_analytic_kl_equals_dense_and_monte_carlo():
    lu, lv = 1.0, 0.1
    p = LaplacianNormal(SHAPE, lu, lv)
    loc = 0.5 * torch.randn(3, *SHAPE, dtype=torch.float64)
    scale = 0.3 + torch.rand(3, *SHAPE, dtype=torch.float64)
    q = dist.Normal(loc, scale).to_event(4)
    kl = kl_divergence(q, p)

    n = math.prod(SHAPE)
    prec = dense_precision(SHAPE, lu, lv)
    dense = sum(
        kl_divergence(
            MultivariateNormal(loc[c].reshape(-1), scale_tril=torch.diag(scale[c].reshape(-1))),
            MultivariateNormal(torch.zeros(n, dtype=torch.float64), precision_matrix=prec),
        )
        for c in range(3)
    )
    assert torch.allclose(kl, dense, rtol=1e-8)

    s = q.sample((20000,))
    mc = q.log_prob(s) - p.log_prob(s)
    assert abs(mc.mean() - kl) < 4 * mc.std() / math.sqrt(len(mc))


def test_expand_and_batch_kl_shapes():
    p = LaplacianNormal(SHAPE).expand([2, 3])
    assert p.batch_shape == (2, 3) and p.event_shape == (3, *SHAPE)
    q = dist.Normal(torch.zeros(2, 3, 3, *SHAPE), 0.1).to_event(4)
    assert kl_divergence(q, p).shape == (2, 3)
    assert p.rsample().shape == (2, 3, 3, *SHAPE)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(spatial_shape=(4, 4), lambda_u=1.0, lambda_v=0.01), r"spatial_shape"),
        (dict(spatial_shape=SHAPE, lambda_u=1.0, lambda_v=0.0), r"lambda_v: expected a finite number > 0, got 0.0"),
        (dict(spatial_shape=SHAPE, lambda_u=-1.0, lambda_v=0.01), r"lambda_u"),
    ],
)
def test_bad_parameters(kwargs, match):
    with pytest.raises(InputError, match=match):
        LaplacianNormal(**kwargs)


def test_log_prob_wrong_event_shape():
    with pytest.raises(InputError, match=r"expected trailing shape \(3, 3, 4, 2\)"):
        LaplacianNormal(SHAPE).log_prob(torch.zeros(3, 3, 4, 3))
