"""natgrad.NaturalGradient: the exact (empirical or sampled) Fisher natural gradient."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from natgrad._vocabulary import renamed_value
from natgrad.likelihoods import get_likelihood
from natgrad.optim._hyper import Schedule, check_choice, check_group, check_number, resolved_number
from natgrad.optim.ngd_solvers import CGOptions, CGSolver, NGDSolver, Problem, WoodburySolver

__all__ = ["NaturalGradient"]


class NaturalGradient(Optimizer):
    r"""Natural gradient with the exact Fisher of the current batch, never forming it.

    With per-sample gradients :math:`U \in \mathbb{R}^{n\times p}` (rows :math:`\nabla\ell_i`) the
    empirical Fisher is :math:`F = U^\top U / n` and each step solves

    .. math::
        d = (F + \lambda I)^{-1} (\nabla L + \omega\theta), \qquad
        \nu = \min\bigl(1, \sqrt{\kappa / (\eta^2 d^\top \nabla L)}\bigr), \qquad
        b \leftarrow \mu b + \nu d, \qquad \theta \leftarrow \theta - \eta b,

    by the Woodbury identity, :math:`d = (g - U^\top (UU^\top + n\lambda I)^{-1} U g)/\lambda`,
    never forming the :math:`p \times p` matrix. ``fisher_type="mc"`` uses rows from labels
    sampled from the model instead, ``"exact"`` the expectation over its predictive distribution
    (one row per sample and class); ``structure="diagonal"`` keeps only :math:`\mathrm{diag}(F)`
    (an Adam-like per-parameter scaling, but from per-sample squares). If the solve needed a
    fallback-ladder rung (an ill-conditioned system), a RuntimeWarning says so.

    ``rows="implicit"`` (the default) never forms :math:`U` for the layers K-FAC understands
    (``nn.Linear`` with any leading shape, ``nn.Conv2d``, ``nn.Embedding``): one forward and one
    backward pass capture each layer's inputs :math:`X` and output gradients :math:`G`, its part
    of :math:`UU^\top` is :math:`(XX^\top)\circ(GG^\top)` (summed over weight-sharing
    positions inside each per-sample product), and :math:`Ug`, :math:`U^\top w` are one GEMM
    each (C++ ops, :mod:`natgrad.ops.gram`): a step costs :math:`O(n p + n^2 (d_{in} + d_{out}))`
    per layer, not :math:`O(n^2 p)`. Other parameters (LayerNorm, weights used functionally or
    shared between modules, layers called on a reshaped batch) get explicit per-sample rows from
    torch.func, and both kinds add up in one Gram matrix. ``rows="explicit"`` forms every row
    with torch.func and solves with the ``woodbury_solve`` op (which picks the
    :math:`n\times n` or :math:`p\times p` system by cost); the diagonal structure always does.

    The loop has one changed line: call ``opt.backward(inputs, targets)`` instead of
    ``loss_fn(model(inputs), targets).backward()``. It sets ``.grad`` to the batch-mean gradient
    (as backward would) and returns the loss::

        opt.zero_grad()
        loss = opt.backward(x, y)
        opt.step()

    Args:
        model (nn.Module): the model; samples must be independent (no BatchNorm in train mode).
        params (iterable, optional): parameters or groups (default: ``model.parameters()``);
            per group ``lr``, ``momentum``, ``weight_decay``. The Fisher couples all of them.
        lr (float): η (default: 1.0).
        damping (float or Callable[[int], float]): λ > 0 (default: 1e-3).
        momentum (float): μ in [0, 1) (default: 0).
        weight_decay (float): ω, added to the gradient before the solve (default: 0).
        kl_clip (float, Callable[[int], float] or None): trust region κ (default: None).
        fisher_type (str): "empirical", "mc" or "exact" (default: "empirical").
        structure (str): "dense" (the batch's full Fisher, solved in its low-rank form; "lowrank"
            is the same) or "diagonal" (default: "dense"). "full" is the deprecated spelling of
            "dense".
        likelihood (str): "categorical" (logits, cross-entropy) or "gaussian" (unit variance,
            ½‖y − f‖² per sample); defines the default per-sample loss and the sampled labels
            (default: "categorical").
        loss_fn (callable, optional): per-sample loss ``loss_fn(output[None], target[None])``
            for the gradient and the empirical Fisher (default: the likelihood's NLL).
        chunk_size (int): samples per vectorised per-sample-gradient call (default: 256).
        seed (int): seed of the label sampler for ``fisher_type="mc"`` (plus the rank) (default: 0).
        process_group (ProcessGroup, optional): with torch.distributed initialised, each rank
            passes an equal-sized shard to :meth:`backward`; the layers' inputs and output gradients (and any explicit
            per-sample rows) are all-gathered so every rank solves with
            the whole batch's Fisher and takes the same step (default: the world group).
        rows (str): "implicit" (layer Gram matrices from hook data) or "explicit" (torch.func
            per-sample gradients) (default: "implicit").
        solver (str or NGDSolver): "woodbury" (the solves above) or "cg": Hessian-free style —
            every step solves the batch's exact Fisher system by preconditioned conjugate
            gradient on matrix-free Fisher-vector products (``compute_fisher(structure=
            "implicit")``, no ``n × p`` rows), warm-started from the last solution, with
            ``kl_clip`` bounding ``(ηd)ᵀ(F + λI)(ηd)`` exactly; ``structure`` must be "dense", one
            process only; or a strategy object (:class:`~natgrad.optim.ngd_solvers.WoodburySolver`,
            :class:`~natgrad.optim.ngd_solvers.CGSolver`), kept as :attr:`solver` (see
            :mod:`natgrad.optim.ngd_solvers`) (default: "woodbury").
        cg (CGOptions, optional): tolerance, iteration cap, preconditioner ("none", "diagonal",
            "kfac") and warm start of ``solver="cg"`` (default: ``CGOptions()``).
    """

    def __init__(self, model: nn.Module, params: Iterable | None = None, *, lr: float = 1.0,
                 damping: Schedule = 1e-3, momentum: float = 0.0, weight_decay: float = 0.0,
                 kl_clip: Schedule | None = None, fisher_type: str = "empirical",
                 structure: str = "dense", likelihood: str = "categorical",
                 loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None, chunk_size: int = 256,
                 seed: int = 0, process_group=None, rows: str = "implicit",
                 solver: str | NGDSolver = "woodbury", cg: CGOptions | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Invalid model: expected an nn.Module, got {type(model).__name__}")
        check_number("lr", lr, low=0.0)
        check_number("damping", damping, low=0.0, low_open=True, allow_callable=True)
        check_number("momentum", momentum, low=0.0, high=1.0, high_open=True)
        check_number("weight_decay", weight_decay, low=0.0)
        check_number("kl_clip", kl_clip, low=0.0, low_open=True, allow_none=True, allow_callable=True)
        check_choice("fisher_type", fisher_type, ("empirical", "mc", "exact"))
        structure = renamed_value("structure", structure, {"full": "dense"}, "natgrad.NaturalGradient")
        check_choice("structure", structure, ("dense", "lowrank", "diagonal"))
        get_likelihood(likelihood)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"Invalid loss_fn: {loss_fn!r} (expected a callable or None)")
        check_number("chunk_size", chunk_size, low=1, integer=True)
        check_number("seed", seed, integer=True)
        check_choice("rows", rows, ("implicit", "explicit"))
        super().__init__(model.parameters() if params is None else params,
                         dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.model = model
        self.damping = damping
        self.kl_clip = kl_clip
        self.fisher_type = fisher_type
        self.structure = structure
        self.likelihood = likelihood
        self.loss_fn = loss_fn
        self.chunk_size = chunk_size
        self._world = dist.get_world_size(process_group) if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank(process_group) if self._world > 1 else 0
        self._generator = torch.Generator().manual_seed(seed + rank)
        self._steps = 0
        self.rows = rows
        if isinstance(solver, str):
            check_choice("solver", solver, ("woodbury", "cg"))
            solver = CGSolver(cg) if solver == "cg" else WoodburySolver()
        elif not isinstance(solver, NGDSolver):
            raise ValueError(f"Invalid solver: {solver!r} (expected 'woodbury', 'cg' or an NGDSolver)")
        solver.bind(structure, self._world, process_group)
        #: The solver strategy (:mod:`natgrad.optim.ngd_solvers`).
        self.solver = solver

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch.optim's, plus ``__init__``'s checks for the values the group sets itself."""
        check_group(param_group, {"lr": dict(low=0.0), "momentum": dict(low=0.0, high=1.0, high_open=True),
                                  "weight_decay": dict(low=0.0)})
        super().add_param_group(param_group)

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _problem(self) -> Problem:
        return Problem(model=self.model, params=self._params(), param_groups=self.param_groups,
                       fisher_type=self.fisher_type, likelihood=self.likelihood, loss_fn=self.loss_fn,
                       chunk_size=self.chunk_size, generator=self._generator, structure=self.structure,
                       rows=self.rows, kl_clip=self.kl_clip, step=self._steps)

    def backward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """The batch's per-sample gradients: accumulates their mean into ``.grad`` (like
        ``loss.backward()`` on the batch-mean loss), keeps them for :meth:`step`, and returns the
        batch-mean loss (detached). With ``rows="implicit"``, one forward and one backward pass
        (plus one backward per class or draw for ``fisher_type="exact"``/``"mc"``) capture each
        supported layer's inputs and output gradients; per-sample gradients are never formed.
        Inputs, targets and the per-sample gradients are validated (empty batch, NaN/Inf,
        mismatched sizes) before ``.grad`` is touched.
        """
        return self.solver.backward(self._problem(), inputs, targets)

    # torch.optim.Optimizer types step() for a closure returning a float; the closure's loss is a tensor
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One natural-gradient step from the rows of the last :meth:`backward` (``closure``, if
        given, must call it). Returns the closure's loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.solver.start_step()
        entries = [(p, group) for group in self.param_groups for p in group["params"]]
        raw = [torch.zeros_like(p) if p.grad is None else p.grad for p, _ in entries]
        grads = [g + grp["weight_decay"] * p if grp["weight_decay"] else g
                 for g, (p, grp) in zip(raw, entries)]
        damping = resolved_number("damping", self.damping, self._steps, low=0.0, low_open=True)
        directions, nu = self.solver.directions(self._problem(), raw, grads, damping)
        self._apply(entries, directions, nu)
        self._steps += 1
        return loss

    def _apply(self, entries: list[tuple[Tensor, dict]], directions: Iterable[tuple[int, tuple, Tensor]],
               nu: float) -> None:
        """``b ← μb + νd``, ``θ ← θ − ηb`` on each block ``(parameter index, index into it,
        direction)``. Each block is dropped before the next is formed (a streaming caller then
        holds one block of the direction at a time).
        """
        it = iter(directions)
        while (item := next(it, None)) is not None:
            i, where, d = item
            del item
            p, group = entries[i]
            d = d.to(p.dtype) if nu == 1.0 else d.to(p.dtype) * nu
            if group["momentum"]:
                buf = self.state[p].get("momentum_buffer")
                if buf is None:  # the first step's buffer is the direction itself (0·μ + d)
                    buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                d = buf[where].mul_(group["momentum"]).add_(d)
            p[where].add_(d, alpha=-group["lr"])
            del d

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state plus the step counter, the label sampler's state and the solver's."""
        state = super().state_dict()
        state["natural_gradient"] = {"steps": self._steps, "generator": self._generator.get_state()}
        if self.solver.state_key is not None:
            state["natural_gradient"][self.solver.state_key] = self.solver.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("natural_gradient", None)
        if extra is None:
            raise ValueError("state_dict has no 'natural_gradient' entry: not saved by natgrad.NaturalGradient")
        key = self.solver.state_key
        checked = self.solver.checked_state(extra.get(key)) if key is not None else None
        super().load_state_dict(state_dict)
        self.solver.load_state_dict(checked)
        self._steps = int(extra["steps"])
        self._generator.set_state(extra["generator"])
