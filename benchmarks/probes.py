"""Ad-hoc comparisons of register settings on Table 1's phantoms and on trained networks: one command each.

``per-case``: per-case registration (no network) of Table 1's two phantoms (``synthetic-4dct``:
``breathing_phantom`` 48³ seed 1, 75 landmarks; ``synthetic-dce``: ``dce_phantom`` 48×48×32 seed 2, 30
landmarks; K = 4, fixed timepoint 0) under setting variants on top of a base (``--base``, e.g.
``model.jitter=false register.pyramid=[1]``): mean / median / p95 landmark error
(mm, the pairs (0, k)), seconds, folding. ``--set gap`` (the default): the accuracy probes of the
phantom gap; ``--set speed``: per-case speed knobs (fewer coarse or full-resolution steps, fewer guard
particles, a deeper pyramid, the integration grid, the template reduction).

``finetune``: a trained network's held-out groups (as ``learning_curve.py``: ``--heldout`` phantoms of
the config's training kind from ``--heldout-seed``, group j fixed at timepoint j mod K), fine-tuned under
variants of ``register.*`` (``--set lr``: SGD's step ``finetune_lr`` and ``schedule``, with the
per-case row from zero for reference) and step counts:
mean landmark error, seconds per group, how many fits the ELBO guard kept, the final negative ELBO per
voxel and the posterior sd (median over voxels, voxels).

``step-cost``: seconds per per-case SVI step (the full-resolution ELBO gradient and an Adam step, after
3 warm-up steps), with the jittered likelihood on and off, alternating, on ``synthetic-4dct`` (48³,
K = 4) and, where nilearn is installed, ``mni152-3.5mm`` (seed 1).

Each writes ``<out>/probes-<command>.json`` and prints one JSON line per row.

    python benchmarks/probes.py per-case --out runs/probes-gap --base model.jitter=false
    python benchmarks/probes.py per-case --set speed --out runs/probes-speed
    python benchmarks/probes.py finetune --config configs/cpu_small_moving_defaults.yaml --checkpoint runs/lcd/train/last.pt --out OUT
    python benchmarks/probes.py step-cost --out OUT
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
from learning_curve import all_to_one, heldout_kwargs  # noqa: E402
from provenance import now, record  # noqa: E402
from settings import with_settings  # noqa: E402

from groupmorph_pyro.checks import InputError  # noqa: E402
from groupmorph_pyro.config import Config, load_config  # noqa: E402
from groupmorph_pyro.evaluation import landmark_columns  # noqa: E402
from groupmorph_pyro.files import write_json  # noqa: E402
from groupmorph_pyro.metrics import landmark_distances  # noqa: E402
from groupmorph_pyro.registration import register  # noqa: E402
from groupmorph_pyro.synthetic import breathing_phantom, dce_phantom  # noqa: E402

# Accuracy probes on the phantoms (--set gap): prior weights, bins, similarity, reduction, more steps.
PER_CASE_VARIANTS = {
    "defaults": [],
    "240 full-resolution steps": ["register.steps=240"],
    "64 bins": ["model.bins=64"],
    "lambda_v 0.001": ["model.prior_options={lambda_v: 0.001}"],
    "lambda_b 0.3": ["model.prior_options={lambda_b: 0.3}"],
    "lambda_b 3": ["model.prior_options={lambda_b: 3.0}"],
    "MI instead of NMI": ["model.likelihood=mi"],
    "template reduction": ["model.reduction=template"],
}
# Per-case speed knobs (--set speed): fewer or cheaper steps, and what they cost in accuracy.
PER_CASE_SPEED_VARIANTS = {
    "defaults": [],
    "75 coarse steps": ["register.coarse_steps=75"],
    "30 full-resolution steps": ["register.steps=30"],
    "2 guard particles": ["register.guard_particles=2"],
    "pyramid 4-2-1": ["register.pyramid=[4, 2, 1]"],
    "integration on a 2x coarser grid": ["model.integration_downsize=2"],
    "integration on the full grid": ["model.integration_downsize=1"],
    "template reduction": ["model.reduction=template"],
}
PER_CASE_SETS = {"gap": PER_CASE_VARIANTS, "speed": PER_CASE_SPEED_VARIANTS}
# Fine-tuning a network's posterior (--set lr): SGD's peak step and the step count, with the per-case
# row from zero for reference: (variant, steps; None = per-case from zero).
FINETUNE_VARIANTS = {
    "per-case from zero (defaults)": ([], None),
    **{f"SGD {lr}, {n} steps": ([f"register.finetune_lr={lr}"], n)
       for lr, n in ((0.001, 30), (0.001, 40), (0.0015, 20), (0.0015, 30), (0.0015, 40), (0.002, 20), (0.002, 30),
                     (0.002, 40), (0.003, 30))},
    "SGD 0.0015, 30 steps, constant schedule": (["register.finetune_lr=0.0015", "register.schedule=constant"], 30),
}
SETS = {"lr": FINETUNE_VARIANTS}


def phantoms() -> dict:
    """Table 1's two phantoms at its default size (48, K = 4)."""
    return {"synthetic-4dct": breathing_phantom((48,) * 3, 4, seed=1, num_landmarks=75),
            "synthetic-dce": dce_phantom((48, 48, 32), 4, seed=2, num_landmarks=30)}


