"""The Embedding block's factors against per-sample gradients (torch.func, float64): a sample's
repeated index is one row whose gradient is that sample's gradient of the weight row (a
constant input such as BERT's all-zero token_type_ids is one bias-like row per sample, not T
independent ones), and a call shared by the whole batch (position ids ``[1, T]`` broadcast over
it) is scaled as the sum of the batch's per-sample gradients."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import natgrad

F64 = torch.float64


class Tokens(nn.Module):
    """Token and position embeddings summed -> tanh -> mean over positions -> Linear head; the
    position ids are ``[1, T]``, broadcast over the batch, as in Hugging Face's BERT and GPT-2.
    """

    def __init__(self, vocab=6, positions=5, dim=4, classes=3):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(positions, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, idx):
        positions = torch.arange(idx.shape[1]).unsqueeze(0)
        return self.head(torch.tanh(self.tok(idx) + self.pos(positions)).mean(1))


def _factors(net, idx, y, **kwargs):
    """The blocks' factors after one factor step on (idx, y) with the batch-mean loss."""
    opt = natgrad.KFAC(net, lr=0.0, factor_decay=0.0, kl_clip=None, **kwargs)
    F.cross_entropy(net(idx), y).backward()
    opt.step()
    return {b.name: b.state for b in opt.estimator.blocks}


def _per_sample_grads(net, idx, y, name):
    """``[N, *weight.shape]``: each sample's gradient of ``name`` (its own loss)."""
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p, i, t):
        return F.cross_entropy(functional_call(net, p, (i.unsqueeze(0),)), t.unsqueeze(0))

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, idx, y)[name]


def test_a_repeated_index_is_one_row_holding_the_samples_gradient():
    """Each sample has 2 distinct tokens, one of them repeated: A counts (sample, token) pairs and
    G is (1/N) Σ over those pairs of the per-sample gradient row outer products."""
    torch.manual_seed(0)
    net = Tokens().double()
    idx = torch.tensor([[1, 1, 1, 4, 1], [2, 2, 3, 2, 3], [4, 4, 4, 4, 0]])
    y = torch.tensor([0, 2, 1])
    state = _factors(net, idx, y)["tok"]
    rows = _per_sample_grads(net, idx, y, "tok.weight")  # [N, vocab, dim]
    pairs = [(n, v) for n in range(3) for v in idx[n].unique().tolist()]
    expected_a = torch.bincount(torch.tensor([v for _, v in pairs]), minlength=6).to(F64) / len(pairs)
    expected_g = sum(torch.outer(rows[n, v], rows[n, v]) for n, v in pairs) / 3
    torch.testing.assert_close(state["A"], expected_a, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(state["G"], expected_g, rtol=1e-10, atol=1e-14)


def test_one_sample_of_one_repeated_index_gets_the_exact_fisher():
    """One sample whose every position holds the same index (BERT's token_type_ids): the
    Kronecker block is the exact Fisher vec(∇W) vec(∇W)ᵀ of that sample."""
    torch.manual_seed(1)
    net = Tokens().double()
    idx, y = torch.full((1, 5), 3), torch.tensor([2])
    state = _factors(net, idx, y)["tok"]
    gw = _per_sample_grads(net, idx, y, "tok.weight")[0]  # [vocab, dim]
    exact = torch.outer(gw.reshape(-1), gw.reshape(-1))
    kfac = torch.kron(torch.diag(state["A"]), state["G"])  # rows of W = (vocab, dim), row-major
    torch.testing.assert_close(kfac, exact, rtol=1e-10, atol=1e-14)


def test_a_call_shared_by_the_batch_is_scaled_as_the_sum_of_its_samples():
    """Position ids [1, T]: the captured output gradient is the batch's summed gradient ḡ (the
    weight's .grad of the mean loss), and G = N ḡᵀ ḡ (its outer product over N, an unbiased
    estimate of the Fisher when the per-sample gradients have mean zero), A = 1/T per position;
    the same model with the ids expanded to [N, T] gives the per-sample factors."""
    torch.manual_seed(2)
    net = Tokens().double()
    n = 4
    idx, y = torch.randint(0, 6, (n, 5)), torch.randint(0, 3, (n,))
    state = _factors(net, idx, y)["pos"]
    net.zero_grad()
    F.cross_entropy(net(idx), y).backward()
    mean_grad = net.pos.weight.grad  # [T, dim]: row t sums position t's gradient over the batch
    torch.testing.assert_close(state["A"], torch.full((5,), 1 / 5, dtype=F64), rtol=1e-12, atol=0.0)
    torch.testing.assert_close(state["G"], n * mean_grad.T @ mean_grad, rtol=1e-10, atol=1e-14)
    # The same positions fed per sample ([N, T]): each sample's own rows, G = Σ_i J_iᵀ J_i / N
    # (J_i: sample i's gradient of the weight), which the shared call's G estimates.
    expanded = Expanded().double()
    expanded.load_state_dict(net.state_dict())
    rows = _per_sample_grads(expanded, idx, y, "pos.weight")  # [N, T, dim]
    torch.testing.assert_close(rows.mean(0), mean_grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(_factors(expanded, idx, y)["pos"]["G"], torch.einsum("ntd,nte->de", rows, rows) / n,
                               rtol=1e-10, atol=1e-14)


class Expanded(Tokens):
    """:class:`Tokens` with the position ids expanded to ``[N, T]`` (one call per sample)."""

    def forward(self, idx):
        positions = torch.arange(idx.shape[1]).expand(idx.shape[0], -1)
        return self.head(torch.tanh(self.tok(idx) + self.pos(positions)).mean(1))
