"""The committed fixture of the C++ EWC tests still holds what the current natgrad.EWC computes."""
from __future__ import annotations

import importlib.util
import os

import torch

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "fixtures")
_spec = importlib.util.spec_from_file_location("make_ewc_parity", os.path.join(FIXTURES, "make_ewc_parity.py"))
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)
PATH, build, model = script.PATH, script.build, script.model


def test_committed_ewc_fixture_matches_python_ewc() -> None:
    committed = torch.load(PATH)
    fresh = build()
    assert sorted(committed) == sorted(fresh)
    for key, value in fresh.items():
        torch.testing.assert_close(committed[key], value, rtol=1e-12, atol=1e-14, msg=key)


def test_fixture_fisher_is_per_sample_not_squared_mean() -> None:
    """Sanity of the reference itself: the stored Fisher is the mean of squared per-sample
    gradients (checked here by an explicit loop over samples), larger than the square of the
    mean gradient."""
    ref = build()
    net = model()
    x, y = ref["x1"], ref["y1"]
    squares = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    for i in range(len(x)):
        net.zero_grad()
        torch.nn.functional.cross_entropy(net(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        for n, p in net.named_parameters():
            squares[n] += p.grad ** 2 / len(x)
    # The separate case's first task is that Fisher (λ does not enter the Fisher).
    for n, s in squares.items():
        torch.testing.assert_close(ref[f"separate/fisher0/{n}"], s, rtol=1e-10, atol=1e-14)
