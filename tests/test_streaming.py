"""Full-resolution outputs one timepoint at a time: GroupTransform.timepoint_displacement against the
group's maps, register(sink=...) against the in-memory result, FolderWriter's staging (a failure
leaves nothing) and its error paths, and the landmark summary from per-timepoint mapped points."""
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from groupmorph_pyro.checks import InputError
from groupmorph_pyro.config import Config
from groupmorph_pyro.group import GroupTransform
from groupmorph_pyro.metrics import landmark_report, map_landmarks
from groupmorph_pyro.outputs import FolderWriter, output_paths, write_registration
from groupmorph_pyro.registration import register
from groupmorph_pyro.results import RegistrationResult
from groupmorph_pyro.spatial import _gaussian_blur
from groupmorph_pyro.synthetic import breathing_phantom

K = 3


def _latents(num, grid, seed=0, amplitude=1.5):
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 3 * num, *grid, generator=gen, dtype=torch.float64)
    return amplitude * _gaussian_blur(noise, [1.5, 1.5, 1.5]).reshape(1, num, 3, *grid)


@pytest.mark.parametrize("mode,fixed", [("all-to-one", 1), ("all-moving", None)])
@pytest.mark.parametrize("diffeomorphic", [True, False])
@pytest.mark.parametrize("shape", [None, (15, 17, 13)])
def test_timepoint_displacement_is_that_timepoint_of_the_group_maps(mode, fixed, diffeomorphic, shape):
    """Each timepoint's forward and inverse map computed alone equals the batched maps' entry (on the
    latent grid, and moved to a finer image grid as for a control grid)."""
    t = GroupTransform(K, mode, fixed, diffeomorphic=diffeomorphic, integration_steps=5)
    z = _latents(t.num_latent, (8, 9, 7))
    forward, inverse = t.displacements(z, shape), t.inverse_displacements(z, shape)
    assert forward.abs().max() > 0.5
    for k in range(K):
        torch.testing.assert_close(t.timepoint_displacement(z, k, shape), forward[:, k], rtol=0, atol=1e-12)
        torch.testing.assert_close(t.timepoint_displacement(z, k, shape, inverse=True), inverse[:, k], rtol=0, atol=1e-12)
    if fixed is not None:
        assert not t.timepoint_displacement(z, fixed, shape).any()


def test_timepoint_displacement_bad_timepoint():
    t = GroupTransform(K, "all-to-one", 0)
    z = _latents(K - 1, (6, 6, 6))
    for k in (-1, K, 1.5):
        with pytest.raises(InputError, match="k"):
            t.timepoint_displacement(z, k)


def test_landmark_report_from_mapped_points_equals_the_fields():
    """The summary's landmark distances from per-timepoint mapped points (what register assembles)
    equal those computed from the whole fields."""
    t = GroupTransform(K, "all-to-one", 0, integration_steps=5)
    z = _latents(K - 1, (10, 11, 9), amplitude=2.0)
    disp, inv = t.displacements(z)[0], t.inverse_displacements(z)[0]
    gen = np.random.default_rng(0)
    landmarks = gen.uniform(2, 7, size=(K, 6, 3))
    mapped = map_landmarks(torch.as_tensor(landmarks), disp, inv)
    spacing = (2.0, 1.5, 2.5)
    assert landmark_report(landmarks, spacing=spacing, mapped=mapped) == landmark_report(landmarks, disp, inv, spacing)
    with pytest.raises(InputError, match=r"mapped: expected \(K, K, L, 3\)"):
        landmark_report(landmarks, spacing=spacing, mapped=mapped[:, :2])


@pytest.fixture(scope="module")
def phantom():
    g = breathing_phantom((24, 24, 20), K, seed=2, num_landmarks=20)
    cfg = Config()
    cfg.model.num_timepoints = K
    cfg.register.steps, cfg.register.coarse_steps = 30, 10
    return g, cfg


