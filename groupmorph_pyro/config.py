"""Reproducible configuration: nested dataclasses that round-trip through YAML and checkpoints.

Defaults are the paper's hyper-parameters (METHOD.md). Unknown keys are errors, so a typo in a
YAML file fails loudly instead of being ignored.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .checks import InputError, check_fraction, check_integer, check_positive
from .group import MODES
from .likelihoods import HISTOGRAMS, REDUCTIONS, SIMILARITIES
from .networks import check_compile, check_precision
from .priors import PRIORS, SPACING_EXPONENTS, make_prior

PRIOR_UNITS = ("mm", "voxel")  # model.prior_units

__all__ = ["PRIOR_UNITS", "REMOVED_SETTINGS", "ModelConfig", "TrainConfig", "DataConfig", "RegisterConfig", "RuntimeConfig",
           "Config", "load_config", "migrate"]


class _Section:
    """A config section: assigning a setting it does not have is an error (not a silent new attribute)."""

    def __setattr__(self, name, value):
        if name not in {f.name for f in dataclasses.fields(self)}:
            raise InputError(f"{type(self).__name__} has no setting {name!r}; its settings are "
                             f"{[f.name for f in dataclasses.fields(self)]}")
        super().__setattr__(name, value)


@dataclass
class ModelConfig(_Section):
    """Model and guide settings (everything needed to rebuild the network)."""

    num_timepoints: int = 6
    mode: str = "all-to-one"  # or "all-moving"; pairwise = all-to-one with num_timepoints 2
    diffeomorphic: bool = True
    integration_steps: int = 7
    integration_downsize: int = 3  # the squarings run on a grid this many times coarser (1 = full grid, the paper's)
    jitter: bool = True  # the likelihood reads the group on the lattice shifted by a random sub-voxel offset per step (false = on the lattice, the paper's)
    prior: str = "bending"  # "bending" (λ_v I + λ_b L², default), "laplacian" (λ_v I + λ_u L, the paper's), "diagonal" (λ_v I)
    prior_options: dict = field(default_factory=dict)  # the prior's weights, e.g. {lambda_b: 6.0, lambda_v: 0.001}
    prior_units: str = "mm"  # "mm": prior_options are per mm and scale with the group's voxel size (priors.voxel_prior_options); "voxel": as given
    likelihood: str = "nmi"  # "nmi", "mi", "lncc", "ssd" (see likelihoods.SIMILARITIES)
    reduction: str = "pairs"  # "pairs" (mean over i≠j, paper) or "template" (each vs the mean image)
    likelihood_options: dict = field(default_factory=dict)  # e.g. {window: 9} for lncc, {sigma: 0.1} for ssd
    beta: float = 5.0  # per-voxel likelihood weight (see likelihoods.GroupNMI)
    bins: int = 32
    histogram: str = "quadratic"  # Parzen kernel of NMI/MI: "quadratic" B-spline (3 bins per voxel), "bspline" (cubic, 4 bins) or "gaussian" (the paper's, dense)
    alpha: float = 15.0  # bound on |guide mean| in voxels
    encoder: list[int] = field(default_factory=lambda: [16, 32, 32, 32])
    decoder: list[int] = field(default_factory=lambda: [32, 32, 32, 32, 32, 16, 16])
    cascade: int = 1  # U-Nets in the guide's recursive cascade (1 = the paper's one U-Net; see model.GroupMorphGuide)

    def validate(self):
        if self.mode not in MODES:
            raise InputError(f"model.mode: expected one of {MODES}, got {self.mode!r}")
        if int(self.num_timepoints) != self.num_timepoints or self.num_timepoints < 2:
            raise InputError(f"model.num_timepoints: expected an integer >= 2, got {self.num_timepoints!r}")
        for name in ("beta", "alpha"):
            check_positive(f"model.{name}", getattr(self, name))
        check_integer("model.integration_downsize", self.integration_downsize, 1)
        check_integer("model.cascade", self.cascade, 1)
        _check_switch("model.jitter", self.jitter)
        if self.prior not in PRIORS:
            raise InputError(f"model.prior: expected one of {list(PRIORS)}, got {self.prior!r}")
        if self.prior_units not in PRIOR_UNITS:
            raise InputError(f"model.prior_units: expected one of {list(PRIOR_UNITS)}, got {self.prior_units!r}")
        if self.prior_units == "mm" and self.prior not in SPACING_EXPONENTS:
            raise InputError(f"model.prior_units: 'mm' needs a prior of {sorted(SPACING_EXPONENTS)} (its weights' "
                             f"spacing exponents), got prior {self.prior!r}; set model.prior_units: voxel")
        try:
            make_prior(self.prior, **PRIORS.check_options(self.prior, self.prior_options, "model.prior_options"))
        except InputError as exc:
            msg = str(exc)
            if self.prior == "bending" and "lambda_u" in self.prior_options:
                msg += " (lambda_u is the 'laplacian' prior's; the default prior is 'bending': set model.prior: laplacian)"
            raise InputError(msg if msg.startswith("model.") else f"model.prior_options.{msg}") from None
        if self.likelihood not in SIMILARITIES:
            raise InputError(f"model.likelihood: expected one of {list(SIMILARITIES)}, got {self.likelihood!r}")
        SIMILARITIES.check_options(self.likelihood, self.likelihood_options, "model.likelihood_options")
        if self.reduction not in REDUCTIONS:
            raise InputError(f"model.reduction: expected one of {REDUCTIONS}, got {self.reduction!r}")
        if self.histogram not in HISTOGRAMS:
            raise InputError(f"model.histogram: expected one of {HISTOGRAMS}, got {self.histogram!r}")


@dataclass
class TrainConfig(_Section):
    """SVI training settings (paper: Adam 1e-5, cosine annealing, 100k iterations, 96³ patches)."""

    iterations: int = 100000
    lr: float = 1e-5
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    elbo: str = "trace"  # "trace" (Trace_ELBO) or "meanfield" (TraceMeanField_ELBO, analytic KL)
    patch_size: list[int] = field(default_factory=lambda: [96, 96, 96])
    batch_size: int = 1
    fixed: object = "random"  # all-to-one: "random" fixed timepoint per iteration, or an index
    checkpoint_every: int = 1000
    validate_every: int = 0  # held-out validation (data.validation / data.validation_split) every N iterations; 0 = off
    ema_decay: float = 0.0  # serve and validate an exponential moving average of the weights with this decay per iteration (0 = off; see train.ema_update)
    output_dir: str = "runs/groupmorph"
    seed: int = 0
    device: str = "auto"  # "auto" = cuda when available, else cpu

    def validate(self):
        if self.elbo not in ("trace", "meanfield"):
            raise InputError(f"train.elbo: expected 'trace' or 'meanfield', got {self.elbo!r}")
        if len(self.patch_size) != 3 or any(int(p) < 4 for p in self.patch_size):
            raise InputError(f"train.patch_size: expected 3 integers >= 4, got {self.patch_size!r}")
        if self.fixed != "random" and not isinstance(self.fixed, int):
            raise InputError(f"train.fixed: expected 'random' or a timepoint index, got {self.fixed!r}")
        for name in ("iterations", "batch_size", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"train.{name}: expected an integer >= 1, got {getattr(self, name)!r}")
        if int(self.validate_every) < 0:
            raise InputError(f"train.validate_every: expected an integer >= 0, got {self.validate_every!r}")
        check_positive("train.lr", self.lr)
        check_fraction("train.ema_decay", self.ema_decay)


@dataclass
class DataConfig(_Section):
    """Training data: a manifest, lists of image paths per group, and/or synthetic phantoms."""

    manifest: str = ""  # CSV/YAML manifest (groupmorph_pyro.data.load_manifest); relative to the config file
    split: str = "train"  # manifest rows used for training
    groups: list = field(default_factory=list)  # [[t0.nii.gz, t1.nii.gz, ...], ...]
    synthetic: dict = field(default_factory=dict)  # e.g. {num_groups: 4, shape: [64, 64, 64], amplitude: 4}
    # held-out groups for train.validate_every: phantoms of other seeds, e.g. {num_groups: 8, seed: 10000, shape: [48, 48, 48]}
    validation: dict = field(default_factory=dict)
    validation_split: str = ""  # or a manifest split (its landmarks, when given, are scored too)
    percentiles: list[float] = field(default_factory=lambda: [1.0, 99.0])

    def validate(self):
        if not self.groups and not self.synthetic and not self.manifest:
            raise InputError("data: expected 'manifest', 'groups' (lists of image paths) or 'synthetic', got none")
        if self.validation_split and not self.manifest:
            raise InputError(f"data.validation_split: {self.validation_split!r} needs data.manifest")
        if self.validation and self.synthetic:
            train_seed, n = int(self.synthetic.get("seed", 0)), int(self.synthetic.get("num_groups", 4))
            val_seed, m = int(self.validation.get("seed", 10000)), int(self.validation.get("num_groups", 4))
            if val_seed < train_seed + n and train_seed < val_seed + m:
                raise InputError(f"data.validation: seeds {val_seed}..{val_seed + m - 1} overlap the training seeds "
                                 f"{train_seed}..{train_seed + n - 1}: held-out groups must be other seeds")


@dataclass
class RegisterConfig(_Section):
    """Per-case optimisation settings (registration without a checkpoint, or fine-tuning).

    From zero the mean is fitted as a point estimate (MAP) by Adam, coarse to fine, then σ is set to
    the prior's mean-field optimum (``scale_reset``), and the posterior family (``covariance``) and the
    correlated family's likelihood curvature (``curvature``) are chosen by the ELBO with the likelihood
    weighted by ``scale_beta``. Fine-tuning a network's posterior fits the mean as a point estimate by SGD with
    Nesterov momentum (peak step ``finetune_lr``) and keeps the network's σ."""

    steps: int = 60  # full-resolution per-case SVI steps (without a checkpoint: after the coarse pyramid levels)
    lr: float = 1.0  # Adam step on the whitened guide mean (peak of the schedule), per-case from zero
    finetune_lr: float = 0.0015  # SGD step on the whitened mean (peak of the schedule) when refining a network's posterior (--checkpoint --finetune-steps)
    scale_lr: float | None = None  # Adam step on log σ (peak of the schedule) when mean and σ are fitted together (scale_reset false); null = lr
    scale_reset: bool = True  # after the mean's fit, set σ to the prior's mean-field optimum 1/sqrt(diag Λ) (false: mean and σ by SVI together)
    covariance: str = "dct"  # posterior family after the σ reset: "diagonal", or "dct" (also tried: kept if its ELBO is better)
    curvature: float = 0.003  # covariance dct: first rung of the ELBO's search for the likelihood's curvature h, as a fraction of the prior's mean precision diagonal (rungs × 3 apart; the posterior's precision is Λ + h I); 0 = h = 0, the prior's covariance
    scale_beta: float | None = 1.0  # per-voxel likelihood weight β of the σ phase's ELBO (the posterior's spread; the mean is fitted at model.beta); null = model.beta
    scale_particles: int = 1  # particles of the σ phase's ELBO estimates (common random numbers): the diagonal posterior's and each curvature rung's
    schedule: str = "cosine"  # learning-rate schedule over each level's steps: "constant" or "cosine" (to 0)
    average: float = 0.3  # average the guide's parameters over this final fraction of each level's steps (0 = off)
    pyramid: list[int] = field(default_factory=lambda: [2, 1])  # per-case from zero: shrink factors, coarse to fine, ending in 1
    coarse_steps: int = 50  # SVI steps at each coarse pyramid level (the full-resolution level runs `steps`)
    init_scale: float = 0.05  # initial posterior sd (voxels) when starting from zero
    fit_voxels: int = 524288  # per-case from zero: largest latent grid (voxels per timepoint); larger images get a control grid this size or smaller (0 = the image grid)
    sample_points: int = 131072  # on a control grid, the likelihood reads the full-resolution images at this many random points per evaluation
    sample_steps: int = 200  # on a control grid, steps of the last phase (the one reading the images at sample_points); `steps` on the image grid
    integration_voxels: int = 65536  # on a control grid, the squarings run on a grid of at most this many voxels per field (coarser than model.integration_downsize gives where needed; 0 = no limit)
    guard_particles: int = 2  # particles of the ELBO estimates that decide whether a fit is kept
    window: list[int] = field(default_factory=list)  # amortised pass on tiles of this size (d, h, w); [] = whole volume
    overlap: float = 0.25  # tile overlap fraction for `window`

    def validate(self):
        for name in ("steps", "coarse_steps", "guard_particles", "fit_voxels", "sample_steps", "integration_voxels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"register.{name}: expected an integer >= 0, got {value!r}")
        check_integer("register.guard_particles", self.guard_particles, 1)
        check_integer("register.scale_particles", self.scale_particles, 1)
        check_integer("register.sample_points", self.sample_points, 1)
        if self.fit_voxels and self.fit_voxels < 4 ** 3:
            raise InputError(f"register.fit_voxels: expected 0 (the image grid) or at least 64 (a 4x4x4 control grid), "
                             f"got {self.fit_voxels!r}")
        check_positive("register.lr", self.lr)
        check_positive("register.finetune_lr", self.finetune_lr)
        _check_switch("register.scale_reset", self.scale_reset)
        if self.scale_lr is not None:
            check_positive("register.scale_lr", self.scale_lr)
        check_positive("register.curvature", self.curvature, allow_zero=True)
        if self.scale_beta is not None:
            check_positive("register.scale_beta", self.scale_beta)
        if self.covariance not in ("diagonal", "dct"):
            raise InputError(f"register.covariance: expected 'diagonal' or 'dct', got {self.covariance!r}")
        if self.schedule not in ("constant", "cosine"):
            raise InputError(f"register.schedule: expected 'constant' or 'cosine', got {self.schedule!r}")
        check_fraction("register.average", self.average)
        p = self.pyramid
        if (not p or any(isinstance(f, bool) or int(f) != f or f < 1 for f in p) or p[-1] != 1
                or any(a <= b for a, b in zip(p, p[1:]))):
            raise InputError(f"register.pyramid: expected decreasing integer shrink factors ending in 1 "
                             f"(e.g. [4, 2, 1]), got {p!r}")
        check_positive("register.init_scale", self.init_scale)
        if self.window and (len(self.window) != 3 or any(int(w) != w or w < 1 for w in self.window)):
            raise InputError(f"register.window: expected [] or 3 integers >= 1 (d, h, w), got {self.window!r}")
        check_fraction("register.overlap", self.overlap)


@dataclass
class RuntimeConfig(_Section):
    """How the guide's network runs in training and registration: speed and memory only, results
    agree to rounding (see :meth:`GroupMorphGuide.set_runtime` and benchmarks/README.md)."""

    precision: str = "fp32"  # "fp32" or "bf16" (autocast of the U-Net; fields, integration, likelihood stay fp32)
    channels_last: bool = False  # channels_last_3d layout for the U-Net's convolutions
    compile: object = False  # torch.compile the U-Net: false, true (inductor) or a backend name

    def validate(self):
        check_precision(self.precision)
        _check_switch("runtime.channels_last", self.channels_last)
        check_compile(self.compile, allow_callable=False)  # a config holds names only (YAML, checkpoints)

    def options(self) -> dict:
        """Keyword arguments of :meth:`GroupMorphGuide.set_runtime` (the fields, by name)."""
        return dataclasses.asdict(self)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_timepoints(self, k: int) -> "Config":
        """This config when ``model.num_timepoints == k``, else a copy with K = ``k`` (per-case
        registration of a series with its own K; the caller's config is never changed)."""
        if self.model.num_timepoints == k:
            return self
        cfg = copy.deepcopy(self)
        cfg.model.num_timepoints = int(k)
        return cfg

    @classmethod
    def from_dict(cls, d: dict | None, source: str = "config", checkpoint: bool = False) -> "Config":
        """A config from its mapping (YAML's, or a checkpoint's with ``checkpoint``), migrated by
        :func:`migrate`; unknown sections and keys are errors."""
        d = migrate(d, source, checkpoint)
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(d) - set(sections)
        if unknown:
            raise InputError(f"{source}: unknown section(s) {sorted(unknown)}, expected some of {sorted(sections)}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            sub_cls = f.default_factory().__class__
            values = d.get(f.name) or {}
            if not isinstance(values, dict):
                raise InputError(f"{source}: section '{f.name}' must be a mapping, got {type(values).__name__}")
            known = {g.name for g in dataclasses.fields(sub_cls)}
            bad = set(values) - known
            if bad:
                raise InputError(f"{source}: unknown key(s) {sorted(bad)} in '{f.name}', expected some of {sorted(known)}")
            kwargs[f.name] = sub_cls(**{g.name: _typed(f"{f.name}.{g.name}", values[g.name], g)
                                        for g in dataclasses.fields(sub_cls) if g.name in values})
        cfg = cls(**kwargs)
        for part in (cfg.model, cfg.train, cfg.register, cfg.runtime):
            part.validate()
        return cfg


def _check_switch(key: str, value) -> None:
    """A section's ``validate`` check of a bool field (values assigned from Python skip the reader's typing)."""
    if not isinstance(value, bool):
        raise InputError(f"{key}: expected true or false, got {value!r}")


def _number(key: str, value, kind: type):
    """An int or float from YAML, where ``1e-3`` and ``1e5`` arrive as strings; bools are not numbers."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise InputError(f"{key}: expected {'an integer' if kind is int else 'a number'}, got {value!r} (str)") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{key}: expected {'an integer' if kind is int else 'a number'}, "
                         f"got {value!r} ({type(value).__name__})")
    if kind is int:
        if value != int(value):
            raise InputError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    return float(value)


def _typed(key: str, value, f: dataclasses.Field):
    """``value`` checked (and coerced where YAML is ambiguous) against field ``f``'s declared type:
    ``int``/``float`` (numbers, numeric strings), ``float | None`` (also null), ``bool``, ``str``, ``dict``, ``list`` (any items)
    or ``list[int]``/``list[float]``; ``object`` fields are checked by the section's ``validate``."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "object")
    if kind in ("int", "float"):
        return _number(key, value, int if kind == "int" else float)
    if kind == "float | None":
        return None if value is None else _number(key, value, float)
    if kind == "bool":
        if not isinstance(value, bool):
            raise InputError(f"{key}: expected true or false, got {value!r} ({type(value).__name__})")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise InputError(f"{key}: expected a string, got {value!r} ({type(value).__name__})")
        return value
    if kind == "dict":
        if not isinstance(value, dict):
            raise InputError(f"{key}: expected a mapping (key: value), got {value!r} ({type(value).__name__})")
        return value
    if kind in ("list", "list[int]", "list[float]"):
        element = {"list[int]": int, "list[float]": float}.get(kind)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else []
        if not isinstance(value, (list, tuple)):
            what = {int: "integers", float: "numbers", None: "items"}[element]
            raise InputError(f"{key}: expected a list of {what}{f' like {default}' if default else ''}, "
                             f"got {value!r} ({type(value).__name__})")
        return list(value) if element is None else [_number(f"{key}[{i}]", v, element) for i, v in enumerate(value)]
    return value


_LEGACY_PRIOR_KEYS = {"lambda_u": 1.0, "lambda_v": 0.01, "lambda_b": 1.0}  # model keys before prior_options

VOXEL_PRIOR_DEFAULTS = {"bending": {"lambda_b": 1.0, "lambda_v": 0.01}}
"""The built-in priors' default weights in voxel units, as checkpoints without ``model.prior_units`` were trained."""

REMOVED_SETTINGS = {
    # register key: (the value that behaves as the package does now, what the package does now)
    "patience": (0, "per-case fits run all their steps"),
    "likelihood_voxels": (0, "the likelihood reads every voxel on the image grid and register.sample_points "
                             "random points on a control grid"),
    "scale_steps": (0, "σ is set to the prior's mean-field optimum (register.scale_reset) without steps of its own"),
    "scale_phase_lr": (None, "there are no steps on σ alone"),
    "map_mean": (True, "from zero the mean is fitted as a point estimate when register.scale_reset is true"),
    "finetune_map_mean": (True, "fine-tuning fits the mean as a point estimate"),
    "finetune_optimizer": ("sgd", "fine-tuning moves the mean by SGD with Nesterov momentum"),
    "finetune_scale_phase": (False, "fine-tuning keeps the network's σ"),
}
"""Settings that configs and checkpoints may still carry: :func:`migrate` drops them, with a warning
when their value asked for something other than what the package does now."""


def migrate(data: dict | None, source: str = "config", checkpoint: bool = False) -> dict:
    """The one migration of a config mapping (a YAML file's or a checkpoint's) to today's settings.

    - ``model.lambda_u/lambda_v/lambda_b`` (files without ``model.prior_options``) move into
      ``prior_options`` for the prior that takes them (one it does not take must hold its old
      default); such files had the Laplacian prior, squarings on the full grid, the likelihood on the
      lattice and weights in voxels, and get those settings where they do not name them.
    - ``checkpoint``: a model section without ``integration_downsize``, ``jitter`` or ``prior_units``
      was trained on the full grid, on the lattice, with the prior's weights in voxels (its defaults
      then: :data:`VOXEL_PRIOR_DEFAULTS`); those settings are filled in so the network rebuilds as trained.
    - The settings of :data:`REMOVED_SETTINGS` are dropped, with a warning when their value asked for
      another behaviour; ``register.finetune_lr: null`` takes today's default, and a ``finetune_lr``
      given for the removed Adam fine-tuning is dropped with it.

    Returns a new mapping; ``data`` is not changed.
    """
    data = copy.deepcopy(dict(data or {}))
    model = data.get("model")
    if isinstance(model, dict):
        if any(k in model for k in _LEGACY_PRIOR_KEYS):
            model = _migrate_prior_weights(model, source)
        elif checkpoint:
            model = {"integration_downsize": 1, "jitter": False, **model}
            if "prior_units" not in model:
                defaults = VOXEL_PRIOR_DEFAULTS.get(model.get("prior", ModelConfig.prior), {})
                model["prior_options"] = {**defaults, **(model.get("prior_options") or {})}
                model["prior_units"] = "voxel"
        data["model"] = model
    register = data.get("register")
    if isinstance(register, dict):
        data["register"] = _drop_removed(register, source)
    return data


def _drop_removed(register: dict, source: str) -> dict:
    """``register`` without the keys of :data:`REMOVED_SETTINGS` (see :func:`migrate`)."""
    register = dict(register)
    if register.get("finetune_optimizer", "sgd") != "sgd" and "finetune_lr" in register:
        warnings.warn(f"{source}: register.finetune_lr={register.pop('finetune_lr')!r} was the step of the removed "
                      f"Adam fine-tuning; ignored (fine-tuning uses SGD at the default finetune_lr)", stacklevel=3)
    if "finetune_lr" in register and register["finetune_lr"] is None:
        del register["finetune_lr"]
    for key, (today, now) in REMOVED_SETTINGS.items():
        if key not in register:
            continue
        value = register.pop(key)
        if today is not None and value != today:
            warnings.warn(f"{source}: register.{key}={value!r} was removed and is ignored: {now} "
                          f"(CHANGELOG.md lists the removed settings)", stacklevel=3)
    return register


def _migrate_prior_weights(model: dict, source: str) -> dict:
    """The model section of a file written before ``model.prior_options`` (see :func:`migrate`)."""
    legacy = {k: model[k] for k in _LEGACY_PRIOR_KEYS if k in model}
    model = {k: v for k, v in model.items() if k not in legacy}
    name = model.get("prior", "laplacian")
    takes = PRIORS.options(name) if name in PRIORS else {}
    options = dict(model.get("prior_options") or {})
    for key, value in legacy.items():
        if key in takes:
            options.setdefault(key, value)
        elif value != _LEGACY_PRIOR_KEYS[key]:
            raise InputError(f"{source}: model.{key}={value!r} does not apply to prior {name!r} "
                             f"(its options: {sorted(takes)}); set model.prior_options instead")
    model["prior_options"] = options
    model["prior"] = name  # such files predate the bending default: their prior was the Laplacian
    model.setdefault("integration_downsize", 1)  # and integration on the full grid
    model.setdefault("jitter", False)  # and the likelihood on the lattice
    model.setdefault("prior_units", "voxel")  # and the prior's weights in voxel units
    return model


def _read_yaml(path: Path) -> dict:
    """A YAML file's top-level mapping (empty for an empty file)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"config: cannot read {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"config: {path} is not valid YAML: {exc}") from exc
    if data is not None and not isinstance(data, dict):
        raise InputError(f"config: {path} must hold a mapping of sections, got {type(data).__name__}")
    return data or {}


def _merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, section by section (a key of ``over`` replaces ``base``'s)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _with_includes(path: Path, seen: tuple = ()) -> dict:
    """The mapping of ``path`` on top of the files its ``include:`` names (a path or a list of paths,
    relative to ``path``'s folder, applied in order; they may include others)."""
    if path.resolve() in seen:
        raise InputError(f"config: {path} includes itself (through {[str(p) for p in seen]})")
    data = _read_yaml(path)
    names = data.pop("include", None) or []
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InputError(f"config: {path}: include: expected a path or a list of paths, got {names!r}")
    merged = {}
    for name in names:
        target = path.parent / name
        if not target.is_file():
            raise InputError(f"config: {path}: include: no such file {target}")
        merged = _merge(merged, _with_includes(target, seen + (path.resolve(),)))
    return _merge(merged, data)


def load_config(path) -> Config:
    """Read a YAML config; missing keys take the package defaults (:class:`Config`).

    A top-level ``include:`` (a path or a list of paths, relative to the file) reads those files
    first; the file's own settings then replace theirs key by key (e.g. ``include: presets/legacy.yaml``)."""
    path = Path(path)
    cfg = Config.from_dict(_with_includes(path), source=str(path))
    if cfg.data.manifest and not Path(cfg.data.manifest).is_absolute():
        cfg.data.manifest = str(path.parent / cfg.data.manifest)
    return cfg
