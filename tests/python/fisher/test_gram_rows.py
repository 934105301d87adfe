"""NaturalGradient's implicit rows (layer Gram matrices from hook data) against today's explicit
torch.func rows and against the dense damped solve, in float64, on every supported layer kind."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.fisher import compute_fisher, score_rows
from natgrad.fisher import gram
from natgrad.fisher.gram import DenseRows, LayerRows, collect_rows

D = torch.float64


class SharedSeq(nn.Module):
    """Sequence model: a Linear shared over positions, a Linear called twice, and one called on
    a batch flattened with its positions (not per-sample: it falls back to explicit rows)."""

    def __init__(self):
        super().__init__()
        self.inp, self.mix, self.flat, self.head = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))                       # [n, T, 5]
        h = torch.tanh(self.mix(h) + self.mix(h.flip(1)))  # called twice
        n, t, d = h.shape
        h = torch.tanh(self.flat(h.reshape(n * t, d))).reshape(n, t, d)
        return self.head(h.mean(1))


class EmbeddingModel(nn.Module):
    def __init__(self, padding_idx=None):
        super().__init__()
        self.emb, self.out = nn.Embedding(7, 4, padding_idx=padding_idx), nn.Linear(4, 3)

    def forward(self, idx):
        return self.out(torch.tanh(self.emb(idx))).sum(1)


class Mixed(nn.Module):
    """Supported layers, a LayerNorm, a bare parameter and a bias-free Linear whose weight is
    tied to another module (both fall back to explicit rows)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3))
        self.tied = nn.Linear(5, 5, bias=False)
        self.tied2 = nn.Linear(5, 5, bias=False)
        self.tied2.weight = self.tied.weight

    def forward(self, x):
        h = torch.tanh(self.ln(self.fc1(x)))
        h = torch.tanh(self.tied2(torch.tanh(self.tied(h))))
        return self.fc2(h) * self.scale


def cnn():
    return nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(),
                         nn.Conv2d(3, 4, (2, 3), stride=(1, 2), padding=(1, 0), dilation=(1, 2)), nn.Tanh(),
                         nn.Flatten(), nn.Linear(4 * 6 * 1, 3))


def problem(name, n=6):
    torch.manual_seed(0)
    if name == "mlp":
        model, x = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)), torch.randn(n, 6)
    elif name == "cnn":
        model, x = cnn(), torch.randn(n, 2, 9, 9)
    elif name == "sequence":
        model, x = SharedSeq(), torch.randn(n, 3, 4)
    elif name == "embedding":
        model, x = EmbeddingModel(padding_idx=2), torch.randint(0, 7, (n, 5))
    else:
        model, x = Mixed(), torch.randn(n, 6)
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    return model, x, torch.randint(0, 3, (n,))


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def one_step(model, x, y, **kwargs):
    model = copy.deepcopy(model)
    opt = natgrad.NaturalGradient(model, lr=0.5, damping=1e-2, seed=5, **kwargs)
    opt.backward(x, y)
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    opt.step()
    return flat(model), grad


