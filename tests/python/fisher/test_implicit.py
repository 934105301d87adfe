"""The matrix-free Fisher (compute_fisher(structure="implicit")) and natgrad.solvers.conjugate_gradient
against the dense Fisher of tiny models (float64), closed forms and dense solves."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from natgrad.fisher import ImplicitFisher, compute_fisher
from natgrad.solvers import conjugate_gradient


class TinyRNN(nn.Module):
    """Embedding + an Elman recurrence (Linear layers in a loop over positions) + a head on the
    last state ([n, out]) or on every state ([n, T, out])."""

    def __init__(self, out: int, per_position: bool = False) -> None:
        super().__init__()
        self.emb, self.inp, self.rec, self.head = nn.Embedding(7, 4), nn.Linear(4, 5), nn.Linear(5, 5, bias=False), nn.Linear(5, out)
        self.per_position = per_position

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e, h, states = self.emb(x), None, []
        for t in range(x.shape[1]):
            h = torch.tanh(self.inp(e[:, t]) + (0 if h is None else self.rec(h)))
            states.append(h)
        return self.head(torch.stack(states, 1) if self.per_position else h)


def make(kind: str, out: int = 3) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        model, x = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, out)), torch.randn(13, 4, generator=g)
    elif kind == "cnn":
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2), nn.Flatten(), nn.Linear(8, out))
        x = torch.randn(9, 2, 5, 5, generator=g)
    else:
        model, x = TinyRNN(out, per_position=kind == "rnn_tokens"), torch.randint(0, 7, (8, 4), generator=g)
    model = model.double()
    return model, x.double() if x.is_floating_point() else x


def targets_for(model: nn.Module, x: torch.Tensor, likelihood: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        out = model(x)
    if likelihood == "gaussian":
        return torch.randn(out.shape, generator=g, dtype=out.dtype)
    return torch.randint(0, out.shape[-1], out.shape[:-1], generator=g)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "rnn"])
@pytest.mark.parametrize("fisher_type", ["empirical", "mc", "exact"])
@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_mv_equals_the_dense_fisher(kind, fisher_type, likelihood):
    model, x = make(kind)
    y = targets_for(model, x, likelihood)
    kwargs = dict(fisher_type=fisher_type, likelihood=likelihood, mc_samples=2, chunk_size=5)
    dense = compute_fisher(model, x, y, generator=torch.Generator().manual_seed(3), **kwargs).to_dense()
    fisher = compute_fisher(model, x, y, structure="implicit", generator=torch.Generator().manual_seed(3), **kwargs)
    assert isinstance(fisher, ImplicitFisher) and fisher.num_params == dense.shape[0]
    vs = torch.randn(dense.shape[0], 3, dtype=torch.float64)
    scale = dense.abs().max()
    torch.testing.assert_close(fisher.mv(vs[:, 0]), dense @ vs[:, 0], rtol=0, atol=1e-10 * scale)
    torch.testing.assert_close(fisher.mv(vs), dense @ vs, rtol=0, atol=1e-10 * scale)
    torch.testing.assert_close(fisher.quad_form(vs[:, 1]), vs[:, 1] @ dense @ vs[:, 1], rtol=1e-10, atol=0)
    torch.testing.assert_close(fisher.diagonal(), torch.diagonal(dense), rtol=0, atol=1e-10 * scale)


@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
def test_per_position_outputs_match_the_dense_fisher(fisher_type):
    model, x = make("rnn_tokens")
    y = targets_for(model, x, "categorical")
    kwargs = dict(fisher_type=fisher_type, mc_samples=3, chunk_size=3)
    dense = compute_fisher(model, x, y, generator=torch.Generator().manual_seed(4), **kwargs).to_dense()
    fisher = compute_fisher(model, x, y, structure="implicit", generator=torch.Generator().manual_seed(4), **kwargs)
    vs = torch.randn(dense.shape[0], 3, dtype=torch.float64)
    torch.testing.assert_close(fisher.mv(vs), dense @ vs, rtol=0, atol=1e-10 * dense.abs().max())


def test_exact_categorical_per_position_is_the_jacobian_sandwich():
    """Logits [n, T, C]: F = (1/n) Σ_i Σ_t J_itᵀ (diag p_it − p_it p_itᵀ) J_it, from explicit Jacobians."""
    model, x = make("rnn_tokens")
    names = [n for n, _ in model.named_parameters()]
    values = {n: p.detach() for n, p in model.named_parameters()}

    def out_of(vals, xi):
        return torch.func.functional_call(model, vals, (xi[None],))[0]

    jacs = torch.func.vmap(torch.func.jacrev(out_of), in_dims=(None, 0))(values, x)
    jac = torch.cat([jacs[n].reshape(*jacs[n].shape[:3], -1) for n in names], 3)  # [n, T, C, p]
    p = torch.softmax(model(x), -1).detach()
    h = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]
    expected = torch.einsum("ntcp,ntcd,ntdq->pq", jac, h, jac) / len(x)
    fisher = compute_fisher(model, x, fisher_type="exact", structure="implicit", chunk_size=3)
    vs = torch.randn(expected.shape[0], 3, dtype=torch.float64)
    torch.testing.assert_close(fisher.mv(vs), expected @ vs, rtol=0, atol=1e-10 * expected.abs().max())


def test_hutchinson_trace_is_within_its_standard_error():
    model, x = make("mlp")
    fisher = compute_fisher(model, x, fisher_type="exact", structure="implicit")
    dense = fisher.to_dense()
    probes = 400
    std = (2 * ((dense**2).sum() - (torch.diagonal(dense) ** 2).sum()) / probes).sqrt()
    estimate = fisher.trace(probes, generator=torch.Generator().manual_seed(0))
    assert abs(float(estimate - torch.trace(dense))) < 4 * float(std)
    assert float(std) < 0.1 * float(torch.trace(dense))  # the check is informative


@pytest.mark.parametrize("preconditioner", [None, "diagonal", "kfac"])
def test_cg_converges_to_the_dense_solve(preconditioner):
    model, x = make("cnn")
    y = targets_for(model, x, "categorical")
    fisher = compute_fisher(model, x, y, structure="implicit")
    dense = fisher.to_dense()
    b = torch.randn(dense.shape[0], dtype=torch.float64)
    pre = None if preconditioner is None else compute_fisher(model, x, y, structure=preconditioner)
    result = conjugate_gradient(fisher, b, damping=1e-2, preconditioner=pre, tol=1e-12, max_iters=500)
    system = dense + 1e-2 * torch.eye(len(b), dtype=b.dtype)
    torch.testing.assert_close(result.solution, torch.linalg.solve(system, b), rtol=1e-8, atol=1e-9)
    assert result.converged and len(result.residuals) == result.iterations + 1
    assert result.residuals[0] == pytest.approx(1.0) and result.residuals[-1] <= 1e-12
    true = float(torch.linalg.vector_norm(b - system @ result.solution) / torch.linalg.vector_norm(b))
    assert true < 1e-10
    warm = conjugate_gradient(fisher, b, damping=1e-2, preconditioner=pre, x0=result.solution, tol=1e-9)
    assert warm.iterations == 0 and warm.converged
    torch.testing.assert_close(fisher.solve(b, 1e-2), torch.linalg.solve(system, b), rtol=1e-8, atol=1e-9)


def digits_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """An MLP (64-16-10, float64) on all 1797 scikit-learn digits, briefly trained: n·C ≫ p, the
    regime where the Fisher has full rank and its conditioning follows the layers' structure."""
    sklearn = pytest.importorskip("sklearn.datasets")
    data = sklearn.load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float64)
    y = torch.tensor(data.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y


def test_kfac_preconditioned_cg_needs_fewer_iterations():
    model, x, y = digits_mlp()
    fisher = compute_fisher(model, x, y, fisher_type="exact", structure="implicit", chunk_size=2048)
    kfac = compute_fisher(model, x, y, fisher_type="exact", structure="kfac", chunk_size=2048)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))])
    plain = conjugate_gradient(fisher, g, damping=1e-5, tol=1e-3, max_iters=1000)
    pre = conjugate_gradient(fisher, g, damping=1e-5, preconditioner=kfac, tol=1e-3, max_iters=1000)
    assert plain.converged and pre.converged
    assert 2 * pre.iterations < plain.iterations, (pre.iterations, plain.iterations)


