"""The one curvature core: every block against the dense per-sample Fisher where K-FAC is exact,
its products against its own to_dense, and one estimator shared by KFAC, compute_fisher and EWC."""
from __future__ import annotations

import copy

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.curvature import Conv2dBlock, EmbeddingBlock, LinearBlock, PlainBlock
from natgrad.fisher import BlockFisher, compute_fisher, kfac_blocks


class Tokens(nn.Module):
    """Embedding -> mean over tokens -> Linear head."""

    def __init__(self, vocab=7, dim=4, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx)).mean(1))


def models():
    """(model, inputs, targets, name of the layer under test, its block class)."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    nobias = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Tanh(), nn.Linear(5, 3)).double()
    # a kernel that covers the whole (padded) input: one position, where KFC is exact
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=0), nn.Flatten(), nn.Tanh(), nn.Linear(3, 3)).double()
    tokens = Tokens().double()
    return [
        (mlp, torch.randn(1, 4, dtype=torch.float64), torch.tensor([2]), "0", LinearBlock),
        (nobias, torch.randn(1, 4, dtype=torch.float64), torch.tensor([1]), "0", LinearBlock),
        (conv, torch.randn(1, 2, 3, 3, dtype=torch.float64), torch.tensor([0]), "0", Conv2dBlock),
        (tokens, torch.tensor([[3]]), torch.tensor([1]), "emb", EmbeddingBlock),
    ]


@pytest.mark.parametrize("case", range(4), ids=["linear", "linear_nobias", "conv2d", "embedding"])
def test_block_is_exact_on_one_sample(case):
    model, x, y, layer, cls = models()[case]
    module = dict(model.named_modules())[layer]
    params = list(module.parameters())
    kfac = compute_fisher(model, x, y, structure="kfac", params=params)
    (block,) = kfac.blocks
    assert isinstance(block, BlockFisher) and isinstance(block.block, cls)
    dense = compute_fisher(model, x, y, structure="dense", params=params).to_dense()
    torch.testing.assert_close(block.to_dense(), dense, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", range(4), ids=["linear", "linear_nobias", "conv2d", "embedding"])
def test_block_products_agree_with_its_dense_matrix(case):
    model, x, y, layer, _ = models()[case]
    n = 9
    x = torch.randint(0, 7, (n, 5)) if x.dtype == torch.long else torch.randn(n, *x.shape[1:], dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    params = list(dict(model.named_modules())[layer].parameters())
    fisher = compute_fisher(model, x, y, structure="kfac", params=params).blocks[0]
    dense = fisher.to_dense()
    v = torch.randn(fisher.num_params, dtype=torch.float64)
    torch.testing.assert_close(fisher.mv(v), dense @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fisher.quad_form(v), v @ dense @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fisher.diagonal(), torch.diagonal(dense), rtol=1e-10, atol=1e-12)
    eye = torch.eye(fisher.num_params, dtype=torch.float64)
    torch.testing.assert_close(fisher.solve(v, 0.1), torch.linalg.solve(dense + 0.1 * eye, v), rtol=1e-8, atol=1e-10)
    cols = torch.randn(fisher.num_params, 2, dtype=torch.float64)
    torch.testing.assert_close(fisher.mv(cols), dense @ cols, rtol=1e-10, atol=1e-12)


def test_kfac_compute_fisher_and_ewc_share_one_estimator():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 4, (8,))
    opt = natgrad.KFAC(model, lr=0.0, loss_reduction="sum")
    F.cross_entropy(model(x), y, reduction="sum").backward()
    opt.step()
    fisher = compute_fisher(model, x, y, structure="kfac")
    ewc = natgrad.EWC(model, structure="kfac")
    ewc.consolidate(x, y)
    ewc_blocks = list(ewc.tasks[0]["kron"].values())
    for mine, theirs, kept in zip(opt.estimator.blocks, fisher.blocks, ewc_blocks, strict=True):
        for key in ("A", "G"):
            assert torch.equal(mine.state[key], theirs.block.state[key])
            assert torch.equal(mine.state[key], kept.state[key])


def test_mean_loss_factors_equal_the_summed_loss_factors():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 4, (10,))
    opt = natgrad.KFAC(model, lr=0.0)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    fisher = compute_fisher(model, x, y, structure="kfac")
    for mine, theirs in zip(opt.estimator.blocks, fisher.blocks, strict=True):
        torch.testing.assert_close(mine.state["G"], theirs.block.state["G"], rtol=1e-12, atol=1e-14)


def test_exact_fisher_passes_give_the_exact_kronecker_g():
    torch.manual_seed(3)
    layer = nn.Linear(3, 4).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    block = LinearBlock("", layer)
    kfac_blocks(layer, [block], x, fisher_type="exact")
    p = torch.softmax(layer(x), 1).detach()
    expected = sum(torch.diag(pi) - torch.outer(pi, pi) for pi in p) / 5  # E_y[gg'] per sample
    torch.testing.assert_close(block.state["G"], expected, rtol=1e-12, atol=1e-14)


def test_plain_block_is_the_identity_with_no_curvature():
    p = nn.Parameter(torch.randn(3, 2))
    block = PlainBlock("w", p, "LayerNorm has no Kronecker block")
    g = torch.randn(3, 2)
    assert block.solve([g], 0.1)[0] is g
    assert torch.count_nonzero(block.mv([g])[0]) == 0 and float(block.quad_form([g])) == 0.0
    assert block.description == "plain gradient: LayerNorm has no Kronecker block"


def test_checkpoint_shapes_are_checked_per_block():
    small = LinearBlock("fc", nn.Linear(3, 2))
    big = LinearBlock("fc", nn.Linear(5, 2))
    big.state["A"] = torch.eye(6)
    with pytest.raises(ValueError, match=r"'fc': A has shape \(6, 6\), this layer needs \(4, 4\)"):
        small.load_state_dict(big.state_dict())
    assert small.state == {}


def test_a_checkpoint_of_the_previous_release_still_loads_and_resumes_exactly():
    # Saved by natgrad 0.1.0 (commit 4a1f70c): a KFAC state after 3 steps, an EWC(kfac, exact)
    # state, and what 3 more steps of the old code gave.
    path = os.path.join(os.path.dirname(__file__), "..", "data", "kfac_ewc_v0_1_0.pt")
    ckpt = torch.load(path, weights_only=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    model.load_state_dict(ckpt["model"])
    opt = natgrad.KFAC(model, lr=0.1, momentum=0.9, inverse_update_period=2)
    opt.load_state_dict(ckpt["optimizer"])
    ewc = natgrad.EWC(model, structure="kfac")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading an old checkpoint is not deprecated
        ewc.load_state_dict(ckpt["ewc"])
    assert ewc.fisher_type == "exact"
    saved = ckpt["optimizer"]["kfac"]["blocks"]
    for block in opt.estimator.blocks:  # the curvature is restored as saved
        for key, value in saved[block.name].items():
            if key != "kind":
                torch.testing.assert_close(block.state[key], value, rtol=0, atol=0)
    # The trust region bounds the momentum-accumulated step, which the fixture's version did not,
    # so its own continuation (params_after_3_more_steps) is not this version's: resuming from the old
    # checkpoint must equal resuming from a copy of the same state (the checkpoint lost nothing).
    twin = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    twin.load_state_dict(model.state_dict())
    twin_opt = natgrad.KFAC(twin, lr=0.1, momentum=0.9, inverse_update_period=2)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for m, o in ((model, opt), (twin, twin_opt)):
        for _ in range(3):
            o.zero_grad()
            F.cross_entropy(m(ckpt["x"]), ckpt["y"]).backward()
            o.step()
    for got, want in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=0, atol=0)
    with torch.no_grad():  # the EWC penalty of 0.1.0 at 0.1.0's parameters
        for p, value in zip(model.parameters(), ckpt["params_after_3_more_steps"], strict=True):
            p.copy_(value)
    torch.testing.assert_close(ewc.penalty().detach(), ckpt["ewc_penalty_after"], rtol=1e-12, atol=1e-14)



def test_block_families_batch_the_kronecker_layers_and_serve_the_rest_one_at_a_time():
    from natgrad.curvature.block import CurvatureBlock, by_family
    from natgrad.curvature import KroneckerBlock
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 6), nn.LayerNorm(6),
                          nn.Unflatten(1, (1, 2, 3)), nn.Conv2d(1, 2, 2, padding=1), nn.Flatten(), nn.Linear(24, 3))
    opt = natgrad.KFAC(model, lr=0.1)
    groups = {family: [b.kind for b in blocks] for family, blocks in by_family(opt.estimator.blocks)}
    assert groups == {KroneckerBlock: ["linear", "conv2d", "linear"], CurvatureBlock: ["embedding", "norm"]}
    assert list(groups) == [KroneckerBlock, CurvatureBlock]  # the single-block path comes last
    x, y = torch.randint(0, 10, (16, 2)), torch.randint(0, 3, (16,))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    deltas = {p: torch.randn_like(p) for p in model.parameters()}
    forms = opt.estimator.quad_form(deltas)
    blocks = [b for b in opt.estimator.blocks if b.has_factors]
    assert forms == [float(b.quad_form([deltas[p] for p in b.params])) for b in blocks] and len(forms) == 5
