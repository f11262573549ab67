"""Held-out learning curve of the amortised network, with per-case and Elastix as reference lines.

Trains the config's network (resuming ``<out>/train/last.pt`` when it exists) with validation every
``--validate-every`` iterations on ``--heldout`` phantoms of seeds never used in training
(``breathing_phantom`` at the training data's shape and amplitude, the same kind), then registers the
same held-out groups per-case (``groupmorph register`` defaults, no checkpoint) and with Elastix
(when itk-elastix is installed), each group with the fixed timepoint the validation uses (group j:
j mod K). Writes ``<out>/learning_curve.csv`` (the training curve: ``train.VALIDATION_COLUMNS``),
``<out>/references.json`` (identity, per-case, Elastix: mean landmark error and seconds per group)
and ``<out>/learning_curve.png``.

    python benchmarks/learning_curve.py --config configs/cpu_small.yaml --out runs/curve
    python benchmarks/learning_curve.py --config configs/smoke.yaml --iterations 20 --validate-every 10 --heldout 2 --out /tmp/c
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from groupmorph_pyro.config import load_config
from groupmorph_pyro.files import write_json
from groupmorph_pyro.metrics import landmark_distances
from groupmorph_pyro.plots import learning_curve_figure
from groupmorph_pyro.registration import register
from groupmorph_pyro.train import CHECKPOINT_NAME, load_checkpoint, train, validation_phantoms, write_validation


def heldout_kwargs(cfg, num_groups: int, seed: int) -> dict:
    """``data.validation`` for phantoms of the training data's kind (shape, amplitude, spacing), other seeds
    (``DataConfig.validate`` refuses seeds that overlap the training seeds)."""
    syn = dict(cfg.data.synthetic)
    if not syn:
        raise SystemExit("learning_curve.py: the config needs data.synthetic (held-out groups are phantoms of the same kind)")
    kind = {k: v for k, v in syn.items() if k not in ("num_groups", "seed")}
    return {**kind, "num_groups": num_groups, "seed": seed, "num_landmarks": kind.get("num_landmarks", 30)}


def references(cfg, elastix: bool) -> dict:
    """Identity, per-case and (optionally) Elastix on the held-out groups: mean landmark error (mm)
    over groups and mean seconds per group."""
    k = cfg.model.num_timepoints
    rows = {"identity": [], "per-case": [], "elastix": []}
    seconds = {"per-case": [], "elastix": []}
    for j, g in enumerate(validation_phantoms(cfg)):  # the groups training validates on
        fixed = j % k if cfg.model.mode == "all-to-one" else None  # as train.validate_guide
        rows["identity"].append(landmark_distances(g.landmarks, spacing=g.spacing).mean())
        res = register(g.images, cfg.with_timepoints(k), fixed=fixed)
        rows["per-case"].append(landmark_distances(g.landmarks, res.displacement, res.inverse_displacement, g.spacing).mean())
        seconds["per-case"].append(res.summary["seconds"])
        if elastix:
            from groupmorph_pyro.baselines import elastix_all_to_one

            res = elastix_all_to_one(g.images, g.spacing, fixed=fixed or 0)
            rows["elastix"].append(landmark_distances(g.landmarks, res.displacement, res.inverse_displacement, g.spacing).mean())
            seconds["elastix"].append(res.summary["seconds"])
    out = {name: {"landmark_mm": float(np.mean(v)), "seconds_per_group": float(np.mean(seconds[name])) if name in seconds else 0.0}
           for name, v in rows.items() if v}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--iterations", type=int, help="override train.iterations")
    p.add_argument("--validate-every", type=int, help="override train.validate_every (default: the config's, else 50)")
    p.add_argument("--heldout", type=int, default=8, help="number of held-out groups")
    p.add_argument("--heldout-seed", type=int, default=10000, help="first held-out seed")
    p.add_argument("--no-elastix", action="store_true", help="skip the Elastix reference line")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    cfg = load_config(args.config)
    out = Path(args.out)
    cfg.train.output_dir = str(out / "train")
    if args.iterations:
        cfg.train.iterations = args.iterations
    cfg.train.validate_every = args.validate_every or cfg.train.validate_every or 50
    cfg.data.validation = heldout_kwargs(cfg, args.heldout, args.heldout_seed)
    cfg.data.validate()
    cfg.train.validate()
    start = time.perf_counter()
    resume = (out / "train" / CHECKPOINT_NAME).is_file()
    _, _, state = load_checkpoint(train(cfg, resume=resume, progress=not args.quiet))
    train_seconds = time.perf_counter() - start
    curve = state["validation"]
    elastix = not args.no_elastix
    if elastix:
        try:
            import itk  # noqa: F401
        except ImportError:
            print("learning_curve.py: itk-elastix not installed; no Elastix line", file=sys.stderr)
            elastix = False
    refs = references(cfg, elastix)
    write_validation(out / "learning_curve.csv", curve)
    summary = {"config": args.config, "iterations": cfg.train.iterations, "train_seconds_this_run": train_seconds,
               "heldout": cfg.data.validation, "references": refs, "final": curve[-1]}
    write_json(out / "references.json", summary)
    learning_curve_figure(out / "learning_curve.png", [r["iteration"] for r in curve], [r["val_landmark_mm"] for r in curve],
                          {name: r["landmark_mm"] for name, r in refs.items()}, ylabel="held-out landmark error (mm)",
                          title=f"{Path(args.config).name}: {args.heldout} held-out groups (seeds {args.heldout_seed}+)")
    final = curve[-1]["val_landmark_mm"]
    print(f"held-out landmark error after {curve[-1]['iteration']} iterations: {final:.2f} mm; "
          + ", ".join(f"{n} {r['landmark_mm']:.2f} mm" for n, r in refs.items()) + f" -> {out}")
    return summary


if __name__ == "__main__":
    main()
