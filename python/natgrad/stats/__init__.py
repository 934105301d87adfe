"""Fisher information and classical likelihood statistics for torch.distributions.

Parametrisations are whatever a user's factory makes of its tensors: ``dist_factory(*params)``
returns a :class:`torch.distributions.Distribution`, and every matrix is over the flattened
parameters ``θ = concat(p.reshape(-1) for p in params)``.

* :func:`fisher_information` — ``I(θ) = E[s sᵀ] = −E[∇² log p]`` for one observation, exact
  over finite supports, Monte Carlo (with reported sample size and standard errors) otherwise;
  :func:`closed_form_fisher` — the exact closed form for common families, in any
  parametrisation (chain rule).
* :func:`observed_information` — ``∇² ℓ(θ)`` of a negative log-likelihood over data.
* :func:`mle_covariance`, :func:`standard_errors` — inverse observed or expected information.
* :func:`cramer_rao_bound` — ``Φ I⁻¹ Φᵀ / n``, refusing singular Fisher information.
* :func:`kl_second_order_check` — ``KL(p_θ ‖ p_{θ+δ})`` beside ``½ δᵀ I δ``.
"""
from __future__ import annotations

from natgrad.stats.bounds import KLCheck, cramer_rao_bound, kl_second_order_check
from natgrad.stats.closed_form import closed_form_fisher, has_closed_form
from natgrad.stats.fisher import DEFAULT_NUM_SAMPLES, FisherInformation, fisher_information
from natgrad.stats.likelihood import mle_covariance, observed_information, standard_errors

__all__ = [
    "DEFAULT_NUM_SAMPLES",
    "FisherInformation",
    "KLCheck",
    "closed_form_fisher",
    "cramer_rao_bound",
    "fisher_information",
    "has_closed_form",
    "kl_second_order_check",
    "mle_covariance",
    "observed_information",
    "standard_errors",
]
