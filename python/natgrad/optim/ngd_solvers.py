"""natgrad.NaturalGradient's solver strategies, chosen once by ``NaturalGradient(solver=...)``.

A strategy owns what its solve needs between :meth:`NGDSolver.backward` and the step: the batch's
per-sample information, any warm start, and how the damped Fisher system is solved.

* :class:`WoodburySolver` (``solver="woodbury"``): per-sample gradient rows (implicit layer
  Grams where it can) and the Woodbury identity, never forming the ``p × p`` matrix.
* :class:`CGSolver` (``solver="cg"``): Hessian-free style (Martens 2010). Every step solves
  ``(F + λI) d = g`` by preconditioned conjugate gradient on exact matrix-free Fisher-vector
  products (:class:`natgrad.fisher.ImplicitFisher` of the step's batch), starting from the
  previous step's solution times ``warm_start``; ``kl_clip`` then bounds the step's quadratic KL
  ``½ (ηd)ᵀ(F + λI)(ηd)`` through ``(ηd)ᵀ(F + λI)(ηd) <= κ``, with the product taken exactly (the
  CG iterate need not solve the system, so ``dᵀg`` is not its curvature). Nothing of size
  ``n × p`` or ``p × p`` is formed: ``backward`` is one ordinary forward and backward.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from typing_extensions import override

from natgrad.distributed import collective, group_device
from natgrad.fisher.compute import compute_fisher
from natgrad.fisher.gram import BatchRows, collect_rows
from natgrad.fisher.implicit import ImplicitFisher
from natgrad.fisher.matrices import DiagonalFisher, FisherMatrix
from natgrad.fisher.scores import check_request
from natgrad.optim._hyper import Schedule, check_choice, check_number, resolved_number
from natgrad.solvers import CGResult, conjugate_gradient

__all__ = ["CGOptions", "CGSolver", "NGDSolver", "Problem", "WoodburySolver"]

PRECONDITIONERS = ("none", "diagonal", "kfac")

#: A step's directions: ``(parameter index, index into the parameter, direction)`` blocks.
Directions = Iterable[tuple[int, tuple, Tensor]]


@dataclass
class Problem:
    """What a strategy reads of the optimizer: the model, its optimized parameters and groups,
    the Fisher's definition and the step.
    """

    model: nn.Module
    params: list[Tensor]
    param_groups: list[dict]
    fisher_type: str
    likelihood: str
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None
    chunk_size: int
    generator: torch.Generator
    structure: str
    rows: str
    kl_clip: Schedule | None
    step: int

    def kl_clip_now(self) -> float | None:
        """The trust region κ of this step (None: none)."""
        return resolved_number("kl_clip", self.kl_clip, self.step, low=0.0, low_open=True, allow_none=True)


class NGDSolver:
    """Base class of the strategies (see the module docstring)."""

    #: The entry of the optimizer's state_dict holding the strategy's state (None: it keeps none).
    state_key: str | None = None

    def bind(self, structure: str, world: int, group) -> None:
        """Checks that the strategy serves ``structure`` with ``world`` processes in ``group``
        (ValueError otherwise) and remembers them.
        """

    def backward(self, problem: Problem, inputs: Tensor, targets: Tensor) -> Tensor:
        """Accumulates the batch-mean gradient into ``.grad``, keeps what the step needs and
        returns the batch-mean loss (detached).
        """
        raise NotImplementedError

    def start_step(self) -> None:
        """Raises RuntimeError when the step cannot run (no :meth:`backward` first)."""

    def directions(self, problem: Problem, raw: list[Tensor], grads: list[Tensor],
                   damping: float) -> tuple[Directions, float]:
        """The step's directions ``(F + λI)⁻¹ g`` (``grads``: with weight decay; ``raw``:
        without) and the trust region's scale ν.
        """
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The strategy's state (saved under :attr:`state_key`)."""
        return {}

    def checked_state(self, state: dict[str, Any] | None) -> Any:
        """A saved :meth:`state_dict`, validated (ValueError), for :meth:`load_state_dict`."""
        return None

    def load_state_dict(self, checked: Any) -> None:
        """Restores :meth:`checked_state` output."""


