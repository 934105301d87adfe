"""damped_eigh's fallback ladder and K-FAC preconditioning against dense float64 references."""
from __future__ import annotations

import pytest
import torch

import natgrad
from natgrad import ops
from natgrad.ops import Rung

from support import random_psd

OPS = torch.ops.natgrad


def reconstruct(evals, evecs):
    return evecs @ torch.diag_embed(evals) @ evecs.mT


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [(), (3,)])
def test_damped_eigh_reconstructs_factor(dtype, batch):
    a = random_psd(6, dtype=dtype, batch=batch)
    res = ops.damped_eigh(a)
    assert int(res.rung) == Rung.NATIVE
    assert res.eigenvalues.dtype == dtype and res.eigenvectors.is_contiguous()
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(reconstruct(res.eigenvalues, res.eigenvectors), a, rtol=tol, atol=tol)


def test_damped_eigh_adds_damping_and_reads_both_triangles():
    a = random_psd(5)
    skew = torch.randn(5, 5, dtype=torch.float64)
    res = ops.damped_eigh(a + (skew - skew.T), damping=0.5)  # symmetrised: the skew part cancels
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(a) + 0.5)


def test_singular_factor_gets_clamped_nonnegative_eigenvalues():
    a = random_psd(8, rank=2)  # batch smaller than dimension: rank 2 of 8
    res = ops.damped_eigh(a)
    assert (res.eigenvalues >= 0).all()
    torch.testing.assert_close(reconstruct(res.eigenvalues, res.eigenvectors), a, rtol=0, atol=1e-12)
    zero = ops.damped_eigh(torch.zeros(4, 4))
    assert torch.equal(zero.eigenvalues, torch.zeros(4))


def test_ill_conditioned_float32_factor_is_finite():
    q, _ = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64))
    a = (q @ torch.diag(torch.logspace(-12, 0, 30, dtype=torch.float64)) @ q.T).float()
    res = ops.damped_eigh(a)
    assert torch.isfinite(res.eigenvalues).all() and torch.isfinite(res.eigenvectors).all()
    assert (res.eigenvalues >= 0).all()
    torch.testing.assert_close(reconstruct(res.eigenvalues, res.eigenvectors), a, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "dtype,failures,rung",
    [
        (torch.float32, 1, Rung.FLOAT64),
        (torch.float32, 2, Rung.JITTER),
        (torch.float64, 1, Rung.JITTER),
        (torch.float64, 5, Rung.JITTER),
        (torch.float32, 11, Rung.DIAGONAL),
        (torch.float64, 10, Rung.DIAGONAL),
    ],
)
def test_forced_failures_climb_the_ladder_and_stay_correct(dtype, failures, rung):
    a = random_psd(6, dtype=dtype)
    natgrad._C._force_ladder_failures(failures)
    res = ops.damped_eigh(a)
    assert natgrad._C._pending_ladder_failures() == 0
    assert int(res.rung) == rung
    assert torch.isfinite(res.eigenvalues).all() and torch.isfinite(res.eigenvectors).all()
    if rung == Rung.DIAGONAL:
        torch.testing.assert_close(res.eigenvalues, torch.diagonal(a))
        torch.testing.assert_close(res.eigenvectors, torch.eye(6, dtype=dtype))
    else:  # jitter is at most 1e-8 * 10^k * mean|diag|: the factor is recovered up to it
        first_jitter_attempt = 2 if dtype == torch.float32 else 1  # float64 skips rung 1
        k = max(failures - first_jitter_attempt, 0)
        jitter = 1e-8 * 10**k * torch.diagonal(a).abs().mean().item()
        torch.testing.assert_close(
            reconstruct(res.eigenvalues, res.eigenvectors), a, rtol=0, atol=1e-5 + 2 * jitter
        )


def test_nan_factor_is_rejected_with_a_clear_error():
    a = torch.eye(3)
    a[1, 1] = float("nan")
    with pytest.raises(RuntimeError, match="factor contains NaN or Inf"):
        ops.damped_eigh(a)
    with pytest.raises(RuntimeError, match="factor must be a square matrix"):
        ops.damped_eigh(torch.ones(2, 3))
    with pytest.raises(RuntimeError, match="damping must be a finite number >= 0"):
        ops.damped_eigh(torch.eye(2), -1.0)


