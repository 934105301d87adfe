"""natgrad.fisher against a plain double-loop reference, nngeometry's FIM, and theory."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from natgrad.fisher import compute_fisher, score_rows
from support import batch, small_mlp


def loop_grad(model, loss):
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


def loop_empirical(model, x, y):
    u = torch.stack([loop_grad(model, F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])) for i in range(len(x))])
    return u.T @ u / len(x)


def loop_exact(model, x):
    total = 0
    for i in range(len(x)):
        p = torch.softmax(model(x[i:i + 1]), 1)[0].detach()
        for c in range(p.numel()):
            g = loop_grad(model, F.cross_entropy(model(x[i:i + 1]), torch.tensor([c])))
            total = total + p[c] * torch.outer(g, g)
    return total / len(x)


@pytest.mark.parametrize("structure", ["dense", "lowrank", "diagonal", "block_diagonal"])
def test_structures_equal_the_loop_reference(structure):
    model, (x, y) = small_mlp(), batch()
    ref = loop_empirical(model, x, y)
    fisher = compute_fisher(model, x, y, structure=structure, chunk_size=7)
    torch.testing.assert_close(fisher.diagonal(), torch.diagonal(ref), rtol=1e-10, atol=1e-13)
    if structure in ("dense", "lowrank"):
        torch.testing.assert_close(fisher.to_dense(), ref, rtol=1e-10, atol=1e-13)
    if structure == "block_diagonal":
        torch.testing.assert_close(fisher.blocks[0].to_dense(), ref[:25, :25], rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(fisher.blocks[1].to_dense(), ref[25:, 25:], rtol=1e-10, atol=1e-13)


def test_exact_categorical_fisher_equals_the_expectation_over_classes():
    model, (x, _) = small_mlp(), batch()
    torch.testing.assert_close(compute_fisher(model, x, fisher_type="exact").to_dense(), loop_exact(model, x), rtol=1e-10, atol=1e-13)


def test_exact_fisher_equals_nngeometry():
    nngeometry = pytest.importorskip("nngeometry")  # installed by scripts/env.sh
    from nngeometry.metrics import FIM
    from nngeometry.object import PMatDense, PMatDiag

    model = small_mlp(torch.float32)  # nngeometry builds float32 helpers internally
    x, y = batch(dtype=torch.float32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)
    dense = FIM(model=model, loader=loader, representation=PMatDense, variant="classif_logits").to_torch()
    torch.testing.assert_close(compute_fisher(model, x, fisher_type="exact").to_dense(), dense, rtol=1e-4, atol=1e-6)
    diag = FIM(model=model, loader=loader, representation=PMatDiag, variant="classif_logits").get_diag()
    torch.testing.assert_close(compute_fisher(model, x, fisher_type="exact", structure="diagonal").diagonal(), diag, rtol=1e-4, atol=1e-6)
    reg = small_mlp(torch.float32, out=2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.randn(20, 2)), batch_size=7)
    ref = FIM(model=reg, loader=loader, representation=PMatDense, variant="regression").to_torch()
    torch.testing.assert_close(compute_fisher(reg, x, fisher_type="exact", likelihood="gaussian").to_dense(), ref, rtol=1e-4, atol=1e-6)
    assert nngeometry is not None


def test_kfac_structure_is_exact_on_one_sample_and_consistent():
    model, (x, y) = small_mlp(), batch()
    one = compute_fisher(model, x[:1], y[:1], structure="kfac")
    ref = loop_empirical(model, x[:1], y[:1])
    torch.testing.assert_close(one.blocks[0].to_dense(), ref[:25, :25], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(one.blocks[1].to_dense(), ref[25:, 25:], rtol=1e-10, atol=1e-13)
    fisher = compute_fisher(model, x, fisher_type="exact", structure="kfac", chunk_size=6)
    dense = fisher.to_dense()
    v = torch.randn(dense.shape[0], dtype=torch.float64)
    torch.testing.assert_close(fisher.mv(v), dense @ v)
    torch.testing.assert_close(fisher.diagonal(), torch.diagonal(dense))
    torch.testing.assert_close(fisher.trace(), torch.trace(dense))
    torch.testing.assert_close(fisher.quad_form(v), v @ dense @ v)
    torch.testing.assert_close(fisher.solve(v, 0.1), torch.linalg.solve(dense + 0.1 * torch.eye(len(v), dtype=v.dtype), v))
    vs = torch.randn(dense.shape[0], 3, dtype=torch.float64)
    torch.testing.assert_close(fisher.solve(vs, 0.1), torch.linalg.solve(dense + 0.1 * torch.eye(len(v), dtype=v.dtype), vs))


def test_kfac_structure_on_conv_model_matches_theory_for_one_position():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 3, 4), nn.Flatten(), nn.Linear(3, 2)).double()  # 4x4 input -> 1 position
    x, y = torch.randn(1, 2, 4, 4, dtype=torch.float64), torch.tensor([1])
    fisher = compute_fisher(model, x, y, structure="kfac")
    g = loop_grad(model, F.cross_entropy(model(x), y))
    torch.testing.assert_close(fisher.blocks[0].to_dense(), torch.outer(g[:99], g[:99]), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("structure", ["dense", "lowrank", "diagonal", "block_diagonal", "kfac"])
def test_operations_are_consistent_with_the_dense_matrix(structure):
    model, (x, y) = small_mlp(), batch()
    fisher = compute_fisher(model, x, y, structure=structure)
    dense = fisher.to_dense()
    v = torch.randn(dense.shape[0], dtype=torch.float64)
    torch.testing.assert_close(fisher.mv(v), dense @ v)
    torch.testing.assert_close(fisher.trace(), torch.trace(dense))
    torch.testing.assert_close(fisher.solve(v, 0.5), torch.linalg.solve(dense + 0.5 * torch.eye(len(v), dtype=v.dtype), v))
    assert fisher.memory_bytes() > 0 and fisher.structure


def test_memory_of_structures_orders_as_documented():
    model, (x, y) = small_mlp(), batch()
    mem = {s: compute_fisher(model, x, y, structure=s).memory_bytes() for s in ("dense", "diagonal", "kfac", "block_diagonal")}
    assert mem["diagonal"] < mem["kfac"] < mem["block_diagonal"] < mem["dense"]


def test_mc_fisher_converges_to_the_exact_fisher():
    model, (x, _) = small_mlp(), batch(n=5)
    exact = compute_fisher(model, x, fisher_type="exact").to_dense()
    gen = torch.Generator().manual_seed(0)
    mc = compute_fisher(model, x, fisher_type="mc", mc_samples=4000, generator=gen).to_dense()
    assert (mc - exact).abs().max() < 0.05 * exact.abs().max()


def test_gaussian_exact_fisher_is_jacobian_gram():
    model = small_mlp(out=2)
    x, _ = batch(n=6)
    jac = torch.stack([torch.cat([j.reshape(2, -1) for j in torch.autograd.functional.jacobian(
        lambda *ps: torch.func.functional_call(model, dict(zip([n for n, _ in model.named_parameters()], ps)), (x[i:i + 1],))[0],
        tuple(model.parameters()))], 1) for i in range(6)])
    expected = torch.einsum("nop,noq->pq", jac, jac) / 6
    torch.testing.assert_close(compute_fisher(model, x, fisher_type="exact", likelihood="gaussian").to_dense(), expected)


def test_bad_input_raises_clear_errors():
    model, (x, y) = small_mlp(), batch()
    with pytest.raises(ValueError, match="Invalid structure"):
        compute_fisher(model, x, y, structure="full")
    with pytest.raises(ValueError, match="Invalid fisher_type"):
        compute_fisher(model, x, y, fisher_type="true")
    with pytest.raises(ValueError, match="Invalid chunk_size"):
        compute_fisher(model, x, y, chunk_size=0)
    with pytest.raises(ValueError, match="Invalid mc_samples"):
        compute_fisher(model, x, fisher_type="mc", mc_samples=0)
    with pytest.raises(ValueError, match="targets are required"):
        compute_fisher(model, x)
    with pytest.raises(ValueError, match="one entry per input"):
        compute_fisher(model, x, y[:5])
    frozen = nn.Parameter(torch.zeros(3), requires_grad=False)
    with pytest.raises(ValueError, match="does not require grad"):
        compute_fisher(model, x, y, params=[frozen])
    with pytest.raises(ValueError, match="Invalid damping"):
        compute_fisher(model, x, y).solve(torch.zeros(40, dtype=torch.float64), 0.0)
    with pytest.raises(ValueError, match="logits \\[n, classes\\]"):
        score_rows(nn.Linear(4, 3), torch.randn(3, 2, 4), fisher_type="exact")


def test_deprecated_spellings_warn_and_mean_the_same():
    model, (x, y) = small_mlp(), batch()
    new = compute_fisher(model, x, fisher_type="exact").to_dense()
    with pytest.warns(DeprecationWarning, match="kind= is deprecated"):
        old = compute_fisher(model, x, kind="exact").to_dense()
    assert torch.equal(old, new)
    with pytest.raises(TypeError, match="pass fisher_type= only"):
        compute_fisher(model, x, kind="exact", fisher_type="exact")
