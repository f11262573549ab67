"""Command line: ``groupmorph train | register | merge | apply | midposition | ventilation | trajectory |
curves | report | evaluate | demo``.

Bad input prints one line ``groupmorph: error: ...`` to stderr and exits with code 2, before
anything is written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .checks import InputError, resolve_device

__all__ = ["main", "build_parser"]


def _add_runtime_args(parser, inference: bool = False) -> None:
    """How the network runs (config section ``runtime``); for inference also tiling (``register.window``)."""
    g = parser.add_argument_group("runtime (speed and memory; --window tiles change the network's fields near tile borders)")
    g.add_argument("--precision", choices=["fp32", "bf16"], help="network precision (bf16 autocast; for GPUs)")
    g.add_argument("--channels-last", action="store_true", default=None, help="channels_last_3d convolutions")
    g.add_argument("--compile", nargs="?", const=True, metavar="BACKEND",
                   help="torch.compile the network (default backend inductor; compiles once per input shape)")
    if inference:
        g.add_argument("--window", type=int, nargs=3, metavar=("D", "H", "W"),
                       help="run the network on overlapping tiles of this size (full-resolution volumes)")
        g.add_argument("--overlap", type=float, help="tile overlap fraction with --window (default 0.25)")


def _apply_runtime(cfg, args) -> None:
    """Command-line runtime/tiling options over the config's (only those given); validates."""
    for key in ("precision", "channels_last", "compile"):
        if getattr(args, key, None) is not None:
            setattr(cfg.runtime, key, getattr(args, key))
    if getattr(args, "window", None):
        cfg.register.window = list(args.window)
    if getattr(args, "overlap", None) is not None:
        cfg.register.overlap = args.overlap
    cfg.runtime.validate()
    cfg.register.validate()


def build_parser() -> argparse.ArgumentParser:
    """The ``groupmorph`` command line: one subcommand per ``_<name>_parser``."""
    p = argparse.ArgumentParser(prog="groupmorph", description="Deep group-wise variational diffeomorphic registration (Pyro).")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_train_parser, _register_parser, _merge_parser, _apply_parser, _midposition_parser,
                _ventilation_parser, _trajectory_parser, _curves_parser, _report_parser, _evaluate_parser, _demo_parser):
        add(sub, argparse.ArgumentDefaultsHelpFormatter)
    return p


def _train_parser(sub, fmt) -> None:
    """``groupmorph train``: amortised training by SVI."""
    t = sub.add_parser("train", help="train the amortised guide by SVI", formatter_class=fmt)
    t.add_argument("--config", required=True, help="YAML config (see configs/)")
    t.add_argument("--resume", action="store_true", help="continue from <output_dir>/last.pt")
    t.add_argument("--output-dir", help="override train.output_dir")
    t.add_argument("--iterations", type=int, help="override train.iterations")
    t.add_argument("--device", help="override train.device (auto, cpu, cuda, cuda:1, ...)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--distributed", action="store_true",
                   help="one of several processes started by torchrun (DistributedDataParallel; batch_size is per process)")
    t.add_argument("--backend", default="auto", choices=["auto", "nccl", "gloo"], help="with --distributed")
    _add_runtime_args(t)


