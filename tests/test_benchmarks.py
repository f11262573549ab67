"""The speed benchmark runs end to end on a tiny grid and reports what it measured."""
import importlib.util
import json
from pathlib import Path

import pytest


def _load(name):
    path = Path(__file__).parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speed_benchmark_smoke(tmp_path, capsys):
    pytest.importorskip("itk")
    report = _load("speed").main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["groupmorph"]["seconds"] > 0 and saved["elastix"]["seconds"] > 0
    assert saved["elastix_over_groupmorph"] == pytest.approx(saved["elastix"]["seconds"] / saved["groupmorph"]["seconds"])
    train = report["train"]
    assert set(train) == {"gaussian", "bspline", "bspline, full-grid integration"}
    assert all(r["seconds_per_step"] > 0 for r in train.values())
    assert (train["bspline"]["integration_downsize"], train["bspline, full-grid integration"]["integration_downsize"]) == (3, 1)
    assert saved["downsize_speedup"] == pytest.approx(train["bspline, full-grid integration"]["seconds_per_step"]
                                                      / train["bspline"]["seconds_per_step"])
    # the lean histogram saves fewer bytes for backward than the dense one, at the same patch
    assert train["bspline"]["autograd_saved_gib"] < train["gaussian"]["autograd_saved_gib"]
    runtime = saved["runtime"]
    assert set(runtime) == {"fp32", "channels_last"} and runtime["channels_last"]["runtime"] == {"channels_last": True}
    assert runtime["channels_last"]["speedup_vs_fp32"] == pytest.approx(
        runtime["fp32"]["seconds"] / runtime["channels_last"]["seconds"])
    assert "Elastix / GroupMorph time" in capsys.readouterr().out


def test_speed_benchmark_times_training_alone(tmp_path, capsys):
    report = _load("speed").main(["--smoke", "--train-only", "--out", str(tmp_path)])
    assert "runtime" not in report and "elastix" not in report and report["downsize_speedup"] > 0
    out = capsys.readouterr().out
    assert "Squarings on the grid 3x coarser" in out and "Elastix" not in out


def test_memory_benchmark_smoke(tmp_path, capsys):
    report = _load("memory").main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "memory.json").read_text())
    assert set(saved["variants"]) == {"tiles 16³", "whole volume", "per-case"} and saved["per_case_steps"] == 2
    for r in report["variants"].values():
        assert "failed" not in r, r
        assert r["peak_gib"] > 0 and r["fields_seconds"] > 0
        assert r["peak_over_input"] == pytest.approx(r["peak_gib"] / saved["input_gib"])
    assert "peak / inputs" in capsys.readouterr().out
    assert not list(tmp_path.glob("tmp*"))  # the phantom's temporary .npy is gone


