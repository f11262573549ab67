"""The memory check's estimate against the measured peak of ``groupmorph register``.

    python benchmarks/memory_estimate.py --cases 64x64x48:6 128x128x68:6 256x256x96:6 64x64x48:4:10 --out runs/memory-estimate
    python benchmarks/memory_estimate.py --cases 32x32x24:3 --steps 1 --out /tmp/me   # tiny, for the test-suite

Each case (``DxHxW:K`` or ``DxHxW:K:S`` with S posterior samples) is a breathing phantom (seed 1,
2 × 2 × 2.5 mm) written as K NIfTI files; ``groupmorph register`` runs on them in a child process
with the package defaults except ``--steps`` steps per phase (every step of a phase needs the same
memory, so the peak is the full run's in a fraction of its time), the QC page included. The
child's peak resident set size (its ``VmHWM``, read by the child itself as it exits: the program's
own peak, not the size it had when forked from this one) is compared with
:func:`groupmorph_pyro.memory.estimate_peak` for the same grid, K, config and samples.
Writes ``memory_estimate.json`` (rows: case, path, measured and estimated GiB, estimate / measured).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: provenance.py
from provenance import now, record  # noqa: E402

GIB = 2**30


def parse_case(text: str) -> tuple:
    """``"DxHxW:K[:S]"`` -> ``((D, H, W), K, S)``."""
    try:
        parts = text.split(":")
        shape = tuple(int(n) for n in parts[0].split("x"))
        k, samples = int(parts[1]), int(parts[2]) if len(parts) > 2 else 0
    except (IndexError, ValueError):
        raise SystemExit(f"--cases: expected DxHxW:K or DxHxW:K:S, got {text!r}") from None
    if len(shape) != 3 or len(parts) > 3:
        raise SystemExit(f"--cases: expected DxHxW:K or DxHxW:K:S, got {text!r}")
    return shape, k, samples


def measure(shape, k: int, samples: int, steps: int, work: Path, threads: int) -> dict:
    """Peak resident memory (bytes) and wall seconds of ``groupmorph register`` on a phantom."""
    import time

    from groupmorph_pyro.synthetic import breathing_phantom
    from groupmorph_pyro.volumes import save_nifti

    g = breathing_phantom(shape, k, seed=1)
    paths = []
    for i in range(k):
        paths.append(str(work / f"t{i}.nii"))
        save_nifti(paths[-1], g.images[i], g.affine)
    del g
    config = work / "steps.yaml"
    config.write_text(yaml.safe_dump({"register": {"steps": steps, "coarse_steps": steps, "sample_steps": steps}}))
    peak = work / "peak.txt"
    argv = [sys.executable, "-c", CHILD, str(peak), "register", *paths, "--out", str(work / "out"),
            "--config", str(config), "--quiet", "--samples", str(samples), "--force"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    run = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if run.returncode != 0:
        raise SystemExit(f"groupmorph register failed on {shape}, K={k}:\n{run.stdout}")
    return {"peak_bytes": int(peak.read_text()), "wall_seconds": time.perf_counter() - start}


CHILD = """
import atexit, sys
from pathlib import Path
def peak():
    hwm = next(line for line in open('/proc/self/status') if line.startswith('VmHWM:'))
    Path(sys.argv[1]).write_text(str(int(hwm.split()[1]) * 1024))
atexit.register(peak)
from groupmorph_pyro.cli import main
sys.exit(main(sys.argv[2:]))
"""
"""The child: ``groupmorph`` with the given arguments, writing its peak resident bytes to argv[1] as it exits."""


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", required=True, help="DxHxW:K or DxHxW:K:S (S posterior samples)")
    p.add_argument("--steps", type=int, default=2, help="steps per phase (coarse levels, full resolution, sampled)")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the child")
    p.add_argument("--out", required=True, help="output folder (memory_estimate.json)")
    args = p.parse_args(argv)
    cases = [parse_case(c) for c in args.cases]
    from groupmorph_pyro.config import Config
    from groupmorph_pyro.memory import estimate_peak

    report = record("memory_estimate.py", argv, threads=args.threads)
    rows = []
    for shape, k, samples in cases:
        cfg = Config()
        cfg.register.steps = cfg.register.coarse_steps = cfg.register.sample_steps = args.steps
        estimate = estimate_peak(shape, k, cfg, samples)
        with tempfile.TemporaryDirectory() as tmp:
            run = measure(shape, k, samples, args.steps, Path(tmp), args.threads)
        row = {"case": f"{'x'.join(map(str, shape))}:{k}" + (f":{samples}" if samples else ""), "shape": list(shape),
               "timepoints": k, "samples": samples, "voxels": int(shape[0] * shape[1] * shape[2]),
               "path": estimate["path"], "measured_gib": run["peak_bytes"] / GIB,
               "estimated_gib": estimate["bytes"] / GIB, "estimate_over_measured": estimate["bytes"] / run["peak_bytes"],
               "stages_gib": {n: v / GIB for n, v in estimate["stages"].items()}, "wall_seconds": run["wall_seconds"]}
        rows.append(row)
        print(f"{row['case']:>20} {row['path']:>16}: measured {row['measured_gib']:.2f} GiB, estimated "
              f"{row['estimated_gib']:.2f} GiB ({row['estimate_over_measured']:.2f}x), {run['wall_seconds']:.0f} s", flush=True)
    report.update(rows=rows, finished=now())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory_estimate.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