def _untimed(value):
    """A summary without its timings (every key ending in "seconds")."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if not k.endswith("seconds")}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def _nifti_arrays(folder):
    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted(folder.glob("*.nii.gz"))}


def test_register_with_a_folder_writer_writes_what_write_registration_writes(tmp_path, phantom):
    """A registration streamed into a FolderWriter writes the files of the in-memory result written
    afterwards, to the bit, holds no full-resolution field, and leaves no staging folder."""
    g, cfg = phantom
    kept = register(g.images, cfg, landmarks=g.landmarks, affine=g.affine, seed=1)
    write_registration(kept, tmp_path / "kept", g.affine)
    with FolderWriter(tmp_path / "streamed", g.affine, K) as writer:
        streamed = register(g.images, cfg, landmarks=g.landmarks, affine=g.affine, seed=1, sink=writer)
        written = writer.finish(streamed)
    assert streamed.warped is None and streamed.displacement is None and streamed.jacobian is None
    assert streamed.inverse_displacement is None
    a, b = _nifti_arrays(tmp_path / "kept"), _nifti_arrays(tmp_path / "streamed")
    assert sorted(a) == sorted(b) and len(a) == 6 * K
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    assert np.abs(a["displacement_1.nii.gz"]).max() > 0.5  # it moved
    sa, sb = (_untimed(json.loads((tmp_path / f / "summary.json").read_text())) for f in ("kept", "streamed"))
    assert sa == sb
    assert sb["landmarks"]["registered"]["mean_mm"] < sb["landmarks"]["identity"]["mean_mm"]
    assert sorted(written) == sorted(str(p) for p in (tmp_path / "streamed").iterdir())
    assert not (tmp_path / "streamed" / FolderWriter.STAGE).exists()


def _fields(shape, value=0.5):
    return {"warped": np.full(shape, value, np.float32), "jacobian": np.ones(shape, np.float32),
            "displacement": np.full((3, *shape), value, np.float32),
            "inverse_displacement": np.full((3, *shape), -value, np.float32)}


def test_a_failure_while_streaming_leaves_no_output_files(tmp_path):
    out = tmp_path / "reg"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(RuntimeError, match="interrupted"):
        with FolderWriter(out, np.eye(4), K) as writer:
            writer(0, _fields((4, 5, 6)))
            assert any((out / FolderWriter.STAGE).iterdir())
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    with pytest.raises(RuntimeError, match="interrupted"):  # a folder the writer made goes too
        with FolderWriter(tmp_path / "new" / "reg", np.eye(4), K) as writer:
            writer(1, _fields((4, 5, 6)))
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == []


def test_folder_writer_clears_what_an_interrupted_run_left(tmp_path):
    stale = tmp_path / "reg" / FolderWriter.STAGE
    stale.mkdir(parents=True)
    (stale / "warped_0.nii.gz").write_bytes(b"partial")
    writer = FolderWriter(tmp_path / "reg", np.eye(4), 2)
    assert not any(writer.stage.iterdir())
    writer.discard()


def test_folder_writer_bad_input(tmp_path):
    inputs = [tmp_path / "in" / "warped_0.nii.gz"]
    with pytest.raises(InputError, match="refusing to overwrite input"):
        FolderWriter(tmp_path / "in", np.eye(4), 2, inputs)
    with pytest.raises(InputError, match=r"affine: expected a finite 4x4 matrix, got shape \(3, 3\)"):
        FolderWriter(tmp_path / "a", np.eye(3), 2)
    with pytest.raises(InputError, match="num_timepoints"):
        FolderWriter(tmp_path / "b", np.eye(4), 1)
    writer = FolderWriter(tmp_path / "c", np.eye(4), 2)
    with pytest.raises(InputError, match=r"k: expected a timepoint 0..1, got 2"):
        writer(2, _fields((3, 3, 3)))
    with pytest.raises(InputError, match=r"unknown output array\(s\) \['warp'\]"):
        writer(0, {"warp": np.zeros((3, 3, 3))})
    writer(0, _fields((3, 3, 3)))
    result = RegistrationResult(None, None, None, None, np.zeros(1), np.zeros(1), {})
    with pytest.raises(InputError, match=r"never computed: \['warped_1.nii.gz'"):
        writer.finish(result)
    assert not (tmp_path / "c").exists()


def test_write_registration_of_a_streamed_result_is_an_error(tmp_path, phantom):
    g, cfg = phantom
    with FolderWriter(tmp_path / "reg", g.affine, K) as writer:
        result = register(g.images, cfg, finetune_steps=0, sink=writer)
        writer.finish(result)
    with pytest.raises(InputError, match="holds no"):
        write_registration(result, tmp_path / "again", g.affine)
    assert all(p.is_file() for p in output_paths(tmp_path / "reg", K))


def test_save_nifti_writes_a_stored_gzip_stream_every_reader_opens(tmp_path):
    """``.nii.gz`` at GZIP_LEVEL 0: a gzip stream holding the NIfTI bytes as they are (its size is the
    uncompressed file's plus the stream's headers), read back by nibabel to the bit with its affine and intent."""
    import gzip

    from groupmorph_pyro.volumes import GZIP_LEVEL, save_nifti

    assert GZIP_LEVEL == 0
    data = np.random.default_rng(0).normal(size=(7, 8, 9, 1, 3)).astype(np.float32)
    affine = np.array([[-2.0, 0, 0, 10], [0, 2.0, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]])
    save_nifti(tmp_path / "f.nii.gz", data, affine, "vector")
    save_nifti(tmp_path / "f.nii", data, affine, "vector")
    raw = (tmp_path / "f.nii").read_bytes()
    packed = (tmp_path / "f.nii.gz").read_bytes()
    assert packed[:2] == b"\x1f\x8b" and gzip.decompress(packed) == raw
    assert len(raw) < len(packed) < len(raw) + 200
    img = nib.load(tmp_path / "f.nii.gz")
    assert np.array_equal(np.asarray(img.dataobj), data) and np.allclose(img.affine, affine)
    assert img.header.get_intent()[0] == "vector"
