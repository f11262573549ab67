"""Input validation helpers shared by every layer.

Each helper raises :class:`InputError` (a ``ValueError``) whose message names the expected and the
actual value, so a user sees e.g. ``disp: expected shape (B, 3, D, H, W), got (2, 2, 8, 8)``.
Also the device resolution and the name registry that several layers share. This module imports
nothing from the rest of the package.
"""
from __future__ import annotations

import inspect
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
    check_finite(name, x)
    return x


def check_finite(name: str, x: torch.Tensor) -> torch.Tensor:
    """Check that every entry of the tensor ``x`` is finite (no NaN or inf); returns ``x``.

    A tensor that passed stays marked until it is changed in place (its version counter moves), so
    a model that checks the same full-resolution images at every optimisation step reads them once.
    Views and copies are new tensors and are checked again. Writes through ``x.data`` bypass the
    version counter: check such a tensor with ``torch.isfinite`` directly.
    """
    version = _version(x)
    if version is not None and getattr(x, "_groupmorph_finite_version", None) == version:
        return x
    flat = x.reshape(-1) if x.is_contiguous() else x  # a view: read in pieces, so the test's temporaries stay small
    pieces = range(0, flat.numel(), _FINITE_PIECE) if flat.dim() == 1 else [None]
    if not all(bool(torch.isfinite(flat if i is None else flat[i:i + _FINITE_PIECE]).all()) for i in pieces):
        bad = int((~torch.isfinite(x)).sum())
        raise InputError(f"{name}: expected finite values, got {bad} NaN/inf entries")
    if version is not None:
        try:
            x._groupmorph_finite_version = version
        except (AttributeError, RuntimeError):  # a tensor type that takes no attributes: checked each time
            pass
    return x


_FINITE_PIECE = 1 << 24  # entries per piece of check_finite (torch.isfinite makes an |x| copy of what it reads)


def _version(x: torch.Tensor):
    """The in-place version counter of ``x``, or None where it has none (inference-mode tensors)."""
    try:
        return x._version
    except RuntimeError:
        return None


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


def check_fraction(name: str, value) -> float:
    """Check a number is a fraction in [0, 1) (not a bool); returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise InputError(f"{name}: expected a fraction in [0, 1), got {value!r}")
    return float(value)


def check_integer(name: str, value, minimum: int = 0) -> int:
    """Check a count is a whole number >= ``minimum`` (not a bool); returns it as an int."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < minimum:
        raise InputError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def check_bool(name: str, value) -> bool:
    """Check a switch is ``True`` or ``False`` (not 0 / 1 or a string); returns it."""
    if not isinstance(value, bool):
        raise InputError(f"{name}: expected True or False, got {value!r}")
    return value


def check_spatial_shape(shape: Sequence[int], name: str = "spatial_shape", minimum: int = 1) -> tuple[int, int, int]:
    """Check a 3D grid size (D, H, W): three integers >= ``minimum``."""
    try:
        s = tuple(int(v) for v in shape)
    except TypeError as exc:
        raise InputError(f"{name}: expected 3 integers (D, H, W), got {shape!r}") from exc
    if len(s) != 3 or any(v < minimum for v in s) or any(int(v) != v for v in shape):
        raise InputError(f"{name}: expected 3 integers >= {minimum} (D, H, W), got {tuple(shape)!r}")
    return s


def resolve_device(name) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else is passed to ``torch.device``
    (a CUDA device on a machine without CUDA is an error)."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"device: expected 'auto', 'cpu' or 'cuda[:N]', got {name!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device: {name!r} requested but CUDA is not available on this machine")
    return dev


class Registry:
    """Named building blocks of one kind (priors, similarities), each entry owning its options.

    An entry is a callable whose leading ``positional`` parameters are supplied by the caller
    (e.g. the grid shape and device for a prior, the two images for a similarity) and whose
    keyword parameters, with their defaults, are the entry's options (what a config's
    ``*_options`` mapping may set). Adding a named entry is one ``@REGISTRY.register("name")``.

    Args:
        kind: what the entries are, for messages (e.g. ``"prior"``).
        positional: names of the leading parameters the caller supplies.
    """

    def __init__(self, kind: str, positional: Sequence[str]):
        self.kind, self.positional, self._entries = kind, tuple(positional), {}

    def register(self, name: str):
        """Decorator: add ``fn`` under ``name`` (a name may be registered once)."""
        def add(fn):
            if name in self._entries:
                raise InputError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = fn
            return fn
        return add

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self):
        """``(name, entry)`` pairs in registration order."""
        return self._entries.items()

    def get(self, name: str):
        """The entry ``name``; unknown names are an error listing the known ones."""
        if name not in self._entries:
            raise InputError(f"{self.kind}: expected one of {list(self._entries)}, got {name!r}")
        return self._entries[name]

    def options(self, name: str) -> dict:
        """The entry's options and their defaults (its keyword parameters)."""
        params = list(inspect.signature(self.get(name)).parameters.values())[len(self.positional):]
        return {p.name: p.default for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    def check_options(self, name: str, options: dict, where: str = "") -> dict:
        """Fail unless every key of ``options`` is an option of entry ``name``; returns ``options``."""
        if not isinstance(options, dict):
            raise InputError(f"{where or self.kind + '_options'}: expected a mapping of option: value, "
                             f"got {type(options).__name__}")
        allowed = self.options(name)
        bad = sorted(set(options) - set(allowed))
        if bad:
            raise InputError(f"{where or self.kind + '_options'}: {self.kind} {name!r} has no option(s) {bad}; "
                             f"its options are {allowed}")
        return options


def check_arity(name: str, fn, n: int, signature: str) -> None:
    """Fail clearly unless ``fn`` can be called with ``n`` positional arguments (user callables:
    priors, likelihoods, similarities), naming the expected ``signature`` and the actual one."""
    try:
        inspect.signature(fn).bind(*range(n))
    except TypeError as exc:
        raise InputError(f"{name}: expected a callable with signature {signature}, got {_describe(fn)} ({exc})") from exc
    except ValueError:  # builtins without signature: accept
        pass


def _describe(fn) -> str:
    try:
        return f"{getattr(fn, '__name__', type(fn).__name__)}{inspect.signature(fn)}"
    except (TypeError, ValueError):
        return repr(fn)
