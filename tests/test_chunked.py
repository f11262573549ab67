"""The memory-bounded per-case path of full-resolution grids (issue 13's memory goal): the MAP step,
the ELBO guard and the posterior's σ computed a few latent timepoints at a time, and σ / spectra kept
in the shape they broadcast from. Each is pinned against the one-batch computation it replaces
(Pyro's Trace_ELBO, autograd of ``map_loss``, materialised tensors), with spatially varying fields."""
import dataclasses

import numpy as np
import pytest
import torch
from pyro.infer import Trace_ELBO

import groupmorph_pyro.group as group_module
from groupmorph_pyro.checks import InputError
from groupmorph_pyro.config import Config
from groupmorph_pyro.model import (CaseGuide, build_model, chunked_elbo_loss, chunked_map_loss, latent_chunk,
                                   map_loss)
from groupmorph_pyro.preprocess import normalize_group
from groupmorph_pyro.priors import CorrelatedNormal, compact, dct_marginal_variance
from groupmorph_pyro.registration import correlated_start, fit_case, register
from groupmorph_pyro.spatial import _gaussian_blur
from groupmorph_pyro.synthetic import breathing_phantom

SHAPE = (16, 18, 16)
K = 4


@pytest.fixture(scope="module")
def case():
    """A breathing phantom (K = 4) in float64, its model (prior per mm at 2 × 2 × 2.5 mm, jitter on)
    and a smooth, spatially varying mean of up to ~2 voxels for the 3 moving timepoints."""
    g = breathing_phantom(SHAPE, K, seed=1, num_landmarks=5)
    x = normalize_group(g.images, (1, 99)).double()
    cfg = Config()
    cfg.model.num_timepoints = K
    model = build_model(cfg.model, spacing=(2.0, 2.0, 2.5))
    assert model.jitter
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 3 * (K - 1), *SHAPE, generator=gen, dtype=torch.float64)
    loc = 2.0 * _gaussian_blur(noise, [2.0, 2.0, 2.0]).reshape(1, K - 1, 3, *SHAPE)
    return x, model, model.prior_distribution(SHAPE), loc


def _scale(loc, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return 0.05 + 0.1 * torch.rand(loc.shape, generator=gen, dtype=loc.dtype)


@pytest.mark.parametrize("fixed", [0, 2])
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_chunked_map_loss_is_map_loss_and_its_gradient(case, fixed, chunk):
    x, model, prior, loc = case
    reference = CaseGuide(loc, torch.full_like(loc, 0.1), prior, point=True)
    torch.manual_seed(5)  # the same jitter offset for both
    expected = map_loss(model, reference, x, fixed, prior)
    expected.backward()
    guide = CaseGuide(loc, torch.full_like(loc, 0.1), prior, point=True, compact=True)
    torch.manual_seed(5)
    value = chunked_map_loss(model, guide, x, fixed, prior, chunk)
    assert not value.requires_grad
    assert float(value) == pytest.approx(float(expected.detach()), rel=1e-12)
    grad, ref = guide.whitened.grad, reference.whitened.grad
    assert grad.abs().max() > 1.0  # the gradient is not trivially zero
    torch.testing.assert_close(grad, ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))


def test_chunked_map_loss_accumulates_like_backward(case):
    """Called twice without zeroing, the gradient adds up, as two backward calls would."""
    x, model, prior, loc = case
    guide = CaseGuide(loc, torch.full_like(loc, 0.1), prior, point=True)
    torch.manual_seed(0)  # the same jitter offset both times
    chunked_map_loss(model, guide, x, 0, prior, 1)
    once = guide.whitened.grad.clone()
    torch.manual_seed(0)
    chunked_map_loss(model, guide, x, 0, prior, 1)
    torch.testing.assert_close(guide.whitened.grad, 2 * once)


@pytest.mark.parametrize("family", ["point", "diagonal", "diagonal-compact", "correlated", "correlated-compact"])
def test_chunked_elbo_loss_is_trace_elbo(case, family):
    """Without jitter the chunks draw the same noise as Pyro's one batch: the same number for a seed
    (chunk 1 and all latents at once), for every posterior family of the per-case guide."""
    x, model, prior, loc = case
    model = build_model(Config().model.__class__(num_timepoints=K, jitter=False), spacing=(2.0, 2.0, 2.5))
    gen = torch.Generator().manual_seed(2)
    compact_form = family.endswith("compact")
    if family == "point":
        guide = CaseGuide(loc, _scale(loc), prior, point=True)
    elif family.startswith("diagonal"):
        scale = (0.05 + 0.1 * torch.rand(*SHAPE, generator=gen, dtype=loc.dtype)).expand(loc.shape) \
            if compact_form else _scale(loc)
        guide = CaseGuide(loc, scale, prior, compact=compact_form)
    else:
        spectrum = 0.5 + torch.rand(loc.shape, generator=gen, dtype=loc.dtype)
        scale = _scale(loc)
        if compact_form:
            spectrum, scale = spectrum[:, :1, :1].expand(loc.shape), scale[:, :1].expand(loc.shape)
        guide = CaseGuide(loc, scale, prior, spectrum, compact=compact_form)
    values = []
    with torch.no_grad():
        for chunk in (1, K - 1):
            torch.manual_seed(3)
            values.append(float(chunked_elbo_loss(model, guide, x, 0, prior, particles=2, chunk=chunk)))
        torch.manual_seed(3)
        expected = Trace_ELBO(num_particles=2).loss(model, guide, x, 0)
    assert values == pytest.approx([expected] * 2, rel=1e-10)


