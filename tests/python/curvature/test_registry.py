"""The registry's shared lookups: which module's block a tied weight gets (one rule for
natgrad.KFAC, natgrad.fisher's "kfac" structure and EWC).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.curvature import owner_groups, parameter_owners, parameter_users
from natgrad.fisher import BlockFisher
from support import TiedLM

VOCAB = 7


class TwinLinear(nn.Module):
    """Two Linear modules sharing one weight (neither sparse): the first owner wins."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 3)
        self.second = nn.Linear(3, 3, bias=False)
        self.second.weight = self.first.weight

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def test_tied_embedding_and_output_projection_belong_to_the_projection():
    model = TiedLM(VOCAB)
    tied = model.emb.weight
    assert [n for n, _ in parameter_users(model)[id(tied)]] == ["emb", "lm_head"]
    assert parameter_owners(model)[id(tied)] == ("lm_head", model.lm_head)
    groups = owner_groups(model, list(model.parameters()))
    assert [(name, idx) for name, _, idx in groups] == [("lm_head", [0]), ("mix", [1, 2])]


def test_weight_shared_by_dense_layers_belongs_to_the_first():
    model = TwinLinear()
    assert parameter_owners(model)[id(model.first.weight)] == ("first", model.first)
    opt = natgrad.KFAC(model)
    assert [b.name for b in opt.estimator.blocks if any(p is model.first.weight for p in b.params)] == ["first"]
    assert "second" not in opt.estimator.captures  # it owns nothing else: no hooks


def test_kfac_fisher_of_a_tied_lm_has_one_linear_block_for_the_tied_weight():
    model = TiedLM(VOCAB)
    x = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(4))
    y = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(5))
    fisher = natgrad.fisher.compute_fisher(model, x, y, structure="kfac")
    assert len(fisher.blocks) == 2  # the tied weight, then mix
    first = fisher.blocks[0]
    assert isinstance(first, BlockFisher) and first.block.name == "lm_head" and first.block.kind == "linear"
    h = model.hidden(x).detach()  # independent reference: per-sample factors of the projection
    out = model.lm_head(h)
    g = (torch.softmax(out.detach(), -1) - F.one_hot(y, VOCAB))  # per-sample d loss_n / d logits_n
    torch.testing.assert_close(first.block.state["A"], h.T @ h / 12, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(first.block.state["G"], g.T @ g / 12, rtol=1e-10, atol=1e-12)


def test_ewc_on_a_tied_lm_penalises_the_tied_weight_once_and_round_trips():
    x = torch.randint(0, VOCAB, (10,), generator=torch.Generator().manual_seed(6))
    y = torch.randint(0, VOCAB, (10,), generator=torch.Generator().manual_seed(7))
    for structure in ("diagonal", "kfac"):
        model = TiedLM(VOCAB)
        ewc = natgrad.EWC(model, structure=structure)
        ewc.consolidate(x, y)
        stored = set(ewc.tasks[0]["diag"]) | {n for names in ewc.tasks[0]["kron"] for n in names}
        assert stored == {"emb.weight", "mix.weight", "mix.bias"}, structure
        with torch.no_grad():  # not a constant shift: the softmax's G has the ones vector in its kernel
            model.emb.weight.add_(0.1 * torch.randn_like(model.emb.weight))
        penalty = ewc.penalty()
        assert torch.isfinite(penalty) and penalty > 0
        other = natgrad.EWC(TiedLM(VOCAB), structure=structure)
        other.model.load_state_dict(model.state_dict())
        other.load_state_dict(ewc.state_dict())
        torch.testing.assert_close(other.penalty(), penalty, rtol=1e-12, atol=0)
    per_sample = torch.stack([torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]),
                                                  model.emb.weight)[0] for i in range(10)])
    diagonal = natgrad.EWC(model)
    diagonal.consolidate(x, y)  # the tied weight's diagonal sums both uses: the exact per-sample one
    torch.testing.assert_close(diagonal.tasks[0]["diag"]["emb.weight"], per_sample.pow(2).mean(0),
                               rtol=1e-10, atol=1e-12)


def test_skipping_the_owner_leaves_the_tied_weight_on_the_plain_gradient():
    model = TiedLM(VOCAB)
    opt = natgrad.KFAC(model, skip_modules=["lm_head"])
    assert not [b for b in opt.estimator.blocks if any(p is model.emb.weight for p in b.params)]
    assert not opt.estimator.captures.keys() & {"emb", "lm_head"}
    row = next(line for line in opt.describe().splitlines() if line.startswith("emb.weight"))
    assert "skip_modules" in row and "shared by Embedding 'emb'" in row
