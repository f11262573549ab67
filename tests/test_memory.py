"""The memory check: the estimate's arithmetic, the available memory, and refusals before any work
(a header-only NIfTI too large for any machine, a manifest series, --force)."""
import math
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import groupmorph_pyro.memory as memory
from groupmorph_pyro.checks import InputError
from groupmorph_pyro.cli import main
from groupmorph_pyro.config import Config
from groupmorph_pyro.memory import (BASE_BYTES, FIT_BYTES, OUTPUT_BYTES, POINT_BYTES, SAMPLE_BYTES, GIB,
                                    available_memory, check_memory, estimate_peak)
from groupmorph_pyro.synthetic import breathing_phantom

AFFINE = np.diag([1.0, 1.0, 1.5, 1.0])


def _header_only(path: Path, shape, dtype=np.int16) -> Path:
    """A NIfTI whose header says ``shape`` and whose data is a sparse hole: no memory, no disk."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_sform(AFFINE, code=1)
    header.set_qform(AFFINE, code=1)
    header["vox_offset"] = 352
    with open(path, "wb") as fh:
        fh.write(header.binaryblock)
        fh.write(b"\0" * 4)  # no extensions
    os.truncate(path, 352 + math.prod(shape) * np.dtype(dtype).itemsize)
    return path


def test_estimate_adds_the_stages_measured_per_voxel():
    """Against the sum written out by hand: image-grid and control-grid paths, samples."""
    cfg = Config()
    small = estimate_peak((64, 64, 48), 6, cfg)
    v = 64 * 64 * 48
    assert small["path"] == "image grid"
    assert small["stages"] == {"base": BASE_BYTES, "inputs": 8 * 6 * v, "fit": FIT_BYTES * 6 * v,
                               "outputs": 4 * 6 * v + OUTPUT_BYTES * v}
    assert small["bytes"] == BASE_BYTES + 8 * 6 * v + max(FIT_BYTES * 6 * v, 4 * 6 * v + OUTPUT_BYTES * v)
    big = estimate_peak((512, 512, 136), 6, cfg, samples=3)
    v = 512 * 512 * 136
    grid = 103 * 103 * 28  # the 1/5 control grid
    assert big["path"] == "control grid 1/5"
    assert big["stages"]["fit"] == FIT_BYTES * 6 * grid + POINT_BYTES * 6 * cfg.register.sample_points
    assert big["stages"]["samples"] == SAMPLE_BYTES * 6 * v * 3
    assert big["bytes"] == BASE_BYTES + 8 * 6 * v + max(big["stages"][s] for s in ("fit", "outputs", "samples"))
    with pytest.raises(InputError, match="network path"):
        estimate_peak((64, 64, 48), 6, cfg, network=True)
    with pytest.raises(InputError, match="num_timepoints"):
        estimate_peak((64, 64, 48), 1, cfg)
    with pytest.raises(InputError, match="samples"):
        estimate_peak((64, 64, 48), 4, cfg, samples=-1)
    with pytest.raises(InputError, match="spatial_shape"):
        estimate_peak((64, 64), 4, cfg)


def test_available_memory_is_what_linux_reports():
    available = available_memory()
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        pytest.skip("no /proc/meminfo")
    total = next(int(line.split()[1]) * 1024 for line in meminfo.read_text().splitlines() if line.startswith("MemTotal:"))
    assert 0 < available <= total


def test_check_memory_refuses_with_both_numbers_and_what_would_fit():
    cfg = Config()
    need = estimate_peak((256, 256, 96), 6, cfg, samples=10)["bytes"]
    with pytest.raises(InputError) as err:
        check_memory((256, 256, 96), 6, cfg, samples=10, available=need // 2)
    message = str(err.value)
    assert "\n" not in message
    assert f"needs about {need / GIB:.1f} GiB, {need // 2 / GIB:.1f} GiB available" in message
    assert "--samples" in message and "coarser" in message and "--force" in message
    assert check_memory((256, 256, 96), 6, cfg, samples=10, available=need)["bytes"] == need


def test_register_refuses_a_group_too_large_for_any_machine_from_its_headers(tmp_path, capsys):
    """2048×2048×1024, K = 10: refused in under 2 s, one line, nothing written."""
    paths = [str(_header_only(tmp_path / f"t{k}.nii", (2048, 2048, 1024))) for k in range(10)]
    start = time.perf_counter()
    code = main(["register", *paths, "--out", str(tmp_path / "reg")])
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err.strip()
    assert code == 2 and seconds < 2.0, (code, seconds)
    assert len(err.splitlines()) == 1 and "2048x2048x1024, K=10) needs about" in err and "GiB available" in err
    assert not (tmp_path / "reg").exists()


@pytest.fixture
def small_group(tmp_path):
    g = breathing_phantom((20, 20, 20), 3, amplitude=2.0, num_landmarks=4, seed=3)
    paths = []
    for k in range(3):
        paths.append(str(tmp_path / f"t{k}.nii.gz"))
        nib.save(nib.Nifti1Image(g.images[k], AFFINE), paths[-1])
    return paths


def test_force_runs_what_the_check_refuses(tmp_path, small_group, monkeypatch, capsys):
    monkeypatch.setattr(memory, "available_memory", lambda: 1)
    assert main(["register", *small_group, "--out", str(tmp_path / "a"), "--finetune-steps", "2", "--no-report"]) == 2
    assert "20x20x20, K=3) needs about" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert main(["register", *small_group, "--out", str(tmp_path / "b"), "--finetune-steps", "2", "--no-report",
                 "--force", "--quiet"]) == 0
    assert (tmp_path / "b" / "summary.json").is_file()


def test_a_manifest_is_checked_before_its_first_series(tmp_path, small_group, monkeypatch, capsys):
    from groupmorph_pyro.data import SeriesEntry, write_manifest

    big = [str(_header_only(tmp_path / f"big{k}.nii", (2048, 2048, 1024))) for k in range(3)]
    manifest = tmp_path / "manifest.yaml"
    write_manifest(manifest, [SeriesEntry("small", small_group, [], "test"), SeriesEntry("huge", big, [], "test")])
    assert main(["register", "--manifest", str(manifest), "--out", str(tmp_path / "reg"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "series huge (2048x2048x1024, K=3) needs about" in err
    assert not (tmp_path / "reg" / "small").exists()
