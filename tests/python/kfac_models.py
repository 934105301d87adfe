"""Small models and helpers shared by the natgrad.KFAC tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
