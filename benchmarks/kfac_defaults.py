"""natgrad.KFAC with its default hyperparameters against SGD with momentum, same lr grid.

Usage::

    PYTHONPATH=python python benchmarks/kfac_defaults.py [--quick] [--out FILE]

The question a user asks first: does K-FAC train well out of the box? For each benchmark model
(the digits MLP 64-128-128-10 and a 64-256-256-10 one, a Fashion-MNIST MLP 784-512-512-10, the
Fashion-MNIST autoencoder 784-256-128-32-128-256-784, all of ``benchmarks/train.py``'s kind),
``natgrad.KFAC(model, lr=lr)`` — every other hyperparameter at its default — and
``torch.optim.SGD(lr=lr, momentum=0.9)`` train for the same number of steps on the same
minibatches, over the same lr grid (SGD's grid of ``benchmarks/train.py``). A run diverges when its
loss turns non-finite or exceeds 10x its initial value. The table gives, per model and lr, the
final training loss (monitor set) of both, and per model the best of each; the goals: K-FAC never
diverges, and on the classifiers its best loss is below SGD's. Writes
``benchmarks/results/kfac_defaults.json``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import natgrad  # noqa: E402
from _harness import format_rows, machine_info, mlp, write_payload  # noqa: E402
from data import load_digits, load_fashion_mnist  # noqa: E402
from kfac_refresh import loss_of  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kfac_defaults.json")
# name: widths, activation, loss, batch, steps, lr grid (SGD's in benchmarks/train.py), classifier
MODELS = {
    "digits MLP 64-128-128-10": ((64, 128, 128, 10), nn.ReLU, "ce", 128, 150, (0.03, 0.1, 0.3), True),
    "digits MLP 64-256-256-10": ((64, 256, 256, 10), nn.ReLU, "ce", 128, 150, (0.03, 0.1, 0.3), True),
    "Fashion MLP 784-512-512-10": ((784, 512, 512, 10), nn.ReLU, "ce", 256, 150, (0.03, 0.1, 0.3), True),
    "autoencoder 784-256-128-32-128-256-784": ((784, 256, 128, 32, 128, 256, 784), nn.Tanh, "bce", 256,
                                               150, (1e-3, 3e-3, 1e-2), False),
}


def train(name: str, opt_name: str, lr: float, data, monitor, steps: int) -> tuple[float, bool]:
    """Final monitor loss and whether the run diverged."""
    widths, act, kind, batch, _, _, _ = MODELS[name]
    torch.manual_seed(0)
    model = mlp(widths, act)
    opt = (natgrad.KFAC(model, lr=lr) if opt_name == "KFAC"
           else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
    gen = torch.Generator().manual_seed(1)

    def measure() -> float:
        with torch.no_grad():
            return float(loss_of(kind, model(monitor.x), monitor.x, monitor.y))

    first = measure()
    for _ in range(steps):
        idx = torch.randint(0, data.x.shape[0], (batch,), generator=gen)
        x, y = data.x[idx], data.y[idx]
        opt.zero_grad()
        loss_of(kind, model(x), x, y).backward()
        opt.step()
    final = measure()
    return final, not (math.isfinite(final) and final <= 10 * first)


def main(argv=None) -> int:
    """Runs every model, lr and optimizer; prints the table and goals; writes the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    digits, _ = load_digits(seed=0)
    fashion, _ = load_fashion_mnist(2000 if args.quick else 10000, 10, seed=0)
    fashion_monitor = type(fashion)(fashion.x[:2000], fashion.y[:2000])
    results, rows, goals = [], [], []
    for name, (_, _, _, _, steps, lrs, classifier) in MODELS.items():
        data, monitor = (digits, digits) if name.startswith("digits") else (fashion, fashion_monitor)
        steps = 20 if args.quick else steps
        per = {"model": name, "steps": steps, "runs": []}
        for lr in lrs:
            for opt_name in ("SGD", "KFAC"):
                final, diverged = train(name, opt_name, lr, data, monitor, steps)
                per["runs"].append({"optimizer": opt_name, "lr": lr, "final_loss": final, "diverged": diverged})
        best = {o: min((r["final_loss"] if not r["diverged"] else math.inf)
                       for r in per["runs"] if r["optimizer"] == o) for o in ("SGD", "KFAC")}
        per["best"] = best
        per["kfac_never_diverged"] = not any(r["diverged"] for r in per["runs"] if r["optimizer"] == "KFAC")
        per["kfac_beats_sgd"] = best["KFAC"] < best["SGD"] if classifier else None
        results.append(per)
        for lr in lrs:
            cells = {r["optimizer"]: r for r in per["runs"] if r["lr"] == lr}
            rows.append([name, str(steps), f"{lr:g}"] + [
                "diverged" if cells[o]["diverged"] else f"{cells[o]['final_loss']:.4g}" for o in ("SGD", "KFAC")])
        goals.append(f"  {name}: K-FAC never diverged: {per['kfac_never_diverged']}; best K-FAC {best['KFAC']:.4g} "
                     f"vs best SGD {best['SGD']:.4g}"
                     + ("" if not classifier else f" -> {'MET' if per['kfac_beats_sgd'] else 'NOT MET'}"))
        print(goals[-1], flush=True)
    print("\nK-FAC with default hyperparameters (only lr from SGD's grid) vs SGD (momentum 0.9): final training loss")
    print(format_rows(["model", "steps", "lr", "SGD", "KFAC defaults"], rows, left={0}))
    print("\nGoals (no divergence anywhere; lower loss than SGD on the classifiers):\n" + "\n".join(goals))
    write_payload(args.out, {"machine": machine_info(), "quick": args.quick, "results": results})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
