"""Probability parameters of torch.distributions: their valid range, and their exact logits.

torch turns a ``probs`` parameter into ``logits`` through ``probs_to_logits``, which clamps the
probabilities to ``[eps, 1 − eps]`` (``eps`` of the dtype: 1.2e-7 in float32) before taking
logarithms. The value barely moves, but the clamp has zero derivative outside that interval:
every score, Hessian or Jacobian taken through it is 0, so the Fisher information of e.g.
``Bernoulli(probs=1e-9)`` came out as 0 instead of ``1/(p(1−p)) ≈ 1e9``, in any dtype.

This module is the one place that knows about it:

* :func:`check_probabilities` — probabilities on the boundary of their range (where the
  information is infinite) raise a ValueError naming the parameter and the valid range;
* :func:`use_exact_logits` — installs the unclamped ``logits`` (``log p − log1p(−p)``, or
  ``log p`` on the simplex) on every distribution built from ``probs``, so that derivatives
  are exact for every probability strictly inside its range.

Both walk wrappers (Independent, TransformedDistribution, MixtureSameFamily) and the inner
Categorical of OneHotCategorical / Multinomial / RelaxedOneHotCategorical.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.distributions import (
    Bernoulli,
    Binomial,
    Categorical,
    ContinuousBernoulli,
    Distribution,
    Geometric,
    NegativeBinomial,
)
from torch.distributions.relaxed_bernoulli import LogitRelaxedBernoulli

__all__ = ["check_probabilities", "use_exact_logits"]

#: Families whose ``probs`` is one probability in the open interval (0, 1) and whose ``logits``
#: torch derives from it as ``log(clamp(p)) − log1p(−clamp(p))``.
_BINARY = (Bernoulli, Binomial, Geometric, NegativeBinomial, LogitRelaxedBernoulli)
#: Attributes holding inner distributions (wrappers, and the Categorical that OneHotCategorical,
#: Multinomial and ExpRelaxedCategorical delegate to).
_INNER = ("base_dist", "_categorical", "_mixture_distribution", "_component_distribution")


def _nodes(dist: Distribution, attrs: tuple[str, ...] = _INNER) -> Iterator[Distribution]:
    """``dist`` and every distribution nested inside it through ``attrs``."""
    stack = [dist]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        for attr in attrs:
            inner = vars(node).get(attr)
            if isinstance(inner, Distribution):
                stack.append(inner)


def _probs_param(node: Distribution) -> Tensor | None:
    """The ``probs`` tensor the node was built from, or None when it was built from logits."""
    state = vars(node)
    probs = state.get("probs")
    if not isinstance(probs, Tensor):
        return None
    param = state.get("_param")
    if param is not None:  # every family but Geometric records which one it was given
        return probs if param is probs else None
    return probs if "logits" not in state else None


def _where(bad: Tensor) -> str:
    index = tuple(int(i) for i in bad.nonzero()[0]) if bad.dim() > 0 else ()
    return f" (first at index {list(index)})" if index else ""


def check_probabilities(dist: Distribution) -> None:
    """Raises when a probability parameter lies on the boundary of its valid range.

    The parts of a MixtureSameFamily are not checked: its information stays finite when a
    component's weight is 0.

    Valid ranges (where the Fisher information is finite): ``probs`` of Bernoulli, Binomial,
    Geometric, NegativeBinomial and (Logit)RelaxedBernoulli in the open interval (0, 1); every
    normalised ``probs`` of Categorical, OneHotCategorical and Multinomial > 0; ``probs`` of
    ContinuousBernoulli in (eps, 1 − eps), since torch clamps it at construction (which loses
    its gradient). Distributions built from ``logits`` have no boundary and are not checked.

    Args:
        dist: a freshly built distribution (before its lazy properties were read).

    Raises:
        ValueError: naming the family, the parameter, the valid range and the offending value.
    """
    for node in _nodes(dist, ("base_dist", "_categorical")):
        probs = _probs_param(node)
        if probs is None:
            continue
        p = probs.detach()
        name = type(node).__name__
        advice = "; build the distribution from logits if you need probabilities this close to 0 or 1"
        if isinstance(node, _BINARY):
            bad = (p <= 0) | (p >= 1)
            if bool(bad.any()):
                value = float(p[bad].reshape(-1)[0])
                raise ValueError(
                    f"{name} parameter probs must lie in the open interval (0, 1) for its Fisher "
                    f"information to be finite, got probs = {value!r}{_where(bad)}" + advice
                )
        elif isinstance(node, Categorical):
            bad = p <= 0
            if bool(bad.any()):
                raise ValueError(
                    f"{name} parameter probs must all be > 0 (the interior of the simplex, (0, 1] after "
                    f"normalisation) for its Fisher information to be finite, got probs = 0{_where(bad)}" + advice
                )
        elif isinstance(node, ContinuousBernoulli):
            eps = torch.finfo(p.dtype).eps
            bad = (p <= eps) | (p >= 1 - eps)
            if bool(bad.any()):
                raise ValueError(
                    f"{name} parameter probs must lie in the open interval (eps, 1 − eps) = ({eps:.3g}, "
                    f"1 − {eps:.3g}) for {p.dtype}: torch clamps it to that interval at construction, "
                    f"which makes its derivatives 0 (got a clamped value{_where(bad)})" + advice
                )


def use_exact_logits(dist: Distribution) -> Distribution:
    """Gives every distribution built from ``probs`` its unclamped ``logits``.

    Sets ``logits = log p − log1p(−p)`` on the binary families and ``logits = log p`` on
    Categorical (whose ``probs`` is normalised), replacing torch's clamped lazy value. For
    ``p`` in (0, 1) both are finite, and so are their derivatives ``1/(p(1−p))`` and ``1/p``,
    whatever the dtype. Probabilities on the boundary (only possible where
    :func:`check_probabilities` does not look: mixture weights) keep torch's clamped logits.
    The distribution is modified in place and returned.
    """
    for node in _nodes(dist):
        probs = _probs_param(node)
        if probs is None:
            continue
        upper_ok = probs <= 1 if isinstance(node, Categorical) else probs < 1  # one class may hold all
        if not bool(((probs > 0) & upper_ok).all()):
            continue  # on the boundary (unchecked mixture weights): torch's finite values stay
        if isinstance(node, _BINARY):
            node.logits = torch.log(probs) - torch.log1p(-probs)
        elif isinstance(node, Categorical):
            node.logits = torch.log(probs)
    return dist
