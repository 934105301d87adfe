"""Typed Python wrappers over ``torch.ops.natgrad.*``, with fake kernels and autograd formulas.

Importing this package registers the fake (meta) kernels that let torch.compile trace the ops
and torch.library.opcheck validate them. Ops by family:

* :mod:`natgrad.ops.factors` — K-FAC Kronecker factors of Linear and Conv2d layers (+ EMA; every
  layer's EMAs of a step in one call).
* :mod:`natgrad.ops.ekfac` — EKFAC's diagonal in the Kronecker eigenbasis from per-sample
  gradients of Linear, Conv2d and Embedding layers (+ EMA).
* :mod:`natgrad.ops.linalg` — damped eigendecomposition with a fallback ladder; K-FAC
  preconditioning in eigen and inverse form.
* :mod:`natgrad.ops.step` — the per-step K-FAC work of every layer in one call (directions,
  trust-region inner products and finite flags; the momentum step).
* :mod:`natgrad.ops.empirical` — Woodbury natural-gradient solve; per-sample diagonal Fisher.
* :mod:`natgrad.ops.gram` — a layer's per-sample gradient rows, implicitly: their Gram matrix and
  the products ``U v``, ``Uᵀ w`` from hook data; the small Woodbury system (``gram_solve``).
* :mod:`natgrad.ops.ewc` — the diagonal EWC penalty and its gradient in one pass.
* :mod:`natgrad.ops.eigenbasis` — Adam in a Kronecker eigenbasis (natgrad.EigenAdam, SOAP): the
  rotation, the moments' carry into a refreshed basis, Shampoo's factors (ATen compositions).
* :mod:`natgrad.ops.rules` — the K-FAC rules natgrad.KFAC and the C++ frontend share: the
  statistics bound, rows and the sample scale, π and damping, the trust region, fault classes and
  unsupported-layer reasons.

Devices: every op is an ATen composition registered for every device
(CompositeExplicitAutograd), so it runs on CPU, CUDA and any other torch device; ``ewc_penalty``
also has a fused CPU-only kernel that serves CPU tensors. The fake kernels serve the meta device
and torch.compile and check arguments like the C++ kernels. ``natgrad.build_info()["devices"]``
reads the registrations back from the dispatcher.
"""
from __future__ import annotations

from natgrad.ops._common import Rung
from natgrad.ops.ekfac import (
    conv2d_ekfac_diagonal_ema_,
    ekfac_rebase,
    embedding_ekfac_diagonal_ema_,
    linear_ekfac_diagonal_ema_,
)
from natgrad.ops.empirical import WoodburySolution, linear_diag_fisher, woodbury_solve
from natgrad.ops.ewc import ewc_penalty, ewc_penalty_and_grad
from natgrad.ops.factors import (
    conv2d_act_factor,
    conv2d_act_factor_ema_,
    conv2d_grad_factor,
    conv2d_grad_factor_ema_,
    kfac_factors_ema_,
    linear_act_factor,
    linear_act_factor_ema_,
    linear_grad_factor,
    linear_grad_factor_ema_,
)
from natgrad.ops.gram import (
    GramSolution,
    conv2d_gram,
    conv2d_rows_mv,
    conv2d_rows_tmv,
    embedding_gram,
    embedding_rows_mv,
    embedding_rows_tmv,
    gram_solve,
    linear_gram,
    linear_rows_mv,
    linear_rows_tmv,
)
from natgrad.ops.linalg import (
    DampedInverses,
    EighResult,
    damped_eigh,
    kfac_damped_inverses,
    kfac_precondition_diagonal_a,
    kfac_precondition_eigen,
    kfac_precondition_ekfac,
    kfac_precondition_inverse,
)
from natgrad.ops.rules import (
    DampingAdaptation,
    Fault,
    QuadraticStep,
    TrustRegion,
    kfac_adapt_damping,
    kfac_conv_rows,
    kfac_conv_unsupported_reason,
    kfac_damping,
    kfac_direction_faults,
    kfac_embedding_rows,
    kfac_embedding_unsupported_reason,
    kfac_expand_grad_scale,
    kfac_factor_faults,
    kfac_fault_message,
    kfac_fsum,
    kfac_linear_rows,
    kfac_option_bounds,
    kfac_option_choices,
    kfac_peak_bounded,
    kfac_pi_correction,
    kfac_quadratic_step,
    kfac_sample_scale,
    kfac_statistics_limit,
    kfac_statistics_ok,
    kfac_trust_region,
)
from natgrad.ops.step import Directions, kfac_directions_eigen, kfac_directions_inverse, kfac_momentum_step_

__all__ = [
    "DampedInverses",
    "DampingAdaptation",
    "Directions",
    "EighResult",
    "Fault",
    "GramSolution",
    "QuadraticStep",
    "Rung",
    "TrustRegion",
    "WoodburySolution",
    "conv2d_act_factor",
    "conv2d_act_factor_ema_",
    "conv2d_ekfac_diagonal_ema_",
    "conv2d_grad_factor",
    "conv2d_grad_factor_ema_",
    "conv2d_gram",
    "conv2d_rows_mv",
    "conv2d_rows_tmv",
    "damped_eigh",
    "ekfac_rebase",
    "embedding_ekfac_diagonal_ema_",
    "embedding_gram",
    "embedding_rows_mv",
    "embedding_rows_tmv",
    "ewc_penalty",
    "ewc_penalty_and_grad",
    "gram_solve",
    "kfac_adapt_damping",
    "kfac_conv_rows",
    "kfac_conv_unsupported_reason",
    "kfac_damped_inverses",
    "kfac_damping",
    "kfac_direction_faults",
    "kfac_directions_eigen",
    "kfac_directions_inverse",
    "kfac_embedding_rows",
    "kfac_embedding_unsupported_reason",
    "kfac_expand_grad_scale",
    "kfac_factor_faults",
    "kfac_factors_ema_",
    "kfac_fault_message",
    "kfac_fsum",
    "kfac_linear_rows",
    "kfac_momentum_step_",
    "kfac_option_bounds",
    "kfac_option_choices",
    "kfac_peak_bounded",
    "kfac_pi_correction",
    "kfac_quadratic_step",
    "kfac_precondition_diagonal_a",
    "kfac_precondition_ekfac",
    "kfac_precondition_eigen",
    "kfac_precondition_inverse",
    "kfac_sample_scale",
    "kfac_statistics_limit",
    "kfac_statistics_ok",
    "kfac_trust_region",
    "linear_act_factor",
    "linear_act_factor_ema_",
    "linear_diag_fisher",
    "linear_ekfac_diagonal_ema_",
    "linear_grad_factor",
    "linear_grad_factor_ema_",
    "linear_gram",
    "linear_rows_mv",
    "linear_rows_tmv",
    "woodbury_solve",
]
