"""K-FAC for transformers: attention Kronecker blocks against an explicit nn.Linear
re-implementation and the exact Fisher, diagonal blocks against per-sample loops, whole
transformer models trained with every parameter in a curvature block, and the token-mean
scaling of G."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad

D = torch.float64


def with_bias(x, bias=True):
    return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], -1) if bias else x


def expand_factors(x, g, scale):
    """A = mean over rows of ããᵀ, G = scale · Σ_rows g gᵀ (the expand definition)."""
    a, g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    return a.T @ a / a.shape[0], scale * g.T @ g


class ExplicitAttention(nn.Module):
    """The same attention as nn.MultiheadAttention with nn.Linear projections (batch-first
    tensors [N, L, E]) — the reference the attention blocks are checked against."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        e, h = mha.embed_dim, mha.num_heads
        self.h = h
        bias = mha.in_proj_bias is not None
        self.q = nn.Linear(e, e, bias=bias).to(D)
        self.k = nn.Linear(mha.kdim, e, bias=bias).to(D)
        self.v = nn.Linear(mha.vdim, e, bias=bias).to(D)
        self.o = nn.Linear(e, e, bias=mha.out_proj.bias is not None).to(D)
        with torch.no_grad():
            ws = mha.in_proj_weight.chunk(3) if mha._qkv_same_embed_dim else (
                mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            for lin, w, i in zip((self.q, self.k, self.v), ws, range(3)):
                lin.weight.copy_(w)
                if bias:
                    lin.bias.copy_(mha.in_proj_bias[i * e:(i + 1) * e])
            self.o.weight.copy_(mha.out_proj.weight)
            if self.o.bias is not None:
                self.o.bias.copy_(mha.out_proj.bias)

    def forward(self, q, k, v, causal=False):
        n, lq, e = q.shape
        self.outs = [self.q(q), self.k(k), self.v(v)]
        for t in self.outs:
            t.retain_grad()
        qh, kh, vh = (t.reshape(n, t.shape[1], self.h, -1).transpose(1, 2) for t in self.outs)
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal).transpose(1, 2).reshape(n, lq, e)
        self.o_in = o.detach()
        self.o_out = self.o(o)
        self.o_out.retain_grad()
        return self.o_out


