"""Paper Table 1 side by side: identity, Elastix, VoxelMorph(-diff), GroupMorph(-diff), on the same
data and machine, evaluated by the same code (groupmorph_pyro.evaluation).

    python benchmarks/table1.py --out runs/table1                      # synthetic 4DCT-like + DCE-like
    python benchmarks/table1.py --manifest data/manifest.yaml --split test --checkpoint ckpt.pt --out runs/table1
    python benchmarks/table1.py --train-iterations 300 --out runs/table1  # also train the amortised rows
    python benchmarks/table1.py --methods groupmorph --set register.steps=90 --out runs/table1-steps90  # settings of the GroupMorph rows
    python benchmarks/table1.py --smoke --out /tmp/table1               # tiny, for the test-suite

Prints a markdown table shaped like the paper's (method, RMSE, NMI, landmark mm, % det J ≤ 0,
seconds), writes evaluation.csv / evaluation.json, run.json (command, commit, machine) and one
Fig.-4-style PNG per series. Times are per series
on this machine; GroupMorph without --checkpoint is per-case SVI (no trained network), which is
slower than the paper's amortised 2 s.

``--train-iterations N`` trains, on training groups drawn like the test data (other seeds, or the
manifest's ``train`` split), three amortised networks and adds their rows: GroupMorph (K), the K = 2
model (VoxelMorph as in the paper) and the external ``voxelmorph`` package (VxmPairwise, NCC +
gradient penalty). Checkpoints go to ``<out>/models/<series>/``; a rerun resumes or reuses them.
"""
from __future__ import annotations

import argparse
import copy
import functools
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: provenance.py
from provenance import now, record  # noqa: E402
from settings import with_settings  # noqa: E402

from groupmorph_pyro.checks import InputError
from groupmorph_pyro.baselines import ants_all_to_one, elastix_all_to_one, elastix_groupwise, identity, pairwise_groupmorph
from groupmorph_pyro.config import Config
from groupmorph_pyro.files import write_json
from groupmorph_pyro.evaluation import COLUMNS, landmark_columns, group_metrics, write_table
from groupmorph_pyro.plots import comparison_figure
from groupmorph_pyro.preprocess import percentile_normalize
from groupmorph_pyro.registration import register
from groupmorph_pyro.synthetic import anatomy_group, breathing_phantom, dce_phantom

TRAIN_SEED = 100  # training phantoms use seeds TRAIN_SEED.. ; the test phantoms use seeds 1 and 2


@functools.lru_cache(maxsize=None)
def _mni152(spacing: float) -> dict:
    """The template at ``spacing`` mm, read once per run (needs nilearn)."""
    from groupmorph_pyro.data import load_mni152

    return load_mni152(spacing)


def _anatomy(spacing: float, args):
    """Real anatomy (MNI152 from nilearn's wheel) at ``spacing`` mm with seeded motion and contrast."""
    def make(seed, n):
        m = _mni152(spacing)
        return anatomy_group(m["t1"].data, m["grey"].data, m["white"].data, args.timepoints, m["t1"].spacing,
                             amplitude_mm=args.anatomy_amplitude, num_landmarks=n or 100, seed=seed)
    return make


ANATOMY_SPACINGS = (2.5, 3.5)  # mm: the two resolutions of the real-anatomy series


