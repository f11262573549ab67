"""3D U-Net of VoxelMorph/GroupMorph (plain nn.Module, no Pyro), and how a network runs:
precision (bf16 autocast), memory layout (channels_last_3d) and ``torch.compile`` backends.

These runtime choices change speed and memory only; outputs agree with the fp32 eager network to
rounding (tests check the tolerance of each).
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import InputError, check_tensor

__all__ = ["UNet3D", "PRECISIONS", "check_precision", "check_compile", "network_autocast"]

PRECISIONS = ("fp32", "bf16")


def check_precision(precision) -> str:
    """``"fp32"`` or ``"bf16"``; anything else is an :class:`InputError`."""
    if precision not in PRECISIONS:
        raise InputError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    return precision


def check_compile(compile, allow_callable: bool = True):
    """torch.compile backend from a setting: ``False`` → None (eager), ``True`` → ``"inductor"``,
    a backend name (e.g. ``"inductor"``, ``"aot_eager"``, ``"cudagraphs"``) → itself, and, with
    ``allow_callable``, a backend function (``backend(gm, example_inputs) -> callable``) → itself."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return "inductor"
    if allow_callable and callable(compile):
        return compile
    backends = torch.compiler.list_backends(exclude_tags=())
    if not isinstance(compile, str) or compile not in backends:
        raise InputError(f"compile: expected false, true or a torch.compile backend in {sorted(backends)}, got {compile!r}")
    return compile


def network_autocast(device_type: str, precision: str = "fp32"):
    """Context for a network forward: bf16 autocast (convolutions in bf16, fp32 weights and
    reductions), or nothing for ``"fp32"``. ``device_type``: ``"cuda"``, ``"cpu"``, ..."""
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


class _ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(nn.Conv3d(cin, cout, 3, stride=stride, padding=1), nn.LeakyReLU(0.2))


class UNet3D(nn.Module):
    """Encoder–decoder with skip connections (paper: encoder 16-32-32-32, decoder 32-32-32-32-32-16-16).

    Args:
        in_channels: input channels (K images stacked).
        encoder: channels of the stride-2 encoder convolutions.
        decoder: channels of the decoder convolutions; the first ``len(encoder)`` are each followed
            by 2x upsampling and concatenation with the matching skip, the rest run at full resolution.
    Input ``(B, in_channels, D, H, W)`` with D, H, W divisible by ``2**len(encoder)``
    (see :attr:`divisor`); output ``(B, decoder[-1], D, H, W)`` features.
    """

    def __init__(self, in_channels: int, encoder: Sequence[int] = (16, 32, 32, 32),
                 decoder: Sequence[int] = (32, 32, 32, 32, 32, 16, 16)):
        super().__init__()
        if len(decoder) < len(encoder) or len(encoder) < 1:
            raise InputError(f"UNet3D: expected 1 <= len(encoder) <= len(decoder), got {list(encoder)} / {list(decoder)}")
        self.in_channels = int(in_channels)
        self.divisor = 2 ** len(encoder)
        self.down = nn.ModuleList()
        prev, skips = self.in_channels, [self.in_channels]
        for c in encoder:
            self.down.append(_ConvBlock(prev, c, stride=2))
            prev = c
            skips.append(c)
        skips.pop()  # the deepest output is not a skip
        self.up = nn.ModuleList()
        for c in decoder[: len(encoder)]:
            self.up.append(_ConvBlock(prev, c))
            prev = c + skips.pop()
        self.extra = nn.ModuleList()
        for c in decoder[len(encoder):]:
            self.extra.append(_ConvBlock(prev, c))
            prev = c
        self.out_channels = prev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ndim=5, layout="(B, C, D, H, W)")
        if x.shape[1] != self.in_channels or any(n % self.divisor for n in x.shape[2:]):
            raise InputError(
                f"UNet3D: expected (B, {self.in_channels}, D, H, W) with D, H, W divisible by {self.divisor}, "
                f"got {tuple(x.shape)}"
            )
        feats = [x]
        for block in self.down:
            feats.append(block(feats[-1]))
        h = feats.pop()
        for block in self.up:
            h = F.interpolate(block(h), scale_factor=2, mode="nearest")
            h = torch.cat([h, feats.pop()], dim=1)
        for block in self.extra:
            h = block(h)
        return h
