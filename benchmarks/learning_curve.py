"""Held-out learning curve of the amortised network, with per-case and Elastix as reference lines.

Trains the config's network (resuming ``<out>/train/last.pt`` when it exists) with validation every
``--validate-every`` iterations on ``--heldout`` phantoms of seeds never used in training
(``breathing_phantom`` at the training data's shape and amplitude, the same kind). Then, on the same
held-out groups, all in all-to-one mode with group j's fixed timepoint j mod K: per-case registration
(``groupmorph register`` defaults, no checkpoint), Elastix (when itk-elastix is installed), the trained
network's one pass (an all-moving network is served in the fixed frame: model.FixedFrameGuide) and the
pass + ``--finetune-steps`` per-case steps. Writes ``<out>/learning_curve.csv`` (the training curve:
``train.VALIDATION_COLUMNS``), ``<out>/references.json`` (each method's mean landmark error and seconds
per group) and ``<out>/learning_curve.png``.

    python benchmarks/learning_curve.py --config configs/cpu_small.yaml --out runs/curve
    python benchmarks/learning_curve.py --config configs/smoke.yaml --iterations 20 --validate-every 10 --heldout 2 --out /tmp/c
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: provenance.py
from provenance import now, record  # noqa: E402

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


def all_to_one(cfg):
    """A copy of ``cfg`` in all-to-one mode: how the held-out groups are registered (per-case, and the
    network served for a fixed timepoint; an all-moving network through model.FixedFrameGuide)."""
    cfg = copy.deepcopy(cfg)
    cfg.model.mode = "all-to-one"
    return cfg


def _score(rows: dict, seconds: dict, name: str, g, res) -> None:
    rows.setdefault(name, []).append(landmark_distances(g.landmarks, res.displacement, res.inverse_displacement, g.spacing).mean())
    seconds.setdefault(name, []).append(res.summary["seconds"])


def references(cfg, elastix: bool, guide=None, finetune_steps=()) -> dict:
    """Identity, per-case, (optionally) Elastix and, with ``guide``, the trained network's pass and pass +
    ``finetune_steps`` per-case steps on the held-out groups, all in all-to-one mode with group j's fixed
    timepoint j mod K (every timepoint is fixed for some group): mean landmark error (mm, all ordered
    pairs) over groups and mean seconds per group."""
    k = cfg.model.num_timepoints
    serve = all_to_one(cfg).with_timepoints(k)
    rows, seconds = {"identity": []}, {}
    for j, g in enumerate(validation_phantoms(cfg)):  # the groups training validates on
        fixed = j % k
        rows["identity"].append(landmark_distances(g.landmarks, spacing=g.spacing).mean())
        _score(rows, seconds, "per-case", g, register(g.images, serve, fixed=fixed))
        if elastix:
            from groupmorph_pyro.baselines import elastix_all_to_one

            _score(rows, seconds, "elastix", g, elastix_all_to_one(g.images, g.spacing, fixed=fixed))
        if guide is not None:
            _score(rows, seconds, "amortised", g, register(g.images, serve, guide, fixed=fixed, finetune_steps=0))
            for steps in finetune_steps:
                _score(rows, seconds, f"amortised + {steps} steps", g,
                       register(g.images, serve, guide, fixed=fixed, finetune_steps=steps))
    return {name: {"landmark_mm": float(np.mean(v)), "seconds_per_group": float(np.mean(seconds.get(name, [0.0])))}
            for name, v in rows.items() if v}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--iterations", type=int, help="override train.iterations")
    p.add_argument("--validate-every", type=int, help="override train.validate_every (default: the config's, else 50)")
    p.add_argument("--heldout", type=int, default=8, help="number of held-out groups")
    p.add_argument("--heldout-seed", type=int, default=10000, help="first held-out seed")
    p.add_argument("--no-elastix", action="store_true", help="skip the Elastix reference line")
    p.add_argument("--finetune-steps", type=int, nargs="*", default=[20],
                   help="also score the network's pass + this many per-case steps ")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    stamp = record("learning_curve.py", argv)
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
    _, guide, state = load_checkpoint(train(cfg, resume=resume, progress=not args.quiet))
    train_seconds = time.perf_counter() - start
    curve = state["validation"]
    elastix = not args.no_elastix
    if elastix:
        try:
            import itk  # noqa: F401
        except ImportError:
            print("learning_curve.py: itk-elastix not installed; no Elastix line", file=sys.stderr)
            elastix = False
    refs = references(cfg, elastix, guide.eval(), args.finetune_steps)
    write_validation(out / "learning_curve.csv", curve)
    summary = {**stamp, "finished": now(), "config": args.config, "settings": cfg.to_dict(), "iterations": cfg.train.iterations, "train_seconds_this_run": train_seconds,
               "heldout": cfg.data.validation, "references": refs, "final": curve[-1]}
    write_json(out / "references.json", summary)
    learning_curve_figure(out / "learning_curve.png", [r["iteration"] for r in curve], [r["val_landmark_mm"] for r in curve],
                          {name: r["landmark_mm"] for name, r in refs.items() if name != "amortised"},
                          ylabel="held-out landmark error (mm)",
                          title=f"{Path(args.config).name}: {args.heldout} held-out groups (seeds {args.heldout_seed}+)")
    final = curve[-1]["val_landmark_mm"]
    print(f"held-out landmark error after {curve[-1]['iteration']} iterations: {final:.2f} mm; "
          + ", ".join(f"{n} {r['landmark_mm']:.2f} mm" for n, r in refs.items()) + f" -> {out}")
    return summary


if __name__ == "__main__":
    main()