def kfac_problem(m=3, n=4, batch=()):
    g = random_psd(m, batch=batch)
    a = random_psd(n, batch=batch)
    grad = torch.randn(*batch, m, n, dtype=torch.float64)
    return g, a, grad


def dense_natural_gradient(g, a, grad, damping):
    """(A ⊗ G + γI)⁻¹ vec(∇W) with row-major vec: (G ⊗ A) vec_r(W) = vec_r(G W A)."""
    m, n = grad.shape
    dense = torch.kron(g, a) + damping * torch.eye(m * n, dtype=g.dtype)
    return torch.linalg.solve(dense, grad.reshape(-1)).reshape(m, n)


@pytest.mark.parametrize("damping", [1e-3, 0.5])
def test_eigen_preconditioning_equals_dense_damped_solve(damping):
    g, a, grad = kfac_problem()
    eg, ea = ops.damped_eigh(g), ops.damped_eigh(a)
    out = ops.kfac_precondition_eigen(grad, eg.eigenvalues, eg.eigenvectors, ea.eigenvalues, ea.eigenvectors, damping)
    torch.testing.assert_close(out, dense_natural_gradient(g, a, grad, damping), rtol=1e-9, atol=1e-10)


def pi_reference(g, a, grad, damping):
    pi = ((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0])).sqrt()
    root = damping**0.5
    # Martens & Grosse (2015), sec. 6.3: A + π√γ I and G + √γ/π I
    g_inv = torch.linalg.inv(g + root / pi * torch.eye(g.shape[0], dtype=g.dtype))
    a_inv = torch.linalg.inv(a + pi * root * torch.eye(a.shape[0], dtype=a.dtype))
    return g_inv @ grad @ a_inv


