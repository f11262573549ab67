"""Training on several processes (DistributedDataParallel over gloo, CPU): gradients agree with one
process, ranks stay in sync, only rank 0 writes, and an interrupted run resumes exactly."""
import os
import socket

import pyro
import pytest
import torch
import torch.multiprocessing as mp
from pyro.infer import Trace_ELBO

from groupmorph_pyro.checks import InputError
from groupmorph_pyro.model import build_guide, build_model
from groupmorph_pyro.train import distributed_rank, init_distributed, load_checkpoint, svi_loss, train
from test_train import tiny_config

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, port: int) -> torch.device:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    return init_distributed(rank, "gloo", "cpu")


def _groups(cfg):
    g = torch.Generator().manual_seed(7)
    return [torch.rand(cfg.model.num_timepoints, 16, 16, 16, generator=g) for _ in range(WORLD)]


def _gradient_worker(rank, port, out, cfg):
    _join(rank, port)
    torch.manual_seed(0)
    model, guide = build_model(cfg.model), build_guide(cfg.model)
    net = torch.nn.parallel.DistributedDataParallel(guide)
    pyro.set_rng_seed(100 + rank)
    loss = svi_loss(Trace_ELBO().differentiable_loss, model, net, _groups(cfg)[rank][None], 1)
    loss.backward()
    torch.save([p.grad for p in guide.parameters()], os.path.join(out, f"grad{rank}.pt"))
    torch.distributed.barrier()  # every rank done with gloo before any tears it down (avoids an abort at exit)
    torch.distributed.destroy_process_group()


def test_ddp_gradients_equal_the_one_process_mean(tmp_path):
    cfg = tiny_config(tmp_path, 1)
    mp.spawn(_gradient_worker, args=(_free_port(), str(tmp_path), cfg), nprocs=WORLD)
    # one process, same noise per group: the gradient of the batch mean of the per-group losses
    torch.manual_seed(0)
    model, guide = build_model(cfg.model), build_guide(cfg.model)
    total = [torch.zeros_like(p) for p in guide.parameters()]
    for rank, group in enumerate(_groups(cfg)):
        guide.zero_grad()
        pyro.set_rng_seed(100 + rank)
        svi_loss(Trace_ELBO().differentiable_loss, model, guide, group[None], 1).backward()
        total = [t + p.grad / WORLD for t, p in zip(total, guide.parameters())]
    for rank in range(WORLD):
        grads = torch.load(tmp_path / f"grad{rank}.pt")
        assert len(grads) == len(total)
        for g, ref in zip(grads, total):  # float sums in another order (threads): relative to the norm
            assert _rel(g, ref) < 1e-4, _rel(g, ref)
    single = [p.grad for p in guide.parameters()]  # the last group alone differs: the test can fail
    assert max(_rel(a, b) for a, b in zip(single, total)) > 1e-2


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _train_worker(rank, port, cfg, stop_at, resume, out):
    device = _join(rank, port)
    assert distributed_rank() == (rank, WORLD)
    path = train(cfg, resume=resume, progress=False, groups=_groups(cfg), stop_at=stop_at, device=device)
    guide = load_checkpoint(path)[1]
    torch.save(guide.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.barrier()  # every rank done with gloo before any tears it down (avoids an abort at exit)
    torch.distributed.destroy_process_group()


def _run(cfg, out, stop_at=None, resume=False):
    mp.spawn(_train_worker, args=(_free_port(), cfg, stop_at, resume, str(out)), nprocs=WORLD)


def test_two_process_training_stays_in_sync_and_resumes_exactly(tmp_path):
    straight = tiny_config(tmp_path / "straight", 4)
    _run(straight, tmp_path)
    state = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    assert state["iteration"] == 4 and len(state["rank_rng"]) == WORLD
    assert not torch.equal(state["rank_rng"][0], state["rank_rng"][1])  # distinct posterior noise per rank
    log = (tmp_path / "straight" / "log.csv").read_text().splitlines()
    assert log[0].startswith("iteration") and len(log) == 3  # rank 0 alone writes: rows at iterations 1 and 4
    weights = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    interrupted = tiny_config(tmp_path / "resumed", 4)
    _run(interrupted, tmp_path, stop_at=3)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")[2]["iteration"] == 3
    _run(interrupted, tmp_path, resume=True)
    resumed = torch.load(tmp_path / "rank0.pt")
    assert all(torch.allclose(resumed[k], weights[0][k], atol=1e-6) for k in resumed)


def test_distributed_cli_outside_torchrun_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from groupmorph_pyro.cli import main

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    (tmp_path / "c.yaml").write_text("data: {synthetic: {num_groups: 1}}\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--distributed"]) == 2
    assert "started by torchrun" in capsys.readouterr().err
    with pytest.raises(InputError, match="backend"):
        init_distributed(0, "mpi", "cpu")


def test_two_process_training_keeps_the_moving_average_through_a_resume(tmp_path):
    straight = tiny_config(tmp_path / "straight", 4)
    straight.train.ema_decay = 0.5
    _run(straight, tmp_path)
    ref = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    assert ref["guide_ema"] is not None and ref["guide_ema"].keys() == ref["guide"].keys()
    assert any(not torch.equal(ref["guide_ema"][k], v) for k, v in ref["guide"].items() if v.is_floating_point())

    interrupted = tiny_config(tmp_path / "resumed", 4)
    interrupted.train.ema_decay = 0.5
    _run(interrupted, tmp_path, stop_at=3)
    _run(interrupted, tmp_path, resume=True)
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)["guide_ema"]
    assert all(torch.allclose(resumed[k], v, atol=1e-6) for k, v in ref["guide_ema"].items())
