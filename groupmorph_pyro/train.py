"""SVI training of the amortised guide, checkpoints that rebuild the model, and resume.

A checkpoint (``torch.save`` dict) holds ``config`` (the full :class:`Config` as a dict), ``guide``
(state dict), ``optimizer``, ``scheduler``, ``iteration`` and RNG states, so
:func:`load_checkpoint` rebuilds the guide from the file alone and :func:`train` resumes exactly.

Several processes (``torchrun``): call :func:`init_distributed` in each, then :func:`train`. The
guide is wrapped in ``DistributedDataParallel`` (gradients averaged across processes);
``train.batch_size`` is per process, every process draws the same global batch of
``batch_size × world`` patches and takes its own slice, the posterior noise differs per process, and
only rank 0 writes the log and checkpoints (which keep every rank's random stream for resume).
``groupmorph train --distributed`` does this under ``torchrun --nproc_per_node N``.
"""
from __future__ import annotations

import contextlib
import csv
from pathlib import Path

import pyro
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from tqdm.auto import tqdm

from .checks import InputError, resolve_device
from .config import Config, RuntimeConfig
from .data import split_entries
from .files import atomic_write
from .group import check_mode
from .likelihoods import group_nmi
from .model import GroupMorphGuide, build_guide, build_model
from .preprocess import extract_patch, normalize_group, random_patch_corner
from .synthetic import breathing_phantom
from .volumes import load_group

__all__ = ["load_training_groups", "save_checkpoint", "load_checkpoint", "train", "train_or_load",
           "init_distributed", "distributed_rank", "svi_loss", "CHECKPOINT_NAME"]

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
    k = cfg.model.num_timepoints
    raw = []
    paths_list = [list(p) for p in cfg.data.groups]
    if cfg.data.manifest:
        paths_list += [e.images for e in split_entries(cfg.data.manifest, cfg.data.split, k)]
    for paths in paths_list:
        images, _, _ = load_group(paths)
        if images.shape[0] != k:
            raise InputError(f"data.groups: group {paths} has {images.shape[0]} images, model.num_timepoints is {k}")
        raw.append(images)
    syn = dict(cfg.data.synthetic)
    if syn:
        n = int(syn.pop("num_groups", 4))
        seed = int(syn.pop("seed", 0))
        for i in range(n):
            raw.append(breathing_phantom(num_timepoints=k, seed=seed + i, **syn).images)
    if not raw:
        raise InputError("data: no training groups (set data.groups or data.synthetic)")
    return [normalize_group(g, cfg.data.percentiles)[0] for g in raw]


def save_checkpoint(path, cfg: Config, guide: GroupMorphGuide, optimizer=None, scheduler=None, iteration: int = 0,
                    sampler_state: torch.Tensor | None = None, rank_rng: list | None = None) -> None:
    """Write a self-describing checkpoint atomically (see module docstring).

    ``rank_rng``: every process's torch RNG state in a distributed run (rank order).
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
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, device="cpu") -> tuple[Config, GroupMorphGuide, dict]:
    """Rebuild ``(config, guide, raw checkpoint dict)`` from a checkpoint file alone.

    The config's ``runtime`` section is reset to its defaults (fp32, eager): how the network ran
    in training is kept in ``state["config"]``, how it runs now is the caller's choice."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
        cfg = Config.from_dict(state["config"], source=str(path))
        cfg.runtime = RuntimeConfig()
        guide = build_guide(cfg.model)
        guide.load_state_dict(state["guide"])
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


