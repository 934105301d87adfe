"""Block-diagonal large factors (natgrad.curvature.split, KFAC's ``max_factor_dim``): the ranges,
and the preconditioned gradient of a split layer against a dense float64 reference of
``(Ā ⊗ Ḡ + damping)⁻¹`` with ``Ā = blockdiag(A)``, ``Ḡ = blockdiag(G)``.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from support import random_psd
from torch import nn

import natgrad
from natgrad import ops
from natgrad.curvature import refresh
from natgrad.curvature.split import damped_inverse_blocks, eigh_blocks, factor_ranges, warm_refresh_blocks

LIMIT = 5
DAMPING = 0.05


def linear_model() -> nn.Module:
    """Linear 12 -> 7 with bias: A is 13 (three uneven blocks at limit 5), G is 7 (two)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 7)).double()


def conv_model() -> nn.Module:
    """Conv2d 3 -> 7, 2×2 kernel, bias: A is 3·4 + 1 = 13 (blocks of whole channels), G is 7."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 7, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten()).double()


def padded_conv_model() -> nn.Module:
    """Conv2d 2 -> 7, 3×3, padding 1 on 1×1 inputs: 8 of the 9 taps see only padding, so A
    (2·9 + 1 = 19; blocks of whole channels at limit 10) has zero rows, deflated.
    """
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 7, 3, padding=1), nn.Flatten()).double()


def batch(model: nn.Module, n: int = 16):
    """Inputs for ``model`` (one of the three above) and 7-class labels."""
    g = torch.Generator().manual_seed(3)
    conv = model[0]
    shape = (n, 12) if isinstance(conv, nn.Linear) else (n, 3, 4, 4) if conv.padding == (0, 0) else (n, 2, 1, 1)
    return torch.randn(*shape, generator=g, dtype=torch.float64), torch.randint(0, 7, (n,), generator=g)


def blockdiag_reference(m: torch.Tensor, ranges) -> torch.Tensor:
    """``m`` with every entry outside the diagonal blocks set to zero."""
    mask = torch.zeros_like(m, dtype=torch.bool)
    for a, b in ranges:
        mask[a:b, a:b] = True
    return torch.where(mask, m, torch.zeros_like(m))


def reference_direction(a, g, grad, damping, method, pi_correction):
    """Dense float64 ``(Ā ⊗ Ḡ + γI)⁻¹ vec ∇W̃`` (eigen, exact damping) or the factored form
    ``(Ḡ + √γ/π I)⁻¹ ∇W̃ (Ā + π√γ I)⁻¹`` (π from the traces; 1 without ``pi_correction``).
    """
    if method == "eigen" and not pi_correction:
        f = torch.kron(g, a) + damping * torch.eye(g.shape[0] * a.shape[0], dtype=a.dtype)
        return torch.linalg.solve(f, grad.reshape(-1)).reshape(grad.shape)
    pi = math.sqrt((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0])) if pi_correction else 1.0
    root = math.sqrt(damping)
    g_damped = g + root / pi * torch.eye(g.shape[0], dtype=g.dtype)
    a_damped = a + pi * root * torch.eye(a.shape[0], dtype=a.dtype)
    return torch.linalg.solve(g_damped, torch.linalg.solve(a_damped, grad.mT).mT)


@pytest.mark.parametrize("dim,limit,unit,tail", [(13, 5, 1, 1), (7, 5, 1, 0), (13, 5, 4, 1), (4608, 1024, 9, 0),
                                                 (4609, 1024, 9, 1), (2304, 2048, 9, 0), (100, 7, 1, 0), (1025, 1024, 1, 1),
                                                 (13, 3, 4, 1), (10, 1, 1, 1), (30, 30, 1, 0)])
def test_factor_ranges_cover_the_factor_in_balanced_blocks_within_the_limit(dim, limit, unit, tail):
    ranges = factor_ranges(dim, limit, unit, tail)
    assert ranges[0][0] == 0 and ranges[-1][1] == dim
    assert all(a1 == b0 for (_, a1), (b0, _) in zip(ranges, ranges[1:]))
    sizes = [b - a for a, b in ranges[:-1]] + [ranges[-1][1] - ranges[-1][0] - tail]  # features per range
    assert max(sizes) <= limit and min(sizes) > 0
    if dim - tail <= limit:
        assert ranges == [(0, dim)]
        return
    if unit <= limit:  # whole units: every cut but the end on a multiple of the unit
        assert all(b % unit == 0 for _, b in ranges[:-1])
    step = unit if unit <= limit else 1
    assert max(sizes) - min(sizes) <= 2 * step
    if step == 1:
        assert len(ranges) == math.ceil((dim - tail) / limit)


def test_no_limit_never_splits():
    assert factor_ranges(10_000, None) == [(0, 10_000)]


@pytest.mark.parametrize("make", [linear_model, conv_model, padded_conv_model],
                         ids=["linear", "conv2d", "conv2d-padding-only-taps"])
@pytest.mark.parametrize("method,pi_correction", [("eigen", False), ("eigen", True), ("inverse", True),
                                                  ("inverse", False)])
def test_split_step_matches_dense_reference_of_the_block_diagonal_factors(make, method, pi_correction):
    model = make()
    x, y = batch(model)
    padded = make is padded_conv_model
    limit = 10 if padded else LIMIT
    opt = natgrad.KFAC(model, lr=1.0, momentum=0.0, kl_clip=None, damping=DAMPING, max_factor_dim=limit,
                       inverse_method=method, pi_correction=pi_correction)
    block = opt.estimator.blocks[0]
    a_ranges, g_ranges = block.a_ranges(), block.g_ranges()
    assert len(a_ranges) == (2 if padded else 3) and len(g_ranges) == (1 if padded else 2)
    assert len({b - a for a, b in a_ranges}) > 1  # an uneven split
    if isinstance(model[0], nn.Conv2d):  # whole input channels, the bias in the last block
        assert [b for _, b in a_ranges[:-1]] == ([9] if padded else [4, 8])
    before = [p.detach().clone() for p in model[0].parameters()]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grad = block.pack([p.grad.clone() for p in model[0].parameters()])
    opt.step()
    a = blockdiag_reference(block.state["A"], a_ranges)
    g = blockdiag_reference(block.state["G"], g_ranges)
    if padded:  # the padding-only taps' rows of A are zero (deflated in the decomposition)
        assert int((a == 0).all(1).sum()) == 2 * 8
    expected = reference_direction(a, g, grad, DAMPING, method, pi_correction)
    moved = block.pack([b - p.detach() for b, p in zip(before, model[0].parameters())])
    torch.testing.assert_close(moved, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_block_diagonal_decomposition_is_one_of_the_block_diagonal_factors(method):
    """Stored dense, the decomposition reads as any other: the dense ops give the split result."""
    model = linear_model()
    x, y = batch(model)
    opt = natgrad.KFAC(model, max_factor_dim=LIMIT, inverse_method=method)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    block = opt.estimator.blocks[0]
    s = block.state
    grad = torch.randn(7, 13, dtype=torch.float64)
    if method == "eigen":
        a = blockdiag_reference(s["A"], block.a_ranges())
        torch.testing.assert_close(s["a_eigenvectors"] @ torch.diag(s["a_eigenvalues"]) @ s["a_eigenvectors"].mT, a)
        dense = ops.kfac_precondition_eigen(grad, s["g_eigenvalues"], s["g_eigenvectors"], s["a_eigenvalues"],
                                            s["a_eigenvectors"], DAMPING, True)
    else:
        dense = ops.kfac_precondition_inverse(grad, s["g_inverse"], s["a_inverse"])
    torch.testing.assert_close(block.precondition(grad, DAMPING, True), dense, rtol=1e-10, atol=1e-12)


def test_zero_rows_and_an_all_zero_block_are_deflated_exactly():
    ranges = [(0, 4), (4, 9), (9, 13)]
    x = torch.randn(13, 20, dtype=torch.float64)
    x[[1, 2, 4, 5, 6, 7, 8]] = 0  # two zero rows in the first block, the second block all zero
    a = x @ x.T / 20
    g = random_psd(7)
    values, vectors, _ = eigh_blocks(a, ranges)
    torch.testing.assert_close(vectors.mT @ vectors, torch.eye(13, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.mT, blockdiag_reference(a, ranges))
    g_inv, a_inv, _ = damped_inverse_blocks(g, a, [(0, 7)], ranges, DAMPING, True)
    pi = math.sqrt((torch.trace(a) / 13) / (torch.trace(g) / 7))
    eye = torch.eye(13, dtype=torch.float64)
    torch.testing.assert_close(a_inv, torch.linalg.inv(blockdiag_reference(a, ranges) + pi * DAMPING**0.5 * eye))
    torch.testing.assert_close(g_inv, torch.linalg.inv(g + DAMPING**0.5 / pi * torch.eye(7, dtype=torch.float64)))


def test_mv_is_the_block_diagonal_curvature():
    model = linear_model()
    x, y = batch(model)
    opt = natgrad.KFAC(model, max_factor_dim=LIMIT)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    block = opt.estimator.blocks[0]
    a = blockdiag_reference(block.state["A"], block.a_ranges())
    g = blockdiag_reference(block.state["G"], block.g_ranges())
    v = torch.randn(7, 13, dtype=torch.float64)
    torch.testing.assert_close(block.pack(block.mv(block.unpack(v))), g @ v @ a)
    torch.testing.assert_close(block.quad_form(block.unpack(v)), (g @ v @ a * v).sum())


def test_warm_refresh_stays_block_diagonal():
    ranges = [(0, 4), (4, 9), (9, 13)]
    old = torch.linalg.eigh(blockdiag_reference(random_psd(13), ranges))
    factor = random_psd(13)
    values, vectors = warm_refresh_blocks(factor, old.eigenvalues, old.eigenvectors, ranges)
    torch.testing.assert_close(vectors, blockdiag_reference(vectors, ranges), rtol=0, atol=0)
    for a, b in ranges:
        v, q = refresh.warm_eigh(factor[a:b, a:b], old.eigenvalues[a:b], old.eigenvectors[a:b, a:b])
        torch.testing.assert_close(values[a:b], v)
        torch.testing.assert_close(vectors[a:b, a:b], q)


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_split_state_dict_resumes_exactly(method):
    settings = dict(max_factor_dim=LIMIT, inverse_method=method, inverse_update_period=3, warm_refreshes=1,
                    damping=DAMPING)
    model = conv_model()
    x, y = batch(model)
    opt = natgrad.KFAC(model, **settings)

    def steps(m, o, n):
        for _ in range(n):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()

    steps(model, opt, 4)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    steps(model, opt, 5)
    resumed = conv_model()
    resumed.load_state_dict(saved_model)
    opt2 = natgrad.KFAC(resumed, **settings)
    opt2.load_state_dict(saved_opt)
    steps(resumed, opt2, 5)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_nonfinite_inputs_and_gradients_skip_a_split_layer():
    model = linear_model()
    x, y = batch(model)
    opt = natgrad.KFAC(model, max_factor_dim=LIMIT)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="activations or output gradients of layer '0'"):
        F.cross_entropy(model(torch.full_like(x, float("nan"))), y).backward()
        opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert opt.nonfinite_skips == {"0": 1}
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()  # finite: the layer moves
    assert not torch.equal(before[0], model[0].weight)
    moved = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.step()
    assert all(torch.equal(b, p) for b, p in zip(moved, model.parameters()))
    assert sum(opt.nonfinite_skips.values()) == 2


def test_describe_names_split_factors_and_the_limit():
    model = nn.Sequential(nn.Linear(12, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(4, 12, dtype=torch.float64)

    def described(limit):
        opt = natgrad.KFAC(model, max_factor_dim=limit)
        model(x).sum().backward()  # the hooks fire: describe() shows the blocks
        opt.step()
        return opt.describe()

    text = described(LIMIT)
    first, last = [line for line in text.splitlines() if line.startswith(("0.weight", "2.weight"))]
    assert "A 12 (+bias) > max_factor_dim 5: block-diagonal, 3 blocks of 4-5" in first
    assert "G 7 > max_factor_dim 5: block-diagonal, 2 blocks of 3-4" in first
    assert "A 7 (+bias) > max_factor_dim 5" in last and "G 3" not in last
    assert "block-diagonal" not in described(None)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "1024", True])
def test_invalid_max_factor_dim_is_named(bad):
    with pytest.raises(ValueError, match="max_factor_dim"):
        natgrad.KFAC(linear_model(), max_factor_dim=bad)


def test_inverse_cost_of_a_split_block_is_the_sum_of_its_blocks_cubes():
    model = linear_model()
    opt = natgrad.KFAC(model, max_factor_dim=LIMIT)
    block = opt.estimator.blocks[0]
    sizes = [b - a for a, b in block.a_ranges() + block.g_ranges()]
    assert sum(sizes) == 13 + 7
    assert block.inverse_cost() == sum(n**3 for n in sizes)