MODELS = ["mlp", "cnn", "sequence", "embedding", "mixed"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("fisher_type", ["empirical", "mc", "exact"])
def test_implicit_rows_step_equals_explicit_rows_and_dense_solve(name, fisher_type):
    model, x, y = problem(name)
    before = flat(model)
    implicit, grad = one_step(model, x, y, fisher_type=fisher_type)
    explicit, grad_explicit = one_step(model, x, y, fisher_type=fisher_type, rows="explicit")
    torch.testing.assert_close(grad, grad_explicit, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(implicit, explicit, rtol=1e-10, atol=1e-10)
    if fisher_type == "mc":  # the same labels as the optimizer's sampler (seed 5, one pass)
        u = score_rows(model, x, fisher_type="mc", generator=torch.Generator().manual_seed(5))
        fisher = u.T @ u / len(x)
    else:
        fisher = compute_fisher(model, x, y, fisher_type=fisher_type).to_dense()
    dense = torch.linalg.solve(fisher + 1e-2 * torch.eye(len(grad), dtype=D), grad)
    torch.testing.assert_close(implicit, before - 0.5 * dense, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name,implicit,explicit", [
    ("mlp", {"0", "2"}, set()), ("cnn", {"0", "2", "5"}, set()), ("sequence", {"inp", "mix", "head"}, {"flat"}),
    ("embedding", {"emb", "out"}, set()), ("mixed", {"fc1", "fc2"}, {"ln", "scale", "tied"})])
def test_which_parameters_get_implicit_rows(name, implicit, explicit):
    model, x, y = problem(name)
    params = list(model.parameters())
    names = {id(p): n.rsplit(".", 1)[0] for n, p in model.named_parameters()}
    batch, _, _ = collect_rows(model, x, y, params, fisher_type="empirical", likelihood="categorical")
    got_implicit = {names[id(params[p.index[0]])] for p in batch.parts if isinstance(p, LayerRows)}
    got_explicit = {names[id(params[i])] for p in batch.parts if isinstance(p, DenseRows) for i in p.index}
    assert got_implicit == implicit and got_explicit == explicit


def test_gaussian_likelihood_and_custom_loss():
    model, x, _ = problem("sequence")
    y = torch.randn(len(x), 3, dtype=D)
    for kwargs in (dict(likelihood="gaussian", fisher_type="exact"), dict(likelihood="gaussian"),
                   dict(loss_fn=lambda out, t: 0.5 * (out - t).pow(2).sum() + out.pow(4).sum(), likelihood="gaussian")):
        implicit, _ = one_step(model, x, y, **kwargs)
        explicit, _ = one_step(model, x, y, rows="explicit", **kwargs)
        torch.testing.assert_close(implicit, explicit, rtol=1e-10, atol=1e-10)


def groups(model):
    return [{"params": model[0].parameters(), "lr": 0.1, "momentum": 0.5},
            {"params": model[2].parameters(), "weight_decay": 1e-2}]


@pytest.mark.parametrize("chunk", [1 << 17, 7])
def test_features_follow_the_explicit_path_and_resume_from_state_dict(chunk, monkeypatch):
    # chunk 7: each layer's direction is formed and applied a few output rows at a time
    monkeypatch.setattr(gram, "CHUNK_ELEMENTS", chunk)
    model, x, y = problem("mlp")
    kwargs = dict(lr=0.5, momentum=0.9, kl_clip=1e-3, damping=lambda s: 1e-2 / (1 + s))
    models = [copy.deepcopy(model) for _ in range(3)]
    opts = [natgrad.NaturalGradient(m, groups(m), rows=r, **kwargs)
            for m, r in zip(models, ("implicit", "explicit", "implicit"))]
    for step in range(4):
        if step == 2:  # the third optimizer restarts from a checkpoint
            state = copy.deepcopy(opts[2].state_dict())
            models[2] = copy.deepcopy(models[2])
            opts[2] = natgrad.NaturalGradient(models[2], groups(models[2]), **kwargs)
            opts[2].load_state_dict(state)
        for opt in opts:
            opt.zero_grad()
            opt.backward(x[step:], y[step:])
            opt.step()
    torch.testing.assert_close(flat(models[0]), flat(models[1]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flat(models[0]), flat(models[2]), rtol=0, atol=0)


def test_frozen_and_partial_parameter_lists():
    model, x, y = problem("cnn")
    model[0].bias.requires_grad_(False)  # conv without its bias: its weight gets explicit rows
    params = [p for p in model.parameters() if p.requires_grad]
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    for m, rows in ((a, "implicit"), (b, "explicit")):
        opt = natgrad.NaturalGradient(m, [p for p in m.parameters() if p.requires_grad], lr=0.5, damping=1e-2, rows=rows)
        opt.backward(x, y)
        opt.step()
    torch.testing.assert_close(flat(a), flat(b), rtol=1e-10, atol=1e-10)
    assert len(params) == 5


@pytest.mark.parametrize("fault,error,match", [
    ("empty", ValueError, "inputs holds no samples"),
    ("nan inputs", ValueError, "inputs hold NaN or Inf"),
    ("nan targets", ValueError, "targets hold NaN or Inf"),
    ("short targets", ValueError, "one entry per input"),
    ("overflow", FloatingPointError, "per-sample gradients or losses hold NaN or Inf"),
    ("batch-mixing model", ValueError, "one entry per"),
])
def test_bad_batches_raise_before_grad_is_touched(fault, error, match):
    model, x, _ = problem("mlp")
    y = torch.randn(len(x), 3, dtype=D)
    if fault == "empty":
        x, y = x[:0], y[:0]
    elif fault == "nan inputs":
        x[2, 1] = float("nan")
    elif fault == "nan targets":
        y[1, 0] = float("inf")
    elif fault == "short targets":
        y = y[:-1]
    elif fault == "overflow":
        with torch.no_grad():
            model[2].weight.mul_(1e300)
    else:
        model = nn.Sequential(model, nn.Flatten(0))  # [n, 3] -> [3n]
    opt = natgrad.NaturalGradient(model, likelihood="gaussian")
    with pytest.raises(error, match=match):
        opt.backward(x, y)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="call opt.backward"):
        opt.step()


def test_rows_argument_is_validated():
    with pytest.raises(ValueError, match="Invalid rows"):
        natgrad.NaturalGradient(nn.Linear(2, 2), rows="gram")


@pytest.mark.parametrize("name", ["sequence", "mixed"])
def test_gathered_shards_equal_the_whole_batch(name):
    # two "ranks" in one process: each collects its shard; a fake all_gather hands over the
    # other shard's tensors in the order gathered() asks for them (exact Fisher: 3 passes)
    model, x, y = problem(name, n=8)
    params = list(model.parameters())
    kwargs = dict(fisher_type="exact", likelihood="categorical")
    shards = [collect_rows(model, x[4 * i:4 * i + 4], y[4 * i:4 * i + 4], params, **kwargs)[0]
              for i in range(2)]
    other = iter([t for part in shards[1].parts for t in part.tensors()])
    gathered = shards[0].gathered(lambda t: [t, next(other)], 2)
    whole = collect_rows(model, x, y, params, **kwargs)[0]
    v = [torch.randn_like(p) for p in params]

    def assemble(blocks):
        out = [torch.full_like(p, float("nan")) for p in params]
        for i, where, d in blocks:
            out[i][where] = d
        return out

    for got, expected in zip(assemble(gathered.directions(v, 1e-2)), assemble(whole.directions(v, 1e-2))):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
