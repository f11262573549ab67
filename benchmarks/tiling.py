"""How much tiled inference (register.window) changes the guide's fields against one whole-volume pass.

Tiling equals the whole-volume pass only for pointwise functions (tests/test_reference_values.py);
a U-Net sees less context near tile borders. This prints max / mean |Δ loc| (voxels) between the
tiled and untiled posterior means for a network: a checkpoint (--checkpoint), or the default
architecture with its mean head re-initialised to PyTorch's default conv init (random weights, so
the fields are not near zero as at the usual near-identity initialisation).

    python benchmarks/tiling.py --size 32 --window 16 16 16 --overlap 0.25
"""
from __future__ import annotations

import argparse
import json

import torch

from groupmorph_pyro.model import build_guide
from groupmorph_pyro.config import Config
from groupmorph_pyro.preprocess import normalize_group, sliding_window
from groupmorph_pyro.synthetic import breathing_phantom
from groupmorph_pyro.train import load_checkpoint


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--window", type=int, nargs=3, default=[16, 16, 16])
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    if args.checkpoint:
        cfg, guide, _ = load_checkpoint(args.checkpoint)
    else:
        cfg = Config()
        cfg.model.num_timepoints = 4
        guide = build_guide(cfg.model)
        guide.mean_head.reset_parameters()
    k = cfg.model.num_timepoints
    x = normalize_group(breathing_phantom((args.size,) * 3, k, seed=args.seed).images)
    with torch.no_grad():
        whole, _ = guide.distribution_params(x, 0)
        tiled, _ = sliding_window(lambda t: guide.distribution_params(t, 0), x, args.window, args.overlap)
    diff = (tiled - whole).norm(dim=2)  # (1, K_lat, D, H, W) voxels
    row = {"network": args.checkpoint or "random weights", "size": args.size, "window": args.window,
           "overlap": args.overlap, "max_abs_loc_voxels": float(whole.norm(dim=2).max()),
           "max_diff_voxels": float(diff.max()), "mean_diff_voxels": float(diff.mean())}
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
