"""DIR-Lab 4DCT end to end: prepare -> train -> register -> evaluate (landmark distance, mm) -> the
mid-position image, ventilation inside a rough lung mask and the landmarks' trajectories, each with
its posterior spread from --samples draws of the stored posterior.

Real data (DIR-Lab needs a registration with the DIR-Lab group; nothing is downloaded here)::

    python examples/dirlab_4dct/pipeline.py --dirlab /data/DIRLab --case 1 --train-cases 2 3 4 5 --work runs/dirlab

Synthetic twin (raw .img + landmark text written in DIR-Lab's own formats), about a minute on a CPU::

    python examples/dirlab_4dct/pipeline.py --smoke --work /tmp/dirlab_smoke
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.ndimage import binary_fill_holes

from groupmorph_pyro.config import load_config
from groupmorph_pyro.data import entry_landmarks, load_manifest, split_entries, write_landmarks, write_manifest
from groupmorph_pyro.derived import write_midposition, write_trajectory, write_ventilation
from groupmorph_pyro.files import write_json
from groupmorph_pyro.outputs import write_registration
from groupmorph_pyro.volumes import load_group, save_nifti
from groupmorph_pyro.metrics import landmark_report
from groupmorph_pyro.prepare import prepare_dirlab, write_dirlab_twin
from groupmorph_pyro.registration import register
from groupmorph_pyro.train import train_or_load

ROOT = Path(__file__).resolve().parents[2]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dirlab", help="folder holding the DIR-Lab case packs (raw .img + landmark .txt)")
    p.add_argument("--case", type=int, default=1, help="test case (evaluated)")
    p.add_argument("--train-cases", type=int, nargs="*", default=[], help="cases used for training")
    p.add_argument("--work", required=True, help="working folder (prepared data, checkpoints, results)")
    p.add_argument("--config", default=str(ROOT / "configs" / "dirlab_4dct.yaml"))
    p.add_argument("--checkpoint", help="skip training and use this checkpoint")
    p.add_argument("--finetune-steps", type=int, default=0, help="per-case SVI steps after the amortised pass")
    p.add_argument("--fixed", type=int, default=0, help="fixed phase index (0 = T00)")
    p.add_argument("--samples", type=int, default=20,
                   help="posterior draws for the ventilation sd and the trajectories' 90 %% bands (0: none)")
    p.add_argument("--smoke", action="store_true", help="run on a small synthetic twin with a tiny model "
                   "(and 15 per-case SVI steps unless --finetune-steps is given)")
    return p.parse_args(argv)


def main(args=None) -> dict:
    args = parse(args) if not isinstance(args, argparse.Namespace) else args
    work = Path(args.work)
    geometry = {}
    if args.smoke:
        args.finetune_steps = args.finetune_steps or 15
        args.samples = min(args.samples, 4)
        args.dirlab = str(work / "raw")
        args.train_cases = [2]
        for case, seed in ((args.case, 0), (2, 1)):
            geometry = write_dirlab_twin(args.dirlab, case, shape=(48, 48, 32), spacing=(2.0, 2.0, 2.5), seed=seed)
        geometry = {"shape": geometry["shape"], "spacing": geometry["spacing"], "crop": 40}
    if not args.dirlab:
        raise SystemExit("pass --dirlab FOLDER or --smoke")

    # 1. prepare: NIfTI + landmarks (+ paper's in-plane 256x256 crop keeping every landmark)
    crop = geometry.pop("crop", 256)
    entries = []
    for case in [args.case, *args.train_cases]:
        split = "test" if case == args.case else "train"
        m = prepare_dirlab(args.dirlab, work / "prepared" / f"case{case}", case, crop=crop, split=split, **geometry)
        entries += load_manifest(m)
    manifest = work / "prepared" / "manifest.yaml"
    write_manifest(manifest, entries)

    # 2. train (unless a checkpoint is given)
    cfg = load_config(ROOT / "configs" / "smoke.yaml" if args.smoke else args.config)
    cfg.model.num_timepoints = 6
    cfg.data.manifest, cfg.data.split, cfg.data.synthetic = str(manifest), "train", {}
    cfg.train.output_dir = str(work / "model")
    cfg, guide = train_or_load(cfg, args.checkpoint, progress=not args.smoke)

    # 3. register and 4. evaluate every test series
    results = {}
    for e in split_entries(manifest, "test"):
        images, affine, vols = load_group(e.images)
        res = register(images, cfg, guide, fixed=args.fixed, finetune_steps=args.finetune_steps)
        write_registration(res, work / "registered" / e.name, affine, e.images)
        report = landmark_report(entry_landmarks(e, images.shape[1:]), res.displacement, res.inverse_displacement,
                                 vols[0].spacing)
        report.update(seconds=res.summary["seconds"], nmi_before=res.summary["nmi_before"],
                      nmi_after=res.summary["nmi_after"], folding_percent=res.summary["folding_percent_all"])
        results[e.name] = report
        report["outputs"] = after_registration(work / "registered" / e.name, work / "derived" / e.name, images,
                                               affine, entry_landmarks(e, images.shape[1:]), args.fixed, args.samples)
    write_json(work / "results.json", results)
    for name, r in results.items():
        print(f"{name}: landmark distance {r['identity']['mean_mm']:.2f} ± {r['identity']['sd_mm']:.2f} mm (identity) -> "
              f"{r['registered']['mean_mm']:.2f} ± {r['registered']['sd_mm']:.2f} mm in {r['seconds']:.2f} s; "
              f"folding {r['folding_percent']:.3f}%")
    return results


def rough_lung_mask(image: np.ndarray) -> np.ndarray:
    """Dark voxels enclosed by the body: below the midpoint of the 1st and 99th percentiles, inside the
    body's filled outline (enough for a ventilation summary; use a real segmentation for studies)."""
    lo, hi = np.percentile(image, [1, 99])
    body = image > (lo + hi) / 2
    return (binary_fill_holes(body) & ~body).astype(np.uint8)


def after_registration(reg_dir: Path, out: Path, images, affine, landmarks, fixed: int, samples: int = 0) -> dict:
    """5. The mid-position image, ventilation from the fixed phase to the phase farthest from it (inside
    a rough lung mask), and the fixed phase's landmarks followed through every phase; with ``samples``
    the ventilation's posterior sd map and the trajectories' sd and 90 % band columns."""
    out.mkdir(parents=True, exist_ok=True)
    mask = out / f"lungs_{fixed}.nii.gz"
    save_nifti(mask, rough_lung_mask(images[fixed]), affine, dtype=np.uint8)
    far = int(np.argmax([np.abs(images[k] - images[fixed]).mean() for k in range(len(images))]))
    write_landmarks(out / f"landmarks_{fixed}.txt", landmarks[fixed])
    midp, _ = write_midposition(reg_dir, out / "midposition.nii.gz")
    vent, _, table, *spread = write_ventilation(reg_dir, fixed, far, mask, out / f"ventilation_{fixed}_to_{far}.nii.gz",
                                                samples=samples)
    traj, _ = write_trajectory(reg_dir, out / f"landmarks_{fixed}.txt", fixed, out / "trajectories.csv", samples=samples)
    figures = json.loads(table.read_text())["all"]
    return {"midposition": str(midp), "ventilation": str(vent), "trajectories": str(traj),
            "ventilation_mean": figures["mean"], **({"ventilation_sd": str(spread[0]),
                                                     "ventilation_sd_mean": figures["sd_mean"]} if spread else {})}


if __name__ == "__main__":
    main(sys.argv[1:])
