"""Atomic file writing shared by every layer that writes (NIfTI, JSON, CSV, checkpoints, PNG, netCDF).

A file is written to a temporary name beside its target and renamed over it, so readers never see
a half-written file and a failure leaves the old file (or none). Written files get the usual mode
(``0o666`` less the process umask, e.g. ``-rw-r--r--``), not the private mode of the temporary file.
This module imports nothing from the rest of the package.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "write_json"]


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; restored at once
    os.umask(mask)
    return mask


def atomic_write(path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``
    (atomic on one filesystem); the temporary file is removed on failure. The result gets mode
    ``0o666 & ~umask`` like a file opened for writing by any tool."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    """Write a text file atomically (temporary file + rename)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path, obj) -> None:
    """Write JSON atomically (numpy scalars are written as floats)."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=float) + "\n")
