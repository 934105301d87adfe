"""natgrad.KFAC under torch.compile: a model compiled with fullgraph=True trains to the same
parameters as the eager model (whose capture uses tensor hooks, a separate path), with no graph
break and at most two graphs (steps with and without statistics); a compiled ``opt.step`` runs
eagerly with one warning and never recompiles after warm-up. The "aot_eager" backend runs
dynamo and AOT autograd (the compiled backward that reports the statistics) without inductor's
code generation, which keeps the tests fast."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import natgrad


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


class Cnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4 * 5 * 5, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(F.relu(self.norm(self.conv(x))).flatten(1))))


class TinyTransformer(nn.Module):
    """Embedding, self-attention, LayerNorm, a feed-forward block; ``position`` adds a learned
    positional parameter that the model uses functionally.
    """

    def __init__(self, position=False):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.pos = nn.Parameter(0.1 * torch.randn(1, 5, 8)) if position else None
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.ff = nn.Linear(8, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, t):
        h = self.emb(t) if self.pos is None else self.emb(t) + self.pos
        h = self.norm(h + self.attn(h, h, h, need_weights=False)[0])
        return self.out(F.gelu(self.ff(h))).mean(1)


def batches(kind, steps):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(6, 2, 5, 5, generator=g) if kind is Cnn else torch.randint(0, 11, (6, 5), generator=g)
        yield x, torch.randint(0, 3, (6,), generator=g)


def train(kind, compiled, steps, period, warm_up=None):
    """Trains a fresh ``kind`` model under K-FAC; after ``warm_up`` steps any recompile raises."""
    torch.manual_seed(0)
    model = kind()
    opt = natgrad.KFAC(model, lr=0.05, factor_update_period=period, inverse_update_period=2)
    forward = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
    for i, (x, y) in enumerate(batches(kind, steps)):
        with torch._dynamo.config.patch(error_on_recompile=warm_up is not None and i >= warm_up):
            opt.zero_grad()
            F.cross_entropy(forward(x), y).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("kind,period", [(Cnn, 1), (TinyTransformer, 2)])
def test_fullgraph_model_trains_as_eager(kind, period):
    eager, _ = train(kind, False, steps=5, period=period)
    model, opt = train(kind, True, steps=5, period=period, warm_up=period)
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == period  # one graph per state of the gate
    assert all(b.has_factors for b in opt.estimator.blocks)  # the compiled backward fed every block
    assert "plain gradient" not in opt.describe()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_functionally_used_parameter_takes_the_plain_gradient_when_compiled():
    model = TinyTransformer(position=True)
    opt = natgrad.KFAC(model, lr=0.05)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x, y = next(batches(TinyTransformer, 1))
    before = model.pos.detach().clone()
    F.cross_entropy(compiled(x), y).backward()
    opt.step()
    assert not counters["graph_break"]
    row = next(line for line in opt.describe().splitlines() if line.startswith("pos "))
    assert "plain gradient: used functionally by a model under torch.compile" in row
    assert not torch.equal(model.pos, before)  # it still moves
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()  # run eagerly again: traced again
    opt.step()
    row = next(line for line in opt.describe().splitlines() if line.startswith("pos "))
    assert "diagonal" in row and "plain" not in row


def test_mc_fisher_of_a_compiled_model_equals_eager():
    """sample_fisher reaches a compiled model's layers through their parameters."""
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = Cnn()
        opt = natgrad.KFAC(model, lr=0.05, fisher_type="mc", inverse_update_period=2)
        forward = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
        for x, y in batches(Cnn, 3):
            opt.zero_grad()
            out = forward(x)
            opt.sample_fisher(out)
            F.cross_entropy(out, y).backward()
            opt.step()
        assert all(b.has_factors for b in opt.estimator.blocks)
        runs.append(model)
    for p, q in zip(*(m.parameters() for m in runs)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    forward(x)  # a compiled forward without sample_fisher: the step refuses, as in eager mode
    F.cross_entropy(forward(x), y).backward()
    with pytest.raises(RuntimeError, match="sample_fisher"):
        opt.step()


def test_compiled_step_runs_eagerly_with_one_warning():
    eager, eager_opt = train(Cnn, False, steps=4, period=1)
    torch.manual_seed(0)
    model = Cnn()
    opt = natgrad.KFAC(model, lr=0.05, inverse_update_period=2)
    step = torch.compile(opt.step, backend="aot_eager")
    with pytest.warns(UserWarning, match="runs eagerly under torch.compile") as caught:
        for i, (x, y) in enumerate(batches(Cnn, 4)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            with torch._dynamo.config.patch(error_on_recompile=i >= 1):
                step()
    assert sum("runs eagerly" in str(w.message) for w in caught) == 1
    assert opt.estimator.refreshes == eager_opt.estimator.refreshes
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_gate_follows_the_step_a_changed_factor_period_and_a_checkpoint():
    model = Cnn()
    opt = natgrad.KFAC(model)
    x, y = next(batches(Cnn, 1))

    def records():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        return sum(len(c.records) for c in opt.estimator.captures.values())

    saved = opt.state_dict()  # at step 0
    assert records() == 4
    opt.step()
    opt.factor_update_period = 2  # step 1 is now not a factor step
    assert not opt.estimator.gate.open and records() == 0
    opt.step()
    assert opt.estimator.gate.open and records() == 4
    opt.step()
    opt.factor_update_period = 1
    opt.load_state_dict(saved)  # _steps back to 0 with period 1 again
    assert opt.estimator.gate.open
    with opt.estimator.paused():
        assert not opt.estimator.gate.open and records() == 0
    assert opt.estimator.gate.open


def test_compiled_model_does_not_keep_the_optimizer_alive():
    model = Cnn()
    opt = natgrad.KFAC(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x, y = next(batches(Cnn, 1))
    F.cross_entropy(compiled(x), y).backward()
    opt.step()
    alive = weakref.ref(opt)
    del opt
    gc.collect()
    assert alive() is None and not any(m._forward_hooks for m in model.modules())
    F.cross_entropy(compiled(x), y).backward()  # recompiled without the hooks
