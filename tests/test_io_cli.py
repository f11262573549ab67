import hashlib
import json
import re

import nibabel as nib
import numpy as np
import pytest

from groupmorph_pyro.cli import main
from groupmorph_pyro.config import Config
from groupmorph_pyro.volumes import displacement_to_world, load_group
from groupmorph_pyro.synthetic import breathing_phantom
from groupmorph_pyro.train import train

K, SIZE = 3, 20


@pytest.fixture
def group_files(tmp_path):
    g = breathing_phantom((SIZE,) * 3, K, amplitude=2.0, num_landmarks=5, seed=3)
    affine = np.array([[-2.0, 0, 0, 10], [0, 2.0, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]])
    paths = []
    for k in range(K):
        p = tmp_path / "in" / f"t{k}.nii.gz"
        p.parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(g.images[k], affine), p)
        paths.append(p)
    return paths, affine


SHORT_FIT = "register:\n  lr: 0.3\n  scale_reset: false\n"
"""A few per-case steps from zero on a 20³ grid: the default peak step 1.0 (sized for the default
150 coarse + 60 full steps) overshoots under the default bending prior, and the ELBO guard then keeps
the identity start (measured: 3–30 steps at lr 1.0 kept it; lr 0.3 refined; the defaults refine).
The mean and σ are fitted together (scale_reset: false): a MAP mean's first few steps are judged by
the log joint alone, which Adam's first steps make worse (measured at 20³, lr 0.3: 5 steps kept the
identity, 20 steps refined, 0.24 mm against 0.31 with mean and σ together; 60 steps 0.14 against 0.16)."""


def digest(paths):
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def test_register_per_case_writes_all_outputs_with_input_affine(tmp_path, group_files, capsys):
    paths, affine = group_files
    before = digest(paths)
    out = tmp_path / "out"
    (tmp_path / "short.yaml").write_text(SHORT_FIT)
    rc = main(["register", *map(str, paths), "--out", str(out), "--finetune-steps", "3", "--fixed", "1", "--quiet",
               "--config", str(tmp_path / "short.yaml")])
    assert rc == 0
    for k in range(K):
        for name in ("warped", "displacement", "jacobian"):
            img = nib.load(out / f"{name}_{k}.nii.gz")
            assert np.allclose(img.affine, affine)
        assert nib.load(out / f"displacement_{k}.nii.gz").shape == (SIZE, SIZE, SIZE, 1, 3)
    assert np.allclose(nib.load(out / "displacement_1.nii.gz").get_fdata(), 0.0)  # the fixed timepoint
    for name in ("inverse_displacement_{k}", "transform_{k}_itk", "inverse_{k}_itk"):
        for k in range(K):
            img = nib.load(out / (name.format(k=k) + ".nii.gz"))
            assert img.shape == (SIZE, SIZE, SIZE, 1, 3) and np.allclose(img.affine, affine)
    world = nib.load(out / "displacement_0.nii.gz").get_fdata()
    lps = nib.load(out / "transform_0_itk.nii.gz").get_fdata()
    np.testing.assert_allclose(lps, world * [-1, -1, 1], atol=1e-6)  # RAS -> LPS components
    assert np.abs(world).max() > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outputs_version"] == 2
    for key in ("seconds", "nmi_before", "nmi_after", "folding_percent", "mode", "fixed"):
        assert key in summary
    assert summary["fixed"] == 1 and summary["per_case_steps"] == 3
    assert digest(paths) == before
    assert "registered K=3" in capsys.readouterr().out


