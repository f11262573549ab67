"""Applying a stored registration (groupmorph apply, apply_registration) and the ITK-convention fields,
checked against independent references (float64 NumPy / SciPy composition) and real clients
(SimpleITK, antspyx) on an oblique, flipped, anisotropic grid with a non-zero origin."""
import csv
import hashlib
import json
import re
import shutil

import nibabel as nib

import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from conftest import smooth_field, smooth_image
from groupmorph_pyro import apply_registration
from groupmorph_pyro.checks import InputError
from groupmorph_pyro.cli import main
from groupmorph_pyro.data import read_landmarks, write_landmarks
from groupmorph_pyro.outputs import write_registration
from groupmorph_pyro.results import RegistrationResult
from groupmorph_pyro.spatial import integrate_velocity, jacobian_determinant, warp
from groupmorph_pyro.transfer import load_registration, transfer_field, transfer_points
from groupmorph_pyro.volumes import load_volume, save_nifti

SHAPE, K = (16, 14, 12), 3
SPACING = (1.5, 2.0, 2.5)


def oblique_affine():
    """Voxel -> RAS mm: a flipped first axis, a 20° rotation about z, anisotropic voxels, an origin off zero."""
    c, s = np.cos(0.35), np.sin(0.35)
    a = np.eye(4)
    a[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ np.diag([-1.0, 1, 1]) @ np.diag(SPACING)
    a[:3, 3] = [-30.0, 12.0, 5.0]
    return a


def to_lps(affine, vox):
    """(L, 3) voxel coordinates -> (L, 3) physical LPS mm (ITK's world)."""
    return (affine @ np.c_[vox, np.ones(len(vox))].T)[:3].T * [-1.0, -1.0, 1.0]


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A registration folder written by write_registration from known smooth diffeomorphisms
    (φ_k = exp(v_k), φ_k⁻¹ = exp(−v_k), up to 2 voxels), every timepoint moving (all-moving mode)."""
    root = tmp_path_factory.mktemp("stored")
    affine = oblique_affine()
    v = torch.cat([smooth_field(SHAPE, 2.0, seed=k) for k in range(K)]).double()
    disp, inv = integrate_velocity(v), integrate_velocity(-v)
    x = torch.cat([smooth_image(SHAPE, seed=10 + k) for k in range(K)]).double()
    warped = warp(x, disp)[:, 0]
    result = RegistrationResult(warped.numpy(), disp.numpy(), inv.numpy(), jacobian_determinant(disp).numpy(),
                                v.numpy(), np.ones_like(v.numpy()), {"mode": "all-moving", "fixed": None})
    inputs = [root / f"t{k}.nii.gz" for k in range(K)]
    for k in range(K):
        save_nifti(inputs[k], x[k, 0].numpy(), affine)
    write_registration(result, root / "reg", affine, inputs)
    return {"root": root, "reg": root / "reg", "inputs": inputs, "affine": affine, "disp": disp.numpy(),
            "inv": inv.numpy(), "images": x[:, 0].numpy()}


def numpy_map(field, points):
    """Trilinear float64 SciPy interpolation of a (3, D, H, W) field at (L, 3) points, plus the points."""
    return points + np.stack([map_coordinates(field[c], points.T, order=1, mode="nearest") for c in range(3)], axis=1)


def grid_points():
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in SHAPE], indexing="ij"), -1).reshape(-1, 3)


# ---- the maps, against an independent float64 reference ------------------------------------------------

@pytest.mark.parametrize("source,target", [(0, 2), (2, 1), ("common", 1), (1, "common")])
def test_transfer_field_is_phi_source_after_inverse_phi_target(stored, source, target):
    reg = load_registration(stored["reg"])
    field = transfer_field(reg, source, target)
    q = grid_points()
    mapped = q if target == "common" else numpy_map(stored["inv"][target], q)  # φ_J⁻¹(q)
    if source != "common":
        mapped = numpy_map(stored["disp"][source], mapped)  # φ_I(·)
    np.testing.assert_allclose(field.reshape(3, -1).T, mapped - q, atol=1e-5)  # stored as float32 world mm


def test_points_follow_the_forward_map_and_round_trip(stored):
    reg = load_registration(stored["reg"])
    pts = np.array([[3.2, 4.1, 5.5], [10.0, 7.0, 2.5], [8.0, 8.0, 8.0], [14.5, 1.0, 10.0]])
    out = transfer_points(pts, reg, 0, 2)
    expected = numpy_map(stored["disp"][2], numpy_map(stored["inv"][0], pts))  # φ_2(φ_0⁻¹(p))
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert np.abs(out - pts).max() > 0.5  # the maps really move these points
    back = transfer_points(out, reg, 2, 0)
    assert np.abs(back - pts).max() < 0.05  # voxels; inverse consistency of exp(±v) plus interpolation
    # every grid point of every timepoint, there and back (points carried off the grid come back too)
    q = grid_points()
    for i, j in [(0, 1), (1, 2), (2, 0), (0, "common")]:
        error = np.abs(transfer_points(transfer_points(q, reg, i, j), reg, j, i) - q).max(axis=1)
        # measured with maps up to 2 voxels: mean 0.024-0.031 voxels; max 0.18 where the points stay on the
        # grid, 0.54 where they leave it (there the maps are continued by their border values, not inverted)
        assert error.mean() < 0.05 and error.max() < 0.6


def test_image_to_common_frame_reproduces_warped(stored):
    for k in range(K):
        moved = apply_registration(stored["reg"], k, "common", image=stored["images"][k])
        np.testing.assert_allclose(moved, load_volume(stored["reg"] / f"warped_{k}.nii.gz").data, atol=1e-6)


def test_bspline_interpolation_is_exact_for_a_quadratic_image(stored):
    """Cubic B-splines reproduce quadratics, trilinear interpolation does not: pins the bspline path's values."""
    q = grid_points()
    f = lambda p: 0.1 * p[:, 0] ** 2 - 0.01 * p[:, 1] * p[:, 2] + 0.5 * p[:, 1]  # noqa: E731
    image = f(q).reshape(SHAPE)
    reg = load_registration(stored["reg"])
    where = q + transfer_field(reg, 0, 1).reshape(3, -1).T
    inner = ((where > 3) & (where < np.array(SHAPE) - 4)).all(axis=1)  # away from the border's boundary condition
    truth = f(where)[inner]
    bspline = apply_registration(reg, 0, 1, image=image, interpolation="bspline").ravel()[inner]
    linear = apply_registration(reg, 0, 1, image=image, interpolation="linear").ravel()[inner]
    assert inner.sum() > 200
    # measured: bspline max 0.0028 / mean 0.0003 (the border's boundary condition fades over a few voxels),
    # linear max 0.025 / mean 0.016 (half a voxel of curvature 0.2)
    assert np.abs(bspline - truth).max() < 5e-3 and np.abs(bspline - truth).mean() < 1e-3
    assert np.abs(linear - truth).mean() > 1e-2


def test_labels_keep_their_label_set(stored):
    reg = load_registration(stored["reg"])
    img = stored["images"][0]
    labels = np.array([0, 1, 2, 7], dtype=np.float32)[np.digitize(img, [0.35, 0.5, 0.65])]
    for interpolation in ("linear", "nearest"):
        out = apply_registration(reg, 0, 2, labels=labels, interpolation=interpolation)
        assert np.issubdtype(out.dtype, np.integer)
        assert set(np.unique(out)) <= {0, 1, 2, 7}
        assert (out != labels).mean() > 0.05  # it moved
    # two labels: the label-wise rule is "indicator resampled trilinearly > 0.5"
    binary = (img > 0.5).astype(np.float32)
    moved = apply_registration(reg, 0, 2, labels=binary)
    indicator = apply_registration(reg, 0, 2, image=binary)
    np.testing.assert_array_equal(moved, (indicator > 0.5).astype(moved.dtype))


# ---- real clients: SimpleITK and ANTs read the ITK fields as they are ----------------------------------

def test_simpleitk_resamples_and_maps_points_like_groupmorph(stored):
    sitk = pytest.importorskip("SimpleITK")
    reg, affine = stored["reg"], stored["affine"]
    fields = {}
    for k in range(K):
        image = sitk.ReadImage(str(stored["inputs"][k]))
        common = sitk.ReadImage(str(reg / f"warped_{k}.nii.gz"))
        fields[k] = sitk.DisplacementFieldTransform(
            sitk.ReadImage(str(reg / f"transform_{k}_itk.nii.gz"), sitk.sitkVectorFloat64))
        out = sitk.GetArrayFromImage(sitk.Resample(image, common, fields[k], sitk.sitkLinear, -1.0)).transpose(2, 1, 0)
        inside = out >= 0  # ITK gives the default value where φ_k leaves the grid; groupmorph the border value
        assert inside.mean() > 0.8
        np.testing.assert_allclose(out[inside], load_volume(reg / f"warped_{k}.nii.gz").data[inside], atol=1e-5)
    # points: transform_k carries common-frame points into image k; inverse_k carries image-k points back
    pts = np.array([[3.2, 4.1, 5.5], [10.0, 7.0, 2.5], [8.0, 8.0, 8.0]])
    ours = to_lps(affine, apply_registration(reg, "common", 1, points=pts))
    itk = np.array([fields[1].TransformPoint(tuple(p)) for p in to_lps(affine, pts)])
    np.testing.assert_allclose(itk, ours, atol=1e-4)
    inverse0 = sitk.DisplacementFieldTransform(
        sitk.ReadImage(str(reg / "inverse_0_itk.nii.gz"), sitk.sitkVectorFloat64))
    chained = [fields[2].TransformPoint(inverse0.TransformPoint(tuple(p))) for p in to_lps(affine, pts)]
    np.testing.assert_allclose(chained, to_lps(affine, apply_registration(reg, 0, 2, points=pts)), atol=1e-4)
    # images from 0 to 2 with a composite transform (applied last-to-first: inverse_2, then transform_0)
    inverse2 = sitk.DisplacementFieldTransform(
        sitk.ReadImage(str(reg / "inverse_2_itk.nii.gz"), sitk.sitkVectorFloat64))
    composite = sitk.CompositeTransform([fields[0], inverse2])
    grid2 = sitk.ReadImage(str(stored["inputs"][2]))
    out = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(stored["inputs"][0])), grid2, composite,
                                               sitk.sitkLinear, -1.0)).transpose(2, 1, 0)
    ours = apply_registration(reg, 0, 2, image=stored["images"][0])
    inside = out >= 0
    assert inside.mean() > 0.8
    # ITK interpolates the two fields in turn, groupmorph composes them first: equal to interpolation error
    assert np.abs(out - ours)[inside].max() < 0.05 and np.abs(out - ours)[inside].mean() < 5e-3