def test_bad_input_raises_clear_errors():
    model, x = make("mlp")
    y = targets_for(model, x, "categorical")
    fisher = compute_fisher(model, x, y, structure="implicit")
    p = fisher.num_params
    good = torch.ones(p, dtype=torch.float64)
    for bad in (torch.full((p,), float("nan"), dtype=torch.float64), good.clone().index_fill_(0, torch.tensor([3]), float("inf"))):
        with pytest.raises(ValueError, match="v holds NaN or Inf"):
            fisher.mv(bad)
        with pytest.raises(ValueError, match="b holds NaN or Inf"):
            conjugate_gradient(fisher, bad, damping=0.1)
    with pytest.raises(ValueError, match=rf"v must have shape \[{p}\]"):
        fisher.mv(torch.ones(p + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=rf"v must have shape \[{p}\]"):
        fisher.quad_form(torch.ones(p, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=rf"b must be a vector of shape \[{p}\]"):
        conjugate_gradient(fisher, torch.ones(p - 1, dtype=torch.float64), damping=0.1)
    with pytest.raises(ValueError, match=rf"x0 must be a vector of shape \[{p}\]"):
        conjugate_gradient(fisher, good, damping=0.1, x0=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="floating-point"):
        fisher.mv(torch.ones(p, dtype=torch.long))
    for damping in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="Invalid damping"):
            conjugate_gradient(fisher, good, damping=damping)
        with pytest.raises(ValueError, match="Invalid damping"):
            fisher.solve(good, damping)
    with pytest.raises(ValueError, match="Invalid preconditioner_damping"):
        conjugate_gradient(fisher, good, damping=0.1, preconditioner=fisher, preconditioner_damping=0.0)
    with pytest.raises(ValueError, match="Invalid tol"):
        conjugate_gradient(fisher, good, damping=0.1, tol=0)
    with pytest.raises(ValueError, match="Invalid max_iters"):
        conjugate_gradient(fisher, good, damping=0.1, max_iters=0)
    with pytest.raises(ValueError, match="not positive definite"):
        conjugate_gradient(fisher, good, damping=0.1, preconditioner=lambda r: -r)
    with pytest.raises(ValueError, match="Invalid num_probes"):
        fisher.trace(0)
    with pytest.raises(ValueError, match="loss_fn"):
        ImplicitFisher(model, x, fisher_type="exact", loss_fn=lambda o, t: o.sum())
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="parameters changed in place"):
        fisher.mv(good)


def test_unconverged_solve_warns():
    model, x = make("mlp")
    fisher = compute_fisher(model, x, fisher_type="exact", structure="implicit")
    with pytest.warns(RuntimeWarning, match="stopped after 2 iterations"):
        fisher.solve(torch.ones(fisher.num_params, dtype=torch.float64), 1e-3, max_iters=2)
    assert fisher.last_solve.iterations == 2 and not fisher.last_solve.converged


@pytest.mark.parametrize("structure", ["dense", "implicit"])
def test_vectors_follow_the_order_of_params(structure):
    """The flat layout is the order of ``params`` (as documented), not the model's order."""
    model, x = make("mlp")
    y = targets_for(model, x, "categorical")
    params = list(model.parameters())
    full = compute_fisher(model, x, y).to_dense()
    starts = torch.cumsum(torch.tensor([0] + [p.numel() for p in params]), 0).tolist()
    perm = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in reversed(range(len(params)))])
    got = compute_fisher(model, x, y, params=params[::-1], structure=structure).to_dense()
    torch.testing.assert_close(got, full[perm][:, perm], rtol=0, atol=1e-12)
