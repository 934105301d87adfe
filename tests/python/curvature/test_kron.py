"""EKFAC in the Kronecker blocks: the corrected diagonal each factor step against a float64 loop
over per-sample gradients (torch.func) rotated into the same eigenbasis, and, for one sample,
the solve against the exact damped Fisher solve."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import natgrad
from natgrad.curvature import EmbeddingBlock, LinearBlock
from natgrad.curvature.kron import CORRECTED

F64 = torch.float64


class Sequence(nn.Module):
    """Linear over [N, T, d] positions -> tanh -> mean over positions -> Linear head."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)).mean(1))


class TwoCalls(nn.Module):
    """One Linear over two sequences of different lengths (its calls' positions are padded);
    ``second`` (the same weights by default) stands for the second call in the reference.
    """

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x, second=None):
        second = self.body if second is None else second
        return self.head(torch.tanh(self.body(x[:, :2])).mean(1) + torch.tanh(second(x[:, 2:])).mean(1))


class Tokens(nn.Module):
    """Embedding (with padding_idx) -> mean over tokens -> Linear head."""

    def __init__(self, padding_idx=None):
        super().__init__()
        self.emb, self.head = nn.Embedding(6, 4, padding_idx=padding_idx), nn.Linear(4, 3)

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx)).mean(1))


def _case(name):
    """(model, inputs, targets, layer under test, linear_approx)."""
    torch.manual_seed(0)
    y = torch.randint(0, 3, (5,))
    if name == "linear":
        net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        return net, torch.randn(5, 4, dtype=F64), y, "0", "expand"
    if name.startswith("sequence"):
        return Sequence().double(), torch.randn(5, 3, 4, dtype=F64), y, "body", name.split("_")[1]
    if name == "conv1d":
        net = nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=1), nn.Flatten(), nn.Tanh(), nn.LazyLinear(3)).double()
        x = torch.randn(5, 2, 7, dtype=F64)
        net(x)
        return net, x, y, "0", "expand"
    if name == "conv2d":
        net = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=2), nn.Flatten(), nn.Tanh(),
                            nn.LazyLinear(3)).double()
        x = torch.randn(5, 2, 7, 6, dtype=F64)
        net(x)  # materialise the lazy head
        return net, x, y, "0", "expand"
    net = Tokens(padding_idx=0 if name == "embedding_padded" else None).double()
    return net, torch.randint(0, 6, (5, 4)), y, "emb", "expand"


def _packed(block, grads: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
    """A layer's per-sample gradients [N, d_g, d_a] in the block's packed layout."""
    w = grads[f"{layer}.weight"]
    if isinstance(block, EmbeddingBlock):
        return w.mT
    w = w.reshape(w.shape[0], w.shape[1], -1)
    if f"{layer}.bias" not in grads:
        return w
    return torch.cat([w, grads[f"{layer}.bias"][..., None]], 2)


def _per_sample_grads(net, x, y):
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(net, p, (xi[None],)), yi[None])

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


@pytest.mark.parametrize("name", ["linear", "sequence_expand", "sequence_reduce", "conv1d", "conv2d", "embedding",
                                  "embedding_padded"])
def test_corrected_diagonal_is_the_ema_of_rotated_per_sample_gradients(name):
    net, x, y, layer, approx = _case(name)
    opt = natgrad.KFAC(net, lr=0.0, factor_decay=0.8, inverse_update_period=100, kl_clip=None,
                       eigenvalue_correction=True, linear_approx=approx)
    block = next(b for b in opt.estimator.blocks if b.name == layer)
    assert block.eigenvalue_correction and "EKFAC" in block.description
    for step in range(2):  # step 0: factors, eigenbasis, S = λ_G λ_Aᵀ; step 1: the EMA in that basis
        if step == 1:
            before = {k: v.clone() for k, v in block.state.items()}
            x1 = x.flip(0) if x.is_floating_point() else (x + 1) % 6
            x, y = x1, y.flip(0)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    s = block.state
    assert torch.equal(s["g_eigenvectors"], before["g_eigenvectors"])  # no refresh at step 1
    torch.testing.assert_close(before[CORRECTED], torch.outer(before["g_eigenvalues"], before.get(
        "a_eigenvalues", before["A"])), rtol=1e-12, atol=0)
    dw = _packed(block, _per_sample_grads(net, x, y), layer)
    vg, va = s["g_eigenvectors"], s.get("a_eigenvectors")
    rotated = vg.mT @ dw if va is None else vg.mT @ dw @ va
    expected = 0.8 * before[CORRECTED] + 0.2 * (rotated**2).mean(0)
    torch.testing.assert_close(s[CORRECTED], expected, rtol=1e-10, atol=1e-13)


