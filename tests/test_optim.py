"""The per-case optimisers (groupmorph_pyro.optim) against torch.optim's Adam and Nesterov SGD."""
import subprocess
import sys

import pytest
import torch

from groupmorph_pyro.checks import InputError
from groupmorph_pyro.optim import Adam, NesterovSGD


def _loss(a, b):
    """A non-quadratic loss whose gradient varies in space and between steps."""
    grid = torch.linspace(-1.0, 1.0, a.numel(), dtype=a.dtype).view_as(a)
    return (torch.sin(3 * a + grid) + 0.5 * a ** 2 * (1 + grid)).sum() + (b ** 4).sum() - (grid.flatten()[: b.numel()] * b).sum()


def _trajectory(make, lrs):
    torch.manual_seed(0)
    a = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    opt = make([{"params": [a], "lr": lrs[0][0]}, {"params": [b], "lr": lrs[0][1]}])
    for lr_a, lr_b in lrs:
        opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = lr_a, lr_b  # a schedule, as fit_case sets it
        opt.zero_grad()
        _loss(a, b).backward()
        opt.step()
    return a.detach(), b.detach()


LRS = [(0.3 * (1 + k % 3) / 3, 0.05 / (1 + k)) for k in range(25)]


def test_adam_matches_torch():
    ours = _trajectory(Adam, LRS)
    ref = _trajectory(lambda groups: torch.optim.Adam(groups), LRS)
    for x, y in zip(ours, ref):
        assert torch.allclose(x, y, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ours[0], _trajectory(Adam, LRS[:5])[0])  # the trajectory moves


def test_nesterov_sgd_matches_torch():
    ours = _trajectory(lambda groups: NesterovSGD(groups, momentum=0.9), LRS)
    ref = _trajectory(lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True), LRS)
    for x, y in zip(ours, ref):
        assert torch.allclose(x, y, rtol=1e-12, atol=1e-12)


def test_parameters_without_gradient_are_left_alone():
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(3, requires_grad=True)
    opt = Adam([{"params": [a, b], "lr": 0.1}])
    (a ** 2).sum().backward()
    opt.step()
    assert torch.equal(b, torch.ones(3)) and (a < 1).all()


@pytest.mark.parametrize("make, message", [
    (lambda: Adam([{"params": [torch.ones(2, requires_grad=True)]}]), "lr"),
    (lambda: Adam([{"params": [torch.ones(2)], "lr": 0.1}]), "requires_grad"),
    (lambda: Adam([{"params": [torch.ones(2, requires_grad=True)], "lr": -1.0}]), "lr >= 0"),
    (lambda: Adam([{"params": [torch.ones(2, requires_grad=True)], "lr": 0.1}], betas=(1.0, 0.999)), "betas"),
    (lambda: NesterovSGD([{"params": [torch.ones(2, requires_grad=True)], "lr": 0.1}], momentum=1.5), "momentum"),
])
def test_bad_optimizer_arguments_are_rejected(make, message):
    with pytest.raises(InputError, match=message):
        make()


def test_a_per_case_fit_does_not_import_torch_dynamo():
    """The reason for these optimisers: torch.optim's first use imports torch._dynamo (seconds)."""
    code = ("import sys, torch\n"
            "from groupmorph_pyro.config import ModelConfig, RegisterConfig\n"
            "from groupmorph_pyro.model import build_model\n"
            "from groupmorph_pyro.registration import fit_case\n"
            "model = build_model(ModelConfig(num_timepoints=2))\n"
            "x = torch.rand(1, 2, 12, 12, 12)\n"
            "loc = torch.zeros(1, 1, 3, 12, 12, 12)\n"
            "fit_case(model, x, 0, loc, torch.full_like(loc, 0.05), RegisterConfig(), steps=2, fit=\"map\")\n"
            "fit_case(model, x, 0, loc, torch.full_like(loc, 0.05), RegisterConfig(), steps=2)\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("best, start, rungs, evaluated", [
    (0.27, 0.01, (0.01, 0.03, 0.09, 0.27, 0.81), 5),  # up three rungs, then one past the minimum
    (0.01, 0.01, (0.01, 0.03, 0.00333), 3),  # the start is best: one rung each way
    (0.0004, 0.01, (0.01, 0.03, 0.00333, 0.00111, 0.00037, 0.000123), 6),  # down after the first step up failed
])
def test_ladder_minimum_walks_to_the_rung_nearest_a_unimodal_minimum(best, start, rungs, evaluated):
    """loss(c) = 0.001 (log c − log best)² (differences as small as an ELBO per voxel's): the rung closest
    to ``best`` in log scale wins."""
    import math

    from groupmorph_pyro.optim import ladder_minimum

    chosen, tried = ladder_minimum(lambda c: 1e-3 * (math.log(c) - math.log(best)) ** 2, start)
    expected = min((start * 3.0 ** j for j in range(-6, 7)), key=lambda c: abs(math.log(c / best)))
    assert chosen == pytest.approx(expected, rel=1e-12)
    assert len(tried) == evaluated
    assert [c for c, _ in tried] == pytest.approx(list(rungs), rel=1e-2)
    assert min(tried, key=lambda t: t[1])[0] == chosen


def test_ladder_minimum_stops_at_its_last_rung_and_takes_inf_as_worse():
    from groupmorph_pyro.optim import ladder_minimum

    chosen, tried = ladder_minimum(lambda c: -c, 1.0, factor=2.0, max_rungs=3)  # falls forever: stops at 2³
    assert chosen == 8.0 and [c for c, _ in tried] == [1.0, 2.0, 4.0, 8.0]
    chosen, tried = ladder_minimum(lambda c: float("inf") if c > 1 else c, 1.0, max_rungs=1)
    assert chosen == pytest.approx(1 / 3) and len(tried) == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"start": 0.0}, "start > 0"), ({"start": float("nan")}, "start > 0"), ({"factor": 1.0}, "factor > 1"),
    ({"max_rungs": -1}, "max_rungs >= 0"), ({"max_rungs": 1.5}, "max_rungs >= 0"),
])
def test_ladder_minimum_refuses_bad_arguments(kwargs, message):
    from groupmorph_pyro.optim import ladder_minimum

    with pytest.raises(InputError, match=message):
        ladder_minimum(lambda c: c, **{"start": 1.0, **kwargs})
    with pytest.raises(InputError, match="NaN"):
        ladder_minimum(lambda c: float("nan"), 1.0)
