"""natgrad.NaturalGradient against the dense damped solve, and its torch.optim conformance."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.fisher import compute_fisher, score_rows
from support import batch, small_mlp


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("structure", ["dense", "diagonal"])
def test_step_equals_dense_damped_solve(structure):
    model, (x, y) = small_mlp(), batch()
    fisher = compute_fisher(model, x, y).to_dense()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad()
    curvature = fisher if structure == "dense" else torch.diag(torch.diagonal(fisher))
    expected = flat(model) - 0.5 * torch.linalg.solve(curvature + 1e-2 * torch.eye(len(g), dtype=g.dtype), g)
    opt = natgrad.NaturalGradient(model, lr=0.5, damping=1e-2, structure=structure)
    loss = opt.backward(x, y)
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y).detach())
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in model.parameters()]), g)
    opt.step()
    torch.testing.assert_close(flat(model), expected, rtol=1e-9, atol=1e-11)


def test_mc_fisher_step_uses_sampled_rows():
    model, (x, y) = small_mlp(), batch()
    opt = natgrad.NaturalGradient(model, lr=1.0, damping=1e-2, fisher_type="mc", seed=3)
    rows = score_rows(model, x, fisher_type="mc", generator=torch.Generator().manual_seed(3))
    fisher = rows.T @ rows / len(x)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad()
    expected = flat(model) - torch.linalg.solve(fisher + 1e-2 * torch.eye(len(g), dtype=g.dtype), g)
    opt.backward(x, y)
    opt.step()
    torch.testing.assert_close(flat(model), expected, rtol=1e-9, atol=1e-11)


def test_logistic_regression_converges_much_faster_than_sgd():
    torch.manual_seed(0)
    X = torch.randn(400, 10, dtype=torch.float64) * torch.logspace(-1, 1, 10, dtype=torch.float64)
    y = (X @ torch.randn(10, dtype=torch.float64) > 0).long()
    ngd_model, sgd_model = nn.Linear(10, 2).double(), nn.Linear(10, 2).double()
    sgd_model.load_state_dict(ngd_model.state_dict())
    ngd = natgrad.NaturalGradient(ngd_model, lr=1.0, damping=1e-3)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.05)
    for _ in range(15):
        ngd.zero_grad()
        ngd_loss = ngd.backward(X, y)
        ngd.step()
        sgd.zero_grad()
        sgd_loss = F.cross_entropy(sgd_model(X), y)
        sgd_loss.backward()
        sgd.step()
    assert ngd_loss < 0.5 * sgd_loss


def test_checkpoint_resumes_exactly_with_groups_and_schedules():
    # the update formulas themselves are checked in test_update_formulas.py
    model, (x, y) = small_mlp(), batch()
    groups = [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "weight_decay": 1e-3}]
    opt = natgrad.NaturalGradient(model, groups, lr=0.5, momentum=0.9, kl_clip=1e-3, damping=lambda s: 1e-2 / (1 + s))
    for _ in range(3):
        opt.zero_grad()
        opt.backward(x, y)
        opt.step()
    state = copy.deepcopy(opt.state_dict())  # as torch.save/load would: state_dict aliases buffers
    clone = small_mlp()
    clone.load_state_dict(model.state_dict())
    opt2 = natgrad.NaturalGradient(clone, [{"params": clone[0].parameters(), "lr": 0.1}, {"params": clone[2].parameters(), "weight_decay": 1e-3}],
                                   lr=0.5, momentum=0.9, kl_clip=1e-3, damping=lambda s: 1e-2 / (1 + s))
    opt2.load_state_dict(state)
    for o, m in ((opt, model), (opt2, clone)):
        o.zero_grad()
        o.backward(x, y)
        o.step()
    torch.testing.assert_close(flat(model), flat(clone), rtol=0, atol=0)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.5)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_errors():
    model, (x, y) = small_mlp(), batch()
    opt = natgrad.NaturalGradient(model)
    with pytest.raises(RuntimeError, match="call opt.backward"):
        opt.step()
    for kwargs, name in [(dict(lr=-1.0), "lr"), (dict(damping=0.0), "damping"), (dict(momentum=1.0), "momentum"),
                         (dict(structure="kfac"), "structure"), (dict(fisher_type="true"), "fisher_type"),
                         (dict(kl_clip=-1.0), "kl_clip"), (dict(likelihood="poisson"), "likelihood")]:
        with pytest.raises(ValueError, match=f"Invalid {name}"):
            natgrad.NaturalGradient(model, **kwargs)
    with pytest.raises(ValueError, match="one entry per input"):
        opt.backward(x, y[:3])
    with pytest.raises(ValueError, match="not saved by natgrad.NaturalGradient"):
        opt.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())