def test_pi_corrected_eigen_and_inverse_forms_equal_reference():
    g, a, grad = kfac_problem()
    eg, ea = ops.damped_eigh(g), ops.damped_eigh(a)
    expected = pi_reference(g, a, grad, 0.1)
    eigen = ops.kfac_precondition_eigen(grad, *eg[:2], *ea[:2], 0.1, pi_correction=True)
    inv = ops.kfac_damped_inverses(g, a, 0.1, pi_correction=True)
    assert int(inv.rung) == Rung.NATIVE
    inverse = ops.kfac_precondition_inverse(grad, inv.g_inverse, inv.a_inverse)
    torch.testing.assert_close(eigen, expected, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(inverse, expected, rtol=1e-9, atol=1e-10)
    plain = ops.kfac_damped_inverses(g, a, 0.1, pi_correction=False)
    torch.testing.assert_close(plain.g_inverse, torch.linalg.inv(g + 0.1**0.5 * torch.eye(3, dtype=g.dtype)))


def test_batched_preconditioning_equals_per_layer():
    g, a, grad = kfac_problem(batch=(4,))
    eg, ea = ops.damped_eigh(g), ops.damped_eigh(a)
    batched = ops.kfac_precondition_eigen(grad, *eg[:2], *ea[:2], 0.01, pi_correction=True)
    inv = ops.kfac_damped_inverses(g, a, 0.01, pi_correction=True)
    batched_inv = ops.kfac_precondition_inverse(grad, inv.g_inverse, inv.a_inverse)
    for i in range(4):
        torch.testing.assert_close(batched[i], pi_reference(g[i], a[i], grad[i], 0.01))
        torch.testing.assert_close(batched_inv[i], pi_reference(g[i], a[i], grad[i], 0.01))


def test_damped_inverses_ladder_is_reported_and_correct():
    g, a, grad = kfac_problem()
    natgrad._C._force_ladder_failures(1)  # float64 input: first failure goes to jitter
    inv = ops.kfac_damped_inverses(g, a, 0.1)
    assert int(inv.rung) == Rung.JITTER
    torch.testing.assert_close(inv.g_inverse, torch.linalg.inv(g + 0.1**0.5 * torch.eye(3, dtype=g.dtype)), rtol=1e-6, atol=1e-6)


def test_preconditioning_shape_errors_name_the_argument():
    g, a, grad = kfac_problem()
    eg, ea = ops.damped_eigh(g), ops.damped_eigh(a)
    with pytest.raises(RuntimeError, match="a_eigenvectors must have shape"):
        ops.kfac_precondition_eigen(grad, *eg[:2], *eg[:2], 0.1)
    with pytest.raises(RuntimeError, match="g_eigenvalues must have the same dtype"):
        ops.kfac_precondition_eigen(grad, eg[0].float(), eg[1], *ea[:2], 0.1)
    with pytest.raises(RuntimeError, match="damping must be a finite number > 0"):
        ops.kfac_damped_inverses(g, a, 0.0)


def test_opcheck_linalg_ops():
    g, a, grad = kfac_problem()
    eg, ea = ops.damped_eigh(g), ops.damped_eigh(a)
    torch.library.opcheck(OPS.damped_eigh.default, (g, 0.1))
    torch.library.opcheck(OPS.kfac_damped_inverses.default, (g, a, 0.1, True))
    for rg in (False, True):
        x = grad.clone().requires_grad_(rg)
        torch.library.opcheck(OPS.kfac_precondition_eigen.default, (x, *eg[:2], *ea[:2], 0.1, False))
        inv = ops.kfac_damped_inverses(g, a, 0.1)
        args = (x, inv.g_inverse.clone().requires_grad_(rg), inv.a_inverse.clone().requires_grad_(rg))
        torch.library.opcheck(OPS.kfac_precondition_inverse.default, args)


def test_gradcheck_preconditioning():
    g, a, grad = kfac_problem()
    eg, ea = ops.damped_eigh(g), ops.damped_eigh(a)
    x = grad.clone().requires_grad_()
    for pi in (False, True):
        assert torch.autograd.gradcheck(lambda t: ops.kfac_precondition_eigen(t, *eg[:2], *ea[:2], 0.2, pi), (x,))
    inv = ops.kfac_damped_inverses(g, a, 0.2)
    args = (x, inv.g_inverse.clone().requires_grad_(), inv.a_inverse.clone().requires_grad_())
    assert torch.autograd.gradcheck(ops.kfac_precondition_inverse, args)


def test_non_differentiable_ops_refuse_backward():
    g = random_psd(3).requires_grad_()
    with pytest.raises(RuntimeError, match="damped_eigh is not differentiable"):
        ops.damped_eigh(g).eigenvalues.sum().backward()
    eg = ops.damped_eigh(g.detach())
    vecs = eg.eigenvectors.clone().requires_grad_()
    out = ops.kfac_precondition_eigen(torch.randn(3, 3, dtype=torch.float64), eg.eigenvalues, vecs, eg.eigenvalues, eg.eigenvectors, 0.1)
    with pytest.raises(RuntimeError, match="differentiable with respect to grad only"):
        out.sum().backward()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_preconditioning_rejects_non_finite_inputs_naming_them(bad):
    g, a, grad = kfac_problem()
    eg, ea = ops.damped_eigh(g), ops.damped_eigh(a)
    inv = ops.kfac_damped_inverses(g, a, 0.1)

    def spoiled(t):
        t = t.clone()
        t.view(-1)[1] = bad
        return t

    eigen_args = {"grad": grad, "g_eigenvalues": eg[0], "g_eigenvectors": eg[1],
                  "a_eigenvalues": ea[0], "a_eigenvectors": ea[1]}
    for name in eigen_args:
        args = {**eigen_args, name: spoiled(eigen_args[name])}
        with pytest.raises(RuntimeError, match=f"^{name} contains NaN or Inf"):
            ops.kfac_precondition_eigen(*args.values(), 0.1)
    inverse_args = {"grad": grad, "g_inverse": inv.g_inverse, "a_inverse": inv.a_inverse}
    for name in inverse_args:
        args = {**inverse_args, name: spoiled(inverse_args[name])}
        with pytest.raises(RuntimeError, match=f"^{name} contains NaN or Inf"):
            ops.kfac_precondition_inverse(*args.values())
    with pytest.raises(RuntimeError, match="^a_factor contains NaN or Inf"):
        ops.kfac_damped_inverses(g, spoiled(a), 0.1)


def test_preconditioning_overflow_of_finite_inputs_is_reported_as_such():
    grad = torch.full((2, 2), 3e38)
    eye = torch.eye(2)
    with pytest.raises(RuntimeError, match="overflowed Float although every input is finite"):
        ops.kfac_precondition_inverse(grad, 2 * eye, eye)


def diagonal_a_problem(batch=()):
    torch.manual_seed(3)
    g = random_psd(4, batch=batch)
    a = torch.rand(*batch, 6, dtype=torch.float64) + 0.1  # token frequencies
    return g, a, torch.randn(*batch, 4, 6, dtype=torch.float64)


@pytest.mark.parametrize("damping", [1e-3, 0.5])
def test_diagonal_a_preconditioning_equals_dense_damped_solve(damping):
    g, a, grad = diagonal_a_problem()
    eg = ops.damped_eigh(g)
    out = ops.kfac_precondition_diagonal_a(grad, a, eg.eigenvalues, eg.eigenvectors, damping)
    torch.testing.assert_close(out, dense_natural_gradient(g, torch.diag(a), grad, damping), rtol=1e-9, atol=1e-10)


def test_pi_corrected_diagonal_a_equals_factored_damping():
    g, a, grad = diagonal_a_problem()
    eg = ops.damped_eigh(g)
    out = ops.kfac_precondition_diagonal_a(grad, a, eg.eigenvalues, eg.eigenvectors, 0.1, pi_correction=True)
    torch.testing.assert_close(out, pi_reference(g, torch.diag(a), grad, 0.1), rtol=1e-9, atol=1e-10)
    # batched: each element its own π
    g2, a2, grad2 = diagonal_a_problem((2,))
    eg2 = ops.damped_eigh(g2)
    batched = ops.kfac_precondition_diagonal_a(grad2, a2, *eg2[:2], 0.1, pi_correction=True)
    for i in range(2):
        torch.testing.assert_close(batched[i], pi_reference(g2[i], torch.diag(a2[i]), grad2[i], 0.1), rtol=1e-9, atol=1e-10)


def test_diagonal_a_clamps_frequencies_skips_zero_denominators_and_poisons_inf():
    g, a, grad = diagonal_a_problem()
    eg = ops.damped_eigh(g)
    a[2], a[4] = -1.0, 0.0  # clamped at 0: with no damping those columns have no curvature
    out = ops.kfac_precondition_diagonal_a(grad, a, *eg[:2], 0.0)
    vecs = eg.eigenvectors
    expected = vecs @ ((vecs.mT @ grad) / (eg.eigenvalues[:, None] * a.clamp_min(0)[None, :]).where(a.clamp_min(0)[None, :] > 0, 1.0))
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out[:, 2], grad[:, 2], rtol=1e-9, atol=1e-10)  # left unscaled
    a[0] = float("inf")  # would vanish as x / Inf = 0: the whole result is NaN instead
    assert ops.kfac_precondition_diagonal_a(grad, a, *eg[:2], 0.1).isnan().all()


def test_opcheck_and_gradcheck_diagonal_a():
    g, a, grad = diagonal_a_problem()
    eg = ops.damped_eigh(g)
    for rg in (False, True):
        for pi in (False, True):
            x = grad.clone().requires_grad_(rg)
            torch.library.opcheck(OPS.kfac_precondition_diagonal_a.default, (x, a, *eg[:2], 0.1, pi))
    x = grad.clone().requires_grad_()
    for pi in (False, True):
        assert torch.autograd.gradcheck(lambda t: ops.kfac_precondition_diagonal_a(t, a, *eg[:2], 0.2, pi), (x,))
    with pytest.raises(RuntimeError, match="differentiable with respect to grad only"):
        ops.kfac_precondition_diagonal_a(x, a.clone().requires_grad_(), *eg[:2], 0.2).sum().backward()
