"""How the network runs (precision, layout, torch.compile) and the memory-lean inference path:
outputs must agree with the fp32 eager, unchunked computation."""
import copy
import json
import shutil

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounter

from groupmorph_pyro import likelihoods
from groupmorph_pyro.checks import InputError
from groupmorph_pyro.cli import main
from groupmorph_pyro.config import Config
from groupmorph_pyro.group import displacements, inverse_displacements, jacobians, warp_group
from groupmorph_pyro.likelihoods import joint_histograms
from groupmorph_pyro.model import GroupMorphGuide
from groupmorph_pyro.registration import register
from groupmorph_pyro.synthetic import breathing_phantom
from groupmorph_pyro.train import load_checkpoint, train

from conftest import smooth_field, smooth_image
from test_train import tiny_config


def small_guide(k=3, seed=0):
    """A tiny guide whose heads give O(1)-voxel means (the default init gives ~1e-4 voxels)."""
    torch.manual_seed(seed)
    guide = GroupMorphGuide(k, encoder=(4, 8), decoder=(8, 8, 4)).eval()
    for head in (guide.mean_head, guide.var_head):
        torch.nn.init.normal_(head.weight, std=0.3)
    return guide


def group(k=3, shape=(16, 16, 16)):
    return torch.cat([smooth_image(shape, seed=s) for s in range(k)], 1)  # (1, K, D, H, W)


