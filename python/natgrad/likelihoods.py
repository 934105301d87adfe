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
  per output element with target ``f − e_k`` (unit Gaussian) ("exact").

KFAC's Monte-Carlo Fisher, the score rows behind ``compute_fisher`` and ``NaturalGradient``,
the K-FAC structure of ``compute_fisher`` and ``EWC`` all draw on these objects.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from natgrad._vocabulary import FISHER_TYPES, check_choice

__all__ = ["LIKELIHOODS", "Categorical", "Gaussian", "Likelihood", "get_likelihood"]

Pass = tuple[Tensor, Tensor | None]  # (targets, per-sample gradient weight or None for 1)


class Likelihood:
    """Base class; see the module docstring."""

    name = ""

    def check(self, output: Tensor, target: Tensor, what: str = "targets") -> None:
        """Raises ValueError naming ``what`` unless ``target`` fits ``output`` ([n, ...])."""
        raise NotImplementedError

    def nll(self, output: Tensor, target: Tensor, reduction: str = "sum") -> Tensor:
        """Negative log-likelihood (up to constants) summed over each sample's positions, then
        reduced over samples (dim 0): "none" ([n]), "sum" or "mean".
        """
        per_sample = self._per_sample_nll(output, target)
        if reduction == "none":
            return per_sample
        return per_sample.mean() if reduction == "mean" else per_sample.sum()

    def weighted_nll(self, output: Tensor, target: Tensor, weight: Tensor | None) -> Tensor:
        """``Σ_n w_n ℓ_n``: its gradient w.r.t. ``output[n]`` is ``w_n ∇ℓ_n``."""
        per_sample = self._per_sample_nll(output, target)
        return per_sample.sum() if weight is None else (per_sample * weight).sum()

    def sample(self, output: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Labels drawn from the predictive distribution at ``output`` (no gradient)."""
        raise NotImplementedError

    def exact_passes(self, output: Tensor) -> list[Pass]:
        """Passes whose weighted gradients give the exact (expected) Fisher."""
        raise NotImplementedError

    def pseudo_targets(self, output: Tensor, fisher_type: str, targets: Tensor | None = None,
                       mc_samples: int = 1, generator: torch.Generator | None = None) -> list[Pass]:
        """The (targets, weight) passes of ``fisher_type`` (see the module docstring)."""
        check_choice("fisher_type", fisher_type, FISHER_TYPES)
        if fisher_type == "empirical":
            if targets is None:
                raise ValueError("targets are required for fisher_type='empirical'")
            self.check(output, targets)
            return [(targets, None)]
        output = output.detach()
        if fisher_type == "exact":
            return self.exact_passes(output)
        check_count("mc_samples", mc_samples)
        weight = None if mc_samples == 1 else torch.full(
            (output.shape[0],), 1.0 / math.sqrt(mc_samples), dtype=output.dtype, device=output.device)
        return [(self.sample(output, generator), weight) for _ in range(mc_samples)]

    def _per_sample_nll(self, output: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError


def check_count(name: str, value: object) -> None:
    """Raises ValueError naming ``name`` unless ``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (expected an int >= 1)")


def _sum_per_sample(values: Tensor) -> Tensor:
    """``[n, ...] -> [n]``, summing each sample's positions (also for n = 0, where a reshape to
    ``[0, -1]`` is ambiguous).
    """
    return values.flatten(1).sum(1) if values.dim() > 1 else values


def _check_batch(output: Tensor, target: Tensor, what: str) -> None:
    if not isinstance(target, Tensor):
        raise TypeError(f"{what} must be a Tensor, got {type(target).__name__}")
    if output.dim() == 0:
        raise ValueError("the model's output must have a batch dimension, got a 0-d tensor")
    if target.dim() == 0 or target.shape[0] != output.shape[0]:
        raise ValueError(f"{what} must have one entry per sample: got shape {tuple(target.shape)} "
                         f"for outputs of shape {tuple(output.shape)}")


class Categorical(Likelihood):
    """Logits ``[n, ..., C]``, integer class targets ``[n, ...]`` (cross-entropy)."""

    name = "categorical"

    def check(self, output, target, what="targets"):
        _check_batch(output, target, what)
        if target.dtype in (torch.bool,) or target.is_floating_point() or target.is_complex():
            raise ValueError(f"{what} must hold integer class indices for the categorical "
                             f"likelihood, got dtype {target.dtype}")
        if tuple(target.shape) != tuple(output.shape[:-1]):
            raise ValueError(f"{what} must have shape {tuple(output.shape[:-1])} (the logits' shape "
                             f"without the class dim) for logits {tuple(output.shape)}, got "
                             f"{tuple(target.shape)}")
        if target.numel() and target.device.type != "meta":
            low, high = int(target.min()), int(target.max())
            if low < 0 or high >= output.shape[-1]:
                raise ValueError(f"{what} must be class indices in [0, {output.shape[-1]}), got "
                                 f"values in [{low}, {high}]")

    def _per_sample_nll(self, output, target):
        classes = output.shape[-1]
        per_row = F.cross_entropy(output.reshape(-1, classes), target.reshape(-1), reduction="none")
        return _sum_per_sample(per_row.reshape(output.shape[:-1]))

    def sample(self, output, generator=None):
        flat = output.detach().reshape(-1, output.shape[-1])
        probs = torch.softmax(torch.nan_to_num(flat.float()), -1).cpu()  # CPU: the generator is a CPU one
        labels = torch.multinomial(probs, 1, generator=generator).reshape(output.shape[:-1])
        return labels.to(output.device)

    def exact_passes(self, output):
        if output.dim() != 2:
            raise ValueError("fisher_type='exact' with the categorical likelihood needs logits "
                             f"[n, classes], got {tuple(output.shape)}")
        probs = torch.softmax(output, -1)
        n = output.shape[0]
        return [(torch.full((n,), c, dtype=torch.long, device=output.device), probs[:, c].sqrt())
                for c in range(output.shape[1])]


class Gaussian(Likelihood):
    """Means ``[n, ...]`` of a unit-variance Gaussian, targets of the same shape
    (``½‖y − f‖²`` per sample, the MSE loss up to its reduction).
    """

    name = "gaussian"

    def check(self, output, target, what="targets"):
        _check_batch(output, target, what)
        if not target.is_floating_point():
            raise ValueError(f"{what} must be floating point for the Gaussian likelihood, got "
                             f"{target.dtype}")
        if tuple(target.shape) != tuple(output.shape):
            raise ValueError(f"{what} must have the outputs' shape {tuple(output.shape)} for the "
                             f"Gaussian likelihood, got {tuple(target.shape)} (broadcasting would "
                             "silently change the Fisher; reshape one of them)")

    def _per_sample_nll(self, output, target):
        return _sum_per_sample(0.5 * (output - target).pow(2))

    def sample(self, output, generator=None):
        noise = torch.randn(output.shape, generator=generator, dtype=torch.float32)
        return torch.nan_to_num(output.detach()) + noise.to(device=output.device, dtype=output.dtype)

    def exact_passes(self, output):
        # E[(y−f)(y−f)ᵀ] = I: one pass per output element k, target f − e_k (gradient Jᵀe_k).
        size = math.prod(output.shape[1:])
        eye = torch.eye(size, dtype=output.dtype, device=output.device)
        return [(output - eye[k].reshape(output.shape[1:]), None) for k in range(size)]


LIKELIHOODS = {"categorical": Categorical(), "gaussian": Gaussian()}


def get_likelihood(name: str | Likelihood) -> Likelihood:
    """The likelihood called ``name`` ("categorical" or "gaussian"), or ``name`` itself."""
    if isinstance(name, Likelihood):
        return name
    check_choice("likelihood", name, tuple(LIKELIHOODS))
    return LIKELIHOODS[name]
