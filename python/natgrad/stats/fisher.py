"""Fisher information of a parametric distribution, by score covariance or expected Hessian.

For a family ``p_θ`` with parameters ``θ ∈ R^P`` (the user's tensors, flattened and
concatenated in order), the Fisher information of ONE observation ``x ~ p_θ`` is::

    I(θ) = E_x[ s(θ; x) s(θ; x)ᵀ ]            (method="score", s = ∇_θ log p_θ(x))
         = −E_x[ ∇²_θ log p_θ(x) ]              (method="hessian")

The two agree for regular families (support independent of θ, log p twice differentiable, and
``E[s] = 0``, which every result reports as ``score_mean``). The expectation is computed

* exactly, as a weighted sum over the support, when the distribution can enumerate a finite
  support (Bernoulli, Binomial, Categorical, OneHotCategorical, ... ``has_enumerate_support``);
* by Monte Carlo otherwise, with ``num_samples`` draws (default :data:`DEFAULT_NUM_SAMPLES`),
  reporting the sample size and a per-entry standard error.

Per-point scores and Hessians are vectorised with :mod:`torch.func` (``vmap`` over ``grad`` /
``jacrev(jacrev)`` of ``log_prob``); there is no Python loop over samples.

"One observation" is one draw of the whole distribution: a value of shape
``batch_shape + event_shape``, whose log-density is ``log_prob`` summed over the batch dims
(the batch elements of a torch Distribution are independent). So a distribution with ``n``
i.i.d. batch elements (``.expand((n,))`` or ``Independent``) carries ``n`` times the
information of one element.
"""
from __future__ import annotations

import contextlib
import numbers
import warnings
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor
from torch.distributions import Distribution
from torch.func import grad, jacrev, vmap

from natgrad.stats._params import (
    DistFactory,
    FlatParams,
    ParamsLike,
    build_distribution,
    check_depends_on_params,
    flatten_params,
    forward_jacobian,
    in_working_precision,
    leaf_params,
    make_distribution,
    make_log_prob,
)

__all__ = ["DEFAULT_NUM_SAMPLES", "FisherInformation", "fisher_information"]

#: Monte-Carlo sample size used when ``num_samples`` is not given.
DEFAULT_NUM_SAMPLES = 16_384
#: Per-chunk element budget of a vmap (chunking only kicks in past it: it costs speed).
_CHUNK_ELEMENTS = 2**24
#: Relative tolerance on ``Σ_x p(x) = 1`` for an enumerated support.
_SUPPORT_MASS_RTOL = 1e-6


