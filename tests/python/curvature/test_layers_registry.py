"""The public layer registry: Hugging Face GPT-2's transposed-weight ``Conv1D`` (``y = x @ W + b``,
weight ``[in, out]``; a copy here, so that transformers is not needed), registered through
``natgrad.curvature.register_layer`` with natgrad's kind for it
(:mod:`natgrad.integrations.transformers`), behaves exactly as the nn.Linear it is in KFAC,
NaturalGradient, compute_fisher and EWC."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.curvature import layers
from natgrad.curvature.layers import LinearBlock
from natgrad.fisher import compute_fisher
from natgrad.fisher.gram import LayerRows, collect_rows
from natgrad.integrations.transformers import Conv1DBlock, Conv1DKind


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D: a linear layer whose weight is stored ``[in, out]``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    """Conv1D registered through the public function for one test (the registry restored after)."""
    monkeypatch.setattr(layers, "_KINDS", dict(layers._KINDS))
    natgrad.curvature.register_layer(Conv1D, Conv1DKind())


class Net(nn.Module):
    """Tokens ``[N, T, 5]`` -> projection -> tanh -> mean over tokens -> Linear head."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj, self.head = proj, nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x)).mean(1))


def pair():
    """The same network with a Conv1D and with an nn.Linear (float64)."""
    torch.manual_seed(0)
    gpt = Net(Conv1D(6, 5)).double()
    lin = Net(nn.Linear(5, 6)).double()
    with torch.no_grad():
        lin.proj.weight.copy_(gpt.proj.weight.T)
        lin.proj.bias.copy_(gpt.proj.bias)
        lin.head.load_state_dict(gpt.head.state_dict())
    return gpt, lin


def params_like_linear(model):
    """The Conv1D network's parameters in the nn.Linear network's layout."""
    out = []
    for name, p in model.named_parameters():
        out.append((p.T if name == "proj.weight" else p).detach().reshape(-1))
    return torch.cat(out)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def data(n=5, tokens=4):
    return torch.randn(n, tokens, 5, dtype=torch.float64), torch.randint(0, 3, (n,))


def test_the_kind_is_found_by_module_type():
    assert isinstance(natgrad.curvature.kind_of(Conv1D(2, 3)), Conv1DKind)
    assert natgrad.curvature.registered_layers()[Conv1D].name == "gpt2_conv1d"


def test_block_is_exact_on_one_sample():
    torch.manual_seed(1)
    model = nn.Sequential(Conv1D(4, 3), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(1, 3, dtype=torch.float64), torch.tensor([2])
    params = list(model[0].parameters())
    (block,) = compute_fisher(model, x, y, structure="kfac", params=params).blocks
    assert isinstance(block.block, Conv1DBlock)
    dense = compute_fisher(model, x, y, structure="dense", params=params).to_dense()
    torch.testing.assert_close(block.to_dense(), dense, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_training_equals_the_linear_network(approx):
    gpt, lin = pair()
    opts = [natgrad.KFAC(m, lr=0.2, damping=1e-2, momentum=0.5, linear_approx=approx) for m in (gpt, lin)]
    for step in range(4):
        x, y = data()
        for model, opt in zip((gpt, lin), opts):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert "K-FAC linear" in opts[0].describe().splitlines()[1]  # proj.weight: the Conv1D's block
    torch.testing.assert_close(params_like_linear(gpt), flat(lin), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [1 << 17, 4])
def test_natural_gradient_rows_are_implicit_and_exact(chunk, monkeypatch):
    from natgrad.fisher import gram

    monkeypatch.setattr(gram, "CHUNK_ELEMENTS", chunk)  # 4: the direction a few columns at a time
    gpt, lin = pair()
    x, y = data()
    batch, _, _ = collect_rows(gpt, x, y, list(gpt.parameters()), fisher_type="empirical", likelihood="categorical")
    assert any(isinstance(p, LayerRows) and p.module is gpt.proj for p in batch.parts)
    models = [gpt, copy.deepcopy(gpt), lin]
    opts = [natgrad.NaturalGradient(m, rows=r, lr=0.5, damping=1e-2)
            for m, r in zip(models, ("implicit", "explicit", "implicit"))]
    for step in range(3):
        x, y = data()
        for opt in opts:
            opt.zero_grad()
            opt.backward(x, y)
            opt.step()
    torch.testing.assert_close(flat(models[0]), flat(models[1]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(params_like_linear(models[0]), flat(models[2]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("structure", ["diagonal", "kfac"])
def test_ewc_penalty_equals_the_linear_network(structure):
    gpt, lin = pair()
    x, y = data()
    penalties = []
    for model in (gpt, lin):
        ewc = natgrad.EWC(model, structure=structure)
        ewc.consolidate(x, y)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)
        penalties.append(ewc.penalty())
    torch.testing.assert_close(penalties[0], penalties[1], rtol=1e-10, atol=1e-12)


def test_register_layer_rejects_what_is_not_a_module_type_or_a_kind():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        natgrad.curvature.register_layer(Conv1D(2, 3), Conv1DKind())
    with pytest.raises(TypeError, match="LayerKind"):
        natgrad.curvature.register_layer(Conv1D, object())
    kind = Conv1DKind()
    kind.fallback = "dense"
    with pytest.raises(ValueError, match="fallback"):
        natgrad.curvature.register_layer(Conv1D, kind)


class Dense(nn.Module):
    """A user's own linear layer (weight ``[out, in]``), unknown to natgrad until registered."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) * 0.5)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class DenseKind(natgrad.curvature.LayerKind):
    """The least a kind defines: its block."""

    name = "dense"

    def block(self, name, module, *, approx="expand", factor_dtype=None, inverse_dtype=None):
        return LinearBlock(name, module, approx=approx, factor_dtype=factor_dtype, inverse_dtype=inverse_dtype)


def test_a_kind_with_only_a_block_gets_kfac_and_explicit_rows():
    torch.manual_seed(2)
    model = nn.Sequential(Dense(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    before = natgrad.KFAC(copy.deepcopy(model))
    F.cross_entropy(before.model(x), y).backward()
    before.step()
    assert "K-FAC" not in before.describe().splitlines()[1]  # unregistered: diagonal curvature
    natgrad.curvature.register_layer(Dense, DenseKind())
    opt = natgrad.KFAC(model)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert "K-FAC linear" in opt.describe().splitlines()[1]
    batch, _, _ = collect_rows(model, x, y, list(model.parameters()), fisher_type="empirical",
                               likelihood="categorical")
    assert not any(isinstance(p, LayerRows) and p.module is model[0] for p in batch.parts)
