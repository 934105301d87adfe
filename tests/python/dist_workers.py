"""Process bodies for tests/python/test_distributed.py (spawned with torch.multiprocessing)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.distributed import collective

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
        collective(dist.all_gather, (gathered, results[fraction]))
        results[f"identical_{fraction}"] = all(torch.equal(gathered[0], t) for t in gathered)
        results[f"bytes_{fraction}"] = dict(opt.estimator.communicator.bytes)
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
    collective(dist.all_gather, (gathered, mine))
    if rank == 0:
        torch.save({"params": gathered, "skips": opt.nonfinite_skips}, out)
    dist.destroy_process_group()


def sharded_fisher(rank, world, store, out):
    init(rank, world, store)
    x, y = data()
    net = model()
    ewc = natgrad.EWC(net, fisher_type="exact", structure="kfac")
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
        torch.save({"kfac": ewc.state_dict()["tasks"][0], "diag": diag_ewc.state_dict()["tasks"][0],
                    "ngd": flat(ngd_net)}, out)
    dist.destroy_process_group()


class OpaqueBlock:
    """A block that offers only the communicator's contract: factors() (a symmetric matrix and a
    vector, in a fixed order), inverse_cost(), name, has_factors, state, decomposition_template
    and drop_decomposition. Its factors depend on the rank."""

    has_factors = True

    def __init__(self, name: str, n: int, rank: int) -> None:
        self.name = name
        sym = torch.arange(n * n, dtype=torch.float64).reshape(n, n) * (rank + 1)
        self.state = {"S": sym + sym.T, "v": torch.full((n,), float(rank + 1), dtype=torch.float64)}
        self.cost = float(n) ** 3

    def factors(self) -> dict[str, torch.Tensor]:
        return {"S": self.state["S"], "v": self.state["v"]}

    def inverse_cost(self) -> float:
        return self.cost

    def decomposition_template(self, method: str) -> dict[str, torch.Tensor]:
        n = self.state["v"].shape[0]
        return {"inv": torch.empty(n, n, dtype=torch.float64)}

    def drop_decomposition(self) -> None:
        self.state.pop("inv", None)


def opaque_blocks(rank: int) -> list[OpaqueBlock]:
    return [OpaqueBlock("big", 5, rank), OpaqueBlock("small", 2, rank), OpaqueBlock("mid", 3, rank)]


def communicator_contract(rank, world, store, out):
    """The communicator on blocks it knows only through factors()/inverse_cost()."""
    from natgrad.distributed import DistributedCommunicator, group_device

    init(rank, world, store)
    results = {"device": str(group_device())}
    for packing in (True, False):
        comm = DistributedCommunicator(triangle_packing=packing)
        blocks = opaque_blocks(rank)
        comm.average_factors(blocks, samples=rank + 1)  # weights 1/3 and 2/3
        results[f"factors_{packing}"] = [{k: v.clone() for k, v in b.factors().items()} for b in blocks]
        results[f"bytes_{packing}"] = comm.bytes["factors"]
    comm.assign(blocks)
    results["owner"] = dict(comm.owner)
    for b in blocks:
        if comm.is_owner(b):
            b.state["inv"] = b.decomposition_template("eigen")["inv"].fill_(float(rank))
        comm.share_decomposition(b, "eigen")
    results["inverses"] = {b.name: b.state["inv"].clone() for b in blocks}
    results["agree"] = comm.agree([True, rank == 0, rank == 1])
    results["mean"] = comm.mean_scalar(float(rank))
    torch.save(results, f"{out}.{rank}")  # per rank: no object collective right before teardown
    dist.destroy_process_group()


def teardown_cycles(rank, world, store_dir, cycles, hang_s):
    """``cycles`` times: init a gloo group, a DDP model and KFAC, 2 steps, destroy the group and
    free everything. A gloo worker that still holds a collective's tensor whose Python object
    died needs the GIL to let go of it, while freeing DDP destroys the group and joins that
    worker holding the GIL: a deadlock (or SIGABRT at interpreter exit). A hang dumps the stacks
    and exits with code 1 after ``hang_s`` seconds."""
    import faulthandler

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    x, y = data()
    for cycle in range(cycles):
        faulthandler.dump_traceback_later(hang_s, exit=True)
        dist.init_process_group("gloo", init_method=f"file://{store_dir}/store_{cycle}", rank=rank,
                                world_size=world)
        net = nn.Sequential(nn.Linear(25, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        ddp = nn.parallel.DistributedDataParallel(net)
        opt = natgrad.KFAC(ddp, lr=0.1, damping=1e-2, inverse_update_period=1)
        xs, ys = shard(x.reshape(N, -1), rank, world), shard(y, rank, world)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(ddp(xs), ys).backward()
            opt.step()
        dist.destroy_process_group()
        del opt, ddp, net  # the last reference to the group: ~ProcessGroupGloo joins its workers
        faulthandler.cancel_dump_traceback_later()