class FisherInformation(NamedTuple):
    """Output of :func:`fisher_information` (and :func:`natgrad.stats.closed_form_fisher`).

    Rows and columns follow the flattened parameters: ``θ = concat(p.reshape(-1) for p in
    params)``; ``param_shapes`` lets you map them back.
    """

    matrix: Tensor  #: ``[P, P]`` Fisher information of one observation (symmetric, detached)
    method: str  #: "score", "hessian" or "closed_form"
    exact: bool  #: True when the expectation was exact (finite support or closed form)
    num_samples: int | None  #: Monte-Carlo sample size; None when exact
    support_size: int | None  #: number of support points enumerated; None otherwise
    std_error: Tensor | None  #: ``[P, P]`` Monte-Carlo standard error of each entry; None when exact
    score_mean: Tensor  #: ``[P]`` E[∇ log p] (≈ 0 for a regular family)
    score_mean_std_error: Tensor | None  #: ``[P]`` its Monte-Carlo standard error; None when exact
    param_shapes: tuple[torch.Size, ...]  #: shapes of the parameters, in order

    def to(self, dtype: torch.dtype) -> FisherInformation:
        """The same result with its tensors cast to ``dtype``."""

        def cast(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.to(dtype)

        return self._replace(
            matrix=self.matrix.to(dtype),
            std_error=cast(self.std_error),
            score_mean=self.score_mean.to(dtype),
            score_mean_std_error=cast(self.score_mean_std_error),
        )


def fisher_information(
    dist_factory: DistFactory,
    params: ParamsLike,
    *,
    method: str = "score",
    exact: bool | None = None,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> FisherInformation:
    """Fisher information matrix of one observation, for any parametrisation.

    The parametrisation is whatever ``dist_factory`` does with the tensors it receives: e.g.
    ``lambda mu, sigma: Normal(mu, sigma)`` gives ``diag(1/σ², 2/σ²)`` while
    ``lambda mu, var: Normal(mu, var.sqrt())`` gives ``diag(1/v, 1/(2v²))``; an Exponential by
    scale ``θ`` is ``lambda theta: Exponential(1 / theta)`` (information ``1/θ²``).

    With ``s(x) = ∇_θ log p_θ(x)`` and ``H(x) = ∇²_θ log p_θ(x)``:

    * ``method="score"``: ``I = E[s sᵀ]``;
    * ``method="hessian"``: ``I = −E[H]`` (needs ``log_prob`` twice differentiable in θ).

    Exact expectation over a finite support ``{x_k}`` (per independent batch element ``b``):
    ``I = Σ_b Σ_k p_b(x_k) s_b(x_k) s_b(x_k)ᵀ`` (cross terms between batch elements vanish
    because ``E[s_b] = 0``). Monte Carlo with ``N`` draws: ``I ≈ (1/N) Σ_n s(x_n) s(x_n)ᵀ``, each
    entry reported with the standard error ``std_n(z_n) / √N`` of its summands ``z_n``.

    Args:
        dist_factory: ``dist_factory(*params) -> torch.distributions.Distribution``. It must
            build the distribution from the tensors it receives (differentiably).
        params: one floating tensor, or a sequence of floating tensors (Python reals are taken
            as 0-dim tensors of the default dtype). They are detached and copied; the caller's
            tensors need not require grad. Mixed float dtypes are promoted.
        method: "score" (score covariance) or "hessian" (negative expected Hessian).
        exact: None (default): exact when the distribution enumerates a finite support,
            Monte Carlo otherwise. True: require the exact expectation (ValueError if the
            support cannot be enumerated). False: always Monte Carlo.
        num_samples: Monte-Carlo sample size, an int >= 2 (default
            :data:`DEFAULT_NUM_SAMPLES`); unused when the expectation is exact. The
            per-sample Hessians of ``method="hessian"`` hold ``num_samples · P²`` numbers.
        generator: seeds the Monte-Carlo draws (the global RNG state is left untouched);
            None draws from the global RNG.

    Returns:
        FisherInformation: ``matrix`` ``[P, P]`` plus how it was computed (``exact``,
        ``num_samples``, ``support_size``), Monte-Carlo standard errors and ``score_mean``.

    Raises:
        TypeError: non-floating params, a factory that does not return a Distribution, or
            arguments of the wrong type.
        ValueError: a factory that fails on the params (e.g. mismatched shapes), a ``log_prob``
            without gradient w.r.t. some parameter, ``exact=True`` without a finite support,
            non-finite scores, or an invalid ``method``/``num_samples``.

    Example::

        from torch.distributions import Bernoulli, Normal
        res = fisher_information(Normal, (torch.tensor(0.0), torch.tensor(2.0)))
        res.matrix  # ≈ diag(1/4, 2/4) by Monte Carlo: see res.num_samples, res.std_error
        fisher_information(lambda p: Bernoulli(probs=p), torch.tensor(0.3)).matrix  # exact 1/0.21
    """
    if method not in ("score", "hessian"):
        raise ValueError(f"method must be 'score' or 'hessian', got {method!r}")
    if exact is not None and not isinstance(exact, bool):
        raise TypeError(f"exact must be None, True or False, got {type(exact).__name__}")
    if num_samples is not None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
            raise TypeError(f"num_samples must be an int >= 2, got {type(num_samples).__name__}")
        if num_samples < 2:
            raise ValueError(f"num_samples must be an int >= 2, got {num_samples}")
        if exact is True:
            raise ValueError("num_samples is only used by the Monte-Carlo estimate; drop it or pass exact=None/False")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")

    given = flatten_params(params)
    fp = in_working_precision(given)
    leaves = leaf_params(fp)
    dist = build_distribution(dist_factory, fp, leaves)

    support = _finite_support(dist, exact)
    if support is not None:
        check_depends_on_params(dist, support, leaves, fp.single)
        return _warn_if_irregular(_exact_fisher(dist_factory, fp, support, method), dist).to(given.flat.dtype)

    n = int(num_samples) if num_samples is not None else DEFAULT_NUM_SAMPLES
    with torch.no_grad(), _seeded(generator, fp.flat.device):
        samples = dist.sample((n,))
    check_depends_on_params(dist, samples[:1], leaves, fp.single)
    return _warn_if_irregular(_monte_carlo_fisher(dist_factory, fp, samples, method), dist).to(given.flat.dtype)


def _warn_if_irregular(res: FisherInformation, dist: Distribution) -> FisherInformation:
    """Warns when ``E[s] ≠ 0`` beyond numerical (exact) or 6-standard-error (MC) slack.

    A non-zero mean score means the family is not regular at θ (e.g. a support that depends on
    θ, as for Uniform(a, b)); then neither definition is the Fisher information of the
    Cramér–Rao theory and the two may disagree.
    """
    scale = res.matrix.diagonal().abs().sqrt()  # ≥ E|s_i|
    slack = max(1e-8, 64 * torch.finfo(res.matrix.dtype).eps) * (1.0 + scale)
    if res.score_mean_std_error is not None:
        slack = slack + 6.0 * res.score_mean_std_error
    if bool((res.score_mean.abs() > slack).any()):
        warnings.warn(
            f"the mean score E[∇ log p] of {type(dist).__name__} is not zero "
            f"({res.score_mean.tolist()}): the family is not regular at these params (support "
            "depending on θ?), so the score and Hessian definitions need not agree",
            RuntimeWarning,
            stacklevel=3,
        )
    return res


def _finite_support(dist: Distribution, exact: bool | None) -> Tensor | None:
    """``dist.enumerate_support(expand=False)`` when exact expectation is wanted and possible."""
    if exact is False:
        return None
    reason = f"{type(dist).__name__} has no finite support to enumerate (has_enumerate_support is False)"
    if dist.has_enumerate_support:
        try:
            with torch.no_grad():
                return dist.enumerate_support(expand=False)
        except NotImplementedError as err:
            reason = f"{type(dist).__name__}.enumerate_support failed: {err}"
    if exact:
        raise ValueError(f"exact=True needs a distribution with a finite support: {reason}; "
                         "pass exact=None or False for Monte Carlo")
    return None


@contextlib.contextmanager
def _seeded(generator: torch.Generator | None, device: torch.device) -> Iterator[None]:
    """Draws from a seed taken from ``generator``, restoring the global RNG state afterwards."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index]), torch.cuda.device(index):
            torch.cuda.manual_seed(seed)
            yield
    elif device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
    else:
        raise ValueError(f"generator is supported for CPU and CUDA parameters, got device {device}")


def _batched_log_prob(dist_factory: DistFactory, fp: FlatParams, values: Tensor,
                      lead: int) -> Callable[[Tensor], Tensor]:
    """``θ ↦ log p_θ(values)`` with the ``lead`` leading dims kept and the batch dims flattened."""

    def f(flat: Tensor) -> Tensor:
        dist = make_distribution(dist_factory, fp.unflatten(flat))
        return dist.log_prob(values).reshape(*values.shape[:lead], -1)

    return f


def _untraceable(dist_factory: DistFactory, fp: FlatParams, errors: list[BaseException]) -> ValueError:
    dist = dist_factory(*fp.unflatten(fp.flat))
    return ValueError(
        f"log_prob of {type(dist).__name__} could not be differentiated per point with torch.func "
        f"(vmap: {errors[0]}; forward-mode fallback: {errors[-1]}). Use closed_form_fisher if the "
        "family has one, or a factory whose log_prob avoids data-dependent control flow"
    )


def _exact_fisher(dist_factory: DistFactory, fp: FlatParams, support: Tensor, method: str) -> FisherInformation:
    """Exact expectation over ``support`` (``[K, 1, ..., 1, *event]``), per batch element."""
    flat = fp.flat
    k = support.shape[0]
    all_points = _batched_log_prob(dist_factory, fp, support, 1)  # θ ↦ [K, B]
    with torch.no_grad():
        logp = all_points(flat)
    if not torch.isfinite(logp).any(dim=0).all():
        raise ValueError("log_prob is -inf or NaN on the whole enumerated support; check the params")
    weights = logp.exp()  # [K, B]: p_b(x_k), fixed (not differentiated)
    mass = weights.sum(0)
    if not torch.allclose(mass, torch.ones_like(mass), rtol=0.0, atol=_SUPPORT_MASS_RTOL):
        raise ValueError(
            f"the enumerated support of size {k} holds probability {float(mass.min()):.6g}..."
            f"{float(mass.max()):.6g}, not 1: the support is not complete"
        )
    batch = logp.shape[1]
    scores = _support_scores(dist_factory, fp, support, all_points, batch)  # [K, B, P]
    scores = torch.where(weights.unsqueeze(-1) > 0, scores, 0.0)  # 0 · (±inf) at impossible points
    if not torch.isfinite(scores).all():
        raise ValueError("the score ∇ log p is not finite on the support; are the params on the boundary?")
    score_mean = torch.einsum("kb,kbp->p", weights, scores)
    if method == "score":
        matrix = torch.einsum("kb,kbp,kbq->pq", weights, scores, scores)
    else:
        safe_w = torch.where(weights > 0, weights, 0.0)

        def expected_log_prob(theta: Tensor) -> Tensor:
            lp = all_points(theta)
            return torch.where(safe_w > 0, safe_w * lp, 0.0).sum()

        # Forward mode first where it is not costlier (see _support_scores: it is also the
        # accurate one on torch's binary log_prob formulas at tiny probabilities).
        rev = jacrev(jacrev(expected_log_prob))
        fwd = forward_jacobian(expected_log_prob, 2)
        first_h, second_h = (fwd, rev) if fp.size <= batch else (rev, fwd)
        try:
            matrix = -first_h(flat)
        except RuntimeError as err:  # pragma: no cover - ops without double backward
            try:
                matrix = -second_h(flat)
            except RuntimeError as err2:
                raise _untraceable(dist_factory, fp, [err, err2]) from err2
        if not torch.isfinite(matrix).all():
            raise ValueError("the Hessian of log p is not finite on the support; are the params on the boundary?")
    return FisherInformation(
        matrix=_sym(matrix).detach(),
        method=method,
        exact=True,
        num_samples=None,
        support_size=int(k),
        std_error=None,
        score_mean=score_mean.detach(),
        score_mean_std_error=None,
        param_shapes=fp.shapes,
    )


def _support_scores(
    dist_factory: DistFactory, fp: FlatParams, support: Tensor, all_points: Callable[[Tensor], Tensor], batch: int
) -> Tensor:
    """``[K, B, P]`` gradients of ``log p_b(x_k)`` for every support point and batch element.

    Two torch.func strategies, the cheaper first and the other as fallback: ``vmap`` over the
    K support points of ``jacrev`` over the B batch elements (cost ∝ K·B²), or forward mode over
    the P parameter directions on all points at once (cost ∝ P·K·B). Ties go to forward mode:
    torch.func's reverse mode through ``binary_cross_entropy_with_logits`` (Bernoulli) and
    Binomial's normaliser cancels terms of order 1 in the derivative, which ``∂logits/∂p =
    1/(p(1−p))`` then amplifies (at ``p = 1e-20`` the score of the likely outcome came out 0).
    """

    def per_point(flat: Tensor, value: Tensor) -> Tensor:
        return make_distribution(dist_factory, fp.unflatten(flat)).log_prob(value).reshape(-1)

    k = support.shape[0]
    chunk = _chunk_size(batch, batch * k)

    def reverse() -> Tensor:
        return vmap(jacrev(per_point, chunk_size=chunk), in_dims=(None, 0))(fp.flat, support)

    def forward() -> Tensor:
        return forward_jacobian(all_points)(fp.flat)

    first, second = (forward, reverse) if fp.size <= batch else (reverse, forward)
    try:
        return first()
    except RuntimeError as err:
        try:
            return second()
        except RuntimeError as err2:
            raise _untraceable(dist_factory, fp, [err, err2]) from err2


def _monte_carlo_fisher(dist_factory: DistFactory, fp: FlatParams, samples: Tensor, method: str) -> FisherInformation:
    """Monte-Carlo expectation over ``samples`` (``[N, *batch, *event]``)."""
    n = samples.shape[0]
    log_prob = make_log_prob(dist_factory, fp)
    want_hessian = method == "hessian"
    hessians: Tensor | None = None
    try:
        scores = vmap(grad(log_prob), in_dims=(None, 0), chunk_size=_chunk_size(n, fp.size))(fp.flat, samples)
        if want_hessian:
            chunk = _chunk_size(n, fp.size**2)
            hessians = vmap(jacrev(jacrev(log_prob)), in_dims=(None, 0), chunk_size=chunk)(fp.flat, samples)
    except RuntimeError as err:
        # Some log_prob implementations (e.g. Geometric) branch on the data, which vmap cannot
        # trace. Every sample's log-density depends on θ only, so forward mode over the P
        # parameter directions on all samples at once yields the same per-sample derivatives.
        per_sample = _batched_log_prob(dist_factory, fp, samples, 1)

        def joint(flat: Tensor) -> Tensor:
            return per_sample(flat).sum(-1)

        try:
            scores = forward_jacobian(joint)(fp.flat)
            if want_hessian:
                hessians = forward_jacobian(joint, 2)(fp.flat)
        except RuntimeError as err2:
            raise _untraceable(dist_factory, fp, [err, err2]) from err2
    if not torch.isfinite(scores).all() or (hessians is not None and not torch.isfinite(hessians).all()):
        raise ValueError(
            "log_prob derivatives are not finite at some Monte-Carlo samples; is the family regular "
            "(support independent of θ) and are the params inside their constraints?"
        )
    root_n = float(n) ** 0.5
    score_mean = scores.mean(0)
    score_mean_se = scores.std(0) / root_n
    if hessians is None:
        matrix = scores.mT @ scores / n
        # Var(s_i s_j) = E[s_i² s_j²] − E[s_i s_j]², with Bessel's correction.
        second = (scores * scores).mT @ (scores * scores) / n
        var = (second - matrix * matrix).clamp_min(0.0) * (n / (n - 1))
        std_error = var.sqrt() / root_n
    else:
        matrix = -hessians.mean(0)
        std_error = hessians.std(0) / root_n
    return FisherInformation(
        matrix=_sym(matrix).detach(),
        method=method,
        exact=False,
        num_samples=int(n),
        support_size=None,
        std_error=_sym(std_error).detach(),
        score_mean=score_mean.detach(),
        score_mean_std_error=score_mean_se.detach(),
        param_shapes=fp.shapes,
    )


def _chunk_size(count: int, per_item: int) -> int | None:
    """None (one vmap call) while ``count · per_item`` fits the budget, else a chunk size."""
    if count * per_item <= _CHUNK_ELEMENTS:
        return None
    return max(64, _CHUNK_ELEMENTS // max(per_item, 1))


def _sym(m: Tensor) -> Tensor:
    return 0.5 * (m + m.mT)
