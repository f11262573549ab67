"""Per-case registration cost against the voxel count, GroupMorph beside Elastix and ANTs in the same run.

    python benchmarks/scale.py --out runs/scale                                   # the default cases, all methods
    python benchmarks/scale.py --cases phantom-512x512x136-k6 --methods groupmorph --out runs/scale-512
    python benchmarks/scale.py --smoke --out /tmp/scale                           # tiny, for the test-suite

Each (case, method) runs in a fresh child process on ``--threads`` CPU threads: ``groupmorph`` is
``register`` with the package defaults (per-case from zero; images larger than
``register.fit_voxels`` are fitted on a control grid with the likelihood read at random points),
``elastix`` is ``baselines.elastix_all_to_one`` (B-spline, Mattes MI, 3 levels × 500 iterations),
``ants`` is ``baselines.ants_all_to_one`` (affine + SyN 100/70/50). Every method gets the voxel size
and the landmarks are scored by the same code (``evaluation.landmark_columns``, mm).

Cases: ``mni152-<s>mm`` is ``synthetic.anatomy_group`` (K = 4, seed 1, 100 landmarks, mean motion
6 mm with its smooth component filtered at ``ANATOMY_SMOOTH_MM``, so every voxel size poses the same
physical problem) on the MNI152 template at s mm (needs nilearn); ``phantom-<D>x<H>x<W>-k<K>`` is ``synthetic.breathing_phantom``
(seed 1, 75 landmarks, 2 × 2 × 2.5 mm voxels).

Reported per run: wall seconds of the whole call, the landmark error (mean, median, p95 mm), the
folding (% det J ≤ 0) and the peak resident memory the call added (GiB, the child's ``VmHWM``
minus its resident size before the call); for GroupMorph also the seconds of the fit's phases
(``phase_seconds``: each coarse level, the last phase, the σ phase). Per case, the time and error
ratios of GroupMorph to each peer.
Writes ``scale.json`` (command, commit, machine, runs) and ``scale.png`` (seconds against voxels × K).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: memory.py's child runner and memory reader
from memory import memory_bytes, run_child  # noqa: E402
from provenance import now, record  # noqa: E402

DEFAULT_CASES = ["phantom-64x64x48-k6", "phantom-64x64x48-k10", "mni152-2.5mm", "mni152-1.5mm", "mni152-1.0mm",
                 "phantom-256x256x96-k10"]
METHODS = ("groupmorph", "elastix", "ants")
ANATOMY_SMOOTH_MM = 10.0  # σ (mm) of the anatomy cases' smooth motion: 4 voxels of the 2.5 mm grid


def make_case(name: str, landmarks: int = 75):
    """``(images (K, D, H, W) float32, landmarks (K, L, 3) voxels, spacing)`` of a case name (``landmarks``:
    the phantom's count)."""
    from groupmorph_pyro.synthetic import anatomy_group, breathing_phantom

    anatomy = re.fullmatch(r"mni152-([0-9.]+)mm", name)
    phantom = re.fullmatch(r"phantom-(\d+)x(\d+)x(\d+)-k(\d+)", name)
    if anatomy:
        from groupmorph_pyro.data import load_mni152

        m = load_mni152(float(anatomy.group(1)))
        g = anatomy_group(m["t1"].data, m["grey"].data, m["white"].data, 4, m["t1"].spacing, amplitude_mm=6.0,
                          num_landmarks=100, seed=1, smooth_mm=ANATOMY_SMOOTH_MM)
    elif phantom:
        d, h, w, k = (int(v) for v in phantom.groups())
        g = breathing_phantom((d, h, w), k, seed=1, num_landmarks=landmarks)
    else:
        raise SystemExit(f"scale.py: unknown case {name!r}: expected mni152-<s>mm or phantom-<D>x<H>x<W>-k<K>")
    return g.images.astype(np.float32), np.asarray(g.landmarks), tuple(float(s) for s in g.spacing)


def groupmorph_config(settings: dict, timepoints: int):
    """The package defaults for K = ``timepoints`` with ``settings`` (``{"section.key": value}``), typed
    and checked like a config file's."""
    from settings import with_settings

    from groupmorph_pyro.config import Config

    items = [f"{key}={json.dumps(value)}" for key, value in settings.items()]
    return with_settings(Config().with_timepoints(timepoints), items, "--set")


def child(spec: dict) -> dict:
    """One registration in this (child) process: its wall time, landmark error, folding and peak memory."""
    import torch

    from groupmorph_pyro.baselines import ants_all_to_one, elastix_all_to_one
    from groupmorph_pyro.evaluation import landmark_columns
    from groupmorph_pyro.metrics import folding_percent
    from groupmorph_pyro.registration import register

    torch.set_num_threads(spec["threads"])
    images, landmarks = np.load(spec["images"]), np.load(spec["landmarks"])
    spacing = tuple(spec["spacing"])
    method = spec["method"]
    if method == "groupmorph":
        cfg = groupmorph_config(spec.get("settings", {}), images.shape[0])
        run = lambda: register(images, cfg, affine=np.diag([*spacing, 1.0]))  # noqa: E731
    elif method == "elastix":
        run = lambda: elastix_all_to_one(images, spacing, 0, spec.get("elastix"))  # noqa: E731
    else:
        run = lambda: ants_all_to_one(images, spacing, 0, spec.get("ants"))  # noqa: E731
    before = memory_bytes("VmRSS")
    start = time.perf_counter()
    res = run()
    wall = time.perf_counter() - start
    peak = memory_bytes("VmHWM")
    out = {"seconds": wall, "peak_gib": (peak - before) / 2**30, "process_peak_gib": peak / 2**30,
           "folding_percent": folding_percent(res.jacobian)}
    out.update(landmark_columns(landmarks, res.displacement, res.inverse_displacement, spacing))
    if method == "groupmorph":  # the settings as the run's config held them
        out["settings"] = {key: getattr(getattr(cfg, key.partition(".")[0]), key.partition(".")[2]) for key in spec.get("settings", {})}
        out["latent_grid"] = res.summary["latent_grid"]
        out["control_factor"] = res.summary["control_factor"]
        out["phase_seconds"] = phase_seconds(res.summary["finetune"])
    return out


def phase_seconds(fit: dict) -> dict:
    """Seconds of a per-case fit's phases from its summary (``summary["finetune"]``): each coarse
    level's (by its factor), the last phase's steps with their guard, and the σ phase's."""
    return {"levels": {str(level["factor"]): level["seconds"] for level in fit.get("levels", [])},
            "last": fit["seconds"], "spread": fit.get("scale_phase", {}).get("seconds")}


def ratios(runs: list) -> list:
    """Per case with a GroupMorph run: its seconds and mean / median landmark error over each peer's."""
    rows = []
    for case in dict.fromkeys(r["case"] for r in runs):
        by = {r["method"]: r for r in runs if r["case"] == case and "failed" not in r}
        if "groupmorph" not in by:
            continue
        gm = by["groupmorph"]
        for peer in (m for m in METHODS[1:] if m in by):
            p = by[peer]
            rows.append({"case": case, "peer": peer, "time_ratio": gm["seconds"] / p["seconds"],
                         "mean_ratio": gm["landmark_mm_after"] / p["landmark_mm_after"],
                         "median_ratio": gm["landmark_median_after"] / p["landmark_median_after"]})
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out")
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--threads", type=int, default=2, help="CPU threads of every method (torch, ITK, ANTs)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="settings of the GroupMorph runs (YAML values, checked like a config file's): register.KEY=VALUE "
                        "as KEY=VALUE, other sections as SECTION.KEY=VALUE, e.g. sample_points=65536 model.reduction=template")
    p.add_argument("--groups", help="folder that keeps the generated groups (a rerun reads them instead of remaking them)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    if not args.out:
        p.error("--out is required")
    from settings import key_values

    from groupmorph_pyro.checks import InputError

    try:
        values = key_values(args.set)
    except InputError as err:
        p.error(f"--set: {err}")
    settings = {key if "." in key else f"register.{key}": value for key, value in values.items()}
    try:  # typed and checked here, before any group is made
        groupmorph_config(settings, 4)
    except InputError as err:
        p.error(str(err))
    cases = ["phantom-24x24x20-k3"] if args.smoke else args.cases
    for case in cases:
        if not re.fullmatch(r"mni152-[0-9.]+mm|phantom-\d+x\d+x\d+-k\d+", case):
            p.error(f"--cases: unknown case {case!r}: expected mni152-<s>mm or phantom-<D>x<H>x<W>-k<K>")
    if args.smoke:  # a control grid and few points, few iterations: the path and the report, not the figures
        settings = {"register.fit_voxels": 2000, "register.sample_points": 4096, "register.sample_steps": 3,
                    "register.coarse_steps": 3, **settings}
    elastix = {"MaximumNumberOfIterations": ["20" if args.smoke else "500"]}
    if args.smoke:
        elastix["NumberOfResolutions"] = ["1"]
    ants = {"reg_iterations": (5,) if args.smoke else (100, 70, 50)}
    env = {"OMP_NUM_THREADS": str(args.threads), "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(args.threads)}
    os.environ.update(env)  # the children inherit it (ITK and ANTs read these at start)
    from groupmorph_pyro.files import write_json
    from groupmorph_pyro.plots import scaling_figure

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {**record("scale.py", argv, args.threads), "groupmorph_settings": settings, "runs": []}
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        files = {}
        for case in cases:  # each group made once, read by every method's child (kept in --groups if given)
            folder = Path(args.groups or tmp) / case
            if not (folder / "spacing.json").exists():
                images, landmarks, spacing = make_case(case, 20 if args.smoke else 75)
                folder.mkdir(parents=True, exist_ok=True)
                np.save(folder / "images.npy", images)
                np.save(folder / "landmarks.npy", landmarks)
                write_json(folder / "spacing.json", list(spacing))
                del images
            images = np.load(folder / "images.npy", mmap_mode="r")
            spacing = tuple(json.loads((folder / "spacing.json").read_text()))
            files[case] = (folder, spacing, images.shape[0], int(np.prod(images.shape[1:])))
            del images
        for method in args.methods:  # all of one method first: a long run has every case of the first methods
            for case in cases:
                folder, spacing, k, voxels = files[case]
                spec = {"images": str(folder / "images.npy"), "landmarks": str(folder / "landmarks.npy"),
                        "spacing": list(spacing), "method": method, "threads": args.threads, "settings": settings,
                        "elastix": elastix, "ants": ants}
                run = {"case": case, "method": method, "timepoints": k, "voxels": voxels, **run_child(__file__, spec)}
                report["runs"].append(run)
                print(json.dumps(run), flush=True)
                write_json(out / "scale.json", report)  # after every run: a long benchmark keeps what it measured
    report["finished"] = now()
    report["ratios"] = ratios(report["runs"])
    write_json(out / "scale.json", report)
    scaling_figure(out / "scale.png", [r for r in report["runs"] if "failed" not in r])
    print("\n| case | voxels × K | method | mean / median / p95 (mm) | det J ≤ 0 (%) | seconds | peak GiB |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for r in report["runs"]:
        size = f"{r['voxels'] / 1e6:.2f} M × {r['timepoints']}"
        if "failed" in r:
            print(f"| {r['case']} | {size} | {r['method']} | failed: {r['failed']} | | | |")
            continue
        print(f"| {r['case']} | {size} | {r['method']} | {r['landmark_mm_after']:.3f} / {r['landmark_median_after']:.3f} / "
              f"{r['landmark_p95_after']:.3f} | {r['folding_percent']:.3f} | {r['seconds']:.1f} | {r['peak_gib']:.2f} |")
    if report["ratios"]:
        print("\n| case | peer | GroupMorph time / peer's | mean error / peer's | median error / peer's |\n| --- | --- | --- | --- | --- |")
        for r in report["ratios"]:
            print(f"| {r['case']} | {r['peer']} | {r['time_ratio']:.2f} | {r['mean_ratio']:.2f} | {r['median_ratio']:.2f} |")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
