"""natgrad.KFAC on the structures real clients build (Hugging Face, timm, Lightning), reproduced
with small plain-torch models: tied weights, models handed over in eval mode.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from support import TiedLM, tokens

VOCAB = 7


def lm_loss(model, x, y):
    """Mean next-token cross-entropy over every position."""
    return F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))


def rows(describe: str) -> dict[str, str]:
    """``describe()``'s table by parameter name."""
    return {line.split()[0]: line for line in describe.splitlines()[1:]}


def test_tied_weight_gets_the_output_projections_block_only():
    model = TiedLM(VOCAB)
    opt = natgrad.KFAC(model)
    tied = model.emb.weight
    covering = [b for b in opt.estimator.blocks if any(p is tied for p in b.params)]
    assert [b.name for b in covering] == ["lm_head"] and covering[0].kind == "linear"
    assert "emb" not in opt.estimator.captures and not model.emb._forward_hooks  # no hook doing work for nothing
    x, y = tokens(vocab=VOCAB)
    lm_loss(model, x, y).backward()
    opt.step()
    row = rows(opt.describe())["emb.weight"]
    assert "K-FAC linear" in row and "Linear 'lm_head'" in row and "shared by Embedding 'emb'" in row


def test_tied_weight_step_is_the_output_projections_preconditioned_gradient():
    model, damping = TiedLM(VOCAB), 0.03
    x, y = tokens(vocab=VOCAB)
    n, t = x.shape
    ref = copy.deepcopy(model)  # the reference, computed densely in float64
    h = ref.hidden(x).detach()
    out = ref.lm_head(h)
    grad_out, = torch.autograd.grad(F.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1)), out)
    grad_w = torch.autograd.grad(lm_loss(ref, x, y), ref.emb.weight)[0]  # both uses of the tied weight
    g = (grad_out * n).reshape(-1, VOCAB)  # per-sample output gradients ("mean" over n samples)
    a = h.reshape(-1, h.shape[-1])
    A, G = a.T @ a / (n * t), t * g.T @ g / (n * t)  # "expand": positions are extra rows
    eye = torch.eye(grad_w.numel(), dtype=torch.float64)
    expected = -torch.linalg.solve(torch.kron(G, A) + damping * eye, grad_w.reshape(-1)).reshape(grad_w.shape)

    opt = natgrad.KFAC(model, lr=1.0, momentum=0.0, kl_clip=None, damping=damping)
    before = model.emb.weight.detach().clone()
    lm_loss(model, x, y).backward()
    torch.testing.assert_close(model.emb.weight.grad, grad_w, rtol=1e-12, atol=1e-14)
    opt.step()
    torch.testing.assert_close(model.emb.weight.detach() - before, expected, rtol=1e-9, atol=1e-11)