def _register_parser(sub, fmt) -> None:
    """``groupmorph register``: one group, or every series of a manifest."""
    r = sub.add_parser(
        "register", help="register one group of K images, or every series of a manifest", formatter_class=fmt,
        description="Register one group. With --checkpoint: one amortised network pass (plus --finetune-steps of "
                    "per-case SVI). Without: per-case SVI from zero, coarse to fine: register.coarse_steps (50) steps at "
                    "half resolution, then register.steps (60; --finetune-steps overrides) at full resolution "
                    "(Adam, cosine from register.lr = 1.0, parameters averaged over the last 30 %), then "
                    "the posterior sd is set to the prior's mean-field optimum. Images with more voxels per timepoint than register.fit_voxels (2^19) are "
                    "fitted on a control grid: the same levels on resampled images, then register.sample_steps (200) "
                    "steps reading the full-resolution images at register.sample_points (131072) random points each. "
                    "Outputs: warped images, world-mm "
                    "displacements, det J and summary.json in --out.")
    r.add_argument("images", nargs="*", help="K 3D images (NIfTI), one per timepoint, in order")
    r.add_argument("--manifest", help="register every series of --split instead (resumable: finished series are skipped)")
    r.add_argument("--split", default="test", help="with --manifest: which split to register")
    r.add_argument("--shard", metavar="I/N",
                   help="with --manifest: register only shard I (0-based) of N into --out, listed in batch-I-of-N.csv; "
                        "'auto' reads a SLURM array task's SLURM_ARRAY_TASK_ID/_COUNT, 'auto/N' a Kubernetes indexed "
                        "Job's JOB_COMPLETION_INDEX (see 'groupmorph merge')")
    r.add_argument("--merge", action="store_true",
                   help="with --shard: once this shard is done, write batch.csv if every shard is done "
                        "(otherwise say which are left)")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--checkpoint", help="trained model (amortised inference); without it: per-case SVI")
    r.add_argument("--config", help="YAML config for per-case SVI without a checkpoint (default: the package defaults; configs/dirlab_4dct.yaml has the paper's)")
    r.add_argument("--mode", choices=["all-to-one", "all-moving"],
                   help="default: the checkpoint's / config's mode; an all-moving checkpoint also serves all-to-one (any --fixed)")
    r.add_argument("--fixed", type=int, help="fixed timepoint (0-based) in all-to-one mode (default 0)")
    r.add_argument("--finetune-steps", type=int, help="per-case SVI steps (after the amortised pass with --checkpoint)")
    r.add_argument("--no-diffeomorphic", action="store_true", help="displacement model instead of velocity + scaling and squaring")
    r.add_argument("--resample", action="store_true", help="resample every image onto the first image's grid")
    r.add_argument("--samples", type=int, default=0,
                   help="draw S posterior samples: uncertainty maps, folding probability, posterior.nc, figures")
    r.add_argument("--landmarks", nargs="+", metavar="TXT",
                   help="K landmark files (1-based 'x y z' voxel indices, DIR-Lab format), one per image")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    r.add_argument("--seed", type=int, default=0, help="random seed (posterior noise, sampling): same seed, same result")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--no-itk", action="store_true",
                   help="skip the ITK-convention fields transform_<k>_itk / inverse_<k>_itk (LPS mm) for SimpleITK, ANTs, Slicer")
    r.add_argument("--no-report", action="store_true", help="skip the QC page report.html (see 'groupmorph report')")
    r.add_argument("--force", action="store_true",
                   help="run even when the memory check (per-case path) estimates more memory than is available")
    _add_runtime_args(r, inference=True)


def _merge_parser(sub, fmt) -> None:
    """``groupmorph merge``: batch.csv of a sharded manifest run."""
    m = sub.add_parser(
        "merge", formatter_class=fmt, help="write batch.csv of a cohort registered in shards (register --shard I/N)",
        description="Check that every shard of 'groupmorph register --manifest M --shard I/N --out REG_DIR' has "
                    "finished all its series and write REG_DIR/batch.csv: the rows one process would have written, "
                    "in the manifest's order. Exits 2, naming the shards and series left, while any is unfinished.")
    m.add_argument("registration", metavar="REG_DIR", help="the --out folder of the shards")


