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
    assert set(train) == {"gaussian", "bspline"} and all(r["seconds_per_step"] > 0 for r in train.values())
    # the lean histogram saves fewer bytes for backward than the dense one, at the same patch
    assert train["bspline"]["autograd_saved_gib"] < train["gaussian"]["autograd_saved_gib"]
    runtime = saved["runtime"]
    assert set(runtime) == {"fp32", "channels_last"} and runtime["channels_last"]["runtime"] == {"channels_last": True}
    assert runtime["channels_last"]["speedup_vs_fp32"] == pytest.approx(
        runtime["fp32"]["seconds"] / runtime["channels_last"]["seconds"])
    assert "Elastix / GroupMorph time" in capsys.readouterr().out


def test_memory_benchmark_smoke(tmp_path, capsys):
    report = _load("memory").main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "memory.json").read_text())
    assert set(saved["variants"]) == {"tiles 16³", "whole volume"}
    for r in report["variants"].values():
        assert "failed" not in r, r
        assert r["peak_gib"] > 0 and r["fields_seconds"] > 0
        assert r["peak_over_input"] == pytest.approx(r["peak_gib"] / saved["input_gib"])
    assert "peak / inputs" in capsys.readouterr().out
    assert not list(tmp_path.glob("tmp*"))  # the phantom's temporary .npy is gone
