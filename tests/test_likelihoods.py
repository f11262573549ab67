import pytest
import torch

from conftest import smooth_image
from groupmorph_pyro.checks import InputError
from groupmorph_pyro.likelihoods import GroupNMI, group_nmi, nmi

SHAPE = (16, 16, 16)


@pytest.fixture
def x():
    return smooth_image(SHAPE)[:, 0]  # (1, D, H, W)


def test_nmi_of_image_with_itself_is_maximal(x):
    self_nmi = nmi(x, x)
    others = [torch.roll(x, 2, -1), torch.roll(x, 1, -2), torch.rand_like(x), 0.5 * x + 0.5 * torch.roll(x, 3, -3)]
    for y in others:
        assert nmi(x, y) < self_nmi - 0.05
    assert 0.0 <= float(self_nmi) <= 1.0


@pytest.mark.parametrize("positions", [[1, 5, 10, 15, 22, 30], [30, 25, 20, 12, 6, 1], [4, 9, 14, 19, 24, 29]])
def test_nmi_invariant_to_monotone_intensity_map_on_separated_levels(x, positions):
    """Intensities on 6 levels placed on bin centres >= 4 bins apart: Parzen kernels (sd half a bin)
    do not overlap, so any monotone (or reversing) relabelling of the levels leaves NMI unchanged."""
    bins = 32
    centre = lambda idx, pos: (torch.tensor(pos, dtype=torch.float32)[idx] + 0.5) / bins
    level = torch.round(x * 5).long()  # 6 levels, (1, D, H, W)
    other = torch.round(torch.roll(x, 1, -1) * 5).long()
    base = [2, 8, 13, 18, 24, 29]
    a, y, mapped = centre(level, base), centre(other, base), centre(level, positions)
    assert abs(float(nmi(mapped, y, bins)) - float(nmi(a, y, bins))) < 1e-4
    assert abs(float(nmi(mapped, a, bins)) - float(nmi(a, a, bins))) < 1e-4
    assert float(nmi(a, y, bins)) < float(nmi(a, a, bins)) - 0.1


@pytest.mark.parametrize("f", [lambda t: t**2, torch.sqrt, lambda t: 1 - t])
def test_nmi_nearly_invariant_to_smooth_monotone_map(x, f):
    y = torch.roll(x, 1, -1)
    assert abs(float(nmi(f(x), y)) - float(nmi(x, y))) < 0.05
    assert nmi(f(x), x) > nmi(x, y) + 0.1  # still far above a misaligned pair


def test_nmi_symmetric_and_group_mean(x):
    imgs = torch.stack([x[0], torch.roll(x[0], 1, -1), torch.roll(x[0], 2, -2)])[None]  # (1, 3, D, H, W)
    pairs = [nmi(imgs[:, i], imgs[:, j]) for i in range(3) for j in range(3) if i != j]
    assert torch.allclose(nmi(imgs[:, 0], imgs[:, 1]), nmi(imgs[:, 1], imgs[:, 0]), atol=1e-6)
    assert torch.allclose(group_nmi(imgs), torch.stack(pairs).mean(0), atol=1e-6)


def test_group_likelihood_scale_and_gradient(x):
    imgs = torch.stack([x[0], torch.roll(x[0], 1, -1)])[None].requires_grad_(True)
    lik = GroupNMI(beta=2.0)
    val = lik(imgs)
    assert torch.allclose(val, 2.0 * x[0].numel() * group_nmi(imgs))
    val.sum().backward()
    assert torch.isfinite(imgs.grad).all() and imgs.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: group_nmi(torch.rand(1, 1, 4, 4, 4)), r"K >= 2"),
        (lambda: nmi(torch.rand(1, 4, 4, 4), torch.rand(1, 4, 4, 5)), r"equal shape"),
        (lambda: nmi(torch.rand(1, 8), torch.rand(1, 8), bins=1), r"bins"),
        (lambda: GroupNMI(beta=-1.0), r"beta"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(InputError, match=match):
        call()
