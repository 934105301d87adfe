"""natgrad.KFAC's math against dense references, and its torch.optim conformance."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from support import data, flat_params, mlp, train


def linear_step(layer, x, y, **kwargs):
    """One K-FAC step with lr=1, no momentum, no trust region; returns (Δθ, gradient)."""
    opt = natgrad.KFAC(layer, lr=1.0, momentum=0.0, kl_clip=None, **kwargs)
    before = flat_params(layer)
    loss = F.cross_entropy(layer(x), y)
    loss.backward()
    grad = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1).reshape(-1)
    opt.step()
    after = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1).reshape(-1)
    start = torch.cat([before[:-layer.bias.numel()].reshape(layer.weight.shape), before[-layer.bias.numel():, None]], 1).reshape(-1)
    return after - start, grad


def test_single_sample_step_is_the_exact_damped_natural_gradient():
    torch.manual_seed(3)
    layer = nn.Linear(4, 3).double()
    x, y = torch.randn(1, 4, dtype=torch.float64), torch.tensor([1])
    delta, grad = linear_step(layer, x, y, damping=0.05)
    exact_fisher = torch.outer(grad, grad)  # one sample: the Fisher is the gradient's outer product
    expected = -torch.linalg.solve(exact_fisher + 0.05 * torch.eye(grad.numel(), dtype=torch.float64), grad)
    torch.testing.assert_close(delta, expected, rtol=1e-9, atol=1e-11)


def test_batch_step_uses_mean_per_sample_kronecker_factors():
    torch.manual_seed(4)
    layer = nn.Linear(5, 3).double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    out = layer(x)
    per_sample_g = torch.softmax(out.detach(), 1) - F.one_hot(y, 3)  # d loss_n / d out_n
    a = torch.cat([x, torch.ones(16, 1, dtype=torch.float64)], 1)
    A = a.T @ a / 16
    G = per_sample_g.T @ per_sample_g / 16
    delta, grad = linear_step(layer, x, y, damping=0.01)
    expected = -torch.linalg.solve(torch.kron(G, A) + 0.01 * torch.eye(grad.numel(), dtype=torch.float64), grad)
    torch.testing.assert_close(delta, expected, rtol=1e-9, atol=1e-11)


def test_pi_corrected_and_inverse_methods_match_their_formulas():
    torch.manual_seed(5)
    layer = nn.Linear(5, 3).double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    probe = nn.Linear(5, 3).double()
    probe.load_state_dict(layer.state_dict())
    out = probe(x)
    g = torch.softmax(out.detach(), 1) - F.one_hot(y, 3)
    a = torch.cat([x, torch.ones(16, 1, dtype=torch.float64)], 1)
    A, G = a.T @ a / 16, g.T @ g / 16
    pi = math.sqrt((torch.trace(A) / 6) / (torch.trace(G) / 3))
    for method in ("eigen", "inverse"):
        layer.load_state_dict(probe.state_dict())
        delta, grad = linear_step(layer, x, y, damping=0.04, pi_correction=True, inverse_method=method)
        gi = torch.linalg.inv(G + 0.2 / pi * torch.eye(3, dtype=torch.float64))
        ai = torch.linalg.inv(A + pi * 0.2 * torch.eye(6, dtype=torch.float64))
        expected = -(gi @ grad.reshape(3, 6) @ ai).reshape(-1)
        torch.testing.assert_close(delta, expected, rtol=1e-9, atol=1e-11)


def test_embedding_single_token_step_is_exact():
    torch.manual_seed(6)
    emb = nn.Embedding(7, 4).double()
    head = nn.Linear(4, 2).double()
    model = nn.Sequential(emb, head)
    opt = natgrad.KFAC(model, lr=1.0, momentum=0.0, kl_clip=None, damping=0.1, skip_modules=["1"])
    idx, y = torch.tensor([3]), torch.tensor([1])
    before = emb.weight.detach().clone()
    F.cross_entropy(model(idx), y).backward()
    g_row = emb.weight.grad[3].clone()
    opt.step()
    expected = -torch.linalg.solve(torch.outer(g_row, g_row) + 0.1 * torch.eye(4, dtype=torch.float64), g_row)
    torch.testing.assert_close(emb.weight.detach()[3] - before[3], expected, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(emb.weight.detach()[[0, 1, 2, 4, 5, 6]], before[[0, 1, 2, 4, 5, 6]])


def test_trains_an_mlp_and_beats_sgd_per_step():
    x, y = data(n=128)
    kfac_model, sgd_model = mlp(), mlp()
    kfac = natgrad.KFAC(kfac_model, lr=0.3, damping=1e-2, kl_clip=1e-2)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.3, momentum=0.9)
    k_losses, s_losses = train(kfac_model, kfac, x, y, 40), train(sgd_model, sgd, x, y, 40)
    assert k_losses[-1] < 0.5 * k_losses[0]
    assert k_losses[-1] < s_losses[-1]


def test_param_groups_lr_and_scheduler():
    model = mlp()
    x, y = data()
    groups = [{"params": model[0].parameters(), "lr": 0.0}, {"params": model[2].parameters()}]
    opt = natgrad.KFAC(model, groups, lr=0.1, momentum=0.0)
    first = [p.detach().clone() for p in model[0].parameters()]
    train(model, opt, x, y, 2)
    for a, b in zip(first, model[0].parameters()):  # lr 0 group untouched
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)
    extra = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt.add_param_group({"params": [extra], "lr": 0.1})
    (F.cross_entropy(model(x), y) + (extra * torch.arange(3.0, dtype=torch.float64)).sum()).backward()
    opt.step()
    assert extra.detach().abs().sum() > 0  # added parameters get the fallback (plain gradient)
    assert "0.weight" in opt.describe() and "K-FAC linear" in opt.describe()


def test_lr_scheduler_scales_the_next_step_exactly():
    x, y = data()
    moves = []
    for use_scheduler in (False, True):
        model = mlp()
        opt = natgrad.KFAC(model, lr=0.1, momentum=0.0, kl_clip=None)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        train(model, opt, x, y, 1)
        if use_scheduler:
            sched.step()
        before = flat_params(model)
        train(model, opt, x, y, 1)
        moves.append(flat_params(model) - before)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    torch.testing.assert_close(moves[1], 0.5 * moves[0], rtol=1e-12, atol=0)


def test_closure_returns_loss_and_zero_grad_clears():
    model = mlp()
    x, y = data()
    opt = natgrad.KFAC(model, lr=0.1)
    loss = opt.step(lambda: (opt.zero_grad(), F.cross_entropy(model(x), y).backward(), torch.tensor(1.5))[-1])
    assert float(loss) == 1.5
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_gradient_accumulation_equals_the_full_batch():
    x, y = data(n=16)
    full, acc = mlp(), mlp()
    opt_full = natgrad.KFAC(full, lr=0.5, damping=1e-2)
    opt_acc = natgrad.KFAC(acc, lr=0.5, damping=1e-2)
    for _ in range(3):
        opt_full.zero_grad()
        F.cross_entropy(full(x), y).backward()
        opt_full.step()
        opt_acc.zero_grad()
        for part in range(2):  # two micro-batches, each loss divided by the number of parts
            sl = slice(8 * part, 8 * part + 8)
            (F.cross_entropy(acc(x[sl]), y[sl]) / 2).backward()
        opt_acc.step()
    torch.testing.assert_close(flat_params(acc), flat_params(full), rtol=1e-10, atol=1e-12)


def test_no_statistics_from_eval_or_no_grad_forwards():
    model = mlp()
    x, y = data()
    opt = natgrad.KFAC(model, lr=0.1)
    train(model, opt, x, y, 1)
    factors = {b.name: b.state["A"].clone() for b in opt.estimator.blocks}
    with torch.no_grad():
        model(x * 5)
    model.eval()
    F.cross_entropy(model(x * 7), y).backward()  # eval mode with grad: still not captured
    model.train()
    assert all(not c.records for c in opt.estimator.captures.values())
    with pytest.warns(UserWarning, match=r"eval mode.*model\.train\(\)"):
        opt.step()
    for b in opt.estimator.blocks:
        torch.testing.assert_close(b.state["A"], factors[b.name], rtol=0, atol=0)


def test_scheduled_periods_and_damping_are_called_with_the_step():
    model = mlp()
    x, y = data()
    seen = []
    opt = natgrad.KFAC(model, lr=0.1, factor_update_period=lambda s: 2, inverse_update_period=3,
                       damping=lambda s: seen.append(s) or 1e-2)
    counts = []
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        counts.append(sum(len(c.records) for c in opt.estimator.captures.values()))
        opt.step()
    assert counts == [2, 0, 2, 0]  # two layers captured on even steps only
    assert set(seen) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="factor_update_period"):
        bad = natgrad.KFAC(mlp(), factor_update_period=lambda s: 0)
        F.cross_entropy(bad.model(x), y).backward()


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(lr=-1.0), "lr"), (dict(momentum=1.0), "momentum"), (dict(weight_decay=-1e-4), "weight_decay"),
        (dict(damping=0.0), "damping"), (dict(damping=float("nan")), "damping"),
        (dict(factor_decay=1.0), "factor_decay"), (dict(factor_update_period=0), "factor_update_period"),
        (dict(inverse_update_period=2.5), "inverse_update_period"), (dict(kl_clip=0.0), "kl_clip"),
        (dict(inverse_method="cholesky"), "inverse_method"), (dict(fisher_type="true"), "fisher_type"),
        (dict(loss_reduction="none"), "loss_reduction"), (dict(linear_approx="x"), "linear_approx"),
        (dict(damping_adaptation_interval=0), "damping_adaptation_interval"),
        (dict(damping_adaptation_decay=1.0), "damping_adaptation_decay"),
        (dict(adaptive_damping=True, damping=lambda s: 1e-3), "damping"),
        (dict(factor_dtype=torch.int32), "factor_dtype"),
        (dict(factor_dtype=torch.bfloat16), "factor_dtype"), (dict(inverse_dtype=torch.float16), "inverse_dtype"),
    ],
)
def test_invalid_hyperparameters_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        natgrad.KFAC(mlp(), **kwargs)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="Invalid model"):
        natgrad.KFAC([torch.zeros(2, requires_grad=True)])


def test_adaptive_damping_follows_the_reduction_ratio():
    x, y = data(n=64)
    good = mlp()
    opt = natgrad.KFAC(good, lr=0.05, damping=1e-1, adaptive_damping=True, damping_adaptation_interval=1, kl_clip=None, momentum=0.0)
    train(good, opt, x, y, 6, closure=True)
    assert opt.last_reduction_ratio is not None and opt.last_reduction_ratio > 0.25
    assert opt.damping_multiplier < 1.0  # the quadratic model predicted well: less damping
    bad = mlp()
    opt = natgrad.KFAC(bad, lr=50.0, damping=1e-3, adaptive_damping=True, damping_adaptation_interval=1, kl_clip=None, momentum=0.0)
    train(bad, opt, x, y, 3, closure=True)
    assert opt.damping_multiplier > 1.0  # steps far too long: the model over-predicts, damping grows


def test_monte_carlo_fisher_matches_the_expected_fisher():
    """With one input repeated many times, sampled-label G → E_y[(p − e_y)(p − e_y)ᵀ] = diag(p) − ppᵀ."""
    torch.manual_seed(7)
    layer = nn.Linear(3, 4).double()
    x = torch.randn(1, 3, dtype=torch.float64).expand(20000, 3)
    y = torch.zeros(20000, dtype=torch.long)
    opt = natgrad.KFAC(layer, lr=0.0, fisher_type="mc", seed=1)
    out = layer(x)
    opt.sample_fisher(out)
    F.cross_entropy(out, y).backward()
    grad_before = layer.weight.grad.clone()
    opt.step()
    p = torch.softmax(out[0].detach(), 0)
    expected = torch.diag(p) - torch.outer(p, p)
    torch.testing.assert_close(opt.estimator.blocks[0].state["G"], expected, rtol=0, atol=0.02)
    torch.testing.assert_close(layer.weight.grad, grad_before)  # .grad untouched by sampling
    with pytest.raises(RuntimeError, match="fisher_type='mc'"):
        natgrad.KFAC(mlp()).sample_fisher(torch.zeros(2, 3))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_sequence_linear_factors_follow_expand_and_reduce_definitions(approx):
    """Linear on [N, T, d] inputs (weight shared over T), against Eschenhagen et al. (2023)."""
    torch.manual_seed(8)
    n, t = 6, 5
    model = nn.Linear(4, 3).double()
    x = torch.randn(n, t, 4, dtype=torch.float64)
    target = torch.randn(n, t, 3, dtype=torch.float64)
    opt = natgrad.KFAC(model, lr=0.0, linear_approx=approx)
    out = model(x)
    out.retain_grad()
    ((out - target) ** 2).sum(dim=(1, 2)).mean().backward()  # mean over samples of per-sample losses
    opt.step()
    a = torch.cat([x, torch.ones(n, t, 1, dtype=torch.float64)], -1)
    g = out.grad * n  # per-sample loss gradients
    if approx == "expand":
        rows_a, rows_g = a.reshape(-1, 5), g.reshape(-1, 3)
        A = rows_a.T @ rows_a / (n * t)
        G = t * rows_g.T @ rows_g / (n * t)  # G sums over the T shared positions
    else:
        mean_a, sum_g = a.mean(1), g.sum(1)
        A, G = mean_a.T @ mean_a / n, sum_g.T @ sum_g / n
    block = opt.estimator.blocks[0]
    torch.testing.assert_close(block.state["A"], A, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(block.state["G"], G, rtol=1e-10, atol=1e-12)


# ---- eigenvalue_correction (EKFAC) -------------------------------------------------------------


def test_ekfac_single_sample_step_is_the_exact_damped_natural_gradient():
    torch.manual_seed(3)
    layer = nn.Linear(4, 3).double()
    x, y = torch.randn(1, 4, dtype=torch.float64), torch.tensor([1])
    delta, grad = linear_step(layer, x, y, damping=0.05, eigenvalue_correction=True)
    expected = -torch.linalg.solve(torch.outer(grad, grad) + 0.05 * torch.eye(grad.numel(), dtype=torch.float64), grad)
    torch.testing.assert_close(delta, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kwargs", [dict(inverse_method="inverse"), dict(pi_correction=True)])
def test_ekfac_needs_the_eigen_method_without_pi(kwargs):
    with pytest.raises(ValueError, match=r"eigenvalue_correction.*" + next(iter(kwargs))):
        natgrad.KFAC(mlp(), eigenvalue_correction=True, **kwargs)
    with pytest.raises(ValueError, match="eigenvalue_correction"):
        natgrad.KFAC(mlp(), eigenvalue_correction="yes")


def test_ekfac_leaves_block_diagonal_factors_to_kfac_with_a_warning():
    net = nn.Sequential(nn.Linear(12, 7), nn.Tanh(), nn.Linear(7, 3))
    with pytest.warns(UserWarning, match=r"no EKFAC for '0' \(linear, block-diagonal factors: max_factor_dim\)"):
        opt = natgrad.KFAC(net, max_factor_dim=8, eigenvalue_correction=True)
    text = opt.describe()
    assert "EKFAC linear" in text and "K-FAC linear (expand); A 12 (+bias) > max_factor_dim 8" in text


def test_ekfac_is_described_and_attention_warns_that_it_keeps_kfac():
    net, (x, y) = mlp(), data()
    opt = natgrad.KFAC(net, eigenvalue_correction=True)
    train(net, opt, x, y, 1)
    assert "EKFAC linear (expand)" in opt.describe() and "K-FAC" not in opt.describe()
    mha = nn.ModuleDict(dict(att=nn.MultiheadAttention(4, 2), out=nn.Linear(4, 2)))
    with pytest.warns(UserWarning, match=r"eigenvalue_correction=True\): no EKFAC for 'att' \(attention\)"):
        natgrad.KFAC(mha, eigenvalue_correction=True)


def _ekfac_corrected(opt):
    return {b.name: b.state["corrected_eigenvalues"].clone() for b in opt.estimator.blocks}


def test_ekfac_resumes_exactly_from_a_state_dict():
    x, y = data()
    net = mlp()
    make = lambda m: natgrad.KFAC(m, lr=0.05, inverse_update_period=3, eigenvalue_correction=True)  # noqa: E731
    opt = make(net)
    train(net, opt, x, y, 4)
    twin = mlp()
    twin.load_state_dict(net.state_dict())
    resumed = make(twin)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))  # a copy: loading aliases the tensors
    for a, b in zip(_ekfac_corrected(opt).values(), _ekfac_corrected(resumed).values()):
        assert torch.equal(a, b)
    train(net, opt, x, y, 4)
    train(twin, resumed, x, y, 4)
    assert torch.equal(flat_params(net), flat_params(twin))


def test_ekfac_loads_a_kfac_checkpoint_from_the_kronecker_eigenvalues():
    x, y = data()
    net = mlp()
    plain = natgrad.KFAC(net, lr=0.05)
    train(net, plain, x, y, 2)
    ekfac = natgrad.KFAC(net, lr=0.05, eigenvalue_correction=True)
    ekfac.load_state_dict(plain.state_dict())
    for block in ekfac.estimator.blocks:
        s = block.state
        torch.testing.assert_close(s["corrected_eigenvalues"], torch.outer(s["g_eigenvalues"], s["a_eigenvalues"]),
                                   rtol=0, atol=0)
    train(net, ekfac, x, y, 1)
    assert torch.isfinite(flat_params(net)).all()


def test_ekfac_nan_batch_leaves_every_state_unchanged():
    x, y = data()
    net = mlp()
    opt = natgrad.KFAC(net, lr=0.05, eigenvalue_correction=True)
    train(net, opt, x, y, 2)
    before = {b.name: {k: v.clone() for k, v in b.state.items()} for b in opt.estimator.blocks}
    params = flat_params(net)
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        train(net, opt, bad, y, 1)
    assert sum(opt.nonfinite_skips.values()) >= 1
    assert torch.equal(flat_params(net), params)
    for b in opt.estimator.blocks:
        assert before[b.name].keys() == b.state.keys()
        assert all(torch.equal(before[b.name][k], v) for k, v in b.state.items())
