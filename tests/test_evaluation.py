import csv

import numpy as np
import pytest

from groupmorph_pyro.checks import InputError
from groupmorph_pyro.cli import main
from groupmorph_pyro.config import Config
from groupmorph_pyro.data import SeriesEntry, write_landmarks, write_manifest
from groupmorph_pyro.evaluation import COLUMNS, evaluate_output, group_metrics
from groupmorph_pyro.outputs import write_registration
from groupmorph_pyro.volumes import save_nifti
from groupmorph_pyro.metrics import landmark_report
from groupmorph_pyro.registration import register
from groupmorph_pyro.synthetic import breathing_phantom


@pytest.fixture(scope="module")
def group():
    return breathing_phantom((20, 20, 20), 3, amplitude=2.0, num_landmarks=8, seed=5)


def _write_inputs(folder, group, name="s"):
    paths, lms = [], []
    for k in range(group.images.shape[0]):
        paths.append(str(folder / f"{name}_t{k}.nii.gz"))
        save_nifti(paths[-1], group.images[k], group.affine)
        lms.append(str(folder / f"{name}_l{k}.txt"))
        write_landmarks(lms[-1], group.landmarks[k])
    return paths, lms


def test_group_metrics_hand_values():
    a = np.zeros((2, 4, 4, 4), np.float32)
    b = a.copy()
    b[1] += 2.0
    jac = np.ones((2, 4, 4, 4))
    jac[0, 0, 0, 0] = -0.5
    m = group_metrics(b, a, jac)
    assert m["rmse_before"] == pytest.approx(2.0) and m["rmse_after"] == pytest.approx(0.0)
    assert m["folding_percent"] == pytest.approx(100 / 128)


def test_evaluate_output_folder_matches_in_memory_result(tmp_path, group):
    paths, _ = _write_inputs(tmp_path, group)
    cfg = Config()
    cfg.model.num_timepoints = 3
    cfg.register.lr = 0.2  # sub-voxel motion on a 20^3 grid: the default peak step (1.0) overshoots in 20 steps
    cfg.model.histogram = "gaussian"  # evaluate's NMI column uses the Gaussian kernel for every method
    res = register(group.images, cfg, finetune_steps=20)
    write_registration(res, tmp_path / "reg", group.affine, paths)
    row = evaluate_output(tmp_path / "reg", landmarks=group.landmarks)
    exact = landmark_report(group.landmarks, res.displacement, res.inverse_displacement, group.spacing)
    assert set(row) == set(COLUMNS) and row["method"] == "groupmorph-per-case"
    assert row["landmark_mm_before"] == pytest.approx(exact["identity"]["mean_mm"], abs=1e-3)
    # the stored inverse maps (float32 world mm) give the in-memory figure to rounding
    assert row["landmark_mm_after"] == pytest.approx(exact["registered"]["mean_mm"], abs=1e-4)
    assert row["landmark_mm_after"] < row["landmark_mm_before"] - 0.05
    for path in (tmp_path / "reg").glob("inverse_displacement_*"):  # a folder from before the inverse maps were stored
        path.unlink()
    old = evaluate_output(tmp_path / "reg", landmarks=group.landmarks)  # fixed-point inverses instead: close
    assert old["landmark_mm_after"] == pytest.approx(exact["registered"]["mean_mm"], abs=0.05)
    assert row["nmi_before"] == pytest.approx(res.summary["nmi_before"], abs=0.02)
    assert row["nmi_after"] == pytest.approx(res.summary["nmi_after"], abs=0.02)
    assert row["seconds"] == pytest.approx(res.summary["seconds"])


def test_evaluate_output_errors(tmp_path):
    with pytest.raises(InputError, match="not a registration output folder"):
        evaluate_output(tmp_path)


def test_cli_evaluate_manifest_writes_json_and_csv(tmp_path, group):
    paths, lms = _write_inputs(tmp_path, group)
    write_manifest(tmp_path / "m.yaml", [SeriesEntry("case", paths, lms, "test"), SeriesEntry("other", paths, [], "train")])
    out = tmp_path / "eval"
    assert main(["evaluate", "--manifest", str(tmp_path / "m.yaml"), "--out", str(out), "--finetune-steps", "3",
                 "--device", "cpu", "--quiet"]) == 0
    rows = list(csv.DictReader(open(out / "evaluation.csv")))
    assert [r["series"] for r in rows] == ["case"] and list(rows[0]) == COLUMNS
    assert float(rows[0]["landmark_mm_before"]) > 0
    assert (out / "registered" / "case" / "summary.json").exists()
    assert main(["evaluate", "--manifest", str(tmp_path / "m.yaml"), "--split", "val", "--out", str(tmp_path / "x")]) == 2


def test_evaluate_manifest_leaves_the_callers_config_alone(tmp_path, group):
    from groupmorph_pyro.evaluation import evaluate_manifest

    paths, lms = _write_inputs(tmp_path, group)
    write_manifest(tmp_path / "m.yaml", [SeriesEntry("case", paths, lms, "test")])
    cfg = Config()  # K = 6 by default; the series has K = 3
    rows = evaluate_manifest(tmp_path / "m.yaml", tmp_path / "out", cfg, finetune_steps=2)
    assert [r["series"] for r in rows] == ["case"] and rows[0]["landmark_mm_after"] is not None
    assert cfg == Config()


def test_evaluate_manifest_resumes_from_the_written_folders(tmp_path, group):
    """A rerun skips finished series and evaluates them from their folders (fixed-point inverse maps),
    reading the landmark files on the images' grid."""
    from groupmorph_pyro.evaluation import evaluate_manifest

    paths, lms = _write_inputs(tmp_path, group)
    write_manifest(tmp_path / "m.yaml", [SeriesEntry("case", paths, lms, "test")])
    cfg = Config()
    cfg.register.lr = 0.2  # two steps at the default peak step (1.0) leave a rough field whose fixed-point inverse is poor
    first = evaluate_manifest(tmp_path / "m.yaml", tmp_path / "out", cfg, finetune_steps=2)
    again = evaluate_manifest(tmp_path / "m.yaml", tmp_path / "out", cfg, finetune_steps=2)
    assert [r["series"] for r in again] == ["case"]
    assert again[0]["landmark_mm_before"] == pytest.approx(first[0]["landmark_mm_before"], rel=1e-9)
    # stored float32 world-mm fields and a fixed-point inverse vs the exact exp(-v): as in the test above
    assert again[0]["landmark_mm_after"] == pytest.approx(first[0]["landmark_mm_after"], abs=0.05)
    assert again[0]["seconds"] == pytest.approx(first[0]["seconds"])  # read from summary.json, not re-registered
