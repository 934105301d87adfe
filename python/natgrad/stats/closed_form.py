"""Closed-form Fisher information of common families, in any parametrisation (chain rule).

Each supported family has a known Fisher information ``F_η`` in its native torch parameters
``η`` (per independent batch element). For a factory ``θ ↦ p_{η(θ)}``, the score is
``s_θ = Jᵀ s_η`` with ``J = ∂η/∂θ``, hence::

    I(θ) = Σ_b J_bᵀ F_η(η_b) J_b

where ``J_b`` is the Jacobian of the native parameters of batch element ``b``. ``J`` is
computed with :mod:`torch.func` (forward or reverse mode, whichever is cheaper), so the fast
path is exact and free of Monte-Carlo noise. Native parametrisations and ``F_η`` per element:

=============  ==============================  ===============================================
family         native η                        F_η
=============  ==============================  ===============================================
Normal         (loc μ, scale σ)                diag(1/σ², 2/σ²)
Bernoulli      probs p                         1 / (p(1−p))
Binomial       probs p (total_count N fixed)   N / (p(1−p))
Geometric      probs p                         1 / (p²(1−p))
Categorical    logits ℓ (normalised), p=σ(ℓ)   diag(p) − ppᵀ
Poisson        rate λ                          1/λ
Exponential    rate λ                          1/λ²
Gamma          (concentration α, rate β)       [[ψ₁(α), −1/β], [−1/β, α/β²]]
Beta           (concentration1 a, conc.0 b)    [[ψ₁(a)−ψ₁(a+b), −ψ₁(a+b)], [·, ψ₁(b)−ψ₁(a+b)]]
Independent    those of its base distribution  (the base's F_η; batch dims are summed)
=============  ==============================  ===============================================

Bernoulli, Binomial and Geometric built from ``logits`` ℓ use ℓ as native parameter, with
``F_ℓ = σ(ℓ)σ(−ℓ)``, ``N σ(ℓ)σ(−ℓ)`` and ``σ(−ℓ)``: finite however large ``|ℓ|``, where ``p``
would round to 0 or 1.

(ψ₁ is the trigamma function.) Only exact types match: a subclass may change ``log_prob``.
These closed forms are checked against :func:`natgrad.stats.fisher_information` in the tests.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.distributions import (
    Bernoulli,
    Beta,
    Binomial,
    Categorical,
    Distribution,
    Exponential,
    Gamma,
    Geometric,
    Independent,
    Normal,
    Poisson,
)
from torch.func import jacrev

from natgrad.stats._params import (
    DistFactory,
    ParamsLike,
    build_distribution,
    flatten_params,
    forward_jacobian,
    in_working_precision,
    leaf_params,
    make_distribution,
)
from natgrad.stats.fisher import FisherInformation

__all__ = ["closed_form_fisher", "has_closed_form"]

#: ``native(dist) -> [*batch, k]`` and ``fisher(native, dist) -> [*batch, k, k]``.
_Native = Callable[[Distribution], Tensor]
_Fisher = Callable[[Tensor, Distribution], Tensor]


def _stack(*tensors: Tensor) -> Tensor:
    return torch.stack(torch.broadcast_tensors(*tensors), dim=-1)


def _scalar(values: Tensor) -> Tensor:
    return values.unsqueeze(-1).unsqueeze(-1)


def _normal(eta: Tensor, d: Distribution) -> Tensor:
    s2 = eta[..., 1] ** 2
    return torch.diag_embed(torch.stack([1.0 / s2, 2.0 / s2], dim=-1))


def _bernoulli(eta: Tensor, d: Distribution) -> Tensor:
    p = eta[..., 0]
    return _scalar(1.0 / (p * (1.0 - p)))


def _binomial(eta: Tensor, d: Distribution) -> Tensor:
    p = eta[..., 0]
    return _scalar(d.total_count.detach() / (p * (1.0 - p)))  # type: ignore[attr-defined]


def _geometric(eta: Tensor, d: Distribution) -> Tensor:
    p = eta[..., 0]
    return _scalar(1.0 / (p * p * (1.0 - p)))


def _bernoulli_logits(eta: Tensor, d: Distribution) -> Tensor:
    logit = eta[..., 0]
    return _scalar(torch.sigmoid(logit) * torch.sigmoid(-logit))


def _binomial_logits(eta: Tensor, d: Distribution) -> Tensor:
    logit = eta[..., 0]
    return _scalar(d.total_count.detach() * torch.sigmoid(logit) * torch.sigmoid(-logit))  # type: ignore[attr-defined]


def _geometric_logits(eta: Tensor, d: Distribution) -> Tensor:
    return _scalar(torch.sigmoid(-eta[..., 0]))


def _categorical(eta: Tensor, d: Distribution) -> Tensor:
    p = eta.softmax(-1)
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


def _poisson(eta: Tensor, d: Distribution) -> Tensor:
    return _scalar(1.0 / eta[..., 0])


def _exponential(eta: Tensor, d: Distribution) -> Tensor:
    return _scalar(1.0 / eta[..., 0] ** 2)


def _gamma(eta: Tensor, d: Distribution) -> Tensor:
    a, b = eta[..., 0], eta[..., 1]
    row0 = torch.stack([torch.polygamma(1, a), -1.0 / b], dim=-1)
    row1 = torch.stack([-1.0 / b, a / b**2], dim=-1)
    return torch.stack([row0, row1], dim=-2)


def _beta(eta: Tensor, d: Distribution) -> Tensor:
    a, b = eta[..., 0], eta[..., 1]
    tab = torch.polygamma(1, a + b)
    row0 = torch.stack([torch.polygamma(1, a) - tab, -tab], dim=-1)
    row1 = torch.stack([-tab, torch.polygamma(1, b) - tab], dim=-1)
    return torch.stack([row0, row1], dim=-2)


_FAMILIES: dict[type, tuple[_Native, _Fisher]] = {
    Normal: (lambda d: _stack(d.loc, d.scale), _normal),  # type: ignore[attr-defined]
    Bernoulli: (lambda d: d.probs.unsqueeze(-1), _bernoulli),  # type: ignore[attr-defined]
    Binomial: (lambda d: d.probs.unsqueeze(-1), _binomial),  # type: ignore[attr-defined]
    Geometric: (lambda d: d.probs.unsqueeze(-1), _geometric),  # type: ignore[attr-defined]
    Categorical: (lambda d: d.logits, _categorical),  # type: ignore[attr-defined]
    Poisson: (lambda d: d.rate.unsqueeze(-1), _poisson),  # type: ignore[attr-defined]
    Exponential: (lambda d: d.rate.unsqueeze(-1), _exponential),  # type: ignore[attr-defined]
    Gamma: (lambda d: _stack(d.concentration, d.rate), _gamma),  # type: ignore[attr-defined]
    Beta: (lambda d: _stack(d.concentration1, d.concentration0), _beta),  # type: ignore[attr-defined]
}


#: Families whose information is better conditioned in ``logits`` when built from them.
_LOGIT_FAMILIES: dict[type, tuple[_Native, _Fisher]] = {
    Bernoulli: (lambda d: d.logits.unsqueeze(-1), _bernoulli_logits),  # type: ignore[attr-defined]
    Binomial: (lambda d: d.logits.unsqueeze(-1), _binomial_logits),  # type: ignore[attr-defined]
    Geometric: (lambda d: d.logits.unsqueeze(-1), _geometric_logits),  # type: ignore[attr-defined]
}


def _family(dist: Distribution) -> tuple[_Native, _Fisher] | None:
    """The native parametrisation and its ``F_η`` for ``dist`` (already unwrapped), if any."""
    if type(dist) in _LOGIT_FAMILIES and "probs" not in vars(dist):
        return _LOGIT_FAMILIES[type(dist)]
    return _FAMILIES.get(type(dist))


def _unwrap(dist: Distribution) -> Distribution:
    """The distribution whose native parameters carry the information (through Independent)."""
    while type(dist) is Independent:
        dist = dist.base_dist
    return dist


def has_closed_form(dist: Distribution) -> bool:
    """Whether :func:`closed_form_fisher` supports this distribution's exact type.

    Args:
        dist: a distribution instance (``Independent`` wrappers are looked through).

    Returns:
        bool: True for the families listed in the module docstring.
    """
    return type(_unwrap(dist)) in _FAMILIES


def closed_form_fisher(dist_factory: DistFactory, params: ParamsLike) -> FisherInformation:
    """Exact Fisher information of one observation from the family's closed form.

    ``I(θ) = Σ_b J_bᵀ F_η(η_b) J_b`` with ``η = η(θ)`` the native torch parameters of the
    distribution ``dist_factory(*params)`` and ``J = ∂η/∂θ`` (see the module docstring for
    ``F_η`` of each family). Same conventions and result type as
    :func:`natgrad.stats.fisher_information`, with ``method="closed_form"``, ``exact=True``
    and ``score_mean`` zero (the families are regular).

    Args:
        dist_factory: ``dist_factory(*params) -> Distribution`` of a supported family (see
            :func:`has_closed_form`), possibly wrapped in ``Independent``.
        params: one floating tensor or a sequence of them (detached and copied).

    Returns:
        FisherInformation: ``matrix`` ``[P, P]``.

    Raises:
        TypeError: non-floating params, a factory not returning a Distribution, or a family
            without a closed form here (use :func:`natgrad.stats.fisher_information`).
        ValueError: a factory failing on the params, or native parameters that do not depend
            on some parameter.
    """
    given = flatten_params(params)
    fp = in_working_precision(given)
    leaves = leaf_params(fp)
    dist = build_distribution(dist_factory, fp, leaves)
    base = _unwrap(dist)
    entry = _family(base)
    if entry is None:
        names = ", ".join(sorted(t.__name__ for t in _FAMILIES))
        raise TypeError(
            f"closed_form_fisher has no closed form for {type(base).__name__} (supported: {names}, "
            "optionally inside Independent); use fisher_information instead"
        )
    native_fn, fisher_fn = entry
    eta = native_fn(base)
    grads = (torch.autograd.grad(eta.sum(), list(leaves), allow_unused=True) if eta.requires_grad
             else [None] * len(leaves))
    for i, g in enumerate(grads):
        if g is None:
            label = "params" if fp.single else f"params[{i}]"
            raise ValueError(
                f"the parameters of the distribution returned by dist_factory do not depend on {label}: "
                "the factory must build the distribution from the tensors it receives"
            )
    eta = eta.detach()
    k = eta.shape[-1]
    fisher_eta = fisher_fn(eta, base).reshape(-1, k, k)  # [B, k, k]
    if not torch.isfinite(fisher_eta).all():
        raise ValueError(
            f"the closed-form information of {type(base).__name__} is not finite at these params "
            "(on the boundary of the parameter space?)"
        )

    def native_flat(flat: Tensor) -> Tensor:
        return native_fn(_unwrap(make_distribution(dist_factory, fp.unflatten(flat)))).reshape(-1)

    jac_fn = forward_jacobian(native_flat) if fp.size <= eta.numel() else jacrev(native_flat)
    jac = jac_fn(fp.flat).reshape(-1, k, fp.size)  # [B, k, P]
    matrix = torch.einsum("bip,bij,bjq->pq", jac, fisher_eta, jac)
    return FisherInformation(
        matrix=(0.5 * (matrix + matrix.mT)).detach(),
        method="closed_form",
        exact=True,
        num_samples=None,
        support_size=None,
        std_error=None,
        score_mean=torch.zeros_like(fp.flat),
        score_mean_std_error=None,
        param_shapes=fp.shapes,
    ).to(given.flat.dtype)
