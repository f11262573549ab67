"""Input validation helpers shared by every layer.

Each helper raises :class:`InputError` (a ``ValueError``) whose message names the expected and the
actual value, so a user sees e.g. ``disp: expected shape (B, 3, D, H, W), got (2, 2, 8, 8)``.
This module imports nothing from the rest of the package.
"""
from __future__ import annotations

from typing import Sequence

import torch


class InputError(ValueError):
    """Bad user input (shape, spacing, K, dtype, NaN, file). The CLI maps it to exit code 2."""


def check_tensor(name: str, x, ndim: int | None = None, layout: str = "") -> torch.Tensor:
    """Check that ``x`` is a floating-point tensor with ``ndim`` dimensions and finite values.

    Args:
        name: argument name used in the message.
        x: the value to check.
        ndim: expected number of dimensions (None: any).
        layout: human-readable layout, e.g. ``"(B, 3, D, H, W)"``, shown in messages.
    Returns:
        ``x`` unchanged.
    """
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name}: expected a torch.Tensor {layout}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputError(f"{name}: expected a floating-point dtype, got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise InputError(f"{name}: expected shape {layout or f'with {ndim} dims'}, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise InputError(f"{name}: expected finite values, got {bad} NaN/inf entries")
    return x


def check_spacing(spacing: Sequence[float], name: str = "spacing") -> tuple[float, float, float]:
    """Check a voxel spacing: three positive finite numbers (mm). Returns it as a float tuple."""
    try:
        s = tuple(float(v) for v in spacing)
    except TypeError as exc:
        raise InputError(f"{name}: expected 3 positive numbers (mm), got {spacing!r}") from exc
    if len(s) != 3 or not all(v > 0 and v < float("inf") for v in s):
        raise InputError(f"{name}: expected 3 positive finite numbers (mm), got {spacing!r}")
    return s


def check_positive(name: str, value, allow_zero: bool = False) -> float:
    """Check a scalar hyper-parameter is a finite number > 0 (or >= 0 with ``allow_zero``)."""
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name}: expected a number, got {value!r}") from exc
    ok = v >= 0 if allow_zero else v > 0
    if not ok or v != v or v == float("inf"):
        bound = ">= 0" if allow_zero else "> 0"
        raise InputError(f"{name}: expected a finite number {bound}, got {value!r}")
    return v


def check_spatial_shape(shape: Sequence[int], name: str = "spatial_shape", minimum: int = 1) -> tuple[int, int, int]:
    """Check a 3D grid size (D, H, W): three integers >= ``minimum``."""
    try:
        s = tuple(int(v) for v in shape)
    except TypeError as exc:
        raise InputError(f"{name}: expected 3 integers (D, H, W), got {shape!r}") from exc
    if len(s) != 3 or any(v < minimum for v in s) or any(int(v) != v for v in shape):
        raise InputError(f"{name}: expected 3 integers >= {minimum} (D, H, W), got {tuple(shape)!r}")
    return s