def test_chunked_elbo_loss_with_jitter_estimates_the_same_elbo(case):
    """With jitter the offset is drawn first, so the draws differ from Pyro's; the two estimators
    agree in the mean (200 draws each, within 4 standard errors)."""
    x, model, prior, loc = case
    guide = CaseGuide(loc, _scale(loc), prior)
    chunked, pyro_loss = [], []
    with torch.no_grad():
        for seed in range(200):
            torch.manual_seed(seed)
            chunked.append(float(chunked_elbo_loss(model, guide, x, 0, prior, chunk=1)))
            torch.manual_seed(seed + 1000)
            pyro_loss.append(Trace_ELBO().loss(model, guide, x, 0))
    diff = np.mean(chunked) - np.mean(pyro_loss)
    se = np.sqrt(np.var(chunked) / 200 + np.var(pyro_loss) / 200)
    assert abs(diff) < 4 * se


def test_compact_guide_is_the_same_distribution(case):
    """``compact=True`` stores σ and the spectrum in the shape they broadcast from; the distribution,
    its log density and its (marginal) sd are those of the per-voxel storage."""
    _, _, prior, loc = case
    gen = torch.Generator().manual_seed(4)
    sigma = (0.05 + 0.1 * torch.rand(1, 1, 3, *SHAPE, generator=gen, dtype=loc.dtype)).expand(loc.shape)
    spectrum = (0.5 + torch.rand(1, 1, 1, *SHAPE, generator=gen, dtype=loc.dtype)).expand(loc.shape)
    for extra in ({}, {"spectrum": spectrum}):
        full = CaseGuide(loc, sigma, prior, **extra)
        small = CaseGuide(loc, sigma, prior, compact=True, **extra)
        assert full.log_scale.shape == loc.shape and small.log_scale.shape == (1, 1, 3, *SHAPE)
        for a, b in zip(full.distribution_params(), small.distribution_params()):
            torch.testing.assert_close(a, b)
        z = full.distribution().sample()
        torch.testing.assert_close(full.distribution().log_prob(z), small.distribution().log_prob(z))
        torch.testing.assert_close(full.distribution(slice(1, 3)).log_prob(z[:, 1:3]),
                                   small.distribution(slice(1, 3)).log_prob(z[:, 1:3]))
    with pytest.raises(InputError, match="does not broadcast"):
        CaseGuide(loc, torch.ones(2, *SHAPE), prior, compact=True)
    with pytest.raises(InputError, match="compact"):
        CaseGuide(loc, sigma, prior, compact="yes")


def test_correlated_normal_on_broadcast_tensors_matches_materialised(case):
    """Variance and entropy from the compact σ and spectrum equal those of materialised copies, and
    the variance equals Σ_k s_k² C_k(i)² a_i² computed per component."""
    _, _, _, loc = case
    gen = torch.Generator().manual_seed(6)
    a = (0.5 + torch.rand(1, 1, 1, *SHAPE, generator=gen, dtype=loc.dtype)).expand(loc.shape)
    s = (0.5 + torch.rand(1, 3, 1, *SHAPE, generator=gen, dtype=loc.dtype)).expand(loc.shape)
    expanded = CorrelatedNormal(loc, a, s)
    materialised = CorrelatedNormal(loc, a.clone(), s.clone())
    assert expanded._scale.shape == (1, 1, 1, *SHAPE) and materialised._scale.shape == loc.shape
    torch.testing.assert_close(expanded.variance, materialised.variance)
    torch.testing.assert_close(expanded.entropy(), materialised.entropy())
    per_component = a[0, 1, 2] ** 2 * dct_marginal_variance(s[0, 1, 2] ** 2)
    torch.testing.assert_close(expanded.variance[0, 1, 2], per_component)
    z = materialised.sample()
    torch.testing.assert_close(expanded.log_prob(z), materialised.log_prob(z))


def test_compact_view():
    base = torch.arange(24.0).reshape(2, 3, 4)
    view = base[None, :, None].expand(5, 2, 7, 3, 4)
    small = compact(view)
    assert small.shape == (1, 2, 1, 3, 4) and torch.equal(small.expand(view.shape), view)
    assert compact(base) is base


