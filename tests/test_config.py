from pathlib import Path

import numpy as np
import pytest
import yaml

from groupmorph_pyro.checks import InputError
from groupmorph_pyro.config import Config, load_config
from groupmorph_pyro.priors import PRIORS

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
PRESETS = sorted((Path(__file__).parent.parent / "configs" / "presets").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS + PRESETS, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path):
    cfg = load_config(path)
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_paper_defaults():
    cfg = Config()
    # package defaults (measured per-case): bending prior, quadratic B-spline histogram; the paper's in its configs
    assert (cfg.model.prior, cfg.model.integration_steps, cfg.model.alpha) == ("bending", 7, 15.0)
    assert (cfg.model.integration_downsize, cfg.register.covariance, cfg.model.jitter) == (3, "dct", True)
    assert cfg.register.finetune_lr == 0.0015 and cfg.register.scale_reset is True
    assert PRIORS.options("laplacian") == {"lambda_u": 1.0, "lambda_v": 0.01}  # the paper's weights by default
    for name in ("dirlab_4dct.yaml", "breast_mr.yaml", "cpu_small_all_to_one.yaml", "cpu_small_moving.yaml"):
        paper = load_config(next(p for p in CONFIGS if p.name == name)).model  # through presets/legacy.yaml
        assert (paper.prior, paper.prior_options, paper.histogram) == ("laplacian", {"lambda_u": 1.0, "lambda_v": 0.01},
                                                                       "gaussian")
        assert paper.integration_downsize == 1 and paper.jitter is False  # the paper: full grid, lattice likelihood
    assert load_config(next(p for p in CONFIGS if p.name == "cpu_small_moving_defaults.yaml")).model.jitter is False
    for path in (p for p in CONFIGS if p.name.startswith("cpu_small")):  # their per-case lines (presets/learning_curve.yaml)
        assert load_config(path).register.coarse_steps == 150, path.name
        assert load_config(path).register.guard_particles == 4, path.name
        assert load_config(path).model.histogram in ("bspline", "gaussian"), path.name
    assert Config().register.coarse_steps == 50
    assert Config().register.guard_particles == 2
    assert Config().model.histogram == "quadratic"
    assert Config().model.prior_units == "mm"  # with these weights per mm
    assert PRIORS.options("bending") == {"lambda_b": 6.0, "lambda_v": 0.001}
    for path in CONFIGS:  # every shipped config but the smoke test keeps the weights it was written / measured with
        model = load_config(path).model
        if path.name != "smoke.yaml":
            assert model.prior_units == "voxel", path.name
        if model.prior == "bending" and path.name != "smoke.yaml":
            assert model.prior_options == {"lambda_b": 1.0, "lambda_v": 0.01}, path.name
    assert (cfg.train.lr, cfg.train.iterations, cfg.train.patch_size) == (1e-5, 100000, [96, 96, 96])
    assert load_config(next(p for p in CONFIGS if p.name == "dirlab_4dct.yaml")).train.lr == 1e-5
    for name in ("dirlab_4dct.yaml", "breast_mr.yaml"):  # the paper's Gaussian Parzen window, pinned
        assert load_config(next(p for p in CONFIGS if p.name == name)).model.histogram == "gaussian"


@pytest.mark.parametrize(
    "content, match",
    [
        ({"model": {"lamda_u": 1.0}}, r"unknown key\(s\) \['lamda_u'\] in 'model'"),
        ({"model": {"prior": "laplacian", "prior_options": {"lamda_u": 1.0}}}, r"prior 'laplacian' has no option\(s\) \['lamda_u'\]"),
        ({"model": {"prior_options": {"lambda_u": 2.0}}}, r"prior 'bending' has no option.*set model.prior: laplacian"),
        ({"model": {"prior": "bending", "prior_options": {"lambda_u": 1.0}}}, r"prior 'bending' has no option"),
        ({"model": {"prior": "bending", "lambda_u": 3.0}}, r"model.lambda_u=3.0 does not apply to prior 'bending'"),
        ({"model": {"likelihood": "lncc", "likelihood_options": {"bins": 8}}}, r"similarity 'lncc' has no option"),
        ({"trian": {}}, r"unknown section\(s\) \['trian'\]"),
        ({"model": {"mode": "pairwise"}}, r"model.mode: expected one of"),
        ({"train": {"elbo": "renyi"}}, r"train.elbo"),
        ({"model": {"lambda_v": 0}}, r"model.prior_options.lambda_v: expected a finite number > 0, got 0"),
        ({"model": {"histogram": "box"}}, r"model.histogram: expected one of \('gaussian', 'bspline', 'quadratic'\), got 'box'"),
        ({"register": {"coarse_steps": -5}}, r"register.coarse_steps: expected an integer >= 0, got -5"),
        ({"register": {"coarse_steps": 0.5}}, r"register.coarse_steps: expected an integer, got 0.5"),
        ({"register": {"finetune_lr": 0}}, r"register.finetune_lr: expected a finite number > 0, got 0"),
        ({"register": {"scale_reset": "no"}}, r"register.scale_reset: expected true or false, got 'no'"),
        ({"model": {"integration_downsize": 0}}, r"model.integration_downsize: expected an integer >= 1, got 0"),
        ({"model": {"integration_downsize": 1.5}}, r"model.integration_downsize: expected an integer, got 1.5"),
        ({"register": {"covariance": "full"}}, r"register.covariance: expected 'diagonal' or 'dct', got 'full'"),
        ({"model": {"jitter": "yes"}}, r"model.jitter: expected true or false, got 'yes'"),
        ({"register": {"guard_particles": 0}}, r"register.guard_particles: expected an integer >= 1, got 0"),
        ({"register": {"scale_particles": 1.5}}, r"register.scale_particles: expected an integer"),
        ([1, 2], r"must hold a mapping"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, content, match):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(InputError, match=match):
        load_config(path)


def test_a_config_from_before_prior_options_keeps_its_laplacian_prior(tmp_path):
    """Files that kept the weights as model.lambda_u/lambda_v predate the bending default: their prior
    was the Laplacian, and it stays so."""
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"model": {"lambda_u": 2.0, "lambda_v": 0.02, "lambda_b": 1.0}}))
    model = load_config(path).model
    assert (model.prior, model.prior_options) == ("laplacian", {"lambda_u": 2.0, "lambda_v": 0.02})
    assert model.integration_downsize == 1 and model.jitter is False  # full grid and lattice likelihood too


