"""EWC on permuted Fashion-MNIST: 3 tasks in a row, with and without natgrad.EWC.

Run: ``PYTHONPATH=python python examples/ewc_permuted_fashion_mnist.py`` (about a minute on a CPU).
Needs the Fashion-MNIST IDX files (Debian package ``dataset-fashion-mnist``); see
benchmarks/data.py, or plug in your own loader. benchmarks/continual.py is the full benchmark.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import natgrad  # noqa: E402
from data import load_fashion_mnist  # noqa: E402

torch.manual_seed(0)
torch.set_num_threads(1)
train, test = load_fashion_mnist(train_size=10000, test_size=2000)
perms = [torch.arange(784)] + [torch.randperm(784) for _ in range(2)]  # one pixel order per task
tasks = [((train.x[:, p], train.y), (test.x[:, p], test.y)) for p in perms]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def run(use_ewc: bool) -> list[float]:
    """Trains on the tasks in order; returns each task's test accuracy after the last one."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    ewc = natgrad.EWC(model, lambda_=1e2)  # diagonal, empirical Fisher, one penalty per task
    for (x, y), _ in tasks:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(2):  # epochs
            for idx in torch.randperm(len(x)).split(128):
                loss = F.cross_entropy(model(x[idx]), y[idx])
                if use_ewc:
                    loss = loss + ewc.penalty()  # zero before the first consolidate()
                opt.zero_grad()
                loss.backward()
                opt.step()
        if use_ewc:
            ewc.consolidate(x[:1000], y[:1000])  # Fisher and anchor of the task just learnt
    return [accuracy(model, xt, yt) for _, (xt, yt) in tasks]


for name, use_ewc in (("no penalty", False), ("EWC", True)):
    accs = run(use_ewc)
    print(f"{name:10s} accuracy per task after task 3: " + ", ".join(f"{a:.3f}" for a in accs)
          + f"  (average {sum(accs) / len(accs):.3f})")