class WoodburySolver(NGDSolver):
    """``solver="woodbury"``: the batch's rows and the Woodbury solve (see
    :class:`natgrad.NaturalGradient`).
    """

    def __init__(self) -> None:
        self.batch: BatchRows | None = None  # the last backward's rows
        self._step_batch: BatchRows | None = None  # the rows the current step solves with
        self.group, self.world = None, 1

    @override
    def bind(self, structure, world, group):
        self.group, self.world = group, world

    @override
    def backward(self, problem, inputs, targets):
        batch, losses, mean = collect_rows(
            problem.model, inputs, targets, problem.params, fisher_type=problem.fisher_type,
            likelihood=problem.likelihood, loss_fn=problem.loss_fn, generator=problem.generator,
            chunk_size=problem.chunk_size,
            implicit=problem.rows == "implicit" and problem.structure != "diagonal")
        if self.world > 1:
            self._check_shards(inputs.shape[0])
            batch = batch.gathered(self._all_gather, self.world)
            for g in mean:
                collective(dist.all_reduce, g, group=self.group)
                g.div_(self.world)
        for p, g in zip(problem.params, mean):
            g = g.to(p.dtype)
            p.grad = g if p.grad is None else p.grad.add_(g)
        self.batch = batch
        return losses.mean()

    def _check_shards(self, size: int) -> None:
        """Equal shard sizes on every rank (the rows are gathered in rank order)."""
        sizes = torch.tensor([size], device=group_device(self.group))
        collective(dist.all_reduce, sizes, group=self.group, op=dist.ReduceOp.MAX)
        if int(sizes) != size:
            raise ValueError("NaturalGradient under torch.distributed needs the same batch size on "
                             f"every rank; this rank has {size}, another {int(sizes)}")

    def _all_gather(self, t: Tensor) -> list[Tensor]:
        parts = [torch.empty_like(t) for _ in range(self.world)]
        collective(dist.all_gather, (parts, t.contiguous()), group=self.group)
        return parts

    @override
    def start_step(self):
        if self.batch is None:
            raise RuntimeError("NaturalGradient.step() needs per-sample gradients: call "
                               "opt.backward(inputs, targets) instead of loss.backward() first")
        self._step_batch, self.batch = self.batch, None

    @override
    def directions(self, problem, raw, grads, damping):
        batch, self._step_batch = self._step_batch, None
        diagonal = problem.structure == "diagonal"
        if diagonal:
            directions: Directions = ((i, (), g / (d.to(g.dtype) + damping))
                                      for i, (g, d) in enumerate(zip(grads, batch.diagonal())))
        else:
            directions = batch.directions(grads, damping)
        kl_clip = problem.kl_clip_now()
        if not diagonal:
            self._warn_rung(batch.last_rung)
        if kl_clip is None and batch.finite_guaranteed:
            return directions, 1.0  # applied as each part is solved: no full-size copy is held
        pending = list(directions)
        if not all(bool(torch.isfinite(d).all()) for _, _, d in pending):
            raise FloatingPointError("NaturalGradient: the solve produced NaN/Inf (a too small "
                                     "damping or overflowing per-sample gradients?); "
                                     "parameters were not changed")
        nu = 1.0
        if kl_clip is not None:
            lrs = [group["lr"] for group in problem.param_groups for _ in group["params"]]
            vg = sum(float((d * raw[i][where].to(d.dtype)).sum()) * lrs[i] ** 2 for i, where, d in pending)
            nu = 1.0 if vg <= 0 else min(1.0, math.sqrt(kl_clip / vg))
        return pending, nu

    @staticmethod
    def _warn_rung(rung: int) -> None:
        if rung > 0:
            warnings.warn(f"natgrad.NaturalGradient: the Woodbury solve needed fallback-ladder "
                          f"rung {rung} (see natgrad.ops.Rung): the batch's Fisher is "
                          "ill-conditioned; consider a larger damping", RuntimeWarning, stacklevel=4)


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