CASES = {  # name: (MHA kwargs, query is key is value, key is value)
    "self_batch_first": (dict(batch_first=True), True, True),
    "self_seq_first": (dict(batch_first=False), True, True),
    "cross_packed": (dict(batch_first=True), False, True),
    "separate_kdim_vdim": (dict(batch_first=False, kdim=3, vdim=5), False, False),
    "no_bias_distinct": (dict(batch_first=True, bias=False), False, False),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_attention_factors_equal_an_explicit_linear_reimplementation(case, approx):
    kwargs, self_attn, kv_same = CASES[case]
    torch.manual_seed(0)
    n, lq, lk, e = 3, 4, 5 if not self_attn else 4, 6
    mha = nn.MultiheadAttention(e, 2, **kwargs).to(D)
    q = torch.randn(n, lq, e, dtype=D)
    k = q if self_attn else torch.randn(n, lk, mha.kdim, dtype=D)
    v = k if kv_same else torch.randn(n, lk, mha.vdim, dtype=D)
    target = torch.randn(n, lq, e, dtype=D)
    opt = natgrad.KFAC(mha, lr=0.0, linear_approx=approx)

    def tr(t):
        return t if mha.batch_first else t.transpose(0, 1)
    out = mha(*(tr(t) for t in (q, k, v)), need_weights=False)[0]
    ((tr(out) - target) ** 2).sum(dim=(1, 2)).mean().backward()
    opt.step()

    ref = ExplicitAttention(mha)
    out_ref = ref(q, k, v)
    torch.testing.assert_close(out_ref, tr(out), rtol=1e-10, atol=1e-12)  # same function
    ((out_ref - target) ** 2).sum(dim=(1, 2)).mean().backward()
    block = next(b for b in opt.estimator.blocks if b.kind == "attention")
    out_block = next(b for b in opt.estimator.blocks if b.name == "out_proj")
    bias = mha.in_proj_bias is not None
    for s, x, y in zip("qkv", (q, k, v), ref.outs):
        a, g = with_bias(x, bias), y.grad * n  # per-sample gradients
        if approx == "expand":
            A, G = expand_factors(a, g, 1.0 / n)
        else:
            A, G = a.mean(1).T @ a.mean(1) / n, g.sum(1).T @ g.sum(1) / n
        torch.testing.assert_close(block.parts[s].state["A"], A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(block.parts[s].state["G"], G, rtol=1e-10, atol=1e-12)
    a, g = with_bias(ref.o_in, bias), ref.o_out.grad * n
    A, G = expand_factors(a, g, 1.0 / n) if approx == "expand" else (
        a.mean(1).T @ a.mean(1) / n, g.sum(1).T @ g.sum(1) / n)
    torch.testing.assert_close(out_block.state["A"], A, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out_block.state["G"], G, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("keys", [1, 3], ids=["self_one_token", "cross_one_query"])
def test_one_sample_one_token_blocks_equal_the_exact_fisher(keys):
    """One sample, one query token: for every projection that sees one row (q, out_proj; and
    k, v when the key is that token) A ⊗ G is the exact (empirical = outer product) Fisher."""
    torch.manual_seed(1)
    e = 4
    mha = nn.MultiheadAttention(e, 2, batch_first=True).to(D)
    head = nn.Linear(e, 3).to(D)
    q = torch.randn(1, 1, e, dtype=D)
    kv = q if keys == 1 else torch.randn(1, keys, e, dtype=D)
    y = torch.tensor([2])
    opt = natgrad.KFAC(mha, lr=0.0)
    loss = F.cross_entropy(head(mha(q, kv, kv, need_weights=False)[0][:, 0]), y)
    loss.backward()
    grads = [p.grad.reshape(-1).clone() for p in (mha.in_proj_weight, mha.in_proj_bias,
                                                  mha.out_proj.weight, mha.out_proj.bias)]
    opt.step()
    block = next(b for b in opt.estimator.blocks if b.kind == "attention")
    dense = block.to_dense()
    gw, gb = grads[0].reshape(3 * e, e), grads[1]
    exact_rows = "qkv" if keys == 1 else "q"
    for i, s in enumerate("qkv"):
        rows = slice(i * e, (i + 1) * e)
        flat = torch.cat([gw[rows].reshape(-1), gb[rows]])
        idx = torch.cat([torch.arange(i * e * e, (i + 1) * e * e), 3 * e * e + torch.arange(i * e, (i + 1) * e)])
        sub = dense[idx][:, idx]
        if s in exact_rows:
            torch.testing.assert_close(sub, torch.outer(flat, flat), rtol=1e-10, atol=1e-12)
    out_block = next(b for b in opt.estimator.blocks if b.name == "out_proj")
    flat = torch.cat([grads[2], grads[3]])
    torch.testing.assert_close(out_block.to_dense(), torch.outer(flat, flat), rtol=1e-10, atol=1e-12)


class Shifted(nn.Module):
    """A class token, x + pos, times a layer scale, LayerNorm, head: free parameters and a norm."""

    def __init__(self, t=3, d=4, classes=3):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, d, dtype=D))
        self.pos = nn.Parameter(torch.randn(t, d, dtype=D))
        self.gamma = nn.Parameter(torch.rand(d, dtype=D) + 0.5)
        self.ln = nn.LayerNorm(d).to(D)
        with torch.no_grad():
            self.ln.weight.uniform_(0.5, 1.5)
            self.ln.bias.normal_()
        self.head = nn.Linear(d, classes).to(D)

    def forward(self, x):
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), x + self.pos[: x.shape[1]]], 1)
        h = self.ln(torch.tanh(h * self.gamma))
        return self.head(h.mean(1))


def per_sample_diagonal(model, params, x, y):
    """mean over samples of squared per-sample gradients (a loop)."""
    total = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)
        for t, g in zip(total, grads):
            t += g * g / x.shape[0]
    return total


def test_diagonal_blocks_equal_the_per_sample_loop_for_layernorm_and_free_parameters():
    torch.manual_seed(2)
    model = Shifted()
    x, y = torch.randn(6, 3, 4, dtype=D), torch.randint(0, 3, (6,))
    opt = natgrad.KFAC(model, lr=0.0, linear_approx="reduce")
    F.cross_entropy(model(x), y).backward()
    opt.step()
    text = opt.describe()
    opt.remove_hooks()
    blocks = {b.name: b for b in opt.estimator.blocks}
    for name, params in (("cls", [model.cls]), ("pos", [model.pos]), ("gamma", [model.gamma]),
                         ("ln", [model.ln.weight, model.ln.bias])):
        expected = per_sample_diagonal(model, params, x, y)
        for got, want in zip(blocks[name].diagonal(), expected):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    assert "plain" not in text


