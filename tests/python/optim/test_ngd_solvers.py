"""natgrad.NaturalGradient(solver="cg"): the Hessian-free-style step against the Woodbury step,
its KL trust region against the dense Fisher, exact state_dict round trips and bad input."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import natgrad
from natgrad.fisher import compute_fisher
from natgrad.optim import CGOptions


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(24, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (24,), generator=g)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("fisher_type", ["empirical", "exact"])
def test_converged_cg_takes_the_woodbury_step(fisher_type):
    model, x, y = setup()
    twin = copy.deepcopy(model)
    exact = natgrad.NaturalGradient(model, lr=0.5, damping=1e-2, momentum=0.5, fisher_type=fisher_type)
    cg = natgrad.NaturalGradient(twin, lr=0.5, damping=1e-2, momentum=0.5, fisher_type=fisher_type, solver="cg",
                                 cg=CGOptions(tol=1e-12, max_iters=500, preconditioner="kfac"))
    for _ in range(3):
        for opt in (exact, cg):
            opt.zero_grad()
            loss = opt.backward(x, y)
            opt.step()
        torch.testing.assert_close(flat(twin), flat(model), rtol=1e-9, atol=1e-10)
    assert cg.solver.last_result.converged and torch.isfinite(loss)


def test_kl_clip_bounds_the_step_exactly():
    model, x, y = setup()
    before = flat(model)
    dense = compute_fisher(model, x, fisher_type="exact").to_dense() + 1e-2 * torch.eye(len(before), dtype=torch.float64)
    opt = natgrad.NaturalGradient(model, lr=1.0, damping=1e-2, kl_clip=1e-4, fisher_type="exact", solver="cg",
                                  cg=CGOptions(tol=1e-2, max_iters=3))
    opt.zero_grad()
    opt.backward(x, y)
    opt.step()
    step = flat(model) - before
    assert float(step @ dense @ step) == pytest.approx(1e-4, rel=1e-8)  # the clip bound, met with equality


def test_state_dict_restores_the_warm_start_and_sampler():
    model, x, y = setup()
    opts = dict(lr=0.3, damping=1e-2, momentum=0.9, fisher_type="mc", solver="cg",
                cg=CGOptions(tol=1e-8, max_iters=4, warm_start=0.9, preconditioner="diagonal"))
    opt = natgrad.NaturalGradient(model, **opts)

    def run(o, steps):
        for _ in range(steps):
            o.zero_grad()
            o.backward(x, y)
            o.step()

    run(opt, 2)
    saved_model, saved = copy.deepcopy(model), copy.deepcopy(opt.state_dict())
    assert saved["natural_gradient"]["cg"]["previous"] is not None
    run(opt, 2)
    other = natgrad.NaturalGradient(saved_model, **opts)
    other.load_state_dict(saved)
    run(other, 2)
    assert torch.equal(flat(saved_model), flat(model))
    broken = copy.deepcopy(saved)
    broken["natural_gradient"]["cg"]["previous"] = torch.tensor([float("nan")])
    with pytest.raises(ValueError, match="cg warm start"):
        other.load_state_dict(broken)


def test_warm_start_saves_iterations_on_a_repeated_batch():
    model, x, y = setup()
    counts = {}
    for warm in (0.0, 1.0):
        m = copy.deepcopy(model)
        opt = natgrad.NaturalGradient(m, lr=1e-6, damping=1e-3, solver="cg", cg=CGOptions(tol=1e-8, max_iters=200, warm_start=warm))
        for _ in range(2):
            opt.zero_grad()
            opt.backward(x, y)
            opt.step()
        counts[warm] = opt.solver.last_result.iterations
    assert counts[1.0] < counts[0.0]


def test_bad_input_raises_clear_errors():
    model, x, y = setup()
    with pytest.raises(ValueError, match="Invalid solver"):
        natgrad.NaturalGradient(model, solver="lbfgs")
    with pytest.raises(ValueError, match="structure='dense'"):
        natgrad.NaturalGradient(model, solver="cg", structure="diagonal")
    with pytest.raises(ValueError, match="Invalid cg:"):
        natgrad.NaturalGradient(model, solver="cg", cg={"tol": 1e-3})
    with pytest.raises(ValueError, match="Invalid cg tol"):
        CGOptions(tol=0.0)
    with pytest.raises(ValueError, match="Invalid cg preconditioner"):
        CGOptions(preconditioner="ilu")
    opt = natgrad.NaturalGradient(model, solver="cg")
    with pytest.raises(RuntimeError, match="call opt.backward"):
        opt.step()
    bad = x.clone()
    bad[0, 0] = float("nan")
    before = flat(model)
    with pytest.raises(ValueError, match="NaN or Inf"):
        opt.backward(bad, y)
    assert all(p.grad is None for p in model.parameters()) and torch.equal(flat(model), before)


def test_a_solver_object_is_the_same_strategy_as_its_name():
    from natgrad.optim import CGSolver, WoodburySolver
    for by_name, by_object in ((dict(solver="cg", cg=CGOptions(tol=1e-8, max_iters=4)), CGSolver(CGOptions(tol=1e-8, max_iters=4))),
                               (dict(solver="woodbury"), WoodburySolver())):
        model, x, y = setup()
        twin = copy.deepcopy(model)
        named = natgrad.NaturalGradient(model, lr=0.5, damping=1e-2, kl_clip=1e-3, **by_name)
        given = natgrad.NaturalGradient(twin, lr=0.5, damping=1e-2, kl_clip=1e-3, solver=by_object)
        assert type(named.solver) is type(given.solver) and given.solver is by_object
        for _ in range(3):
            for opt in (named, given):
                opt.zero_grad()
                opt.backward(x, y)
                opt.step()
        assert torch.equal(flat(model), flat(twin))
    with pytest.raises(ValueError, match="solver"):
        natgrad.NaturalGradient(model, solver=object())
