"""SVI training of the amortised guide, checkpoints that rebuild the model, and resume.

A checkpoint (``torch.save`` dict) holds ``config`` (the full :class:`Config` as a dict), ``guide``
(state dict), ``optimizer``, ``scheduler``, ``iteration``, RNG states and ``validation`` (the held-out
curve so far), so :func:`load_checkpoint` rebuilds the guide from the file alone and :func:`train`
resumes exactly, continuing the curve. With ``train.ema_decay`` it also holds ``guide_ema``, the
moving average of the weights (:func:`ema_update`), which :func:`load_checkpoint` serves and
validation scores; ``guide`` stays the optimiser's weights, from which training resumes.

With ``train.validate_every: N`` the guide is scored every N iterations (and before the first) on
held-out groups (``data.validation``: phantoms of other seeds; ``data.validation_split``: a manifest
split): mean NMI after one amortised pass and, with landmarks, the mean landmark error; the progress
bar shows them and ``<output_dir>/validation.csv`` holds the curve.

Several processes (``torchrun``): call :func:`init_distributed` in each, then :func:`train`. The
guide is wrapped in ``DistributedDataParallel`` (gradients averaged across processes);
``train.batch_size`` is per process, every process draws the same global batch of
``batch_size × world`` patches and takes its own slice, the posterior noise differs per process, and
only rank 0 writes the log and checkpoints (which keep every rank's random stream for resume).
``groupmorph train --distributed`` does this under ``torchrun --nproc_per_node N``.
"""
from __future__ import annotations

import contextlib
import copy
import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from tqdm.auto import tqdm

from .checks import InputError, resolve_device
from .config import Config, RuntimeConfig
from .data import entry_landmarks, split_entries
from .files import atomic_write, atomic_write_text
from .group import check_mode
from .likelihoods import group_nmi
from .metrics import landmark_distances
from .model import GroupMorphGuide, build_guide, build_model
from .preprocess import extract_patch, normalize_group, random_patch_corner
from .priors import mean_voxel_size
from .synthetic import breathing_phantom
from .volumes import affine_spacing, load_group

__all__ = ["load_training_groups", "load_training_data", "save_checkpoint", "load_checkpoint", "train", "train_or_load",
           "init_distributed", "distributed_rank", "svi_loss", "ema_update", "CHECKPOINT_NAME", "HeldOutGroup",
           "validation_phantoms", "load_validation_groups", "validate_guide", "write_validation", "VALIDATION_COLUMNS", "LOG_COLUMNS"]

VALIDATION_COLUMNS = ["iteration", "val_nmi", "val_landmark_mm", "val_identity_mm"]

CHECKPOINT_NAME = "last.pt"
_FORMAT = 1