@pytest.mark.parametrize("module", ["grouped_conv", "batchnorm"])
def test_per_sample_and_batchnorm_diagonals_equal_the_per_sample_loop(module):
    torch.manual_seed(3)
    first = nn.Conv2d(4, 4, 3, groups=2, padding=1) if module == "grouped_conv" else nn.BatchNorm2d(4)
    model = nn.Sequential(first, nn.Tanh(), nn.Flatten(), nn.Linear(4 * 9, 3)).to(D)
    x, y = torch.randn(5, 4, 3, 3, dtype=D), torch.randint(0, 3, (5,))
    opt = natgrad.KFAC(model, lr=0.0, linear_approx="reduce")
    F.cross_entropy(model(x), y).backward()
    opt.step()
    block = next(b for b in opt.estimator.blocks if b.name == "0")
    if module == "batchnorm":  # per-sample gradients with the batch statistics held fixed
        mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
        xhat = (x - mean) / torch.sqrt(var + first.eps)
        h = xhat * first.weight[:, None, None] + first.bias[:, None, None]
        h.retain_grad()
        F.cross_entropy(model[1:](h), y, reduction="sum").backward()
        g = h.grad
        expected = [((xhat * g).sum((2, 3)) ** 2).mean(0), (g.sum((2, 3)) ** 2).mean(0)]
    else:
        expected = per_sample_diagonal(model, list(first.parameters()), x, y)
    for got, want in zip(block.diagonal(), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_untraceable_free_parameter_falls_back_with_the_reason_and_skip_is_plain():
    class MatmulUse(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, dtype=D))
            self.ln = nn.LayerNorm(4).to(D)

        def forward(self, x):
            return self.ln(x) @ self.w

    model = MatmulUse()
    opt = natgrad.KFAC(model, lr=0.1, skip_modules=["ln"])
    x, y = torch.randn(5, 4, dtype=D), torch.randint(0, 3, (5,))
    before = model.w.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    text = opt.describe()
    assert "w " in text and "plain gradient: used by matmul" in text
    assert "ln.weight" in text and "skipped by skip_modules" in text
    assert not torch.equal(model.w, before) and torch.isfinite(model.w).all()


class Decoder(nn.Module):
    """Token embedding + positional parameter, TransformerDecoder (causal) over a memory, head."""

    def __init__(self, batch_first, vocab=7, d=8):
        super().__init__()
        self.bf = batch_first
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(5, d))
        layer = nn.TransformerDecoderLayer(d, 2, 16, dropout=0.0, batch_first=batch_first)
        self.dec = nn.TransformerDecoder(layer, 2)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx, memory):
        t = idx.shape[1]
        x = self.emb(idx) + self.pos[:t]
        if not self.bf:
            x, memory = x.transpose(0, 1), memory.transpose(0, 1)
        mask = nn.Transformer.generate_square_subsequent_mask(t, dtype=x.dtype)
        h = self.dec(x, memory, tgt_mask=mask, tgt_is_causal=True)
        return self.head(h if self.bf else h.transpose(0, 1))


class Encoder(nn.Module):
    def __init__(self, batch_first, vocab=7, d=8):
        super().__init__()
        self.bf = batch_first
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(5, d))
        layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=batch_first, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx, memory=None):
        x = self.emb(idx) + self.pos[: idx.shape[1]]
        x = x if self.bf else x.transpose(0, 1)
        h = self.enc(x)
        return self.head(h if self.bf else h.transpose(0, 1))


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_transformers_train_with_every_parameter_in_a_curvature_block(kind, batch_first):
    torch.manual_seed(4)
    make = Encoder if kind == "encoder" else Decoder
    model = make(batch_first).to(D)
    keys = list(model.state_dict())
    untouched = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 7, (4, 5), generator=g), torch.randn(4, 3, 8, generator=g, dtype=D)) for _ in range(6)]

    def step(m, opt, idx, mem):
        opt.zero_grad()
        loss = F.cross_entropy(m(idx, mem).reshape(-1, 7), idx.reshape(-1))
        loss.backward()
        opt.step()
        return float(loss.detach())

    kwargs = dict(lr=0.1, damping=1e-2, loss_reduction="token_mean", inverse_update_period=2)
    opt = natgrad.KFAC(model, **kwargs)
    idx, mem = data[0]
    torch.testing.assert_close(model(idx, mem), untouched(idx, mem), rtol=0, atol=0)  # bit-identical forward
    losses = [step(model, opt, *data[0]) for _ in range(3)]
    assert losses[-1] < losses[0]
    text = opt.describe()
    assert "plain" not in text, text
    assert all(b.has_factors for b in opt.estimator.blocks) and not opt.nonfinite_skips
    assert "attention" in text and "diagonal" in text
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for batch in data[1:4]:
        step(model, opt, *batch)
    resumed = make(batch_first).to(D)
    resumed.load_state_dict(saved_model)
    opt2 = natgrad.KFAC(resumed, **kwargs)
    opt2.load_state_dict(saved_opt)
    for batch in data[1:4]:
        step(resumed, opt2, *batch)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert list(model.state_dict()) == keys
    opt.remove_hooks()
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_token_mean_and_mean_scalings_of_the_sampled_fisher():
    """Logits [N, T, C] from one repeated input: with "token_mean" every row is a sample, so
    G → diag(p) − ppᵀ; with "mean" a sample's loss sums its T positions, so G → T (diag(p) − ppᵀ)
    (dividing the sampled loss by N·T there would make G T² too small)."""
    torch.manual_seed(5)
    n, t = 4000, 3
    layer = nn.Linear(3, 4).to(D)
    x = torch.randn(1, 1, 3, dtype=D).expand(n, t, 3)
    p = torch.softmax(layer(x[0, 0]).detach(), 0)
    expected = torch.diag(p) - torch.outer(p, p)
    for reduction, scale in (("token_mean", 1.0), ("mean", float(t))):
        opt = natgrad.KFAC(layer, lr=0.0, fisher_type="mc", seed=2, loss_reduction=reduction)
        out = layer(x)
        opt.sample_fisher(out)
        out.sum().backward()
        opt.step()
        torch.testing.assert_close(opt.estimator.blocks[0].state["G"], scale * expected, rtol=0, atol=0.03 * scale)
        opt.remove_hooks()