def _apply_parser(sub, fmt) -> None:
    """``groupmorph apply``: a stored registration applied to an image, label map or points."""
    a = sub.add_parser(
        "apply", formatter_class=fmt,
        help="move an image, label map or points from timepoint I to J with a stored registration",
        description="Apply a 'groupmorph register' output folder to other data. An image or label map on timepoint I's "
                    "grid is resampled onto J's grid, showing it moved by the motion from I to J "
                    "(out(q) = img(φ_I(φ_J⁻¹(q)))); points of I are mapped to J (p -> φ_J(φ_I⁻¹(p))). "
                    "I or J may be 'common' (the common frame; the fixed image's in all-to-one mode).")
    a.add_argument("registration", metavar="REG_DIR", help="a 'groupmorph register' output folder")
    a.add_argument("--from", dest="source", required=True, metavar="I", help="timepoint (0-based) the data belongs to, or 'common'")
    a.add_argument("--to", dest="target", required=True, metavar="J", help="timepoint (0-based) to move it to, or 'common'")
    a.add_argument("--out", required=True, help="output file (NIfTI for --image/--labels; the input's format for --points)")
    what = a.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", metavar="IMG", help="a 3D image on timepoint I's grid (NIfTI)")
    what.add_argument("--labels", metavar="SEG", help="a label map on timepoint I's grid (NIfTI, integer labels)")
    what.add_argument("--points", metavar="FILE",
                      help="DIR-Lab text (1-based voxel 'x y z' per line) or .csv with world-mm columns x, y, z (RAS)")
    a.add_argument("--interpolation", choices=["linear", "bspline", "nearest"], default="linear",
                   help="images: trilinear, cubic B-spline or nearest; labels: linear = each label's indicator resampled "
                        "trilinearly, largest wins (no new label values), or nearest")
    a.add_argument("--samples", type=int, metavar="S",
                   help="with --labels: carry the label map under S draws of the stored posterior and write each label's "
                        "probability (4D NIfTI at --out), the most probable label (<stem>_labels.nii.gz) and <stem>.json")
    a.add_argument("--seed", type=int, default=0, help="with --samples: the draws' seed")


def _add_sample_args(parser, what: str) -> None:
    """``--samples S`` (``what`` they add, from S draws of the stored posterior) and ``--seed``."""
    parser.add_argument("--samples", type=int, default=0, metavar="S",
                        help=f"also {what} over S draws of the stored posterior (posterior.npz)")
    parser.add_argument("--seed", type=int, default=0, help="with --samples: the draws' seed")


def _add_images_arg(parser) -> None:
    """``--images``: the K timepoints, when the inputs summary.json names have moved."""
    parser.add_argument("--images", nargs="+", metavar="IMG",
                        help="the K timepoints (default: the inputs the registration's summary.json names)")


def _midposition_parser(sub, fmt) -> None:
    """``groupmorph midposition``: the mid-position image of a registration folder."""
    m = sub.add_parser(
        "midposition", formatter_class=fmt, help="the mid-position image: every timepoint moved to the mean position",
        description="Each timepoint moved to the group's mean position, m = (1/K) sum_k phi_k, and averaged "
                    "(x_k o phi_k o m^-1, one trilinear interpolation per image). Writes the NIfTI and a PNG of three "
                    "orthogonal slices beside it.")
    m.add_argument("registration", metavar="REG_DIR", help="a 'groupmorph register' output folder")
    m.add_argument("--out", required=True, help="the mid-position image (NIfTI); its PNG is written beside it")
    _add_images_arg(m)