def test_memory_benchmark_rejects_zero_per_case_steps_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _load("memory").main(["--per-case-steps", "0", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--per-case-steps: expected an integer >= 1, got 0")
    assert not (tmp_path / "out").exists()


def test_learning_curve_smoke(tmp_path, capsys):
    """Trains a tiny network with held-out validation, then the per-case and Elastix reference lines on
    the same held-out phantoms; CSV, JSON and PNG agree with the checkpoint's curve."""
    pytest.importorskip("itk")
    from groupmorph_pyro.train import load_checkpoint

    config = tmp_path / "tiny.yaml"
    config.write_text("model: {num_timepoints: 3, encoder: [4, 8], decoder: [8, 8, 4]}\n"
                      "train: {iterations: 4, lr: 1.0e-3, patch_size: [16, 16, 16], checkpoint_every: 2, device: cpu}\n"
                      "data: {synthetic: {num_groups: 2, shape: [20, 20, 20], amplitude: 3.0, num_landmarks: 5}}\n")
    report = _load("learning_curve").main(["--config", str(config), "--out", str(tmp_path / "c"), "--validate-every", "2",
                                           "--heldout", "1", "--heldout-seed", "500", "--quiet"])
    curve = load_checkpoint(tmp_path / "c" / "train" / "last.pt")[2]["validation"]
    rows = (tmp_path / "c" / "learning_curve.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [r["iteration"] for r in curve] == [0, 2, 4]
    refs = json.loads((tmp_path / "c" / "references.json").read_text())["references"]
    assert set(refs) == {"identity", "per-case", "elastix", "amortised", "amortised + 20 steps"}
    assert refs["amortised + 20 steps"]["seconds_per_group"] > refs["amortised"]["seconds_per_group"] > 0
    assert refs["identity"]["landmark_mm"] == pytest.approx(curve[0]["val_identity_mm"])
    assert refs["per-case"]["landmark_mm"] < refs["identity"]["landmark_mm"]  # the reference line registers
    assert refs["per-case"]["seconds_per_group"] > 0 and report["final"] == curve[-1]
    assert (tmp_path / "c" / "learning_curve.png").stat().st_size > 1000
    assert "held-out landmark error after 4 iterations" in capsys.readouterr().out


def test_calibration_runs_with_model_settings_and_records_them(tmp_path):
    """benchmarks/calibration.py on a 32³ phantom (2 + 3 steps, 3 samples): coverages are fractions, and
    the JSON names the prior and histogram it ran (the default, or those given by --model)."""
    calibration = _load("calibration")
    base = ["--betas", "5", "--size", "32", "--samples", "3", "--steps", "3", "--set", "coarse_steps=2"]
    paper = calibration.main(base + ["--model", "prior=laplacian", "histogram=gaussian", "--out", str(tmp_path / "c.json")])
    default = calibration.main(base + ["--group-seed", "2", "--timepoints", "3"])
    assert paper[0]["model"] == {"prior": "laplacian", "histogram": "gaussian"}
    assert default[0]["model"] == {"prior": "bending", "histogram": "quadratic"}
    assert (paper[0]["group_seed"], paper[0]["timepoints"]) == (1, 4)
    assert (default[0]["group_seed"], default[0]["timepoints"]) == (2, 3)
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["rows"][0]["model"]["prior"] == "laplacian"
    assert saved["command"].startswith("python benchmarks/calibration.py --betas 5") and saved["commit"]
    assert saved["machine"]["cpus"] >= 1 and saved["started"] <= saved["finished"]
    for row in paper + default:
        assert 0 <= row["coverage90_all"] <= 1 and 0 <= row["coverage90_moving"] <= 1 and row["mean_sd_voxels"] > 0
        parts = (row["coverage90_moving"], row["coverage90_static"])  # all voxels: a weighted mean of the two regions
        assert min(parts) - 1e-12 <= row["coverage90_all"] <= max(parts) + 1e-12
        f = row["background_fraction"]  # the air around the phantom's body
        assert 0.2 < f < 0.8
        assert row["coverage90_all"] == pytest.approx(f * row["coverage90_background"] + (1 - f) * row["coverage90_anatomy"])
        assert row["mean_error_voxels_moving"] > 0 and row["mean_error_voxels_static"] >= 0



def test_probes_apply_their_settings_and_report_each_row(tmp_path, monkeypatch, capsys):
    """benchmarks/probes.py: settings reach the config (bad settings or inputs: one line, exit 2, nothing
    written), per-case rows
    register (error below identity) on small phantoms, step-cost times both jitter settings."""
    from groupmorph_pyro.config import Config
    from groupmorph_pyro.synthetic import breathing_phantom

    probes = _load("probes")
    cfg = probes.with_settings(Config(), ["model.jitter=false", "model.prior_options={lambda_v: 0.001}", "register.steps=7"])
    assert (cfg.model.jitter, cfg.model.prior_options, cfg.register.steps) == (False, {"lambda_v": 0.001}, 7)
    for bad, message in ((["per-case", "--base", "steps=7"], "expected section.key=value (e.g. register.steps=240), got 'steps=7'"),
                         (["per-case", "--base", "model.jitter=maybe"], "model.jitter: expected true or false, got 'maybe' (str)"),
                         (["finetune", "--config", str(tmp_path / "none.yaml"), "--checkpoint", "x.pt"], f"no such file: {tmp_path / 'none.yaml'}"),
                         (["per-case", "--set", "speed", "--variants", "64 bins"],
                          "--variants: ['64 bins'] not in --set speed: expected some of ['defaults', '75 coarse steps', "
                          "'30 full-resolution steps', '2 guard particles', 'pyramid 4-2-1', "
                          "'integration on a 2x coarser grid', 'integration on the full grid', 'template reduction']"),
                         (["step-cost", "--steps", "0"], "--steps and --repeats: expected integers >= 1, got 0 and 2")):
        with pytest.raises(SystemExit) as exc:
            probes.main(bad + ["--out", str(tmp_path / "bad")])
        assert exc.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].endswith(message)
        assert not (tmp_path / "bad").exists()
    small = breathing_phantom((24, 24, 24), 4, seed=1, num_landmarks=8)
    monkeypatch.setattr(probes, "phantoms", lambda: {"tiny": small})
    rows = probes.main(["per-case", "--out", str(tmp_path), "--variants", "defaults", "64 bins",
                        "--base", "register.steps=20", "register.coarse_steps=40", "register.lr=0.3"])
    assert [r["variant"] for r in rows] == ["defaults", "64 bins"] and rows[1]["settings"][-1] == "model.bins=64"
    assert all(0 < r["mean_mm"] < 0.7 * r["identity_mm"] for r in rows), rows
    saved = json.loads((tmp_path / "probes-per-case.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows, default=float))
    speed = probes.main(["per-case", "--set", "speed", "--out", str(tmp_path), "--variants", "2 guard particles",
                         "--base", "register.steps=20", "register.coarse_steps=40", "register.lr=0.3"])
    assert speed[0]["settings"][-1] == "register.guard_particles=2" and (tmp_path / "probes-per-case-speed.json").is_file()
    monkeypatch.setattr(probes, "phantoms", lambda: {"synthetic-4dct": small})
    monkeypatch.setattr("groupmorph_pyro.data.load_mni152", lambda spacing: (_ for _ in ()).throw(ImportError("no nilearn")))
    cost = probes.main(["step-cost", "--out", str(tmp_path), "--steps", "1", "--repeats", "1"])
    assert [(r["series"], r["jitter"]) for r in cost] == [("synthetic-4dct", True), ("synthetic-4dct", False)]
    assert all(r["seconds_per_step"] > 0 for r in cost)


def test_scale_benchmark_smoke(tmp_path, capsys):
    """benchmarks/scale.py runs GroupMorph (forced onto a control grid) and both peers in child processes,
    writes its JSON with command, commit and machine, the ratios and the figure."""
    pytest.importorskip("itk")
    pytest.importorskip("ants")
    report = _load("scale").main(["--smoke", "--out", str(tmp_path), "--set", "model.reduction=template"])
    saved = json.loads((tmp_path / "scale.json").read_text())
    assert saved["groupmorph_settings"]["model.reduction"] == "template"
    assert saved["command"].startswith("python benchmarks/scale.py --smoke") and saved["commit"] and saved["machine"]["threads"] == 2
    runs = {r["method"]: r for r in saved["runs"]}
    assert set(runs) == {"groupmorph", "elastix", "ants"} and not any("failed" in r for r in runs.values())
    assert runs["groupmorph"]["control_factor"] > 1  # the smoke settings put it on a control grid
    assert runs["groupmorph"]["settings"]["model.reduction"] == "template"  # what the child's config held
    assert runs["groupmorph"]["settings"]["register.fit_voxels"] == 2000
    phases = runs["groupmorph"]["phase_seconds"]  # the fit's phases, within the whole call's time
    assert all(s > 0 for s in phases["levels"].values()) and phases["last"] > 0 and phases["spread"] > 0
    assert sum(phases["levels"].values()) + phases["last"] + phases["spread"] < runs["groupmorph"]["seconds"]
    for r in runs.values():
        assert r["seconds"] > 0 and r["peak_gib"] > 0 and r["landmark_mm_after"] > 0
    ratio = {r["peer"]: r for r in saved["ratios"]}
    assert ratio["elastix"]["time_ratio"] == pytest.approx(runs["groupmorph"]["seconds"] / runs["elastix"]["seconds"])
    assert ratio["ants"]["mean_ratio"] == pytest.approx(runs["groupmorph"]["landmark_mm_after"] / runs["ants"]["landmark_mm_after"])
    assert (tmp_path / "scale.png").stat().st_size > 0
    assert "| case | peer |" in capsys.readouterr().out
    assert report["runs"] == saved["runs"]


def test_scale_phase_seconds_reads_each_phase_of_the_fit_summary():
    phase_seconds = _load("scale").phase_seconds
    fit = {"seconds": 3.5, "levels": [{"factor": 10, "seconds": 1.25}, {"factor": 5, "seconds": 2.0}],
           "scale_phase": {"seconds": 0.75, "correlated": {"seconds": 0.5}}}
    assert phase_seconds(fit) == {"levels": {"10": 1.25, "5": 2.0}, "last": 3.5, "spread": 0.75}
    assert phase_seconds({"seconds": 1.0}) == {"levels": {}, "last": 1.0, "spread": None}  # no pyramid, no σ phase


def test_scale_benchmark_rejects_unknown_cases_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _load("scale").main(["--cases", "mni152-big", "--out", str(tmp_path)])
    assert "unknown case 'mni152-big'" in capsys.readouterr().err
    for bad, message in ((["model.reduction=nope"], "model.reduction: expected one of"),
                         (["steps=abc"], "register.steps: expected an integer"), (["steps"], "expected KEY=VALUE")):
        with pytest.raises(SystemExit):
            _load("scale").main(["--set", *bad, "--out", str(tmp_path)])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "scale.json").exists()


def test_scale_figure_draws_the_latest_finished_run_of_each_case(tmp_path, capsys):
    def run(case, method, seconds, **extra):
        return {"case": case, "method": method, "timepoints": 4, "voxels": 1000, "seconds": seconds, **extra}

    old = {"command": "python benchmarks/scale.py A", "commit": "a1", "started": "2026-12-01T10:00:00Z",
           "runs": [run("c1", "groupmorph", 10.0), run("c1", "elastix", 20.0), run("c2", "ants", 5.0)]}
    new = {"command": "python benchmarks/scale.py B", "commit": "b2", "started": "2026-12-05T10:00:00Z",
           "runs": [run("c1", "groupmorph", 12.0), {"case": "c1", "method": "ants", "failed": "killed"},
                    {"case": "c2", "method": "ants", "failed": "killed"}]}
    paths = []
    for name, report in (("new.json", new), ("old.json", old)):
        (tmp_path / name).write_text(json.dumps(report))
        paths.append(str(tmp_path / name))
    report = _load("scale_figure").main([*paths, "--out", str(tmp_path / "fig")])
    got = {(r["case"], r["method"]): (r["seconds"], r["source_commit"]) for r in report["points"]}
    # the newer groupmorph run replaces the older; a failed run leaves the older finished one; c1 ants never finished
    assert got == {("c1", "groupmorph"): (12.0, "b2"), ("c1", "elastix"): (20.0, "a1"), ("c2", "ants"): (5.0, "a1")}
    assert [(r["case"], r["method"]) for r in report["unfinished"]] == [("c1", "ants")]
    saved = json.loads((tmp_path / "fig" / "scale_figure.json").read_text())
    assert saved["command"].startswith("python benchmarks/scale_figure.py") and saved["points"] == report["points"]
    assert (tmp_path / "fig" / "scale.png").stat().st_size > 1000 and "unfinished: killed" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        _load("scale_figure").main([str(tmp_path / "nothing.json"), "--out", str(tmp_path / "x")])
    assert "no such scale JSON" in capsys.readouterr().err


def test_memory_estimate_benchmark_smoke(tmp_path, capsys):
    """One tiny case: the child's own peak (more than Python and torch alone, less than the machine)
    beside the estimate for the same grid, K and samples."""
    from groupmorph_pyro.config import Config
    from groupmorph_pyro.memory import GIB, estimate_peak

    report = _load("memory_estimate").main(["--cases", "32x32x24:3:2", "--steps", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "memory_estimate.json").read_text())
    assert saved["rows"] == report["rows"] and saved["commit"] and saved["finished"]
    (row,) = saved["rows"]
    assert row["case"] == "32x32x24:3:2" and row["samples"] == 2 and row["path"] == "image grid"
    assert 0.15 < row["measured_gib"] < 8.0
    assert row["estimated_gib"] == pytest.approx(estimate_peak((32, 32, 24), 3, Config(), 2)["bytes"] / GIB)
    assert row["estimate_over_measured"] == pytest.approx(row["estimated_gib"] / row["measured_gib"])
    assert "32x32x24:3:2" in capsys.readouterr().out


def test_memory_estimate_benchmark_rejects_a_bad_case(tmp_path):
    with pytest.raises(SystemExit, match="expected DxHxW:K or DxHxW:K:S, got '24x24:3'"):
        _load("memory_estimate").main(["--cases", "24x24:3", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_ventilation_benchmark_smoke(tmp_path, capsys):
    """benchmarks/ventilation.py scores GroupMorph's and Elastix's det J − 1 against the phantom's known
    one with the same code, and writes its JSON with command, commit and machine."""
    pytest.importorskip("itk")
    rows = _load("ventilation").main(["--methods", "groupmorph", "elastix", "--shape", "40", "40", "32",
                                      "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "ventilation.json").read_text())
    assert saved["command"].startswith("python benchmarks/ventilation.py") and saved["commit"] and saved["rows"] == rows
    assert [(r["method"], r["from"]) for r in rows] == [("groupmorph", 0), ("groupmorph", 2), ("elastix", 0), ("elastix", 2)]
    for r in rows:
        same = rows[0] if r["from"] == 0 else rows[1]  # one truth per direction, whatever the method
        assert r["mask_voxels"] > 1000 and r["seconds"] > 0 and r["truth_mean"] == same["truth_mean"]
        assert r["correlation"] > 0.3 and r["mean_absolute_error"] < r["truth_sd"] + abs(r["truth_mean"])
    assert "| groupmorph |" in capsys.readouterr().out


def test_derived_truth_benchmark_refuses_a_bad_setting_before_registering(tmp_path, monkeypatch, capsys):
    """A bad --set: one line and exit 2, no registration, nothing written."""
    derived_truth = _load("derived_truth")
    monkeypatch.setattr(derived_truth, "register", lambda *a, **k: pytest.fail("registered with a bad setting"))
    for bad, message in (("scale_beta=0.5", "section.key=value"), ("register.no_such_setting=1", "no_such_setting")):
        with pytest.raises(SystemExit) as exit_info:
            derived_truth.main(["--out", str(tmp_path), "--set", bad])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "derived_truth.json").exists()


def test_calibration_benchmark_refuses_bad_settings_before_registering(tmp_path, capsys):
    """--set without '=', an unknown or mistyped setting, or K < 2: one line and exit 2, nothing written."""
    calibration = _load("calibration")
    for bad, message in ((["--set", "steps"], "expected KEY=VALUE, got 'steps'"),
                         (["--set", "no_such_setting=1"], "no_such_setting"),
                         (["--model", "reduction=nope"], "model.reduction: expected one of"),
                         (["--timepoints", "1"], "--timepoints: expected an integer >= 2, got 1")):
        with pytest.raises(SystemExit) as exit_info:
            calibration.main(["--betas", "5", *bad, "--out", str(tmp_path / "c.json")])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()


def test_derived_truth_benchmark_writes_every_figure(tmp_path):
    out = _load("derived_truth").main(["--out", str(tmp_path)])
    saved = json.loads((tmp_path / "derived_truth.json").read_text())
    assert saved["command"].startswith("python benchmarks/derived_truth.py") and saved["commit"] and saved["machine"]
    assert set(out) == {"midposition", "trajectory", "ventilation", "curves", "label_probabilities"}
    assert out["midposition"]["rmse"] < min(out["midposition"]["phase_rmse"])
    assert out["trajectory"]["error_mm"] < out["trajectory"]["identity_mm"]
    assert out["curves"]["lesion_error_after"] < out["curves"]["lesion_error_before"]


def test_provenance_commit_flags_changed_code_but_not_rewritten_results(tmp_path, monkeypatch):
    """A batch of benchmark runs rewrites earlier results: those leave the commit clean, a changed script does not."""
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("no git")
    provenance = _load("provenance")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "bench.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "r.json").write_text("{}\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(git + ["add", "-A"], cwd=tmp_path, check=True)
    subprocess.run(git + ["commit", "-qm", "x"], cwd=tmp_path, check=True)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    monkeypatch.setattr(provenance, "HERE", tmp_path / "benchmarks")
    assert provenance.commit() == sha
    (tmp_path / "benchmarks" / "results" / "r.json").write_text('{"rows": []}\n')
    assert provenance.commit() == sha
    (tmp_path / "benchmarks" / "bench.py").write_text("x = 2\n")
    assert provenance.commit() == sha + "+uncommitted"
