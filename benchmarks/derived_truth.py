"""The derived outputs of a registration against the phantoms' known truth: the mid-position image, the
landmarks' trajectories with their 90 % bands, ventilation with its posterior sd, enhancement curves
and label probabilities (the cases tests/test_derived_truth.py and tests/test_stored_posterior.py use).

    python benchmarks/derived_truth.py --out benchmarks/results/derived-truth
    python benchmarks/derived_truth.py --out /tmp/dt --set register.scale_beta=0.5   # a setting on top

Breathing phantom 40×40×32, K = 4, amplitude 3, seed 3 (noise-free): the mid-position image against
the reference seen from the mean position of its points (RMSE, NCC; each phase's too); phase 0's
landmarks followed to phases 1–3 (mean error in mm, the identity's, and how often the 5th–95th
percentile band of 20 posterior draws holds the truth on all three axes); ventilation 0 → 3 against
det J − 1 of the true map inside the voxels that move by more than half a voxel (mean, MAE,
correlation, the posterior sd of 10 draws). DCE phantom 48×48×32, K = 4, amplitude 2.5, seed 2:
the mean curve error (timepoints 1–3) of a small lesion and the gland, before and after
registration, against the curves the true maps give. Label probabilities (16 draws) of a breathing
phantom (seed 5, noise 0.02) carried 0 → 3: Brier score near boundaries against the labels the true
motion carries, beside the posterior mean's label map and the unmoved labels. Writes
``derived_truth.json`` (command, commit, machine, figures).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

import numpy as np
import torch
from scipy.ndimage import binary_dilation

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from provenance import now, record  # noqa: E402
from settings import with_settings  # noqa: E402

from groupmorph_pyro.checks import InputError  # noqa: E402
from groupmorph_pyro.config import Config  # noqa: E402
from groupmorph_pyro.derived import (curves, label_probabilities, midposition, trajectory,  # noqa: E402
                                     trajectory_samples, ventilation, ventilation_sd)
from groupmorph_pyro.files import write_json  # noqa: E402
from groupmorph_pyro.outputs import load_posterior_state, write_registration  # noqa: E402
from groupmorph_pyro.registration import register  # noqa: E402
from groupmorph_pyro.spatial import integrate_velocity, invert_displacement, jacobian_determinant, warp  # noqa: E402
from groupmorph_pyro.synthetic import breathing_phantom, dce_phantom  # noqa: E402
from groupmorph_pyro.transfer import load_registration, transfer_labels  # noqa: E402


K = 4


def registered(group, root: pathlib.Path, name: str, settings=()):
    """``(StoredRegistration, posterior state)`` of ``register`` with the defaults and ``settings``
    (``section.key=value``), written to ``root/name``."""
    cfg = with_settings(Config().with_timepoints(group.images.shape[0]), settings, "--set")
    result = register(group.images, cfg, seed=0, affine=group.affine)
    write_registration(result, root / name, group.affine, itk=False)
    return load_registration(root / name), load_posterior_state(root / name)


def rmse(a, b) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)))


def ncc(a, b) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def breathing_figures(root: pathlib.Path, settings=()) -> dict:
    """Mid-position, trajectories and ventilation of the noise-free breathing phantom."""
    g = breathing_phantom((40, 40, 32), K, amplitude=3.0, noise=0.0, seed=3)
    reg, state = registered(g, root, "breathing", settings)
    inv = integrate_velocity(-torch.from_numpy(g.velocities).double())  # ψ_k⁻¹ − Id
    truth = warp(torch.from_numpy(g.images[:1]).double()[None], invert_displacement(inv.mean(0, keepdim=True)))[0, 0].numpy()
    mid = midposition(reg, g.images)
    out = {"midposition": {"rmse": rmse(mid, truth), "ncc": ncc(mid, truth),
                           "phase_rmse": [rmse(g.images[k], truth) for k in range(K)],
                           "phase_ncc": [ncc(g.images[k], truth) for k in range(K)]}}
    sp = np.asarray(g.spacing)
    error = np.linalg.norm((trajectory(reg, g.landmarks[0], 0) - g.landmarks) * sp, axis=-1)[1:]
    identity = np.linalg.norm((g.landmarks[:1] - g.landmarks) * sp, axis=-1)[1:]
    draws = trajectory_samples(reg, state, g.landmarks[0].astype(np.float64), 0, 20, seed=1)[:, 1:]
    lo, hi = np.percentile(draws, 5, axis=0), np.percentile(draws, 95, axis=0)
    inside = (g.landmarks[1:] >= lo) & (g.landmarks[1:] <= hi)
    out["trajectory"] = {"error_mm": float(error.mean()), "identity_mm": float(identity.mean()),
                         "band_coverage_all_axes": float(inside.all(-1).mean()), "band_coverage_per_axis": float(inside.mean()),
                         "band_width_mm": float(((hi - lo) * sp).mean()), "n": int(error.size)}
    j = K - 1
    true_vent = jacobian_determinant(integrate_velocity(-torch.from_numpy(g.velocities[j:j + 1]).double()))[0].numpy() - 1
    vent, sd = ventilation(reg, 0, j), ventilation_sd(reg, state, 0, j, 10)
    moving = np.linalg.norm(g.velocities[j], axis=0) > 0.5
    out["ventilation"] = {"truth_mean": float(true_vent[moving].mean()), "mean": float(vent[moving].mean()),
                          "mae": float(np.abs(vent - true_vent)[moving].mean()),
                          "corr": float(np.corrcoef(vent[moving], true_vent[moving])[0, 1]), "voxels": int(moving.sum()),
                          "posterior_sd_mean": float(sd[moving].mean()),
                          "abs_error_within_1.645sd": float((np.abs(vent - true_vent) <= 1.645 * sd)[moving].mean())}
    return out


def curve_figures(root: pathlib.Path, settings=()) -> dict:
    """Lesion and gland curve errors of the DCE phantom before and after registration."""
    moving = dce_phantom((48, 48, 32), K, amplitude=2.5, noise=0.0, seed=2)
    still = dce_phantom((48, 48, 32), K, amplitude=0.0, noise=0.0, seed=2)
    rise = still.images[-1] - still.images[0]
    labels = np.where(rise > 0.35, 1, np.where((rise > 0.15) & (rise < 0.3), 2, 0))
    back = warp(torch.from_numpy(moving.images)[:, None], integrate_velocity(-torch.from_numpy(moving.velocities)))[:, 0].numpy()
    truth = np.array([[back[k][labels == v].mean() for v in (1, 2)] for k in range(K)])
    reg, _ = registered(moving, root, "dce", settings)
    c = curves(reg, moving.images, labels, 0)
    before, after = np.abs(c["before"] - truth)[1:], np.abs(c["after"] - truth)[1:]
    return {"lesion_error_before": float(before[:, 0].mean()), "lesion_error_after": float(after[:, 0].mean()),
            "gland_error_before": float(before[:, 1].mean()), "gland_error_after": float(after[:, 1].mean()),
            "lesion_voxels": int((labels == 1).sum()), "gland_voxels": int((labels == 2).sum())}


def label_figures(root: pathlib.Path, settings=()) -> dict:
    """Brier scores near boundaries of labels carried 0 -> 3 (16 posterior draws, the mean's map, unmoved)."""
    g = breathing_phantom((40, 40, 32), 4, amplitude=3.0, noise=0.02, seed=5)
    clean = breathing_phantom((40, 40, 32), 4, amplitude=3.0, noise=0.0, seed=5).images
    reg, state = registered(g, root, "labels", settings)
    labels = np.where(clean[0] > 0.4, 2, np.where(clean[0] > 0.3, 1, 0))
    true_map = integrate_velocity(torch.from_numpy(g.velocities[3:4]).double())
    truth = warp(torch.from_numpy(labels).double()[None, None], true_map, mode="nearest")[0, 0].numpy().round()
    values, probs = label_probabilities(reg, state, labels, 0, 3, 16)
    onehot = np.stack([truth == v for v in values]).astype(float)
    edges = np.zeros(truth.shape, bool)
    for v in values:
        region = truth == v
        edges |= binary_dilation(region, iterations=2) & ~region

    def brier(prob) -> float:
        return float(((prob - onehot) ** 2).sum(0)[edges].mean())

    mean_map = transfer_labels(labels, reg, 0, 3)
    return {"brier_samples16": brier(probs), "brier_mean_field_map": brier(np.stack([mean_map == v for v in values]).astype(float)),
            "brier_unmoved": brier(np.stack([labels == v for v in values]).astype(float)), "edge_voxels": int(edges.sum())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for derived_truth.json")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                   help="settings on top of the defaults, e.g. register.scale_beta=0.5")
    args = p.parse_args(argv)
    try:  # a bad setting fails here, before any registration
        with_settings(Config(), args.set, "--set")
    except InputError as err:
        p.error(str(err))
    torch.set_num_threads(args.threads)
    stamp = record("derived_truth.py", argv, args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        out = {**breathing_figures(root, args.set), "curves": curve_figures(root, args.set),
               "label_probabilities": label_figures(root, args.set)}
    write_json(pathlib.Path(args.out) / "derived_truth.json", {**stamp, "finished": now(), **out})
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
