"""natgrad.KFAC's adaptive learning rate and momentum against the dense quadratic model.

The reference builds the exact Fisher of a tiny float64 MLP from per-sample output Jacobians
(torch.autograd.functional.jacobian) and the closed-form output Fisher, then solves the 2x2
model with torch.linalg.solve; the optimizer's entries come from forward-mode products.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

import natgrad
from natgrad import ops
from natgrad.fisher import ImplicitFisher

N, D_IN, HIDDEN, C = 12, 5, 6, 3


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    return x, y


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, C)).double()


def _dense_fisher(model: nn.Module, params: list[torch.Tensor], x: torch.Tensor, likelihood: str) -> torch.Tensor:
    """(1/n) Σ_i J_iᵀ H_i J_i from the Jacobian of every output w.r.t. the flat ``params``."""
    names = {id(p): n for n, p in model.named_parameters()}
    shapes = [p.shape for p in params]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])

    def outputs(flat):
        chunks = torch.split(flat, [s.numel() for s in shapes])
        values = {names[id(p)]: c.view(s) for p, c, s in zip(params, chunks, shapes)}
        return functional_call(model, values, (x,))

    jac = torch.autograd.functional.jacobian(outputs, flat0)  # [n, C, p]
    out = outputs(flat0).detach()
    fisher = torch.zeros(flat0.numel(), flat0.numel(), dtype=torch.float64)
    for i in range(x.shape[0]):
        if likelihood == "categorical":
            p = torch.softmax(out[i], -1)
            h = torch.diag(p) - torch.outer(p, p)
        elif likelihood == "bernoulli":
            p = torch.sigmoid(out[i])
            h = torch.diag(p * (1 - p))
        else:
            h = torch.eye(out.shape[1], dtype=torch.float64)
        fisher += jac[i].T @ h @ jac[i]
    return fisher / x.shape[0]


def _spy(opt: natgrad.KFAC) -> list[dict]:
    """Records every solve's inputs (flat, in the proposals' order) and its solution."""
    calls: list[dict] = []
    adaptive = opt.adaptive_step
    original = adaptive.solve

    def solve(proposals, previous, grads, damping_of, mean, kl_clip=None):
        params = list(proposals)
        q = original(proposals, previous, grads, damping_of, mean, kl_clip)
        calls.append({"params": params, "q": q,
                      "delta": torch.cat([proposals[p].reshape(-1) for p in params]).clone(),
                      "prev": torch.cat([previous[p].reshape(-1) for p in params]).clone(),
                      "grad": torch.cat([grads[p].reshape(-1) for p in params]).clone(),
                      "damping": torch.cat([torch.full((p.numel(),), damping_of(p), dtype=torch.float64)
                                            for p in params]),
                      "theta": torch.cat([p.detach().reshape(-1) for p in params]).clone()})
        return q

    adaptive.solve = solve
    return calls


def _dense_model(model, call, x, likelihood="categorical"):
    """A = Vᵀ(F + λ)V, b = Vᵀ∇ for V = [Δ, δ] from the dense Fisher at the call's parameters."""
    fisher = _dense_fisher(model, call["params"], x, likelihood)
    v = torch.stack([call["delta"], call["prev"]], 1)
    a = v.T @ fisher @ v + v.T @ (call["damping"][:, None] * v)
    return a, v.T @ call["grad"]


def _train(opt, model, x, y, steps, closure=False):
    for _ in range(steps):
        def loss_fn():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        if closure:
            opt.step(loss_fn)
        else:
            loss_fn()
            opt.step()


def test_gram_equals_the_dense_fisher():
    model, (x, _) = _model(), _data()
    params = list(model.parameters())
    g = torch.Generator().manual_seed(1)
    v = torch.randn(sum(p.numel() for p in params), 2, generator=g, dtype=torch.float64)
    for likelihood in ("categorical", "gaussian", "bernoulli"):
        fisher = _dense_fisher(model, params, x, likelihood)
        got = ImplicitFisher(model, x, fisher_type="exact", likelihood=likelihood).gram(v)
        torch.testing.assert_close(got, v.T @ fisher @ v, rtol=1e-10, atol=1e-12)