class CGSolver(NGDSolver):
    """``solver="cg"``: the state and the two phases of a CG natural-gradient step (see the
    module docstring).

    Args:
        options (CGOptions, optional): tolerance, iteration cap, preconditioner and warm start
            (default: ``CGOptions()``).
    """

    state_key = "cg"

    def __init__(self, options: CGOptions | None = None) -> None:
        if options is not None and not isinstance(options, CGOptions):
            raise ValueError(f"Invalid cg: expected natgrad.optim.CGOptions or None, got {type(options).__name__}")
        self.options = options or CGOptions()
        self.previous: Tensor | None = None  # last solution (the warm start), flat
        self.last_result: CGResult | None = None
        self.batch: tuple[Tensor, Tensor] | None = None

    @override
    def bind(self, structure, world, group):
        if structure == "diagonal" or world > 1:
            raise ValueError("solver='cg' needs structure='dense' and a single process, got "
                             f"structure={structure!r} with {world} processes")

    def backward(self, problem, inputs, targets):
        """One forward and backward of the batch-mean loss into ``.grad`` (validated first, left
        untouched on NaN/Inf); keeps the batch for the step's Fisher. Returns the loss.
        """
        params = problem.params
        lik, _ = check_request(problem.model, inputs, targets, "empirical", problem.likelihood, params, 1,
                               problem.chunk_size)
        with torch.enable_grad():
            out = problem.model(inputs)
            if problem.loss_fn is None:
                lik.check(out, targets)
                loss = lik.nll(out, targets, "mean")
            else:
                loss_fn = problem.loss_fn
                loss = torch.vmap(lambda o, t: loss_fn(o[None], t[None]).sum())(out, targets).mean()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        if not all(bool(torch.isfinite(g).all()) for g in grads) or not bool(torch.isfinite(loss)):
            raise FloatingPointError("NaturalGradient.backward: the loss or its gradient holds NaN or "
                                     "Inf (finite inputs, but the model overflowed?); .grad and the "
                                     "parameters were not changed")
        for p, g in zip(params, grads):
            p.grad = g.clone() if p.grad is None else p.grad.add_(g)
        self.batch = (inputs, targets)
        return loss.detach()

    @override
    def directions(self, problem, raw, grads, damping):
        direction, nu = self.solve(problem, torch.cat([g.reshape(-1) for g in grads]), damping)
        parts = direction.split([p.numel() for p in problem.params])
        return ((i, (), d.view_as(p)) for i, (d, p) in enumerate(zip(parts, problem.params))), nu

    def solve(self, problem: Problem, g: Tensor, damping: float) -> tuple[Tensor, float]:
        """The CG direction ``d ≈ (F + λI)⁻¹ g`` of the last :meth:`backward`'s batch and the
        trust-region factor ``ν = min(1, sqrt(κ / (η⊙d)ᵀ(F + λI)(η⊙d)))``.
        """
        if self.batch is None:
            raise RuntimeError("NaturalGradient.step() needs a batch: call opt.backward(inputs, targets) first")
        inputs, targets = self.batch
        kwargs: dict[str, Any] = dict(fisher_type=problem.fisher_type, likelihood=problem.likelihood,
                                      params=problem.params, chunk_size=problem.chunk_size,
                                      generator=problem.generator)
        loss_fn = problem.loss_fn if problem.fisher_type == "empirical" else None
        fisher = ImplicitFisher(problem.model, inputs, targets, loss_fn=loss_fn, **kwargs)
        preconditioner: FisherMatrix | None = None
        if self.options.preconditioner == "kfac":
            preconditioner = compute_fisher(problem.model, inputs, targets, structure="kfac", **kwargs)
        elif self.options.preconditioner == "diagonal":
            preconditioner = DiagonalFisher(fisher.diagonal())
        x0 = None
        if self.previous is not None and self.options.warm_start > 0 and self.previous.shape == g.shape:
            x0 = self.previous.to(g.dtype) * self.options.warm_start
        result = conjugate_gradient(fisher, g, damping=damping, preconditioner=preconditioner, x0=x0,
                                    tol=self.options.tol, max_iters=self.options.max_iters)
        self.last_result, self.batch = result, None
        d = result.solution
        if not bool(torch.isfinite(d).all()):
            raise FloatingPointError("NaturalGradient: the CG solve produced NaN/Inf; parameters were not changed")
        self.previous = d.detach().clone()
        kl_clip = problem.kl_clip_now()
        if kl_clip is None:
            return d, 1.0
        lrs = torch.cat([torch.full((p.numel(),), grp["lr"], dtype=d.dtype, device=d.device)
                         for grp in problem.param_groups for p in grp["params"]])
        step = lrs * d
        curvature = float(fisher.quad_form(step)) + damping * float(step @ step)
        return d, 1.0 if curvature <= 0 else min(1.0, math.sqrt(kl_clip / curvature))

    def state_dict(self):
        """The warm start (restored exactly)."""
        return {"previous": None if self.previous is None else self.previous.clone()}

    def checked_state(self, state):
        """The warm start of a :meth:`state_dict` (validated; None when absent)."""
        previous = (state or {}).get("previous")
        if previous is not None and (not isinstance(previous, Tensor) or previous.dim() != 1
                                     or not previous.is_floating_point() or not bool(torch.isfinite(previous).all())):
            raise ValueError("state_dict's cg warm start ('previous') must be a finite floating-point vector")
        return previous

    def load_state_dict(self, checked):
        """Restores a warm start from :meth:`checked_state`."""
        self.previous = None if checked is None else checked.clone()