def train(cfg: Config, resume: bool = False, progress: bool = True, groups: list | None = None,
          stop_at: int | None = None, device=None) -> Path:
    """Train the amortised guide by SVI on random patches; returns the checkpoint path.

    Each iteration draws ``batch_size`` groups, one random patch location per group (shared by its K
    timepoints) and, in all-to-one mode with ``train.fixed: random``, a random fixed timepoint.
    ``resume=True`` continues from ``<output_dir>/last.pt`` (its model config must match; the
    optimiser, learning-rate schedule and random streams continue exactly). ``stop_at`` ends this
    run after that iteration with a checkpoint (for time-sliced jobs); resume later to finish.
    ``groups``: preloaded ``(K, D, H, W)`` tensors in [0, 1] instead of ``cfg.data``.
    ``device``: overrides ``train.device`` (a distributed run passes :func:`init_distributed`'s).
    The loss is the negative ELBO per group (mean over the batch; across processes too).
    """
    tcfg, mcfg = cfg.train, cfg.model
    out = Path(tcfg.output_dir)
    ckpt_path = out / CHECKPOINT_NAME
    device = torch.device(device) if device is not None else resolve_device(tcfg.device)
    rank, world = distributed_rank()
    groups = groups if groups is not None else load_training_groups(cfg)
    pyro.set_rng_seed(tcfg.seed + rank)
    gen = torch.Generator().manual_seed(tcfg.seed)  # same on every rank: all draw the same global batch

    model = build_model(mcfg)
    guide = build_guide(mcfg).to(device)
    optim = torch.optim.Adam(guide.parameters(), lr=tcfg.lr, betas=tuple(tcfg.adam_betas))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=tcfg.iterations)
    start = 0
    if resume:
        if not ckpt_path.is_file():
            raise InputError(f"--resume: no checkpoint at {ckpt_path}")
        old_cfg, _, state = load_checkpoint(ckpt_path, device)
        if old_cfg.model != mcfg:
            raise InputError(f"--resume: {ckpt_path} was trained with a different model config: {old_cfg.model} vs {mcfg}")
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
    elif ckpt_path.exists():
        raise InputError(f"{ckpt_path} exists: pass --resume to continue, or choose another train.output_dir")
    guide.set_runtime(**cfg.runtime.options())  # after loading: the optimiser keeps the same Parameter objects
    net = guide
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(guide, device_ids=[device.index] if device.type == "cuda" else None)

    elbo = (TraceMeanField_ELBO() if tcfg.elbo == "meanfield" else Trace_ELBO()).differentiable_loss
    patch = [int(p) for p in tcfg.patch_size]
    log_path = out / "log.csv"
    out.mkdir(parents=True, exist_ok=True)
    new_log = not log_path.exists() or start == 0
    lead = rank == 0
    with (open(log_path, "w" if new_log else "a", newline="") if lead else contextlib.nullcontext()) as fh:
        writer = csv.writer(fh) if lead else None
        if lead and new_log:
            writer.writerow(["iteration", "loss_per_voxel", "nmi", "lr"])
        bar = tqdm(range(start, tcfg.iterations), initial=start, total=tcfg.iterations, desc="train",
                   disable=not (progress and lead))
        for it in bar:
            draws = []  # the global batch (same draws on every rank); this rank extracts only its slice
            for _ in range(tcfg.batch_size * world):
                g = groups[int(torch.randint(len(groups), (1,), generator=gen))]
                draws.append((g, random_patch_corner(g.shape[1:], patch, gen)))
            mine = draws[rank * tcfg.batch_size:(rank + 1) * tcfg.batch_size]
            x = torch.stack([extract_patch(g, corner, patch) for g, corner in mine]).to(device)
            fixed = None
            if mcfg.mode == "all-to-one":
                fixed = int(torch.randint(mcfg.num_timepoints, (1,), generator=gen)) if tcfg.fixed == "random" else tcfg.fixed
                check_mode(mcfg.mode, mcfg.num_timepoints, fixed)
            optim.zero_grad()
            loss = svi_loss(elbo, model, net, x, fixed)
            loss.backward()  # DistributedDataParallel averages the gradients across processes here
            optim.step()
            sched.step()
            if lead and (it % 10 == 0 or it == tcfg.iterations - 1):
                loss_vox = loss.detach().item() / x[0].numel()
                with torch.no_grad(), pyro.poutine.block():
                    loc, _ = guide.distribution_params(x, fixed)
                    transform = model.transform(fixed)
                    nmi = float(group_nmi(transform(loc, x)[1], mcfg.bins).mean())
                bar.set_postfix(loss=f"{loss_vox:.4f}", nmi=f"{nmi:.3f}")
                writer.writerow([it + 1, loss_vox, nmi, sched.get_last_lr()[0]])
                fh.flush()
            stopping = stop_at is not None and it + 1 >= stop_at
            if (it + 1) % tcfg.checkpoint_every == 0 or it + 1 == tcfg.iterations or stopping:
                rngs = _gather_rng(world)  # collective: every rank takes part
                if lead:
                    save_checkpoint(ckpt_path, cfg, guide, optim, sched, it + 1, gen.get_state(),
                                    rngs if world > 1 else None)
            if stopping:
                break
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # the checkpoint is on disk before any rank returns its path
    return ckpt_path


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
