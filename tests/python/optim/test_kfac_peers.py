"""natgrad.KFAC's Kronecker factors against curvlinops and against a dense per-sample Fisher.

curvlinops' ``KFACLinearOperator(fisher_type="empirical", kfac_approx="expand",
separate_weight_and_bias=False)`` with a mean-reduced loss uses natgrad's conventions exactly
(``A`` = mean over rows of ``ã ãᵀ`` with the bias as a last ones column, ``G`` =
``N² R`` · mean over rows of ``g gᵀ``), so after one step with ``factor_decay=0`` both must agree
to float64 round-off. The torch.func test needs no peer: for one sample and one output position
K-FAC is exact, so ``G ⊗ A`` must equal the dense Fisher ``∇ ∇ᵀ`` of that sample.
"""
from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import natgrad

curvlinops = pytest.importorskip("curvlinops")

RTOL = 1e-10


def natgrad_factors(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, tuple[str, Tensor, Tensor]]:
    """One natgrad.KFAC step (lr=0, factor_decay=0) on ``(x, y)``; {layer: (kind, A, G)}."""
    opt = natgrad.KFAC(model, lr=0.0, momentum=0.0, factor_decay=0.0)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    for p, q in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)  # lr=0 leaves weights alone
    return {b.name: (b.kind, b.state["A"], b.state["G"]) for b in opt.estimator.blocks}


def curvlinops_factors(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """curvlinops' empirical-Fisher K-FAC-expand factors of ``(x, y)``; {layer: (A, G)}."""
    op = curvlinops.KFACLinearOperator(
        model, nn.CrossEntropyLoss(), [p for p in model.parameters() if p.requires_grad], [(x, y)],
        fisher_type="empirical", kfac_approx="expand", separate_weight_and_bias=False,
        check_deterministic=False, num_data=x.shape[0], num_per_example_loss_terms=1)
    op.compute_kronecker_factors()
    state = op.state_dict()
    return {n: (state["input_covariances"][n], state["gradient_covariances"][n])
            for n in state["input_covariances"]}


def assert_same_factors(model: nn.Module, x: Tensor, y: Tensor, kinds: list[str]) -> None:
    ours = natgrad_factors(model, x, y)
    ref = curvlinops_factors(model, x, y)
    assert sorted(ours) == sorted(ref)
    assert [ours[n][0] for n in ref] == kinds
    for name, (a_ref, g_ref) in ref.items():
        _, a, g = ours[name]
        assert a.dtype == torch.float64 and a.shape == a_ref.shape and g.shape == g_ref.shape
        for what, got, want in (("A", a, a_ref), ("G", g, g_ref)):
            torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL * float(want.abs().max()),
                                       msg=lambda m: f"layer {name!r} factor {what}: {m}")


@pytest.mark.parametrize("bias", [(True, True, True), (False, False, False), (True, False, True)],
                         ids=["bias", "no-bias", "mixed"])
def test_mlp_factors_match_curvlinops(bias: tuple[bool, bool, bool]) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 9, bias=bias[0]), nn.ReLU(), nn.Linear(9, 7, bias=bias[1]),
                          nn.Tanh(), nn.Linear(7, 4, bias=bias[2])).double()
    x, y = torch.randn(13, 6, dtype=torch.float64), torch.randint(0, 4, (13,))
    assert_same_factors(model, x, y, ["linear"] * 3)


def test_cnn_factors_match_curvlinops() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(5, 4, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1), bias=False), nn.ReLU(),
        nn.Conv2d(4, 6, 1), nn.Tanh(),
        nn.Flatten(), nn.Linear(6 * 5 * 3, 3)).double()
    x, y = torch.randn(7, 3, 9, 8, dtype=torch.float64), torch.randint(0, 3, (7,))
    assert model[:-1](x).shape[1:] == (6 * 5 * 3,)
    assert_same_factors(model, x, y, ["conv2d"] * 3 + ["linear"])


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_conv2d_one_sample_one_position_is_exact(bias: bool) -> None:
    """For one sample and a 1x1 output map, G ⊗ A is the dense per-sample Fisher block of the
    Conv2d layer (weight.view(C_out, -1) in (c, kh, kw) order, bias as the last column)."""
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 3, 7, stride=2, padding=1, bias=bias)  # 5x5 input -> 1x1 output
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3, 4)).double()
    x, y = torch.randn(1, 2, 5, 5, dtype=torch.float64), torch.tensor([2])
    assert conv.double()(x).shape[2:] == (1, 1)
    factors = natgrad_factors(model, x, y)
    kind, a, g = factors["0"]
    assert kind == "conv2d"

    params = dict(model.named_parameters())

    def loss(p: dict[str, Tensor]) -> Tensor:
        return nn.functional.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    grads = torch.func.grad(loss)({k: v.detach() for k, v in params.items()})
    grad_matrix = grads["0.weight"].reshape(3, -1)
    if bias:
        grad_matrix = torch.cat([grad_matrix, grads["0.bias"].reshape(3, 1)], 1)
    flat = grad_matrix.reshape(-1)  # row-major: vec_r(g aᵀ) = g ⊗ a
    dense = torch.outer(flat, flat)
    torch.testing.assert_close(torch.kron(g, a), dense, rtol=RTOL, atol=RTOL * float(dense.abs().max()))
    # the Linear head sees one position too: its block is exact as well
    _, a_lin, g_lin = factors["3"]
    head = torch.cat([grads["3.weight"], grads["3.bias"].reshape(-1, 1)], 1).reshape(-1)
    torch.testing.assert_close(torch.kron(g_lin, a_lin), torch.outer(head, head), rtol=RTOL,
                               atol=RTOL * float(head.abs().max()) ** 2)
