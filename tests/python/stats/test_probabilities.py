"""natgrad.stats on probability parameters near and on the boundary of their range.

torch clamps probabilities to [eps, 1 − eps] before taking logits (zero derivative outside),
so every information computed through log_prob used to be 0 below eps; and on the boundary,
where the information is infinite, it returned 0 instead of raising. References are the
closed forms, evaluated in float64 with Python floats.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.distributions import (
    Bernoulli,
    Binomial,
    Categorical,
    ContinuousBernoulli,
    Geometric,
    Multinomial,
    NegativeBinomial,
    Normal,
    OneHotCategorical,
)

from natgrad import stats

DT = torch.float64


def simplex_fisher(q: list[float], n: float = 1.0) -> torch.Tensor:
    """Fisher information of Categorical(probs=q) (Σq = 1) in q: n·(diag(1/q) − 11ᵀ)."""
    k = len(q)
    return n * (torch.diag(torch.tensor([1.0 / v for v in q], dtype=DT)) - torch.ones(k, k, dtype=DT))


# (id, factory, p, dtype, closed form) with probabilities far below eps of the dtype
TINY = [
    ("bernoulli_f32", lambda p: Bernoulli(probs=p), 1e-9, torch.float32, lambda p: 1 / (p * (1 - p))),
    ("bernoulli_f64", lambda p: Bernoulli(probs=p), 1e-20, DT, lambda p: 1 / (p * (1 - p))),
    ("bernoulli_near_one_f64", lambda p: Bernoulli(probs=p), 1 - 2**-40, DT, lambda p: 1 / (p * (1 - p))),
    ("binomial_f32", lambda p: Binomial(7, probs=p), 1e-9, torch.float32, lambda p: 7 / (p * (1 - p))),
    ("binomial_f64", lambda p: Binomial(7, probs=p), 1e-20, DT, lambda p: 7 / (p * (1 - p))),
]


@pytest.mark.parametrize("case", TINY, ids=[c[0] for c in TINY])
def test_information_below_eps_matches_closed_form(case):
    _, factory, p, dtype, closed = case
    param = torch.tensor(p, dtype=dtype)
    expected = closed(float(param))  # of the probability the dtype actually holds
    assert expected > 1e8
    results = [stats.fisher_information(factory, param, method=m) for m in ("score", "hessian")]
    results.append(stats.closed_form_fisher(factory, param))
    for res in results:
        assert res.exact and res.matrix.dtype == dtype
        assert math.isclose(float(res.matrix), expected, rel_tol=1e-5 if dtype == torch.float32 else 1e-9), res.method


@pytest.mark.parametrize("dtype", [torch.float32, DT])
@pytest.mark.parametrize("family", ["categorical", "one_hot"])
def test_simplex_information_below_eps_matches_closed_form(family, dtype):
    q = [1e-9, 0.25, 0.75 - 1e-9] if dtype == torch.float32 else [1e-20, 0.25, 0.75]
    cls = Categorical if family == "categorical" else OneHotCategorical
    factory = lambda probs: cls(probs=probs)  # noqa: E731
    param = torch.tensor(q, dtype=dtype)
    expected = simplex_fisher([float(v) for v in param.double() / param.double().sum()])
    rtol = 1e-5 if dtype == torch.float32 else 1e-9
    for method in ("score", "hessian"):
        res = stats.fisher_information(factory, param, method=method)
        assert res.exact and res.matrix.dtype == dtype
        torch.testing.assert_close(res.matrix.double(), expected, rtol=rtol, atol=rtol)
    if cls is Categorical:
        torch.testing.assert_close(stats.closed_form_fisher(factory, param).matrix.double(), expected, rtol=rtol, atol=rtol)


def test_observed_information_below_eps_through_an_inner_categorical():
    # Multinomial delegates to a Categorical. With probs (t, 1/4, 3/4) / (1 + t) and counts x:
    # ℓ(t) = −x₀ log t + n log(1 + t) + const, so J = x₀/t² − n/(1 + t)².
    t, n = 1e-20, 6
    x = torch.tensor([1.0, 2.0, 3.0], dtype=DT)

    def factory(t: torch.Tensor) -> Multinomial:
        return Multinomial(n, probs=torch.stack([t, t.new_tensor(0.25), t.new_tensor(0.75)]))

    se = stats.standard_errors(None, torch.tensor(t, dtype=DT), x, dist_factory=factory)
    assert math.isclose(float(se), (1 / t**2 - n / (1 + t) ** 2) ** -0.5, rel_tol=1e-9)


def test_observed_information_below_eps_for_negative_binomial():
    # log P(k) = k log p + r log(1 − p) + const: J = Σ_i k_i/p² + n r/(1 − p)².
    p, r = 1e-20, 2.5
    k = torch.tensor([0.0, 1.0, 0.0], dtype=DT)
    factory = lambda probs: NegativeBinomial(r, probs=probs.expand(3))  # noqa: E731
    se = stats.standard_errors(None, torch.tensor(p, dtype=DT), k, dist_factory=factory)
    expected = 1.0 / p**2 + 3 * r / (1 - p) ** 2
    assert math.isclose(float(se), expected**-0.5, rel_tol=1e-9)


def test_float32_is_computed_in_float64_and_returned_in_float32():
    for p in (0.3, 1e-9):
        got = stats.fisher_information(lambda q: Binomial(5, probs=q), torch.tensor(p, dtype=torch.float32), method="hessian")
        assert got.matrix.dtype == torch.float32 and got.score_mean.dtype == torch.float32
        p32 = float(torch.tensor(p, dtype=torch.float32))
        assert math.isclose(float(got.matrix), 5 / (p32 * (1 - p32)), rel_tol=1e-6)


def test_no_spurious_irregularity_warning_in_float32():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for p in (0.3, 1e-9, 1 - 1e-4):
            stats.fisher_information(lambda q: Bernoulli(probs=q), torch.tensor(p, dtype=torch.float32))
            stats.fisher_information(lambda q: Binomial(5, probs=q), torch.tensor(p, dtype=torch.float32))


# ---- the boundary: infinite information must raise, naming the parameter and its range -------

BOUNDARY = [
    ("bernoulli_0", lambda p: Bernoulli(probs=p), 0.0, r"Bernoulli parameter probs must lie in the open interval \(0, 1\)"),
    ("bernoulli_1", lambda p: Bernoulli(probs=p), 1.0, r"Bernoulli parameter probs must lie in the open interval \(0, 1\)"),
    ("bernoulli_rounds_to_1_f32", lambda p: Bernoulli(probs=p.float()), 1 - 1e-9, r"Bernoulli parameter probs .* got probs = 1\.0"),
    ("binomial_0", lambda p: Binomial(4, probs=p), 0.0, r"Binomial parameter probs must lie in the open interval \(0, 1\)"),
    ("binomial_1", lambda p: Binomial(4, probs=p), 1.0, r"Binomial parameter probs must lie in the open interval \(0, 1\)"),
    ("geometric_0", lambda p: Geometric(probs=p), 0.0, r"Geometric parameter probs must lie in the open interval \(0, 1\)"),
    ("geometric_1", lambda p: Geometric(probs=p), 1.0, r"Geometric parameter probs must lie in the open interval \(0, 1\)"),
    ("neg_binomial_0", lambda p: NegativeBinomial(3.0, probs=p), 0.0, r"NegativeBinomial parameter probs must lie in the open interval \(0, 1\)"),
    ("categorical_0", lambda p: Categorical(probs=torch.stack([p, 1 - p, 0.5 + 0 * p])), 0.0, r"Categorical parameter probs must all be > 0"),
    ("one_hot_0", lambda p: OneHotCategorical(probs=torch.stack([p, 1 - p])), 0.0, r"Categorical parameter probs must all be > 0"),
    ("multinomial_0", lambda p: Multinomial(3, probs=torch.stack([p, 1 - p])), 1.0, r"Categorical parameter probs must all be > 0 .*index \[1\]"),
    ("continuous_bernoulli_f64", lambda p: ContinuousBernoulli(probs=p), 1e-20, r"ContinuousBernoulli parameter probs must lie in the open interval \(eps, 1 − eps\)"),
    ("batched_bernoulli", lambda p: Bernoulli(probs=torch.stack([0.5 + 0 * p, p])), 0.0, r"got probs = 0\.0 \(first at index \[1\]\)"),
]


@pytest.mark.parametrize("case", BOUNDARY, ids=[c[0] for c in BOUNDARY])
def test_probabilities_on_the_boundary_raise(case):
    _, factory, p, message = case
    param = torch.tensor(p, dtype=DT)
    with pytest.raises(ValueError, match=message):
        stats.fisher_information(factory, param, num_samples=16)
    with pytest.raises(ValueError, match=message):
        stats.fisher_information(factory, param, method="hessian", num_samples=16)
    if stats.has_closed_form(factory(torch.tensor(0.5, dtype=DT))):
        with pytest.raises(ValueError, match=message):
            stats.closed_form_fisher(factory, param)
    with pytest.raises(ValueError, match=message):
        stats.kl_second_order_check(factory, param, torch.tensor(1e-3, dtype=DT), fisher=torch.eye(1, dtype=DT))


def test_the_perturbed_point_of_the_kl_check_is_validated_too():
    with pytest.raises(ValueError, match=r"Bernoulli parameter probs must lie in the open interval \(0, 1\)"):
        stats.kl_second_order_check(lambda p: Bernoulli(probs=p), torch.tensor(0.5, dtype=DT), torch.tensor(0.5, dtype=DT))


def test_observed_information_from_a_model_refuses_the_boundary():
    with pytest.raises(ValueError, match=r"Bernoulli parameter probs must lie in the open interval \(0, 1\)"):
        stats.mle_covariance(None, torch.tensor(0.0, dtype=DT), torch.zeros(5, dtype=DT), dist_factory=lambda p: Bernoulli(probs=p.expand(5)))


@pytest.mark.parametrize("dtype", [torch.float32, DT])
def test_extreme_logits_are_not_a_boundary(dtype):
    # σ(40) rounds to 1 in both dtypes, but in logits the information σ(ℓ)σ(−ℓ) is finite.
    logit = torch.tensor(40.0, dtype=dtype)
    s = 1.0 / (1.0 + math.exp(40.0))
    cases = [
        (lambda l: Bernoulli(logits=l), s * (1 - s)),
        (lambda l: Binomial(3, logits=l), 3 * s * (1 - s)),
        (lambda l: Geometric(logits=l), s),
    ]
    for factory, expected in cases:
        res = stats.closed_form_fisher(factory, logit)
        assert res.matrix.dtype == dtype
        assert math.isclose(float(res.matrix), expected, rel_tol=1e-6)
        if factory(logit).has_enumerate_support:
            assert math.isclose(float(stats.fisher_information(factory, logit).matrix), expected, rel_tol=1e-6)


# ---- the perturbation δ of the KL check -----------------------------------------------------------


@pytest.mark.parametrize(
    "delta,message",
    [
        (torch.zeros(2, dtype=DT), r"delta must be non-zero \(‖δ‖ > 0\)"),
        ((torch.tensor(0.0, dtype=DT), torch.tensor(0.0, dtype=DT)), r"delta must be non-zero"),
        (torch.tensor([float("nan"), 0.1], dtype=DT), "delta must be finite"),
        (torch.tensor([0.1, float("inf")], dtype=DT), "delta must be finite"),
    ],
    ids=["zero_flat", "zero_tuple", "nan", "inf"],
)
def test_kl_check_rejects_a_zero_or_non_finite_delta(delta, message):
    params = (torch.tensor(0.5, dtype=DT), torch.tensor(1.3, dtype=DT))
    with pytest.raises(ValueError, match=message):
        stats.kl_second_order_check(Normal, params, delta, fisher=torch.eye(2, dtype=DT))


def test_kl_check_warns_in_a_null_direction_of_the_fisher_information():
    # Shifting every logit of a Categorical by c leaves the distribution unchanged: KL = 0 = ½δᵀIδ.
    logits = torch.tensor([0.2, -1.0, 0.5], dtype=DT)
    with pytest.warns(RuntimeWarning, match="null space of the Fisher information"):
        check = stats.kl_second_order_check(lambda l: Categorical(logits=l), logits, torch.full((3,), 1e-2, dtype=DT))
    assert abs(float(check.kl)) < 1e-15 and abs(float(check.quadratic)) < 1e-15
    assert math.isnan(float(check.ratio))