def test_channels_last_gives_the_same_posterior_and_state_dict():
    guide, x = small_guide(), group()
    with torch.no_grad():
        ref = guide.distribution_params(x, 1)
        keys = list(guide.state_dict())
        guide.set_runtime(channels_last=True)
        out = guide.distribution_params(x, 1)
    assert guide.unet.down[0][0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert list(guide.state_dict()) == keys
    for a, b in zip(ref, out):
        assert a.dtype == b.dtype == torch.float32
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    guide.set_runtime()  # back to the default layout
    assert guide.unet.down[0][0].weight.is_contiguous()
    assert guide.runtime() == {"precision": "fp32", "channels_last": False, "compile": False}


def test_bf16_autocast_stays_close_to_fp32_and_trains():
    guide, x = small_guide(), group()
    with torch.no_grad():
        ref_loc, ref_scale = guide.distribution_params(x, 0)
    guide.set_runtime(precision="bf16")
    with pytest.warns(RuntimeWarning, match="bf16"):  # on the CPU it warns about speed
        loc, scale = guide.distribution_params(x, 0)
    assert loc.dtype == scale.dtype == torch.float32
    assert ref_loc.abs().max() > 0.5  # a test of O(1)-voxel outputs, not of zeros
    assert (loc - ref_loc).abs().max() < 0.05 * ref_loc.abs().max()
    assert ((scale - ref_scale).abs() / ref_scale).max() < 0.05
    assert not torch.equal(loc, ref_loc)  # autocast did run in bf16
    (loc.square().mean() + scale.mean()).backward()
    grads = [p.grad for p in guide.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_compile_runs_the_compiled_network_and_matches_eager():
    guide, x = small_guide(), group()
    with torch.no_grad():
        ref = guide.distribution_params(x, 2)
        counter = CompileCounter()
        guide.set_runtime(compile=counter, channels_last=True)
        out = guide.distribution_params(x, 2)
        assert counter.frame_count >= 1
        for a, b in zip(ref, out):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
        compiled = guide._compiled
        guide.set_runtime(compile=counter, channels_last=True)  # same settings (register does this per group)
        assert guide._compiled is compiled
        # a copy compiles its own network (it must not run the original's weights)
        twin = copy.deepcopy(guide)
        with torch.no_grad():
            twin.mean_head.bias.add_(1.0)
        assert not torch.allclose(twin.distribution_params(x, 2)[0], out[0])
        assert torch.allclose(guide.distribution_params(x, 2)[0], out[0])


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_inductor_backend_matches_eager():
    guide, x = small_guide(k=2), group(k=2)
    with torch.no_grad():
        ref = guide.distribution_params(x, 0)[0]
        out = guide.set_runtime(compile=True).distribution_params(x, 0)[0]
    assert guide.runtime()["compile"] == "inductor"
    assert torch.allclose(ref, out, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    ({"precision": "fp16"}, "precision: expected one of"),
    ({"compile": "no-such-backend"}, "compile: expected false, true or a torch.compile backend"),
])
def test_bad_runtime_settings_are_rejected(kwargs, message):
    with pytest.raises(InputError, match=message):
        small_guide().set_runtime(**kwargs)


@pytest.mark.parametrize("section, message", [
    ({"precision": "half"}, "precision"),
    ({"channels_last": "yes"}, "runtime.channels_last: expected true or false"),
    ({"compile": "nope"}, "compile"),
    ({"amp": True}, "unknown key"),
])
def test_bad_runtime_config_is_rejected(section, message):
    with pytest.raises(InputError, match=message):
        Config.from_dict({"runtime": section})


def test_chunked_timepoints_equal_batched():
    v = torch.stack([smooth_field((12, 10, 8), amplitude=2.0, seed=s)[0] for s in range(3)])[None]  # (1, 3, 3, ...)
    for fn in (displacements, inverse_displacements):
        assert torch.allclose(fn(v, True, 7), fn(v, True, 7, chunk=1), atol=1e-6)
        assert torch.allclose(fn(v, False, 7), fn(v, False, 7, chunk=2), atol=1e-6)
    disp = displacements(v)
    assert torch.allclose(jacobians(disp), jacobians(disp, chunk=1), atol=1e-6)
    assert jacobians(disp).shape == (1, 3, 12, 10, 8)
    images = torch.rand(1, 3, 12, 10, 8)
    assert torch.allclose(warp_group(images, disp), warp_group(images, disp, chunk=2), atol=1e-6)
    with pytest.raises(InputError, match="chunk: expected an integer >= 1"):
        warp_group(images, disp, chunk=0)
    with pytest.raises(InputError, match="chunk: expected an integer >= 1"):
        displacements(v, chunk=0)
    with pytest.raises(InputError, match=r"jacobians: expected displacements \(B, K, 3, D, H, W\)"):
        jacobians(disp[:, :, :2])


@pytest.mark.parametrize("histogram", ["gaussian", "bspline"])
def test_histograms_accumulated_in_voxel_chunks_equal_one_pass(monkeypatch, histogram):
    x = group(k=3, shape=(10, 9, 7)).requires_grad_()
    whole = joint_histograms(x, 16, histogram=histogram)
    (gw,) = torch.autograd.grad((whole * torch.arange(whole.numel()).view_as(whole)).sum(), x)
    monkeypatch.setattr(likelihoods, "_CHUNK", 97)  # 630 voxels in 7 uneven chunks
    chunked = joint_histograms(x, 16, histogram=histogram)
    (gc,) = torch.autograd.grad((chunked * torch.arange(chunked.numel()).view_as(chunked)).sum(), x)
    assert torch.allclose(whole, chunked, atol=1e-6)
    assert torch.allclose(gw, gc, atol=1e-5, rtol=1e-4)


def test_register_with_runtime_options_and_tiles_matches_default():
    g = breathing_phantom((16, 16, 16), 3, seed=2, num_landmarks=4)
    cfg = Config()
    cfg.model.num_timepoints = 3
    cfg.model.encoder, cfg.model.decoder = [4, 8], [8, 8, 4]
    guide = small_guide()
    ref = register(g.images, cfg, guide, fixed=1)
    cfg.runtime.channels_last, cfg.runtime.compile = True, "aot_eager"
    fast = register(g.images, cfg, guide, fixed=1)
    assert guide.runtime()["compile"] == "aot_eager"
    for name in ("displacement", "inverse_displacement", "jacobian", "warped", "loc", "scale"):
        assert np.allclose(getattr(ref, name), getattr(fast, name), atol=1e-4), name
    assert abs(ref.summary["nmi_after"] - fast.summary["nmi_after"]) < 1e-5


def test_training_with_channels_last_resumes_exactly_and_checkpoints_load_eager(tmp_path):
    def cfg(path):
        c = tiny_config(path, 3)
        c.runtime.channels_last = True
        return c

    straight = load_checkpoint(train(cfg(tmp_path / "s"), progress=False))
    train(cfg(tmp_path / "r"), progress=False, stop_at=2)
    _, resumed, _ = load_checkpoint(train(cfg(tmp_path / "r"), resume=True, progress=False))
    for a, b in zip(straight[1].state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    stored = torch.load(tmp_path / "s" / "last.pt", weights_only=False)["config"]["runtime"]
    assert stored["channels_last"] is True  # how it was trained is recorded
    assert straight[0].runtime.channels_last is False  # how it runs now is the caller's choice
    assert straight[1].runtime()["channels_last"] is False


@pytest.fixture
def nifti_group(tmp_path):
    import nibabel as nib

    g = breathing_phantom((16, 16, 16), 3, seed=4, num_landmarks=4)
    paths = []
    for k in range(3):
        paths.append(tmp_path / f"t{k}.nii.gz")
        nib.save(nib.Nifti1Image(g.images[k], np.eye(4)), paths[-1])
    return [str(p) for p in paths]


def test_cli_register_runtime_and_window_flags(tmp_path, nifti_group, capsys):
    c = tiny_config(tmp_path / "run", 1)
    ckpt = train(c, progress=False)
    base = ["register", *nifti_group, "--checkpoint", str(ckpt), "--quiet"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--out", str(tmp_path / "b"), "--channels-last", "--compile", "aot_eager",
                 "--window", "16", "16", "8", "--overlap", "0.5"]) == 0
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("a", "b"))
    assert a["amortized"] and b["amortized"]
    rc = main([*base, "--out", str(tmp_path / "c"), "--compile", "bogus"])
    assert rc == 2 and "compile: expected" in capsys.readouterr().err
    rc = main([*base, "--out", str(tmp_path / "d"), "--window", "16", "16", "8", "--overlap", "1.5"])
    assert rc == 2 and "overlap" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