def test_register_with_checkpoint_and_finetune(tmp_path, group_files, capsys):
    paths, _ = group_files
    cfg = Config()
    cfg.model.num_timepoints = K
    cfg.model.encoder, cfg.model.decoder = [4], [4]
    cfg.train.iterations, cfg.train.patch_size, cfg.train.device = 1, [16, 16, 16], "cpu"
    cfg.train.output_dir = str(tmp_path / "run")
    cfg.data.synthetic = {"num_groups": 1, "shape": [20, 20, 20], "num_landmarks": 5}
    ckpt = train(cfg, progress=False)
    out = tmp_path / "out"
    assert main(["register", *map(str, paths), "--out", str(out), "--checkpoint", str(ckpt), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["amortized"] and summary["per_case_steps"] == 0
    out2 = tmp_path / "out2"
    assert main(["register", *map(str, paths), "--out", str(out2), "--checkpoint", str(ckpt), "--finetune-steps", "2", "--quiet"]) == 0
    assert json.loads((out2 / "summary.json").read_text())["per_case_steps"] == 2
    # K not matching the checkpoint
    rc = main(["register", *map(str, paths[:2]), "--out", str(tmp_path / "bad"), "--checkpoint", str(ckpt)])
    assert rc == 2 and not (tmp_path / "bad").exists()
    # an all-to-one network cannot serve all-moving (the converse is served: tests/test_serving.py)
    capsys.readouterr()
    rc = main(["register", *map(str, paths), "--out", str(tmp_path / "bad"), "--checkpoint", str(ckpt), "--mode", "all-moving"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "trained in all-to-one mode" in err[0] and not (tmp_path / "bad").exists()


def _save(path, data, affine=np.eye(4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), path)
    return str(path)


def _junk(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not an image")
    return str(path)


BAD_CASES = {
    "one image": (lambda d, p: [p[0]], r"at least 2 images"),
    "different shape": (lambda d, p: [p[0], _save(d / "small.nii.gz", np.zeros((SIZE, SIZE, SIZE - 1)))], r"grid differs"),
    "different affine": (lambda d, p: [p[0], _save(d / "moved.nii.gz", np.ones((SIZE,) * 3), np.diag([1.0, 1, 1, 1]))], r"--resample"),
    "4D input": (lambda d, p: [p[0], _save(d / "four.nii.gz", np.zeros((SIZE,) * 3 + (2,)))], r"expected a 3D volume, got shape \(20, 20, 20, 2\)"),
    "NaN voxels": (lambda d, p: [p[0], _save(d / "nan.nii.gz", np.full((SIZE,) * 3, np.nan))], r"NaN/inf"),
    "unreadable": (lambda d, p: [p[0], _junk(d / "junk.nii.gz")], r"cannot read"),
    "missing": (lambda d, p: [p[0], str(d / "missing.nii.gz")], r"no such file"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, group_files, capsys, case):
    paths, _ = group_files
    make, match = BAD_CASES[case]
    images = make(tmp_path / "bad_inputs", [str(p) for p in paths])
    out = tmp_path / "out"
    rc = main(["register", *images, "--out", str(out), "--finetune-steps", "1", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("groupmorph: error:")
    assert re.search(match, err), err
    assert not out.exists()


def test_resample_accepts_a_different_grid(tmp_path, group_files):
    paths, affine = group_files
    shifted = affine.copy()
    shifted[:3, 3] += 1.0
    other = _save(tmp_path / "shifted.nii.gz", nib.load(paths[1]).get_fdata(), shifted)
    images, aff, _ = load_group([paths[0], other, paths[2]], resample=True)
    assert images.shape == (3, SIZE, SIZE, SIZE) and np.allclose(aff, affine)


def test_never_overwrites_inputs(tmp_path, group_files):
    paths, _ = group_files
    victim = paths[0].parent / "warped_0.nii.gz"
    victim.write_bytes(paths[0].read_bytes())
    before = digest([victim])
    rc = main(["register", str(victim), *map(str, paths[1:]), "--out", str(victim.parent), "--finetune-steps", "1", "--quiet"])
    assert rc == 2 and digest([victim]) == before


def test_displacement_world_convention():
    u = np.zeros((3, 2, 2, 2))
    u[0] = 1.0  # one voxel along array axis 0
    affine = np.array([[0, 2.0, 0, 0], [-3.0, 0, 0, 0], [0, 0, 1.5, 0], [0, 0, 0, 1]])
    world = displacement_to_world(u, affine)
    assert world.shape == (2, 2, 2, 3)
    assert np.allclose(world[0, 0, 0], [0.0, -3.0, 0.0])


def test_demo_command(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--size", "20", "--timepoints", "3", "--steps", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"landmark distance \d+\.\d\d ± \d+\.\d\d mm before, \d+\.\d\d ± \d+\.\d\d mm after", out), out
    report = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    summary = json.loads((tmp_path / "demo" / "registered" / "summary.json").read_text())
    assert report["landmarks"] == summary["landmarks"] and report["landmarks"]["identity"]["mean_mm"] > 0
    figure = tmp_path / "demo" / "fig4_demo.png"
    assert figure.read_bytes()[:4] == b"\x89PNG" and f"picture: {figure}" in out
    page = tmp_path / "demo" / "registered" / "report.html"
    assert page.is_file() and f"QC report: {page}" in out and re.search(rf"report: {re.escape(str(page))} \(\d+\.\d\d MB", out)


BAD_CONFIGS = {  # YAML text -> expected message (key, expected type, value)
    "iterations: twenty": ("train:\n  iterations: twenty\n", r"train.iterations: expected an integer, got 'twenty'"),
    "num_timepoints: four": ("model:\n  num_timepoints: four\n", r"model.num_timepoints: expected an integer, got 'four'"),
    "patch_size: 32": ("train:\n  patch_size: 32\n", r"train.patch_size: expected a list of integers like \[96, 96, 96\], got 32"),
    "steps: abc": ("register:\n  steps: abc\n", r"register.steps: expected an integer, got 'abc'"),
    "steps: -3": ("register:\n  steps: -3\n", r"register.steps: expected an integer >= 0, got -3"),
    "channels_last: yes-please": ("runtime:\n  channels_last: yes-please\n", r"runtime.channels_last: expected true or false"),
    "pyramid not ending in 1": ("register:\n  pyramid: [4, 2]\n", r"register.pyramid: expected decreasing integer shrink factors ending in 1"),
    "schedule typo": ("register:\n  schedule: cosin\n", r"register.schedule: expected 'constant' or 'cosine', got 'cosin'"),
    "average: 1.5": ("register:\n  average: 1.5\n", r"register.average: expected a fraction in \[0, 1\), got 1.5"),
    "scale_lr: fast": ("register:\n  scale_lr: fast\n", r"register.scale_lr: expected a number, got 'fast'"),
    "covariance: full": ("register:\n  covariance: full\n", r"register.covariance: expected 'diagonal' or 'dct', got 'full'"),
    "guard_particles: 0": ("register:\n  guard_particles: 0\n", r"register.guard_particles: expected an integer >= 1, got 0"),
    "ema_decay: 1": ("train:\n  ema_decay: 1.0\n", r"train.ema_decay: expected a fraction in \[0, 1\), got 1.0"),
    "cascade: 0": ("model:\n  cascade: 0\n", r"model.cascade: expected an integer >= 1, got 0"),
    "integration_downsize: 0": ("model:\n  integration_downsize: 0\n", r"model.integration_downsize: expected an integer >= 1, got 0"),
    "finetune_lr: 0": ("register:\n  finetune_lr: 0\n", r"register.finetune_lr"),
    "scale_reset: 1": ("register:\n  scale_reset: 1\n", r"register.scale_reset: expected true or false, got 1"),
    "sample_points: 0": ("register:\n  sample_points: 0\n", r"register.sample_points: expected an integer >= 1, got 0"),
    "jitter: sometimes": ("model:\n  jitter: sometimes\n", r"model.jitter: expected true or false, got 'sometimes'"),
    "lambda_u under the bending default": ("model:\n  prior_options: {lambda_u: 2}\n", r"set model.prior: laplacian"),
    "prior option typo": ("model:\n  prior: laplacian\n  prior_options: {lamda_u: 2}\n", r"prior 'laplacian' has no option\(s\) \[.lamda_u.\]"),
    "prior_units: cm": ("model:\n  prior_units: cm\n", r"model.prior_units: expected one of \['mm', 'voxel'\], got 'cm'"),
}


def test_training_groups_of_different_voxel_sizes_exit_2_before_training(tmp_path, capsys):
    """With the prior's weights per mm, training builds one prior: groups of two voxel sizes stop
    `groupmorph train` with one line before any step, and write nothing."""
    groups = []
    for name, spacing in (("a", 1.0), ("b", 2.0)):
        g = breathing_phantom((16,) * 3, 2, num_landmarks=2, seed=1)
        paths = [tmp_path / name / f"t{k}.nii.gz" for k in range(2)]
        paths[0].parent.mkdir()
        for k, path in enumerate(paths):
            nib.save(nib.Nifti1Image(g.images[k], np.diag([spacing] * 3 + [1.0])), path)
        groups.append([str(path) for path in paths])
    cfg, out = tmp_path / "c.yaml", tmp_path / "out"
    cfg.write_text(f"model:\n  num_timepoints: 2\ndata:\n  groups: {groups}\n"  # one step if the check were missing
                   "train:\n  iterations: 1\n  patch_size: [8, 8, 8]\n  device: cpu\n")
    rc = main(["train", "--config", str(cfg), "--output-dir", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "training groups' voxel sizes differ (1 to 2 mm" in err, err
    assert not out.exists()


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
@pytest.mark.parametrize("command", ["register", "train"])
def test_bad_config_exits_2_with_one_line_and_writes_nothing(tmp_path, group_files, capsys, case, command):
    text, match = BAD_CONFIGS[case]
    cfg = tmp_path / "bad.yaml"
    out = tmp_path / "out"
    cfg.write_text(text + f"data:\n  synthetic: {{num_groups: 1}}\ntrain:\n  output_dir: {out}\n"
                   if command == "train" and "train:" not in text else text)
    paths, _ = group_files
    argv = (["register", *map(str, paths), "--out", str(out), "--config", str(cfg), "--quiet"] if command == "register"
            else ["train", "--config", str(cfg), "--output-dir", str(out), "--quiet"])
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("groupmorph: error:"), err
    assert re.search(match, err), err
    assert not out.exists()


def test_yaml_ambiguous_numbers_are_read_as_numbers(tmp_path):
    from groupmorph_pyro.config import load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lr: 1e-3\n  iterations: 1e4\nmodel:\n  beta: '5'\n")
    c = load_config(cfg)
    assert (c.train.lr, c.train.iterations, c.model.beta) == (1e-3, 10000, 5.0)
    assert isinstance(c.train.iterations, int) and isinstance(c.model.beta, float)


def test_negative_finetune_steps_is_an_error_before_any_work(tmp_path, group_files, capsys):
    paths, _ = group_files
    out = tmp_path / "out"
    rc = main(["register", *map(str, paths), "--out", str(out), "--finetune-steps", "-5", "--quiet"])
    assert rc == 2 and "--finetune-steps: expected an integer >= 0, got -5" in capsys.readouterr().err
    assert not out.exists()


def test_overwrite_check_runs_before_registration(tmp_path, group_files, monkeypatch):
    """An output that would overwrite an input is refused before any registration work starts."""
    import groupmorph_pyro.registration as registration

    def fail(*args, **kwargs):
        raise AssertionError("register ran before the output check")

    monkeypatch.setattr(registration, "register", fail)
    paths, _ = group_files
    victim = paths[0].parent / "jacobian_1.nii.gz"
    victim.write_bytes(paths[1].read_bytes())
    rc = main(["register", str(paths[0]), str(victim), str(paths[2]), "--out", str(victim.parent), "--quiet"])
    assert rc == 2


def test_outputs_are_readable_by_group_and_others_under_a_usual_umask(tmp_path, group_files):
    import os
    import stat

    old = os.umask(0o022)
    try:
        paths, _ = group_files
        out = tmp_path / "out"
        assert main(["register", *map(str, paths), "--out", str(out), "--finetune-steps", "1", "--quiet"]) == 0
    finally:
        os.umask(old)
    for f in out.iterdir():
        mode = stat.S_IMODE(f.stat().st_mode)
        assert mode == 0o644, (f.name, oct(mode))


def test_landmark_files_with_different_counts_exit_2_before_registration(tmp_path, group_files, capsys, monkeypatch):
    import groupmorph_pyro.registration as registration
    from groupmorph_pyro.data import write_landmarks

    monkeypatch.setattr(registration, "register", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    paths, _ = group_files
    lms = []
    for k in range(K):
        lms.append(tmp_path / f"l{k}.txt")
        write_landmarks(lms[-1], np.full((3 if k else 2, 3), 4.0))
    out = tmp_path / "out"
    rc = main(["register", *map(str, paths), "--out", str(out), "--landmarks", *map(str, lms), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "different numbers of points [2, 3, 3]" in err, err
    assert not out.exists()


@pytest.mark.parametrize("kwargs, match", [
    ({"affine": np.eye(3)}, r"affine: expected a 4x4 voxel -> world matrix, got shape \(3, 3\)"),
    ({"landmarks": np.zeros((2, 4, 3))}, r"landmarks: expected \(3, L, 3\) voxel coordinates, got shape \(2, 4, 3\)"),
    ({"finetune_steps": -1}, r"finetune_steps: expected an integer >= 0, got -1"),
    ({"samples": -2}, r"samples: expected an integer >= 0, got -2"),
])
def test_register_rejects_bad_arguments_before_any_work(kwargs, match):
    from groupmorph_pyro.checks import InputError
    from groupmorph_pyro.registration import register

    cfg = Config()
    cfg.model.num_timepoints = 3
    with pytest.raises(InputError, match=match):
        register(np.random.default_rng(0).random((3, 8, 8, 8)), cfg, **kwargs)


def test_register_no_itk_skips_the_itk_fields(tmp_path, group_files):
    paths, _ = group_files
    out = tmp_path / "out"
    assert main(["register", *map(str, paths), "--out", str(out), "--finetune-steps", "1", "--no-itk", "--quiet"]) == 0
    assert (out / "inverse_displacement_0.nii.gz").is_file()
    assert not list(out.glob("*_itk.nii.gz"))