def per_case(args) -> list:
    rows = []
    base = with_settings(Config().with_timepoints(4), args.base)
    variants = PER_CASE_SETS[args.set]
    names = args.variants or list(variants)
    for series, g in phantoms().items():
        for name in names:
            cfg = with_settings(base, variants[name])
            clock = time.perf_counter()
            res = register(g.images, cfg, seed=0)
            seconds = time.perf_counter() - clock
            c = landmark_columns(g.landmarks, res.displacement, res.inverse_displacement, g.spacing)
            rows.append(_say({"series": series, "variant": name, "settings": args.base + variants[name],
                              "identity_mm": c["landmark_mm_before"], "mean_mm": c["landmark_mm_after"], "median_mm": c["landmark_median_after"],
                              "p95_mm": c["landmark_p95_after"], "seconds": seconds,
                              "folding_percent": res.summary["folding_percent_all"], "nmi": res.summary["nmi_after"]}))
    return rows


def finetune(args) -> list:
    from groupmorph_pyro.train import load_checkpoint, validation_phantoms

    cfg = load_config(args.config)
    cfg.data.validation = heldout_kwargs(cfg, args.heldout, args.heldout_seed)
    _, guide, _ = load_checkpoint(args.checkpoint)
    guide.eval()
    k = cfg.model.num_timepoints
    serve = all_to_one(cfg).with_timepoints(k)
    groups = validation_phantoms(cfg)
    rows = []
    for name, (settings, steps) in SETS[args.set].items():
        run = with_settings(serve, settings)
        errors, seconds, kept, elbo, sigma = [], [], 0, [], []
        for j, g in enumerate(groups):
            res = register(g.images, run, guide if steps is not None else None, fixed=j % k, finetune_steps=steps)
            ft = res.summary["finetune"]
            errors.append(landmark_distances(g.landmarks, res.displacement, res.inverse_displacement, g.spacing).mean())
            seconds.append(res.summary["seconds"])
            kept += ft["kept"] == "refined"
            elbo.append(ft["elbo_loss_after"])
            sigma.append(float(np.median(res.scale)))
        rows.append(_say({"variant": name, "settings": settings, "steps": steps, "mean_mm": float(np.mean(errors)),
                          "per_group_mm": [float(e) for e in errors], "seconds_per_group": float(np.mean(seconds)),
                          "refined_kept": kept, "groups": len(groups), "elbo_loss_after": float(np.mean(elbo)),
                          "sigma_median": float(np.mean(sigma))}))
    return rows