def test_missing_config_file(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_histogram_setting_reaches_the_likelihood():
    from groupmorph_pyro.model import build_likelihood

    cfg = Config()
    assert build_likelihood(cfg.model).options["histogram"] == "quadratic"  # the default since 2026-12-02 (issue 13; cubic "bspline" before)
    cfg.model.histogram = "gaussian"
    assert build_likelihood(cfg.model).options["histogram"] == "gaussian"
    cfg.model.histogram = "bspline"
    assert build_likelihood(cfg.model).options["histogram"] == "bspline"
    cfg.model.likelihood = "mi"
    assert build_likelihood(cfg.model).options["histogram"] == "bspline"


def test_setting_an_unknown_config_attribute_is_an_error():
    """A renamed setting (e.g. model.lambda_v -> model.prior_options) must not be set silently."""
    cfg = Config()
    with pytest.raises(InputError, match=r"ModelConfig has no setting 'lambda_v'"):
        cfg.model.lambda_v = 1e-6
    cfg.model.prior_options = {"lambda_v": 1e-6}  # the real setting still works


def test_pairwise_baseline_uses_its_tiny_lambda_v():
    import groupmorph_pyro.baselines as baselines

    seen = []
    real = baselines.register
    baselines.register = lambda images, cfg, *a, **k: seen.append((cfg.model.prior, cfg.model.prior_options,
                                                                  cfg.model.prior_units)) or real(images, cfg, *a, **k)
    try:
        baselines.pairwise_groupmorph(np.random.default_rng(0).random((2, 8, 8, 8)).astype("float32"), steps=1)
    finally:
        baselines.register = real
    assert seen and seen[0] == ("laplacian", {"lambda_u": 1.0, "lambda_v": 1e-6}, "voxel")  # VoxelMorph's diffusion regulariser, per voxel


def test_include_reads_presets_first_and_the_file_wins_key_by_key(tmp_path):
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "a.yaml").write_text("model: {prior: laplacian, histogram: gaussian}\nregister: {steps: 7}\n")
    (tmp_path / "presets" / "b.yaml").write_text("include: a.yaml\nregister: {steps: 9, coarse_steps: 3}\n")
    (tmp_path / "c.yaml").write_text("include: [presets/b.yaml]\nmodel: {histogram: bspline}\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.model.prior, cfg.model.histogram) == ("laplacian", "bspline")  # a's prior, c's histogram
    assert (cfg.register.steps, cfg.register.coarse_steps) == (9, 3)  # b over a (a nested include)
    assert cfg.model.prior_options == {}  # keys nobody names keep the defaults


@pytest.mark.parametrize("text, match", [
    ("include: missing.yaml\n", r"include: no such file .*missing.yaml"),
    ("include: {a: 1}\n", r"include: expected a path or a list of paths, got \{'a': 1\}"),
    ("include: c.yaml\n", r"c.yaml includes itself"),
])
def test_bad_include_is_a_clear_error(tmp_path, text, match):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(InputError, match=match):
        load_config(tmp_path / "c.yaml")


def test_removed_settings_are_dropped_with_a_warning_when_they_asked_for_another_behaviour(tmp_path):
    """Configs and checkpoints written with the register settings the package no longer has still load
    (config.REMOVED_SETTINGS): silently where the value is today's behaviour, with one warning naming
    the setting otherwise; an Adam fine-tuning step is not read as SGD's."""
    import warnings

    from groupmorph_pyro.config import REMOVED_SETTINGS, migrate

    today = {"patience": 0, "scale_steps": 0, "map_mean": True, "finetune_optimizer": "sgd", "finetune_scale_phase": False,
             "likelihood_voxels": 0, "finetune_map_mean": True, "scale_phase_lr": 0.1, "finetune_lr": None}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Config.from_dict({"register": today}).register == Config().register
    assert set(today) - {"finetune_lr"} == set(REMOVED_SETTINGS)
    (tmp_path / "old.yaml").write_text("register:\n  map_mean: false\n  scale_steps: 5\n  finetune_optimizer: adam\n"
                                       "  finetune_lr: 0.1\n  steps: 7\n")
    with pytest.warns(UserWarning) as caught:
        cfg = load_config(tmp_path / "old.yaml")
    messages = [str(w.message) for w in caught]
    assert any("register.map_mean=False was removed and is ignored" in m for m in messages), messages
    assert any("register.scale_steps=5 was removed" in m for m in messages), messages
    assert any("register.finetune_lr=0.1 was the step of the removed Adam fine-tuning" in m for m in messages), messages
    assert all(str(tmp_path / "old.yaml") in m for m in messages)
    assert (cfg.register.steps, cfg.register.finetune_lr) == (7, 0.0015)
    given = {"register": {"patience": 5}}
    with pytest.warns(UserWarning, match=r"register.patience=5 was removed and is ignored: per-case fits run all their steps"):
        assert migrate(given) == {"register": {}}
    assert given == {"register": {"patience": 5}}  # the caller's mapping is kept