def test_ants_applies_the_itk_fields_like_groupmorph(stored):
    ants = pytest.importorskip("ants")
    pd = pytest.importorskip("pandas")
    reg, affine = stored["reg"], stored["affine"]
    k = 2
    fixed, moving = ants.image_read(str(reg / f"warped_{k}.nii.gz")), ants.image_read(str(stored["inputs"][k]))
    out = ants.apply_transforms(fixed, moving, [str(reg / f"transform_{k}_itk.nii.gz")], interpolator="linear",
                                defaultvalue=-1).numpy()
    inside = out >= 0
    assert inside.mean() > 0.8
    np.testing.assert_allclose(out[inside], load_volume(reg / f"warped_{k}.nii.gz").data[inside], atol=1e-5)
    pts = np.array([[3.2, 4.1, 5.5], [10.0, 7.0, 2.5]])
    moved = ants.apply_transforms_to_points(3, pd.DataFrame(to_lps(affine, pts), columns=["x", "y", "z"]),
                                            [str(reg / f"transform_{k}_itk.nii.gz")])
    np.testing.assert_allclose(moved[["x", "y", "z"]].to_numpy(),
                               to_lps(affine, apply_registration(reg, "common", k, points=pts)), atol=1e-4)


# ---- the command -----------------------------------------------------------------------------------------

