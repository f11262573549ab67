"""Memory before work: the peak resident memory a ``groupmorph register`` run will need, estimated from
the grid, K and the path it will take, against what this machine (or its container) can give it.

The estimate adds the stages' measured costs per voxel (``benchmarks/memory_estimate.py`` measures
them on the CPU: the whole process's peak resident memory of ``groupmorph register``):

* the process itself (Python, torch, Pyro, the package): :data:`BASE_BYTES`;
* the K input images and their normalised copy, float32: 8 bytes per voxel and timepoint;
* the largest of the stages that follow:

  - per-case fit on the image grid (grids within ``register.fit_voxels``): the autograd graph of
    a step, :data:`FIT_BYTES` per voxel and timepoint;
  - per-case fit on a control grid (larger grids): the same per control-grid voxel, plus the
    sampled likelihood's points (:data:`POINT_BYTES` per point and timepoint);
  - the outputs, one timepoint at a time (:class:`~groupmorph_pyro.outputs.FolderWriter`): the K
    warped images NMI is computed on (4 bytes per voxel and timepoint) and one timepoint's maps,
    conversions and det J, :data:`OUTPUT_BYTES` per voxel;
  - posterior samples: :data:`SAMPLE_BYTES` per voxel, timepoint and sample.

The network path (``--checkpoint``) is not estimated here: its peak depends on the network's width
and the tiles, and :func:`estimate_peak` refuses to guess it.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from .checks import InputError, check_integer, check_spatial_shape
from .config import Config
from .spatial import control_factor, level_shape

__all__ = ["estimate_peak", "available_memory", "check_memory", "check_files", "BASE_BYTES", "FIT_BYTES", "POINT_BYTES",
           "OUTPUT_BYTES", "SAMPLE_BYTES"]

GIB = 2**30
BASE_BYTES = 450_000_000
"""The process's own resident memory besides the stages (bytes): Python, torch, Pyro, the package and
the runtime's buffers."""
FIT_BYTES = 262
"""A per-case SVI step's peak per latent-grid voxel and timepoint (bytes): fields, integration,
warps, histograms and their autograd graph."""
POINT_BYTES = 150
"""A sampled likelihood's cost per random point and timepoint (bytes), on a control grid."""
OUTPUT_BYTES = 100
"""One timepoint's full-resolution outputs at a time, per voxel (bytes): its map or inverse map
(3 × float32), the world and ITK conversions written from it, the warps and det J."""
SAMPLE_BYTES = 110
"""Posterior samples, per voxel, timepoint and sample (bytes): each sample's maps and det J, their
float64 moments and the warped images."""


