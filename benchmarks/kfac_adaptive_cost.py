"""What natgrad.KFAC's adaptive learning rate and momentum cost per step.

Usage::

    PYTHONPATH=python python benchmarks/kfac_adaptive_cost.py [--threads 1] [--steps 40] [--out PATH]

Model: the MLP 784-512-512-10 (tanh), batch 256, random data, cross-entropy. Runs (each
``--steps`` full steps: zero_grad, forward, loss, backward, step on a fresh model and optimizer,
interleaved over ``--repeats`` rounds, the median reported): SGD with momentum; natgrad.KFAC at
its defaults; natgrad.KFAC(adaptive_learning_rate=True, adaptive_momentum=True) with
adaptive_period 1 and 5. Next to them, the bare pieces a recomputation adds: one forward pass of
the batch and one forward-mode (jvp) pass (``torch.func.jvp`` over ``functional_call``).
Clock: ``time.thread_time()`` with one torch thread (CPU seconds of this thread, steadier than
wall-clock on shared cores); with more threads ``time.process_time()``.
Writes ``benchmarks/results/kfac_adaptive_cost.json``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import natgrad  # noqa: E402
from _harness import machine_info, write_payload  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kfac_adaptive_cost.json")
WIDTHS, BATCH = (784, 512, 512, 10), 256


def build(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        layers += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(WIDTHS) - 2 else [])
    return nn.Sequential(*layers)


def configs() -> dict[str, Callable[[nn.Module], torch.optim.Optimizer]]:
    adaptive = dict(adaptive_learning_rate=True, adaptive_momentum=True, damping=1e-2)
    return {"SGD": lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9),
            "KFAC": lambda m: natgrad.KFAC(m, lr=0.01),
            "KFAC adaptive (period 1)": lambda m: natgrad.KFAC(m, **adaptive),
            "KFAC adaptive (period 5)": lambda m: natgrad.KFAC(m, adaptive_period=5, **adaptive)}


def run(make, steps: int, x, y, clock) -> float:
    model = build()
    opt = make(model)
    start = clock()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return (clock() - start) / steps


def pieces(steps: int, x, clock) -> dict[str, float]:
    model = build()
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangents = {n: torch.randn_like(p) for n, p in params.items()}
    out = {}
    with torch.no_grad():
        start = clock()
        for _ in range(steps):
            model(x)
        out["forward"] = (clock() - start) / steps
    start = clock()
    for _ in range(steps):
        jvp(lambda v: functional_call(model, v, (x,)), (params,), (tangents,))
    out["jvp"] = (clock() - start) / steps
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.process_time
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(BATCH, WIDTHS[0], generator=g), torch.randint(0, WIDTHS[-1], (BATCH,), generator=g)
    times: dict[str, list[float]] = {name: [] for name in [*configs(), "forward", "jvp"]}
    for _ in range(args.repeats):
        for name, make in configs().items():
            times[name].append(run(make, args.steps, x, y, clock))
        for name, value in pieces(args.steps, x, clock).items():
            times[name].append(value)
    median = {name: statistics.median(v) for name, v in times.items()}
    print(f"{'step':<26} {'ms':>8} {'x SGD':>7}")
    for name, value in median.items():
        print(f"{name:<26} {1e3 * value:8.2f} {value / median['SGD']:7.2f}")
    extra = median["KFAC adaptive (period 1)"] - median["KFAC"]
    print(f"adaptive (period 1) adds {1e3 * extra:.2f} ms/step = {extra / median['forward']:.1f} forwards "
          f"= {extra / median['jvp']:.1f} jvps")
    write_payload(args.out, {"model": f"MLP {'-'.join(map(str, WIDTHS))}, batch {BATCH}", "threads": args.threads,
                             "clock": clock.__name__, "steps": args.steps, "repeats": args.repeats,
                             "seconds_per_step": times, "median": median,
                             "load_average": os.getloadavg(), "machine": machine_info()})


if __name__ == "__main__":
    main()
