"""A/B step time of natgrad.KFAC between two source trees, in alternating subprocesses.

Usage::

    git worktree add /tmp/old <rev>    # then give it a built natgrad/_C (or copy this tree's)
    PYTHONPATH=python python benchmarks/kfac_step_ab.py --a /tmp/old/python --b python

Each round runs one short training loop per tree and configuration in a fresh process
(1 thread), A and B interleaved, so load from other processes hits both alike; the table shows
median amortized step times and the ratio B/A with SGD's step (measured in the same processes)
for scale, and each tree's step over the floor of its configuration.

The floor (design.md) is what any K-FAC step must pay, timed as bare ATen calls at the same
sizes in the same process: SGD's step, plus per layer the four eigenbasis preconditioning GEMMs
every step, the two factor GEMMs (addmm, EMA form) every factor period, and the two eigh
calls every inverse period. Its factors come from random data, so they hold no subnormal
numbers: the floor is a clean lower bound. Models: an MLP 64-256-256-10 (digits-sized, batch 128) and 784-512-512-10 (batch
128); periods (factor, inverse) = (1, 1), (1, 10), (10, 100). Writes JSON to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CONFIGS = [((64, 256, 256, 10), p) for p in ((1, 1), (1, 10), (10, 100))] + \
          [((784, 512, 512, 10), p) for p in ((1, 1), (1, 10), (10, 100))]

WORKER = r"""
import sys, time, json, torch, torch.nn as nn, torch.nn.functional as F
torch.set_num_threads(1)
import natgrad
sizes, fp, ip, steps = json.loads(sys.argv[1])
def run(make_opt):
    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    model = nn.Sequential(*layers)
    opt = make_opt(model)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(128, sizes[0], generator=g), torch.randint(0, sizes[-1], (128,), generator=g)) for _ in range(4)]
    def step(i):
        x, y = data[i % 4]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for i in range(3): step(i)
    t = time.perf_counter()
    for i in range(steps): step(i)
    return (time.perf_counter() - t) / steps
kfac = run(lambda m: natgrad.KFAC(m, lr=0.05, momentum=0.9, damping=1e-3, kl_clip=1e-3,
                                  factor_update_period=fp, inverse_update_period=ip))
sgd = run(lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9))
def timed(fn, reps=20):
    fn()
    t = time.perf_counter()
    for _ in range(reps): fn()
    return (time.perf_counter() - t) / reps
g = torch.Generator().manual_seed(2)
layers = []
for a, b in zip(sizes[:-1], sizes[1:]):
    x, go = torch.randn(128, a + 1, generator=g), torch.randn(128, b, generator=g)
    A, G = x.T @ x / 128, go.T @ go / 128
    (la, va), (lg, vg) = torch.linalg.eigh(A), torch.linalg.eigh(G)
    layers.append((x, go, A, G, la, va, lg, vg, torch.randn(b, a + 1, generator=g)))
precondition = timed(lambda: [vg @ ((vg.T @ w @ va) / (lg[:, None] * la[None, :] + 1e-3)) @ va.T
                              for x, go, A, G, la, va, lg, vg, w in layers])
factors = timed(lambda: [(A.addmm_(x.T, x, beta=0.95, alpha=0.05 / 128), G.addmm_(go.T, go, beta=0.95, alpha=0.05 / 128))
                         for x, go, A, G, la, va, lg, vg, w in layers])
decompose = timed(lambda: [(torch.linalg.eigh(A), torch.linalg.eigh(G)) for x, go, A, G, *_ in layers], reps=3)
print(json.dumps([kfac, sgd, sgd + precondition + factors / fp + decompose / ip]))
"""


def measure(tree: str, sizes, periods, steps: int) -> tuple[float, float, float]:
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", WORKER, json.dumps([sizes, *periods, steps])],
                         env=env, capture_output=True, text=True, check=True)
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    """Runs the rounds, prints the table, writes the JSON; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", required=True, help="python/ directory of tree A (baseline)")
    parser.add_argument("--b", required=True, help="python/ directory of tree B")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per run")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "results", "kfac_step_ab.json"))
    args = parser.parse_args(argv)
    rows = []
    print(f"{'model':<18} {'periods':<9} {'A ms':>8} {'B ms':>8} {'B/A':>6} {'SGD ms':>7} "
          f"{'floor ms':>8} {'A/floor':>7} {'B/floor':>7}")
    for sizes, periods in CONFIGS:
        times = {"a": [], "b": [], "sgd": [], "floor": []}
        for _ in range(args.rounds):
            for key, tree in (("a", args.a), ("b", args.b)):
                kfac, sgd, floor = measure(tree, sizes, periods, args.steps)
                times[key].append(kfac)
                times["sgd"].append(sgd)
                times["floor"].append(floor)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"model": "-".join(map(str, sizes)), "periods": periods, **{f"{k}_s": v for k, v in times.items()},
                     "ratio_b_over_a": med["b"] / med["a"], "a_over_floor": med["a"] / med["floor"],
                     "b_over_floor": med["b"] / med["floor"]})
        print(f"{rows[-1]['model']:<18} {str(periods):<9} {med['a'] * 1e3:8.2f} {med['b'] * 1e3:8.2f} "
              f"{med['b'] / med['a']:6.2f} {med['sgd'] * 1e3:7.2f} {med['floor'] * 1e3:8.2f} "
              f"{med['a'] / med['floor']:7.2f} {med['b'] / med['floor']:7.2f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"a": args.a, "b": args.b, "loadavg": os.getloadavg(), "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
