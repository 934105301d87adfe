"""Helpers shared by the Python tests (fixtures live in conftest.py).

* :func:`random_psd`: random symmetric PSD matrices;
* small models, batches and a training loop (:func:`mlp`, :func:`data`, :func:`train`,
  :func:`flat_params`; :func:`small_mlp`, :func:`batch`; :class:`TiedLM`, a language model whose
  output projection is its input embedding, as in GPT-2);
* the process bodies of the torch.distributed tests (``dist_*`` and the functions they spawn with
  torch.multiprocessing, which imports this module by name in each child).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.distributed import collective


def random_psd(n: int, rank: int | None = None, dtype=torch.float64, batch=()) -> torch.Tensor:
    """A random symmetric PSD matrix of the given rank (full rank by default)."""
    x = torch.randn(*batch, n, rank or n + 3, dtype=dtype)
    return x @ x.mT / x.shape[-1]


# Small models, batches and a training loop.


def mlp(dtype=torch.float64, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def data(n=32, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def train(model, opt, x, y, steps, closure=False):
    losses = []
    for _ in range(steps):
        def loss_fn():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        if closure:
            losses.append(float(opt.step(loss_fn)))
        else:
            losses.append(float(loss_fn()))
            opt.step()
    return losses


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class TiedLM(nn.Module):
    """Embedding -> tanh(Linear) -> output projection whose weight IS the embedding's (GPT-2's
    ``lm_head.weight = transformer.wte.weight``); token ids ``[...]`` -> logits ``[..., vocab]``.
    """

    def __init__(self, vocab: int = 7, dim: int = 4, dtype=torch.float64, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.emb.weight
        self.to(dtype)

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """The output projection's input."""
        return torch.tanh(self.mix(self.emb(idx)))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden(idx))


