"""Trajectories, ventilation, the mid-position image and enhancement curves (groupmorph_pyro.derived and
their subcommands), pinned to closed forms: a stored registration whose maps are known analytic fields
(each component a sine along its own axis, so det J, the inverse maps and the mean position are
closed forms evaluated in float64 NumPy), and images made from analytic functions through the exact
inverse maps."""
import csv
import json
import re

import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from groupmorph_pyro.checks import InputError
from groupmorph_pyro.cli import main
from groupmorph_pyro.data import write_landmarks
from groupmorph_pyro.derived import curves, midposition, trajectory, ventilation, ventilation_summary, write_midposition
from groupmorph_pyro.outputs import write_registration
from groupmorph_pyro.results import RegistrationResult
from groupmorph_pyro.transfer import load_registration
from groupmorph_pyro.volumes import load_volume, save_nifti

SHAPE, K = (20, 18, 16), 3
SPACING = (1.5, 2.0, 2.5)
OMEGA = np.array([2 * np.pi / (n - 1) for n in SHAPE])
PHASE = np.array([0.3, 1.1, 2.0])
AMPLITUDE = np.array([[0.0, 0.0, 0.0], [1.0, -0.8, 0.6], [-0.6, 0.9, 0.8]])  # voxels; timepoint 0 fixed (identity)
MARGIN = 3  # voxels from the border left out where the maps carry points off the grid


def u(k, x):
    """Analytic φ_k − Id at (..., 3) voxel coordinates: component c is A_kc sin(ω_c x_c + θ_c)."""
    return AMPLITUDE[k] * np.sin(OMEGA * x + PHASE)


def det_u(k, x):
    """Closed-form det J of φ_k at x: the product of 1 + A_kc ω_c cos(ω_c x_c + θ_c)."""
    return np.prod(1 + AMPLITUDE[k] * OMEGA * np.cos(OMEGA * x + PHASE), axis=-1)


def det_u_differences(k, x):
    """det J of φ_k by central differences on the unit grid, in closed form: ω cos becomes sin(ω) cos."""
    return np.prod(1 + AMPLITUDE[k] * np.sin(OMEGA) * np.cos(OMEGA * x + PHASE), axis=-1)


def inverse(fn, y, iterations=200):
    """x with x + fn(x) = y, by fixed-point iteration in continuous space (float64)."""
    x = y.copy()
    for _ in range(iterations):
        x = y - fn(x)
    return x


def grid():
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in SHAPE], indexing="ij"), -1)  # (D, H, W, 3)


def reference_image(x, k=0):
    """An analytic image at (..., 3) voxel coordinates; k > 0 adds k units of uptake (DCE-like) in a region."""
    base = 0.5 + 0.2 * np.sin(0.45 * x[..., 0]) * np.cos(0.35 * x[..., 1]) + 0.15 * np.sin(0.3 * x[..., 2] + 0.5)
    ramp = 0.5 * (1 + np.tanh((x[..., 0] - 10.0) / 3.0))  # the enhancing region: x_0 > 10, a smooth edge
    return base + 0.3 * k * ramp


