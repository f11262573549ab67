"""Baselines: conventions (a known translation), shapes, and the Table-1 benchmark smoke run."""
import argparse
import csv
import json
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import smooth_image
from groupmorph_pyro.baselines import ants_all_to_one, elastix_all_to_one, elastix_groupwise, identity, pairwise_groupmorph
from groupmorph_pyro.checks import InputError
from groupmorph_pyro.config import Config
from groupmorph_pyro.spatial import warp
from groupmorph_pyro.synthetic import breathing_phantom


def test_identity_baseline():
    images = np.random.default_rng(0).random((3, 8, 8, 8)).astype(np.float32)
    res = identity(images)
    assert res.displacement.shape == (3, 3, 8, 8, 8) and not res.displacement.any()
    assert np.allclose(res.warped, images, atol=1e-6) and (res.jacobian == 1).all()


def test_elastix_recovers_a_known_translation_in_our_convention(tmp_path, monkeypatch):
    pytest.importorskip("itk")
    monkeypatch.chdir(tmp_path)  # Elastix/transformix must not write into the working directory
    shape, spacing = (32, 32, 24), (1.0, 1.2, 2.0)
    x0 = smooth_image(shape, seed=3)[0, 0]
    t = torch.tensor([1.5, 0.0, -1.0])  # voxels along the array axes
    # image 1's content is moved by +t: x1(p) = x0(p - t), so φ_1(p) = p + t maps it back onto x0
    x1 = warp(x0[None, None], (-t).view(1, 3, 1, 1, 1).expand(1, 3, *shape).contiguous())[0, 0]
    images = torch.stack([x0, x1]).numpy()
    res = elastix_all_to_one(images, spacing, 0, {"NumberOfResolutions": ["2"], "MaximumNumberOfIterations": ["200"]})
    assert not res.displacement[0].any()
    interior = res.displacement[1][:, 6:-6, 6:-6, 5:-5].reshape(3, -1).mean(1)
    assert np.allclose(interior, t.numpy(), atol=0.3), interior
    assert res.summary["seconds"] > 0 and res.summary["method"] == "elastix-bspline-nmi"
    assert list(tmp_path.iterdir()) == []


def test_ants_recovers_a_known_translation_and_its_inverse_in_our_convention(tmp_path, monkeypatch):
    pytest.importorskip("ants")
    monkeypatch.chdir(tmp_path)  # ANTs must not write into the working directory
    shape, spacing = (32, 32, 24), (1.0, 1.2, 2.0)
    x0 = smooth_image(shape, seed=3)[0, 0]
    t = torch.tensor([1.5, 0.0, -1.0])  # voxels along the array axes; anisotropic spacing catches mm/voxel slips
    x1 = warp(x0[None, None], (-t).view(1, 3, 1, 1, 1).expand(1, 3, *shape).contiguous())[0, 0]  # φ_1(p) = p + t
    x2 = warp(x0[None, None], (t / 2).view(1, 3, 1, 1, 1).expand(1, 3, *shape).contiguous())[0, 0]  # φ_2(p) = p - t/2
    res = ants_all_to_one(torch.stack([x0, x1, x2]).numpy(), spacing, 0, {"reg_iterations": (40, 20)})
    assert not res.displacement[0].any() and not res.inverse_displacement[0].any()
    for k, shift in ((1, t), (2, -t / 2)):
        fwd = res.displacement[k][:, 6:-6, 6:-6, 5:-5].reshape(3, -1).mean(1)
        inv = res.inverse_displacement[k][:, 6:-6, 6:-6, 5:-5].reshape(3, -1).mean(1)
        assert np.allclose(fwd, shift.numpy(), atol=0.25), (k, fwd)
        assert np.allclose(inv, -shift.numpy(), atol=0.25), (k, inv)
    assert res.summary["seconds"] > 0 and res.summary["method"] == "ants-syn-mattes"
    assert list(tmp_path.iterdir()) == []