def test_cli_moves_an_image_labels_and_points_in_every_format(stored, tmp_path, capsys):
    reg, affine = stored["reg"], stored["affine"]
    assert main(["apply", str(reg), "--from", "0", "--to", "2", "--image", str(stored["inputs"][0]),
                 "--out", str(tmp_path / "img.nii.gz"), "--interpolation", "bspline"]) == 0
    moved = load_volume(tmp_path / "img.nii.gz")
    assert np.allclose(moved.affine, affine)
    np.testing.assert_allclose(moved.data, apply_registration(reg, 0, 2, image=stored["images"][0],
                                                              interpolation="bspline"), atol=1e-6)
    seg = tmp_path / "seg.nii.gz"
    save_nifti(seg, (stored["images"][0] > 0.5) * 3, affine, dtype=np.int16)
    assert main(["apply", str(reg), "--from", "0", "--to", "common", "--labels", str(seg),
                 "--out", str(tmp_path / "seg_common.nii.gz")]) == 0
    out = nib.load(tmp_path / "seg_common.nii.gz")
    assert np.issubdtype(out.get_data_dtype(), np.integer) and set(np.unique(out.dataobj)) == {0, 3}
    # DIR-Lab text, 1-based voxel indices
    pts = np.array([[3.0, 4.0, 5.0], [10.0, 7.0, 2.0], [8.0, 8.0, 8.0]])
    write_landmarks(tmp_path / "p0.txt", pts)
    assert main(["apply", str(reg), "--from", "0", "--to", "1", "--points", str(tmp_path / "p0.txt"),
                 "--out", str(tmp_path / "p1.txt")]) == 0
    expected = apply_registration(reg, 0, 1, points=pts)
    np.testing.assert_allclose(read_landmarks(tmp_path / "p1.txt"), expected, atol=1e-4)
    # CSV in world mm with extra columns, kept
    world = (affine @ np.c_[pts, np.ones(3)].T)[:3].T
    with open(tmp_path / "p0.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "X", "y", "z", "note"])
        w.writerows([[f"lm{i}", *p, "ok"] for i, p in enumerate(world)])
    assert main(["apply", str(reg), "--from", "0", "--to", "1", "--points", str(tmp_path / "p0.csv"),
                 "--out", str(tmp_path / "p1.csv")]) == 0
    rows = list(csv.reader(open(tmp_path / "p1.csv")))
    assert rows[0] == ["name", "X", "y", "z", "note"] and [r[0] for r in rows[1:]] == ["lm0", "lm1", "lm2"]
    got = np.array([[float(v) for v in r[1:4]] for r in rows[1:]])
    np.testing.assert_allclose(got, (affine @ np.c_[expected, np.ones(3)].T)[:3].T, atol=1e-4)
    assert "points moved from 0 to 1" in capsys.readouterr().out


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


BAD = {
    "not a registration": (lambda s, t: [str(t), "--from", "0", "--to", "1", "--image", str(s["inputs"][0])],
                           "not a registration output folder"),
    "index out of range": (lambda s, t: [str(s["reg"]), "--from", "0", "--to", "3", "--image", str(s["inputs"][0])],
                           r"target \(--to\): expected a timepoint 0..2 or 'common', got 3"),
    "not an index": (lambda s, t: [str(s["reg"]), "--from", "first", "--to", "1", "--image", str(s["inputs"][0])],
                     "source"),
    "image on another grid": (lambda s, t: [str(s["reg"]), "--from", "0", "--to", "1", "--image", str(t / "other.nii.gz")],
                              "grid differs from timepoint 0's"),
    "csv without x y z": (lambda s, t: [str(s["reg"]), "--from", "0", "--to", "1", "--points", str(t / "bad.csv")],
                          "expected a CSV header with columns x, y, z"),
    "text with 2 columns": (lambda s, t: [str(s["reg"]), "--from", "0", "--to", "1", "--points", str(t / "bad.txt")],
                            "expected 3 columns"),
    "point outside": (lambda s, t: [str(s["reg"]), "--from", "0", "--to", "1", "--points", str(t / "far.txt")],
                      "far outside the grid"),
    "non-integer labels": (lambda s, t: [str(s["reg"]), "--from", "0", "--to", "1", "--labels", str(s["inputs"][0])],
                           "expected integer label values"),
    "bspline labels": (lambda s, t: [str(s["reg"]), "--from", "0", "--to", "1", "--labels", str(t / "seg.nii.gz"),
                                     "--interpolation", "bspline"], "labels: interpolation must be one of"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(stored, tmp_path, capsys, case):
    save_nifti(tmp_path / "other.nii.gz", np.zeros((8, 8, 8)), np.eye(4))
    save_nifti(tmp_path / "seg.nii.gz", np.zeros(SHAPE), stored["affine"], dtype=np.uint8)
    (tmp_path / "bad.csv").write_text("a,b,c\n1,2,3\n")
    (tmp_path / "bad.txt").write_text("1 2\n")
    (tmp_path / "far.txt").write_text("1 2 3\n40 2 3\n")  # 1-based x = 40 on an axis of 16 voxels
    argv, message = BAD[case]
    before = _digest(stored["reg"])
    out = tmp_path / "out_file"
    rc = main(["apply", *argv(stored, tmp_path), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("groupmorph: error:")
    assert re.search(message, err), err
    assert not out.exists() and _digest(stored["reg"]) == before


def test_refuses_to_overwrite_its_input_or_the_registration(stored, tmp_path, capsys):
    victim = tmp_path / "p.txt"
    write_landmarks(victim, np.array([[1.0, 2.0, 3.0]]))
    text = victim.read_text()
    assert main(["apply", str(stored["reg"]), "--from", "0", "--to", "1", "--points", str(victim), "--out", str(victim)]) == 2
    assert victim.read_text() == text
    before = _digest(stored["reg"])
    assert main(["apply", str(stored["reg"]), "--from", "0", "--to", "1", "--image", str(stored["inputs"][0]),
                 "--out", str(stored["reg"] / "warped_1.nii.gz")]) == 2
    assert _digest(stored["reg"]) == before
    assert capsys.readouterr().err.count("refusing to overwrite") == 2


def test_folders_from_before_the_inverse_maps_are_refused_clearly(stored, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(stored["reg"], old)
    for p in old.glob("inverse_*"):
        p.unlink()
    summary = json.loads((old / "summary.json").read_text())
    summary.pop("outputs_version")
    (old / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(InputError, match="older groupmorph_pyro without the inverse maps.*register again"):
        load_registration(old)


def test_apply_registration_needs_exactly_one_kind_of_data(stored):
    with pytest.raises(InputError, match="exactly one of image, labels, points"):
        apply_registration(stored["reg"], 0, 1)
    with pytest.raises(InputError, match="expected an array on the registration's grid"):
        apply_registration(stored["reg"], 0, 1, image=np.zeros((4, 4, 4)))


def test_apply_on_a_register_output_agrees_with_evaluate_and_simpleitk(tmp_path):
    """`groupmorph register` then `groupmorph apply --points`: the mapped landmarks give evaluate's
    landmark error (same direction of the maps), and SimpleITK resamples with the written field."""
    from groupmorph_pyro.evaluation import evaluate_output
    from groupmorph_pyro.synthetic import breathing_phantom

    g = breathing_phantom((20, 20, 20), 3, amplitude=2.0, num_landmarks=6, seed=3)
    affine = np.array([[-2.0, 0, 0, 10], [0, 2.0, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]])
    paths, lms = [], []
    for k in range(3):
        paths.append(tmp_path / f"t{k}.nii.gz")
        save_nifti(paths[-1], g.images[k], affine)
        lms.append(tmp_path / f"l{k}.txt")
        write_landmarks(lms[-1], g.landmarks[k])
    reg = tmp_path / "reg"
    (tmp_path / "short.yaml").write_text("register:\n  lr: 0.3\n  scale_reset: false\n")  # 15 steps at 20³: see test_io_cli.SHORT_FIT
    assert main(["register", *map(str, paths), "--out", str(reg), "--finetune-steps", "15", "--quiet",
                 "--config", str(tmp_path / "short.yaml")]) == 0
    spacing = np.array([2.0, 2.0, 2.5])
    dists = []
    for i in range(3):
        for j in range(3):
            if i != j:  # landmarks of j carried into image i, against i's own
                out = tmp_path / f"p_{j}_to_{i}.txt"
                assert main(["apply", str(reg), "--from", str(j), "--to", str(i), "--points", str(lms[j]), "--out", str(out)]) == 0
                dists.append(np.linalg.norm((read_landmarks(out) - g.landmarks[i]) * spacing, axis=1))
    row = evaluate_output(reg, landmarks=g.landmarks)
    assert np.mean(dists) == pytest.approx(row["landmark_mm_after"], abs=1e-3)  # written with 6 digits
    assert row["landmark_mm_after"] != pytest.approx(row["landmark_mm_before"], abs=1e-3)
    sitk = pytest.importorskip("SimpleITK")
    tx = sitk.DisplacementFieldTransform(sitk.ReadImage(str(reg / "transform_2_itk.nii.gz"), sitk.sitkVectorFloat64))
    out = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(paths[2])), sitk.ReadImage(str(reg / "warped_2.nii.gz")),
                                               tx, sitk.sitkLinear, -1.0)).transpose(2, 1, 0)
    inside = out >= 0
    np.testing.assert_allclose(out[inside], load_volume(reg / "warped_2.nii.gz").data[inside], atol=1e-4)


def test_cli_evaluate_outputs_with_landmark_files_uses_the_stored_maps(stored, tmp_path, capsys):
    """`evaluate --outputs DIR --landmarks ...`: the landmark error equals the mean distance between the
    points carried j -> i by `apply` and timepoint i's own points; points off the grid exit 2."""
    rng = np.random.default_rng(3)
    pts = [rng.uniform(2, np.array(SHAPE) - 3, (6, 3)) for _ in range(K)]
    files = []
    for k in range(K):
        files.append(tmp_path / f"l{k}.txt")
        write_landmarks(files[-1], pts[k])
    pts = [read_landmarks(f) for f in files]  # as written (6 significant digits)
    assert main(["evaluate", "--outputs", str(stored["reg"]), "--landmarks", *map(str, files), "--out", str(tmp_path / "e")]) == 0
    row = json.loads((tmp_path / "e" / "evaluation.json").read_text())[0]
    reg = load_registration(stored["reg"])
    d = [np.linalg.norm((transfer_points(pts[j], reg, j, i) - pts[i]) * SPACING, axis=1)
         for i in range(K) for j in range(K) if i != j]
    assert row["landmark_mm_after"] == pytest.approx(np.mean(d), abs=1e-4)
    (tmp_path / "far.txt").write_text("1 2 3\n99 2 3\n1 2 3\n1 2 3\n1 2 3\n1 2 3\n")
    capsys.readouterr()
    rc = main(["evaluate", "--outputs", str(stored["reg"]), "--landmarks", str(files[0]), str(tmp_path / "far.txt"),
               str(files[2]), "--out", str(tmp_path / "e2")])
    err = capsys.readouterr().err
    assert rc == 2 and "outside the image" in err and not (tmp_path / "e2").exists()
