"""Woodbury natural-gradient solve and the per-sample diagonal Fisher against dense and
torch.func references."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import natgrad
from natgrad import ops
from natgrad.ops import Rung

OPS = torch.ops.natgrad


def dense_solve(u, rhs, damping):
    p = u.shape[1]
    return torch.linalg.solve(u.T @ u / u.shape[0] + damping * torch.eye(p, dtype=u.dtype), rhs)


@pytest.mark.parametrize("n,p", [(1, 7), (5, 40), (30, 12)])
@pytest.mark.parametrize("k", [None, 3])
def test_woodbury_equals_dense_solve(n, p, k):
    u = torch.randn(n, p, dtype=torch.float64)
    rhs = torch.randn(p, dtype=torch.float64) if k is None else torch.randn(p, k, dtype=torch.float64)
    res = ops.woodbury_solve(u, rhs, 1e-2)
    assert int(res.rung) == Rung.NATIVE and res.solution.shape == rhs.shape
    torch.testing.assert_close(res.solution, dense_solve(u, rhs, 1e-2), rtol=1e-8, atol=1e-9)


def test_woodbury_float32_and_non_contiguous():
    u = torch.randn(50, 16, dtype=torch.float64).T  # [16, 50] non-contiguous
    rhs = torch.randn(3, 50, dtype=torch.float64).T
    expected = dense_solve(u, rhs, 0.1)
    torch.testing.assert_close(ops.woodbury_solve(u, rhs, 0.1).solution, expected, rtol=1e-9, atol=1e-10)
    got32 = ops.woodbury_solve(u.float(), rhs.float(), 0.1).solution
    torch.testing.assert_close(got32.double(), expected, rtol=1e-4, atol=1e-4)


def test_woodbury_ladder_rung_is_reported():
    u = torch.randn(6, 20, dtype=torch.float64)
    v = torch.randn(20, dtype=torch.float64)
    natgrad._C._force_ladder_failures(1)  # the n×n system is float64: next rung is jitter
    res = ops.woodbury_solve(u, v, 1e-1)
    assert int(res.rung) == Rung.JITTER
    torch.testing.assert_close(res.solution, dense_solve(u, v, 1e-1), rtol=1e-5, atol=1e-6)
    natgrad._C._force_ladder_failures(20)
    res = ops.woodbury_solve(u, v, 1e-1)
    assert int(res.rung) == Rung.DIAGONAL and torch.isfinite(res.solution).all()


def test_woodbury_errors_name_the_argument():
    u = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="rhs must have shape"):
        ops.woodbury_solve(u, torch.randn(5), 0.1)
    with pytest.raises(RuntimeError, match="damping must be a finite number > 0"):
        ops.woodbury_solve(u, torch.randn(6), 0.0)
    with pytest.raises(RuntimeError, match="per_sample_grads holds no samples"):
        ops.woodbury_solve(torch.randn(0, 6), torch.randn(6), 0.1)
    bad = u.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(RuntimeError, match="per_sample_grads contains NaN or Inf"):
        ops.woodbury_solve(bad, torch.randn(6), 0.1)
    with pytest.raises(RuntimeError, match="rhs contains NaN or Inf"):
        ops.woodbury_solve(u, torch.full((6,), float("inf")), 0.1)
    with pytest.raises(RuntimeError, match="rhs must have the same dtype"):
        ops.woodbury_solve(u, torch.randn(6, dtype=torch.float64), 0.1)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_and_gradcheck_woodbury(requires_grad):
    u = torch.randn(4, 6, dtype=torch.float64, requires_grad=requires_grad)
    for rhs in (torch.randn(6, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)):
        torch.library.opcheck(OPS.woodbury_solve.default, (u, rhs.requires_grad_(requires_grad), 0.3))
        if requires_grad:
            assert torch.autograd.gradcheck(lambda a, b: ops.woodbury_solve(a, b, 0.3).solution, (u, rhs))


def per_sample_sq_grads(layer, x, y, loss_of_output):
    """Mean over samples of squared per-sample gradients, by torch.func (the reference)."""
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p, xi, yi):
        return loss_of_output(functional_call(layer, p, (xi[None],)), yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    w = g["weight"].pow(2).mean(0)
    return torch.cat([w, g["bias"].pow(2).mean(0)[:, None]], 1)


def captured(layer, x, loss):
    """The layer's input and the gradient w.r.t. its output under a batch-mean loss."""
    out = layer(x)
    out.retain_grad()
    loss(out).backward()
    return x, out.grad


