"""nn.Conv1d's layer kind: exact against the dense Fisher where K-FAC is exact, equal to the
``(1, k)`` Conv2d it is, in KFAC, NaturalGradient (implicit rows) and compute_fisher."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.curvature import Conv1dBlock
from natgrad.fisher import BlockFisher, compute_fisher
from natgrad.fisher.gram import LayerRows, collect_rows

GEOMETRIES = [dict(kernel_size=3), dict(kernel_size=3, stride=2, padding=1),
              dict(kernel_size=2, dilation=2, bias=False)]


class Net1d(nn.Module):
    """Conv1d -> tanh -> flatten -> Linear head."""

    def __init__(self, length: int = 9, **geometry) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, **geometry)
        out = self.conv(torch.zeros(1, 2, length)).shape[-1]
        self.head = nn.Linear(3 * out, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class Net2d(nn.Module):
    """The same network with the convolution as a ``(1, k)`` Conv2d on ``[N, C, 1, L]``."""

    def __init__(self, net: Net1d) -> None:
        super().__init__()
        c = net.conv
        self.conv = nn.Conv2d(2, 3, (1, c.kernel_size[0]), stride=(1, c.stride[0]), padding=(0, c.padding[0]),
                              dilation=(1, c.dilation[0]), bias=c.bias is not None).double()
        with torch.no_grad():
            self.conv.weight.copy_(c.weight.unsqueeze(2))
            if c.bias is not None:
                self.conv.bias.copy_(c.bias)
        self.head = copy.deepcopy(net.head)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x.unsqueeze(2))).flatten(1))


def pair(geometry):
    torch.manual_seed(0)
    net = Net1d(**geometry).double()
    return net, Net2d(net)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def data(n=6, length=9):
    return torch.randn(n, 2, length, dtype=torch.float64), torch.randint(0, 4, (n,))


def test_block_is_exact_on_one_sample_at_one_position():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Tanh(), nn.Linear(3, 3)).double()
    x, y = torch.randn(1, 2, 3, dtype=torch.float64), torch.tensor([1])
    params = list(model[0].parameters())
    (block,) = compute_fisher(model, x, y, structure="kfac", params=params).blocks
    assert isinstance(block, BlockFisher) and isinstance(block.block, Conv1dBlock)
    dense = compute_fisher(model, x, y, structure="dense", params=params).to_dense()
    torch.testing.assert_close(block.to_dense(), dense, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_kfac_fisher_equals_the_conv2d_one(geometry):
    net1, net2 = pair(geometry)
    x, y = data()
    a = compute_fisher(net1, x, y, structure="kfac", params=list(net1.conv.parameters())).to_dense()
    b = compute_fisher(net2, x, y, structure="kfac", params=list(net2.conv.parameters())).to_dense()
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_kfac_training_equals_the_conv2d_network(geometry):
    net1, net2 = pair(geometry)
    opts = [natgrad.KFAC(m, lr=0.1, damping=1e-2, momentum=0.5) for m in (net1, net2)]
    for step in range(4):
        x, y = data()
        for model, opt in zip((net1, net2), opts):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert "K-FAC conv1d" in opts[0].describe()
    torch.testing.assert_close(flat(net1), flat(net2), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_natural_gradient_rows_are_implicit_and_exact(geometry):
    net1, net2 = pair(geometry)
    x, y = data()
    batch, _, _ = collect_rows(net1, x, y, list(net1.parameters()), fisher_type="empirical",
                               likelihood="categorical")
    assert any(isinstance(p, LayerRows) and p.module is net1.conv for p in batch.parts)
    models = [net1, copy.deepcopy(net1), net2]
    opts = [natgrad.NaturalGradient(m, rows=r, lr=0.5, damping=1e-2)
            for m, r in zip(models, ("implicit", "explicit", "implicit"))]
    for step in range(3):
        x, y = data()
        for opt in opts:
            opt.zero_grad()
            opt.backward(x, y)
            opt.step()
    torch.testing.assert_close(flat(models[0]), flat(models[1]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flat(models[0]), flat(models[2]), rtol=1e-10, atol=1e-12)


def test_grouped_or_circular_conv1d_takes_per_sample_curvature():
    model = nn.Sequential(nn.Conv1d(2, 4, 3, groups=2), nn.Conv1d(4, 3, 3, padding=1, padding_mode="circular"),
                          nn.Flatten(), nn.Linear(9, 2))
    opt = natgrad.KFAC(model)
    F.cross_entropy(model(torch.randn(4, 2, 5)), torch.randint(0, 2, (4,))).backward()
    opt.step()
    table = opt.describe()
    rows = {line.split()[0]: line for line in table.splitlines()[1:]}
    assert "diagonal" in rows["0.weight"] and "diagonal" in rows["1.weight"]
    assert "conv1d" not in table
