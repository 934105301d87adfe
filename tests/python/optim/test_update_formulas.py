"""The optimizers' update rules against their formulas, computed independently in float64.

Public API only. Each test fails when the feature it checks is ignored (kl_clip taken as None,
momentum as 0, weight decay as 0): the reference then differs by far more than 1e-10.

* KFAC, kl_clip: with momentum 0 and weight decay 0 the step is ``Δθ = −η ν u`` with
  ``ν = min(1, sqrt(κ / Σ_groups η² ⟨u, g⟩))``; ``u`` is read off the step taken with
  ``kl_clip=None`` from the same model, batch and optimizer state (``Δθ(None) = −η u``).
* KFAC, momentum and kl_clip: with the curvature fixed after step 0, ``b ← ν(μb + u)`` with
  ``u = F̂⁻¹g`` by a dense solve and ``ν`` bounding ``η² (μb + u)ᵀF̂(μb + u)`` by κ.
* NaturalGradient: ``d = (F + λI)⁻¹(∇L + ωθ)`` with ``F = UᵀU/n`` the empirical Fisher from a
  per-sample-gradient loop, ``ν = min(1, sqrt(κ / Σ_groups η² dᵀ∇L))``, ``b ← μb + νd``,
  ``θ ← θ − ηb``, over several steps and two param groups of different lr.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad

DT = torch.float64
ATOL = 1e-10


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


def batches(count: int, n: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(123)
    return [(torch.randn(n, 4, generator=gen, dtype=DT), torch.randint(0, 3, (n,), generator=gen)) for _ in range(count)]


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def layer_groups(model: nn.Sequential, lrs: tuple[float, ...]) -> list[dict]:
    layers = [m for m in model if isinstance(m, nn.Linear)]
    return [{"params": list(m.parameters()), "lr": lr} for m, lr in zip(layers, lrs, strict=True)]


def group_lrs(model: nn.Sequential, lrs: tuple[float, ...]) -> torch.Tensor:
    """η per scalar parameter, in the order of ``flat(model.parameters())``."""
    layers = [m for m in model if isinstance(m, nn.Linear)]
    return torch.cat([torch.full((p.numel(),), lr, dtype=DT) for m, lr in zip(layers, lrs, strict=True) for p in m.parameters()])


# ---- KFAC: the trust region -------------------------------------------------------------------

KFAC_LRS = [(0.3,), (0.3, 0.07)]


def kfac_run(kl_clip, lrs: tuple[float, ...], data) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs KFAC over ``data``; returns (θ before the last step, θ after it, gradient of the last step).

    ``kl_clip`` may be a schedule: the tests use one that is huge (ν = 1) before the last step,
    so that every run reaches the last step with the same parameters and factors.
    """
    model = make_model()
    params = [{"params": list(model.parameters()), "lr": lrs[0]}] if len(lrs) == 1 else layer_groups(model, lrs)
    opt = natgrad.KFAC(model, params, lr=lrs[0], momentum=0.0, weight_decay=0.0, damping=1e-2, kl_clip=kl_clip,
                       factor_update_period=1, inverse_update_period=1)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before, grad = flat(model.parameters()), flat(p.grad for p in model.parameters())
        opt.step()
    return before, flat(model.parameters()), grad


@pytest.mark.parametrize("lrs", KFAC_LRS, ids=["one_group", "two_groups"])
@pytest.mark.parametrize("steps", [1, 3], ids=["fresh_state", "after_two_steps"])
def test_kfac_kl_clip_scales_the_unclipped_step_by_nu(lrs, steps):
    data = batches(steps)
    last = steps - 1

    def schedule(kappa: float):
        return lambda k: 1e30 if k < last else kappa  # ν = 1 exactly before the last step

    before, after_none, g = kfac_run(None, lrs, data)
    eta = group_lrs(make_model(), lrs) if len(lrs) == 2 else torch.full_like(before, lrs[0])
    u = -(after_none - before) / eta  # Δθ(None) = −η u
    vg = float((eta**2 * u * g).sum())  # Σ η² ⟨u, g⟩
    assert vg > 0 and u.abs().max() > 0
    for kappa, active in ((1e-2 * vg, True), (1e2 * vg, False)):
        before_k, after_k, g_k = kfac_run(schedule(kappa), lrs, data)
        torch.testing.assert_close(before_k, before, rtol=0, atol=ATOL)  # the same state ...
        torch.testing.assert_close(g_k, g, rtol=0, atol=ATOL)  # ... and batch
        nu = min(1.0, math.sqrt(kappa / vg))
        assert (nu < 0.5) if active else (nu == 1.0)
        torch.testing.assert_close(after_k - before, nu * (after_none - before), rtol=0, atol=ATOL)


def dense_damped_fisher(opt, model: nn.Sequential, damping: float) -> torch.Tensor:
    """``kron(G, A) + γI`` per Linear layer (packed ``[W, b]`` row-major, as ``flat`` orders
    weight then bias, permuted below), from the factors the optimizer holds, in float64."""
    mats = []
    for block in opt.estimator.blocks:
        A, G = block.state["A"].to(DT), block.state["G"].to(DT)
        mats.append(torch.kron(G, A) + damping * torch.eye(G.shape[0] * A.shape[0], dtype=DT))
    return torch.block_diag(*mats)


def packed_order(model: nn.Sequential) -> torch.Tensor:
    """Permutation from ``flat(model.parameters())`` to the blocks' packed ``[W, b]`` rows."""
    index, start = [], 0
    for m in model:
        if isinstance(m, nn.Linear):
            out, inp = m.weight.shape
            w = torch.arange(out * inp).reshape(out, inp) + start
            b = torch.arange(out).reshape(out, 1) + start + out * inp
            index.append(torch.cat([w, b], 1).reshape(-1))
            start += out * (inp + 1)
    return torch.cat(index)


