"""Batch registration of a manifest: every series registered, finished ones skipped on a rerun,
an interrupted one redone, clear errors for bad manifests."""
import csv
import json

import nibabel as nib
import numpy as np
import pytest

from groupmorph_pyro.batch import register_manifest
from groupmorph_pyro.checks import InputError
from groupmorph_pyro.cli import main
from groupmorph_pyro.config import Config
from groupmorph_pyro.data import SeriesEntry, write_landmarks, write_manifest
from groupmorph_pyro.synthetic import breathing_phantom

K, SIZE = 3, 20


def _manifest(tmp_path, names=("a", "b", "c"), split="test"):
    entries = []
    for i, name in enumerate(names):
        g = breathing_phantom((SIZE,) * 3, K, amplitude=1.5, num_landmarks=4, seed=10 + i)
        images, landmarks = [], []
        for k in range(K):
            p = tmp_path / "data" / name / f"t{k}.nii.gz"
            p.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(g.images[k], np.diag([*g.spacing, 1.0])), p)
            images.append(str(p))
            lp = p.with_suffix("").with_suffix(".txt")
            write_landmarks(lp, g.landmarks[k])
            landmarks.append(str(lp))
        entries.append(SeriesEntry(name, images, landmarks, split))
    path = tmp_path / "manifest.yaml"
    write_manifest(path, entries)
    return path


def _config():
    cfg = Config()
    cfg.register.steps = 3
    return cfg


def test_batch_registers_every_series_and_resumes(tmp_path):
    manifest = _manifest(tmp_path, names=("a", "b"))
    out = tmp_path / "out"
    rows = register_manifest(manifest, out, _config(), progress=False)
    assert [r["status"] for r in rows] == ["registered"] * 2
    for name in "ab":
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["series"] == name and (out / name / "displacement_2.nii.gz").is_file()
        assert summary["landmarks"]["identity"]["mean_mm"] > 0
    table = list(csv.DictReader(open(out / "batch.csv")))
    assert [r["series"] for r in table] == ["a", "b"] and float(table[0]["landmark_mm_before"]) > 0

    # interrupt series b (no summary.json: the marker of a finished series) and touch a's outputs
    (out / "b" / "summary.json").unlink()
    stamp = (out / "a" / "warped_0.nii.gz").stat().st_mtime_ns
    rows = register_manifest(manifest, out, _config(), progress=False)
    assert [r["status"] for r in rows] == ["skipped", "registered"]
    assert (out / "a" / "warped_0.nii.gz").stat().st_mtime_ns == stamp
    assert (out / "b" / "summary.json").is_file()


def test_batch_cli(tmp_path, capsys):
    manifest = _manifest(tmp_path, names=("x", "y"))
    (tmp_path / "c.yaml").write_text("register: {steps: 2}\n")
    args = ["register", "--manifest", str(manifest), "--out", str(tmp_path / "o"), "--config", str(tmp_path / "c.yaml"),
            "--quiet"]
    assert main(args) == 0
    assert "2 series registered, 0 already done" in capsys.readouterr().out
    assert main(args) == 0
    assert "0 series registered, 2 already done" in capsys.readouterr().out
    # images on the command line together with --manifest
    assert main(["register", "a.nii.gz", "--manifest", str(manifest), "--out", str(tmp_path / "z")]) == 2
    assert "come from the manifest" in capsys.readouterr().err


def test_batch_bad_manifests(tmp_path):
    manifest = _manifest(tmp_path, names=("a", "a"))
    with pytest.raises(InputError, match=r"must be unique .* duplicates \['a'\]"):
        register_manifest(manifest, tmp_path / "o", _config(), progress=False)
    manifest = _manifest(tmp_path, names=("a",), split="train")
    with pytest.raises(InputError, match="no series with split 'test'"):
        register_manifest(manifest, tmp_path / "o", _config(), progress=False)

    class _Guide:  # never called: the K check comes first
        pass

    cfg = _config()
    cfg.model.num_timepoints = 4
    manifest = _manifest(tmp_path, names=("a",))
    with pytest.raises(InputError, match=r"trained for K=4 timepoints, got series \[\('a', 3\)\]"):
        register_manifest(manifest, tmp_path / "o", cfg, guide=_Guide(), progress=False)
    assert not (tmp_path / "o").exists()


def test_batch_cli_refuses_options_that_contradict_the_checkpoint(tmp_path, capsys):
    from groupmorph_pyro.train import train

    from test_train import tiny_config

    ckpt = train(tiny_config(tmp_path / "run", 1), progress=False)  # all-to-one, diffeomorphic, K=3
    manifest = _manifest(tmp_path, names=("x",))
    base = ["register", "--manifest", str(manifest), "--checkpoint", str(ckpt), "--quiet"]
    assert main([*base, "--out", str(tmp_path / "m"), "--mode", "all-moving"]) == 2
    assert "was trained in all-to-one mode" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "d"), "--no-diffeomorphic"]) == 2
    assert "was trained as a diffeomorphic model" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "d").exists()
