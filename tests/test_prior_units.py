"""The prior's weights per mm (model.prior_units: mm): voxel-unit weights from the voxel size."""
import math

import numpy as np
import pytest
import torch

from groupmorph_pyro.checks import InputError
from groupmorph_pyro.config import Config, migrate
from groupmorph_pyro.model import build_model, prior_options_for
from groupmorph_pyro.priors import PRIORS, make_prior, voxel_prior_options
from groupmorph_pyro.registration import prepare

LENGTH = 56.0  # mm along axis 0: 56, 28 and 16 voxels at 1, 2 and 3.5 mm
AMPLITUDE = 2.0  # mm
WEIGHTS = {  # (prior, options in mm, continuum energy per unit cross-section of v(x) = A cos(k x), k = π / LENGTH)
    "bending": ("bending", {"lambda_b": 300.0, "lambda_v": 1e-12}, lambda k: 300.0 * AMPLITUDE ** 2 * k ** 4 * LENGTH / 2),
    "magnitude": ("bending", {"lambda_b": 0.0, "lambda_v": 0.02}, lambda k: 0.02 * AMPLITUDE ** 2 * LENGTH / 2),
    "gradient": ("laplacian", {"lambda_u": 3.0, "lambda_v": 1e-12}, lambda k: 3.0 * AMPLITUDE ** 2 * k ** 2 * LENGTH / 2),
}


@pytest.mark.parametrize("term", sorted(WEIGHTS))
@pytest.mark.parametrize("spacing", [1.0, 2.0, 3.5])
def test_the_energy_per_mm_is_the_continuum_integral_at_any_voxel_size(term, spacing):
    """A cosine displacement of 2 mm over 56 mm sampled at 1, 2 and 3.5 mm: the prior's quadratic form
    with the voxel-unit weights, times the voxel volume, is the closed-form integral of the density
    (λ_b |Δv|², λ_u |∇v|², λ_v |v|²) per unit cross-section, up to the grid's discretisation error."""
    name, options, exact = WEIGHTS[term]
    n, m = int(round(LENGTH / spacing)), 2
    x = (torch.arange(n, dtype=torch.float64) + 0.5) * spacing  # cell centres (mm)
    v = AMPLITUDE * torch.cos(math.pi * x / LENGTH)  # mm, constant across axes 1 and 2
    u = torch.zeros(3, n, m, m, dtype=torch.float64)
    u[0] = (v / spacing)[:, None, None]  # the same field in voxels
    prior = make_prior(name, **voxel_prior_options(name, options, (spacing,) * 3))((n, m, m))
    energy = float(prior.quadratic_form(u)) * spacing ** 3 / (m * spacing) ** 2  # per mm² of cross-section
    assert energy == pytest.approx(exact(math.pi / LENGTH), rel=0.03)


def test_voxel_weights_are_the_closed_form_factors():
    assert voxel_prior_options("bending", {}, (2.0, 2.0, 2.0)) == pytest.approx({"lambda_b": 1.5, "lambda_v": 0.004})
    assert voxel_prior_options("bending", {"lambda_b": 2.0}, (1.0, 2.0, 4.0)) == pytest.approx(  # geometric mean 2 mm
        {"lambda_b": 0.5, "lambda_v": 0.004})
    assert voxel_prior_options("laplacian", {"lambda_u": 1.0, "lambda_v": 0.01}, (3.0,) * 3) == pytest.approx(
        {"lambda_u": 1.0, "lambda_v": 0.09})
    assert voxel_prior_options("diagonal", {}, (0.5,) * 3) == pytest.approx({"lambda_v": 0.0025})
    assert voxel_prior_options("bending", {}, (1.0,) * 3) == PRIORS.options("bending")  # 1 mm: unchanged


def test_register_scales_the_prior_with_the_groups_spacing():
    images = np.random.default_rng(0).random((2, 16, 16, 16)).astype(np.float32)
    cfg = Config().with_timepoints(2)
    group = prepare(images, cfg, affine=np.diag([3.5, 3.5, 3.5, 1.0]))
    prior = group.model.prior((16, 16, 16))
    assert (prior.lambda_b, prior.lambda_v) == pytest.approx((6.0 / 3.5 ** 2, 0.001 * 3.5 ** 2))
    prior = prepare(images, cfg).model.prior((16, 16, 16))  # no affine: 1 mm
    assert (prior.lambda_b, prior.lambda_v) == pytest.approx((6.0, 0.001))
    cfg.model.prior_units = "voxel"  # the weights as given, whatever the spacing
    prior = prepare(images, cfg, affine=np.diag([3.5, 3.5, 3.5, 1.0])).model.prior((16, 16, 16))
    assert (prior.lambda_b, prior.lambda_v) == pytest.approx((6.0, 0.001))
    assert prior_options_for(cfg.model, (3.5,) * 3) == {}


def _checkpoint_model(model: dict) -> dict:
    """A checkpoint's model section as :func:`migrate` reads it."""
    return migrate({"model": model}, checkpoint=True)["model"]