def init_distributed(local_rank: int = 0, backend: str = "auto", device: str = "auto") -> torch.device:
    """Join the process group that ``torchrun`` set up (``env://``) and pick this process's device.

    Args:
        local_rank: this process's index on its machine (torchrun's ``LOCAL_RANK``).
        backend: ``"nccl"``, ``"gloo"`` or ``"auto"`` (nccl on CUDA, gloo on CPU).
        device: ``"auto"`` (``cuda:<local_rank>`` when CUDA is available, else cpu), ``"cpu"`` or ``"cuda"``.
    Returns:
        the device this process should train on.
    """
    import torch.distributed as dist

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = resolve_device(f"cuda:{int(local_rank)}" if device == "cuda" else device)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend not in ("nccl", "gloo"):
        raise InputError(f"backend: expected 'nccl', 'gloo' or 'auto', got {backend!r}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return dev


def distributed_rank() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, or ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_rng(world: int) -> list:
    """Every rank's torch RNG state (rank order), for a checkpoint."""
    state = torch.get_rng_state()
    if world == 1:
        return [state]
    import torch.distributed as dist

    states = [None] * world
    dist.all_gather_object(states, state)
    return states


def load_training_groups(cfg: Config) -> list[torch.Tensor]:
    """Training groups as ``(K, D, H, W)`` float32 tensors in [0, 1] (1–99 percentile normalised)."""
    return load_training_data(cfg)[0]


def load_training_data(cfg: Config) -> tuple[list[torch.Tensor], tuple]:
    """Training groups (as :func:`load_training_groups`) and their voxel size (mm, 3 axes), which sets
    the prior's weights per voxel in training (``model.prior_units: mm``): the files' headers, the
    phantoms' ``spacing``. With ``prior_units: mm`` the groups must share one voxel size (geometric means
    within 1 %): training builds one prior."""
    k = cfg.model.num_timepoints
    raw, spacings = [], []
    paths_list = [list(p) for p in cfg.data.groups]
    if cfg.data.manifest:
        paths_list += [e.images for e in split_entries(cfg.data.manifest, cfg.data.split, k)]
    for paths in paths_list:
        images, affine, _ = load_group(paths)
        if images.shape[0] != k:
            raise InputError(f"data.groups: group {paths} has {images.shape[0]} images, model.num_timepoints is {k}")
        raw.append(images)
        spacings.append(affine_spacing(affine))
    syn = dict(cfg.data.synthetic)
    if syn:
        n = int(syn.pop("num_groups", 4))
        seed = int(syn.pop("seed", 0))
        for i in range(n):
            g = breathing_phantom(num_timepoints=k, seed=seed + i, **syn)
            raw.append(g.images)
            spacings.append(tuple(g.spacing))
    if not raw:
        raise InputError("data: no training groups (set data.groups or data.synthetic)")
    means = [mean_voxel_size(sp) for sp in spacings]
    if cfg.model.prior_units == "mm" and max(means) > 1.01 * min(means):
        raise InputError(f"data: the training groups' voxel sizes differ ({min(means):.3g} to {max(means):.3g} mm, "
                         "geometric means of the axes); with model.prior_units: mm training builds one prior: "
                         "resample the groups to one voxel size, or set model.prior_units: voxel")
    return [normalize_group(g, cfg.data.percentiles)[0] for g in raw], spacings[0]


@dataclass
class HeldOutGroup:
    """A validation group: ``x`` ``(1, K, D, H, W)`` in [0, 1]; ``landmarks`` ``(K, L, 3)`` 0-based voxel
    coordinates or None; ``spacing`` mm along the array axes."""

    x: torch.Tensor
    landmarks: np.ndarray | None
    spacing: tuple


def validation_phantoms(cfg: Config) -> list:
    """The held-out phantoms of ``data.validation`` (``breathing_phantom`` arguments plus ``num_groups``
    (4) and ``seed`` (10000, the first of consecutive seeds)), raw intensities with their landmarks:
    :class:`~groupmorph_pyro.synthetic.SyntheticGroup` each; empty when ``data.validation`` is not set."""
    syn = dict(cfg.data.validation)
    if not syn:
        return []
    n, seed = int(syn.pop("num_groups", 4)), int(syn.pop("seed", 10000))
    return [breathing_phantom(num_timepoints=cfg.model.num_timepoints, seed=seed + i, **syn) for i in range(n)]


def load_validation_groups(cfg: Config) -> list[HeldOutGroup]:
    """Held-out groups for ``train.validate_every``: phantoms of ``data.validation`` (breathing_phantom
    arguments plus ``num_groups`` (4) and ``seed`` (10000, the first of consecutive seeds), with their
    landmarks) and the series of ``data.validation_split`` in the manifest. Empty when neither is set."""
    k = cfg.model.num_timepoints
    out = [HeldOutGroup(normalize_group(g.images, cfg.data.percentiles)[0][None], g.landmarks, g.spacing)
           for g in validation_phantoms(cfg)]
    if cfg.data.validation_split:
        for e in split_entries(cfg.data.manifest, cfg.data.validation_split, k):
            images, affine, _ = load_group(e.images)
            out.append(HeldOutGroup(normalize_group(images, cfg.data.percentiles)[0][None],
                                    entry_landmarks(e, images.shape[1:]), affine_spacing(affine)))
    return out


def validate_guide(model, guide: GroupMorphGuide, groups: list[HeldOutGroup], bins: int = 32, device="cpu") -> dict:
    """One amortised pass per held-out group (all-to-one: group j uses fixed timepoint j mod K, so every
    fixed timepoint is scored); mean NMI of the warped group and, over the groups with landmarks, the
    mean landmark distance (mm, all ordered pairs) after the pass and for the identity.

    Returns:
        ``{"val_nmi", "val_landmark_mm", "val_identity_mm"}`` (landmark entries None without landmarks).
    """
    nmis, after, before = [], [], []
    with torch.no_grad(), pyro.poutine.block():
        for j, g in enumerate(groups):
            x = g.x.to(device)
            fixed = j % x.shape[1] if model.mode == "all-to-one" else None
            loc, _ = guide.distribution_params(x, fixed)
            transform = model.transform(fixed)
            disp, warped = transform(loc, x)  # (1, K, 3, D, H, W), (1, K, D, H, W)
            nmis.append(float(group_nmi(warped, bins).mean()))
            if g.landmarks is not None:
                inv = transform.inverse_displacements(loc)
                after.append(landmark_distances(g.landmarks, disp[0].double().cpu(), inv[0].double().cpu(), g.spacing).mean())
                before.append(landmark_distances(g.landmarks, spacing=g.spacing).mean())
    mean = lambda v: float(np.mean(v)) if v else None  # noqa: E731
    return {"val_nmi": mean(nmis), "val_landmark_mm": mean(after), "val_identity_mm": mean(before)}


def ema_update(average: dict, current: dict, decay: float, step: int) -> dict:
    """One update of an exponential moving average of a network's state, in place.

    ``a ← d·a + (1 − d)·c`` for every floating-point entry, with ``d = min(decay, (1 + step) / (10 + step))``:
    the first updates (step 0, 1, …) weigh the newest weights more (d = 0.1, 0.18, …), so the
    average soon forgets the untrained start; later d = ``decay``, an average over about
    ``1 / (1 − decay)`` iterations. Other entries (integers) are copied.

    Args:
        average: ``{name: tensor}`` (a state dict's clone), updated in place.
        current: the network's state dict now (same names and shapes).
        decay: in [0, 1); step: the number of updates made before this one (>= 0).
    Returns:
        ``average``.
    """
    decay = min(decay, (1.0 + step) / (10.0 + step))
    if set(average) != set(current):
        raise InputError(f"ema_update: the average has entries {sorted(set(average) ^ set(current))} that the network has not, or the reverse")
    with torch.no_grad():
        for name, value in current.items():
            if value.is_floating_point():
                average[name].mul_(decay).add_(value.detach(), alpha=1.0 - decay)
            else:
                average[name].copy_(value)
    return average


def _averaged(guide: GroupMorphGuide, average: dict | None) -> GroupMorphGuide:
    """The guide to score and serve: a copy holding the moving average, or the guide itself (no average)."""
    if average is None:
        return guide
    served = copy.deepcopy(guide)
    served.load_state_dict(average)
    return served


def save_checkpoint(path, cfg: Config, guide: GroupMorphGuide, optimizer=None, scheduler=None, iteration: int = 0,
                    sampler_state: torch.Tensor | None = None, rank_rng: list | None = None,
                    validation: list | None = None, average: dict | None = None) -> None:
    """Write a self-describing checkpoint atomically (see module docstring).

    ``rank_rng``: every process's torch RNG state in a distributed run (rank order).
    ``validation``: the held-out curve so far (rows of :data:`VALIDATION_COLUMNS`), continued on resume.
    ``average``: the moving average of the guide's state (``train.ema_decay``), stored as ``guide_ema``.
    """
    state = {
        "format": _FORMAT,
        "config": cfg.to_dict(),
        "guide": guide.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer else None,
        "scheduler": scheduler.state_dict() if scheduler else None,
        "iteration": int(iteration),
        "torch_rng": torch.get_rng_state(),
        "sampler_rng": sampler_state,
        "rank_rng": rank_rng,
        "validation": list(validation or []),
        "guide_ema": average,
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, device="cpu") -> tuple[Config, GroupMorphGuide, dict]:
    """Rebuild ``(config, guide, raw checkpoint dict)`` from a checkpoint file alone.

    The guide holds the moving average of the weights when the checkpoint has one (``train.ema_decay``),
    else the trained weights. The config's ``runtime`` section is reset to its defaults (fp32, eager):
    how the network ran in training is kept in ``state["config"]``, how it runs now is the caller's choice."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
        cfg = Config.from_dict(state["config"], source=str(path), checkpoint=True)
        cfg.runtime = RuntimeConfig()
        guide = build_guide(cfg.model)
        guide.load_state_dict(state.get("guide_ema") or state["guide"])
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: not a groupmorph checkpoint ({type(exc).__name__}: {exc})") from exc
    return cfg, guide.to(device), state


def svi_loss(elbo, model, guide, x: torch.Tensor, fixed) -> torch.Tensor:
    """Negative ELBO per group of the batch ``x: (B, K, d, h, w)`` (the training objective).

    Averaging over the batch (rather than summing) makes one process with batch B and N
    processes with batch B/N each (DistributedDataParallel averages their gradients) follow the
    same gradient.
    """
    return elbo(model, guide, x, fixed) / x.shape[0]


LOG_COLUMNS = ["iteration", "loss_per_voxel", "nmi", "lr"]
"""Columns of ``<output_dir>/log.csv``: iteration, negative ELBO per voxel, the batch's mean NMI, learning rate."""


def train(cfg: Config, resume: bool = False, progress: bool = True, groups: list | None = None,
          stop_at: int | None = None, device=None, spacing=None) -> Path:
    """Train the amortised guide by SVI on random patches; returns the checkpoint path.

    Each iteration draws ``batch_size`` groups, one random patch location per group (shared by its K
    timepoints) and, in all-to-one mode with ``train.fixed: random``, a random fixed timepoint.
    ``resume=True`` continues from ``<output_dir>/last.pt`` (its model config must match; the
    optimiser, learning-rate schedule and random streams continue exactly). ``stop_at`` ends this
    run after that iteration with a checkpoint (for time-sliced jobs); resume later to finish.
    ``groups``: preloaded ``(K, D, H, W)`` tensors in [0, 1] instead of ``cfg.data``; ``spacing``: their
    voxel size (mm, 3 axes; None = 1 mm), which sets the prior's weights per voxel with
    ``model.prior_units: mm`` (from ``cfg.data``: the groups' own, :func:`load_training_data`).
    ``device``: overrides ``train.device`` (a distributed run passes :func:`init_distributed`'s).
    The loss is the negative ELBO per group (mean over the batch; across processes too); every 10
    iterations ``log.csv`` gets a row of :data:`LOG_COLUMNS`."""
    tcfg, mcfg = cfg.train, cfg.model
    out = Path(tcfg.output_dir)
    ckpt_path = out / CHECKPOINT_NAME
    device = torch.device(device) if device is not None else resolve_device(tcfg.device)
    rank, world = distributed_rank()
    groups, spacing = load_training_data(cfg) if groups is None else (groups, spacing)
    pyro.set_rng_seed(tcfg.seed + rank)
    gen = torch.Generator().manual_seed(tcfg.seed)  # same on every rank: all draw the same global batch

    model = build_model(mcfg, spacing=spacing)  # the prior's weights per voxel at the training groups' voxel size
    guide = build_guide(mcfg).to(device)
    optim, sched, start, average, curve = _optimisation(guide, cfg, ckpt_path if resume else None, gen, device)
    net, average = _network(guide, average, cfg, device)

    elbo = (TraceMeanField_ELBO() if tcfg.elbo == "meanfield" else Trace_ELBO()).differentiable_loss
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.csv"
    new_log = start == 0 or not log_path.exists()
    lead = rank == 0
    held_out = _held_out(cfg) if lead else []

    def validate(iteration: int) -> None:
        """Score the held-out groups, add a row to the curve and to validation.csv, show it on the bar."""
        curve.append({"iteration": iteration, **validate_guide(model, _averaged(guide, average), held_out, mcfg.bins, device)})
        write_validation(out / "validation.csv", curve)
        bar.set_postfix(_shown(curve[-1]))

    with (open(log_path, "w" if new_log else "a", newline="") if lead else contextlib.nullcontext()) as fh:
        writer = csv.writer(fh) if lead else None
        if lead and new_log:
            writer.writerow(LOG_COLUMNS)
        bar = tqdm(range(start, tcfg.iterations), initial=start, total=tcfg.iterations, desc="train",
                   disable=not (progress and lead))
        if held_out and not curve:
            validate(start)  # the curve starts from the untrained network
        for it in bar:
            x, fixed = _draw_batch(groups, gen, cfg, device)
            optim.zero_grad()
            loss = svi_loss(elbo, model, net, x, fixed)
            loss.backward()  # DistributedDataParallel averages the gradients across processes here
            optim.step()
            sched.step()
            if average is not None:
                ema_update(average, guide.state_dict(), tcfg.ema_decay, it)
            if lead and (it % 10 == 0 or it == tcfg.iterations - 1):
                loss_vox, nmi = loss.detach().item() / x[0].numel(), _batch_nmi(model, guide, x, fixed, mcfg.bins)
                bar.set_postfix(loss=f"{loss_vox:.4f}", nmi=f"{nmi:.3f}")
                writer.writerow([it + 1, loss_vox, nmi, sched.get_last_lr()[0]])
                fh.flush()
            if held_out and ((it + 1) % tcfg.validate_every == 0 or it + 1 == tcfg.iterations):
                validate(it + 1)
            stopping = stop_at is not None and it + 1 >= stop_at
            if (it + 1) % tcfg.checkpoint_every == 0 or it + 1 == tcfg.iterations or stopping:
                rngs = _gather_rng(world) if world > 1 else None  # collective: every rank takes part
                if lead:
                    save_checkpoint(ckpt_path, cfg, guide, optim, sched, it + 1, gen.get_state(), rngs, curve, average)
            if stopping:
                break
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # the checkpoint is on disk before any rank returns its path
    return ckpt_path


def _shown(row: dict) -> dict:
    """A validation row as the progress bar shows it (NMI, and the landmark error where there is one)."""
    shown = {"val_nmi": f"{row['val_nmi']:.3f}"}
    if row["val_landmark_mm"] is not None:
        shown["val_mm"] = f"{row['val_landmark_mm']:.2f}"
    return shown


def _network(guide, average, cfg: Config, device) -> tuple:
    """``(the module the steps call, the weight average or None)``: the guide set to ``cfg.runtime``
    (after loading: the optimiser keeps the same Parameter objects), wrapped in
    DistributedDataParallel across several processes; rank 0 keeps a moving average of the weights
    when ``train.ema_decay`` is set (a new run, or a resumed one without one, starts it from the
    weights now)."""
    rank, world = distributed_rank()
    if not cfg.train.ema_decay or rank != 0:  # only rank 0 validates and saves the average
        average = None
    elif average is None:
        average = {name: value.detach().clone() for name, value in guide.state_dict().items()}
    guide.set_runtime(**cfg.runtime.options())
    if world == 1:
        return guide, average
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(guide, device_ids=[device.index] if device.type == "cuda" else None), average


def _held_out(cfg: Config) -> list:
    """The held-out groups scored every ``train.validate_every`` iterations ([] when 0)."""
    if not cfg.train.validate_every:
        return []
    held_out = load_validation_groups(cfg)
    if not held_out:
        raise InputError("train.validate_every: no held-out groups (set data.validation or data.validation_split)")
    return held_out


def _optimisation(guide, cfg: Config, resume_from: Path | None, gen: torch.Generator, device) -> tuple:
    """``(Adam, its cosine schedule, first iteration, weight average or None, validation curve)``,
    continued from the checkpoint ``resume_from`` when given (:func:`_restore`); a new run refuses to
    overwrite a checkpoint in ``train.output_dir``."""
    optim = torch.optim.Adam(guide.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=cfg.train.iterations)
    if resume_from is not None:
        return optim, sched, *_restore(resume_from, cfg, guide, optim, sched, gen, device)
    existing = Path(cfg.train.output_dir) / CHECKPOINT_NAME
    if existing.exists():
        raise InputError(f"{existing} exists: pass --resume to continue, or choose another train.output_dir")
    return optim, sched, 0, None, []


def _restore(ckpt_path: Path, cfg: Config, guide, optim, sched, gen: torch.Generator, device) -> tuple:
    """Load ``ckpt_path`` into the guide, optimiser, schedule and batch sampler of a resumed run and
    continue its random streams (fresh, distinct ones on another number of processes). Returns
    ``(iteration, weight average or None, validation curve)``."""
    tcfg, (rank, world) = cfg.train, distributed_rank()
    if not ckpt_path.is_file():
        raise InputError(f"--resume: no checkpoint at {ckpt_path}")
    old_cfg, _, state = load_checkpoint(ckpt_path, device)
    if old_cfg.model != cfg.model:
        raise InputError(f"--resume: {ckpt_path} was trained with a different model config: {old_cfg.model} vs {cfg.model}")
    guide.load_state_dict(state["guide"])
    optim.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    sched.T_max = tcfg.iterations  # a resume that extends train.iterations stretches the cosine schedule
    start = state["iteration"]
    per_rank = state.get("rank_rng") or [state["torch_rng"]]
    if len(per_rank) == world:
        torch.set_rng_state(per_rank[rank])
    else:  # resumed on a different number of processes: fresh, distinct streams
        pyro.set_rng_seed(tcfg.seed + 1000 * start + rank)
    if state.get("sampler_rng") is not None:
        gen.set_state(state["sampler_rng"])
    return start, state.get("guide_ema"), list(state.get("validation") or [])


def _draw_batch(groups: list, gen: torch.Generator, cfg: Config, device) -> tuple[torch.Tensor, int | None]:
    """One iteration's batch ``(B, K, d, h, w)`` on ``device`` and its fixed timepoint: the global batch
    is drawn from ``gen`` (the same draws on every rank; each rank keeps its slice), one random patch
    per group, and in all-to-one mode the fixed timepoint (``train.fixed``, or drawn)."""
    tcfg, mcfg, (rank, world) = cfg.train, cfg.model, distributed_rank()
    patch = [int(p) for p in tcfg.patch_size]
    draws = []
    for _ in range(tcfg.batch_size * world):
        g = groups[int(torch.randint(len(groups), (1,), generator=gen))]
        draws.append((g, random_patch_corner(g.shape[1:], patch, gen)))
    mine = draws[rank * tcfg.batch_size:(rank + 1) * tcfg.batch_size]
    x = torch.stack([extract_patch(g, corner, patch) for g, corner in mine]).to(device)
    fixed = None
    if mcfg.mode == "all-to-one":
        fixed = int(torch.randint(mcfg.num_timepoints, (1,), generator=gen)) if tcfg.fixed == "random" else tcfg.fixed
        check_mode(mcfg.mode, mcfg.num_timepoints, fixed)
    return x, fixed


def _batch_nmi(model, guide, x: torch.Tensor, fixed, bins: int) -> float:
    """Mean NMI of the batch warped by the guide's mean fields (the training log's column)."""
    with torch.no_grad(), pyro.poutine.block():
        loc, _ = guide.distribution_params(x, fixed)
        return float(group_nmi(model.transform(fixed)(loc, x)[1], bins).mean())


def write_validation(path, curve: list) -> None:
    """Write the held-out curve (rows of :data:`VALIDATION_COLUMNS`) as CSV, atomically."""
    lines = [",".join(VALIDATION_COLUMNS)]
    lines += [",".join("" if row.get(c) is None else str(row[c]) for c in VALIDATION_COLUMNS) for row in curve]
    atomic_write_text(path, "\n".join(lines) + "\n")


def train_or_load(cfg: Config, checkpoint=None, progress: bool = True) -> tuple[Config, GroupMorphGuide]:
    """The trained guide for a workflow: ``checkpoint`` when given; otherwise train ``cfg`` (resuming
    ``<output_dir>/last.pt`` when it exists, e.g. after an interruption) and load the result.

    Returns:
        ``(config stored in the checkpoint, guide)``.
    """
    if not checkpoint:
        resume = (Path(cfg.train.output_dir) / CHECKPOINT_NAME).exists()
        checkpoint = train(cfg, resume=resume, progress=progress)
    cfg, guide, _ = load_checkpoint(checkpoint)
    return cfg, guide