def test_learning_rate_and_momentum_minimise_the_dense_model():
    model, (x, y) = _model(), _data()
    opt = natgrad.KFAC(model, kl_clip=None, adaptive_learning_rate=True, adaptive_momentum=True, damping=0.05,
                       weight_decay=1e-3)
    calls = _spy(opt)
    for step in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        _train(opt, model, x, y, 1)
        twin, call = _twin_calls(model, calls[-1])
        a, b = _dense_model(twin, call, x)
        if step == 0:  # no previous update: μ = 0 and the 1-D α
            assert call["prev"].abs().max() == 0 and call["q"].mu == 0.0
            w = torch.stack([-b[0] / a[0, 0], torch.zeros((), dtype=torch.float64)])
        else:
            w = -torch.linalg.solve(a, b)
        q = call["q"]
        torch.testing.assert_close(torch.tensor([q.alpha, q.mu], dtype=torch.float64), w, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(torch.tensor(q.model_change, dtype=torch.float64), 0.5 * w @ a @ w + w @ b,
                                   rtol=1e-10, atol=1e-14)
        moved = torch.cat([(p.detach() - old).reshape(-1) for p, old in zip(model.parameters(), before)])
        torch.testing.assert_close(moved, w[0] * call["delta"] + w[1] * call["prev"], rtol=1e-10, atol=1e-14)


def model_at(model: nn.Module, call: dict) -> nn.Module:
    """A copy of ``model`` with the parameters the call saw."""
    twin = copy.deepcopy(model)
    by_id = {id(p): i for i, p in enumerate(model.parameters())}
    flat = torch.split(call["theta"], [p.numel() for p in call["params"]])
    twin_params = list(twin.parameters())
    with torch.no_grad():
        for p, value in zip(call["params"], flat):
            twin_params[by_id[id(p)]].copy_(value.view_as(p))
    return twin


def _twin_calls(model, call):
    twin = model_at(model, call)
    ids = {id(p): i for i, p in enumerate(model.parameters())}
    params = list(twin.parameters())
    return twin, dict(call, params=[params[ids[id(p)]] for p in call["params"]])


def test_fixed_momentum_per_group_solves_the_one_dimensional_model():
    model, (x, y) = _model(), _data()
    groups = [{"params": model[0].parameters(), "momentum": 0.5, "damping": 0.1},
              {"params": model[2].parameters(), "momentum": 0.9, "weight_decay": 1e-2}]
    opt = natgrad.KFAC(model, groups, kl_clip=None, adaptive_learning_rate=True, damping=0.02)
    calls = _spy(opt)
    _train(opt, model, x, y, 3)
    original = calls[-1]["params"]
    twin, call = _twin_calls(model, calls[-1])
    a, b = _dense_model(twin, call, x)  # "prev" is already μ_group · δ
    q = call["q"]
    assert q.mu == 1.0
    alpha = -(b[0] + a[0, 1]) / a[0, 0]
    torch.testing.assert_close(torch.tensor(q.alpha, dtype=torch.float64), alpha, rtol=1e-10, atol=0.0)
    buffers = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in original])
    torch.testing.assert_close(-buffers, alpha * call["delta"] + call["prev"], rtol=1e-10, atol=1e-14)


def test_reduction_ratio_uses_the_dense_model():
    model, (x, y) = _model(), _data()
    opt = natgrad.KFAC(model, kl_clip=None, adaptive_learning_rate=True, adaptive_momentum=True, adaptive_damping=True,
                       damping_adaptation_interval=1, damping=0.05)
    calls = _spy(opt)
    _train(opt, model, x, y, 2, closure=True)
    twin, call = _twin_calls(model, calls[-1])
    a, b = _dense_model(twin, call, x)
    w = -torch.linalg.solve(a, b)
    with torch.no_grad():
        change = nn.functional.cross_entropy(model(x), y) - nn.functional.cross_entropy(twin(x), y)
    expected = change / (0.5 * w @ a @ w + w @ b)
    assert opt.last_reduction_ratio == pytest.approx(float(expected), rel=1e-9)


def test_period_reuses_the_coefficients_and_resumes_exactly():
    x, y = _data()

    def make():
        model = _model()
        return model, natgrad.KFAC(model, kl_clip=None, adaptive_learning_rate=True, adaptive_momentum=True, adaptive_period=2,
                                   damping=0.05)

    model, opt = make()
    calls = _spy(opt)
    _train(opt, model, x, y, 3)
    assert len(calls) == 2  # steps 0 and 2
    saved = calls[-1]["q"]
    state = copy.deepcopy(opt.state_dict())
    weights = copy.deepcopy(model.state_dict())
    _train(opt, model, x, y, 3)
    model2, opt2 = make()
    model2.load_state_dict(weights)
    opt2.load_state_dict(state)
    assert (opt2.adaptive_step.alpha, opt2.adaptive_step.mu) == (saved.alpha, saved.mu)
    _train(opt2, model2, x, y, 3)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_zero_gradient_and_nan_batches_do_not_move_the_parameters():
    model = _model()
    opt = natgrad.KFAC(model, kl_clip=None, adaptive_learning_rate=True, adaptive_momentum=True, likelihood="gaussian")
    x, _ = _data()
    before = [p.detach().clone() for p in model.parameters()]
    out = model(x)
    nn.functional.mse_loss(out, out.detach(), reduction="sum").backward()  # zero gradient: Δ = 0
    opt.step()
    assert opt.adaptive_step.alpha == 0.0 and opt.adaptive_step.mu == 0.0
    for p, old in zip(model.parameters(), before):
        assert torch.equal(p, old)
    opt.zero_grad()
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.warns(Warning):
        model(bad).sum().backward()
        opt.step()
    for p, old in zip(model.parameters(), before):
        assert torch.equal(p, old)