@pytest.mark.parametrize("kappa", [1e-4, 1e3], ids=["binding", "loose"])
def test_kfac_trust_region_bounds_the_momentum_step_taken(kappa):
    """Fixed curvature (factors and decompositions from step 0 only): every step must equal the
    reference ``b ← ν(μb + u)``, ``u = F̂⁻¹g`` by a dense solve, ``ν = min(1, sqrt(κ / (η² (μb +
    u)ᵀF̂(μb + u))))``, so that the KL of the step actually taken is at most κ (equal when ν < 1)."""
    model, damping, eta, mu = make_model(), 1e-2, 0.5, 0.9
    opt = natgrad.KFAC(model, lr=eta, momentum=mu, damping=damping, kl_clip=kappa,
                       factor_update_period=10**6, inverse_update_period=10**6)
    order = packed_order(model)
    buf, binding = torch.zeros(order.numel(), dtype=DT), 0
    for x, y in batches(6):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before, grad = flat(model.parameters()), flat(p.grad for p in model.parameters())
        opt.step()
        fisher = dense_damped_fisher(opt, model, damping)  # unchanged after step 0
        u = torch.linalg.solve(fisher, grad[order])
        d = mu * buf + u
        kl = eta**2 * float(d @ fisher @ d)
        nu = min(1.0, math.sqrt(kappa / kl))
        binding += nu < 0.99
        buf = nu * d
        torch.testing.assert_close(flat(model.parameters())[order] - before[order], -eta * buf, rtol=1e-8, atol=ATOL)
        assert eta**2 * float(buf @ fisher @ buf) <= kappa * (1 + 1e-9)
    assert binding == (6 if kappa < 1e-3 else 0)


# ---- NaturalGradient: momentum, weight decay and kl_clip --------------------------------------

NGD_LRS = (0.5, 0.2)
DAMPING = 0.1


def per_sample_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``U`` ``[n, P]``: one row ∇ℓ_i per sample, by a plain loop (no torch.func)."""
    rows = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        rows.append(flat(torch.autograd.grad(loss, list(model.parameters()))))
    return torch.stack(rows)


def ngd_reference(data, momentum: float, weight_decay: float, kl_clip: float | None) -> tuple[list[torch.Tensor], list[float]]:
    """θ after each step, and ν of each step, from the formulas."""
    model = make_model()
    eta = group_lrs(model, NGD_LRS)
    theta = flat(model.parameters()).clone()
    buf = torch.zeros_like(theta)
    thetas, nus = [], []
    for x, y in data:
        torch.nn.utils.vector_to_parameters(theta, model.parameters())
        u = per_sample_gradients(model, x, y)
        n = u.shape[0]
        grad = u.mean(0)
        fisher = u.T @ u / n
        d = torch.linalg.solve(fisher + DAMPING * torch.eye(theta.numel(), dtype=DT), grad + weight_decay * theta)
        nu = 1.0 if kl_clip is None else min(1.0, math.sqrt(kl_clip / float((eta**2 * d * grad).sum())))
        buf = momentum * buf + nu * d
        theta = theta - eta * buf
        thetas.append(theta.clone())
        nus.append(nu)
    return thetas, nus


def ngd_run(data, **kwargs) -> list[torch.Tensor]:
    model = make_model()
    opt = natgrad.NaturalGradient(model, layer_groups(model, NGD_LRS), lr=1.0, damping=DAMPING, **kwargs)
    thetas = []
    for x, y in data:
        opt.zero_grad()
        opt.backward(x, y)
        opt.step()
        thetas.append(flat(model.parameters()))
    return thetas


NGD_CASES = [
    pytest.param(dict(momentum=0.8, weight_decay=0.0, kl_clip=None), id="momentum"),
    pytest.param(dict(momentum=0.0, weight_decay=0.3, kl_clip=None), id="weight_decay"),
    pytest.param(dict(momentum=0.0, weight_decay=0.0, kl_clip=1e-4), id="kl_clip"),
    pytest.param(dict(momentum=0.8, weight_decay=0.0, kl_clip=1e-4), id="momentum_and_kl_clip"),
    pytest.param(dict(momentum=0.8, weight_decay=0.3, kl_clip=None), id="momentum_and_weight_decay"),
    pytest.param(dict(momentum=0.8, weight_decay=0.3, kl_clip=1e-4), id="all_three"),
]


@pytest.mark.parametrize("kwargs", NGD_CASES)
def test_natural_gradient_matches_its_update_formula(kwargs):
    data = batches(3)
    expected, nus = ngd_reference(data, **kwargs)
    if kwargs["kl_clip"] is not None:
        assert all(nu < 0.5 for nu in nus), nus  # the clip is active at every step
    got = ngd_run(data, **kwargs)
    start = flat(make_model().parameters())
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert (b - start).abs().max() > 1e-3  # the parameters do move
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL, msg=lambda m, s=step: f"step {s}: {m}")


def test_natural_gradient_kl_clip_large_enough_is_no_clip():
    data = batches(2)
    unclipped = ngd_run(data, momentum=0.8, weight_decay=0.3, kl_clip=None)
    _, nus = ngd_reference(data, momentum=0.8, weight_decay=0.3, kl_clip=1e6)
    assert nus == [1.0, 1.0]
    for a, b in zip(ngd_run(data, momentum=0.8, weight_decay=0.3, kl_clip=1e6), unclipped, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