def test_linear_diag_fisher_equals_per_sample_gradients_2d():
    layer = torch.nn.Linear(6, 4).double()
    x = torch.randn(32, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (32,))
    a, g = captured(layer, x, lambda out: F.cross_entropy(out, y))
    got = ops.linear_diag_fisher(a, g, bias=True, grad_scale=32.0)  # batch-mean loss: scale N
    expected = per_sample_sq_grads(layer, x, y, F.cross_entropy)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ops.linear_diag_fisher(a, g, False, 32.0), expected[:, :-1])


def test_linear_diag_fisher_with_positions_equals_per_sample_gradients():
    layer = torch.nn.Linear(5, 3).double()
    x = torch.randn(10, 7, 5, dtype=torch.float64)  # 10 samples, 7 positions each
    y = torch.randn(10, 7, 3, dtype=torch.float64)

    def sample_sum_mse(out, target):  # per-sample loss sums over positions
        return (out - target).pow(2).sum() / out.shape[0]

    a, g = captured(layer, x, lambda out: sample_sum_mse(out, y))
    got = ops.linear_diag_fisher(a, g, bias=True, grad_scale=10.0)
    expected = per_sample_sq_grads(layer, x, y, sample_sum_mse)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_linear_diag_fisher_is_not_the_squared_batch_gradient():
    layer = torch.nn.Linear(6, 4).double()
    x = torch.randn(64, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (64,))
    a, g = captured(layer, x, lambda out: F.cross_entropy(out, y))
    per_sample = ops.linear_diag_fisher(a, g, True, 64.0)
    batch_sq = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1).pow(2)
    assert (per_sample.sum() / batch_sq.sum()) > 5  # averaging gradients first cancels most


def test_linear_diag_fisher_errors_and_opcheck():
    with pytest.raises(RuntimeError, match="grad_output must have the leading dims of input"):
        ops.linear_diag_fisher(torch.randn(4, 3), torch.randn(5, 2))
    with pytest.raises(RuntimeError, match=r"input must have at least 2 dimensions"):
        ops.linear_diag_fisher(torch.randn(3), torch.randn(2))
    a, g = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    torch.library.opcheck(OPS.linear_diag_fisher.default, (a, g, True, 5.0))
    torch.library.opcheck(OPS.linear_diag_fisher.default, (a[:, None].expand(5, 4, 3), g[:, None].expand(5, 4, 2), False, 1.0))


def svd_reference(u: torch.Tensor, rhs: torch.Tensor, damping: float) -> torch.Tensor:
    """(UᵀU/n + λI)⁻¹ rhs in float64 through the SVD of U: exact at any scale of U (the dense
    matrix of U ~ 1e30 has condition ~1e61 and cannot be solved directly)."""
    u, rhs = u.double(), rhs.double()
    _, s, vh = torch.linalg.svd(u, full_matrices=False)
    c = vh @ rhs
    inside = (s**2 / u.shape[0] + damping)[:, None] if rhs.dim() == 2 else s**2 / u.shape[0] + damping
    return vh.T @ (c / inside) + (rhs - vh.T @ c) / damping


@pytest.mark.parametrize("scale", [1.0, 1e20, 1e30, 1e37])
def test_woodbury_float32_rows_near_overflow_match_float64_reference(scale):
    """U Uᵀ of float32 rows ~1e30 overflows float32: the op scales U and rhs by powers of two and
    solves the n×n system in float64, so the answer stays correct and the rung honest (no fall
    to the diagonal rung's rhs/λ)."""
    u = (torch.randn(8, 50, dtype=torch.float64) * scale).float()
    rhs = torch.randn(50, 2)
    res = ops.woodbury_solve(u, rhs, 0.1)
    assert int(res.rung) == Rung.NATIVE and res.solution.dtype == torch.float32
    expected = svd_reference(u, rhs, 0.1)
    torch.testing.assert_close(res.solution.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_linear_diag_fisher_rejects_non_finite_inputs_naming_them(bad):
    a, g = torch.randn(6, 2, 3), torch.randn(6, 2, 4)
    for name in ("input", "grad_output"):
        args = {"input": a.clone(), "grad_output": g.clone()}
        args[name][2, 1, 0] = bad
        with pytest.raises(RuntimeError, match=f"^{name} contains NaN or Inf"):
            ops.linear_diag_fisher(*args.values())
        with pytest.raises(RuntimeError, match=f"^{name} contains NaN or Inf"):
            ops.linear_diag_fisher(args["input"][:, 1], args["grad_output"][:, 1])


def test_linear_diag_fisher_with_zero_features():
    a, g = torch.randn(5, 3, 0, dtype=torch.float64), torch.randn(5, 3, 2, dtype=torch.float64)
    out = ops.linear_diag_fisher(a, g, True, 1.0)
    assert out.shape == (2, 1)
    torch.testing.assert_close(out[:, 0], g.sum(1).square().mean(0))
