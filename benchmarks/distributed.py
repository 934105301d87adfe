"""Distributed K-FAC on 2 gloo processes: bytes communicated per step and step time vs DDP+SGD.

Runs natgrad.KFAC on a DistributedDataParallel MLP with full factors vs triangle-packed factors
and grad-worker fractions 1 and 1/world, next to DDP+SGD, each rank on its own shard of the
batch. Prints a table, writes benchmarks/results/distributed.json. The bytes are counted by the
communicator (the payload each rank contributes to a collective); DDP's own gradient all-reduce
is the size of the gradients.

    python benchmarks/distributed.py [--quick] [--out PATH]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402

CONFIGS = [  # name, optimizer, kwargs
    ("DDP + SGD", "sgd", {}),
    ("K-FAC full factors, f=1", "kfac", dict(triangle_packing=False, grad_worker_fraction=1.0)),
    ("K-FAC triangles, f=1", "kfac", dict(triangle_packing=True, grad_worker_fraction=1.0)),
    ("K-FAC triangles, f=1/world", "kfac", dict(triangle_packing=True, grad_worker_fraction=0.5)),
]


def make_model(widths: list[int]) -> nn.Module:
    """An MLP with tanh activations and the given widths."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def worker(rank: int, world: int, store: str, widths: list[int], batch: int, steps: int,
           periods: tuple[int, int], out: str) -> None:
    """One rank: runs every configuration and (rank 0) saves timings and byte counts."""
    import natgrad

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(batch, widths[0], generator=g)
    y = torch.randint(0, widths[-1], (batch,), generator=g)
    results = {}
    for name, kind, kwargs in CONFIGS:
        net = nn.parallel.DistributedDataParallel(make_model(widths))
        if kind == "sgd":
            opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        else:
            opt = natgrad.KFAC(net, lr=0.01, factor_update_period=periods[0],
                               inverse_update_period=periods[1], **kwargs)
        times = []
        for k in range(steps + 2):
            dist.barrier()
            start = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
            dist.barrier()
            if k >= 2:  # warm-up
                times.append(time.perf_counter() - start)
        grads = sum(p.numel() * p.element_size() for p in net.parameters())
        sent = dict(opt.estimator.communicator.bytes) if kind == "kfac" else {}
        results[name] = {"step_s": statistics.median(times), "mean_step_s": statistics.fmean(times),
                         "bytes_per_step": {"ddp_gradients": grads,
                                            **{k: v / (steps + 2) for k, v in sent.items()}}}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark and returns its JSON payload."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "distributed.json"))
    args = parser.parse_args(argv)
    widths = [64, 64, 10] if args.quick else [784, 512, 512, 10]
    batch, steps, periods = (16, 4, (1, 2)) if args.quick else (128, 30, (1, 10))
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.pt")
        mp.spawn(worker, args=(world, os.path.join(tmp, "store"), widths, batch, steps, periods, out),
                 nprocs=world, join=True)
        results = torch.load(out)
    base = results["DDP + SGD"]["step_s"]
    rows = []
    for name, r in results.items():
        b = r["bytes_per_step"]
        rows.append([name, f"{1e3 * r['step_s']:.1f}", f"{r['step_s'] / base:.2f}",
                     f"{b['ddp_gradients'] / 2**20:.2f}", f"{b.get('factors', 0) / 2**20:.2f}",
                     f"{b.get('inverses', 0) / 2**20:.2f}", f"{b.get('directions', 0) / 2**20:.2f}"])
    print(f"Distributed K-FAC, {world} gloo processes, MLP {widths}, batch {batch}/rank, "
          f"periods (factor, inverse) = {periods}; MiB per step are each rank's payload")
    print(_harness.format_rows(["config", "step ms", "x SGD", "grads MiB", "factors MiB",
                                "inverses MiB", "directions MiB"], rows))
    payload = {"machine": _harness.machine_info(), "world_size": world, "widths": widths,
               "batch_per_rank": batch, "periods": periods, "steps": steps, "results": results}
    _harness.write_payload(args.out, payload)
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
