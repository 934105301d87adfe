"""natgrad.KFAC's step with one host read: the list ops' path (factor step in
``kfac_factors_ema_``, directions, ``⟨u, g⟩`` and the momentum terms ``⟨b, g⟩`` of the trust
region in ``kfac_directions_*``) against the per-layer sequence it replaces, which distributed
runs still take (``CurvatureEstimator.batched = False``: per-block directions, the per-layer
factor updates and the trust region's own reductions): the parameters after several steps agree
to float64 rounding."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad import ops


def model_and_data(kind: str):
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        x = torch.randn(48, 10, dtype=torch.float64)
    elif kind == "cnn":
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False),
                              nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 4))
        x = torch.randn(48, 1, 8, 8, dtype=torch.float64)
    else:  # an Embedding (per-block path) and a LayerNorm (diagonal block) beside Linear layers
        model = nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(24, 4), nn.LayerNorm(4), nn.Linear(4, 4))
        x = torch.randint(0, 20, (48, 3))
    return model.double(), x, torch.randint(0, 4, (48,))


def run(kind: str, method: str, reference: bool, monkeypatch, steps: int = 10) -> list[torch.Tensor]:
    model, x, y = model_and_data(kind)
    params = list(model.parameters())
    groups = [{"params": params[:2], "lr": 0.05}, {"params": params[2:], "lr": 0.1, "momentum": 0.5}]
    opt = natgrad.KFAC(model, groups, lr=0.1, momentum=0.9, weight_decay=1e-3, kl_clip=1e-5,
                       inverse_method=method, factor_update_period=2, inverse_update_period=3)
    with monkeypatch.context() as m:
        if reference:  # the per-layer sequence
            m.setattr(opt.estimator, "batched", False)
        for step in range(steps):
            batch = slice(8 * (step % 3), 8 * (step % 3) + 24)
            opt.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("method", ["eigen", "inverse"])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "embedding"])
def test_list_op_step_equals_the_per_layer_sequence(kind, method, monkeypatch):
    fast = run(kind, method, False, monkeypatch)
    reference = run(kind, method, True, monkeypatch)
    start = [p.detach() for p in model_and_data(kind)[0].parameters()]
    for p, r, p0 in zip(fast, reference, start):
        assert not torch.equal(r, p0)  # every parameter moved
        torch.testing.assert_close(p, r, rtol=1e-10, atol=1e-12)


class Reads:
    """Counts the Python-side reads of tensor values (tolist, item, float, bool, int)."""

    NAMES = ("tolist", "item", "__float__", "__bool__", "__int__")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(t, *args, _original=original, **kwargs):
                self.count += 1
                return _original(t, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("method", ["eigen", "inverse"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_a_step_reads_the_host_once(kind, method, monkeypatch):
    """Factor step, directions, flags and the momentum trust region: one read per step (steps
    that decompose read each decomposition's fallback rung too)."""
    model, x, y = model_and_data(kind)
    opt = natgrad.KFAC(model, lr=0.1, momentum=0.9, kl_clip=1e-3, inverse_method=method,
                       factor_update_period=1, inverse_update_period=100)
    reads = Reads(monkeypatch)
    counts = []
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        reads.count = 0
        opt.step()
        counts.append(reads.count)
    assert counts[1:] == [1, 1, 1]


def test_a_factor_update_left_non_finite_resets_the_layer(monkeypatch):
    """The op flags (and zeroes) factors an update left non-finite; the optimizer then restarts
    that layer's estimate and skips its step, as the per-layer path did."""
    model, x, y = model_and_data("mlp")
    opt = natgrad.KFAC(model, lr=0.1, inverse_update_period=1)
    real = ops.kfac_factors_ema_

    def second_layer_overflows(*args):
        flags = real(*args)
        flags[1, 1] = 0.0
        return flags

    for step in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = [p.detach().clone() for p in model.parameters()]
        with monkeypatch.context() as m, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if step == 1:
                m.setattr(ops, "kfac_factors_ema_", second_layer_overflows)
            opt.step()
        after = list(model.parameters())
        block = opt.estimator.blocks[1]
        if step == 1:
            assert any("updated factors" in str(w.message) for w in caught)
            assert block.state == {} and not opt.estimator.is_decomposed(block.name)
            assert torch.equal(after[2], before[2]) and torch.equal(after[3], before[3])
            assert not torch.equal(after[0], before[0])
        else:
            assert not caught and block.has_factors
    assert opt.nonfinite_skips == {block.name: 1}