def test_calls_of_one_layer_count_as_samples_like_its_factors():
    """A layer called twice per forward: as for its factors (count_samples), each call's samples
    are samples, so S averages over 2N per-(call, sample) gradients, each scaled by the 2N the
    loss mean is undone with: here 2 × the gradient through that call alone.
    """
    torch.manual_seed(0)
    net, x, y = TwoCalls().double(), torch.randn(5, 5, 4, dtype=F64), torch.randint(0, 3, (5,))
    opt = natgrad.KFAC(net, lr=0.0, factor_decay=0.6, inverse_update_period=100, kl_clip=None,
                       eigenvalue_correction=True)
    block = next(b for b in opt.estimator.blocks if b.name == "body")
    for step in range(2):
        if step == 1:
            before = block.state[CORRECTED].clone()
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    twin = nn.Linear(4, 5).double()
    twin.load_state_dict(net.body.state_dict())
    params = {k: v.detach() for k, v in net.named_parameters()}
    second = {k: v.detach() for k, v in twin.named_parameters()}

    def loss(p, q, xi, yi):
        return F.cross_entropy(functional_call(net, p, (xi[None], functional_call_module(twin, q))), yi[None])

    def functional_call_module(module, q):
        return lambda t: functional_call(module, q, (t,))

    first, other = vmap(grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))(params, second, x, y)
    dw = torch.cat([_packed(block, first, "body"), _packed(block, {f"body.{k}": v for k, v in other.items()}, "body")])
    s = block.state
    rotated = s["g_eigenvectors"].mT @ (2.0 * dw) @ s["a_eigenvectors"]
    torch.testing.assert_close(s[CORRECTED], 0.6 * before + 0.4 * (rotated**2).mean(0), rtol=1e-10, atol=1e-13)


def _one_sample(kind):
    torch.manual_seed(1)
    if kind == "linear":
        layer = nn.Linear(4, 3).double()
        x = torch.randn(1, 4, dtype=F64)
        return layer, x, LinearBlock("layer", layer)
    layer = nn.Embedding(5, 3).double()
    return layer, torch.tensor([[2]]), EmbeddingBlock("layer", layer)


@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_one_sample_solve_is_the_exact_damped_fisher_solve(kind):
    """One sample: F = vec(∇W) vec(∇W)ᵀ, and EKFAC's (F̂ + γI)⁻¹ g equals (F + γI)⁻¹ g."""
    layer, x, block = _one_sample(kind)
    out = layer(x)
    out.retain_grad()
    F.cross_entropy(out.reshape(1, -1)[:, :3], torch.tensor([1])).backward()
    params = [p for p in (layer.weight, getattr(layer, "bias", None)) if p is not None]
    g = torch.cat([p.grad.reshape(-1) for p in params])
    block.eigenvalue_correction = True
    block.update([x], [out.grad], decay=0.0, grad_scale=1.0)
    block.update_inverse("eigen", 0.0)
    block.update([x], [out.grad], decay=0.0, grad_scale=1.0)  # decay 0: S is this sample's estimate
    damping = 0.05
    fisher = torch.outer(g, g)
    expected = torch.linalg.solve(fisher + damping * torch.eye(g.numel(), dtype=F64), g)
    solved = block.solve([p.grad for p in params], damping)
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in solved]), expected, rtol=1e-10, atol=1e-12)


def test_refresh_carries_the_diagonal_into_the_new_basis():
    """At a refresh, S (after that step's EMA in the old basis) becomes the diagonal, in the new
    basis, of the dense matrix it stood for: diag(Qᵀ Q_old diag(S) Q_oldᵀ Q), Q = V_G ⊗ V_A."""
    net, x, y, layer, _ = _case("linear")
    opt = natgrad.KFAC(net, lr=0.0, factor_decay=0.7, inverse_update_period=2, kl_clip=None,
                       eigenvalue_correction=True)
    block = next(b for b in opt.estimator.blocks if b.name == layer)
    for step in range(3):  # refreshes at steps 0 and 2
        if step == 2:
            old = {k: v.clone() for k, v in block.state.items()}
        opt.zero_grad()
        F.cross_entropy(net(x[step:]), y[step:]).backward()
        opt.step()
    vg, va = old["g_eigenvectors"], old["a_eigenvectors"]
    rotated = vg.mT @ _packed(block, _per_sample_grads(net, x[2:], y[2:]), layer) @ va
    middle = 0.7 * old[CORRECTED] + 0.3 * (rotated**2).mean(0)
    s = block.state
    q_old, q = torch.kron(vg, va), torch.kron(s["g_eigenvectors"], s["a_eigenvectors"])
    assert not torch.allclose(q.abs(), q_old.abs())  # the basis did move
    dense = q_old @ torch.diag(middle.reshape(-1)) @ q_old.T
    expected = torch.diagonal(q.T @ dense @ q).reshape(middle.shape)
    torch.testing.assert_close(s[CORRECTED], expected, rtol=1e-10, atol=1e-13)


def test_float32_model_with_ekfac_trains():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(64, 3))
    x, y = torch.randn(16, 1, 4, 4), torch.randint(0, 3, (16,))
    opt = natgrad.KFAC(net, lr=0.1, inverse_update_period=2, eigenvalue_correction=True)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert all(b.state[CORRECTED].dtype == torch.float32 for b in opt.estimator.blocks)
