"""No subnormal numbers in natgrad.KFAC's state after a training run known to produce them
without flushing (digits MLP, lr 0.1, momentum 0.9, 150 steps: the G factors of layers with dead
ReLU units, and the inverse method's G⁻¹, held subnormal entries; every GEMM over them ran
several times slower)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import natgrad


def subnormals(t: torch.Tensor) -> int:
    return int(((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).sum())


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_training_leaves_no_subnormal_state(method, monkeypatch):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = natgrad.KFAC(model, lr=0.1, momentum=0.9, damping=1e-3, kl_clip=1e-3, inverse_update_period=10,
                       inverse_method=method)
    seen = {"directions": 0, "subnormal": 0}

    def recording(params, skipped, request):
        updates, grads = directions(params, skipped, request)
        seen["directions"] += len(updates)
        seen["subnormal"] += sum(subnormals(u) for u in updates.values())
        return updates, grads

    directions = opt.estimator.directions
    monkeypatch.setattr(opt.estimator, "directions", recording)
    g = torch.Generator().manual_seed(0)
    try:
        for _ in range(150):
            idx = torch.randint(0, len(x), (128,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert seen["directions"] >= 6 * 140 and seen["subnormal"] == 0
    state = {f"{b.name}.{k}": v for b in opt.estimator.blocks for k, v in b.state.items()}
    assert {"0.G", "2.G"} <= state.keys()
    assert {k: subnormals(v) for k, v in state.items() if subnormals(v)} == {}
    buffers = [opt.state[p]["momentum_buffer"] for p in model.parameters()]
    assert len(buffers) == 6 and sum(subnormals(b) for b in buffers) == 0
    assert F.cross_entropy(model(x), y) < 0.5  # it trained
