"""The Fisher matrices' accessors: ``BlockDiagonalFisher.kronecker_factors`` against per-sample
references computed densely in float64, and its docstring example.
"""
from __future__ import annotations

import doctest

import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.fisher import BlockDiagonalFisher


def model_and_batch():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    return model, x, y


def test_kronecker_factors_are_the_per_sample_input_and_output_gradient_covariances():
    model, x, y = model_and_batch()
    fisher = natgrad.fisher.compute_fisher(model, x, y, structure="kfac")
    factors = fisher.kronecker_factors()
    assert list(factors) == ["0", "3"]  # the LayerNorm has a dense block, not factors
    first, last = model[0], model[3]
    h0 = F.linear(x, first.weight, first.bias).detach().requires_grad_()
    h1 = torch.tanh(model[1](h0))
    out = F.linear(h1, last.weight, last.bias)
    out.retain_grad()
    F.cross_entropy(out, y, reduction="sum").backward()  # row n: sample n's gradient
    ones = torch.ones(10, 1, dtype=torch.float64)
    for (A, G), a, g in ((factors["0"], torch.cat([x, ones], 1), h0.grad),
                         (factors["3"], torch.cat([h1.detach(), ones], 1), out.grad)):
        torch.testing.assert_close(A, a.T @ a / 10, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(G, g.T @ g / 10, rtol=1e-10, atol=1e-12)


def test_the_layer_fisher_is_g_kron_a_over_the_row_major_weight_and_bias():
    model, x, y = model_and_batch()
    fisher = natgrad.fisher.compute_fisher(model, x, y, structure="kfac")
    A, G = fisher.kronecker_factors()["3"]
    d_out, d_in = model[3].weight.shape
    packed = torch.arange(d_out * (d_in + 1)).reshape(d_out, d_in + 1)  # [W | b], row-major
    order = torch.cat([packed[:, :d_in].reshape(-1), packed[:, d_in]])  # the flat vector: W, then b
    layer = fisher.blocks[-1].to_dense()
    torch.testing.assert_close(layer, torch.kron(G, A)[order][:, order], rtol=1e-10, atol=1e-12)


def test_other_structures_have_no_kronecker_factors():
    model, x, y = model_and_batch()
    fisher = natgrad.fisher.compute_fisher(model, x, y, structure="block_diagonal")
    assert isinstance(fisher, BlockDiagonalFisher) and fisher.kronecker_factors() == {}


def test_the_docstring_example_runs():
    torch.manual_seed(0)
    finder = doctest.DocTestFinder()
    tests = finder.find(BlockDiagonalFisher.kronecker_factors, "kronecker_factors", globs={})
    assert tests and tests[0].examples
    runner = doctest.DocTestRunner()
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
