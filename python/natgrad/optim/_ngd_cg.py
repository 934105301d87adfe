"""``NaturalGradient(solver="cg")``: Hessian-free-style natural gradient (Martens 2010).

Every step solves ``(F + λI) d = g`` by preconditioned conjugate gradient on exact matrix-free
Fisher-vector products (:class:`natgrad.fisher.ImplicitFisher` of the step's batch), starting
from the previous step's solution times ``warm_start``; ``kl_clip`` then bounds the step's
quadratic KL ``½ (ηd)ᵀ(F + λI)(ηd)`` through ``(ηd)ᵀ(F + λI)(ηd) <= κ``, with the product taken
exactly (the CG iterate need not solve the system, so ``dᵀg`` is not its curvature). Nothing of
size ``n × p`` or ``p × p`` is formed: ``backward`` is one ordinary forward and backward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from natgrad.fisher.compute import compute_fisher
from natgrad.fisher.implicit import ImplicitFisher
from natgrad.fisher.matrices import DiagonalFisher, FisherMatrix
from natgrad.fisher.scores import check_request
from natgrad.optim._hyper import check_choice, check_number, resolved_number
from natgrad.solvers import CGResult, conjugate_gradient

__all__ = ["CGOptions", "CGSolver"]

PRECONDITIONERS = ("none", "diagonal", "kfac")


@dataclass(kw_only=True)
class CGOptions:
    """Options of ``NaturalGradient(solver="cg")``.

    Attributes:
        tol (float): stop CG at relative residual ``‖r‖/‖g‖ <= tol`` (default: 1e-3).
        max_iters (int): at most this many Fisher-vector products per step (default: 50).
        preconditioner (str): "none", "diagonal" (the batch's exact diagonal Fisher, from
            per-sample gradients) or "kfac" (the batch's K-FAC blocks, recomputed every step)
            (default: "none").
        warm_start (float): CG starts from this times the previous step's solution, in [0, 1]
            (0: from zero; Martens 2010 uses 0.95) (default: 0.95).
    """

    tol: float = 1e-3
    max_iters: int = 50
    preconditioner: str = "none"
    warm_start: float = 0.95

    def __post_init__(self) -> None:
        check_number("cg tol", self.tol, low=0.0, low_open=True)
        check_number("cg max_iters", self.max_iters, low=1, integer=True)
        check_choice("cg preconditioner", self.preconditioner, PRECONDITIONERS)
        check_number("cg warm_start", self.warm_start, low=0.0, high=1.0)


class CGSolver:
    """The state and the two phases of a CG natural-gradient step (used by NaturalGradient)."""

    def __init__(self, options: CGOptions | None) -> None:
        if options is not None and not isinstance(options, CGOptions):
            raise ValueError(f"Invalid cg: expected natgrad.optim.CGOptions or None, got {type(options).__name__}")
        self.options = options or CGOptions()
        self.previous: Tensor | None = None  # last solution (the warm start), flat
        self.last_result: CGResult | None = None
        self._batch: tuple[Tensor, Tensor] | None = None

    def backward(self, opt: Any, inputs: Tensor, targets: Tensor) -> Tensor:
        """One forward and backward of the batch-mean loss into ``.grad`` (validated first, left
        untouched on NaN/Inf); keeps the batch for the step's Fisher. Returns the loss."""
        params = opt._params()
        lik, _ = check_request(opt.model, inputs, targets, "empirical", opt.likelihood, params, 1, opt.chunk_size)
        with torch.enable_grad():
            out = opt.model(inputs)
            if opt.loss_fn is None:
                lik.check(out, targets)
                loss = lik.nll(out, targets, "mean")
            else:
                loss = torch.vmap(lambda o, t: opt.loss_fn(o[None], t[None]).sum())(out, targets).mean()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        if not all(bool(torch.isfinite(g).all()) for g in grads) or not bool(torch.isfinite(loss)):
            raise FloatingPointError("NaturalGradient.backward: the loss or its gradient holds NaN or "
                                     "Inf (finite inputs, but the model overflowed?); .grad and the "
                                     "parameters were not changed")
        for p, g in zip(params, grads):
            p.grad = g.clone() if p.grad is None else p.grad.add_(g)
        self._batch = (inputs, targets)
        return loss.detach()

    def step(self, opt: Any, g: Tensor, damping: float) -> tuple[Tensor, float]:
        """The CG direction ``d ≈ (F + λI)⁻¹ g`` of the last :meth:`backward`'s batch and the
        trust-region factor ``ν = min(1, sqrt(κ / (η⊙d)ᵀ(F + λI)(η⊙d)))``."""
        if self._batch is None:
            raise RuntimeError("NaturalGradient.step() needs a batch: call opt.backward(inputs, targets) first")
        inputs, targets = self._batch
        params = opt._params()
        kwargs = dict(fisher_type=opt.fisher_type, likelihood=opt.likelihood, params=params,
                      chunk_size=opt.chunk_size, generator=opt._generator)
        loss_fn = opt.loss_fn if opt.fisher_type == "empirical" else None
        fisher = ImplicitFisher(opt.model, inputs, targets, loss_fn=loss_fn, **kwargs)
        preconditioner: FisherMatrix | None = None
        if self.options.preconditioner == "kfac":
            preconditioner = compute_fisher(opt.model, inputs, targets, structure="kfac", **kwargs)
        elif self.options.preconditioner == "diagonal":
            preconditioner = DiagonalFisher(fisher.diagonal())
        x0 = None
        if self.previous is not None and self.options.warm_start > 0 and self.previous.shape == g.shape:
            x0 = self.previous.to(g.dtype) * self.options.warm_start
        result = conjugate_gradient(fisher, g, damping=damping, preconditioner=preconditioner, x0=x0,
                                    tol=self.options.tol, max_iters=self.options.max_iters)
        self.last_result, self._batch = result, None
        d = result.solution
        if not bool(torch.isfinite(d).all()):
            raise FloatingPointError("NaturalGradient: the CG solve produced NaN/Inf; parameters were not changed")
        self.previous = d.detach().clone()
        kl_clip = resolved_number("kl_clip", opt.kl_clip, opt._steps, low=0.0, low_open=True, allow_none=True)
        if kl_clip is None:
            return d, 1.0
        lrs = torch.cat([torch.full((p.numel(),), grp["lr"], dtype=d.dtype, device=d.device)
                         for grp in opt.param_groups for p in grp["params"]])
        step = lrs * d
        curvature = float(fisher.quad_form(step)) + damping * float(step @ step)
        return d, 1.0 if curvature <= 0 else min(1.0, math.sqrt(kl_clip / curvature))

    def state_dict(self) -> dict[str, Any]:
        """The warm start (restored exactly)."""
        return {"previous": None if self.previous is None else self.previous.clone()}

    @staticmethod
    def checked_state(state: dict[str, Any] | None) -> Tensor | None:
        """The warm start of a :meth:`state_dict` (validated; None when absent)."""
        previous = (state or {}).get("previous")
        if previous is not None and (not isinstance(previous, Tensor) or previous.dim() != 1
                                     or not previous.is_floating_point() or not bool(torch.isfinite(previous).all())):
            raise ValueError("state_dict's cg warm start ('previous') must be a finite floating-point vector")
        return previous

    def load_state_dict(self, previous: Tensor | None) -> None:
        """Restores a warm start from :meth:`checked_state`."""
        self.previous = None if previous is None else previous.clone()