def _phantoms(args):
    size = 24 if args.smoke else args.size
    makers = {"synthetic-4dct": lambda seed, n: breathing_phantom((size,) * 3, args.timepoints, seed=seed, num_landmarks=n),
              "synthetic-dce": lambda seed, n: dce_phantom((size, size, max(16, size * 2 // 3)), args.timepoints,
                                                           seed=seed, num_landmarks=n)}
    for spacing in ANATOMY_SPACINGS:
        makers[f"mni152-{spacing}mm"] = _anatomy(spacing, args)
    return makers


def training_groups(name, args) -> list:
    """``(K, D, H, W)`` tensors in [0, 1] to train the amortised rows for series ``name``."""
    if args.manifest:
        from groupmorph_pyro.data import load_manifest
        from groupmorph_pyro.volumes import load_group

        raw = [load_group(e.images)[0] for e in load_manifest(args.manifest) if e.split == "train"]
    else:
        raw = [_phantoms(args)[name.rsplit("-seed", 1)[0]](TRAIN_SEED + i, 0).images for i in range(args.train_groups)]
    return [torch.from_numpy(np.stack([percentile_normalize(a) for a in g])) for g in raw]


def trained_rows(name, images, groups, args, spacing=(1.0, 1.0, 1.0)) -> dict:
    """Train (or resume / reuse) the three amortised networks; returns {method: run()}.

    With a manifest every series shares one set of networks (trained on its ``train`` split).
    ``spacing``: the series' voxel size (mm), taken for the training groups' too (the prior's weights are per mm).
    """
    from groupmorph_pyro.peers import VoxelMorphSettings, load_voxelmorph, train_voxelmorph, voxelmorph_all_to_one
    from groupmorph_pyro.train import CHECKPOINT_NAME, load_checkpoint, train

    k, shape = images.shape[0], images.shape[1:]
    root = Path(args.out) / "models" / ("manifest" if args.manifest else name)
    patch = [min(args.patch, n) for n in shape]
    rows = {}
    pairs = [g[[i, j]] for g in groups for i in range(k) for j in range(i + 1, k)]
    for label, folder, kk, data in (("groupmorph-diff all-to-one (trained)", "groupmorph", k, groups),
                                    ("voxelmorph-diff (K=2, trained)", "pairwise", 2, pairs)):
        cfg = Config()
        cfg.model.num_timepoints = kk
        if kk == 2:  # VoxelMorph's diffusion regulariser, per voxel (as baselines.pairwise_groupmorph)
            cfg.model.prior, cfg.model.prior_options, cfg.model.prior_units = "laplacian", {"lambda_v": 1e-6}, "voxel"
        cfg.train.iterations, cfg.train.lr, cfg.train.patch_size = args.train_iterations, args.train_lr, patch
        cfg.train.checkpoint_every, cfg.train.device = 50, "cpu"
        cfg.train.output_dir = str(root / folder)
        ckpt = Path(cfg.train.output_dir) / CHECKPOINT_NAME
        train(cfg, resume=ckpt.exists(), groups=data, progress=not args.smoke, spacing=spacing)
        ckpt_cfg, guide, _ = load_checkpoint(ckpt)
        if folder == "groupmorph":
            rows[label] = lambda c=ckpt_cfg, g=guide: register(images, c, g, affine=np.diag([*spacing, 1.0]))
        else:
            rows[label] = lambda c=ckpt_cfg, g=guide: pairwise_groupmorph(images, c, 0, 0, guide=g)
    vxm_path = root / "voxelmorph.pt"
    if vxm_path.exists():
        model, settings = load_voxelmorph(vxm_path)
    else:
        model, settings = None, VoxelMorphSettings(patch_size=[max(32, n // 32 * 32) for n in patch], lr=args.vxm_lr)
    remaining = args.train_iterations - settings.iterations
    if remaining > 0:
        model, settings = train_voxelmorph(groups, remaining, settings, model, progress=not args.smoke, checkpoint=vxm_path)
    rows["voxelmorph package (VxmPairwise, trained)"] = lambda: voxelmorph_all_to_one(images, model, settings)
    return rows


def datasets(args):
    """Yield (name, images (K, D, H, W), spacing, landmarks or None)."""
    if args.manifest:
        from groupmorph_pyro.data import entry_landmarks, split_entries
        from groupmorph_pyro.volumes import load_group

        for e in split_entries(args.manifest, args.split):
            images, _, vols = load_group(e.images)
            yield e.name, images, vols[0].spacing, entry_landmarks(e, images.shape[1:])
        return
    make = _phantoms(args)
    wanted = args.series or ["synthetic-4dct", "synthetic-dce"]
    for name in wanted:
        if name == "synthetic-4dct":
            g = make[name](1, 20 if args.smoke else 75)
            yield name, g.images, g.spacing, g.landmarks
        elif name == "synthetic-dce":
            g = make[name](2, 10 if args.smoke else 30)
            yield name, g.images, g.spacing, g.landmarks
        else:
            for seed in args.anatomy_seeds:
                g = make[name](seed, 100)
                yield f"{name}-seed{seed}", g.images, g.spacing, g.landmarks


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--manifest")
    p.add_argument("--split", default="test")
    p.add_argument("--series", nargs="+", choices=["synthetic-4dct", "synthetic-dce"] + [f"mni152-{s}mm" for s in ANATOMY_SPACINGS],
                   help="synthetic series to run (default: synthetic-4dct synthetic-dce); mni152-* need nilearn")
    p.add_argument("--anatomy-seeds", nargs="+", type=int, default=[1, 2], help="seeds of the mni152 groups (motion, contrast)")
    p.add_argument("--anatomy-amplitude", type=float, default=6.0, help="mean motion (mm) of the mni152 groups")
    p.add_argument("--methods", nargs="+", help="only the rows whose name starts with one of these (e.g. identity elastix ants groupmorph)")
    p.add_argument("--checkpoint", help="trained GroupMorph model (amortised row)")
    p.add_argument("--pairwise-checkpoint", help="trained K=2 model (amortised VoxelMorph row)")
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--timepoints", type=int, default=4)
    p.add_argument("--steps", type=int, help="per-case SVI steps of the GroupMorph and VoxelMorph rows "
                   "(default: the config's register.steps, i.e. what `groupmorph register` does)")
    p.add_argument("--elastix-iterations", type=int, default=500)
    p.add_argument("--ants-iterations", type=int, nargs="+", default=[100, 70, 50], help="SyN iterations per level")
    p.add_argument("--train-iterations", type=int, default=0,
                   help="train the amortised rows (GroupMorph, K=2, voxelmorph package) for this many iterations")
    p.add_argument("--train-groups", type=int, default=8, help="synthetic training groups per series")
    p.add_argument("--train-lr", type=float, default=1e-3, help="Adam lr of the GroupMorph / K=2 guides")
    p.add_argument("--vxm-lr", type=float, default=1e-3, help="Adam lr of the voxelmorph package network")
    p.add_argument("--patch", type=int, default=48, help="training patch edge (voxels)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="settings of every GroupMorph row (YAML values, checked like a config file's), "
                        "as section.key=value, e.g. register.fit_voxels=65536")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    try:  # the settings checked before any registration
        base = with_settings(Config(), args.set, "table1.py --set")
    except InputError as err:
        p.error(str(err))
    stamp = record("table1.py", argv)
    steps = 3 if args.smoke else args.steps
    ants_settings = {"reg_iterations": (5,) if args.smoke else tuple(args.ants_iterations)}
    elx = {"MaximumNumberOfIterations": ["20" if args.smoke else str(args.elastix_iterations)]}
    if args.smoke:
        elx["NumberOfResolutions"] = ["1"]
    rows, train_sets = [], {}
    for name, images, spacing, landmarks in datasets(args):
        cfg = copy.deepcopy(base)
        cfg.model.num_timepoints = images.shape[0]
        voxel_prior = copy.deepcopy(cfg)  # the bending prior's weights in voxels
        voxel_prior.model.prior_units, voxel_prior.model.prior_options = "voxel", {"lambda_b": 1.0, "lambda_v": 0.01}
        lattice = copy.deepcopy(voxel_prior)  # the likelihood on the lattice (no jitter)
        lattice.model.jitter = False
        before = copy.deepcopy(lattice)  # squarings on the full grid, diagonal σ
        before.model.integration_downsize, before.register.covariance = 1, "diagonal"
        previous = copy.deepcopy(before)  # the Laplacian prior and the Gaussian histogram
        previous.model.prior, previous.model.prior_options, previous.model.histogram = "laplacian", {}, "gaussian"
        affine = np.diag([*spacing, 1.0])  # the voxel size, as the peers get it (the prior's weights are per mm)
        methods = {
            "identity": lambda: identity(images),
            "elastix (B-spline, NMI)": lambda: elastix_all_to_one(images, spacing, 0, elx),
            "elastix group-wise": lambda: elastix_groupwise(images, spacing, elx),
            "ants (affine + SyN, Mattes MI)": lambda: ants_all_to_one(images, spacing, 0, ants_settings),
            "voxelmorph-diff (K=2, per-case)": lambda: pairwise_groupmorph(images, cfg, 0, steps),
            "groupmorph-diff all-to-one (per-case)": lambda: register(images, cfg, finetune_steps=steps, affine=affine),
            "groupmorph-diff all-to-one (per-case, prior per voxel: λ_b 1, λ_v 0.01)":
                lambda: register(images, voxel_prior, finetune_steps=steps, affine=affine),
            "groupmorph-diff all-to-one (per-case, likelihood on the lattice: no jitter)":
                lambda: register(images, lattice, finetune_steps=steps, affine=affine),
            "groupmorph-diff all-to-one (per-case, before: full-grid integration, diagonal σ)":
                lambda: register(images, before, finetune_steps=steps, affine=affine),
            "groupmorph-diff all-to-one (per-case, Laplacian prior + Gaussian histogram)":
                lambda: register(images, previous, finetune_steps=steps, affine=affine),
        }
        if args.checkpoint:
            from groupmorph_pyro.train import load_checkpoint

            ckpt_cfg, guide, _ = load_checkpoint(args.checkpoint)
            methods["groupmorph-diff all-to-one (amortised)"] = lambda: register(images, ckpt_cfg, guide, affine=affine)
        if args.pairwise_checkpoint:
            from groupmorph_pyro.train import load_checkpoint

            pair_cfg, pair_guide, _ = load_checkpoint(args.pairwise_checkpoint)
            methods["voxelmorph (K=2, amortised)"] = lambda: pairwise_groupmorph(images, pair_cfg, 0, 0, guide=pair_guide)
        if args.train_iterations:
            key = "manifest" if args.manifest else name
            if key not in train_sets:
                train_sets[key] = training_groups(name, args)
            methods.update(trained_rows(name, images, train_sets[key], args, spacing))
        if args.methods:
            methods = {m: run for m, run in methods.items() if any(m.startswith(p) for p in args.methods)}
        figure = {}
        for method, run in tqdm(methods.items(), desc=name, disable=args.smoke):
            res = run()
            row = {"series": name, "method": method, **group_metrics(images, res.warped, res.jacobian),
                   "seconds": res.summary["seconds"]}
            if landmarks is not None:
                row.update(landmark_columns(landmarks, res.displacement, res.inverse_displacement, spacing))
            rows.append({c: row.get(c) for c in COLUMNS})
            figure[method] = (res.warped, res.jacobian)
        comparison_figure(Path(args.out) / f"fig4_{name}.png", figure, title=name)
    write_table(rows, args.out)
    write_json(Path(args.out) / "run.json", {**stamp, "finished": now()})
    for name in dict.fromkeys(r["series"] for r in rows):
        print(f"\n### {name}\n")
        print("| method | RMSE | NMI | landmarks mean ± sd (mm) | median | p95 | det J ≤ 0 (%) | time (s) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in (r for r in rows if r["series"] == name):
            if r["landmark_mm_after"] is None:
                lm = "– | – | –"
            else:
                lm = (f"{r['landmark_mm_after']:.2f} ± {r['landmark_sd_after']:.2f} | {r['landmark_median_after']:.2f} | "
                      f"{r['landmark_p95_after']:.2f}")
            print(f"| {r['method']} | {r['rmse_after']:.4g} | {r['nmi_after']:.3f} | {lm} | "
                  f"{r['folding_percent']:.3f} | {r['seconds']:.1f} |")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
