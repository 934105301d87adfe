"""natgrad.ops.ekfac and kfac_precondition_ekfac against float64 loops over per-sample
gradients, opcheck, and the fault rule (a non-finite update leaves the diagonal unchanged)."""
from __future__ import annotations

import pytest
import torch

from natgrad import ops

OPS = torch.ops.natgrad
F64 = torch.float64


def _basis(d: int) -> torch.Tensor:
    """A random orthogonal matrix (the eigenvectors of a random PSD matrix)."""
    m = torch.randn(d, d + 2, dtype=F64)
    return torch.linalg.eigh(m @ m.T)[1].contiguous()


def _corrected(per_sample: list[torch.Tensor], vg: torch.Tensor, va: torch.Tensor | None, samples: int) -> torch.Tensor:
    """sum_i (V_Gᵀ dW_i V_A)² / samples over explicit per-sample gradients."""
    total = torch.zeros_like(per_sample[0])
    for dw in per_sample:
        rotated = vg.T @ dw if va is None else vg.T @ dw @ va
        total += rotated**2
    return total / samples


def ref_linear(x, g, vg, va, bias, scale):
    n, d_in, d_out = x.shape[0], x.shape[-1], g.shape[-1]
    passes = g.shape[0] // n
    x, g = x.double().reshape(n, -1, d_in), g.double().reshape(passes, n, -1, d_out)
    grads = []
    for p in range(passes):
        for i in range(n):
            rows = torch.cat([x[i], torch.ones(x.shape[1], 1, dtype=F64)], 1) if bias else x[i]
            grads.append(scale * sum(torch.outer(g[p, i, r], rows[r]) for r in range(x.shape[1])))
    return _corrected(grads, vg, va, n)


def ref_conv(x, g, vg, va, geom, bias, scale):
    (k, s, p, d), n = geom, x.shape[0]
    passes = g.shape[0] // n
    g = g.double().reshape(passes, n, *g.shape[1:])
    grads = []
    for q in range(passes):
        for i in range(n):
            gi = g[q, i:i + 1]
            w = torch.nn.grad.conv2d_weight(x[i:i + 1].double(), (g.shape[2], x.shape[1], *k), gi, s, p, d)
            w = w.reshape(g.shape[2], -1)
            grads.append(scale * (torch.cat([w, gi.sum((2, 3)).T], 1) if bias else w))
    return _corrected(grads, vg, va, n)


def ref_embedding(idx, g, vg, vocab, scale):
    n, dim = idx.shape[0], g.shape[-1]
    passes = g.shape[0] // n
    idx, g = idx.reshape(n, -1), g.double().reshape(passes, n, -1, dim)
    grads = []
    for p in range(passes):
        for i in range(n):
            dw = torch.zeros(dim, vocab, dtype=F64)
            for r in range(idx.shape[1]):
                dw[:, idx[i, r]] += scale * g[p, i, r]
            grads.append(dw)
    return _corrected(grads, vg, None, n)


LINEAR_CASES = [  # (input shape, passes)
    ((5, 4), 1),  # no positions: the one-GEMM path
    ((3, 4, 4), 1),  # sequence positions
    ((2, 3, 2, 4), 2),  # two position dims, two gradient passes
    ((1, 4), 3),
]