def estimate_peak(shape, num_timepoints: int, config: Config | None = None, samples: int = 0,
                  network: bool = False) -> dict:
    """The peak resident memory (bytes) of registering K images on ``shape`` ``(D, H, W)`` with
    ``config`` (default: the package defaults) per case from zero, with ``samples`` posterior samples.

    Returns ``{"bytes": peak, "stages": {stage: bytes}, "path": "image grid" | "control grid 1/f"}``
    (``stages``: the base, the inputs and each stage's own bytes; the peak is the base plus the
    inputs plus the largest stage)."""
    shape = check_spatial_shape(shape)
    k = check_integer("num_timepoints", num_timepoints, 2)
    samples = check_integer("samples", samples, 0)
    if network:
        raise InputError("estimate_peak: the network path (--checkpoint) has no estimate; measure it with "
                         "benchmarks/memory.py")
    config = config or Config()
    voxels = math.prod(shape)
    factor = control_factor(shape, config.register.fit_voxels)
    stages = {"base": BASE_BYTES, "inputs": 8 * k * voxels}
    if factor == 1:
        stages["fit"] = FIT_BYTES * k * voxels
        path = "image grid"
    else:
        grid = math.prod(level_shape(shape, factor))
        stages["fit"] = FIT_BYTES * k * grid + POINT_BYTES * k * config.register.sample_points
        path = f"control grid 1/{factor}"
    stages["outputs"] = 4 * k * voxels + OUTPUT_BYTES * voxels
    if samples:
        stages["samples"] = SAMPLE_BYTES * k * voxels * samples
    work = max(v for name, v in stages.items() if name not in ("base", "inputs"))
    return {"bytes": int(stages["base"] + stages["inputs"] + work), "stages": stages, "path": path}


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory() -> int | None:
    """The memory (bytes) this process can grow to: the smaller of ``MemAvailable`` (``/proc/meminfo``)
    plus what it already holds (at most ``MemTotal``), and its cgroup's limit (v2 ``memory.max`` or v1
    ``memory.limit_in_bytes``) less what the rest of the cgroup holds. None where neither is known."""
    own = 0
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        own = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
    except (OSError, StopIteration, ValueError):
        pass
    limits = []
    try:
        meminfo = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith(("MemAvailable:", "MemTotal:"))}
        limits.append(min(meminfo["MemAvailable"] + own, meminfo["MemTotal"]))  # shared pages count in both
    except (OSError, KeyError, ValueError):
        pass
    cgroup = _cgroup_dir()
    if cgroup is not None:
        for limit_file, usage_file in (("memory.max", "memory.current"), ("memory.limit_in_bytes", "memory.usage_in_bytes")):
            limit = _read_int(cgroup / limit_file)
            if limit is not None and limit < 2**60:  # v1 writes a huge number for "no limit"
                usage = _read_int(cgroup / usage_file) or own
                limits.append(limit - max(0, usage - own))
                break
    return min(limits) if limits else None


def _cgroup_dir() -> Path | None:
    """This process's memory cgroup folder (``/sys/fs/cgroup/...``), or None."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers in ("", "memory") or "memory" in controllers.split(","):
            for root in (Path("/sys/fs/cgroup") / rel.lstrip("/"), Path("/sys/fs/cgroup/memory") / rel.lstrip("/"),
                         Path("/sys/fs/cgroup")):
                if (root / "memory.max").is_file() or (root / "memory.limit_in_bytes").is_file():
                    return root
    return None


def check_memory(shape, num_timepoints: int, config: Config | None = None, samples: int = 0,
                 available: int | None = None, what: str = "this group") -> dict:
    """Refuse (:class:`InputError`, one line with both numbers and what would fit) when
    :func:`estimate_peak` exceeds ``available`` (default :func:`available_memory`; unknown: no
    check). Returns the estimate."""
    estimate = estimate_peak(shape, num_timepoints, config, samples)
    available = available_memory() if available is None else available
    if available is None or estimate["bytes"] <= available:
        return estimate
    hints = []
    if samples:
        fit = estimate_peak(shape, num_timepoints, config, 0)["bytes"]
        most = max(0, int((available - fit) / max(1, estimate["stages"]["samples"] / samples)))
        hints.append(f"--samples {min(most, samples - 1)}" if fit <= available else "no --samples")
    smaller = [f for f in range(2, 9) if estimate_peak(level_shape(shape, f), num_timepoints, config)["bytes"] <= available]
    if smaller:
        hints.append(f"images resampled {smaller[0]}x coarser (about {'x'.join(map(str, level_shape(shape, smaller[0])))})")
    hints.append("fewer timepoints per group" if num_timepoints > 2 else "a machine with more memory")
    raise InputError(f"{what} ({'x'.join(map(str, shape))}, K={num_timepoints}"
                     f"{f', {samples} samples' if samples else ''}) needs about {estimate['bytes'] / GIB:.1f} GiB, "
                     f"{available / GIB:.1f} GiB available: would fit with {' or '.join(hints)}; --force runs it anyway")


def check_files(paths, config: Config | None = None, samples: int = 0, what: str = "this group") -> dict:
    """:func:`check_memory` of a group given as its K image files, read from the first file's header
    only (no image is read)."""
    from .volumes import read_grid

    return check_memory(read_grid(paths[0])[0], len(paths), config, samples, what=what)