def test_elastix_groupwise_moves_everyone_to_the_mean_frame():
    pytest.importorskip("itk")
    shape, spacing = (32, 32, 24), (1.0, 1.2, 2.0)
    x = smooth_image(shape, seed=4)[0, 0]
    t = torch.tensor([0.0, 2.0, 1.0])
    # x_k(p) = c(p - s_k) with s_0 = -t/2, s_1 = +t/2: the mean frame's maps are φ_k(p) = p + s_k
    shifted = [warp(x[None, None], (-s).view(1, 3, 1, 1, 1).expand(1, 3, *shape).contiguous())[0, 0] for s in (-t / 2, t / 2)]
    res = elastix_groupwise(torch.stack(shifted).numpy(), spacing,
                            {"NumberOfResolutions": ["2"], "MaximumNumberOfIterations": ["200"]})
    for k, s in enumerate((-t / 2, t / 2)):
        interior = res.displacement[k][:, 6:-6, 6:-6, 5:-5].reshape(3, -1).mean(1)
        assert np.allclose(interior, s.numpy(), atol=0.3), (k, interior)
    assert res.summary["fixed"] is None and res.summary["method"] == "elastix-groupwise"


def test_pairwise_groupmorph_baseline_shapes():
    g = breathing_phantom((20, 20, 20), 3, num_landmarks=5, seed=0)
    cfg = Config()
    cfg.register.scale_reset = False  # SVI on mean and σ: 2 steps of a MAP mean are judged worse than zero (see test_io_cli.SHORT_FIT)
    res = pairwise_groupmorph(g.images, cfg, fixed=1, steps=2)
    assert res.displacement.shape == (3, 3, 20, 20, 20) and not res.displacement[1].any()
    assert res.displacement[0].any() and res.summary["method"] == "voxelmorph-diff"
    cfg.model.diffeomorphic = False
    assert pairwise_groupmorph(g.images, cfg, 0, 1).summary["method"] == "voxelmorph"
    assert cfg.model.num_timepoints == 6  # the caller's config is not modified
    from groupmorph_pyro.model import build_guide

    pair = Config()
    pair.model.num_timepoints, pair.model.encoder, pair.model.decoder = 2, [4], [4]
    res = pairwise_groupmorph(g.images, pair, 0, 0, guide=build_guide(pair.model))  # amortised K=2 network
    assert res.displacement.shape == (3, 3, 20, 20, 20)
    with pytest.raises(InputError, match="must be a K=2 all-to-one model"):
        pairwise_groupmorph(g.images, cfg, 0, 0, guide=build_guide(pair.model))