@pytest.mark.parametrize("shape,passes", LINEAR_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_diagonal_matches_per_sample_loop(shape, passes, bias):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=F64)
    g = torch.randn(passes * shape[0], *shape[1:-1], 3, dtype=F64)
    vg, va = _basis(3), _basis(4 + bias)
    expected = ref_linear(x, g, vg, va, bias, 2.5)
    old = torch.rand(3, 4 + bias, dtype=F64)
    diag = old.clone()
    ok = ops.linear_ekfac_diagonal_ema_(diag, x, g, vg, va, bias, 2.5, 0.75)
    assert ok.dtype == torch.bool and bool(ok)
    torch.testing.assert_close(diag, 0.75 * old + 0.25 * expected, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("geom", [
    ((3, 3), (1, 1), (0, 0), (1, 1)),
    ((3, 2), (2, 1), (1, 2), (1, 1)),
    ((2, 2), (1, 2), (2, 1), (2, 2)),
])
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_diagonal_matches_per_sample_loop(geom, bias):
    torch.manual_seed(1)
    k, s, p, d = geom
    x = torch.randn(3, 2, 7, 6, dtype=F64)
    out = torch.nn.functional.conv2d(x, torch.zeros(4, 2, *k, dtype=F64), None, s, p, d)
    g = torch.randn(2 * 3, 4, *out.shape[2:], dtype=F64)  # two passes
    d_a = 2 * k[0] * k[1] + bias
    vg, va = _basis(4), _basis(d_a)
    diag = torch.full((4, d_a), float("nan"), dtype=F64)  # decay 0 replaces even NaN
    assert bool(ops.conv2d_ekfac_diagonal_ema_(diag, x, g, vg, va, k, s, p, d, bias, 1.5, 0.0))
    torch.testing.assert_close(diag, ref_conv(x, g, vg, va, geom, bias, 1.5), rtol=1e-11, atol=1e-12)


def test_conv2d_diagonal_in_float32_matches_the_float64_loop():
    torch.manual_seed(2)
    x = torch.randn(4, 3, 6, 6)
    g = torch.randn(4, 5, 6, 6)
    vg, va = _basis(5), _basis(28)
    diag = torch.zeros(5, 28)
    ops.conv2d_ekfac_diagonal_ema_(diag, x, g, vg.float(), va.float(), 3, 1, 1, 1, True, 4.0, 0.0)
    expected = ref_conv(x, g, vg, va, ((3, 3), (1, 1), (1, 1), (1, 1)), True, 4.0)
    torch.testing.assert_close(diag.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,passes", [((6,), 1), ((3, 4), 1), ((2, 5), 2)])
def test_embedding_diagonal_matches_per_sample_loop(shape, passes):
    torch.manual_seed(3)
    idx = torch.randint(0, 4, shape)  # repeated indices within a sample sum before squaring
    g = torch.randn(passes * shape[0], *shape[1:], 3, dtype=F64)
    vg = _basis(3)
    old = torch.rand(3, 5, dtype=F64)
    diag = old.clone()
    assert bool(ops.embedding_ekfac_diagonal_ema_(diag, idx, g, vg, 2.0, 0.5))
    torch.testing.assert_close(diag, 0.5 * old + 0.5 * ref_embedding(idx, g, vg, 5, 2.0), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_a_non_finite_update_leaves_the_diagonal_unchanged(bad):
    x, g = torch.randn(4, 3, dtype=F64), torch.randn(4, 2, dtype=F64)
    g[1, 0] = float(bad)
    vg, va = _basis(2), _basis(4)
    old = torch.rand(2, 4, dtype=F64)
    diag = old.clone()
    assert not bool(ops.linear_ekfac_diagonal_ema_(diag, x, g, vg, va, True, 1.0, 0.5))
    assert torch.equal(diag, old)
    img = torch.randn(2, 1, 4, 4, dtype=F64)
    img[0, 0, 0, 0] = float(bad)
    cdiag = old[:, :2].clone()
    assert not bool(ops.conv2d_ekfac_diagonal_ema_(cdiag, img, torch.randn(2, 2, 4, 4, dtype=F64), vg, _basis(2),
                                                   1, 1, 0, 1, True, 1.0, 0.0))
    assert torch.equal(cdiag, old[:, :2])
    ediag = old.clone()
    assert not bool(ops.embedding_ekfac_diagonal_ema_(ediag, torch.tensor([0, 3, 1, 1]), g, vg, 1.0, 0.0))
    assert torch.equal(ediag, old)


@pytest.mark.parametrize("with_a", [True, False])
def test_precondition_ekfac_is_the_damped_diagonal_solve_in_the_basis(with_a):
    """P = V_G [(V_Gᵀ ∇W V_A) / (S + γ)] V_Aᵀ is (Q diag(S) Qᵀ + γI)⁻¹ vec(∇W), Q = V_G ⊗ V_A."""
    torch.manual_seed(4)
    vg, va = _basis(3), (_basis(4) if with_a else torch.eye(4, dtype=F64))
    s, grad = torch.rand(3, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    s[0, 1] = 0.0
    q = torch.kron(vg, va)  # row-major vec: vec(V_G X V_Aᵀ) = (V_G ⊗ V_A) vec(X)
    fisher = q @ torch.diag(s.reshape(-1)) @ q.T
    expected = torch.linalg.solve(fisher + 0.3 * torch.eye(12, dtype=F64), grad.reshape(-1)).reshape(3, 4)
    out = ops.kfac_precondition_ekfac(grad, vg, va if with_a else None, s, 0.3)
    torch.testing.assert_close(out, expected, rtol=1e-11, atol=1e-12)


def test_precondition_ekfac_rejects_nan_and_bad_shapes():
    vg, va = _basis(3), _basis(4)
    s = torch.rand(3, 4, dtype=F64)
    s[1, 1] = float("nan")
    with pytest.raises(RuntimeError, match="eigenvalues contains NaN or Inf"):
        ops.kfac_precondition_ekfac(torch.randn(3, 4, dtype=F64), vg, va, s, 0.1)
    with pytest.raises(RuntimeError, match=r"eigenvalues must have shape \[3, 4\]"):
        ops.kfac_precondition_ekfac(torch.randn(3, 4, dtype=F64), vg, va, torch.rand(4, 3, dtype=F64), 0.1)


@pytest.mark.parametrize("name,args,message", [
    ("linear_ekfac_diagonal_ema_", lambda: (torch.zeros(2, 4), torch.ones(3, 3), torch.ones(3, 2), torch.eye(2),
                                            torch.eye(4), True, 1.0, 1.5), "decay must be in [0, 1]"),
    ("linear_ekfac_diagonal_ema_", lambda: (torch.zeros(2, 3), torch.ones(3, 3), torch.ones(3, 2), torch.eye(2),
                                            torch.eye(4), True, 1.0, 0.5), "diagonal must have shape [2, 4]"),
    ("linear_ekfac_diagonal_ema_", lambda: (torch.zeros(2, 4), torch.ones(3, 3), torch.ones(4, 2), torch.eye(2),
                                            torch.eye(4), True, 1.0, 0.5), "whole number of passes"),
    ("linear_ekfac_diagonal_ema_", lambda: (torch.zeros(2, 4), torch.ones(3, 5, 3), torch.ones(3, 4, 2),
                                            torch.eye(2), torch.eye(4), True, 1.0, 0.5), "input's positions"),
    ("linear_ekfac_diagonal_ema_", lambda: (torch.zeros(2, 4), torch.ones(3, 3), torch.ones(3, 2),
                                            torch.eye(2, dtype=F64), torch.eye(4), True, 1.0, 0.5),
     "g_eigenvectors must have the same dtype as diagonal"),
    ("conv2d_ekfac_diagonal_ema_", lambda: (torch.zeros(2, 10), torch.ones(1, 1, 4, 4), torch.ones(1, 2, 3, 3),
                                            torch.eye(2), torch.eye(10), [3, 3], [1, 1], [0, 0], [1, 1], True, 1.0,
                                            0.5), "output positions"),
    ("embedding_ekfac_diagonal_ema_", lambda: (torch.zeros(2, 5), torch.ones(3, 2), torch.ones(3, 2, 2),
                                               torch.eye(2), 1.0, 0.5), "indices must have an integer dtype"),
    ("embedding_ekfac_diagonal_ema_", lambda: (torch.zeros(2, 5), torch.ones(3, 2, dtype=torch.long),
                                               torch.ones(3, 2, 2), torch.eye(2), 0.0, 0.5), "grad_scale"),
])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_arguments_raise_errors_naming_them(name, args, message, device):
    moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args()]
    with pytest.raises(RuntimeError) as info:
        getattr(OPS, name)(*moved)
    assert message in str(info.value)


def _opcheck_samples():
    torch.manual_seed(5)
    vg, va4, va3 = _basis(2), _basis(4), _basis(3)
    img, g_img = torch.randn(2, 1, 4, 4, dtype=F64), torch.randn(4, 2, 3, 3, dtype=F64)
    return [
        ("linear_ekfac_diagonal_ema_", (torch.rand(2, 4, dtype=F64), torch.randn(5, 3, dtype=F64),
                                        torch.randn(5, 2, dtype=F64), vg, va4, True, 2.0, 0.9)),
        ("linear_ekfac_diagonal_ema_", (torch.rand(2, 3, dtype=F64), torch.randn(2, 4, 3, dtype=F64),
                                        torch.randn(4, 4, 2, dtype=F64), vg, va3, False, 1.0, 0.0)),
        ("conv2d_ekfac_diagonal_ema_", (torch.rand(2, 5, dtype=F64), img, g_img, vg, _basis(5), [2, 2], [1, 1],
                                        [0, 0], [1, 1], True, 1.5, 0.5)),
        ("embedding_ekfac_diagonal_ema_", (torch.rand(2, 4, dtype=F64), torch.tensor([[0, 2], [1, 2]]),
                                           torch.randn(2, 2, 2, dtype=F64), vg, 1.0, 0.5)),
        ("kfac_precondition_ekfac", (torch.randn(2, 4, dtype=F64), vg, va4, torch.rand(2, 4, dtype=F64), 0.1)),
        ("kfac_precondition_ekfac", (torch.randn(2, 4, dtype=F64), vg, None, torch.rand(2, 4, dtype=F64), 0.0)),
    ]


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("sample", range(6))
def test_opcheck_ekfac_ops(sample, requires_grad):
    name, args = _opcheck_samples()[sample]
    if requires_grad:  # only what is not mutated; the preconditioner is differentiable in grad
        args = tuple(a.clone().requires_grad_(i == 0) if isinstance(a, torch.Tensor) and a.is_floating_point()
                     and name == "kfac_precondition_ekfac" else a for i, a in enumerate(args))
    torch.library.opcheck(getattr(OPS, name).default, args)


def test_gradcheck_precondition_ekfac():
    vg, va = _basis(2), _basis(3)
    s = torch.rand(2, 3, dtype=F64)
    grad = torch.randn(2, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.kfac_precondition_ekfac(t, vg, va, s, 0.2), (grad,))


@pytest.mark.parametrize("with_a", [True, False])
def test_rebase_is_the_old_matrix_diagonal_in_the_new_basis(with_a):
    torch.manual_seed(6)
    vg_old, vg = _basis(3), _basis(3)
    va_old, va = (_basis(4), _basis(4)) if with_a else (torch.eye(4, dtype=F64), torch.eye(4, dtype=F64))
    s = torch.rand(3, 4, dtype=F64)
    q_old, q = torch.kron(vg_old, va_old), torch.kron(vg, va)
    dense = q_old @ torch.diag(s.reshape(-1)) @ q_old.T
    expected = torch.diagonal(q.T @ dense @ q).reshape(3, 4)
    out = ops.ekfac_rebase(s, vg_old, vg, va_old if with_a else None, va if with_a else None)
    torch.testing.assert_close(out, expected, rtol=1e-11, atol=1e-12)
    same = ops.ekfac_rebase(s, vg, -vg, va if with_a else None, va if with_a else None)  # signs do not matter
    torch.testing.assert_close(same, s, rtol=1e-11, atol=1e-12)


def test_opcheck_rebase():
    vg, va = _basis(2), _basis(3)
    s = torch.rand(2, 3, dtype=F64)
    torch.library.opcheck(OPS.ekfac_rebase.default, (s, vg, _basis(2), va, _basis(3)))
    torch.library.opcheck(OPS.ekfac_rebase.default, (s, vg, _basis(2), None, None))
    with pytest.raises(RuntimeError, match="both be given or both be None"):
        ops.ekfac_rebase(s, vg, vg, va, None)
