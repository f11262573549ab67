"""Calibration of the posterior on synthetic groups with known motion.

For each likelihood weight β: register the breathing phantom by per-case SVI, draw S posterior
samples of every field, and report how often the true displacement component lies inside the
central 90% posterior interval (coverage; 0.90 = honest), over all voxels, inside the moving
(lung) region and outside it (static), inside the anatomy and in the background (air around the
body, intensity below ``BACKGROUND`` in every timepoint), together with the mean's error in the
moving and static regions and the landmark error. All-to-one with fixed timepoint 0, whose true
map is the identity, so the truth for timepoint k is exp(−v_k).

    python benchmarks/calibration.py --betas 1 5 20 --samples 40                 # the package defaults
    python benchmarks/calibration.py --betas 5 --set covariance=diagonal          # a register setting
    python benchmarks/calibration.py --betas 5 --model prior=laplacian histogram=gaussian  # the paper's prior
    python benchmarks/calibration.py --betas 5 --group-seed 2 --timepoints 6               # another phantom

``--out`` writes ``{"command", "commit", "machine", "started", "finished", "rows"}``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: provenance.py
from provenance import now, record  # noqa: E402
from settings import key_values  # noqa: E402

from groupmorph_pyro.checks import InputError
from groupmorph_pyro.config import Config
from groupmorph_pyro.files import write_json
from groupmorph_pyro.posterior import sample_posterior
from groupmorph_pyro.registration import infer, prepare, refine
from groupmorph_pyro.metrics import landmark_distances, summarize_distances
from groupmorph_pyro.spatial import integrate_velocity
from groupmorph_pyro.synthetic import breathing_phantom


BACKGROUND = 0.05
"""Intensity below which a voxel of every timepoint is background (the phantom's air is 0, its tissue ≥ 0.1)."""


def coverage(samples: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor, level: float = 0.9) -> float:
    """Fraction of (timepoint, component, voxel in mask) where truth lies in the central interval."""
    lo = torch.quantile(samples, (1 - level) / 2, dim=0)
    hi = torch.quantile(samples, 1 - (1 - level) / 2, dim=0)
    inside = (truth >= lo) & (truth <= hi)  # (K, 3, D, H, W)
    return float(inside[..., mask].double().mean())


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--betas", type=float, nargs="+", default=[1.0, 5.0, 20.0])
    p.add_argument("--samples", type=int, default=40)
    p.add_argument("--steps", type=int, help="full-resolution SVI steps (default: register.steps)")
    p.add_argument("--seed", type=int, default=0, help="seeds Pyro's random streams before each β (reproducible rows)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="register settings on top of the defaults, e.g. covariance=diagonal lr=0.5")
    p.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE",
                   help="model settings on top of the defaults, e.g. prior=laplacian histogram=gaussian")
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--group-seed", type=int, default=1, help="the phantom's seed (1: the group the defaults are set on)")
    p.add_argument("--timepoints", type=int, default=4, help="K, the phantom's timepoints")
    p.add_argument("--out", help="write the rows, with the command, commit and machine, as JSON here")
    args = p.parse_args(argv)

    def config(beta: float) -> Config:
        register = {} if args.steps is None else {"steps": args.steps}
        register.update(key_values(args.set))
        model = {"num_timepoints": args.timepoints, "beta": beta, **key_values(args.model)}
        return Config.from_dict({"model": model, "register": register}, "--set")

    try:  # every setting checked before any registration
        if args.timepoints < 2:
            raise InputError(f"--timepoints: expected an integer >= 2, got {args.timepoints}")
        configs = [config(beta) for beta in args.betas]
    except InputError as err:
        p.error(str(err))
    stamp = record("calibration.py", argv)

    g = breathing_phantom((args.size,) * 3, args.timepoints, seed=args.group_seed)
    truth = integrate_velocity(-torch.from_numpy(g.velocities))[1:]  # (K-1, 3, D, H, W), timepoints 1..K-1
    moving = truth.norm(dim=1).amax(0) > 0.5  # voxels that move more than half a voxel somewhere
    truth = truth.double()
    everywhere, static = torch.ones_like(moving), ~moving
    background = torch.from_numpy(g.images.max(0) < BACKGROUND)  # air around the body in every timepoint
    rows = []
    for beta, cfg in zip(args.betas, configs):
        pyro.set_rng_seed(args.seed)
        group = prepare(g.images, cfg, fixed=0, affine=g.affine)  # the phantom's voxel size (the prior's weights are per mm)
        posterior, info = refine(group, infer(group))
        model, guide = group.model, posterior.guide
        draws = sample_posterior(model, guide, group.x, 0, args.samples)
        disp = draws["displacement"][:, 0, 1:].double()  # (S, K-1, 3, D, H, W)
        error = (disp.mean(0) - truth).abs()  # the draws' mean against the truth, per component
        with torch.no_grad():
            mean_loc, _ = guide.distribution_params()
            transform = model.transform(0)
            d, inv = transform.displacements(mean_loc)[0], transform.inverse_displacements(mean_loc)[0]
        lm = summarize_distances(landmark_distances(g.landmarks, d, inv, g.spacing))
        row = {"beta": beta, "set": args.set, "group_seed": args.group_seed, "timepoints": args.timepoints,
               "model": {"prior": cfg.model.prior, "histogram": cfg.model.histogram}, "coverage90_all": coverage(disp, truth, everywhere),
               "coverage90_moving": coverage(disp, truth, moving),
               "coverage90_static": coverage(disp, truth, static),
               "coverage90_anatomy": coverage(disp, truth, ~background),
               "coverage90_background": coverage(disp, truth, background),
               "background_fraction": float(background.double().mean()),
               "mean_sd_voxels": float(disp.std(0).mean()),
               "mean_error_voxels_moving": float(error[..., moving].mean()),
               "mean_error_voxels_static": float(error[..., static].mean()), "landmark_mm": lm["mean_mm"],
               "elbo_loss_per_voxel": info["elbo_loss_after"],
               "covariance": info.get("scale_phase", {}).get("covariance", "diagonal")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| β | coverage of 90% interval (all voxels) | (moving) | (static) | (anatomy) | (background) | "
          "mean posterior sd (voxels) | mean's error moving / static (voxels) | landmark mm |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['beta']:g} | {r['coverage90_all']:.3f} | {r['coverage90_moving']:.3f} | {r['coverage90_static']:.3f} | "
              f"{r['coverage90_anatomy']:.3f} | {r['coverage90_background']:.3f} | "
              f"{r['mean_sd_voxels']:.3f} | {r['mean_error_voxels_moving']:.3f} / {r['mean_error_voxels_static']:.3f} | "
              f"{r['landmark_mm']:.2f} |")
    if args.out:
        write_json(args.out, {**stamp, "finished": now(), "rows": rows})
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