def _ventilation_parser(sub, fmt) -> None:
    """``groupmorph ventilation``: local volume change between two timepoints inside a mask."""
    v = sub.add_parser(
        "ventilation", formatter_class=fmt, help="local volume change (det J - 1) from timepoint I to J inside a mask",
        description="Local volume change of timepoint I's tissue at J, on I's grid: +0.2 = 20 % more volume at J. "
                    "--method jacobian: det J - 1 of the map q -> phi_J(phi_I^-1(q)); --method hu (CT in HU): "
                    "f_I(q) / f_J(phi_J(phi_I^-1(q))) - 1 with the tissue fraction f = 1 + HU/1000. Writes the NIfTI "
                    "(0 outside the mask), a PNG and a JSON of the mean, sd, percentiles and volume change (mL) over "
                    "the mask and per label (e.g. lobes).")
    v.add_argument("registration", metavar="REG_DIR", help="a 'groupmorph register' output folder")
    v.add_argument("--from", dest="source", required=True, metavar="I", help="timepoint (0-based) of the mask, e.g. exhale")
    v.add_argument("--to", dest="target", required=True, metavar="J", help="timepoint (0-based) to compare with, e.g. inhale")
    v.add_argument("--mask", required=True, metavar="SEG",
                   help="label map on timepoint I's grid (NIfTI): 0 outside, 1.. inside (each label summarised)")
    v.add_argument("--out", required=True, help="the ventilation map (NIfTI); PNG and JSON beside it")
    v.add_argument("--method", default="jacobian", choices=["jacobian", "hu"],
                   help="volume change from the map's det J, or from the CT densities (images in HU)")
    _add_images_arg(v)
    _add_sample_args(v, "the posterior sd of each voxel's value (<stem>_sd.nii.gz)")


def _trajectory_parser(sub, fmt) -> None:
    """``groupmorph trajectory``: points followed through every timepoint."""
    t = sub.add_parser(
        "trajectory", formatter_class=fmt, help="follow points of timepoint I through every timepoint",
        description="Points given in timepoint I's image mapped to every timepoint (p -> phi_k(phi_I^-1(p))). Writes a "
                    "CSV with columns timepoint, point, x, y, z (world mm, RAS) and a PNG of each coordinate over the "
                    "timepoints.")
    t.add_argument("registration", metavar="REG_DIR", help="a 'groupmorph register' output folder")
    t.add_argument("--points", required=True, metavar="FILE",
                   help="DIR-Lab text (1-based voxel 'x y z' per line) or .csv with world-mm columns x, y, z (RAS)")
    t.add_argument("--frame", required=True, metavar="I", help="timepoint (0-based) the points are given in, or 'common'")
    t.add_argument("--out", required=True, help="the trajectory CSV; its PNG is written beside it")
    _add_sample_args(t, "each point's sd and 5th/95th percentiles (mm)")


def _curves_parser(sub, fmt) -> None:
    """``groupmorph curves``: mean intensity per label over the timepoints, before and after registration."""
    c = sub.add_parser(
        "curves", formatter_class=fmt, help="enhancement curves per label before and after registration, and subtractions",
        description="Mean intensity in each label of a label map drawn on timepoint I, at every timepoint: before "
                    "(each timepoint read where it lies) and after registration (each moved to I). Writes a CSV (label, "
                    "voxels, timepoint, before, after), a PNG, and the subtraction images x_k - x_0 before and after "
                    "(<stem>_subtraction_<k>_before/after.nii.gz).")
    c.add_argument("registration", metavar="REG_DIR", help="a 'groupmorph register' output folder")
    c.add_argument("--labels", required=True, metavar="SEG", help="label map on timepoint I's grid (NIfTI, 0 outside)")
    c.add_argument("--frame", required=True, metavar="I", help="timepoint (0-based) the labels are drawn on")
    c.add_argument("--out", required=True, help="the curves CSV; PNG and subtraction images beside it")
    _add_images_arg(c)


def _report_parser(sub, fmt) -> None:
    """``groupmorph report``: the QC page of a registration folder."""
    q = sub.add_parser(
        "report", formatter_class=fmt, help="write the QC page (one self-contained HTML file) of a registration folder",
        description="One HTML page that opens from disk with no network access: per timepoint NMI before/after, "
                    "folding, det J range, SDlogJ, displacement and posterior sd; QC flags with their thresholds; "
                    "mosaics of three orthogonal views with a before/after flicker against the reference, a "
                    "checkerboard, det J and sd maps; landmark errors against their posterior sd.")
    q.add_argument("registration", metavar="REG_DIR", help="a 'groupmorph register' output folder")
    q.add_argument("--out", help="the page (default: REG_DIR/report.html)")


