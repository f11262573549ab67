"""Speed and memory: amortised inference against Elastix, the network's runtime variants (bf16,
channels_last_3d, torch.compile) against fp32 eager, and SVI training steps with the dense Gaussian
and the memory-lean B-spline Parzen histogram, all measured in the same run.

    python benchmarks/speed.py --out runs/speed                                  # CPU: K=6 at 128x128x64
    python benchmarks/speed.py --device cuda --shape 256 256 96 --train-patch 96 --no-elastix --out runs/speed_gpu
    python benchmarks/speed.py --checkpoint runs/groupmorph/last.pt --out runs/speed   # trained network: accuracy too
    python benchmarks/speed.py --smoke --out /tmp/speed                         # tiny, for the test-suite

Prints a markdown table and writes ``speed.json``. Inference time is ``register``'s ``seconds``
(guide network + scaling and squaring, i.e. the posterior-mean fields; median of ``--repeats``
after a warm-up, which also compiles) and, separately, the wall time of the whole call (inverse maps,
warped images, Jacobians, NMI). Each runtime variant is timed the same way; bf16 is left out on the
CPU by default (see benchmarks/README.md). Without ``--checkpoint`` the network is untrained: its time is the real one, its
accuracy is not reported. Memory: CUDA peak allocation on a GPU; on any device, the bytes autograd
saves for one training step (``saved_tensors_hooks``), which is what the histogram choice changes.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: provenance.py
from provenance import now, record  # noqa: E402
from pyro.infer import Trace_ELBO

from groupmorph_pyro.config import Config
from groupmorph_pyro.evaluation import landmark_columns
from groupmorph_pyro.model import build_guide, build_model
from groupmorph_pyro.registration import register
from groupmorph_pyro.synthetic import breathing_phantom
from groupmorph_pyro.checks import resolve_device
from groupmorph_pyro.train import svi_loss


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


VARIANTS = {  # runtime settings of the guide's network (config section `runtime`); fp32 eager is the peer
    "fp32": {},
    "channels_last": {"channels_last": True},
    "compile": {"compile": True},
    "channels_last+compile": {"channels_last": True, "compile": True},
    "bf16": {"precision": "bf16"},
    "bf16+channels_last": {"precision": "bf16", "channels_last": True},
    "bf16+channels_last+compile": {"precision": "bf16", "channels_last": True, "compile": True},
}


def inference(args, device, group, runtime: dict) -> dict:
    if args.checkpoint:
        from groupmorph_pyro.train import load_checkpoint

        cfg, guide, _ = load_checkpoint(args.checkpoint, device)
    else:
        cfg = Config()
        cfg.model.num_timepoints = args.timepoints
        torch.manual_seed(0)
        guide = build_guide(cfg.model)
    if args.window:
        cfg.register.window = list(args.window)
    for key, value in runtime.items():
        setattr(cfg.runtime, key, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # bf16 on the CPU: measured here on purpose
        start = time.perf_counter()
        register(group.images, cfg, guide, device=device)  # warm-up (and compilation)
        first = time.perf_counter() - start
        times, walls = [], []
        _peak_reset(device)
        for _ in range(args.repeats):
            start = time.perf_counter()
            res = register(group.images, cfg, guide, device=device)
            walls.append(time.perf_counter() - start)
            times.append(res.summary["seconds"])
    out = {"seconds": statistics.median(times), "wall_seconds": statistics.median(walls), "first_call_seconds": first,
           "peak_gpu_gib": _peak_gib(device), "trained": bool(args.checkpoint), "runtime": dict(runtime)}
    if args.checkpoint:
        out.update(landmark_columns(group.landmarks, res.displacement, res.inverse_displacement, group.spacing))
    return out


def elastix(args, group) -> dict:
    from groupmorph_pyro.baselines import elastix_all_to_one

    params = {"MaximumNumberOfIterations": [str(args.elastix_iterations)]}
    if args.smoke:
        params["NumberOfResolutions"] = ["1"]
    res = elastix_all_to_one(group.images, group.spacing, 0, params)
    return {"seconds": res.summary["seconds"],
            **landmark_columns(group.landmarks, res.displacement, res.inverse_displacement, group.spacing)}


def _saved_bytes(fn) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def training(args, device, histogram: str, runtime: dict | None = None, downsize: int | None = None) -> dict:
    """SVI steps per second; with the fp32 eager network also the bytes autograd saves (the hooks are
    not used with other runtimes: torch.compile does not trace through them). ``downsize``:
    ``model.integration_downsize`` (None: the package default)."""
    cfg = Config()
    cfg.model.num_timepoints, cfg.model.histogram = args.timepoints, histogram
    if downsize is not None:
        cfg.model.integration_downsize = downsize
    pyro.set_rng_seed(0)
    model, guide = build_model(cfg.model), build_guide(cfg.model).to(device).set_runtime(**(runtime or {}))
    optim = torch.optim.Adam(guide.parameters(), lr=1e-5)
    elbo = Trace_ELBO().differentiable_loss
    x = torch.rand(1, args.timepoints, *(args.train_patch,) * 3, device=device)

    def step():
        optim.zero_grad()
        if runtime:
            loss, saved = svi_loss(elbo, model, guide, x, 0), None
        else:
            loss, saved = _saved_bytes(lambda: svi_loss(elbo, model, guide, x, 0))
        loss.backward()
        optim.step()
        return saved

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # bf16 on the CPU: measured here on purpose
        step()  # warm-up (and compilation)
    _sync(device)
    _peak_reset(device)
    times = []
    for _ in range(args.train_steps):
        start = time.perf_counter()
        saved = step()
        _sync(device)
        times.append(time.perf_counter() - start)
    s = statistics.median(times)
    return {"seconds_per_step": s, "steps_per_second": 1.0 / s,
            "autograd_saved_gib": None if saved is None else saved / 2**30, "peak_gpu_gib": _peak_gib(device),
            "histogram": histogram, "runtime": dict(runtime or {}),
            "integration_downsize": cfg.model.integration_downsize}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--shape", type=int, nargs=3, default=[128, 128, 64], help="inference grid (D H W)")
    p.add_argument("--timepoints", type=int, default=6)
    p.add_argument("--checkpoint", help="trained network (else an untrained one: time only)")
    p.add_argument("--window", type=int, nargs=3, help="tiled inference (register.window)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-elastix", action="store_true")
    p.add_argument("--elastix-iterations", type=int, default=500)
    p.add_argument("--train-patch", type=int, default=48, help="training patch edge (voxels)")
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                   help="network runtime variants to time against fp32 (default: all; on the CPU all but bf16)")
    p.add_argument("--train-variants", nargs="+", choices=list(VARIANTS),
                   help="also time B-spline training steps with these runtimes (default on a GPU: channels_last, "
                        "bf16+channels_last, bf16+channels_last+compile; on the CPU none)")
    p.add_argument("--train-only", action="store_true", help="time the training steps only (no inference, no Elastix)")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.timepoints, args.repeats, args.train_patch, args.train_steps = [24, 24, 16], 3, 1, 16, 1
        args.elastix_iterations = 10
        args.variants = args.variants or ["fp32", "channels_last"]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    group = breathing_phantom(tuple(args.shape), args.timepoints, seed=1, num_landmarks=10 if args.smoke else 75)
    report = {**record("speed.py", argv, args.threads),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "shape": list(args.shape),
              "timepoints": args.timepoints, "train_patch": args.train_patch}
    variants = args.variants or (list(VARIANTS) if device.type == "cuda" else [v for v in VARIANTS if "bf16" not in v])
    if "fp32" not in variants:
        variants = ["fp32", *variants]
    if not args.train_only:
        report["runtime"] = {name: inference(args, device, group, VARIANTS[name]) for name in variants}
        report["groupmorph"] = report["runtime"]["fp32"]
        for r in report["runtime"].values():
            r["speedup_vs_fp32"] = report["groupmorph"]["seconds"] / r["seconds"]
    if not args.no_elastix and not args.train_only:
        report["elastix"] = elastix(args, group)
        report["elastix_over_groupmorph"] = report["elastix"]["seconds"] / report["groupmorph"]["seconds"]
    report["train"] = {h: training(args, device, h) for h in ("gaussian", "bspline")}
    report["train"]["bspline, full-grid integration"] = training(args, device, "bspline", downsize=1)
    train_variants = args.train_variants or (["channels_last", "bf16+channels_last", "bf16+channels_last+compile"]
                                             if device.type == "cuda" else [])
    for name in train_variants:
        if name != "fp32":
            report["train"][f"bspline+{name}"] = training(args, device, "bspline", VARIANTS[name])
    g, b = report["train"]["gaussian"], report["train"]["bspline"]
    report["bspline_speedup"] = g["seconds_per_step"] / b["seconds_per_step"]
    report["bspline_saved_memory_ratio"] = b["autograd_saved_gib"] / g["autograd_saved_gib"]
    report["downsize_speedup"] = report["train"]["bspline, full-grid integration"]["seconds_per_step"] / b["seconds_per_step"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from groupmorph_pyro.files import write_json

    report["finished"] = now()
    write_json(out / "speed.json", report)
    print(f"device: {report['device']} ({report['threads']} threads), torch {report['torch']}")
    if not args.train_only:
        _print_inference(args, report)
    print(f"\n| training step, patch {args.train_patch}³ | s/step | steps/s | autograd saved (GiB) | peak GPU (GiB) |")
    print("| --- | --- | --- | --- | --- |")
    for h, r in report["train"].items():
        peak = "–" if r["peak_gpu_gib"] is None else f"{r['peak_gpu_gib']:.2f}"
        saved = "–" if r["autograd_saved_gib"] is None else f"{r['autograd_saved_gib']:.3f}"
        print(f"| {h} | {r['seconds_per_step']:.3f} | {r['steps_per_second']:.2f} | {saved} | {peak} |")
    print(f"\nB-spline vs Gaussian: {report['bspline_speedup']:.2f}x faster per step, "
          f"{report['bspline_saved_memory_ratio']:.2f}x the saved activations")
    print(f"Squarings on the grid {b['integration_downsize']}x coarser vs the full grid (B-spline): "
          f"{report['downsize_speedup']:.2f}x faster per step")
    return report


def _print_inference(args, report) -> None:
    gm = report["groupmorph"]
    print(f"\n| K={args.timepoints}, {'x'.join(map(str, args.shape))} | seconds | landmarks (mm) |\n| --- | --- | --- |")
    lm = f"{gm['landmark_mm_after']:.2f}" if "landmark_mm_after" in gm else "(untrained)"
    print(f"| GroupMorph amortised (fields) | {gm['seconds']:.2f} | {lm} |")
    print(f"| GroupMorph amortised (all outputs) | {gm['wall_seconds']:.2f} | |")
    if "elastix" in report:
        print(f"| Elastix B-spline NMI | {report['elastix']['seconds']:.1f} | {report['elastix']['landmark_mm_after']:.2f} |")
        print(f"\nElastix / GroupMorph time: {report['elastix_over_groupmorph']:.0f}x")
    print(f"\n| network runtime (posterior-mean fields) | seconds | vs fp32 | first call (s) | peak GPU (GiB) |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in report["runtime"].items():
        peak = "–" if r["peak_gpu_gib"] is None else f"{r['peak_gpu_gib']:.2f}"
        print(f"| {name} | {r['seconds']:.3f} | {r['speedup_vs_fp32']:.2f}x | {r['first_call_seconds']:.1f} | {peak} |")


if __name__ == "__main__":
    main(sys.argv[1:])
