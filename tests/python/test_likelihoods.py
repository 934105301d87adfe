"""natgrad.likelihoods: the likelihood rules (written once in C++, csrc/likelihood/) against
float64 references written here from their definitions."""
from __future__ import annotations

import math

import pytest
import torch

from natgrad.likelihoods import LIKELIHOODS, get_likelihood

CAT, GAUSS = LIKELIHOODS["categorical"], LIKELIHOODS["gaussian"]


def test_per_sample_nll_equals_its_definition():
    logits = torch.randn(4, 3, 5, dtype=torch.float64)
    labels = torch.randint(5, (4, 3))
    expected = -torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1).sum(1)
    torch.testing.assert_close(CAT.nll(logits, labels, "none"), expected, rtol=0, atol=1e-12)
    means, y = torch.randn(4, 2, 3, dtype=torch.float64), torch.randn(4, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(GAUSS.nll(means, y, "none"), 0.5 * ((y - means) ** 2).sum((1, 2)), rtol=0, atol=1e-12)
    assert GAUSS.nll(means[:0], y[:0], "none").shape == (0,)  # an empty batch has no samples


def test_nll_is_differentiable():
    logits = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3, 1])
    (grad,) = torch.autograd.grad(CAT.nll(logits, labels), logits)
    expected = torch.softmax(logits.detach(), -1) - torch.nn.functional.one_hot(labels, 4)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)


def _output_fisher(lik, out, passes):
    """Σ_passes Σ_n w_n² ∇_f ℓ_n ∇_f ℓ_nᵀ per sample, [n, k, k], from autograd."""
    out = out.detach().requires_grad_(True)
    rows = []
    for target, weight in passes:
        (g,) = torch.autograd.grad(lik.weighted_nll(out, target, weight), out)
        rows.append(g.reshape(out.shape[0], -1))
    return sum(torch.einsum("ni,nj->nij", r, r) for r in rows)


def test_exact_passes_give_the_expected_fisher():
    logits = torch.randn(5, 4, dtype=torch.float64)
    p = torch.softmax(logits, -1)
    expected = torch.diag_embed(p) - torch.einsum("ni,nj->nij", p, p)  # Cov of the one-hot label
    fisher = _output_fisher(CAT, logits, CAT.pseudo_targets(logits, "exact"))
    torch.testing.assert_close(fisher, expected, rtol=0, atol=1e-12)
    means = torch.randn(5, 2, 3, dtype=torch.float64)
    fisher = _output_fisher(GAUSS, means, GAUSS.pseudo_targets(means, "exact"))
    torch.testing.assert_close(fisher, torch.eye(6, dtype=torch.float64).expand(5, 6, 6), rtol=0, atol=1e-12)


def test_mc_passes_draw_from_the_predictive_distribution_with_weight_one_over_sqrt_draws():
    logits = torch.randn(6, 3, 4)
    passes = CAT.pseudo_targets(logits, "mc", mc_samples=3, generator=torch.Generator().manual_seed(7))
    reference = torch.Generator().manual_seed(7)
    probs = torch.softmax(logits.reshape(-1, 4).float(), -1)
    for labels, weight in passes:
        expected = torch.multinomial(probs, 1, generator=reference).reshape(6, 3)
        assert torch.equal(labels, expected)
        torch.testing.assert_close(weight, torch.full((6,), 1 / math.sqrt(3)), rtol=0, atol=0)
    (labels, weight), = GAUSS.pseudo_targets(torch.zeros(4, 2, dtype=torch.float64), "mc",
                                             generator=torch.Generator().manual_seed(3))
    expected = torch.randn(4, 2, generator=torch.Generator().manual_seed(3)).double()
    assert weight is None and torch.equal(labels, expected)


def test_empirical_passes_are_the_checked_targets():
    logits, labels = torch.randn(3, 4), torch.tensor([1, 0, 3])
    (target, weight), = CAT.pseudo_targets(logits, "empirical", labels)
    assert target is labels or torch.equal(target, labels)
    assert weight is None
    with pytest.raises(ValueError, match="targets are required for fisher_type='empirical'"):
        CAT.pseudo_targets(logits, "empirical")


@pytest.mark.parametrize("lik,out,target,message", [
    (CAT, torch.randn(3, 4), torch.randn(3), r"targets must hold integer class indices for the categorical "
                                               r"likelihood, got dtype torch.float32"),
    (CAT, torch.randn(3, 4), torch.zeros(3, 1, dtype=torch.long), r"targets must have shape \(3,\)"),
    (CAT, torch.randn(3, 4), torch.tensor([0, 4, 1]), r"targets must be class indices in \[0, 4\), got values in \[0, 4\]"),
    (CAT, torch.randn(3, 4), torch.zeros(2, dtype=torch.long), r"one entry per sample: got shape \(2,\) for outputs of "
                                                               r"shape \(3, 4\)"),
    (GAUSS, torch.randn(10, 1), torch.randn(10), r"targets must have the outputs' shape \(10, 1\)"),
    (GAUSS, torch.randn(3, 2), torch.zeros(3, 2, dtype=torch.long), "must be floating point"),
])
def test_bad_targets_raise_value_errors_that_say_what_was_expected(lik, out, target, message):
    with pytest.raises(ValueError, match=message):
        lik.check(out, target)


def test_bad_choices_name_the_argument():
    with pytest.raises(ValueError, match="Invalid fisher_type: 'true'"):
        CAT.pseudo_targets(torch.randn(2, 3), "true")
    with pytest.raises(ValueError, match="Invalid mc_samples: 0"):
        CAT.pseudo_targets(torch.randn(2, 3), "mc", mc_samples=0)
    with pytest.raises(ValueError, match="Invalid likelihood: 'poisson'"):
        get_likelihood("poisson")


def test_opcheck_likelihood_ops():
    logits, labels = torch.randn(3, 4, requires_grad=True), torch.tensor([1, 0, 3])
    torch.library.opcheck(torch.ops.natgrad.likelihood_nll.default, ("categorical", logits, labels),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_bernoulli_nll_samples_and_exact_fisher_follow_their_definitions():
    bern = LIKELIHOODS["bernoulli"]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 2, 3, dtype=torch.float64, generator=g)
    y = torch.rand(5, 2, 3, dtype=torch.float64, generator=g)
    p = torch.sigmoid(logits)
    expected = -(y * torch.log(p) + (1 - y) * torch.log1p(-p)).sum((1, 2))
    torch.testing.assert_close(bern.nll(logits, y, "none"), expected, rtol=0, atol=1e-12)
    draws = bern.sample(logits[:1].expand(4000, 2, 3), torch.Generator().manual_seed(1))
    assert draws.shape == (4000, 2, 3) and set(draws.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(draws.mean(0), p[0], rtol=0, atol=0.05)
    # "exact": Σ_passes r rᵀ = diag(p(1 − p)) per sample, r = ∇_f nll(f, target)
    fisher = torch.zeros(5, 6, 6, dtype=torch.float64)
    for target, weight in bern.pseudo_targets(logits, "exact"):
        f = logits.clone().requires_grad_(True)
        (r,) = torch.autograd.grad(bern.weighted_nll(f, target, weight), f)
        fisher += r.flatten(1)[:, :, None] * r.flatten(1)[:, None, :]
    torch.testing.assert_close(fisher, torch.diag_embed((p * (1 - p)).flatten(1)), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="Bernoulli"):
        bern.check(logits, torch.ones(5, 6, dtype=torch.float64))
