"""The per-case optimisers: Adam and SGD with Nesterov momentum over a few tensors.

:func:`~groupmorph_pyro.registration.fit_case` moves its whitened mean and log σ with these instead of
``torch.optim``: the first ``torch.optim`` optimiser a process builds imports ``torch._dynamo``
(seconds on a CPU), which every
``groupmorph register`` would pay once, while an update here is a handful of tensor operations.
The updates are those of ``torch.optim.Adam`` (no weight decay, no AMSGrad) and
``torch.optim.SGD(momentum=m, nesterov=True)`` (no dampening), which the tests check them against.

Interface (the subset of ``torch.optim`` the per-case loop uses): ``param_groups`` (a list of
``{"params": [tensors], "lr": float}`` whose ``lr`` the caller may change between steps),
``zero_grad()`` and ``step()``.

:func:`ladder_minimum` minimises a noisy scalar function of one positive number on a geometric
ladder (the σ phase's search for the likelihood's curvature).
"""
from __future__ import annotations

import math

import torch

from .checks import InputError

__all__ = ["Adam", "NesterovSGD", "ladder_minimum"]


def ladder_minimum(loss, start: float, factor: float = 3.0, max_rungs: int = 6) -> tuple[float, list]:
    """The rung of the ladder ``start · factor^j`` (``|j| <= max_rungs``) with the lowest ``loss``, found
    by walking from ``j = 0`` in the direction the loss falls and stopping at the first rung that is
    not lower (a unimodal loss needs 3 evaluations when ``start`` is best, one more per rung moved).

    Args:
        loss: callable of one float, returning a float (finite, or inf for a rung that cannot be used);
        start: > 0, the first rung; factor: > 1, the ratio of neighbouring rungs;
        max_rungs: >= 0, how far the walk may go each way.
    Returns:
        (best value, ``[[value, loss], ...]`` in the order evaluated).
    """
    if not (isinstance(start, (int, float)) and math.isfinite(start) and start > 0):
        raise InputError(f"ladder_minimum: expected a finite start > 0, got {start!r}")
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 1):
        raise InputError(f"ladder_minimum: expected a finite factor > 1, got {factor!r}")
    if isinstance(max_rungs, bool) or not isinstance(max_rungs, int) or max_rungs < 0:
        raise InputError(f"ladder_minimum: expected an integer max_rungs >= 0, got {max_rungs!r}")
    tried = []

    def at(j: int) -> float:
        value = float(start * factor ** j)
        result = float(loss(value))
        if math.isnan(result):
            raise InputError(f"ladder_minimum: the loss at {value:g} is NaN")
        tried.append([value, result])
        return result

    best_j, best = 0, at(0)
    for direction in (1, -1):  # up first; down only if the first step up did not improve
        j = best_j + direction
        moved = False
        while abs(j) <= max_rungs:
            value = at(j)
            if value >= best:
                break
            best_j, best, moved = j, value, True
            j += direction
        if moved:
            break
    return float(start * factor ** best_j), tried


class _Optimizer:
    def __init__(self, param_groups):
        groups = [dict(group) for group in param_groups]
        for group in groups:
            if "params" not in group or "lr" not in group:
                raise InputError(f"optimizer: expected parameter groups {{'params': [...], 'lr': float}}, got keys {sorted(group)}")
            group["params"] = list(group["params"])
            if not all(isinstance(p, torch.Tensor) and p.requires_grad for p in group["params"]):
                raise InputError("optimizer: expected tensors with requires_grad=True")
            if not float(group["lr"]) >= 0:
                raise InputError(f"optimizer: expected lr >= 0, got {group['lr']!r}")
        self.param_groups = groups
        self.state: dict[int, dict] = {}

    def zero_grad(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def _params(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    yield group, p, self.state.setdefault(id(p), {})


class Adam(_Optimizer):
    """Adam (Kingma & Ba): ``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²``,
    ``p ← p − lr · (m / (1−β₁ᵗ)) / (sqrt(v / (1−β₂ᵗ)) + eps)``; state per tensor."""

    def __init__(self, param_groups, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(param_groups)
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or not eps >= 0:
            raise InputError(f"Adam: expected betas in [0, 1) and eps >= 0, got {betas!r}, {eps!r}")
        self.betas, self.eps = betas, eps

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        for group, p, state in self._params():
            if not state:
                state.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
            state["t"] += 1
            t, m, v = state["t"], state["m"], state["v"]
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (v / (1 - b2 ** t)).sqrt_().add_(self.eps)
            p.addcdiv_(m, denom, value=-group["lr"] / (1 - b1 ** t))


class NesterovSGD(_Optimizer):
    """SGD with Nesterov momentum: ``b ← μb + g`` (``b = g`` at the first step),
    ``p ← p − lr · (g + μb)``; state per tensor."""

    def __init__(self, param_groups, momentum: float = 0.9):
        super().__init__(param_groups)
        if not 0 <= momentum < 1:
            raise InputError(f"NesterovSGD: expected momentum in [0, 1), got {momentum!r}")
        self.momentum = momentum

    @torch.no_grad()
    def step(self) -> None:
        for group, p, state in self._params():
            if "buffer" not in state:
                state["buffer"] = p.grad.clone()
            else:
                state["buffer"].mul_(self.momentum).add_(p.grad)
            p.add_(p.grad + self.momentum * state["buffer"], alpha=-group["lr"])
