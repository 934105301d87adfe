"""natgrad.EWC against per-sample loops, nngeometry, dense Kronecker forms and its bookkeeping."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad


class Net(nn.Module):
    """Linear (hooks + C++ op), LayerNorm and a functional scale (torch.func path)."""

    def __init__(self, heads=1):
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.heads = nn.ModuleList([nn.Linear(6, 3) for _ in range(heads)])
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.heads[-1](torch.tanh(self.norm(self.body(x)))) * self.scale


def make(heads=1, dtype=torch.float64):
    torch.manual_seed(0)
    return Net(heads).to(dtype)


def batch(n=24, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def loop_diag(model, x, y, kind="empirical"):
    """Mean over samples of squared per-sample gradients (exact: weighted over classes)."""
    names = [n for n, p in model.named_parameters()]
    total = {n: 0 for n in names}
    for i in range(len(x)):
        out = model(x[i:i + 1])
        labels = [(int(y[i]), 1.0)] if kind == "empirical" else [
            (c, float(p)) for c, p in enumerate(torch.softmax(out, 1)[0].detach())]
        for c, w in labels:
            grads = torch.autograd.grad(F.cross_entropy(out, torch.tensor([c])), list(model.parameters()), retain_graph=True)
            for n, g in zip(names, grads):
                total[n] = total[n] + w * g.pow(2)
    return {n: t / len(x) for n, t in total.items()}


@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_diagonal_fisher_equals_the_per_sample_loop(kind):
    model, (x, y) = make(), batch()
    ewc = natgrad.EWC(model, fisher=kind)
    loader = [(x[:10], y[:10]), (x[10:], y[10:])]  # batches are averaged by size
    ewc.consolidate(loader)
    ref = loop_diag(model, x, y, kind)
    for n, value in ewc.tasks[0]["diag"].items():
        torch.testing.assert_close(value, ref[n], rtol=1e-10, atol=1e-14)
    assert set(ewc.tasks[0]["diag"]) == set(ref)


def test_exact_diagonal_fisher_equals_nngeometry():
    pytest.importorskip("nngeometry")
    from nngeometry.metrics import FIM
    from nngeometry.object import PMatDiag

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))  # float32: nngeometry's dtype
    x, y = batch(dtype=torch.float32)
    ewc = natgrad.EWC(model, fisher_type="exact")
    ewc.consolidate(x, y)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    ref = FIM(model=model, loader=loader, representation=PMatDiag, variant="classif_logits").get_diag()
    ours = torch.cat([ewc.tasks[0]["diag"][n].reshape(-1) for n, _ in model.named_parameters()])
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-7)


def test_squaring_the_batch_mean_gradient_underestimates_by_the_batch_size():
    """One-hot inputs put each sample's gradient on its own weight column: the squared
    batch-mean gradient is exactly N times smaller than the per-sample Fisher."""
    n = 8
    model = nn.Linear(n, 3, bias=False).double()
    x, y = torch.eye(n, dtype=torch.float64), torch.arange(n) % 3
    ewc = natgrad.EWC(model)
    ewc.consolidate(x, y)
    F.cross_entropy(model(x), y).backward()
    batch_mean_sq = model.weight.grad.pow(2)
    torch.testing.assert_close(ewc.tasks[0]["diag"]["weight"], n * batch_mean_sq, rtol=1e-12, atol=0)


def shifted(model, amount=0.05, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(amount * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_penalty_and_gradient_equal_plain_autograd():
    model, (x, y) = make(), batch()
    ewc = natgrad.EWC(model, lambda_=7.0)
    ewc.consolidate(x, y)
    star = {n: p.detach().clone() for n, p in model.named_parameters()}
    shifted(model)
    penalty = ewc.penalty()
    penalty.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = 3.5 * sum((ewc.tasks[0]["diag"][n] * (p - star[n]) ** 2).sum() for n, p in model.named_parameters())
    ref.backward()
    torch.testing.assert_close(penalty, ref.detach())
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad)


def test_kfac_penalty_equals_dense_kronecker_quadratic_form():
    model, (x, y) = make(), batch()
    ewc = natgrad.EWC(model, lambda_=2.0, structure="kfac")
    ewc.consolidate(x, y)
    star = {n: p.detach().clone() for n, p in model.named_parameters()}
    shifted(model)
    named = dict(model.named_parameters())
    expected = 0.0
    for names, block in ewc.tasks[0]["kron"].items():
        a, g = block.state["A"], block.state["G"]
        w, b = (named[n].detach() - star[n] for n in names)
        delta = torch.cat([w, b[:, None]], 1).reshape(-1)  # row-major vec: (G ⊗ A) acts on it
        expected += delta @ torch.kron(g, a) @ delta
    for n, f in ewc.tasks[0]["diag"].items():
        expected += (f * (named[n].detach() - star[n]) ** 2).sum()
    assert set(ewc.tasks[0]["diag"]) == {"norm.weight", "norm.bias", "scale"}
    torch.testing.assert_close(ewc.penalty().detach(), 0.5 * 2.0 * expected)


def test_online_mode_decays_the_fisher_over_three_tasks():
    model = make()
    ewc = natgrad.EWC(model, mode="online", gamma=0.5)
    single = natgrad.EWC(model)
    fishers = []
    for t in range(3):
        x, y = batch(seed=10 + t)
        ewc.consolidate(x, y)
        single.tasks = []
        single.consolidate(x, y)
        fishers.append(single.tasks[0]["diag"])
        shifted(model, seed=20 + t)
    assert len(ewc.tasks) == 1
    for n in fishers[0]:
        expected = 0.25 * fishers[0][n] + 0.5 * fishers[1][n] + fishers[2][n]
        torch.testing.assert_close(ewc.tasks[0]["diag"][n], expected)
    torch.testing.assert_close(ewc.tasks[0]["anchor"]["body.weight"], single.tasks[0]["anchor"]["body.weight"])


def test_separate_mode_sums_tasks_and_state_dict_round_trips():
    model = make()
    ewc = natgrad.EWC(model, lambda_=3.0)
    parts = []
    for t in range(3):
        x, y = batch(seed=30 + t)
        ewc.consolidate(x, y)
        one = natgrad.EWC(model, lambda_=3.0)
        one.tasks = [ewc.tasks[-1]]
        parts.append(one)
        shifted(model, seed=40 + t)
    assert len(ewc.tasks) == 3 and len(ewc.memory_per_task()) == 3
    torch.testing.assert_close(ewc.penalty(), sum(p.penalty() for p in parts))
    restored = natgrad.EWC(model, lambda_=99.0, mode="online")
    restored.load_state_dict(copy.deepcopy(ewc.state_dict()))
    assert restored.lambda_ == 3.0 and restored.mode == "separate"
    torch.testing.assert_close(restored.penalty(), ewc.penalty())
    kfac = natgrad.EWC(model, structure="kfac")
    kfac.consolidate(*batch())
    back = natgrad.EWC(model)
    back.load_state_dict(copy.deepcopy(kfac.state_dict()))
    torch.testing.assert_close(back.penalty(), kfac.penalty())


def test_new_head_is_not_penalised_and_missing_parameters_raise():
    model = make(heads=1)
    ewc = natgrad.EWC(model, lambda_=1.0)
    ewc.consolidate(*batch())
    model.heads.append(nn.Linear(6, 3).double())  # task 2's head
    shifted(model)
    ewc.penalty().backward()
    assert model.heads[1].weight.grad is None
    assert model.heads[0].weight.grad is not None
    del model.heads[1]
    del model.heads[0]
    with pytest.raises(ValueError, match="no longer exist.*heads.0.weight"):
        ewc.penalty()


@pytest.mark.parametrize("kwargs,name", [
    (dict(lambda_=-1.0), "lambda_"), (dict(lambda_=float("inf")), "lambda_"), (dict(gamma=1.5), "gamma"),
    (dict(mode="sum"), "mode"), (dict(structure="dense"), "structure"), (dict(fisher_type="true"), "fisher_type"),
    (dict(mc_samples=0), "mc_samples"),
])
def test_invalid_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        natgrad.EWC(make(), **kwargs)


def test_consolidation_restores_training_mode_and_works_with_kfac():
    model, (x, y) = make(), batch()
    model.train()
    ewc = natgrad.EWC(model, lambda_=100.0, fisher_type="mc")
    ewc.consolidate(x, y, generator=torch.Generator().manual_seed(0))
    assert model.training
    opt = natgrad.KFAC(model, lr=0.05)
    x2, y2 = batch(seed=5)
    for _ in range(5):
        opt.zero_grad()
        (F.cross_entropy(model(x2), y2) + ewc.penalty()).backward()
        opt.step()
    assert torch.isfinite(ewc.penalty()) and ewc.penalty() > 0


def test_kfac_structure_with_an_unused_head_gives_it_zero_curvature():
    model = make(heads=2)  # forward uses heads[-1] only: heads[0] is an old, unused head
    x, y = batch()
    ewc = natgrad.EWC(model, structure="kfac")
    ewc.consolidate(x, y)
    old = ewc.tasks[0]["kron"][("heads.0.weight", "heads.0.bias")]
    assert torch.count_nonzero(old.state["A"]) == 0 and torch.count_nonzero(old.state["G"]) == 0
    assert torch.count_nonzero(ewc.tasks[0]["kron"][("heads.1.weight", "heads.1.bias")].state["G"]) > 0


def test_penalty_overflow_is_inf_not_an_error():
    model = make(dtype=torch.float32)
    x, y = batch(dtype=torch.float32)
    ewc = natgrad.EWC(model)
    ewc.consolidate(x, y)
    with torch.no_grad():
        model.body.weight.add_(1e30)
    assert torch.isinf(ewc.penalty())


@pytest.mark.parametrize("structure", ["diagonal", "kfac"])
@pytest.mark.parametrize("fisher_type", ["empirical", "mc", "exact"])
def test_consolidate_after_a_divergence_raises_value_error_naming_the_task(structure, fisher_type):
    model, (x, y) = make(), batch()
    ewc = natgrad.EWC(model, structure=structure, fisher_type=fisher_type)
    ewc.consolidate(x, y, generator=torch.Generator().manual_seed(0))
    stored = copy.deepcopy(ewc.state_dict())
    with torch.no_grad():  # the next task's training diverged
        model.heads[-1].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"EWC.consolidate \(task 1\).*not finite.*nothing was stored"):
        ewc.consolidate(x, y, generator=torch.Generator().manual_seed(0))
    assert len(ewc.tasks) == 1 and ewc.revision == 1
    for key, value in stored["tasks"][0]["diag"].items():
        assert torch.equal(ewc.state_dict()["tasks"][0]["diag"][key], value)
