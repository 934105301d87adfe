r"""Grafting (Agarwal et al., 2020; Distributed Shampoo): a preconditioned direction keeps its
orientation but takes, per parameter tensor, the norm of another optimizer's step.

One rule for natgrad.KFAC and natgrad.EigenAdam, :class:`Grafting`: with ``u`` the optimizer's
direction for a parameter and ``s`` the grafted optimizer's step on the same gradient ``g``,

.. math::
    u \leftarrow \frac{\|s\|_F}{\|u\|_F}\, u, \qquad
    s = \begin{cases} g & \text{"sgd"} \\
    g \oslash \left(\sqrt{v / (1-\beta_2^t)} + \epsilon\right),\;
    v \leftarrow \beta_2 v + (1-\beta_2) g^2 & \text{"adam"} \end{cases}

Adam grafting keeps its own second moment ``v`` and step count ``t`` per parameter (state entries
:data:`GRAFT_EXP_AVG_SQ`, :data:`GRAFT_STEP` of the optimizer's ``state[p]``, saved with it), as
Distributed Shampoo's Adam grafting does; the first moment is the optimizer's own momentum,
applied after grafting. A zero direction stays zero. Since each tensor's norm is matched, so is
each layer's.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from natgrad.ops.eigenbasis import adam_direction
from natgrad.optim._hyper import check_choice

__all__ = ["GRAFTING_CHOICES", "Grafting", "make_grafting"]

GRAFTING_CHOICES = (None, "adam", "sgd")
GRAFT_EXP_AVG_SQ = "graft_exp_avg_sq"
GRAFT_STEP = "graft_step"


class Grafting:
    """The grafting rule (see the module docstring).

    Args:
        kind (str): "adam" or "sgd".

    Example:
        >>> rule = Grafting("sgd")
        >>> p = torch.zeros(2)
        >>> out, scales = rule.graft({p: torch.tensor([3.0, 4.0])}, {p: torch.tensor([0.6, 0.0])}, {p: {}})
        >>> out[p]
        tensor([0.3600, 0.4800])
    """

    def __init__(self, kind: str) -> None:
        check_choice("grafting", kind, ("adam", "sgd"))
        self.kind = kind

    def step_of(self, p: Tensor, grad: Tensor, state: dict[str, Any], beta2: float, eps: float) -> Tensor:
        """The grafted optimizer's step on ``grad`` (Adam: updates its moment in ``state``)."""
        if self.kind == "sgd":
            return grad
        v = state.get(GRAFT_EXP_AVG_SQ)
        if v is None:
            v = state[GRAFT_EXP_AVG_SQ] = torch.zeros_like(grad)
        t = int(state.get(GRAFT_STEP, 0)) + 1
        state[GRAFT_STEP] = t
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        return adam_direction(grad, v, t, 0.0, beta2, eps)  # Adam without a first moment (β₁ = 0)

    def graft(self, directions: dict[Tensor, Tensor], grads: dict[Tensor, Tensor], state: Any,
              beta2: float | dict[Tensor, float] = 0.999,
              eps: float | dict[Tensor, float] = 1e-8) -> tuple[dict[Tensor, Tensor], dict[Tensor, float]]:
        """Each direction rescaled to its grafted step's norm (new tensors: a direction that
        aliases ``.grad`` is not touched), and the scale factors, with one host read.

        Args:
            directions (dict): parameter -> its direction ``u``.
            grads (dict): parameter -> the gradient ``g`` the direction came from.
            state: the optimizer's ``state`` (parameter -> dict), holding Adam grafting's moments.
            beta2 (float or dict by parameter): Adam grafting's β₂ (default: 0.999).
            eps (float or dict by parameter): Adam grafting's ε (default: 1e-8).
        """
        params = list(directions)
        if not params:
            return {}, {}
        norms = []
        for p in params:
            b2 = beta2[p] if isinstance(beta2, dict) else beta2
            e = eps[p] if isinstance(eps, dict) else eps
            s = self.step_of(p, grads[p], state[p], b2, e)
            norms += [torch.linalg.vector_norm(s, dtype=torch.float64),
                      torch.linalg.vector_norm(directions[p], dtype=torch.float64)]
        values = torch.stack([n.to(norms[0].device) for n in norms]).tolist()
        out, scales = {}, {}
        for i, p in enumerate(params):
            target, own = values[2 * i], values[2 * i + 1]
            scales[p] = target / own if own > 0 else 1.0
            out[p] = directions[p] * scales[p]
        return out, scales


def make_grafting(kind: str | None) -> Grafting | None:
    """The rule for an optimizer's ``grafting`` argument (None: no grafting); ValueError names
    the argument on any other value.
    """
    if kind is None:
        return None
    if not isinstance(kind, str) or kind not in GRAFTING_CHOICES:
        raise ValueError(f"Invalid grafting: {kind!r} (expected None, 'adam' or 'sgd')")
    return Grafting(kind)