def _evaluate_parser(sub, fmt) -> None:
    """``groupmorph evaluate``: Table-1 metrics of a manifest split or output folders."""
    e = sub.add_parser("evaluate", help="Table-1 metrics for a manifest split or registration output folders",
                       formatter_class=fmt)
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="register and evaluate every series of --split (outputs under --out)")
    src.add_argument("--outputs", nargs="+", metavar="DIR", help="existing 'groupmorph register' output folders")
    e.add_argument("--out", required=True, help="folder for evaluation.json / evaluation.csv (and registrations)")
    e.add_argument("--split", default="test", help="with --manifest: which split to register and evaluate")
    e.add_argument("--checkpoint", help="trained model for --manifest (default: per-case SVI)")
    e.add_argument("--config", help="YAML config for per-case SVI without a checkpoint")
    e.add_argument("--fixed", type=int, help="fixed timepoint (0-based) in all-to-one mode (default 0)")
    e.add_argument("--finetune-steps", type=int, help="per-case SVI steps (after the amortised pass with --checkpoint)")
    e.add_argument("--landmarks", nargs="+", metavar="TXT", help="with one --outputs folder: K landmark files")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_runtime_args(e, inference=True)


def _demo_parser(sub, fmt) -> None:
    """``groupmorph demo``: the built-in example."""
    d = sub.add_parser("demo", help="register a built-in synthetic 4DCT-like group and report landmark error",
                       formatter_class=fmt)
    d.add_argument("--out", default="demo", help="folder for the synthetic inputs and the registration")
    d.add_argument("--size", type=int, default=48, help="grid size per axis (>= 16)")
    d.add_argument("--timepoints", type=int, default=4)
    d.add_argument("--steps", type=int, default=None,
                   help="full-resolution per-case SVI steps (default: the config's register.steps, as `register` does)")
    d.add_argument("--seed", type=int, default=0, help="phantom and registration seed")
    d.add_argument("--quiet", action="store_true", help="no progress bar")


def _config_and_guide(args, device):
    """``(config, trained guide or None)`` from ``--checkpoint``, else ``--config`` / defaults with
    ``--mode`` and ``--no-diffeomorphic`` applied (commands that have them; with a checkpoint they
    must agree with it), then the runtime options; ``--fixed`` is refused in all-moving mode."""
    from .config import Config, load_config
    from .train import load_checkpoint

    guide = None
    if args.checkpoint:
        cfg, guide, _ = load_checkpoint(args.checkpoint, device)
        if getattr(args, "mode", None) == "all-to-one" and cfg.model.mode == "all-moving":
            cfg.model.mode = "all-to-one"  # served by composition: model.FixedFrameGuide (register picks it)
        elif getattr(args, "mode", None) and args.mode != cfg.model.mode:
            raise InputError(f"--mode {args.mode}: {args.checkpoint} was trained in {cfg.model.mode} mode "
                             f"(an all-moving network serves --mode all-to-one; an all-to-one network cannot serve all-moving)")
        if getattr(args, "no_diffeomorphic", False) and cfg.model.diffeomorphic:
            raise InputError(f"--no-diffeomorphic: {args.checkpoint} was trained as a diffeomorphic model")
    else:
        cfg = load_config(args.config) if args.config else Config()
        if getattr(args, "mode", None):
            cfg.model.mode = args.mode
        if getattr(args, "no_diffeomorphic", False):
            cfg.model.diffeomorphic = False
    _apply_runtime(cfg, args)
    if getattr(args, "fixed", None) is not None and cfg.model.mode == "all-moving":
        hint = " (add --mode all-to-one to serve the all-moving network in this timepoint's frame)" \
            if guide is not None and hasattr(args, "mode") else ""
        raise InputError(f"--fixed {args.fixed}: all-moving mode has no fixed timepoint{hint}")
    return cfg, guide


