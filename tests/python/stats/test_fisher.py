"""natgrad.stats.fisher_information / closed_form_fisher against hand-derived closed forms.

Exact expectations (finite supports) must match to float64 precision; Monte-Carlo ones within
5 standard errors estimated from the Monte-Carlo sample itself (plus a tiny absolute slack for
entries whose summands are constant, where the standard error is 0).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import (
    Bernoulli,
    Beta,
    Binomial,
    Categorical,
    Exponential,
    Gamma,
    Geometric,
    Independent,
    Normal,
    Poisson,
    Uniform,
)

from natgrad import stats

DT = torch.float64
SEED = 1234
MC_SAMPLES = 50_000  # 5 SE is then ≤ 8 % of every non-zero diagonal entry below


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=DT) if len(values) != 1 else torch.tensor(values[0], dtype=DT)


def assert_fisher_close(res: stats.FisherInformation, expected: torch.Tensor) -> None:
    """Exact: rtol 1e-10. Monte Carlo: |F − F_ref| <= 5·SE (+1e-10) entrywise."""
    expected = expected.reshape(res.matrix.shape).to(DT)
    if res.exact:
        torch.testing.assert_close(res.matrix, expected, rtol=1e-10, atol=1e-12)
        return
    assert res.num_samples is not None and res.std_error is not None
    tol = 5.0 * res.std_error + 1e-10 * (1.0 + expected.abs())
    err = (res.matrix - expected).abs()
    assert (err <= tol).all(), f"MC Fisher off by {err.tolist()} > 5 SE {tol.tolist()}"


def assert_score_mean_zero(res: stats.FisherInformation) -> None:
    if res.exact:
        assert res.score_mean.abs().max() < 1e-12
    else:
        assert (res.score_mean.abs() <= 5.0 * res.score_mean_std_error + 1e-12).all()


def categorical_closed_form(logits: torch.Tensor) -> torch.Tensor:
    p = logits.softmax(-1)
    return torch.diag(p) - torch.outer(p, p)


# (id, factory, params, hand-derived Fisher information, expected to be exact)
CASES = [
    ("normal_mu_sigma", Normal, (t(0.3), t(1.7)), torch.diag(t(1 / 1.7**2, 2 / 1.7**2)), False),
    ("normal_mu_var", lambda m, v: Normal(m, v.sqrt()), (t(-0.4), t(2.5)), torch.diag(t(1 / 2.5, 1 / (2 * 2.5**2))), False),
    ("poisson_rate", Poisson, t(3.2), t(1 / 3.2), False),
    ("exponential_scale", lambda theta: Exponential(1.0 / theta), t(0.7), t(1 / 0.7**2), False),
    ("exponential_rate", Exponential, t(0.7), t(1 / 0.7**2), False),
    ("bernoulli_probs", lambda p: Bernoulli(probs=p), t(0.3), t(1 / (0.3 * 0.7)), True),
    ("binomial_probs", lambda p: Binomial(7, probs=p), t(0.35), t(7 / (0.35 * 0.65)), True),
    ("categorical_logits", lambda l: Categorical(logits=l), t(0.2, -1.0, 0.5, 1.3), categorical_closed_form(t(0.2, -1.0, 0.5, 1.3)), True),
]


@pytest.mark.parametrize("method", ["score", "hessian"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fisher_matches_closed_form(case, method):
    _, factory, params, expected, exact = case
    num_samples = None if exact else MC_SAMPLES
    res = stats.fisher_information(
        factory, params, method=method, num_samples=num_samples, generator=torch.Generator().manual_seed(SEED)
    )
    assert res.exact is exact and res.method == method
    assert res.matrix.dtype == DT and res.matrix.shape == expected.reshape(res.matrix.shape).shape
    if exact:
        assert res.num_samples is None and res.std_error is None and res.support_size > 0
    else:
        assert res.num_samples == MC_SAMPLES and res.support_size is None
    assert_fisher_close(res, expected)
    assert_score_mean_zero(res)
    torch.testing.assert_close(res.matrix, res.matrix.mT)


def test_score_and_hessian_definitions_agree_exactly_on_finite_supports():
    for _, factory, params, _, exact in CASES:
        if exact:
            a = stats.fisher_information(factory, params, method="score").matrix
            b = stats.fisher_information(factory, params, method="hessian").matrix
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_monte_carlo_on_a_finite_support_when_asked():
    p = t(0.3)
    res = stats.fisher_information(lambda q: Bernoulli(probs=q), p, exact=False, num_samples=5000, generator=torch.Generator().manual_seed(SEED))
    assert not res.exact and res.num_samples == 5000
    assert_fisher_close(res, t(1 / 0.21))


def test_monte_carlo_standard_error_shrinks_like_one_over_root_n():
    g = torch.Generator().manual_seed(SEED)
    small = stats.fisher_information(Poisson, t(2.0), num_samples=1000, generator=g)
    large = stats.fisher_information(Poisson, t(2.0), num_samples=16000, generator=g)
    ratio = float(small.std_error) / float(large.std_error)
    assert 3.0 < ratio < 5.5  # √16 = 4


def test_generator_makes_draws_reproducible_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = stats.fisher_information(Normal, (t(0.0), t(1.0)), num_samples=100, generator=torch.Generator().manual_seed(7))
    b = stats.fisher_information(Normal, (t(0.0), t(1.0)), num_samples=100, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.matrix, b.matrix)
    assert torch.equal(torch.get_rng_state(), state)


# ---- n i.i.d. observations carry n times the information --------------------------------------


def test_iid_batch_carries_n_times_the_information_exact():
    n = 9
    single = stats.fisher_information(lambda p: Bernoulli(probs=p), t(0.3))
    for factory in (lambda p: Bernoulli(probs=p.expand(n)), lambda p: Bernoulli(probs=p).expand((3, 3))):
        joint = stats.fisher_information(factory, t(0.3))
        torch.testing.assert_close(joint.matrix, n * single.matrix, rtol=1e-12, atol=0)
    logits = t(0.1, -0.3, 0.8)
    single = stats.fisher_information(lambda l: Categorical(logits=l), logits, method="hessian")
    joint = stats.fisher_information(lambda l: Categorical(logits=l.expand(n, 3)), logits, method="score")
    torch.testing.assert_close(joint.matrix, n * single.matrix, rtol=1e-12, atol=1e-14)


def test_independent_product_of_n_normals_carries_n_times_the_information():
    n, sigma = 6, 1.3
    factory = lambda m, s: Independent(Normal(m.expand(n), s.expand(n)), 1)  # noqa: E731
    expected = n * torch.diag(t(1 / sigma**2, 2 / sigma**2))
    for method in ("score", "hessian"):
        res = stats.fisher_information(factory, (t(0.5), t(sigma)), method=method, generator=torch.Generator().manual_seed(SEED))
        assert not res.exact
        assert_fisher_close(res, expected)
    torch.testing.assert_close(stats.closed_form_fisher(factory, (t(0.5), t(sigma))).matrix, expected, rtol=1e-12, atol=0)


def test_vector_parameters_with_batched_distribution():
    """Per-element parameters: the Fisher information is block diagonal over the elements."""
    mu, sigma = t(0.0, 1.0, -2.0), t(0.5, 1.0, 2.0)
    res = stats.closed_form_fisher(Normal, (mu, sigma))
    expected = torch.diag(torch.cat([1 / sigma**2, 2 / sigma**2]))
    torch.testing.assert_close(res.matrix, expected, rtol=1e-12, atol=0)
    assert res.param_shapes == (torch.Size([3]), torch.Size([3]))
    mc = stats.fisher_information(Normal, (mu, sigma), method="hessian", generator=torch.Generator().manual_seed(SEED))
    assert mc.num_samples == stats.DEFAULT_NUM_SAMPLES
    assert_fisher_close(mc, expected)


# ---- closed-form fast path against the generic computation ------------------------------------

FAST_PATH_CASES = [
    ("normal", Normal, (t(0.3), t(1.7))),
    ("normal_log_sigma", lambda m, log_s: Normal(m, log_s.exp()), (t(0.3), t(0.2))),
    ("bernoulli_logits", lambda l: Bernoulli(logits=l), t(-0.6)),
    ("bernoulli_probs_batched", lambda p: Bernoulli(probs=p), t(0.2, 0.5, 0.9)),
    ("binomial", lambda p: Binomial(5, probs=p), t(0.35)),
    ("geometric", lambda p: Geometric(probs=p), t(0.4)),
    ("categorical_logits", lambda l: Categorical(logits=l), t(0.2, -1.0, 0.5)),
    ("categorical_softmax_of_two", lambda a, b: Categorical(logits=torch.stack([a, b, torch.zeros_like(a)])), (t(0.3), t(-0.2))),
    ("poisson_log_rate", lambda eta: Poisson(eta.exp()), t(0.9)),
    ("exponential", Exponential, t(1.4)),
    ("gamma", Gamma, (t(2.5), t(1.5))),
    ("beta", Beta, (t(2.0), t(3.5))),
    ("independent_gamma", lambda a, b: Independent(Gamma(a.expand(2, 3), b.expand(2, 3)), 2), (t(1.5), t(0.8))),
]


@pytest.mark.parametrize("case", FAST_PATH_CASES, ids=[c[0] for c in FAST_PATH_CASES])
def test_closed_form_fast_path_matches_generic_computation(case):
    _, factory, params = case
    fast = stats.closed_form_fisher(factory, params)
    assert fast.method == "closed_form" and fast.exact
    for method in ("score", "hessian"):
        generic = stats.fisher_information(factory, params, method=method, generator=torch.Generator().manual_seed(SEED))
        assert_fisher_close(generic, fast.matrix)


def test_closed_form_matches_textbook_values():
    # Geometric (failures before the first success): 1 / (p²(1 − p)); Bernoulli by logit: p(1 − p).
    torch.testing.assert_close(stats.closed_form_fisher(lambda p: Geometric(probs=p), t(0.4)).matrix, t(1 / (0.16 * 0.6)).reshape(1, 1))
    p = torch.sigmoid(t(-0.6))
    torch.testing.assert_close(stats.closed_form_fisher(lambda l: Bernoulli(logits=l), t(-0.6)).matrix, (p * (1 - p)).reshape(1, 1))
    a, b = 2.5, 1.5  # Gamma(α, β): [[ψ₁(α), −1/β], [−1/β, α/β²]], ψ₁(2.5) = π²/2 − 4 − 4/9
    trigamma = math.pi**2 / 2 - 4 - 4 / 9
    expected = t(trigamma, -1 / b, -1 / b, a / b**2).reshape(2, 2)
    torch.testing.assert_close(stats.closed_form_fisher(Gamma, (t(a), t(b))).matrix, expected)
    assert stats.has_closed_form(Normal(0.0, 1.0)) and not stats.has_closed_form(Uniform(0.0, 1.0))


# ---- bad input ------------------------------------------------------------------------------


def test_non_floating_params_are_rejected():
    with pytest.raises(TypeError, match=r"params\[1\] must be a floating-point tensor, got dtype torch.int64"):
        stats.fisher_information(Normal, (t(0.0), torch.tensor(1)))
    with pytest.raises(TypeError, match="params must be a floating-point tensor"):
        stats.closed_form_fisher(Poisson, torch.tensor(3))
    with pytest.raises(TypeError, match=r"params\[0\] must be a floating-point tensor, got str"):
        stats.fisher_information(Normal, ("a", t(1.0)))
    with pytest.raises(ValueError, match="at least one parameter"):
        stats.fisher_information(Normal, ())


def test_params_without_gradient_path_are_rejected():
    with pytest.raises(ValueError, match=r"no gradient with respect to params\[1\]"):
        stats.fisher_information(lambda m, s: Normal(m, 1.0), (t(0.0), t(1.0)))
    with pytest.raises(ValueError, match=r"no gradient with respect to params"):
        stats.fisher_information(lambda p: Bernoulli(probs=p.detach()), t(0.3))
    with pytest.raises(ValueError, match=r"do not depend on params\[0\]"):
        stats.closed_form_fisher(lambda m, s: Normal(0.0, s), (t(0.0), t(1.0)))


def test_factory_failures_are_reported_with_the_shapes():
    with pytest.raises(ValueError, match=r"failed for params of shapes \[\(3,\), \(4,\)\]"):
        stats.fisher_information(Normal, (torch.zeros(3, dtype=DT), torch.ones(4, dtype=DT)))
    with pytest.raises(ValueError, match="failed for params"):
        stats.fisher_information(Normal, (t(0.0), t(-1.0)))  # scale outside its constraint
    with pytest.raises(TypeError, match="must return a torch.distributions.Distribution"):
        stats.fisher_information(lambda m: m * 2, t(0.0))
    with pytest.raises(TypeError, match="dist_factory must be callable"):
        stats.fisher_information(3, t(0.0))


def test_irregular_family_is_flagged_by_its_mean_score():
    # Uniform(a, b): the support moves with θ, E[s] = (1/(b−a), −1/(b−a)) ≠ 0
    with pytest.warns(RuntimeWarning, match="mean score .* of Uniform is not zero"):
        res = stats.fisher_information(Uniform, (t(0.0), t(2.0)), num_samples=100)
    torch.testing.assert_close(res.score_mean, t(0.5, -0.5))


def test_invalid_options_are_rejected():
    with pytest.raises(ValueError, match="method must be 'score' or 'hessian'"):
        stats.fisher_information(Normal, (t(0.0), t(1.0)), method="empirical")
    with pytest.raises(ValueError, match="exact=True needs a distribution with a finite support"):
        stats.fisher_information(Normal, (t(0.0), t(1.0)), exact=True)
    with pytest.raises(ValueError, match="num_samples must be an int >= 2"):
        stats.fisher_information(Normal, (t(0.0), t(1.0)), num_samples=1)
    with pytest.raises(TypeError, match="num_samples must be an int"):
        stats.fisher_information(Normal, (t(0.0), t(1.0)), num_samples=10.5)
    with pytest.raises(ValueError, match="num_samples is only used by the Monte-Carlo"):
        stats.fisher_information(lambda p: Bernoulli(probs=p), t(0.3), exact=True, num_samples=10)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        stats.fisher_information(Normal, (t(0.0), t(1.0)), generator=0)
    with pytest.raises(TypeError, match="no closed form for Uniform"):
        stats.closed_form_fisher(Uniform, (t(0.0), t(1.0)))