def test_token_mean_empirical_factors_treat_every_row_as_a_sample():
    torch.manual_seed(6)
    n, t = 5, 4
    layer = nn.Linear(3, 4).to(D)
    x, y = torch.randn(t, n, 3, dtype=D), torch.randint(0, 4, (t, n))  # seq-first: layout-free
    opt = natgrad.KFAC(layer, lr=0.0, loss_reduction="token_mean")
    out = layer(x)
    out.retain_grad()
    F.cross_entropy(out.reshape(-1, 4), y.reshape(-1)).backward()
    opt.step()
    g = out.grad * n * t  # per-token loss gradients
    A, G = expand_factors(with_bias(x), g, 1.0 / (n * t))
    torch.testing.assert_close(opt.estimator.blocks[0].state["A"], A, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(opt.estimator.blocks[0].state["G"], G, rtol=1e-10, atol=1e-12)


def test_sampled_fisher_reaches_every_block_of_a_transformer():
    torch.manual_seed(7)
    model = Encoder(batch_first=False).to(D)
    opt = natgrad.KFAC(model, lr=0.1, damping=1e-2, fisher_type="mc", loss_reduction="token_mean")
    idx = torch.randint(0, 7, (4, 5))
    logits = model(idx)
    opt.sample_fisher(logits)
    grads_before = [p.grad for p in model.parameters()]
    F.cross_entropy(logits.reshape(-1, 7), idx.reshape(-1)).backward()
    opt.step()
    assert all(g is None for g in grads_before)  # sampling leaves .grad alone
    assert all(b.has_factors for b in opt.estimator.blocks) and "plain" not in opt.describe()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("config", [
    dict(need_weights=True), dict(need_weights=False, key_padding_mask=True),
    dict(need_weights=True, key_padding_mask=True, attn_mask=True, average_attn_weights=False),
    dict(need_weights=False, attn_mask=True, add_zero_attn=True, batch_first=False),
    dict(need_weights=False, is_causal=True, add_bias_kv=True), dict(unbatched=True, need_weights=False)])
def test_the_reexpressed_attention_forward_is_bit_identical(config):
    """Outputs, attention weights and gradients of the re-expression (what KFAC runs on factor
    steps) equal nn.MultiheadAttention's own forward exactly, masks and options included."""
    from natgrad.curvature._mha import mha_forward
    config = dict(config)
    torch.manual_seed(8)
    bf = config.pop("batch_first", True)
    mha = nn.MultiheadAttention(6, 3, batch_first=bf, add_zero_attn=config.pop("add_zero_attn", False),
                                add_bias_kv=config.pop("add_bias_kv", False)).to(D)
    n, t = 2, 4
    x = torch.randn(t, 6, dtype=D) if config.pop("unbatched", False) else torch.randn(n, t, 6, dtype=D)
    if config.pop("key_padding_mask", False):
        config["key_padding_mask"] = torch.tensor([[False, False, True, False], [False, True, False, False]])
    if config.pop("attn_mask", False) or config.get("is_causal"):
        causal = nn.Transformer.generate_square_subsequent_mask(t, dtype=D)
        config["attn_mask"] = causal.isinf() if "key_padding_mask" in config else causal
    x = x if bf or x.dim() == 2 else x.transpose(0, 1)
    results = []
    plain = lambda stream, x, w, b: F.linear(x, w, b)  # noqa: E731
    for run in (mha, lambda *a, **k: mha_forward(mha, plain, *a, **k)):
        mha.zero_grad()
        out, weights = run(x, x, x, **config)
        out.square().sum().backward()
        results.append([out, weights] + [p.grad.clone() for p in mha.parameters()])
    for a, b in zip(*results):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
