"""Observed information, MLE standard errors, the Cramér–Rao bound and the KL identity, each
against an independent reference: analytic Hessians, statsmodels (or a dense (XᵀWX)⁻¹),
simulated estimator variances, and torch.distributions.kl_divergence."""
from __future__ import annotations

import pytest
import torch
from torch.distributions import Bernoulli, Binomial, Categorical, Normal, StudentT

from natgrad import stats

DT = torch.float64


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=DT) if len(values) != 1 else torch.tensor(values[0], dtype=DT)


def normal_nll(mu: torch.Tensor, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return -Normal(mu, sigma).log_prob(x).sum()


def normal_observed_information(mu: float, sigma: float, x: torch.Tensor) -> torch.Tensor:
    """Hand-derived ∇² of −Σ log N(x_i; μ, σ)."""
    r = x - mu
    n = x.numel()
    off = 2 * r.sum() / sigma**3
    return torch.stack([torch.stack([torch.tensor(n / sigma**2, dtype=DT), off]), torch.stack([off, -n / sigma**2 + 3 * (r**2).sum() / sigma**4])])


# ---- observed information ---------------------------------------------------------------------


def test_observed_information_matches_hand_derived_hessian():
    x = torch.randn(50, dtype=DT) * 1.5 + 0.2
    got = stats.observed_information(normal_nll, (t(0.1), t(1.4)), x)
    torch.testing.assert_close(got, normal_observed_information(0.1, 1.4, x), rtol=1e-12, atol=1e-12)
    # data=None: a closure over the data; params need not require grad and are not modified
    mu = t(0.1)
    got2 = stats.observed_information(lambda m, s: normal_nll(m, s, x), [mu, t(1.4)])
    torch.testing.assert_close(got2, got)
    assert not mu.requires_grad and mu.grad is None


def test_mean_observed_information_converges_to_fisher():
    """J(θ)/n → I(θ) = diag(1/σ², 2/σ²), within 5 standard errors that shrink like 1/√n.

    Per observation, −∂²log p has variances 0, 4/σ⁴ (μσ) and 18/σ⁴ (σσ) under N(μ, σ²).
    """
    mu, sigma = 0.4, 1.3
    fisher = stats.closed_form_fisher(Normal, (t(mu), t(sigma))).matrix
    per_obs_var = torch.tensor([[0.0, 4.0], [4.0, 18.0]], dtype=DT) / sigma**4
    g = torch.Generator().manual_seed(11)
    errors = []
    for n in (100, 10_000, 1_000_000):
        x = mu + sigma * torch.randn(n, generator=g, dtype=DT)
        mean_obs = stats.observed_information(normal_nll, (t(mu), t(sigma)), x) / n
        err = (mean_obs - fisher).abs()
        assert (err <= 5 * (per_obs_var / n).sqrt() + 1e-12).all(), (n, err)
        errors.append(float(err.max()))
    assert errors[-1] < 0.01 * float(fisher.max())


# ---- MLE standard errors: logistic regression --------------------------------------------------


def logistic_data(n: int = 400):
    g = torch.Generator().manual_seed(3)
    features = torch.randn(n, 3, generator=g, dtype=DT)
    X = torch.cat([torch.ones(n, 1, dtype=DT), features], dim=1)
    beta_true = t(0.3, 0.5, -1.0, 0.8)
    y = torch.bernoulli(torch.sigmoid(X @ beta_true), generator=g)
    return X, y


def logistic_nll(beta: torch.Tensor, data) -> torch.Tensor:
    X, y = data
    return torch.nn.functional.binary_cross_entropy_with_logits(X @ beta, y, reduction="sum")


def newton_fit(X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Logistic MLE by Newton's method with the dense XᵀWX Hessian, to machine precision."""
    beta = torch.zeros(X.shape[1], dtype=DT)
    for _ in range(100):
        p = torch.sigmoid(X @ beta)
        step = torch.linalg.solve(X.T @ (X * (p * (1 - p))[:, None]), X.T @ (y - p))
        beta = beta + step
        if step.abs().max() < 1e-15:
            break
    return beta


def dense_logistic_covariance(X: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(X @ beta)
    return torch.linalg.inv(X.T @ (X * (p * (1 - p))[:, None]))


def test_logistic_regression_standard_errors_match_dense_formula():
    X, y = logistic_data()
    beta = newton_fit(X, y)
    reference = dense_logistic_covariance(X, beta)
    cov = stats.mle_covariance(logistic_nll, beta, (X, y))
    torch.testing.assert_close(cov, reference, rtol=1e-10, atol=1e-12)
    se = stats.standard_errors(logistic_nll, beta, (X, y))
    torch.testing.assert_close(se, reference.diagonal().sqrt(), rtol=1e-10, atol=0)
    # expected information (canonical link: equal to the observed one), both definitions, exact
    model = lambda b: Bernoulli(logits=X @ b)  # noqa: E731
    for method in ("score", "hessian"):
        se_exp = stats.standard_errors(None, beta, information="expected", dist_factory=model, method=method)
        torch.testing.assert_close(se_exp, se, rtol=1e-10, atol=0)
    # observed information from the model's log_prob instead of a hand-written nll
    torch.testing.assert_close(stats.standard_errors(None, beta, y, dist_factory=model), se, rtol=1e-12, atol=0)


def test_logistic_regression_standard_errors_match_statsmodels():
    sm = pytest.importorskip("statsmodels.api")
    X, y = logistic_data()
    fit = sm.Logit(y.numpy(), X.numpy()).fit(disp=0, method="newton", tol=1e-12, maxiter=100)
    beta = newton_fit(X, y)
    torch.testing.assert_close(beta, torch.from_numpy(fit.params), rtol=1e-6, atol=1e-8)
    bse = torch.from_numpy(fit.bse)
    torch.testing.assert_close(stats.standard_errors(logistic_nll, beta, (X, y)), bse, rtol=1e-6, atol=1e-8)
    se_expected = stats.standard_errors(None, beta, information="expected", dist_factory=lambda b: Bernoulli(logits=X @ b))
    torch.testing.assert_close(se_expected, bse, rtol=1e-6, atol=1e-8)
    # parameters split into (bias, weights): standard errors come back shaped like them
    se_b, se_w = stats.standard_errors(
        lambda b, w, data: logistic_nll(torch.cat([b.reshape(1), w]), data), (beta[0], beta[1:]), (X, y)
    )
    assert se_b.shape == () and se_w.shape == (3,)
    torch.testing.assert_close(torch.cat([se_b.reshape(1), se_w]), bse, rtol=1e-6, atol=1e-8)


def test_singular_information_is_refused_with_advice():
    X, y = logistic_data()
    X_dup = torch.cat([X, X[:, 1:2]], dim=1)  # a duplicated column: β not identifiable
    beta = torch.cat([newton_fit(X, y), t(0.0).reshape(1)])
    with pytest.raises(ValueError, match=r"observed information is singular.*[Rr]eparametrise.*damping.*pinv=True"):
        stats.mle_covariance(logistic_nll, beta, (X_dup, y))
    cov = stats.mle_covariance(logistic_nll, beta, (X_dup, y), pinv=True)
    torch.testing.assert_close(cov, torch.linalg.pinv(stats.observed_information(logistic_nll, beta, (X_dup, y)), hermitian=True), rtol=1e-8, atol=1e-10)


def test_mle_argument_errors():
    X, y = logistic_data(50)
    beta = torch.zeros(4, dtype=DT)
    with pytest.raises(ValueError, match="information must be 'observed' or 'expected'"):
        stats.mle_covariance(logistic_nll, beta, (X, y), information="empirical")
    with pytest.raises(ValueError, match="information='expected' needs dist_factory"):
        stats.mle_covariance(logistic_nll, beta, (X, y), information="expected")
    with pytest.raises(ValueError, match="pass nll .* or dist_factory"):
        stats.mle_covariance(None, beta, (X, y))
    with pytest.raises(ValueError, match="nll must return a real floating scalar tensor"):
        stats.observed_information(lambda b, d: -Bernoulli(logits=d[0] @ b).log_prob(d[1]), beta, (X, y))
    with pytest.raises(ValueError, match=r"nll has no gradient with respect to params\[1\]"):
        stats.observed_information(lambda b, s, d: logistic_nll(b, d), (beta, t(1.0)), (X, y))
    with pytest.raises(TypeError, match="params must be a floating-point tensor"):
        stats.observed_information(logistic_nll, torch.zeros(4, dtype=torch.long), (X, y))
    with pytest.raises(ValueError, match="not positive definite.*maximum of the likelihood"):
        stats.mle_covariance(lambda m, s: -normal_nll(m, s, t(0.5, 1.5)), (t(1.0), t(1.0)))  # a minimum


# ---- Cramér–Rao bound -----------------------------------------------------------------------------


def test_cramer_rao_bound_formula():
    a = torch.randn(3, 5, dtype=DT)
    fisher = a @ a.T / 5 + 0.1 * torch.eye(3, dtype=DT)
    inv = torch.linalg.inv(fisher)
    torch.testing.assert_close(stats.cramer_rao_bound(fisher), inv, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stats.cramer_rao_bound(fisher, n=7), inv / 7, rtol=1e-10, atol=1e-12)
    jac = torch.randn(2, 3, dtype=DT)
    torch.testing.assert_close(stats.cramer_rao_bound(fisher, 4, jac), jac @ inv @ jac.T / 4, rtol=1e-10, atol=1e-12)
    bound = stats.cramer_rao_bound(fisher, 4, jac[0])
    assert bound.shape == ()
    torch.testing.assert_close(bound, jac[0] @ inv @ jac[0] / 4, rtol=1e-10, atol=1e-12)


def variance_and_se(estimates: torch.Tensor) -> tuple[float, float]:
    """Sample variance of simulated estimates and its standard error sqrt((m4 − s⁴)/R)."""
    centred = estimates - estimates.mean()
    var = float(centred.var())
    m4 = float((centred**4).mean())
    return var, ((m4 - var**2) / estimates.numel()) ** 0.5


def test_sample_mean_attains_bound_and_other_unbiased_estimators_do_not_beat_it():
    mu, sigma, n, reps = 1.0, 2.0, 11, 40_000
    fisher = stats.closed_form_fisher(Normal, (t(mu), t(sigma)))
    bound = float(stats.cramer_rao_bound(fisher, n, jacobian=t(1.0, 0.0)))  # estimating φ(θ) = μ
    assert bound == pytest.approx(sigma**2 / n, rel=1e-12)
    data = mu + sigma * torch.randn(reps, n, generator=torch.Generator().manual_seed(5), dtype=DT)

    var, se = variance_and_se(data.mean(1))
    assert abs(var - bound) <= 5 * se  # attained
    for estimator in (data.median(1).values, data[:, : n // 2].mean(1)):
        var, se = variance_and_se(estimator)
        assert var >= bound - 5 * se
    var, se = variance_and_se(data[:, : n // 2].mean(1))
    assert abs(var - sigma**2 / (n // 2)) <= 5 * se  # the half-sample mean: 2.2 × the bound

    # biased shrinkage estimator a·x̄: mean φ(θ) = aμ, Jacobian (a, 0), bound a²σ²/n (attained)
    shrink = 0.7
    bound = float(stats.cramer_rao_bound(fisher.matrix, n, jacobian=t(shrink, 0.0)))
    var, se = variance_and_se(shrink * data.mean(1))
    assert bound == pytest.approx(shrink**2 * sigma**2 / n, rel=1e-12)
    assert abs(var - bound) <= 5 * se


def test_singular_fisher_needs_explicit_pseudo_inverse():
    logits = t(0.2, -0.4, 0.9)
    fisher = stats.fisher_information(lambda l: Categorical(logits=l), logits)  # all K logits: rank K−1
    with pytest.raises(ValueError, match=r"fisher is singular.*Categorical.*damping.*pinv=True"):
        stats.cramer_rao_bound(fisher, n=3)
    torch.testing.assert_close(stats.cramer_rao_bound(fisher, 3, pinv=True), torch.linalg.pinv(fisher.matrix, hermitian=True) / 3, rtol=1e-8, atol=1e-10)
    # an identifiable function, the probabilities p = softmax(ℓ): its bound is attained by the
    # one-hot indicator of one draw, whose covariance is diag(p) − ppᵀ
    p = logits.softmax(0)
    jac = torch.diag(p) - torch.outer(p, p)  # ∂p/∂ℓ
    torch.testing.assert_close(stats.cramer_rao_bound(fisher, 1, jac, pinv=True), torch.diag(p) - torch.outer(p, p), rtol=1e-8, atol=1e-10)
    # the minimal parametrisation (last logit fixed at 0) is regular
    minimal = stats.fisher_information(lambda l: Categorical(logits=torch.cat([l, l.new_zeros(1)])), logits[:2] - logits[2])
    assert torch.isfinite(stats.cramer_rao_bound(minimal)).all()


def test_cramer_rao_argument_errors():
    fisher = torch.eye(2, dtype=DT)
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        stats.cramer_rao_bound(fisher, n=0)
    with pytest.raises(TypeError, match="n must be an int >= 1"):
        stats.cramer_rao_bound(fisher, n=2.5)
    with pytest.raises(ValueError, match=r"jacobian must have shape \[2\] or \[Q, 2\]"):
        stats.cramer_rao_bound(fisher, jacobian=torch.ones(2, 3, dtype=DT))
    with pytest.raises(ValueError, match="fisher must be a square"):
        stats.cramer_rao_bound(torch.ones(2, 3, dtype=DT))
    with pytest.raises(TypeError, match="fisher must be floating point"):
        stats.cramer_rao_bound(torch.eye(2, dtype=torch.long))
    with pytest.raises(ValueError, match="fisher is not positive definite"):
        stats.cramer_rao_bound(torch.diag(t(1.0, -1.0)))


# ---- KL(p_θ ‖ p_θ+δ) ≈ ½ δᵀ I δ --------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory,params,direction,fisher_fn",
    [
        (Normal, (t(0.5), t(1.3)), (t(0.3), t(-0.2)), stats.closed_form_fisher),
        (lambda l: Categorical(logits=l), t(0.2, -1.0, 0.5), t(0.4, 0.1, -0.3), None),
        (lambda p: Binomial(6, probs=p), t(0.35), t(1.0), None),
    ],
    ids=["normal", "categorical", "binomial"],
)
def test_kl_matches_half_quadratic_form_for_small_delta(factory, params, direction, fisher_fn):
    fisher = None if fisher_fn is None else fisher_fn(factory, params)
    deviations = []
    for scale in (1e-1, 1e-2, 1e-3):
        delta = tuple(scale * d for d in direction) if isinstance(direction, tuple) else scale * direction
        check = stats.kl_second_order_check(factory, params, delta, fisher=fisher)
        assert check.kl > 0 and check.quadratic > 0
        torch.testing.assert_close(check.ratio, check.kl / check.quadratic)
        deviations.append(abs(float(check.ratio) - 1.0))
    assert deviations[-1] < 5e-3
    assert deviations[2] < deviations[1] < deviations[0]  # O(‖δ‖) convergence


def test_kl_check_argument_errors():
    params = (t(0.5), t(1.3))
    with pytest.raises(ValueError, match=r"delta\[1\] must have the shape of params\[1\]"):
        stats.kl_second_order_check(Normal, params, (t(0.1), t(0.1, 0.2)))
    with pytest.raises(ValueError, match="delta must be a flat \\[2\\] tensor or a sequence of 2 tensors"):
        stats.kl_second_order_check(Normal, params, (t(0.1),))
    with pytest.raises(ValueError, match=r"delta must have shape \[2\]"):
        stats.kl_second_order_check(Normal, params, torch.zeros(3, dtype=DT))
    with pytest.raises(ValueError, match=r"fisher must be \[2, 2\]"):
        stats.kl_second_order_check(Normal, params, t(0.1, 0.1), fisher=torch.eye(3, dtype=DT))
    with pytest.raises(TypeError, match="no kl_divergence registered for \\(StudentT, StudentT\\)"):
        stats.kl_second_order_check(lambda df: StudentT(df), t(3.0), t(0.1), fisher=torch.eye(1, dtype=DT))
