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
"""
from __future__ import annotations

import torch

from .checks import InputError

__all__ = ["Adam", "NesterovSGD"]


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
