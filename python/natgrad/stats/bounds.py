"""The Cramér–Rao bound, and the second-order KL identity of the Fisher information.

Cramér–Rao: for ``n`` i.i.d. observations with one-observation Fisher information ``I(θ)`` and
any estimator ``T`` with mean ``E[T] = φ(θ)`` (``Φ = ∂φ/∂θ``, ``[Q, P]``)::

    Cov(T) ⪰ Φ I(θ)⁻¹ Φᵀ / n          (unbiased for θ: Φ = identity, Cov(T) ⪰ I⁻¹/n)

KL identity: for a small perturbation ``δ`` of the parameters::

    KL(p_θ ‖ p_{θ+δ}) = ½ δᵀ I(θ) δ + O(‖δ‖³)
"""
from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.distributions import kl_divergence

from natgrad.stats._params import (
    DistFactory,
    FlatParams,
    ParamsLike,
    as_information_matrix,
    build_distribution,
    flatten_params,
    inverse_information,
)
from natgrad.stats.fisher import FisherInformation, fisher_information

__all__ = ["KLCheck", "cramer_rao_bound", "kl_second_order_check"]


def cramer_rao_bound(
    fisher: Tensor | FisherInformation,
    n: int = 1,
    jacobian: Tensor | None = None,
    *,
    pinv: bool = False,
    rcond: float | None = None,
) -> Tensor:
    """Cramér–Rao lower bound on the covariance of an estimator from ``n`` observations.

    * ``jacobian=None`` (unbiased estimator of θ): ``I⁻¹ / n``;
    * ``jacobian=Φ`` (estimator with mean ``φ(θ)``, ``Φ = ∂φ/∂θ``): ``Φ I⁻¹ Φᵀ / n``.

    A singular (or numerically singular: ``λ_min <= rcond · λ_max``) Fisher information means the
    parameters are not identifiable in this parametrisation; that raises unless ``pinv=True``,
    which uses the Moore–Penrose pseudo-inverse ``I⁺`` (the bound ``Φ I⁺ Φᵀ / n`` is valid when
    the rows of ``Φ`` lie in the range of ``I``, e.g. for identifiable functions of θ).

    Args:
        fisher: ``[P, P]`` one-observation Fisher information, or a :class:`FisherInformation`.
        n: number of i.i.d. observations, an int >= 1.
        jacobian: None, ``[P]`` (scalar ``φ``: the result is 0-dim) or ``[Q, P]``.
        pinv: use the pseudo-inverse instead of raising on a singular Fisher information.
        rcond: relative eigenvalue threshold for singularity (default ``100 · P · eps``).

    Returns:
        Tensor: ``[P, P]``, ``[Q, Q]`` or a 0-dim variance bound.

    Raises:
        ValueError: singular or indefinite ``fisher`` (with advice), bad shapes, ``n < 1``.
        TypeError: non-tensor or non-floating inputs, non-integer ``n``.
    """
    matrix = as_information_matrix(fisher)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n must be an int >= 1 (the number of observations), got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n must be an int >= 1 (the number of observations), got {n}")
    inv = inverse_information(matrix, "fisher", pinv=pinv, rcond=rcond) / n
    if jacobian is None:
        return inv
    if not isinstance(jacobian, Tensor):
        raise TypeError(f"jacobian must be a tensor or None, got {type(jacobian).__name__}")
    if not jacobian.is_floating_point():
        raise TypeError(f"jacobian must be floating point, got dtype {jacobian.dtype}")
    p = matrix.shape[0]
    if jacobian.dim() not in (1, 2) or jacobian.shape[-1] != p:
        raise ValueError(f"jacobian must have shape [{p}] or [Q, {p}] to match fisher [{p}, {p}], "
                         f"got {tuple(jacobian.shape)}")
    jac = jacobian.to(device=inv.device, dtype=torch.promote_types(jacobian.dtype, inv.dtype))
    inv = inv.to(jac.dtype)
    if jac.dim() == 1:
        return jac @ inv @ jac
    bound = jac @ inv @ jac.mT
    return 0.5 * (bound + bound.mT)


class KLCheck(NamedTuple):
    """Output of :func:`kl_second_order_check`."""

    kl: Tensor  #: 0-dim ``KL(p_θ ‖ p_{θ+δ})`` from ``torch.distributions.kl_divergence``
    quadratic: Tensor  #: 0-dim ``½ δᵀ I(θ) δ``
    ratio: Tensor  #: 0-dim ``kl / quadratic`` (→ 1 as δ → 0)
    fisher: Tensor  #: ``[P, P]`` the Fisher information used


#: ``δ``: a flat ``[P]`` tensor, or tensors shaped like the parameters.
DeltaLike = Tensor | Sequence[Tensor]


def _flat_delta(delta: DeltaLike, fp: FlatParams) -> Tensor:
    """``δ`` as a ``[P]`` vector: the one validation point of ``δ``.

    Checks its structure against the parameters, and that it is finite and non-zero (the
    ratio ``KL / ½ δᵀIδ`` is 0/0 at ``δ = 0``).
    """
    step = _structured_delta(delta, fp)
    if not bool(torch.isfinite(step).all()):
        raise ValueError(f"delta must be finite, got NaN or Inf entries: {step.tolist()}")
    if not bool((step != 0).any()):
        raise ValueError(
            "delta must be non-zero (‖δ‖ > 0): at δ = 0 both KL and ½ δᵀ I δ vanish and their ratio is "
            "undefined; pass a small perturbation such as 1e-3 times a direction"
        )
    return step