def tokens(n: int = 8, t: int = 5, vocab: int = 7, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token data: inputs ``[n, t]`` and targets ``[n, t]`` (the sequence shifted by one)."""
    seq = torch.randint(0, vocab, (n, t + 1), generator=torch.Generator().manual_seed(seed))
    return seq[:, :-1], seq[:, 1:]


def small_mlp(dtype=torch.float64, out=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, out)).to(dtype)


def batch(n=20, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


# Process bodies of the torch.distributed tests (gloo, spawned local processes).

DIST_N = 12  # divisible by 2 and 3


def dist_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 25, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def dist_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(DIST_N, 1, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (DIST_N,), generator=g)


def dist_kfac(net, fraction=1.0):
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



def dist_shard(t, rank, world):
    per = t.shape[0] // world
    return t[rank * per:(rank + 1) * per]


def dist_init(rank, world, store):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def kfac_fractions(rank, world, store, out, use_ddp):
    """Parameters after 5 steps for each grad-worker fraction (rank 0 writes them)."""
    dist_init(rank, world, store)
    x, y = dist_data()
    results = {}
    for fraction in sorted({1.0, 1.0 / world, 2.0 / 3.0 if world == 3 else 1.0}):
        net = dist_model()
        wrapped = nn.parallel.DistributedDataParallel(net) if use_ddp else net
        opt = dist_kfac(wrapped, fraction)
        run_steps(wrapped, opt, dist_shard(x, rank, world), dist_shard(y, rank, world), 5)
        results[fraction] = flat_params(net)
        gathered = [torch.empty_like(results[fraction]) for _ in range(world)]
        collective(dist.all_gather, (gathered, results[fraction]))
        results[f"identical_{fraction}"] = all(torch.equal(gathered[0], t) for t in gathered)
        results[f"bytes_{fraction}"] = dict(opt.estimator.communicator.bytes)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def adaptive_ranks(rank, world, store, out, use_ddp):
    """Parameters after 4 steps of K-FAC with adaptive learning rate and momentum (rank 0 writes
    them, and whether every rank holds the same).
    """
    dist_init(rank, world, store)
    x, y = dist_data()
    net = dist_model()
    wrapped = nn.parallel.DistributedDataParallel(net) if use_ddp else net
    opt = dist_kfac_adaptive(wrapped)
    run_steps(wrapped, opt, dist_shard(x, rank, world), dist_shard(y, rank, world), 4)
    flat = flat_params(net)
    gathered = [torch.empty_like(flat) for _ in range(world)]
    collective(dist.all_gather, (gathered, flat))
    if rank == 0:
        torch.save({"params": flat, "identical": all(torch.equal(gathered[0], t) for t in gathered)}, out)
    dist.destroy_process_group()


def dist_kfac_adaptive(net):
    return natgrad.KFAC(net, damping=1e-2, adaptive_learning_rate=True, adaptive_momentum=True,
                        inverse_update_period=2)


def checkpoint_save(rank, world, store, out):
    dist_init(rank, world, store)
    x, y = dist_data()
    net = dist_model()
    opt = dist_kfac(net, 1.0 / world)
    run_steps(net, opt, dist_shard(x, rank, world), dist_shard(y, rank, world), 3)
    state = opt.state_dict()  # collective: gathers decompositions held by other ranks
    if rank == 0:
        torch.save({"model": net.state_dict(), "opt": state}, out)
    dist.destroy_process_group()


def checkpoint_load(rank, world, store, ckpt, out):
    dist_init(rank, world, store)
    x, y = dist_data()
    net = dist_model()
    opt = dist_kfac(net, 1.0 / world)
    saved = torch.load(ckpt, weights_only=False)
    net.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    run_steps(net, opt, dist_shard(x, rank, world), dist_shard(y, rank, world), 3)
    if rank == 0:
        torch.save(flat_params(net), out)
    dist.destroy_process_group()


def nan_on_one_rank(rank, world, store, out):
    dist_init(rank, world, store)
    x, y = dist_data()
    net = dist_model()
    opt = dist_kfac(net)
    run_steps(net, opt, dist_shard(x, rank, world), dist_shard(y, rank, world), 4, nan_step=2 if rank == 1 else None)
    mine = flat_params(net)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    collective(dist.all_gather, (gathered, mine))
    if rank == 0:
        torch.save({"params": gathered, "skips": opt.nonfinite_skips}, out)
    dist.destroy_process_group()


def sharded_fisher(rank, world, store, out):
    dist_init(rank, world, store)
    x, y = dist_data()
    net = dist_model()
    ewc = natgrad.EWC(net, fisher_type="exact", structure="kfac")
    ewc.consolidate(dist_shard(x, rank, world), dist_shard(y, rank, world))
    diag_ewc = natgrad.EWC(net)
    diag_ewc.consolidate([(dist_shard(x, rank, world)[:2], dist_shard(y, rank, world)[:2]),
                          (dist_shard(x, rank, world)[2:], dist_shard(y, rank, world)[2:])])
    ngd_net = dist_model()
    ngd = natgrad.NaturalGradient(ngd_net, lr=0.5, damping=1e-2, momentum=0.5)
    for _ in range(2):
        ngd.zero_grad()
        ngd.backward(dist_shard(x, rank, world), dist_shard(y, rank, world))
        ngd.step()
    if rank == 0:
        torch.save({"kfac": ewc.state_dict()["tasks"][0], "diag": diag_ewc.state_dict()["tasks"][0],
                    "ngd": flat_params(ngd_net)}, out)
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

    dist_init(rank, world, store)
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
    x, y = dist_data()
    for cycle in range(cycles):
        faulthandler.dump_traceback_later(hang_s, exit=True)
        dist.init_process_group("gloo", init_method=f"file://{store_dir}/store_{cycle}", rank=rank,
                                world_size=world)
        net = nn.Sequential(nn.Linear(25, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        ddp = nn.parallel.DistributedDataParallel(net)
        opt = natgrad.KFAC(ddp, lr=0.1, damping=1e-2, inverse_update_period=1)
        xs, ys = dist_shard(x.reshape(DIST_N, -1), rank, world), dist_shard(y, rank, world)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(ddp(xs), ys).backward()
            opt.step()
        dist.destroy_process_group()
        del opt, ddp, net  # the last reference to the group: ~ProcessGroupGloo joins its workers
        faulthandler.cancel_dump_traceback_later()
