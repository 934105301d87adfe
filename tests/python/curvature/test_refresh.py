"""Warm-started curvature refreshes (natgrad.curvature.refresh) and π-corrected damping in
natgrad.KFAC, against float64 references (torch.linalg.eigh / inv, the Martens & Grosse formula)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.curvature import refresh

DT = torch.float64


def spread_psd(n: int, seed: int, low: float = 0.05, high: float = 5.0) -> torch.Tensor:
    """A PSD matrix with well-separated eigenvalues (geometric from ``low`` to ``high``)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT)).Q
    values = torch.logspace(math.log10(low), math.log10(high), n, dtype=DT)
    return q @ torch.diag(values) @ q.T


def test_warm_eigh_iterated_converges_to_the_exact_eigendecomposition():
    factor = spread_psd(12, seed=1)
    gen = torch.Generator().manual_seed(2)
    values = torch.rand(12, generator=gen, dtype=DT)
    vectors = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=DT)).Q
    for _ in range(300):
        values, vectors = refresh.warm_eigh(factor, values, vectors)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(12, dtype=DT), rtol=0, atol=1e-12)
    exact = torch.linalg.eigvalsh(factor)
    torch.testing.assert_close(values.sort().values, exact, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, factor, rtol=0, atol=1e-8)


def test_warm_eigh_keeps_an_exact_decomposition_and_stays_orthonormal_on_a_rank_deficient_factor():
    factor = spread_psd(8, seed=3)
    values, vectors = torch.linalg.eigh(factor)
    new_values, new_vectors = refresh.warm_eigh(factor, values, vectors)
    torch.testing.assert_close(new_vectors @ torch.diag(new_values) @ new_vectors.T, factor, rtol=0, atol=1e-12)
    x = torch.randn(8, 3, dtype=DT)
    low_rank = x @ x.T  # rank 3: F V has 5 zero columns
    v, q = refresh.warm_eigh(low_rank, values, vectors)
    torch.testing.assert_close(q.T @ q, torch.eye(8, dtype=DT), rtol=0, atol=1e-12)
    assert bool((v >= 0).all()) and torch.isfinite(v).all()


def test_newton_schulz_from_a_close_start_matches_the_inverse_and_declines_a_far_one():
    matrix = spread_psd(10, seed=4) + 0.1 * torch.eye(10, dtype=DT)
    exact = torch.linalg.inv(matrix)
    start = torch.linalg.inv(matrix + 0.02 * spread_psd(10, seed=5))
    r0 = float(torch.linalg.matrix_norm(torch.eye(10, dtype=DT) - matrix @ start))
    assert 0.01 < r0 < 0.5
    for iterations in (1, 2, 3):
        out = refresh.newton_schulz_inverse(matrix, start, iterations)
        residual = float(torch.linalg.matrix_norm(torch.eye(10, dtype=DT) - matrix @ out))
        assert residual <= max(r0 ** (2**iterations) * 1.01, 1e-13)  # (I - M X_k) = (I - M X_0)^(2^k)
    torch.testing.assert_close(refresh.newton_schulz_inverse(matrix, start, 4), exact, rtol=1e-9, atol=1e-11)
    assert refresh.newton_schulz_inverse(matrix, torch.zeros(10, 10, dtype=DT)) is None
    assert refresh.newton_schulz_inverse(matrix, torch.full((10, 10), math.nan, dtype=DT)) is None


def test_factored_shifts_follow_martens_and_grosse():
    g, a = spread_psd(3, seed=6) * 1e-4, spread_psd(5, seed=7) * 10.0  # a small G, a large A
    pi = math.sqrt((torch.trace(a) / 5) / (torch.trace(g) / 3))
    dg, da = refresh.factored_shifts(g, a, 0.04, True)
    assert dg == pytest.approx(0.2 / pi, rel=1e-12) and da == pytest.approx(0.2 * pi, rel=1e-12)
    assert dg < 0.2 < da  # the small factor gets the small shift
    assert refresh.factored_shifts(g, a, 0.04, False) == pytest.approx((0.2, 0.2))


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).to(DT)