def _register_manifest(args) -> int:
    from .batch import index_path, merge_shards, parse_shard, register_manifest

    if args.images or args.landmarks or args.resample:
        raise InputError("--manifest: images, --landmarks and --resample come from the manifest; give none on the command line")
    if args.merge and not args.shard:
        raise InputError("--merge: only with --shard (an unsharded run writes batch.csv itself)")
    shard = parse_shard(args.shard) if args.shard else None
    device = resolve_device(args.device)
    cfg, guide = _config_and_guide(args, device)

    def report(run) -> None:  # each newly registered series gets its QC page
        if run.result is not None and not args.no_report:
            from .report import write_report

            write_report(run.folder)

    rows = register_manifest(args.manifest, args.out, cfg, guide, args.split, args.fixed, args.finetune_steps, device,
                             args.samples, args.seed, progress=not args.quiet, itk=not args.no_itk, on_series=report,
                             shard=shard, force=args.force)
    done = sum(r["status"] == "registered" for r in rows)
    print(f"{done} series registered, {len(rows) - done} already done -> {index_path(args.out, shard)}")
    if args.merge:
        try:
            merged = merge_shards(args.out)
        except InputError as exc:  # other shards still running: their last one merges, or 'groupmorph merge'
            print(f"not merged: {exc}")
        else:
            print(f"merged {len(merged)} series -> {index_path(args.out)}")
    return 0


def _merge(args) -> int:
    from .batch import index_path, merge_shards

    rows = merge_shards(args.registration)
    print(f"merged {len(rows)} series -> {index_path(args.registration)}")
    return 0


def _register(args) -> int:
    from .outputs import FolderWriter, check_outputs, output_paths
    from .registration import register
    from .volumes import load_group

    if args.samples < 0:
        raise InputError(f"--samples: expected an integer >= 0, got {args.samples}")
    if args.finetune_steps is not None and args.finetune_steps < 0:
        raise InputError(f"--finetune-steps: expected an integer >= 0, got {args.finetune_steps}")
    if args.manifest:
        return _register_manifest(args)
    if args.shard or args.merge:
        raise InputError("--shard/--merge: only with --manifest (one group is one process)")
    if len(args.images) < 2:
        raise InputError(f"expected at least 2 images (K >= 2), got {len(args.images)}")
    check_outputs(output_paths(args.out, len(args.images), itk=not args.no_itk), args.images)
    device = resolve_device(args.device)
    cfg, guide = _config_and_guide(args, device)
    if guide is None and not args.force:  # from the headers, before any image is read
        from .memory import check_files

        check_files(args.images, cfg, args.samples)
    images, affine, _ = load_group(args.images, resample=args.resample)
    if not args.checkpoint:
        cfg.model.num_timepoints = len(args.images)
    elif cfg.model.num_timepoints != len(args.images):
        raise InputError(f"{args.checkpoint}: model trained for K={cfg.model.num_timepoints} timepoints, got {len(args.images)} images")
    landmarks = None
    if args.landmarks:
        from .data import read_landmark_files

        if len(args.landmarks) != len(args.images):
            raise InputError(f"--landmarks: expected {len(args.images)} files (one per image), got {len(args.landmarks)}")
        landmarks = read_landmark_files(args.landmarks, images.shape[1:])
    out = Path(args.out)
    with FolderWriter(out, affine, len(args.images), args.images, itk=not args.no_itk) as writer:
        result = register(images, cfg, guide, args.fixed, args.finetune_steps, device, args.seed,
                          progress=not args.quiet, samples=args.samples, landmarks=landmarks, affine=affine, sink=writer)
        result.summary["checkpoint"] = args.checkpoint
        writer.finish(result)
    s = result.summary
    del result, images  # the report reads the folder one timepoint at a time
    print(f"registered K={len(args.images)} in {s['seconds']:.2f} s: NMI {s['nmi_before']:.3f} -> {s['nmi_after']:.3f}, "
          f"folding {s['folding_percent_all']:.4f}% -> {out}")
    if not args.no_report:
        _print_report(out)
    return 0


