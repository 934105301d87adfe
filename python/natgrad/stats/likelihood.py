"""Observed information and maximum-likelihood covariance / standard errors.

For data ``D = (x_1, ..., x_n)`` and negative log-likelihood ``ℓ(θ) = −Σ_i log p_θ(x_i)``:

* observed information: ``J(θ) = ∇²_θ ℓ(θ)``, evaluated at the fitted ``θ̂``;
* expected information: ``I_D(θ) = E_D[J(θ)] = Σ_i I_i(θ)``, the Fisher information of the whole
  data set (``n · I(θ)`` for i.i.d. data). For i.i.d. data ``J(θ)/n → I(θ)`` as ``n → ∞``.

Asymptotically ``θ̂ ≈ N(θ, J(θ̂)⁻¹)`` (or ``I_D(θ̂)⁻¹``): :func:`mle_covariance` returns that
inverse and :func:`standard_errors` the square roots of its diagonal.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import jacrev

from natgrad.stats._params import (
    DistFactory,
    FlatParams,
    ParamsLike,
    build_distribution,
    flatten_params,
    inverse_information,
    leaf_params,
    make_distribution,
)
from natgrad.stats.fisher import fisher_information

__all__ = ["mle_covariance", "observed_information", "standard_errors"]

#: ``nll(*params, data) -> scalar`` (or ``nll(*params)`` when no data is passed).
NegLogLik = Callable[..., Tensor]


def _call(nll: NegLogLik, params: tuple[Tensor, ...], data: Any) -> Tensor:
    return nll(*params) if data is None else nll(*params, data)


def observed_information(nll: NegLogLik, params: ParamsLike, data: Any = None) -> Tensor:
    """Observed information: the Hessian of the negative log-likelihood at ``θ``.

    ``J(θ) = ∇²_θ ℓ(θ; D)`` with ``ℓ`` summed (not averaged) over the observations, so that
    ``J(θ)/n`` estimates the one-observation Fisher information ``I(θ)`` and converges to it as
    ``n`` grows (law of large numbers, i.i.d. data). Computed with ``jacrev(jacrev(ℓ))``.

    Args:
        nll: ``nll(*params, data)`` (or ``nll(*params)`` when ``data`` is None) returning the
            negative log-likelihood summed over observations, a real scalar tensor.
        params: the point ``θ`` (typically the MLE); one floating tensor or a sequence of them.
            They are detached and copied.
        data: passed unchanged as the last argument of ``nll`` (a tensor, a tuple ``(X, y)``,
            ...); None to call ``nll(*params)``.

    Returns:
        Tensor: ``[P, P]`` symmetric matrix over the flattened parameters ``θ = concat(p.reshape(-1))``.

    Raises:
        TypeError: non-floating params or a non-callable ``nll``.
        ValueError: ``nll`` not returning a finite real scalar, or not depending on a parameter.
    """
    fp = flatten_params(params)
    _check_nll(nll, fp, data)

    def ell(flat: Tensor) -> Tensor:
        return _call(nll, fp.unflatten(flat), data)

    try:
        hess = jacrev(jacrev(ell))(fp.flat)
    except RuntimeError:  # nll not traceable by torch.func (e.g. .item()): plain autograd
        hess = torch.autograd.functional.hessian(ell, fp.flat)
    if not torch.isfinite(hess).all():
        raise ValueError("the Hessian of nll is not finite at params")
    return (0.5 * (hess + hess.mT)).detach()


def _check_nll(nll: NegLogLik, fp: FlatParams, data: Any) -> None:
    """Raises unless ``nll`` returns a finite real scalar depending on every parameter."""
    if not callable(nll):
        raise TypeError(f"nll must be callable, got {type(nll).__name__}")
    leaves = leaf_params(fp)
    value = _call(nll, leaves, data)
    if not isinstance(value, Tensor) or not value.is_floating_point() or value.numel() != 1:
        what = f"shape {tuple(value.shape)}, dtype {value.dtype}" if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(
            "nll must return a real floating scalar tensor (the negative log-likelihood summed over "
            f"observations), got {what}"
        )
    if not torch.isfinite(value).all():
        raise ValueError(f"nll is not finite at params (got {float(value)})")
    grads = (torch.autograd.grad(value.sum(), list(leaves), allow_unused=True) if value.requires_grad
             else [None] * len(leaves))
    for i, g in enumerate(grads):
        if g is None:
            label = "params" if fp.single else f"params[{i}]"
            raise ValueError(f"nll has no gradient with respect to {label}: "
                             "it must be computed from the tensors it receives")


def _information(
    nll: NegLogLik | None,
    params: ParamsLike,
    data: Any,
    information: str,
    dist_factory: DistFactory | None,
    fisher_kwargs: dict[str, Any],
) -> tuple[Tensor, FlatParams]:
    """The observed or expected information of the whole data set, and the flat params."""
    if information not in ("observed", "expected"):
        raise ValueError(f"information must be 'observed' or 'expected', got {information!r}")
    fp = flatten_params(params)
    if information == "expected":
        if dist_factory is None:
            raise ValueError(
                "information='expected' needs dist_factory: the model of the whole data set, "
                "dist_factory(*params) -> Distribution with one batch element per observation"
            )
        return fisher_information(dist_factory, params, **fisher_kwargs).matrix, fp
    if nll is None:
        if dist_factory is None:
            raise ValueError("pass nll (a negative log-likelihood) or dist_factory (a model of the data)")
        if data is None:
            raise ValueError("information='observed' from dist_factory needs the observed data")
        build_distribution(dist_factory, fp, fp.unflatten(fp.flat))  # clear errors first
        factory = dist_factory

        def nll_from_model(*args: Any) -> Tensor:
            *theta, observed = args
            return -make_distribution(factory, theta).log_prob(observed).sum()

        return observed_information(nll_from_model, params, data), fp
    return observed_information(nll, params, data), fp


def mle_covariance(
    nll: NegLogLik | None,
    params: ParamsLike,
    data: Any = None,
    *,
    information: str = "observed",
    dist_factory: DistFactory | None = None,
    method: str = "score",
    exact: bool | None = None,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    pinv: bool = False,
) -> Tensor:
    """Asymptotic covariance of the maximum-likelihood estimate, ``Cov(θ̂) ≈ 𝓘⁻¹``.

    ``𝓘`` is the information of the whole data set at the fitted ``θ̂``:

    * ``information="observed"``: ``J(θ̂) = ∇²ℓ(θ̂)`` (:func:`observed_information`), from ``nll``
      or, when ``nll`` is None, from ``ℓ(θ) = −Σ dist_factory(*θ).log_prob(data)``;
    * ``information="expected"``: ``I_D(θ̂)``, the Fisher information of
      ``dist_factory(*θ̂)`` taken as the distribution of the whole data set (one independent
      batch element per observation, e.g. ``Bernoulli(logits=X @ β)`` for logistic
      regression), by :func:`natgrad.stats.fisher_information`.

    Args:
        nll: ``nll(*params, data)`` (or ``nll(*params)``) negative log-likelihood summed over the
            observations; may be None when ``dist_factory`` is given.
        params: the fitted parameters ``θ̂`` (one floating tensor or a sequence of them).
        data: the observations, passed as the last argument of ``nll`` (or to ``log_prob``).
        information: "observed" or "expected".
        dist_factory: the model of the data (needed for "expected").
        method: "score" or "hessian", for ``fisher_information`` ("expected" only).
        exact: exact-expectation switch of ``fisher_information`` ("expected" only).
        num_samples: Monte-Carlo sample size of ``fisher_information`` ("expected" only).
        generator: seeds the Monte-Carlo draws of ``fisher_information`` ("expected" only).
        pinv: use the pseudo-inverse for a singular information (see
            :func:`natgrad.stats.cramer_rao_bound`); by default a singular or indefinite
            information raises.

    Returns:
        Tensor: ``[P, P]`` covariance over the flattened parameters.

    Raises:
        ValueError: singular or indefinite information (with reparametrisation/damping advice),
            an invalid ``information``, or missing ``nll``/``dist_factory``/``data``.
        TypeError: non-floating params.
    """
    kwargs = {"method": method, "exact": exact, "num_samples": num_samples, "generator": generator}
    info, _ = _information(nll, params, data, information, dist_factory, kwargs)
    return inverse_information(info, f"the {information} information", pinv=pinv)


def standard_errors(
    nll: NegLogLik | None,
    params: ParamsLike,
    data: Any = None,
    *,
    information: str = "observed",
    dist_factory: DistFactory | None = None,
    method: str = "score",
    exact: bool | None = None,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    pinv: bool = False,
) -> Tensor | tuple[Tensor, ...]:
    """Standard errors of the MLE: ``SE(θ̂_j) = sqrt([𝓘⁻¹]_jj)``, shaped like ``params``.

    Same arguments as :func:`mle_covariance`, which computes ``𝓘⁻¹``.

    Returns:
        Tensor | tuple[Tensor, ...]: one tensor when ``params`` is one tensor, else a tuple with
        one tensor per parameter, each with that parameter's shape.

    Raises:
        ValueError, TypeError: as :func:`mle_covariance`.
    """
    kwargs = {"method": method, "exact": exact, "num_samples": num_samples, "generator": generator}
    info, fp = _information(nll, params, data, information, dist_factory, kwargs)
    cov = inverse_information(info, f"the {information} information", pinv=pinv)
    variances = cov.diagonal().clamp_min(0.0)
    return fp.restructure(variances.sqrt())