def interior(a):
    m = MARGIN
    return a[m:-m, m:-m, m:-m]


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A registration folder (all-to-one, fixed 0) holding the analytic maps, inputs x_k = R_k ∘ φ_k⁻¹
    (R_k the reference image with k units of uptake) saved as NIfTI files it names."""
    root = tmp_path_factory.mktemp("derived")
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = [-10.0, 4.0, 7.0]
    x = grid()
    disp = np.stack([np.moveaxis(u(k, x), -1, 0) for k in range(K)])  # (K, 3, D, H, W)
    inv_points = [inverse(lambda p, k=k: u(k, p), x) for k in range(K)]
    inv = np.stack([np.moveaxis(p - x, -1, 0) for p in inv_points])
    images = np.stack([reference_image(inv_points[k], k) for k in range(K)]).astype(np.float32)  # x_k = R_k ∘ φ_k⁻¹
    warped = np.stack([reference_image(x, k) for k in range(K)]).astype(np.float32)  # x_k ∘ φ_k = R_k
    jac = np.stack([det_u(k, x) for k in range(K)])
    result = RegistrationResult(warped, disp, inv, jac, disp[1:, None], np.ones_like(disp[1:, None]),
                                {"mode": "all-to-one", "fixed": 0})
    inputs = [root / f"t{k}.nii.gz" for k in range(K)]
    for k in range(K):
        save_nifti(inputs[k], images[k], affine)
    write_registration(result, root / "reg", affine, inputs)
    return {"root": root, "reg": root / "reg", "inputs": inputs, "affine": affine, "images": images}


# ---- ventilation -------------------------------------------------------------------------------------

def numpy_det(points):
    """det J by float64 NumPy central differences (one-sided at borders) of a map given by its values
    ``(D, H, W, 3)`` at the voxel centres."""
    grads = [np.gradient(points[..., c], axis=(0, 1, 2)) for c in range(3)]
    jac = np.stack([np.stack(g, -1) for g in grads], -2)  # (D, H, W, 3, 3)
    return np.linalg.det(jac)


def test_ventilation_is_det_j_minus_one_of_the_map_from_source_to_target(stored):
    reg = load_registration(stored["reg"])
    x = grid()
    got = ventilation(reg, 0, 1)  # 0 -> 1: q -> φ_1(q), the stored map itself
    assert got.shape == SHAPE and got.dtype == np.float64
    np.testing.assert_allclose(interior(got), interior(det_u_differences(1, x) - 1), atol=1e-5)  # float32 files
    assert np.abs(interior(got - (det_u(1, x) - 1))).max() < 0.03  # central differences against the continuous det J
    assert np.abs(interior(got)).max() > 0.3  # the field varies: expansion and compression
    back = inverse(lambda p: u(1, p), x)  # 1 -> 0: q -> φ_1⁻¹(q), the stored inverse map
    np.testing.assert_allclose(interior(ventilation(reg, 1, 0)), interior(numpy_det(back) - 1), atol=1e-4)
    assert np.abs(interior(ventilation(reg, 1, 0) - (1 / det_u(1, back) - 1))).max() < 0.15  # 1 / det J φ_1 there
    chained = back + u(2, back)  # 1 -> 2: q -> φ_2(φ_1⁻¹(q)); φ_2 interpolated trilinearly at φ_1⁻¹(q)
    got_12 = ventilation(reg, "1", "2")
    assert np.abs(interior(got_12 - (numpy_det(chained) - 1))).max() < 0.05
    assert np.abs(interior(got_12 - (det_u(2, back) / det_u(1, back) - 1))).max() < 0.25  # the chain rule's product


def tissue(x):
    """An analytic tissue fraction (1 + HU / 1000) at (..., 3) voxel coordinates, 0.15 to 0.35 (lung-like)."""
    return 0.25 + 0.1 * np.sin(0.4 * x[..., 0]) * np.cos(0.3 * x[..., 1])


def hu_images(stored):
    """CT-like timepoints in HU that keep the tissue mass under the stored maps: timepoint k shows, at
    φ_k(p), the fraction f_0(p) / det J_k(p) (timepoint 0's map is the identity)."""
    x = grid()
    out = []
    for k in range(K):
        p = inverse(lambda q, k=k: u(k, q), x)  # φ_k⁻¹ at every voxel of timepoint k
        out.append(1000.0 * (tissue(p) / det_u(k, p) - 1.0))
    return np.stack(out).astype(np.float32)


def test_hu_ventilation_recovers_det_j_from_densities_that_keep_the_mass(stored):
    from groupmorph_pyro.derived import TISSUE_FRACTION_FLOOR, tissue_fraction

    reg = load_registration(stored["reg"])
    x, hu = grid(), hu_images(stored)
    got = ventilation(reg, 0, 1, method="hu", images=hu)
    assert got.shape == SHAPE and got.dtype == np.float64
    # the discrete reference: timepoint 1's HU read at φ_1(q) by float64 trilinear interpolation (SciPy)
    moved = map_coordinates(hu[1].astype(np.float64), np.moveaxis(x + u(1, x), -1, 0), order=1, mode="nearest")
    np.testing.assert_allclose(interior(got), interior((1 + hu[0] / 1000) / (1 + moved / 1000) - 1), atol=1e-4)
    truth = det_u(1, x) - 1  # the continuous det J: off by the interpolation of timepoint 1 only
    assert np.abs(interior(got - truth)).max() < 0.03 and np.abs(interior(got - truth)).mean() < 0.01
    assert np.abs(interior(truth)).max() > 0.3
    back = inverse(lambda p: u(1, p), x)  # 1 -> 0: the tissue at q of timepoint 1 came from φ_1⁻¹(q)
    assert np.abs(interior(ventilation(reg, 1, 0, "hu", hu) - (1 / det_u(1, back) - 1))).max() < 0.03
    np.testing.assert_allclose(tissue_fraction(np.array([-1000.0, -500.0, 0.0, 40.0])),
                               [TISSUE_FRACTION_FLOOR, 0.5, 1.0, 1.04])
    with pytest.raises(InputError, match=r"method \(--method\): expected one of \('jacobian', 'hu'\), got 'density'"):
        ventilation(reg, 0, 1, method="density", images=hu)
    with pytest.raises(InputError, match=r"images: expected the K = 3 timepoints on the registration's grid"):
        ventilation(reg, 0, 1, method="hu")
    with pytest.raises(InputError, match="method hu: expected two timepoints"):
        ventilation(reg, "common", 1, method="hu", images=hu)


def test_cli_hu_ventilation_reads_the_given_images(stored, tmp_path, capsys):
    hu = hu_images(stored)
    paths = [tmp_path / f"hu{k}.nii.gz" for k in range(K)]
    for k in range(K):
        save_nifti(paths[k], hu[k], stored["affine"])
    mask = _mask_file(stored, tmp_path)
    assert main(["ventilation", str(stored["reg"]), "--from", "0", "--to", "1", "--mask", str(mask), "--method", "hu",
                 "--images", *map(str, paths), "--out", str(tmp_path / "vent.nii.gz")]) == 0
    vent, inside = load_volume(tmp_path / "vent.nii.gz").data, load_volume(mask).data > 0
    np.testing.assert_allclose(vent, np.where(inside, ventilation(load_registration(stored["reg"]), 0, 1, "hu", hu), 0),
                               atol=1e-6)
    assert (vent[~inside] == 0).all() and np.abs(vent[inside]).max() > 0.2
    summary = json.loads((tmp_path / "vent.json").read_text())
    assert summary["method"] == "hu" and summary["images"] == [str(p.resolve()) for p in paths]
    assert "ventilation 0 -> 1 (hu): mean" in capsys.readouterr().out


def test_ventilation_summary_per_label_matches_numpy(stored):
    reg = load_registration(stored["reg"])
    values = ventilation(reg, 0, 1)
    mask = np.zeros(SHAPE, int)
    mask[2:10, 2:-2, 2:-2], mask[10:-2, 2:-2, 2:-2] = 1, 3  # two "lobes"
    s = ventilation_summary(values, mask, SPACING)
    voxel_ml = np.prod(SPACING) / 1000
    for label, region in (("1", mask == 1), ("3", mask == 3)):
        v = values[region]
        f = s["labels"][label]
        assert f["voxels"] == region.sum() and f["volume_ml"] == pytest.approx(region.sum() * voxel_ml)
        assert (f["mean"], f["sd"], f["p50"]) == pytest.approx((v.mean(), v.std(), np.median(v)))
        assert f["volume_change_ml"] == pytest.approx(v.sum() * voxel_ml)
        assert (f["p5"], f["p95"]) == pytest.approx(tuple(np.percentile(v, [5, 95])))
    assert s["all"]["voxels"] == (mask > 0).sum() and set(s["labels"]) == {"1", "3"}


# ---- trajectories ------------------------------------------------------------------------------------

def test_trajectory_follows_the_closed_form_maps(stored):
    reg = load_registration(stored["reg"])
    rng = np.random.default_rng(0)
    points = rng.uniform(MARGIN, np.array(SHAPE) - 1 - MARGIN, size=(12, 3))
    path = trajectory(reg, points, 0)  # frame 0 = the common frame (fixed): row k = φ_k(p)
    assert path.shape == (K, 12, 3)
    for k in range(K):
        assert np.abs(path[k] - (points + u(k, points))).max() < 0.02  # trilinear interpolation of the map
    from_1 = trajectory(reg, points, 1)  # points of timepoint 1: φ_k(φ_1⁻¹(p))
    common = inverse(lambda p: u(1, p), points)
    np.testing.assert_array_equal(from_1[1], points)
    for k in range(K):
        assert np.abs(from_1[k] - (common + u(k, common))).max() < 0.05


# ---- mid-position -----------------------------------------------------------------------------------

def test_midposition_is_the_group_seen_from_its_mean_position(stored):
    """Truth: R_k at m⁻¹(y), m = (1/K) Σ φ_k, averaged; m⁻¹ solved in continuous space."""
    reg = load_registration(stored["reg"])
    x = grid()
    mean_u = lambda p: np.mean([u(k, p) for k in range(K)], axis=0)  # noqa: E731
    at = inverse(mean_u, x)
    truth = np.mean([reference_image(at, k) for k in range(K)], axis=0)
    got = midposition(reg, stored["images"])
    assert got.shape == SHAPE and got.dtype == np.float32
    err = np.abs(interior(got - truth))
    phases = [np.abs(interior(stored["images"][k] - truth)).mean() for k in range(K)]
    assert err.max() < 0.03 and err.mean() < 0.3 * min(phases)  # every single phase is much farther away


# ---- enhancement curves -----------------------------------------------------------------------------

def test_curves_after_registration_recover_the_uptake_and_subtractions(stored):
    reg = load_registration(stored["reg"])
    x = grid()
    labels = np.zeros(SHAPE, int)
    labels[8:13, 4:-4, 4:-4] = 2  # across the enhancing region's edge, drawn in frame 0
    labels[4:7, 4:7, 4:7] = 5  # outside it
    truth = np.array([[reference_image(x[labels == v], k).mean() for v in (2, 5)] for k in range(K)])
    out = curves(reg, stored["images"], labels, 0)
    assert out["labels"] == [2, 5] and out["voxels"] == [5 * 10 * 8, 27]
    after, before = np.abs(out["after"] - truth), np.abs(out["before"] - truth)
    assert after.max() < 0.008 and before.max() > 5 * after.max()  # the motion blurs the raw curve; moved back, it is the truth
    sub = out["subtraction_after"][2] - (reference_image(x, 2) - reference_image(x, 0))
    assert np.abs(interior(sub)).max() < 0.03
    np.testing.assert_allclose(out["subtraction_before"][2], stored["images"][2] - stored["images"][0], atol=1e-6)


# ---- files and the command line ----------------------------------------------------------------------

def _mask_file(stored, tmp_path, name="mask.nii.gz", shape=SHAPE, affine=None, value=1):
    mask = np.zeros(shape, np.int16)
    mask[3:-3, 3:-3, 3:-3] = value
    path = tmp_path / name
    save_nifti(path, mask, stored["affine"] if affine is None else affine, dtype=np.int16)
    return path


def test_cli_writes_every_output(stored, tmp_path, capsys):
    reg = stored["reg"]
    mask = _mask_file(stored, tmp_path)
    assert main(["ventilation", str(reg), "--from", "0", "--to", "1", "--mask", str(mask),
                 "--out", str(tmp_path / "vent.nii.gz")]) == 0
    summary = json.loads((tmp_path / "vent.json").read_text())
    vent = load_volume(tmp_path / "vent.nii.gz").data
    inside = load_volume(mask).data > 0
    truth = det_u(1, grid()) - 1
    assert np.abs(vent[inside] - truth[inside]).max() < 0.06 and (vent[~inside] == 0).all()
    assert summary["all"]["mean"] == pytest.approx(float(vent[inside].mean()), abs=1e-6)
    assert (tmp_path / "vent.png").stat().st_size > 1000 and "ventilation 0 -> 1 (jacobian): mean" in capsys.readouterr().out

    assert main(["midposition", str(reg), "--out", str(tmp_path / "midp.nii.gz")]) == 0
    np.testing.assert_allclose(load_volume(tmp_path / "midp.nii.gz").data,
                               midposition(load_registration(reg), stored["images"]), atol=1e-6)
    assert (tmp_path / "midp.png").is_file()

    points = np.array([[5.0, 6.0, 7.0], [12.5, 9.0, 8.0]])
    write_landmarks(tmp_path / "points.txt", points)  # DIR-Lab text, 1-based
    assert main(["trajectory", str(reg), "--points", str(tmp_path / "points.txt"), "--frame", "0",
                 "--out", str(tmp_path / "traj.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "traj.csv")))
    assert [(r["timepoint"], r["point"]) for r in rows[:3]] == [("0", "0"), ("0", "1"), ("1", "0")] and len(rows) == 6
    world = np.array([[float(r[c]) for c in "xyz"] for r in rows]).reshape(K, 2, 3)
    vox = (np.linalg.inv(stored["affine"]) @ np.c_[world.reshape(-1, 3), np.ones(6)].T)[:3].T.reshape(K, 2, 3)
    np.testing.assert_allclose(vox, trajectory(load_registration(reg), points, 0), atol=1e-5)
    assert (tmp_path / "traj.png").is_file()

    labels = _mask_file(stored, tmp_path, "labels.nii.gz", value=4)
    assert main(["curves", str(reg), "--labels", str(labels), "--frame", "0", "--out", str(tmp_path / "c.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "c.csv")))
    assert [r["timepoint"] for r in rows] == ["0", "1", "2"] and {r["label"] for r in rows} == {"4"}
    for k in (1, 2):
        for when in ("before", "after"):
            assert (tmp_path / f"c_subtraction_{k}_{when}.nii.gz").is_file()
    assert (tmp_path / "c.png").is_file() and not (tmp_path / "c_subtraction_0_before.nii.gz").exists()


def _listing(path):
    return sorted(p.name for p in path.iterdir())


@pytest.mark.parametrize("case", ["frame", "same", "grid", "empty", "fractional", "images", "gone", "clobber",
                                  "samples", "not-hu"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(stored, tmp_path, capsys, case):
    reg = str(stored["reg"])
    mask = _mask_file(stored, tmp_path)
    out = tmp_path / "out.nii.gz"
    argv, expected = {
        "frame": (["trajectory", reg, "--points", str(tmp_path / "p.txt"), "--frame", "3", "--out", str(tmp_path / "t.csv")],
                  r"frame \(--frame\): expected a timepoint 0..2 or 'common', got 3"),
        "same": (["ventilation", reg, "--from", "1", "--to", "1", "--mask", str(mask), "--out", str(out)],
                 "expected two different timepoints, got 1 twice"),
        "grid": (["ventilation", reg, "--from", "0", "--to", "1", "--out", str(out), "--mask",
                  str(_mask_file(stored, tmp_path, "small.nii.gz", shape=(10, 18, 16)))],
                 r"the mask is not on the registration's grid \(shape \(10, 18, 16\) vs \(20, 18, 16\)"),
        "empty": (["curves", reg, "--frame", "0", "--out", str(tmp_path / "c.csv"), "--labels",
                   str(_mask_file(stored, tmp_path, "zero.nii.gz", value=0))], "no voxel inside"),
        "fractional": (["ventilation", reg, "--from", "0", "--to", "2", "--out", str(out), "--mask",
                        str(_fractional(stored, tmp_path))], "expected integer labels"),
        "images": (["midposition", reg, "--out", str(out), "--images", *map(str, stored["inputs"][:2])],
                   "--images: expected K = 3 files, one per timepoint, got 2"),
        "gone": (["midposition", reg, "--out", str(out), "--images", *map(str, stored["inputs"][:2]),
                  str(tmp_path / "missing.nii.gz")], "missing.nii.gz"),
        "clobber": (["midposition", reg, "--out", str(stored["inputs"][1])], "refusing to overwrite input file"),
        "samples": (["trajectory", reg, "--points", str(tmp_path / "p.txt"), "--frame", "0", "--samples", "-1",
                     "--out", str(tmp_path / "t.csv")], r"--samples: expected an integer >= 0, got -1"),
        "not-hu": (["ventilation", reg, "--from", "0", "--to", "1", "--mask", str(mask), "--method", "hu", "--out", str(out)],
                   r"method hu: expected CT in HU inside the mask, timepoint 0 \(lung: about -900 to -500 HU\), got a median "
                   r"of 0\.\d+; give the images in HU or use --method jacobian"),
    }[case]
    write_landmarks(tmp_path / "p.txt", np.array([[5.0, 5.0, 5.0]]))
    before = _listing(tmp_path), _listing(stored["reg"])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("groupmorph: error: ") and err.count("\n") == 1
    assert re.search(expected, err), err
    assert (_listing(tmp_path), _listing(stored["reg"])) == before


def _fractional(stored, tmp_path):
    mask = np.zeros(SHAPE, np.float32)
    mask[5:8, 5:8, 5:8] = 0.5
    path = tmp_path / "fractional.nii.gz"
    save_nifti(path, mask, stored["affine"])
    return path


def test_missing_inputs_are_named_and_images_can_be_given(stored, tmp_path):
    """A folder whose inputs were moved: one line saying so; --images (write_midposition's images) instead."""
    import shutil

    reg = tmp_path / "reg"
    shutil.copytree(stored["reg"], reg)
    summary = json.loads((reg / "summary.json").read_text())
    summary["inputs"] = [str(tmp_path / f"gone_{k}.nii.gz") for k in range(K)]
    (reg / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(InputError, match=r"the registration's inputs are gone \(.*gone_0.nii.gz, 3 of 3\); give the K "
                                         r"timepoints with --images"):
        write_midposition(reg, tmp_path / "m.nii.gz")
    out, _ = write_midposition(reg, tmp_path / "m.nii.gz", images=stored["inputs"])
    assert load_volume(out).data.shape == SHAPE
    with pytest.raises(InputError, match=r"labels: expected an array on the registration's grid \(20, 18, 16\)"):
        curves(load_registration(reg), stored["images"], np.ones((4, 4, 4), int), 0)
    with pytest.raises(InputError, match=r"images: expected the K = 3 timepoints on the registration's grid"):
        midposition(load_registration(reg), stored["images"][:2])