def _print_report(reg_dir, out=None) -> Path:
    """Write the QC page of ``reg_dir`` and print its path and size."""
    from .report import write_report

    path = write_report(reg_dir, out)
    print(f"report: {path} ({path.stat().st_size / 1e6:.2f} MB; open it in a browser)")
    return path


def _report(args) -> int:
    _print_report(args.registration, args.out)
    return 0


def _apply(args) -> int:
    from .transfer import apply_to_file

    if args.samples is not None:
        if not args.labels:
            raise InputError("--samples: only with --labels (label probabilities under the posterior)")
        _check_samples(args.samples, 1)
        from .derived import write_label_probabilities

        out, best, table = write_label_probabilities(args.registration, args.labels, args.source, args.target,
                                                     args.samples, args.out, args.seed)
        print(f"label probabilities from {args.source} to {args.target} under {args.samples} posterior samples -> "
              f"{out} ({best}, {table})")
        return 0

    out = apply_to_file(args.registration, args.source, args.target, args.out, image=args.image, labels=args.labels,
                        points=args.points, interpolation=args.interpolation)
    what = "image" if args.image else "label map" if args.labels else "points"
    print(f"{what} moved from {args.source} to {args.target} -> {out}")
    return 0


def _check_samples(samples: int, minimum: int = 0) -> None:
    if samples < minimum:
        raise InputError(f"--samples: expected an integer >= {minimum}, got {samples}")


def _midposition(args) -> int:
    from .derived import write_midposition

    out, figure = write_midposition(args.registration, args.out, args.images)
    print(f"mid-position image -> {out} ({figure})")
    return 0


def _ventilation(args) -> int:
    import json

    from .derived import write_ventilation

    _check_samples(args.samples)
    out, figure, table, *spread = write_ventilation(args.registration, args.source, args.target, args.mask, args.out,
                                                    args.samples, args.seed, args.method, args.images)
    figures = json.loads(Path(table).read_text())["all"]
    sd = f", posterior sd {figures['sd_mean']:.4f} on average" if spread else ""
    print(f"ventilation {args.source} -> {args.target} ({args.method}): mean {figures['mean']:+.4f}, median {figures['p50']:+.4f}, "
          f"{figures['volume_change_ml']:+.1f} mL over {figures['volume_ml']:.1f} mL{sd} -> {out} "
          f"({', '.join(map(str, [figure, table, *spread]))})")
    return 0


def _trajectory(args) -> int:
    from .derived import write_trajectory

    _check_samples(args.samples)
    out, figure = write_trajectory(args.registration, args.points, args.frame, args.out, args.samples, args.seed)
    print(f"trajectories from timepoint {args.frame} -> {out} ({figure})")
    return 0


def _curves(args) -> int:
    from .derived import write_curves

    paths = write_curves(args.registration, args.labels, args.frame, args.out, args.images)
    print(f"curves -> {paths[0]} ({paths[1]}; {len(paths) - 2} subtraction images)")
    return 0