def _structured_delta(delta: DeltaLike, fp: FlatParams) -> Tensor:
    """``δ`` as a ``[P]`` vector, checking its structure against the parameters."""
    p = fp.size
    if isinstance(delta, Tensor):
        if not delta.is_floating_point():
            raise TypeError(f"delta must be floating point, got dtype {delta.dtype}")
        if delta.shape == torch.Size([p]) or (fp.single and delta.shape == fp.shapes[0]):
            return delta.detach().reshape(-1).to(fp.flat)
        expected = f"[{p}]" + (f" or {list(fp.shapes[0])}" if fp.single else "")
        raise ValueError(f"delta must have shape {expected} (one entry per scalar parameter), got {list(delta.shape)}")
    if not isinstance(delta, Sequence) or len(delta) != len(fp.shapes):
        raise ValueError(
            f"delta must be a flat [{p}] tensor or a sequence of {len(fp.shapes)} tensors shaped like params, "
            f"got {type(delta).__name__}" + (f" of length {len(delta)}" if isinstance(delta, Sequence) else "")
        )
    parts = flatten_params(delta, "delta")
    for i, (got, want) in enumerate(zip(parts.shapes, fp.shapes, strict=True)):
        if got != want:
            raise ValueError(f"delta[{i}] must have the shape of params[{i}], {list(want)}, got {list(got)}")
    return parts.flat.to(fp.flat)


def kl_second_order_check(
    dist_factory: DistFactory,
    params: ParamsLike,
    delta: DeltaLike,
    *,
    fisher: Tensor | FisherInformation | None = None,
    **fisher_kwargs: Any,
) -> KLCheck:
    """Both sides of ``KL(p_θ ‖ p_{θ+δ}) ≈ ½ δᵀ I(θ) δ``, to verify the identity.

    The KL divergence is ``torch.distributions.kl_divergence`` summed over the batch dims (the
    KL of the joint of the independent batch elements), the same convention as the Fisher
    information of one observation. The ratio ``kl / quadratic`` tends to 1 as ``δ → 0``
    (the error is ``O(‖δ‖)``).

    Args:
        dist_factory: ``dist_factory(*params) -> Distribution``; the pair of distributions must
            have a registered ``kl_divergence``.
        params: θ, as for :func:`natgrad.stats.fisher_information`.
        delta: the perturbation δ: a sequence of tensors shaped like ``params``, or one flat
            ``[P]`` tensor (or, for a single parameter tensor, a tensor of its shape).
        fisher: the ``[P, P]`` information to use (e.g. from ``closed_form_fisher``, free of
            Monte-Carlo noise); None computes ``fisher_information(dist_factory, params,
            **fisher_kwargs)``.
        **fisher_kwargs: forwarded to ``fisher_information`` (method, exact, num_samples,
            generator) when ``fisher`` is None.

    Returns:
        KLCheck: ``(kl, quadratic, ratio, fisher)``.

    Warns:
        RuntimeWarning: when ``½ δᵀ I δ`` is zero to rounding (δ in the null space of ``I``);
            the ratio is then NaN.

    Raises:
        ValueError: ``delta`` not matching the parameters, zero or not finite; a ``fisher`` of
            the wrong size; probabilities of θ or θ + δ on the boundary of their range.
        TypeError: no ``kl_divergence`` registered for the distribution type, bad inputs.
    """
    fp = flatten_params(params)
    step = _flat_delta(delta, fp)
    if fisher is None:
        matrix = fisher_information(dist_factory, params, **fisher_kwargs).matrix
    else:
        if fisher_kwargs:
            raise ValueError(f"fisher_kwargs {sorted(fisher_kwargs)} are unused when fisher is given")
        matrix = as_information_matrix(fisher)
        if matrix.shape[0] != fp.size:
            raise ValueError(f"fisher must be [{fp.size}, {fp.size}] to match params, got {list(matrix.shape)}")
    with torch.no_grad():
        p = build_distribution(dist_factory, fp, fp.unflatten(fp.flat))
        q = build_distribution(dist_factory, fp, fp.unflatten(fp.flat + step))
        try:
            kl = kl_divergence(p, q).sum()
        except NotImplementedError as err:
            raise TypeError(
                f"torch.distributions has no kl_divergence registered for ({type(p).__name__}, "
                f"{type(q).__name__}): {err}"
            ) from err
        m = matrix.to(step)
        quadratic = 0.5 * step @ m @ step
        # Rounding level of ½ δᵀ I δ (the relative threshold of a singular information).
        rounding = 100 * fp.size * torch.finfo(m.dtype).eps * m.diagonal().abs().max() * 0.5 * (step @ step)
    if not bool(quadratic > rounding):
        warnings.warn(
            f"½ δᵀ I δ = {float(quadratic):.3e} is zero to rounding (KL = {float(kl):.3e}): δ lies in the "
            "null space of the Fisher information (a direction the distribution does not depend on), so "
            "the ratio is NaN",
            RuntimeWarning,
            stacklevel=2,
        )
        ratio = torch.full_like(quadratic, float("nan"))
    else:
        ratio = kl / quadratic
    return KLCheck(kl=kl, quadratic=quadratic, ratio=ratio, fisher=matrix)
