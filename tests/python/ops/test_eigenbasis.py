"""natgrad.ops.eigenbasis against plain float64 formulas."""
from __future__ import annotations

import torch

from natgrad.ops import eigenbasis as eb


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q


def test_rotation_is_q_g_transpose_x_q_a_and_rotate_back_inverts_it():
    q_g, q_a = _orthogonal(4, 0), _orthogonal(3, 1)
    x = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(eb.rotate(x, q_g, q_a), q_g.T @ x @ q_a, rtol=0, atol=1e-14)
    torch.testing.assert_close(eb.rotate(x, None, q_a), x @ q_a, rtol=0, atol=1e-14)
    torch.testing.assert_close(eb.rotate_back(eb.rotate(x, q_g, q_a), q_g, q_a), x, rtol=0, atol=1e-14)
    assert eb.rotate(x.float(), q_g, None).dtype == torch.float32


def test_first_moment_rebase_equals_rotating_the_moment_of_the_weight_coordinates():
    old_g, old_a, new_g, new_a = _orthogonal(4, 2), _orthogonal(3, 3), _orthogonal(4, 4), _orthogonal(3, 5)
    m = torch.randn(4, 3, dtype=torch.float64)  # in the weight's coordinates
    carried = eb.rebase_first_moment(old_g.T @ m @ old_a, eb.basis_change(old_g, new_g), eb.basis_change(old_a, new_a))
    torch.testing.assert_close(carried, new_g.T @ m @ new_a, rtol=0, atol=1e-13)
    from_identity = eb.rebase_first_moment(m, eb.basis_change(None, new_g), eb.basis_change(None, None))
    torch.testing.assert_close(from_identity, new_g.T @ m, rtol=0, atol=1e-13)


def test_second_moment_follows_its_eigenvectors_through_a_reordering_and_sign_flips():
    old = _orthogonal(4, 6)
    order = torch.tensor([2, 0, 3, 1])
    new = old[:, order] * torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    new = torch.linalg.qr(new + 1e-3 * torch.randn(4, 4, dtype=torch.float64)).Q  # a small rotation too
    v = torch.rand(4, 2, dtype=torch.float64)
    out = eb.rebase_second_moment(v, eb.basis_change(old, new), None)
    assert torch.equal(out, v[order])


def test_adam_direction_is_the_bias_corrected_adamw_step():
    m, v = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    grads = [torch.randn(3, dtype=torch.float64) for _ in range(3)]
    for g in grads:
        eb.adam_moments_(m, v, g, 0.9, 0.99)
    m_ref = sum(0.1 * 0.9 ** (2 - i) * g for i, g in enumerate(grads))
    v_ref = sum(0.01 * 0.99 ** (2 - i) * g * g for i, g in enumerate(grads))
    expected = (m_ref / (1 - 0.9 ** 3)) / ((v_ref / (1 - 0.99 ** 3)).sqrt() + 1e-8)
    torch.testing.assert_close(eb.adam_direction(m, v, 3, 0.9, 0.99, 1e-8), expected, rtol=1e-13, atol=0)


def test_shampoo_factors_are_the_ema_of_both_gram_matrices():
    left, right = torch.eye(4, dtype=torch.float64), None
    x = torch.randn(4, 3, dtype=torch.float64)
    eb.shampoo_factors_ema_(left, right, x, 0.9)
    torch.testing.assert_close(left, 0.9 * torch.eye(4, dtype=torch.float64) + 0.1 * x @ x.T, rtol=0, atol=1e-14)
    right = torch.zeros(3, 3, dtype=torch.float64)
    eb.shampoo_factors_ema_(None, right, x, 0.5)
    torch.testing.assert_close(right, 0.5 * x.T @ x, rtol=0, atol=1e-14)
