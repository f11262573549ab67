"""Calibration of the posterior on synthetic groups with known motion.

For each likelihood weight β: register the breathing phantom by per-case SVI, draw S posterior
samples of every field, and report how often the true displacement component lies inside the
central 90% posterior interval (coverage; 0.90 = honest), over all voxels and inside the moving
(lung) region, together with the landmark error. All-to-one with fixed timepoint 0, whose true
map is the identity, so the truth for timepoint k is exp(−v_k).

    python benchmarks/calibration.py --betas 1 5 20 --samples 40 --steps 100
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from groupmorph_pyro.config import Config
from groupmorph_pyro.model import build_model
from groupmorph_pyro.posterior import sample_posterior
from groupmorph_pyro.preprocess import normalize_group
from groupmorph_pyro.registration import fit_case
from groupmorph_pyro.metrics import landmark_distances, summarize_distances
from groupmorph_pyro.spatial import integrate_velocity
from groupmorph_pyro.synthetic import breathing_phantom


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
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)

    g = breathing_phantom((args.size,) * 3, 4, seed=1)
    x = normalize_group(g.images)
    truth = integrate_velocity(-torch.from_numpy(g.velocities))[1:]  # (K-1, 3, D, H, W), timepoints 1..K-1
    moving = truth.norm(dim=1).amax(0) > 0.5  # voxels that move more than half a voxel somewhere
    everywhere = torch.ones_like(moving)
    rows = []
    for beta in args.betas:
        cfg = Config()
        cfg.model.num_timepoints, cfg.model.beta = 4, beta
        model = build_model(cfg.model)
        loc = torch.zeros(1, 3, 3, *x.shape[2:])
        cfg.register.patience = 0
        guide, info = fit_case(model, x, 0, loc, torch.full_like(loc, cfg.register.init_scale), cfg.register,
                               steps=args.steps)
        draws = sample_posterior(model, guide, x, 0, args.samples)
        disp = draws["displacement"][:, 0, 1:].double()  # (S, K-1, 3, D, H, W)
        with torch.no_grad():
            mean_loc, _ = guide.distribution_params()
            transform = model.transform(0)
            d, inv = transform.displacements(mean_loc)[0], transform.inverse_displacements(mean_loc)[0]
        lm = summarize_distances(landmark_distances(g.landmarks, d, inv, g.spacing))
        row = {"beta": beta, "coverage90_all": coverage(disp, truth.double(), everywhere),
               "coverage90_moving": coverage(disp, truth.double(), moving),
               "mean_sd_voxels": float(disp.std(0).mean()), "landmark_mm": lm["mean_mm"],
               "elbo_loss_per_voxel": info["elbo_loss_after"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| β | coverage of 90% interval (all voxels) | (moving voxels) | mean posterior sd (voxels) | landmark mm |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['beta']:g} | {r['coverage90_all']:.3f} | {r['coverage90_moving']:.3f} | "
              f"{r['mean_sd_voxels']:.3f} | {r['landmark_mm']:.2f} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=2)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
