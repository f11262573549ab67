"""Provenance of a benchmark run, recorded in the JSON it writes: the command, the commit and the
machine, with the UTC start and finish (``started``, ``finished``)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def commit() -> str:
    """The checkout's commit (``+uncommitted`` when tracked files other than ``benchmarks/results/``
    differ from it: a batch of runs rewrites earlier results), or ``"unknown"``."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(top,exclude)benchmarks/results"], capture_output=True, text=True, cwd=HERE).stdout.strip()
        return sha + ("+uncommitted" if dirty else "") if sha else "unknown"
    except OSError:
        return "unknown"


def machine(threads: int | None = None) -> dict:
    """Host name, processor, logical CPUs, memory (GiB, from /proc/meminfo where there is one), the
    threads the run used (when given) and the Python / torch versions."""
    import torch

    info = {"host": platform.node(), "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:"))
        info["memory_gib"] = round(kib / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    if threads is not None:
        info["threads"] = threads
    return info


def now() -> str:
    """The UTC time, ISO 8601 to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def record(script: str, argv=None, threads: int | None = None) -> dict:
    """``{"command", "commit", "machine", "started"}`` of a run of ``benchmarks/<script>`` with
    arguments ``argv`` (default: this process's)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return {"command": " ".join(["python", f"benchmarks/{script}", *args]), "commit": commit(),
            "machine": machine(threads), "started": now()}