def batches(count: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 6, generator=gen, dtype=DT), torch.randint(0, 4, (32,), generator=gen))
            for _ in range(count)]


def train(opt, model, data) -> None:
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_inverse_method_defaults_to_pi_corrected_damping():
    """After training, every block's inverses are (G + √γ/π I)⁻¹ and (A + π√γ I)⁻¹ of its
    current factors (float64 reference), not √γ on each factor."""
    model = mlp()
    opt = natgrad.KFAC(model, lr=0.1, damping=0.03, inverse_method="inverse", inverse_update_period=1)
    assert opt.pi_correction is True and natgrad.KFAC(mlp(), inverse_method="eigen").pi_correction is False
    train(opt, model, [(4 * x, y) for x, y in batches(3)])  # large inputs: A far larger than G
    pis = []
    for block in opt.estimator.blocks:
        A, G = block.state["A"], block.state["G"]
        pi = math.sqrt((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0]))
        pis.append(pi)
        root = math.sqrt(0.03)
        torch.testing.assert_close(block.state["g_inverse"], torch.linalg.inv(G + root / pi * torch.eye(G.shape[0], dtype=DT)))
        torch.testing.assert_close(block.state["a_inverse"], torch.linalg.inv(A + root * pi * torch.eye(A.shape[0], dtype=DT)))
    assert max(pis) > 3  # far from 1: the correction matters


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_warm_refreshes_follow_the_schedule_and_stay_close_to_exact(method, monkeypatch):
    calls = []
    for name in ("warm_eigh", "newton_schulz_inverse"):
        real = getattr(refresh, name)
        monkeypatch.setattr(refresh, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    model = mlp()
    kwargs = dict(lr=0.05, damping=0.01, inverse_method=method, inverse_update_period=2, kl_clip=None)
    opt = natgrad.KFAC(model, warm_refreshes=2, **kwargs)
    data = batches(12)
    per_refresh = []
    for i in range(0, 12, 2):  # one refresh per two steps: exact, warm, warm, exact, warm, warm
        before = len(calls)
        train(opt, model, data[i:i + 2])
        per_refresh.append(len(calls) - before)
    assert [n > 0 for n in per_refresh] == [False, True, True, False, True, True]
    # the warm preconditioner against the exact one of the same factors
    for block in opt.estimator.blocks:
        grad = torch.randn(block.g_dim(), block.a_dim(), dtype=DT)
        warm = block.precondition(grad, 0.01, opt.pi_correction)
        block.update_inverse(method, 0.01, opt.pi_correction)
        exact = block.precondition(grad, 0.01, opt.pi_correction)
        assert float((warm - exact).norm() / exact.norm()) < 0.25  # benchmarks/kfac_refresh.py measures it


def test_warm_refresh_state_dict_restores_training_exactly():
    data = batches(10, seed=3)
    model = mlp()
    opt = natgrad.KFAC(model, lr=0.05, inverse_update_period=2, warm_refreshes=3, kl_clip=1e-3)
    train(opt, model, data[:5])
    state, params = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in model.parameters()]
    train(opt, model, data[5:])
    expected = [p.detach().clone() for p in model.parameters()]
    model2 = mlp()
    with torch.no_grad():
        for p, v in zip(model2.parameters(), params):
            p.copy_(v)
    opt2 = natgrad.KFAC(model2, lr=0.05, inverse_update_period=2, warm_refreshes=3, kl_clip=1e-3)
    opt2.load_state_dict(state)
    train(opt2, model2, data[5:])
    for p, e in zip(model2.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_warm_refreshes_is_validated(bad):
    with pytest.raises(ValueError, match="warm_refreshes"):
        natgrad.KFAC(mlp(), warm_refreshes=bad)