def test_table1_benchmark_smoke(tmp_path):
    pytest.importorskip("itk")
    path = Path(__file__).parent.parent / "benchmarks" / "table1.py"
    spec = importlib.util.spec_from_file_location("table1", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    trained = importlib.util.find_spec("voxelmorph") is not None
    rows = module.main(["--smoke", "--out", str(tmp_path)] + (["--train-iterations", "2"] if trained else []))
    assert len(rows) == 2 * (13 if trained else 10)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["command"] == "python benchmarks/table1.py --smoke --out " + str(tmp_path) + (" --train-iterations 2" if trained else "")
    assert run["commit"] and run["machine"]["cpus"] >= 1 and run["started"] <= run["finished"]
    if trained:  # the three trained rows, checkpoints written and reused (not retrained) on a rerun
        assert {"groupmorph-diff all-to-one (trained)", "voxelmorph-diff (K=2, trained)",
                "voxelmorph package (VxmPairwise, trained)"} <= {r["method"] for r in rows}
        models = tmp_path / "models" / "synthetic-4dct"
        assert (models / "groupmorph" / "last.pt").is_file() and (models / "pairwise" / "last.pt").is_file()
        stamp = (models / "voxelmorph.pt").stat().st_mtime_ns
        args = argparse.Namespace(out=str(tmp_path), manifest=None, patch=48, train_iterations=2, train_lr=1e-3,
                                  vxm_lr=1e-3, smoke=True)
        again = module.trained_rows("synthetic-4dct", np.zeros((4, 24, 24, 24), np.float32), [], args)
        assert len(again) == 3 and (models / "voxelmorph.pt").stat().st_mtime_ns == stamp
    table = list(csv.DictReader(open(tmp_path / "evaluation.csv")))
    assert {r["method"] for r in table} >= {"identity", "elastix (B-spline, NMI)"}
    for name in ("synthetic-4dct", "synthetic-dce"):
        assert (tmp_path / f"fig4_{name}.png").read_bytes()[:4] == b"\x89PNG"


def _table1_module():
    path = Path(__file__).parent.parent / "benchmarks" / "table1.py"
    spec = importlib.util.spec_from_file_location("table1", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table1_settings_reach_the_groupmorph_rows_and_bad_ones_stop_before_any_run(tmp_path, monkeypatch, capsys):
    module = _table1_module()
    seen = []

    class Stop(Exception):
        pass

    def fake_register(images, cfg, **kwargs):
        seen.append(cfg)
        raise Stop

    monkeypatch.setattr(module, "register", fake_register)
    with pytest.raises(Stop):
        module.main(["--smoke", "--out", str(tmp_path), "--methods", "groupmorph-diff all-to-one (per-case)",
                     "--set", "register.coarse_steps=7", "model.reduction=template"])
    (cfg,) = seen
    assert cfg.register.coarse_steps == 7 and cfg.model.reduction == "template" and cfg.model.num_timepoints == 4
    for bad, message in ((["register.steps"], "expected section.key=value"),
                         (["register.bogus=1"], "unknown key(s) ['bogus'] in 'register'"),
                         (["register.steps=-1"], "register.steps: expected an integer >= 0")):
        with pytest.raises(SystemExit) as exit_info:
            module.main(["--smoke", "--out", str(tmp_path / "bad"), "--set", *bad])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err
    assert len(seen) == 1 and not (tmp_path / "bad").exists()


def test_table1_real_anatomy_series_with_the_ants_row(tmp_path):
    """The MNI152 series (template from nilearn's wheel), the method filter, and the median / p95 columns."""
    pytest.importorskip("ants")
    pytest.importorskip("nilearn")
    path = Path(__file__).parent.parent / "benchmarks" / "table1.py"
    spec = importlib.util.spec_from_file_location("table1", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--smoke", "--out", str(tmp_path), "--series", "mni152-3.5mm", "--anatomy-seeds", "3",
                        "--methods", "identity", "ants"])
    assert [(r["series"], r["method"]) for r in rows] == [("mni152-3.5mm-seed3", "identity"),
                                                          ("mni152-3.5mm-seed3", "ants (affine + SyN, Mattes MI)")]
    ident, ants = rows
    assert ident["landmark_mm_after"] == pytest.approx(ident["landmark_mm_before"]) and ident["landmark_mm_before"] > 3
    assert ants["landmark_mm_after"] < ident["landmark_mm_after"]  # even 5 SyN iterations (plus affine) help
    assert ants["landmark_median_after"] <= ants["landmark_p95_after"] and ants["seconds"] > 0


def test_ants_and_mni152_without_their_packages_say_what_to_install(monkeypatch):
    import sys

    from groupmorph_pyro.data import load_mni152

    monkeypatch.setitem(sys.modules, "ants", None)  # import ants -> ImportError
    with pytest.raises(InputError, match=r"ANTs baseline needs antspyx: pip install 'groupmorph_pyro\[baselines\]'"):
        ants_all_to_one(np.zeros((2, 8, 8, 8), np.float32), (1.0, 1.0, 1.0))
    monkeypatch.setitem(sys.modules, "nilearn", None)
    monkeypatch.setitem(sys.modules, "nilearn.datasets", None)
    with pytest.raises(InputError, match=r"load_mni152 needs nilearn \(pip install nilearn"):
        load_mni152(3.5)
