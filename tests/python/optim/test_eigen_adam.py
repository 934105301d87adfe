"""natgrad.EigenAdam against float64 references: torch.optim.AdamW (identity basis), SOAP's
algorithm written out from the paper (Shampoo basis), the dense K-FAC factors' eigenvectors
(K-FAC basis); checkpoints, faults, describe() and argument errors.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from support import data, mlp

BETAS = (0.9, 0.99)


def _batches(steps, n=16, d_in=6, classes=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, d_in, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g))
            for _ in range(steps)]


def _step(model, opt, x, y):
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss


def test_identity_basis_equals_adamw_with_groups_and_scheduler():
    model, ref = mlp(), mlp()
    layer_norm = nn.LayerNorm(3).double()
    ref_norm = copy.deepcopy(layer_norm)
    kw = dict(lr=0.01, betas=BETAS, eps=1e-8, weight_decay=0.05)

    def groups(m):
        return [{"params": m.parameters()}]

    opt = natgrad.EigenAdam(nn.Sequential(model, layer_norm), groups(model), basis="identity", grafting=None, **kw)
    opt.add_param_group({"params": layer_norm.parameters(), "lr": 0.03})
    adamw = torch.optim.AdamW(groups(ref), foreach=False, **kw)
    adamw.add_param_group({"params": ref_norm.parameters(), "lr": 0.03})
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5) for o in (opt, adamw)]
    for x, y in _batches(20):
        _step(nn.Sequential(model, layer_norm), opt, x, y)
        _step(nn.Sequential(ref, ref_norm), adamw, x, y)
        for s in scheds:
            s.step()
    for a, b in zip(list(model.parameters()) + list(layer_norm.parameters()),
                    list(ref.parameters()) + list(ref_norm.parameters())):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# ---- SOAP: the paper's algorithm (Vyas et al., 2024, Algorithms 3-4), written out independently ---


def _axis_of_each_column(q):
    """For each eigenvector (column), the coordinate axis it is closest to."""
    return torch.tensor([int(torch.argmax(q[:, j].abs())) for j in range(q.shape[1])])


def _soap_reference(w0, b0, batches, *, lr, betas, eps, wd, period):
    """One Linear layer, its weight and bias as one matrix X = [W, b]. The first moment is kept in
    the weight's coordinates and rotated every step; the second moment lives in the eigenbasis
    and, when a QR refresh sorts the eigenvectors by decreasing eigenvalue, is re-indexed with
    them. The basis used at step t comes from L and R through step t-1 (the paper refreshes after
    the update): step 0 runs in the identity basis, step 1 refreshes first (eigh; the second
    moment of step 0 follows each eigenvector's closest axis), then every ``period`` steps (QR).
    """
    beta1, beta2 = betas
    x_mat = torch.cat([w0, b0[:, None]], 1).clone()
    m = torch.zeros_like(x_mat)
    v = torch.zeros_like(x_mat)
    left = torch.zeros(x_mat.shape[0], x_mat.shape[0], dtype=torch.float64)
    right = torch.zeros(x_mat.shape[1], x_mat.shape[1], dtype=torch.float64)
    q = {"L": torch.eye(left.shape[0], dtype=torch.float64), "R": torch.eye(right.shape[0], dtype=torch.float64)}
    lam = {}
    for t, (inputs, targets) in enumerate(batches):
        w = x_mat[:, :-1].clone().requires_grad_()
        b = x_mat[:, -1].clone().requires_grad_()
        F.cross_entropy(F.linear(inputs, w, b), targets).backward()
        g = torch.cat([w.grad, b.grad[:, None]], 1)
        if t > 0 and (t == 1 or t % period == 0):
            for side, p_mat in (("L", left), ("R", right)):
                if t == 1:
                    lam[side], q[side] = torch.linalg.eigh(p_mat)
                    axes = _axis_of_each_column(q[side])
                    v = v[axes] if side == "L" else v[:, axes]
                    continue
                order = torch.argsort(lam[side], descending=True)
                v = v[order] if side == "L" else v[:, order]
                q_new = torch.linalg.qr(p_mat @ q[side][:, order]).Q
                lam[side] = torch.diagonal(q_new.T @ p_mat @ q_new)
                q[side] = q_new
        left = beta2 * left + (1 - beta2) * g @ g.T
        right = beta2 * right + (1 - beta2) * g.T @ g
        m = beta1 * m + (1 - beta1) * g
        g_rot = q["L"].T @ g @ q["R"]
        v = beta2 * v + (1 - beta2) * g_rot ** 2
        m_hat = (q["L"].T @ m @ q["R"]) / (1 - beta1 ** (t + 1))
        v_hat = v / (1 - beta2 ** (t + 1))
        n = q["L"] @ (m_hat / (v_hat.sqrt() + eps)) @ q["R"].T
        x_mat = x_mat * (1 - lr * wd) - lr * n
    return x_mat


def test_shampoo_basis_equals_a_soap_reference_across_refreshes():
    torch.manual_seed(4)
    layer = nn.Linear(6, 7).double()  # packed [7, 7]: both factors full rank after one step
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    batches = [(x, y % 7) for x, y in _batches(20, n=16, classes=7, seed=5)]
    kw = dict(lr=0.01, betas=(0.95, 0.95), eps=1e-8)
    opt = natgrad.EigenAdam(layer, basis="shampoo", basis_update_period=5, weight_decay=0.01, grafting=None, **kw)
    for x, y in batches:
        _step(layer, opt, x, y)
    expected = _soap_reference(w0, b0, batches, wd=0.01, period=5, lr=kw["lr"], betas=kw["betas"], eps=kw["eps"])
    torch.testing.assert_close(torch.cat([layer.weight, layer.bias[:, None]], 1).detach(), expected,
                               rtol=0, atol=1e-10)
    assert opt.layer_state[""]["refreshes"] == 4  # before steps 1, 5, 10 and 15


def test_kfac_basis_rotates_with_the_eigenvectors_of_the_dense_factors():
    torch.manual_seed(6)
    layer = nn.Linear(4, 5).double()
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    batches = [(x[:, :4], y) for x, y in _batches(3, n=32, classes=5, seed=7)]
    beta1, beta2, eps, lr = 0.9, 0.99, 1e-8, 0.02
    opt = natgrad.EigenAdam(layer, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=0.0,
                            basis_update_period=100, grafting=None)
    for x, y in batches:
        _step(layer, opt, x, y)
    # step 0 is AdamW's; step 1 takes the eigenvectors of A = E[ã ãᵀ] and G = E[g gᵀ] of the
    # first batch (the only refresh), carrying m by rotation and v by each eigenvector's closest axis
    x0, y0 = batches[0]
    x_tilde = torch.cat([x0, torch.ones(len(x0), 1, dtype=torch.float64)], 1)
    z = F.linear(x0, w0, b0).requires_grad_()
    F.cross_entropy(z, y0).backward()
    per_sample_grad_out = z.grad * len(x0)
    q_a = torch.linalg.eigh(x_tilde.T @ x_tilde / len(x0)).eigenvectors
    q_g = torch.linalg.eigh(per_sample_grad_out.T @ per_sample_grad_out / len(x0)).eigenvectors
    x_mat = torch.cat([w0, b0[:, None]], 1)
    m = torch.zeros_like(x_mat)
    v = torch.zeros_like(x_mat)
    for t, (x, y) in enumerate(batches, start=1):
        basis_g, basis_a = (q_g, q_a) if t > 1 else (torch.eye(5, dtype=torch.float64), torch.eye(5, dtype=torch.float64))
        if t == 2:
            m = q_g.T @ m @ q_a
            v = v[_axis_of_each_column(q_g)][:, _axis_of_each_column(q_a)]
        w, b = x_mat[:, :-1].clone().requires_grad_(), x_mat[:, -1].clone().requires_grad_()
        F.cross_entropy(F.linear(x, w, b), y).backward()
        g_rot = basis_g.T @ torch.cat([w.grad, b.grad[:, None]], 1) @ basis_a
        m, v = beta1 * m + (1 - beta1) * g_rot, beta2 * v + (1 - beta2) * g_rot ** 2
        direction = (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + eps)
        x_mat = x_mat - lr * basis_g @ direction @ basis_a.T
    torch.testing.assert_close(torch.cat([layer.weight, layer.bias[:, None]], 1).detach(), x_mat,
                               rtol=0, atol=1e-10)


# ---- checkpoints, faults, describe, errors ------------------------------------------------------


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3)).double()


@pytest.mark.parametrize("basis,grafting", [("kfac", None), ("shampoo", "adam"), ("kfac", "sgd")])
def test_state_dict_resumes_training_bitwise_across_refreshes(basis, grafting):
    batches = _batches(15)
    model = _model()
    opt = natgrad.EigenAdam(model, basis=basis, basis_update_period=4, warm_refreshes=1, grafting=grafting)
    for x, y in batches[:6]:
        _step(model, opt, x, y)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for x, y in batches[6:]:
        _step(model, opt, x, y)
    resumed = _model()
    resumed.load_state_dict(saved_model)
    opt2 = natgrad.EigenAdam(resumed, basis=basis, basis_update_period=4, warm_refreshes=1, grafting=grafting)
    opt2.load_state_dict(saved_opt)
    for x, y in batches[6:]:
        _step(resumed, opt2, x, y)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_load_state_dict_rejects_another_basis_or_width_and_changes_nothing():
    model = _model()
    opt = natgrad.EigenAdam(model, basis="shampoo")
    _step(model, opt, *_batches(1)[0])
    with pytest.raises(ValueError, match="basis='shampoo'"):
        natgrad.EigenAdam(_model(), basis="kfac").load_state_dict(opt.state_dict())
    wide = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.LayerNorm(9), nn.Linear(9, 3)).double()
    other = natgrad.EigenAdam(wide, basis="shampoo")
    with pytest.raises(ValueError, match="width"):
        other.load_state_dict(opt.state_dict())
    assert other.layer_state == {} and other._steps == 0


def test_nan_gradient_skips_that_layer_with_its_state_and_warns_once():
    model = _model()
    opt = natgrad.EigenAdam(model, basis="shampoo", basis_update_period=2)
    batches = _batches(4)
    for x, y in batches[:2]:
        _step(model, opt, x, y)
    before = copy.deepcopy(opt.layer_state["3"])
    params = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in batches[2:]:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            model[3].weight.grad[0, 0] = float("inf")
            opt.step()
    assert len([w for w in caught if "NaN or Inf" in str(w.message)]) == 1
    assert opt.nonfinite_skips == {"3": 2}
    after = list(model.parameters())
    assert torch.equal(after[4], params[4]) and torch.equal(after[5], params[5])
    assert not torch.equal(after[0], params[0])
    for key, value in before.items():
        now = opt.layer_state["3"][key]
        assert torch.equal(now, value) if isinstance(value, torch.Tensor) else now == value


def test_describe_names_the_basis_of_each_layer_and_adamw_for_the_rest():
    model = _model()
    text = natgrad.EigenAdam(model, basis="shampoo").describe()
    assert "0.weight" in text and "Adam in the Shampoo eigenbasis (SOAP) of linear [W, b] 8x7" in text
    assert "2.weight" in text and "AdamW: LayerNorm '2': natgrad.KFAC's diagonal Fisher" in text
    opt = natgrad.EigenAdam(model)
    _step(model, opt, *_batches(1)[0])
    assert "Adam in the eigenbasis of K-FAC linear" in opt.describe()


@pytest.mark.parametrize("kwargs,name", [
    (dict(lr=-1.0), "lr"), (dict(betas=(0.9, 1.0)), "betas"), (dict(betas=0.9), "betas"),
    (dict(eps=-1e-8), "eps"), (dict(weight_decay=-0.1), "weight_decay"), (dict(basis="adam"), "basis"),
    (dict(basis_update_period=0), "basis_update_period"), (dict(warm_refreshes=-1), "warm_refreshes"),
    (dict(grafting="lion"), "grafting"), (dict(shampoo_beta=1.0), "shampoo_beta"),
    (dict(factor_decay=1.5), "factor_decay"), (dict(factor_update_period=1.5), "factor_update_period"),
    (dict(max_factor_dim=0), "max_factor_dim"), (dict(linear_approx="mean"), "linear_approx"),
    (dict(factor_dtype=torch.float16), "factor_dtype"), (dict(skip_modules=["nope"]), "skip_modules"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        natgrad.EigenAdam(mlp(), **kwargs)


def test_bad_param_group_values_name_the_key():
    opt = natgrad.EigenAdam(mlp())
    with pytest.raises(ValueError, match="Invalid betas"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "betas": (1.2, 0.9)})
    with pytest.raises(ValueError, match="Invalid lr"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "lr": -1})


# ---- grafting: the step norm of each parameter is the grafted optimizer's ------------------------


def _adam_graft_norms(grads_per_step, beta2=0.99, eps=1e-8):
    """Float64 reference: ‖g / (√(v / (1 − β₂ᵗ)) + ε)‖ per step, v the EMA of g²."""
    v, out = torch.zeros_like(grads_per_step[0]), []
    for t, g in enumerate(grads_per_step, start=1):
        v = beta2 * v + (1 - beta2) * g * g
        out.append(float(torch.linalg.vector_norm(g / ((v / (1 - beta2 ** t)).sqrt() + eps))))
    return out


@pytest.mark.parametrize("optimizer", ["eigen_adam", "kfac"])
@pytest.mark.parametrize("grafting", ["adam", "sgd"])
def test_grafting_gives_each_parameter_the_grafted_step_norm(optimizer, grafting):
    model = mlp()
    lr = 0.05
    if optimizer == "kfac":
        opt = natgrad.KFAC(model, lr=lr, momentum=0.0, kl_clip=None, grafting=grafting)
        beta2 = 0.999
    else:
        opt = natgrad.EigenAdam(model, lr=lr, betas=(0.9, 0.99), weight_decay=0.0, grafting=grafting,
                                basis_update_period=2)
        beta2 = 0.99
    grads: dict[int, list] = {i: [] for i in range(4)}
    steps: dict[int, list] = {i: [] for i in range(4)}
    for x, y in _batches(5):
        before = [p.detach().clone() for p in model.parameters()]
        _step(model, opt, x, y)
        for i, (p, old) in enumerate(zip(model.parameters(), before)):
            grads[i].append(p.grad.detach().clone())
            steps[i].append(float(torch.linalg.vector_norm(p.detach() - old)) / lr)
    for i in range(4):
        expected = (_adam_graft_norms(grads[i], beta2) if grafting == "adam"
                    else [float(torch.linalg.vector_norm(g)) for g in grads[i]])
        assert steps[i] == pytest.approx(expected, rel=1e-9)


def test_kfac_grafting_keeps_the_preconditioned_direction():
    plain_model, graft_model = mlp(), mlp()
    kw = dict(lr=0.05, momentum=0.0, kl_clip=None)
    plain, grafted = natgrad.KFAC(plain_model, **kw), natgrad.KFAC(graft_model, grafting="sgd", **kw)
    x, y = data()
    p0 = [p.detach().clone() for p in plain_model.parameters()]
    _step(plain_model, plain, x, y)
    _step(graft_model, grafted, x, y)
    for a, b, old in zip(plain_model.parameters(), graft_model.parameters(), p0):
        da, db = (a - old).detach(), (b - old).detach()
        cosine = float((da * db).sum() / (da.norm() * db.norm()))
        assert math.isclose(cosine, 1.0, rel_tol=1e-12)
        assert float(db.norm()) == pytest.approx(0.05 * float(b.grad.norm()), rel=1e-10)
    with pytest.raises(ValueError, match="Invalid grafting"):
        natgrad.KFAC(mlp(), grafting="shampoo")


def test_kfac_grafting_resumes_bitwise_and_loads_a_checkpoint_saved_without_it():
    batches = _batches(8)
    model = mlp()
    opt = natgrad.KFAC(model, lr=0.05, grafting="adam")
    for x, y in batches[:3]:
        _step(model, opt, x, y)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for x, y in batches[3:]:
        _step(model, opt, x, y)
    resumed = mlp()
    resumed.load_state_dict(saved_model)
    opt2 = natgrad.KFAC(resumed, lr=0.05, grafting="adam")
    opt2.load_state_dict(saved_opt)
    for x, y in batches[3:]:
        _step(resumed, opt2, x, y)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    plain = natgrad.KFAC(mlp(), lr=0.05)
    _step(plain.model, plain, *batches[0])
    late = natgrad.KFAC(plain.model, lr=0.05, grafting="sgd")
    late.load_state_dict(plain.state_dict())
    _step(late.model, late, *batches[1])
    assert all(torch.isfinite(p).all() for p in late.model.parameters())