def step_cost(args) -> list:
    from pyro.infer import Trace_ELBO

    from groupmorph_pyro.model import CaseGuide
    from groupmorph_pyro.registration import infer, prepare

    groups = {"synthetic-4dct": phantoms()["synthetic-4dct"]}
    try:
        from groupmorph_pyro.data import load_mni152
        from groupmorph_pyro.synthetic import anatomy_group

        m = load_mni152(3.5)
        groups["mni152-3.5mm"] = anatomy_group(m["t1"].data, m["grey"].data, m["white"].data, 4, m["t1"].spacing,
                                               amplitude_mm=6.0, num_landmarks=100, seed=1)
    except ImportError as err:
        print(f"probes.py: mni152-3.5mm skipped ({err})", file=sys.stderr)
    rows = []
    for series, g in groups.items():
        times = {True: [], False: []}
        for _ in range(args.repeats):
            for jitter in (False, True):
                cfg = Config().with_timepoints(4)
                cfg.model.jitter = jitter
                group = prepare(g.images, cfg)
                start = infer(group)
                guide = CaseGuide(start.loc, start.scale, group.model.prior_distribution(start.loc.shape[3:]))
                loss_fn = Trace_ELBO().differentiable_loss
                optim = torch.optim.Adam(guide.parameters(), lr=0.1)

                def step():
                    optim.zero_grad()
                    loss_fn(group.model, guide, group.x, group.fixed).backward()
                    optim.step()

                for _ in range(3):
                    step()
                clock = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times[jitter].append((time.perf_counter() - clock) / args.steps)
        for jitter, t in times.items():
            rows.append(_say({"series": series, "shape": list(g.images.shape[1:]), "jitter": jitter,
                              "seconds_per_step": float(np.mean(t)), "repeats": [float(x) for x in t]}))
    return rows


def _say(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("per-case", help="per-case registration of the two phantoms under setting variants")
    a.add_argument("--base", nargs="*", default=[], help="settings under every variant, e.g. model.jitter=false")
    a.add_argument("--set", choices=list(PER_CASE_SETS), default="gap", help="gap: the phantom-gap probes (accuracy); "
                   "speed: per-case speed knobs on the defaults")
    a.add_argument("--variants", nargs="*", help="a subset of the set's variants (default: all)")
    b = sub.add_parser("finetune", help="fine-tuning variants on a trained network's held-out groups")
    b.add_argument("--config", required=True)
    b.add_argument("--checkpoint", required=True)
    b.add_argument("--set", choices=list(SETS), default="lr", help="lr: SGD's step and step count when fine-tuning (and the per-case row)")
    b.add_argument("--heldout", type=int, default=8)
    b.add_argument("--heldout-seed", type=int, default=10000)
    c = sub.add_parser("step-cost", help="seconds per per-case SVI step, jitter on and off")
    c.add_argument("--steps", type=int, default=15)
    c.add_argument("--repeats", type=int, default=2)
    for s in (a, b, c):
        s.add_argument("--out", required=True)
        s.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args(argv)
    try:  # bad settings or inputs: one line and exit 2, before any work
        if args.command == "per-case":
            with_settings(Config(), args.base)
            unknown = sorted(set(args.variants or ()) - set(PER_CASE_SETS[args.set]))
            if unknown:
                raise InputError(f"--variants: {unknown} not in --set {args.set}: expected some of {list(PER_CASE_SETS[args.set])}")
        elif args.command == "finetune":
            for path in (args.config, args.checkpoint):
                if not Path(path).is_file():
                    raise InputError(f"no such file: {path}")
        elif min(args.steps, args.repeats) < 1:
            raise InputError(f"--steps and --repeats: expected integers >= 1, got {args.steps} and {args.repeats}")
    except InputError as err:
        p.error(str(err))
    torch.set_num_threads(args.threads)
    stamp = record("probes.py", argv, args.threads)
    rows = {"per-case": per_case, "finetune": finetune, "step-cost": step_cost}[args.command](args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    named = args.command == "finetune" or (args.command == "per-case" and args.set != "gap")
    write_json(out / f"probes-{args.command}{'-' + args.set if named else ''}.json",
               {**stamp, "finished": now(), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
