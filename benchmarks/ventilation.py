"""Ventilation (local volume change, det J − 1) against a known truth, GroupMorph beside Elastix and ANTs.

    python benchmarks/ventilation.py --out benchmarks/results/ventilation
    python benchmarks/ventilation.py --methods groupmorph --shape 48 48 40 --out /tmp/vent   # quick

A breathing phantom (``synthetic.breathing_phantom``, K phases, phase 0 the reference: its velocity is
0) has a known map from phase 0 to the last phase J, ``ψ_J⁻¹ = exp(−v_J)``, and back, ``ψ_J``; their
``det J − 1`` (on phase 0's and phase J's grid) are the truth. Each method registers the group
all-to-one (fixed 0) with its defaults, and the same code (``derived.ventilation``, the map
``φ_to ∘ φ_from⁻¹``) turns its fields into a ventilation map each way. Inside the lungs (dark voxels
enclosed by the body in the noise-free source phase) the script reports the mean
of each map against the truth's, the mean absolute error, the correlation with the truth, the
landmark error (mm) and the wall seconds. Writes ``ventilation.json`` (command, commit, machine, rows).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import now, record  # noqa: E402

METHODS = ("groupmorph", "elastix", "ants")


def lung_mask(image: np.ndarray) -> np.ndarray:
    """Dark voxels enclosed by the body: below the midpoint of the 1st and 99th percentiles, inside the
    body's filled outline."""
    from scipy.ndimage import binary_fill_holes

    lo, hi = np.percentile(image, [1, 99])
    body = image > (lo + hi) / 2
    return binary_fill_holes(body) & ~body


def truth_map(velocity: np.ndarray, sign: float) -> np.ndarray:
    """det J − 1 of ``exp(sign · v)``, float64: sign −1, phase 0's tissue carried to the phase of
    velocity v (on phase 0's grid); +1, that phase's tissue carried back to phase 0 (on its grid)."""
    from groupmorph_pyro.spatial import integrate_velocity, jacobian_determinant

    field = integrate_velocity(sign * torch.from_numpy(velocity[None]).double())
    return jacobian_determinant(field)[0].numpy() - 1.0


def register_with(method: str, images: np.ndarray, spacing, threads: int):
    """``(RegistrationResult, seconds)`` of one method, all-to-one with phase 0 fixed."""
    from groupmorph_pyro.baselines import ants_all_to_one, elastix_all_to_one
    from groupmorph_pyro.config import Config
    from groupmorph_pyro.registration import register

    torch.set_num_threads(threads)
    start = time.perf_counter()
    if method == "groupmorph":
        cfg = Config()
        cfg.model.num_timepoints = images.shape[0]
        result = register(images, cfg, affine=np.diag([*spacing, 1.0]))
    elif method == "elastix":
        result = elastix_all_to_one(images, spacing, 0)
    else:
        result = ants_all_to_one(images, spacing, 0)
    return result, time.perf_counter() - start


def score(result, truth: np.ndarray, mask: np.ndarray, source: int, target: int, group) -> dict:
    """Ventilation source -> target of a result's fields against the truth inside the mask (on source's
    grid), and the result's landmark error."""
    from groupmorph_pyro.derived import ventilation
    from groupmorph_pyro.evaluation import landmark_columns
    from groupmorph_pyro.transfer import StoredRegistration

    reg = StoredRegistration("(in memory)", group.affine, result.displacement.astype(np.float64),
                             result.inverse_displacement.astype(np.float64), "all-to-one", 0)
    got = ventilation(reg, source, target)[mask]
    want = truth[mask]
    row = {"mean": float(got.mean()), "truth_mean": float(want.mean()), "truth_sd": float(want.std()),
           "mean_absolute_error": float(np.abs(got - want).mean()), "correlation": float(np.corrcoef(got, want)[0, 1]),
           "sd": float(got.std())}
    lm = landmark_columns(group.landmarks, result.displacement, result.inverse_displacement, group.spacing)
    row.update(landmark_mm=lm["landmark_mm_after"], landmark_mm_identity=lm["landmark_mm_before"])
    return row


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for ventilation.json")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--shape", type=int, nargs=3, default=[80, 80, 64])
    p.add_argument("--timepoints", type=int, default=3)
    p.add_argument("--amplitude", type=float, default=4.0, help="the phantom's peak motion, voxels")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    from groupmorph_pyro.files import write_json
    from groupmorph_pyro.synthetic import breathing_phantom

    stamp = record("ventilation.py", argv, args.threads)
    group = breathing_phantom(tuple(args.shape), args.timepoints, amplitude=args.amplitude, seed=args.seed)
    clean = breathing_phantom(tuple(args.shape), args.timepoints, amplitude=args.amplitude, noise=0.0,
                              seed=args.seed).images
    last = args.timepoints - 1
    directions = [(0, last, lung_mask(clean[0]), truth_map(group.velocities[last], -1.0)),
                  (last, 0, lung_mask(clean[last]), truth_map(group.velocities[last], 1.0))]
    rows = []
    for method in args.methods:
        result, seconds = register_with(method, group.images, group.spacing, args.threads)
        for source, target, mask, truth in directions:
            row = {"method": method, "from": source, "to": target, "seconds": seconds, "mask_voxels": int(mask.sum()),
                   **score(result, truth, mask, source, target, group)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    write_json(out / "ventilation.json", {**stamp, "finished": now(), "case": {
        "phantom": "breathing_phantom", "shape": args.shape, "timepoints": args.timepoints,
        "amplitude": args.amplitude, "seed": args.seed, "spacing": list(group.spacing)}, "rows": rows})
    print("\n| method | from -> to | mean (truth) | MAE | correlation | landmarks mm | seconds |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['method']} | {r['from']} -> {r['to']} | {r['mean']:+.3f} ({r['truth_mean']:+.3f}) | "
              f"{r['mean_absolute_error']:.3f} | "
              f"{r['correlation']:.3f} | {r['landmark_mm']:.3f} | {r['seconds']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