def test_old_checkpoint_sections_keep_their_voxel_weights():
    assert _checkpoint_model({"prior": "bending", "prior_options": {}}) == {
        "prior": "bending", "prior_options": {"lambda_b": 1.0, "lambda_v": 0.01}, "prior_units": "voxel",
        "integration_downsize": 1, "jitter": False}
    assert _checkpoint_model({"prior": "bending", "prior_options": {"lambda_b": 3.0}})["prior_options"] == {
        "lambda_b": 3.0, "lambda_v": 0.01}
    assert _checkpoint_model({"prior": "laplacian", "prior_options": {}})["prior_options"] == {}
    new = {"prior": "bending", "prior_options": {}, "prior_units": "mm", "integration_downsize": 3, "jitter": True}
    assert _checkpoint_model(new) == new  # written with prior_units: as it is
    assert migrate({"model": {"prior": "bending"}}) == {"model": {"prior": "bending"}}  # a YAML config: as it is
    legacy = Config.from_dict({"model": {"lambda_u": 1.0, "lambda_v": 0.01, "lambda_b": 1.0}}).model
    assert (legacy.prior, legacy.prior_units) == ("laplacian", "voxel")  # files before prior_options
    model = build_model(Config.from_dict({"model": {"prior": "bending"}}, checkpoint=True).model, spacing=(3.0,) * 3)
    assert (model.prior((4, 4, 4)).lambda_b, model.prior((4, 4, 4)).lambda_v) == (1.0, 0.01)


@pytest.mark.parametrize("call, match", [
    (lambda: voxel_prior_options("bending", {}, (1.0, 1.0)), r"spacing: expected 3 voxel sizes > 0 \(mm\), got \(1.0, 1.0\)"),
    (lambda: voxel_prior_options("bending", {}, (1.0, 0.0, 1.0)), r"expected 3 voxel sizes > 0"),
    (lambda: voxel_prior_options("bending", {}, (1.0, float("nan"), 1.0)), r"expected 3 voxel sizes > 0"),
    (lambda: voxel_prior_options("bending", {}, None), r"expected 3 voxel sizes > 0 \(mm\), got None"),
    (lambda: voxel_prior_options("bending", {"lambda_u": 1.0}, (1.0,) * 3), r"prior 'bending' has no option"),
    (lambda: voxel_prior_options("mine", {}, (1.0,) * 3), r"prior 'mine': weights in mm need its spacing exponents"),
    (lambda: Config.from_dict({"model": {"prior_units": "cm"}}), r"model.prior_units: expected one of \['mm', 'voxel'\], got 'cm'"),
    (lambda: prepare(np.zeros((2, 8, 8, 8), np.float32), Config().with_timepoints(2), affine=np.diag([1.0, 0.0, 1.0, 1.0])),
     r"spacing: expected 3 voxel sizes > 0"),
    (lambda: prepare(np.zeros((2, 8, 8, 8), np.float32), Config().with_timepoints(2),
                     affine=np.diag([1.0, np.nan, 1.0, 1.0])), r"affine: expected finite entries"),
])
def test_bad_prior_units_input(call, match):
    with pytest.raises(InputError, match=match):
        call()


def test_weights_in_mm_need_a_prior_with_spacing_exponents():
    @PRIORS.register("test-prior-units-custom")
    def _custom(spatial_shape, device=None, lambda_v: float = 0.01):
        return make_prior("diagonal", lambda_v=lambda_v)(spatial_shape, device)

    try:
        with pytest.raises(InputError, match=r"model.prior_units: 'mm' needs a prior of .*set model.prior_units: voxel"):
            Config.from_dict({"model": {"prior": "test-prior-units-custom"}})
        cfg = Config.from_dict({"model": {"prior": "test-prior-units-custom", "prior_units": "voxel"}})
        assert build_model(cfg.model, spacing=(3.0,) * 3).prior((4, 4, 4)).lambda_v == 0.01
    finally:
        PRIORS._entries.pop("test-prior-units-custom")


def _write_group(folder, spacing, k=3, shape=(12, 12, 12)):
    from groupmorph_pyro.volumes import save_nifti

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    paths = []
    for t in range(k):
        paths.append(str(folder / f"t{t}.nii.gz"))
        save_nifti(paths[-1], rng.random(shape), np.diag([*spacing, 1.0]))
    return paths


def test_training_builds_its_prior_at_the_training_groups_voxel_size(tmp_path, monkeypatch):
    import groupmorph_pyro.train as train_module

    cfg = Config().with_timepoints(3)
    cfg.data.synthetic = {"num_groups": 2, "shape": [20, 20, 20], "num_landmarks": 2}
    groups, spacing = train_module.load_training_data(cfg)
    assert len(groups) == 2 and spacing == (2.0, 2.0, 2.5)  # breathing_phantom's voxels
    cfg.data.synthetic = {}
    cfg.data.groups = [_write_group(tmp_path / "a", (1.5, 1.5, 3.0)), _write_group(tmp_path / "b", (1.5, 1.5, 3.0))]
    assert train_module.load_training_data(cfg)[1] == pytest.approx((1.5, 1.5, 3.0))
    seen = []
    real = train_module.build_model
    monkeypatch.setattr(train_module, "build_model", lambda mcfg, **kw: seen.append(kw.get("spacing")) or real(mcfg, **kw))
    cfg.model.encoder, cfg.model.decoder = [4], [4]
    cfg.train.iterations, cfg.train.patch_size, cfg.train.device = 1, [8, 8, 8], "cpu"
    cfg.train.output_dir = str(tmp_path / "run")
    train_module.train(cfg, progress=False)
    assert seen[0] == pytest.approx((1.5, 1.5, 3.0))
    cfg.data.groups.append(_write_group(tmp_path / "c", (1.0, 1.0, 1.0)))  # another voxel size
    with pytest.raises(InputError, match=r"training groups' voxel sizes differ \(1 to 1.89 mm.*set model.prior_units: voxel"):
        train_module.load_training_data(cfg)
    cfg.model.prior_units = "voxel"  # the weights as given: any mix
    assert len(train_module.load_training_data(cfg)[0]) == 3
