"""Every example runs end to end on its synthetic twin (--smoke)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*/pipeline.py"))


def _load(path):
    spec = importlib.util.spec_from_file_location(f"example_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_examples_are_found():
    assert {p.parent.name for p in EXAMPLES} >= {"dirlab_4dct", "breast_mr"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.parent.name)
def test_example_smoke(tmp_path, path):
    results = _load(path).main(["--smoke", "--work", str(tmp_path)])
    assert results, "no test series evaluated"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved.keys() == results.keys()
    for name in results:
        out = tmp_path / "registered" / name
        assert (out / "summary.json").exists() and (out / "warped_0.nii.gz").exists()
        derived = tmp_path / "derived" / name
        wanted = {"dirlab_4dct": ["midposition.nii.gz", "midposition.png", "trajectories.csv", "trajectories.png"],
                  "breast_mr": ["curves.csv", "curves.png", "curves_subtraction_1_after.nii.gz", "regions_5_prob.nii.gz",
                                "regions_5_prob_labels.nii.gz", "regions_5_prob.json"]}[path.parent.name]
        assert all((derived / f).is_file() for f in wanted), sorted(p.name for p in derived.iterdir())
        if path.parent.name == "dirlab_4dct":  # the smoke run draws 4 posterior samples
            outputs = results[name]["outputs"]
            assert any(derived.glob("ventilation_0_to_*_sd.nii.gz")) and np.isfinite(outputs["ventilation_mean"])
            assert outputs["ventilation_sd_mean"] > 0
            assert "x_p95" in (derived / "trajectories.csv").read_text().splitlines()[0]
        else:
            assert json.loads((derived / "regions_5_prob.json").read_text())["samples"] == 4
    assert (tmp_path / "model" / "last.pt").exists()


def test_custom_likelihood_example():
    module = _load(Path(__file__).parent.parent / "examples" / "custom_likelihood.py")
    results = module.main(["--smoke"])
    assert len(results) == 2
    for r in results.values():
        assert r["registered_mm"] >= 0 and r["folding_percent"] < 1.0


def test_breast_example_names_unknown_test_patients(tmp_path):
    from groupmorph_pyro.prepare import write_dce_twin

    write_dce_twin(tmp_path / "raw" / "anna", "anna", shape=(20, 20, 16), spacing=(1.0, 1.0, 3.0), seed=0)
    module = _load(Path(__file__).parent.parent / "examples" / "breast_mr" / "pipeline.py")
    with pytest.raises(SystemExit, match=r"no patient folder\(s\) \['bob'\].*expected some of \['anna'\]"):
        module.main(["--series", str(tmp_path / "raw"), "--test-patients", "bob", "--work", str(tmp_path / "w")])
    assert not (tmp_path / "w").exists()
