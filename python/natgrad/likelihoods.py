"""The output distributions natgrad's Fisher estimates are taken under (one place for each).

Every Fisher natgrad computes for a model is a mean over samples of outer products of gradients
of per-sample negative log-likelihoods ``ℓ(f(x), y)``. A :class:`Likelihood` knows

* ``check(output, target)`` — the one validation of targets against outputs (shape, dtype,
  range), with errors that name the argument;
* ``nll(output, target, reduction)`` — the per-sample NLL (summed over a sample's positions);
* ``sample(output, generator)`` — labels drawn from the model's predictive distribution (a
  NaN/Inf output draws from finite stand-ins, ``torch.nan_to_num``: the statistics it feeds stay
  non-finite, and each caller's finiteness check rejects them with its own error);
* ``pseudo_targets(output, fisher_type, ...)`` — the (targets, per-sample weight) passes whose
  weighted gradients ``w·∇ℓ(f(x), y)`` have the requested Fisher as their summed outer
  products: the observed targets ("empirical"), ``draws`` sampled labels with weight
  ``1/sqrt(draws)`` ("mc"), or one pass per class with weight ``sqrt(p_c)`` (categorical) /
  per output element with target ``f − e_k`` (unit Gaussian) / with target
  ``p − sqrt(p_k(1 − p_k)) e_k``, ``p = sigmoid(f)`` (Bernoulli) ("exact").

KFAC's Monte-Carlo Fisher, the score rows behind ``compute_fisher`` and ``NaturalGradient``,
the K-FAC structure of ``compute_fisher`` and ``EWC`` all draw on these objects. The rules are
written once, in C++ (csrc/likelihood/likelihood.h), and shared with the C++ frontend's
``natgrad::EWC``; these objects reach them through the ``torch.ops.natgrad.likelihood_*`` ops.
"""
from __future__ import annotations

import torch
from torch import Tensor

from natgrad import _C  # noqa: F401  (loads the operator registrations)
from natgrad._vocabulary import check_choice

__all__ = ["LIKELIHOODS", "Bernoulli", "Categorical", "Gaussian", "Likelihood", "get_likelihood"]

Pass = tuple[Tensor, Tensor | None]  # (targets, per-sample gradient weight or None for 1)


class Likelihood:
    """One output distribution (see the module docstring); :data:`LIKELIHOODS` holds the two
    natgrad supports, ``"categorical"``, ``"gaussian"`` and ``"bernoulli"``.
    """

    name = ""

    def check(self, output: Tensor, target: Tensor, what: str = "targets") -> None:
        """Raises ValueError naming ``what`` unless ``target`` fits ``output`` ([n, ...])."""
        if not isinstance(target, Tensor):
            raise TypeError(f"{what} must be a Tensor, got {type(target).__name__}")
        torch.ops.natgrad.likelihood_check_targets(self.name, output, target, what)

    def nll(self, output: Tensor, target: Tensor, reduction: str = "sum") -> Tensor:
        """Negative log-likelihood (up to constants) summed over each sample's positions, then
        reduced over samples (dim 0): "none" ([n]), "sum" or "mean".
        """
        per_sample = torch.ops.natgrad.likelihood_nll(self.name, output, target)
        if reduction == "none":
            return per_sample
        return per_sample.mean() if reduction == "mean" else per_sample.sum()

    def weighted_nll(self, output: Tensor, target: Tensor, weight: Tensor | None) -> Tensor:
        """``Σ_n w_n ℓ_n``: its gradient w.r.t. ``output[n]`` is ``w_n ∇ℓ_n``."""
        per_sample = torch.ops.natgrad.likelihood_nll(self.name, output, target)
        return per_sample.sum() if weight is None else (per_sample * weight).sum()

    def sample(self, output: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Labels drawn from the predictive distribution at ``output`` (no gradient); the
        generator is a CPU generator whatever the outputs' device.
        """
        return torch.ops.natgrad.likelihood_sample(self.name, output, generator)

    def pseudo_targets(self, output: Tensor, fisher_type: str, targets: Tensor | None = None,
                       mc_samples: int = 1, generator: torch.Generator | None = None) -> list[Pass]:
        """The (targets, weight) passes of ``fisher_type`` (see the module docstring)."""
        if not isinstance(fisher_type, str):
            raise ValueError(f"Invalid fisher_type: {fisher_type!r} (expected one of 'empirical', 'mc', 'exact')")
        if fisher_type == "mc":
            check_count("mc_samples", mc_samples)
        if targets is not None and not isinstance(targets, Tensor):
            raise TypeError(f"targets must be a Tensor, got {type(targets).__name__}")
        labels, weights = torch.ops.natgrad.likelihood_pseudo_targets(
            self.name, output, fisher_type, targets, int(mc_samples) if fisher_type == "mc" else 1, generator)
        return [(t, None if weights is None else weights[k]) for k, t in enumerate(labels)]


def check_count(name: str, value: object) -> None:
    """Raises ValueError naming ``name`` unless ``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (expected an int >= 1)")


class Categorical(Likelihood):
    """Logits ``[n, ..., C]``, integer class targets ``[n, ...]`` (cross-entropy)."""

    name = "categorical"


class Gaussian(Likelihood):
    """Means ``[n, ...]`` of a unit-variance Gaussian, targets of the same shape
    (``½‖y − f‖²`` per sample, the MSE loss up to its reduction).
    """

    name = "gaussian"


class Bernoulli(Likelihood):
    """Logits ``[n, ...]`` of independent Bernoulli outputs, targets in [0, 1] of the same shape
    (``binary_cross_entropy_with_logits`` summed per sample): an autoencoder's pixels, multi-label
    classification.
    """

    name = "bernoulli"


LIKELIHOODS = {"categorical": Categorical(), "gaussian": Gaussian(), "bernoulli": Bernoulli()}


def get_likelihood(name: str | Likelihood) -> Likelihood:
    """The likelihood called ``name`` ("categorical", "gaussian" or "bernoulli"), or ``name`` itself."""
    if isinstance(name, Likelihood):
        return name
    check_choice("likelihood", name, tuple(LIKELIHOODS))
    return LIKELIHOODS[name]