def test_tied_lm_trains():
    model = TiedLM(VOCAB)
    x, y = tokens(n=16, vocab=VOCAB)
    opt = natgrad.KFAC(model, lr=0.1, damping=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = lm_loss(model, x, y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


class Mixed(nn.Module):
    """The layer types a describe() table reports: Kronecker, diagonal, skipped and frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 4)
        self.norm = nn.LayerNorm(4)
        self.body = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4)
        self.head = nn.Linear(4, VOCAB)
        self.frozen.weight.requires_grad_(False)

    def forward(self, idx):
        return self.head(self.frozen(torch.tanh(self.body(self.norm(self.emb(idx))))))


def test_describe_reports_planned_blocks_before_any_forward():
    model = Mixed().double()
    opt = natgrad.KFAC(model, skip_modules=["head"])
    planned = rows(opt.describe())
    assert not any("hooks fire" in row for row in planned.values())
    x, y = tokens(vocab=VOCAB)
    lm_loss(model, x, y).backward()
    opt.step()
    after = rows(opt.describe())
    assert set(planned) == set(after)
    for name, row in planned.items():  # the block planned is the block that runs
        if "plain gradient" in after[name]:  # with its reason, before and after
            assert row == after[name]
        else:
            assert row.startswith(after[name] + " (planned: from the first training-mode step")
    assert "K-FAC embedding" in planned["emb.weight"] and "K-FAC linear" in planned["body.weight"]
    assert "skip_modules" in planned["head.weight"] and "frozen" in planned["frozen.weight"]


class FreeUses(nn.Module):
    """A positional offset (traceable: a broadcasting add) and a weight used by a matmul (not)."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(3))
        self.mixing = nn.Parameter(torch.eye(3))

    def forward(self, x):
        return (x + self.offset) @ self.mixing


def test_describe_plans_a_free_parameter_only_if_its_use_can_be_traced():
    model = nn.Sequential(FreeUses(), nn.Linear(3, 2)).double()
    opt = natgrad.KFAC(model)
    planned = rows(opt.describe())
    for name in ("0.offset", "0.mixing"):
        assert "diagonal Fisher" in planned[name] and "if its uses can be traced, else the plain gradient" in planned[name]
    F.cross_entropy(model(torch.randn(8, 3, dtype=torch.float64)), torch.randint(0, 2, (8,))).backward()
    opt.step()
    after = rows(opt.describe())
    assert "diagonal Fisher" in after["0.offset"] and "planned" not in after["0.offset"]
    assert "plain gradient" in after["0.mixing"] and "matmul" in after["0.mixing"]


def test_eval_mode_warns_once_naming_train_and_describe_names_it():
    model = TiedLM(VOCAB).eval()  # as from_pretrained() hands it over
    opt = natgrad.KFAC(model, lr=0.1, momentum=0.0, kl_clip=None)
    x, y = tokens(vocab=VOCAB)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.zero_grad()
            lm_loss(model, x, y).backward()
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            opt.step()
    messages = [str(w.message) for w in caught if "eval mode" in str(w.message)]
    assert len(messages) == 1 and "model.train()" in messages[0]
    for name, p in model.named_parameters():  # nothing captured: the plain gradient step
        torch.testing.assert_close(p.detach(), before[name] - 0.1 * grads[name], rtol=1e-12, atol=1e-14)
    table = rows(opt.describe())
    assert all("eval mode" in row and "model.train()" in row for row in table.values())
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.zero_grad()
        lm_loss(model, x, y).backward()
        opt.step()
    assert not [w for w in caught if "eval mode" in str(w.message)]
    assert all("K-FAC linear" in row and "eval" not in row for row in rows(opt.describe()).values())


def test_training_with_eval_and_no_grad_forwards_on_the_side_does_not_warn():
    model = TiedLM(VOCAB)
    opt = natgrad.KFAC(model)
    x, y = tokens(vocab=VOCAB)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            opt.zero_grad()
            lm_loss(model, x, y).backward()
            model.eval()
            with torch.no_grad():
                lm_loss(model, x, y)  # a validation pass
            lm_loss(model, x, y)  # an eval forward with grad, next to the training one
            model.train()
            opt.step()
    assert not [w for w in caught if "eval mode" in str(w.message)]


def test_checkpoint_with_a_block_for_the_tied_embedding_still_loads():
    """Checkpoints saved before ties had one owner hold an Embedding block for the tied weight."""
    model = TiedLM(VOCAB)
    x, y = tokens(vocab=VOCAB)
    opt = natgrad.KFAC(model)
    lm_loss(model, x, y).backward()
    opt.step()
    state = opt.state_dict()
    old = copy.deepcopy(state)
    old["kfac"]["blocks"]["emb"] = {"kind": "embedding", "A": torch.ones(VOCAB, dtype=torch.float64)}
    other = natgrad.KFAC(TiedLM(VOCAB, seed=1))
    other.load_state_dict(old)
    for name, value in state["kfac"]["blocks"]["lm_head"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(other.estimator.state_dict("eigen")["blocks"]["lm_head"][name], value)
    old["kfac"]["blocks"]["elsewhere"] = old["kfac"]["blocks"].pop("emb")
    with pytest.raises(ValueError, match="elsewhere"):
        other.load_state_dict(old)