def test_nonfinite_model_skips_the_step(monkeypatch):
    model, (x, y) = _model(), _data()
    opt = natgrad.KFAC(model, kl_clip=None, adaptive_learning_rate=True)
    monkeypatch.setattr(opt.adaptive_step, "curvature",
                        lambda *args: torch.full((2, 2), float("inf"), dtype=torch.float64))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="quadratic model"):
        _train(opt, model, x, y, 1)
    assert opt.adaptive_step.skips == 1
    for p, old in zip(model.parameters(), before):
        assert torch.equal(p, old)


def test_adaptive_training_decreases_the_loss():
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 0).long()
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    start = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        first = float(nn.functional.cross_entropy(model(x), y))
    for kl_clip, factor in ((None, 0.1), (1e-3, 0.7)):  # the default bound slows it, never stalls it
        model.load_state_dict(start)
        opt = natgrad.KFAC(model, kl_clip=kl_clip, adaptive_learning_rate=True, adaptive_momentum=True, damping=1e-2)
        _train(opt, model, x, y, 25)
        opt.remove_hooks()
        with torch.no_grad():
            assert float(nn.functional.cross_entropy(model(x), y)) < factor * first


def test_the_rule_matches_closed_forms():
    q = ops.kfac_quadratic_step(4.0, 1.0, 2.0, -2.0, 1.0, True)
    assert (q.alpha, q.mu, q.model_change, q.finite) == pytest.approx((5 / 7, -6 / 7, -8 / 7, True))
    assert ops.kfac_quadratic_step(1.0, 2.0, 4.0, -1.0, -2.0, True)[:2] == (1.0, 0.0)  # parallel: μ = 0
    assert not ops.kfac_quadratic_step(float("nan"), 0.0, 1.0, -1.0, 0.0, True).finite


@pytest.mark.parametrize("kwargs, match", [
    ({"adaptive_learning_rate": "yes"}, "adaptive_learning_rate"),
    ({"adaptive_momentum": True}, "adaptive_momentum"),
    ({"adaptive_learning_rate": True, "adaptive_period": 0}, "adaptive_period"),
    ({"adaptive_learning_rate": True, "adaptive_period": 1.5}, "adaptive_period"),
    ({"adaptive_learning_rate": True, "likelihood": "poisson"}, "likelihood"),
])
def test_bad_options_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=f"Invalid {match}"):
        natgrad.KFAC(nn.Linear(3, 2), **kwargs)


def test_a_step_without_a_forward_pass_or_with_two_inputs_raises():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, a, b):
            return self.lin(a + b)

    model = TwoInputs()
    opt = natgrad.KFAC(model, kl_clip=None, adaptive_learning_rate=True)
    with pytest.raises(RuntimeError, match="forward pass"):
        opt.step()
    model(torch.randn(4, 3), torch.randn(4, 3)).sum().backward()
    with pytest.raises(ValueError, match="one tensor input"):
        opt.step()
    with torch.no_grad():  # evaluation passes are not recorded
        model(torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="forward pass"):
        opt.step()


def test_nonfinite_inputs_the_layers_never_see_skip_the_step_without_raising():
    class Cleaned(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D_IN, C).double()

        def forward(self, x):
            return self.lin(torch.nan_to_num(x))

    model = Cleaned()
    opt = natgrad.KFAC(model, kl_clip=None, adaptive_learning_rate=True)
    x, y = _data()
    x[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match="quadratic model"):
        opt.step()
    for p, old in zip(model.parameters(), before):
        assert torch.equal(p, old)


def test_a_checkpoint_without_adaptive_state_loads_and_recomputes():
    model, (x, y) = _model(), _data()
    plain = natgrad.KFAC(model, damping=0.05)
    _train(plain, model, x, y, 2)
    opt = natgrad.KFAC(model, kl_clip=None, adaptive_learning_rate=True, adaptive_momentum=True, adaptive_period=5, damping=0.05)
    opt.load_state_dict(plain.state_dict())
    assert opt.adaptive_step.alpha is None
    calls = _spy(opt)
    _train(opt, model, x, y, 1)  # step 2 is off-period: computed anyway, nothing to reuse
    assert len(calls) == 1 and calls[0]["q"].finite


