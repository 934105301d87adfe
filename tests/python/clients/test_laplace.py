"""natgrad.integrations.laplace: laplace-torch's KronLaplace (and DiagLaplace) on natgrad's Fisher
equal laplace-torch's own with its curvlinops backend: the log marginal likelihood, the
predictive (glm, probit and mc-free link) and the factors, for classification and regression.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

laplace = pytest.importorskip("laplace")
pytest.importorskip("curvlinops")

from laplace import Laplace  # noqa: E402
from laplace.curvature import CurvlinopsEF, CurvlinopsGGN  # noqa: E402

from natgrad.integrations.laplace import NatgradBackend, NatgradEF, NatgradGGN  # noqa: E402


def problem(likelihood):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(),
                          nn.Linear(6, 3 if likelihood == "classification" else 2)).double()
    x = torch.randn(40, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (40,)) if likelihood == "classification" else torch.randn(40, 2, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    return model, loader, torch.randn(7, 4, dtype=torch.float64)


def fitted(model, loader, likelihood, backend, structure="kron"):
    la = Laplace(model, likelihood, subset_of_weights="all", hessian_structure=structure, backend=backend,
                 prior_precision=0.5, sigma_noise=0.7 if likelihood == "regression" else 1.0)
    la.fit(loader)
    return la


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("backends", [(NatgradGGN, CurvlinopsGGN), (NatgradEF, CurvlinopsEF)], ids=["ggn", "ef"])
def test_kron_laplace_equals_laplace_torchs_curvlinops_backend(likelihood, backends):
    model, loader, x_test = problem(likelihood)
    mine, theirs = (fitted(model, loader, likelihood, b) for b in backends)
    for a, b in zip(mine.H_facs.kfacs, theirs.H_facs.kfacs):
        assert len(a) == len(b)
        for fa, fb in zip(a, b):
            torch.testing.assert_close(fa, fb, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(mine.log_marginal_likelihood(), theirs.log_marginal_likelihood(), rtol=1e-10, atol=0)
    if likelihood == "classification":
        for link in ("probit", "bridge"):
            torch.testing.assert_close(mine(x_test, link_approx=link), theirs(x_test, link_approx=link),
                                       rtol=1e-9, atol=1e-12)
    else:
        for m, t in zip(mine(x_test), theirs(x_test)):
            torch.testing.assert_close(m, t, rtol=1e-9, atol=1e-12)


def test_natgrad_backend_is_the_ggn_and_its_diagonal_matches_laplace_torchs():
    assert NatgradBackend is NatgradGGN
    model, loader, x_test = problem("classification")
    mine, theirs = (fitted(model, loader, "classification", b, "diag") for b in (NatgradGGN, CurvlinopsGGN))
    torch.testing.assert_close(mine.H, theirs.H, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(mine.log_marginal_likelihood(), theirs.log_marginal_likelihood(), rtol=1e-10, atol=0)


def test_a_parameter_laplace_cannot_hold_raises_naming_it():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.bil, self.head = nn.Linear(4, 3), nn.Bilinear(3, 3, 3), nn.Linear(3, 2)

        def forward(self, x):
            h = self.lin(x)
            return self.head(self.bil(h, h))

    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 2, (8,))
    la = Laplace(Net().double(), "classification", subset_of_weights="all", hessian_structure="kron",
                 backend=NatgradGGN)
    with pytest.raises(ValueError, match="bil.weight"):
        la.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8))


def test_last_layer_kron_laplace_equals_laplace_torchs():
    model, loader, x_test = problem("classification")
    mine, theirs = (Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="kron",
                            backend=b) for b in (NatgradGGN, CurvlinopsGGN))
    for la in (mine, theirs):
        la.fit(loader)
    torch.testing.assert_close(mine.log_marginal_likelihood(), theirs.log_marginal_likelihood(), rtol=1e-10, atol=0)
    torch.testing.assert_close(mine(x_test, link_approx="probit"), theirs(x_test, link_approx="probit"),
                               rtol=1e-9, atol=1e-12)
