"""Peak memory of full-resolution registration (DIR-Lab cases 6-10: 512x512x136, K=6).

    python benchmarks/memory.py --out runs/memory                          # CPU: peak resident memory
    python benchmarks/memory.py --device cuda --out runs/memory_gpu        # GPU: peak allocated memory
    python benchmarks/memory.py --variants per-case --shape 128 128 34 --out runs/memory_pc  # per-case SVI
    python benchmarks/memory.py --smoke --out /tmp/memory                  # tiny, for the test-suite

Each variant runs ``register`` (amortised pass with an untrained network of the default size:
memory does not depend on the weights; posterior-mean fields, inverse maps, warped images, det J,
NMI before/after) in a fresh child process, so peaks do not mix. The ``per-case`` variant runs
``register`` without a network instead (per-case SVI from zero, the package's default settings)
with ``--per-case-steps`` steps at each pyramid level and in the σ phase: every step of a level
needs the same memory, so a few steps give the peak of the full fit in a fraction of its time.
The breathing phantom is made once by the parent and read by each child from ``.npy`` files, with
its landmarks and voxel size (2 × 2 × 2.5 mm), which ``register`` is given as a user would (the
landmark report at the end is part of the peak).

Per-case registration of a full-resolution grid computes its steps and ELBO guards a few latent
timepoints at a time (``model.latent_chunk``: one at a time at 512×512×136, K = 6), so its memory
grows linearly with the voxels at a bounded cost per voxel; at that size two steps per phase take
about half an hour on 2 CPU cores.

Reported per variant: the peak, and its ratio to the K input volumes in float32 (the peer that
scales with the problem). GPU: ``torch.cuda.max_memory_allocated`` (tensors only; the CUDA
context and allocator cache come on top, ``max_memory_reserved`` is reported too). CPU: the
child's peak resident set size (``VmHWM``) minus its size just before ``register`` (Python,
torch and the loaded images), i.e. what registration itself added; the same tensors are what a
GPU would hold, but CPU and GPU convolution workspaces differ, so on the CPU it is an estimate of
the GPU figure, not a measurement of it. A child that is killed (out of memory) is reported as such.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: provenance.py
from provenance import now, record  # noqa: E402

VARIANTS = {  # name -> register.window ([] = whole volume in one network pass; None: no network, per-case SVI)
    "tiles 96³": [96, 96, 96],
    "whole volume": [],
    "per-case": None,
}
DEFAULT_VARIANTS = ["tiles 96³", "whole volume"]  # per-case at 512x512x136 takes ~35 min on 2 cores: ask for it


def memory_bytes(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process from /proc/self/status. The peak
    is this program's own: ``ru_maxrss`` would carry the parent's peak across fork and exec."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(spec: dict) -> dict:
    """Runs in the child process: one registration, its peak memory."""
    import torch

    from groupmorph_pyro.config import Config
    from groupmorph_pyro.model import build_guide
    from groupmorph_pyro.registration import register
    from groupmorph_pyro.checks import resolve_device

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = resolve_device(spec["device"])
    images = np.load(spec["images"])
    landmarks = np.load(spec["landmarks"])  # the summary's landmark report is part of the peak (DIR-Lab has landmarks)
    affine = np.asarray(spec["affine"])
    cfg = Config()
    cfg.model.num_timepoints = images.shape[0]
    cfg.model.histogram = spec["histogram"]
    torch.manual_seed(0)
    if spec["window"] is None:  # per-case SVI from zero, a few steps per phase (the peak of each is per step)
        guide = None
        steps = spec["per_case_steps"]
        cfg.register.steps = cfg.register.coarse_steps = steps
    else:
        cfg.register.window = list(spec["window"])
        guide = build_guide(cfg.model)
    before = memory_bytes("VmRSS") if device.type == "cpu" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    res = register(images, cfg, guide, device=device, landmarks=landmarks, affine=affine)
    wall = time.perf_counter() - start
    out = {"wall_seconds": wall, "fields_seconds": res.summary["seconds"]}
    fit = res.summary.get("finetune")
    if fit:  # per-case: where the time went (coarse levels, full-resolution steps and guards, σ phase)
        out["phase_seconds"] = {"levels": [level["seconds"] for level in fit.get("levels", [])],
                                "full_resolution": fit["seconds"], "full_resolution_guards": fit["guard_seconds"],
                                "sigma_phase": fit.get("scale_phase", {}).get("seconds")}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    else:
        peak = memory_bytes("VmHWM")
        out["peak_gib"] = (peak - before) / 2**30
        out["process_peak_gib"] = peak / 2**30
    return out


def run_variant(args, images_path: Path, window: list) -> dict:
    spec = {"images": str(images_path), "landmarks": str(images_path.with_name("landmarks.npy")),
            "affine": args.affine, "window": window, "device": args.device, "threads": args.threads,
            "histogram": args.histogram, "per_case_steps": args.per_case_steps}
    return run_child(__file__, spec)


def run_child(script: str, spec: dict) -> dict:
    """Run ``script --child SPEC`` in a fresh Python process and return the JSON of its last stdout line,
    or ``{"failed": why, "returncode": rc}`` (a process killed by the kernel reads as out of memory)."""
    proc = subprocess.run([sys.executable, script, "--child", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        killed = proc.returncode < 0 or "out of memory" in proc.stderr.lower()
        return {"failed": "killed (out of memory?)" if killed else "; ".join(proc.stderr.strip().splitlines()[-1:]),
                "returncode": proc.returncode}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--shape", type=int, nargs=3, default=[512, 512, 136], help="grid (D H W)")
    p.add_argument("--timepoints", type=int, default=6)
    p.add_argument("--histogram", default="gaussian", choices=["gaussian", "bspline", "quadratic"], help="model.histogram")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    p.add_argument("--per-case-steps", type=int, default=2, help="per-case variant: SVI steps per phase (>= 1)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    if not args.out:
        p.error("--out is required")
    if args.per_case_steps < 1:
        p.error(f"--per-case-steps: expected an integer >= 1, got {args.per_case_steps}")
    if args.smoke:
        args.shape, args.timepoints = [32, 32, 24], 3
        variants = {"tiles 16³": [16, 16, 16], "whole volume": [], "per-case": None}
    else:
        variants = {name: VARIANTS[name] for name in args.variants}
    from groupmorph_pyro.files import write_json
    from groupmorph_pyro.synthetic import breathing_phantom

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    group = breathing_phantom(tuple(args.shape), args.timepoints, seed=1, num_landmarks=10)
    input_gib = group.images.astype(np.float32).nbytes / 2**30
    report = {**record("memory.py", argv, args.threads), "device": args.device, "shape": list(args.shape),
              "timepoints": args.timepoints, "histogram": args.histogram, "input_gib": input_gib,
              "per_case_steps": args.per_case_steps, "variants": {}}
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        images_path = Path(tmp) / "images.npy"
        np.save(images_path, group.images.astype(np.float32))
        np.save(images_path.with_name("landmarks.npy"), group.landmarks)
        args.affine = np.asarray(group.affine).tolist()
        del group
        for name, window in variants.items():
            r = run_variant(args, images_path, window)
            if "peak_gib" in r:
                r["peak_over_input"] = r["peak_gib"] / input_gib
            report["variants"][name] = r
    report["finished"] = now()
    write_json(out / "memory.json", report)
    what = "peak allocated GPU memory" if args.device.startswith("cuda") else "peak resident memory added by register (CPU)"
    print(f"K={args.timepoints}, {'x'.join(map(str, args.shape))}, {args.histogram} histogram, inputs {input_gib:.2f} GiB; "
          f"{what}")
    print("\n| network pass (per-case: no network) | peak (GiB) | peak / inputs | fields (s) | whole call (s) |\n"
          "| --- | --- | --- | --- | --- |")
    for name, r in report["variants"].items():
        if "failed" in r:
            print(f"| {name} | failed: {r['failed']} | | | |")
        else:
            print(f"| {name} | {r['peak_gib']:.2f} | {r['peak_over_input']:.1f}x | {r['fields_seconds']:.1f} | "
                  f"{r['wall_seconds']:.1f} |")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