def test_batchnorm_in_training_mode_keeps_its_statistics_and_matches_the_dense_fisher():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, C)).double()
    x, y = _data()
    opt = natgrad.KFAC(model, kl_clip=None, adaptive_learning_rate=True, adaptive_momentum=True, damping=0.05)
    calls = _spy(opt)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        stats = {n: b.clone() for n, b in model.named_buffers()}
        opt.step()
        assert all(torch.equal(b, stats[n]) for n, b in model.named_buffers())
    twin, call = _twin_calls(model, calls[-1])
    a, b = _dense_model(twin, call, x)  # the batch Jacobian: BatchNorm couples the samples
    w = -torch.linalg.solve(a, b)
    torch.testing.assert_close(torch.tensor([call["q"].alpha, call["q"].mu], dtype=torch.float64), w,
                               rtol=1e-10, atol=1e-12)


def test_nll_scale_scales_the_model_of_a_per_pixel_mean_loss():
    model, (x, _) = _model(), _data()
    target = torch.rand(N, C, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    opt = natgrad.KFAC(model, kl_clip=None, adaptive_learning_rate=True, likelihood="bernoulli", nll_scale=1.0 / C, damping=0.05)
    calls = _spy(opt)
    nn.functional.binary_cross_entropy_with_logits(model(x), target).backward()  # mean over N·C entries
    opt.step()
    twin, call = _twin_calls(model, calls[-1])
    fisher = _dense_fisher(twin, call["params"], x, "bernoulli") / C
    d = call["delta"]
    alpha = -(call["grad"] @ d) / (d @ fisher @ d + d @ (call["damping"] * d))
    assert calls[-1]["q"].alpha == pytest.approx(float(alpha), rel=1e-10)


def test_the_recording_hook_goes_with_the_optimizer():
    import gc

    model = _model()
    opt = natgrad.KFAC(model, kl_clip=None, adaptive_learning_rate=True)
    recorder = opt.adaptive_step.recorder
    del opt
    gc.collect()
    x, _ = _data()
    model(x).sum().backward()
    assert recorder.calls == []
    for eigen in (True, False):  # EKFAC directions take the same adaptive step
        opt = natgrad.KFAC(model, kl_clip=None, adaptive_learning_rate=True, adaptive_momentum=True, eigenvalue_correction=eigen)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), _data()[1]).backward()
            opt.step()
        assert opt.adaptive_step.alpha > 0
        opt.remove_hooks()


def test_attention_models_take_the_dense_model_step():
    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, C)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

    torch.manual_seed(0)
    model = Attend().double()
    x = torch.randn(N, 3, 4, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(3))
    opt = natgrad.KFAC(model, kl_clip=None, adaptive_learning_rate=True, adaptive_momentum=True, damping=0.05)
    calls = _spy(opt)
    _train(opt, model, x, y, 2)
    twin, call = _twin_calls(model, calls[-1])
    a, b = _dense_model(twin, call, x)
    torch.testing.assert_close(torch.tensor([call["q"].alpha, call["q"].mu], dtype=torch.float64),
                               -torch.linalg.solve(a, b), rtol=1e-10, atol=1e-12)


def test_kl_clip_bounds_the_step_under_the_dense_fisher():
    model, (x, y) = _model(), _data()
    kappa = 1e-4
    opt = natgrad.KFAC(model, kl_clip=kappa, adaptive_learning_rate=True, adaptive_momentum=True, damping=0.05)
    calls = _spy(opt)
    _train(opt, model, x, y, 1)
    for _ in range(2):
        before = [p.detach().clone() for p in model.parameters()]
        _train(opt, model, x, y, 1)
        twin, call = _twin_calls(model, calls[-1])
        a, b = _dense_model(twin, call, x)
        w = -torch.linalg.solve(a, b)
        fisher = _dense_fisher(twin, call["params"], x, "categorical")
        v = torch.stack([call["delta"], call["prev"]], 1)
        form = w @ (v.T @ fisher @ v) @ w
        assert form > kappa  # the clip binds
        nu = (kappa / form).sqrt()
        q = call["q"]
        torch.testing.assert_close(torch.tensor([q.alpha, q.mu], dtype=torch.float64), nu * w, rtol=1e-10, atol=0.0)
        torch.testing.assert_close(torch.tensor(q.model_change, dtype=torch.float64),
                                   nu * nu * 0.5 * w @ a @ w + nu * w @ b, rtol=1e-10, atol=0.0)
        moved = torch.cat([(p.detach() - old).reshape(-1) for p, old in zip(model.parameters(), before)])
        torch.testing.assert_close(moved @ fisher @ moved, torch.tensor(kappa, dtype=torch.float64), rtol=1e-9, atol=0.0)
