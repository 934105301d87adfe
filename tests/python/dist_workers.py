"""Process bodies for tests/python/test_distributed.py (spawned with torch.multiprocessing)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import natgrad

N = 12  # divisible by 2 and 3


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 25, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 1, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (N,), generator=g)


def kfac(net, fraction=1.0):
    return natgrad.KFAC(net, lr=0.3, momentum=0.9, damping=1e-2, kl_clip=1e-2, factor_update_period=1,
                        inverse_update_period=2, grad_worker_fraction=fraction)


def run_steps(net, opt, x, y, steps, nan_step=None):
    for k in range(steps):
        opt.zero_grad()
        xs = x.clone()
        if nan_step == k:
            xs[0, 0, 0, 0] = float("nan")
        F.cross_entropy(net(xs), y).backward()
        opt.step()


def flat(net) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def shard(t, rank, world):
    per = t.shape[0] // world
    return t[rank * per:(rank + 1) * per]


def init(rank, world, store):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def kfac_fractions(rank, world, store, out, use_ddp):
    """Parameters after 5 steps for each grad-worker fraction (rank 0 writes them)."""
    init(rank, world, store)
    x, y = data()
    results = {}
    for fraction in sorted({1.0, 1.0 / world, 2.0 / 3.0 if world == 3 else 1.0}):
        net = model()
        wrapped = nn.parallel.DistributedDataParallel(net) if use_ddp else net
        opt = kfac(wrapped, fraction)
        run_steps(wrapped, opt, shard(x, rank, world), shard(y, rank, world), 5)
        results[fraction] = flat(net)
        gathered = [torch.empty_like(results[fraction]) for _ in range(world)]
        dist.all_gather(gathered, results[fraction])
        results[f"identical_{fraction}"] = all(torch.equal(gathered[0], t) for t in gathered)
        results[f"bytes_{fraction}"] = dict(opt._comm.bytes)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def checkpoint_save(rank, world, store, out):
    init(rank, world, store)
    x, y = data()
    net = model()
    opt = kfac(net, 1.0 / world)
    run_steps(net, opt, shard(x, rank, world), shard(y, rank, world), 3)
    state = opt.state_dict()  # collective: gathers decompositions held by other ranks
    if rank == 0:
        torch.save({"model": net.state_dict(), "opt": state}, out)
    dist.destroy_process_group()


def checkpoint_load(rank, world, store, ckpt, out):
    init(rank, world, store)
    x, y = data()
    net = model()
    opt = kfac(net, 1.0 / world)
    saved = torch.load(ckpt, weights_only=False)
    net.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    run_steps(net, opt, shard(x, rank, world), shard(y, rank, world), 3)
    if rank == 0:
        torch.save(flat(net), out)
    dist.destroy_process_group()


def nan_on_one_rank(rank, world, store, out):
    init(rank, world, store)
    x, y = data()
    net = model()
    opt = kfac(net)
    run_steps(net, opt, shard(x, rank, world), shard(y, rank, world), 4, nan_step=2 if rank == 1 else None)
    mine = flat(net)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    if rank == 0:
        torch.save({"params": gathered, "skips": opt.nonfinite_skips}, out)
    dist.destroy_process_group()


def sharded_fisher(rank, world, store, out):
    init(rank, world, store)
    x, y = data()
    net = model()
    ewc = natgrad.EWC(net, fisher="exact", structure="kfac")
    ewc.consolidate(shard(x, rank, world), shard(y, rank, world))
    diag_ewc = natgrad.EWC(net)
    diag_ewc.consolidate([(shard(x, rank, world)[:2], shard(y, rank, world)[:2]),
                          (shard(x, rank, world)[2:], shard(y, rank, world)[2:])])
    ngd_net = model()
    ngd = natgrad.NaturalGradient(ngd_net, lr=0.5, damping=1e-2, momentum=0.5)
    for _ in range(2):
        ngd.zero_grad()
        ngd.backward(shard(x, rank, world), shard(y, rank, world))
        ngd.step()
    if rank == 0:
        torch.save({"kfac": ewc.tasks[0], "diag": diag_ewc.tasks[0], "ngd": flat(ngd_net)}, out)
    dist.destroy_process_group()