def test_correlated_start_on_a_shared_sigma_matches_materialised(case):
    _, _, prior, loc = case
    sigma = prior.precision_diagonal(dtype=torch.float64).rsqrt().mul(0.8).expand(loc.shape)
    for got, want in zip(correlated_start(prior, sigma), correlated_start(prior, sigma.clone())):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)


def test_latent_chunk_policy(case, monkeypatch):
    x, model, prior, loc = case
    guide = CaseGuide(loc, torch.full_like(loc, 0.1), prior, point=True)
    assert latent_chunk(model, guide, SHAPE) is None  # a small grid: one batch
    monkeypatch.setattr(group_module, "_BATCH_VOXELS", 2 * int(np.prod(SHAPE)))
    assert latent_chunk(model, guide, SHAPE) == 2
    moving = build_model(Config().model.__class__(num_timepoints=K, mode="all-moving"))
    assert latent_chunk(moving, guide, SHAPE) is None  # all-moving fields share the group mean


def test_fit_case_chunked_reaches_the_same_mean(case, monkeypatch):
    """fit_case on a grid forced to the chunked path (one latent at a time) fits the same mean and
    keeps the same posterior as the one-batch path: same steps, same guard decisions."""
    x, model, prior, _ = case
    x = x.float()
    zero = torch.zeros(1, K - 1, 3, *SHAPE)
    settings = dataclasses.replace(Config().register, lr=0.2)
    out = []
    for batch in (None, 1):
        if batch:
            monkeypatch.setattr(group_module, "_BATCH_VOXELS", batch)
        torch.manual_seed(0)
        guide, info = fit_case(model, x, 0, zero, torch.full_like(zero, 0.05), settings, steps=12, fit="map")
        out.append((guide.distribution_params()[0].detach(), info))
    (one, info_one), (chunked, info_chunked) = out
    assert info_one["kept"] == info_chunked["kept"] == "refined"
    assert one.abs().max() > 0.3  # it moved
    torch.testing.assert_close(chunked, one, rtol=1e-4, atol=1e-4 * float(one.abs().max()))
    assert info_chunked["losses"] == pytest.approx(info_one["losses"], rel=1e-5)


def test_register_chunked_matches_one_batch(monkeypatch):
    """register (per-case from zero, the package defaults) with every map computed one at a time
    gives the registration of the one-batch path: same landmark error, same mean field."""
    g = breathing_phantom((24, 24, 20), 3, seed=2, num_landmarks=20)
    cfg = Config()
    cfg.model.num_timepoints = 3
    cfg.register.steps, cfg.register.coarse_steps = 30, 10
    results = []
    for batch in (None, 1):
        if batch:
            monkeypatch.setattr(group_module, "_BATCH_VOXELS", batch)
        results.append(register(g.images, cfg, landmarks=g.landmarks, affine=g.affine))
    one, chunked = results
    torch.testing.assert_close(torch.from_numpy(chunked.loc), torch.from_numpy(one.loc), rtol=1e-4, atol=1e-4)
    mm = [r.summary["landmarks"]["registered"]["mean_mm"] for r in results]
    assert mm[1] == pytest.approx(mm[0], abs=1e-3)
    assert mm[0] < one.summary["landmarks"]["identity"]["mean_mm"]
    assert one.scale.shape == chunked.scale.shape == one.loc.shape
    assert one.summary["finetune"]["landmarks_before_mm"] == one.summary["landmarks"]["identity"]["mean_mm"]


def test_chunked_bad_input(case):
    x, model, prior, loc = case
    diagonal = CaseGuide(loc, torch.full_like(loc, 0.1), prior)
    with pytest.raises(InputError, match="CaseGuide\\(point=True\\)"):
        chunked_map_loss(model, diagonal, x, 0, prior, 1)
    point = CaseGuide(loc, torch.full_like(loc, 0.1), prior, point=True)
    with pytest.raises(InputError, match="chunk"):
        chunked_map_loss(model, point, x, 0, prior, 0)
    moving = build_model(Config().model.__class__(num_timepoints=K, mode="all-moving"))
    with pytest.raises(InputError, match="all-to-one"):
        chunked_elbo_loss(moving, diagonal, x, None, particles=1, chunk=1)
    with pytest.raises(InputError, match="does not fit"):
        chunked_elbo_loss(model, diagonal, x[..., :-1], 0, particles=1, chunk=1)
    with pytest.raises(InputError, match="particles"):
        chunked_elbo_loss(model, diagonal, x, 0, particles=0, chunk=1)
    transform = moving.transform(None)
    with pytest.raises(InputError, match="all-to-one"):
        transform.warp_latents(loc, x[:, 1:])
    with pytest.raises(InputError, match="warp_latents"):
        model.transform(0).warp_latents(loc, x[:, :2])