def _train(args) -> int:
    from .config import load_config
    from .train import train

    cfg = load_config(args.config)
    if args.output_dir:
        cfg.train.output_dir = args.output_dir
    if args.iterations:
        cfg.train.iterations = args.iterations
    if args.device:
        cfg.train.device = args.device
    cfg.train.validate()
    _apply_runtime(cfg, args)
    device = None
    if args.distributed:
        import os

        from .train import distributed_rank, init_distributed

        if "LOCAL_RANK" not in os.environ:
            raise InputError("--distributed: expected to be started by torchrun (LOCAL_RANK is not set), e.g. "
                             "torchrun --nproc_per_node 2 -m groupmorph_pyro.cli train --distributed --config C")
        device = init_distributed(int(os.environ["LOCAL_RANK"]), args.backend, cfg.train.device)
    path = train(cfg, resume=args.resume, progress=not args.quiet, device=device)
    if not args.distributed or distributed_rank()[0] == 0:
        print(f"checkpoint: {path}")
    if args.distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def _demo(args) -> int:
    import numpy as np

    from .config import Config
    from .data import write_landmarks
    from .files import write_json
    from .outputs import write_registration
    from .plots import comparison_figure
    from .registration import register
    from .synthetic import breathing_phantom
    from .volumes import save_nifti

    out = Path(args.out)
    group = breathing_phantom((args.size,) * 3, args.timepoints, seed=args.seed)
    inputs = [out / "inputs" / f"phase_{k}.nii.gz" for k in range(args.timepoints)]
    for k, path in enumerate(inputs):
        save_nifti(path, group.images[k], group.affine)
        write_landmarks(out / "inputs" / f"landmarks_{k}.txt", group.landmarks[k])  # DIR-Lab text: 1-based x y z
    cfg = Config()
    cfg.model.num_timepoints = args.timepoints
    result = register(group.images, cfg, finetune_steps=args.steps, seed=args.seed, progress=not args.quiet,
                      landmarks=group.landmarks, affine=group.affine)
    write_registration(result, out / "registered", group.affine, inputs)
    report = _print_report(out / "registered")
    figure = out / "fig4_demo.png"
    comparison_figure(figure, {"unregistered": (group.images, np.ones_like(group.images)),
                               "groupmorph per-case": (result.warped, result.jacobian)},
                      title="demo phantom: mean − first aligned phase, and det J")
    s = result.summary
    write_json(out / "demo_summary.json", {key: s[key] for key in
                                           ("landmarks", "nmi_before", "nmi_after", "folding_percent_all", "seconds")})
    before, after = s["landmarks"]["identity"], s["landmarks"]["registered"]
    print(f"landmark distance {before['mean_mm']:.2f} ± {before['sd_mm']:.2f} mm before, "
          f"{after['mean_mm']:.2f} ± {after['sd_mm']:.2f} mm after registration "
          f"({before['n']} landmark pairs); NMI {s['nmi_before']:.3f} -> {s['nmi_after']:.3f}; "
          f"folding {s['folding_percent_all']:.3f} %; {s['seconds']:.1f} s")
    print(f"registration: {out / 'registered'} (summary.json); inputs: {out / 'inputs'}; "
          f"these figures: {out / 'demo_summary.json'}; picture: {figure}; QC report: {report}")
    return 0


def _evaluate(args) -> int:
    from .evaluation import evaluate_manifest, evaluate_output, write_table

    if args.manifest:
        device = resolve_device(args.device)
        cfg, guide = _config_and_guide(args, device)
        rows = evaluate_manifest(args.manifest, Path(args.out) / "registered", cfg, guide, args.split, args.fixed,
                                 args.finetune_steps, device, progress=not args.quiet)
    else:
        if args.landmarks and len(args.outputs) != 1:
            raise InputError(f"--landmarks: give exactly one --outputs folder, got {len(args.outputs)}")
        # read on the images' grid: points outside it are refused, like register --landmarks
        rows = [evaluate_output(d, landmark_files=args.landmarks) for d in args.outputs]
    json_path, csv_path = write_table(rows, args.out)
    for r in rows:
        lm = "" if r["landmark_mm_after"] is None else (
            f", landmarks {r['landmark_mm_before']:.2f} -> {r['landmark_mm_after']:.2f} mm")
        print(f"{r['series']}: RMSE {r['rmse_before']:.2f} -> {r['rmse_after']:.2f}, NMI {r['nmi_before']:.3f} -> "
              f"{r['nmi_after']:.3f}{lm}, folding {r['folding_percent']:.3f}%")
    print(f"wrote {json_path} and {csv_path}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"train": _train, "register": _register, "merge": _merge, "apply": _apply, "midposition": _midposition,
                "ventilation": _ventilation, "trajectory": _trajectory, "curves": _curves, "report": _report,
                "demo": _demo, "evaluate": _evaluate}[args.command](args)
    except InputError as exc:
        print(f"groupmorph: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
