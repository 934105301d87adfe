r"""natgrad.KFAC's adaptive learning rate and momentum (Martens & Grosse, 2015, §7).

Each step K-FAC proposes :math:`\Delta = -(u + \omega\theta)` (the preconditioned gradient plus
weight decay) and the previous update was :math:`\delta`. The step taken is
:math:`\alpha\Delta + \mu\delta`, with α (and μ) minimising the quadratic model of the loss on
the step's batch,

.. math::
    M(\alpha, \mu) = \tfrac12 (\alpha\Delta + \mu\delta)^\top (F + \lambda I)(\alpha\Delta + \mu\delta)
                   + \nabla^\top(\alpha\Delta + \mu\delta),

where F is the exact Fisher (generalized Gauss–Newton) of the batch under the model's output
distribution and λ each parameter's damping. Its entries :math:`\Delta^\top F\Delta`,
:math:`\Delta^\top F\delta`, :math:`\delta^\top F\delta` come from forward-mode products
:math:`J\Delta, J\delta` of the re-run forward with the closed-form output Fisher
(:meth:`natgrad.fisher.ImplicitFisher.gram`); F is never formed. The 2×2 solve and its
fallbacks are one rule, :func:`natgrad.ops.kfac_quadratic_step`. K-FAC's ``kl_clip`` then
bounds the chosen step's quadratic form under F (the trust-region rule of the plain step),
which keeps the step finite-sized while the damping is too small for the model to be trusted.

The batch is the model's own: :class:`ForwardRecorder` keeps the input of every forward call
made with gradients enabled since the last step (a reference, no copy). Usage::

    opt = natgrad.KFAC(model, adaptive_learning_rate=True, adaptive_momentum=True, damping=1e-2)
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()  # the forward call the step re-runs
        opt.step()
    opt.adaptive_step.alpha, opt.adaptive_step.mu  # the last coefficients

Cost of a recomputation (every ``adaptive_period`` steps): one forward pass and two
forward-mode passes of the batch, plus a flat copy of Δ and δ; ``benchmarks/kfac_adaptive_cost.py``
measures it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.hooks import RemovableHandle

from natgrad import ops
from natgrad.fisher.implicit import ImplicitFisher

__all__ = ["AdaptiveStep", "ForwardRecorder"]


class ForwardRecorder:
    """Records ``(input, rows)`` of each ``model(x)`` call made with gradients enabled (rows:
    the output's rows under ``loss_reduction``: samples for "mean", all positions for
    "token_mean"); :meth:`clear` forgets them, nothing is recorded inside :meth:`paused`.
    """

    def __init__(self, model: nn.Module, loss_reduction: str) -> None:
        self.calls: list[tuple[Any, Any]] = []  # (args, output shape or a type name)
        self.loss_reduction = loss_reduction
        self._paused = False
        self._handle: RemovableHandle | None = model.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._paused or not torch.is_grad_enabled():
            return
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        self.calls.append(((args, kwargs), shape))

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Nothing is recorded inside (the closure re-evaluated to judge a step)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def clear(self) -> None:
        """Forgets the recorded calls (after each step)."""
        self.calls.clear()

    def remove(self) -> None:
        """Removes the recording hook (when the optimizer is collected)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def batches(self) -> list[tuple[Tensor, float]]:
        """``(inputs, weight)`` per recorded call, the weight turning the call's sample-mean
        Fisher into its share of the loss's: ``n_i / Σ n`` ("mean"), ``n_i`` ("sum"),
        ``n_i / Σ rows`` ("token_mean"). Raises a clear error for a call it cannot re-run.
        """
        if not self.calls:
            raise RuntimeError("KFAC(adaptive_learning_rate=True) needs this step's forward pass: call model(x) "
                               "with gradients enabled before step() (or inside its closure)")
        rows = []
        for (args, kwargs), shape in self.calls:
            if len(args) != 1 or kwargs or not isinstance(args[0], Tensor) or not isinstance(shape, tuple) \
                    or not shape:
                raise ValueError("KFAC(adaptive_learning_rate=True) re-runs the model as model(x): it needs one "
                                 "tensor input and a batched output tensor (logits or means), got a call with "
                                 f"{len(args)} positional and {len(kwargs)} keyword arguments returning {shape}")
            rows.append(shape[0] if self.loss_reduction != "token_mean" or len(shape) < 2
                        else int(torch.Size(shape[:-1]).numel()))
        samples = [args[0].shape[0] for (args, _), _ in self.calls]
        total = {"mean": sum(samples), "sum": 1, "token_mean": sum(rows)}[self.loss_reduction]
        return [(args[0], n / total) for ((args, _), _), n in zip(self.calls, samples)]


class AdaptiveStep:
    """The quadratic model's coefficients (see the module docstring), recomputed every
    ``period`` steps (and on demand) and reused in between; ``alpha``/``mu`` are the last ones.
    """

    def __init__(self, model: nn.Module, adapt_momentum: bool, period: int, likelihood: str,
                 loss_reduction: str, nll_scale: float = 1.0) -> None:
        self.model = model
        self.adapt_momentum = adapt_momentum
        self.period = period
        self.likelihood = likelihood
        self.nll_scale = nll_scale
        self.recorder = ForwardRecorder(model, loss_reduction)
        self.alpha: float | None = None
        self.mu: float | None = None
        self.skips = 0  #: steps skipped because the model's entries were not finite
        self.last: ops.QuadraticStep | None = None  #: the last computed solution

    def due(self, step: int, forced: bool) -> bool:
        """Whether step ``step`` computes new coefficients."""
        return forced or self.alpha is None or step % self.period == 0

    def solve_step(self, updates: dict, grads: dict, group_of: dict[int, dict], state: MutableMapping[Tensor, Any],
                   damping_of: Callable[[Tensor], float], mean: Callable[[float], float],
                   kl_clip: float | None = None) -> ops.QuadraticStep:
        """:meth:`solve` for K-FAC's directions ``updates`` (u by parameter): Δ = −(u + ωθ) and
        δ = −b from each parameter's ``momentum_buffer`` in the optimizer's ``state`` (times
        −its group's momentum when μ is fixed); ``group_of`` maps ``id(p)`` to its group.
        """
        proposals, previous = {}, {}
        for p, u in updates.items():
            group = group_of[id(p)]
            proposals[p] = -(u + group["weight_decay"] * p) if group["weight_decay"] else -u
            buf = state[p].get("momentum_buffer") if p in state else None
            scale = -1.0 if self.adapt_momentum else -group["momentum"]
            previous[p] = torch.zeros_like(p) if buf is None or scale == 0 else buf * scale
        with self.recorder.paused():
            return self.solve(proposals, previous, grads, damping_of, mean, kl_clip)

    def apply(self, param_groups: list[dict], updates: dict, state: MutableMapping[Tensor, Any]) -> None:
        """``θ ← θ + αΔ + μδ`` with the last α, μ (μ: each group's momentum when fixed), keeping
        ``b ← μb + α(u + ωθ)``, the negated update, as ``momentum_buffer`` (so δ = −b).
        """
        alpha = cast(float, self.alpha)
        for group in param_groups:
            params = [p for p in group["params"] if p in updates]
            if not params:
                continue
            buffers = []
            for p in params:
                if state[p].get("momentum_buffer") is None:
                    state[p]["momentum_buffer"] = torch.zeros_like(p)
                buffers.append(state[p]["momentum_buffer"])
            mu = cast(float, self.mu) if self.adapt_momentum else group["momentum"]
            ops.kfac_momentum_step_(params, buffers, [updates[p] for p in params], 1.0, mu,
                                    alpha * group["weight_decay"], alpha)

    def solve(self, proposals: dict[Tensor, Tensor], previous: dict[Tensor, Tensor],
              grads: dict[Tensor, Tensor], damping_of: Callable[[Tensor], float],
              mean: Callable[[float], float], kl_clip: float | None = None) -> ops.QuadraticStep:
        """Minimises the model for ``proposals`` Δ and ``previous`` δ (by parameter; δ already
        times each group's fixed momentum when μ is not adapted), with the batch gradients
        ``grads``; ``mean`` averages a product over ranks. With ``kl_clip`` the step is then
        scaled by ν so that its quadratic form under the exact Fisher (damping excluded),
        ``ν² wᵀ(VᵀFV)w``, is at most ``kl_clip`` (:func:`natgrad.ops.kfac_trust_region`, the
        trust region of K-FAC's plain step); ``model_change`` is the model at the scaled step.
        """
        params = list(proposals)
        a = self.curvature(params, [proposals[p] for p in params], [previous[p] for p in params])
        a00, a01, a11 = (mean(float(v)) for v in (a[0, 0], a[0, 1], a[1, 1]))
        sums = torch.zeros(5, dtype=torch.float64)
        for p in params:
            d, m, g, lam = proposals[p], previous[p], grads[p], damping_of(p)
            sums += torch.stack([lam * (d * d).sum(dtype=torch.float64), lam * (d * m).sum(dtype=torch.float64),
                                 lam * (m * m).sum(dtype=torch.float64), (g * d).sum(dtype=torch.float64),
                                 (g * m).sum(dtype=torch.float64)]).cpu()
        damped = sums.tolist()
        q = ops.kfac_quadratic_step(a00 + damped[0], a01 + damped[1], a11 + damped[2], damped[3], damped[4],
                                    self.adapt_momentum, 1.0)
        if q.finite and kl_clip is not None:
            w = (q.alpha, q.mu)
            form = w[0] * w[0] * a00 + 2 * w[0] * w[1] * a01 + w[1] * w[1] * a11
            nu = ops.kfac_trust_region(kl_clip, [form], [0.0], [1.0], [0.0], [0.0]).nu
            if nu < 1.0:
                linear = w[0] * damped[3] + w[1] * damped[4]
                q = q._replace(alpha=nu * q.alpha, mu=nu * q.mu,
                               model_change=nu * nu * (q.model_change - linear) + nu * linear)
        self.last = q
        if q.finite:
            self.alpha, self.mu = q.alpha, q.mu
        else:
            self.skips += 1
        return q

    def curvature(self, params: list[Tensor], first: list[Tensor], second: list[Tensor]) -> Tensor:
        """``[[xᵀFx, xᵀFy], [yᵀFx, yᵀFy]]`` for the vectors ``x = first``, ``y = second`` over
        ``params``, summed over the recorded calls with their weights, times ``nll_scale``. The model is re-run on
        copies of its buffers (BatchNorm statistics stay as they are) and with the math attention
        kernel, with the random-number state restored afterwards.
        """
        flat = torch.stack([torch.cat([t.reshape(-1) for t in first]), torch.cat([t.reshape(-1) for t in second])], 1)
        devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
        total = torch.zeros(2, 2, dtype=torch.float64)
        # the math attention kernel: the fused CPU/CUDA kernels have no forward-mode derivative
        with torch.random.fork_rng(devices=devices), torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            for inputs, weight in self.recorder.batches():
                if inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
                    return torch.full((2, 2), float("nan"), dtype=torch.float64)  # the rule skips the step
                fisher = ImplicitFisher(self.model, inputs, fisher_type="exact", likelihood=self.likelihood,
                                        params=cast(list[nn.Parameter], params), chunk_size=max(inputs.shape[0], 1))
                total += fisher.gram(flat.to(fisher.dtype)).to(torch.float64).cpu() * weight
        return total * self.nll_scale

    def state_dict(self) -> dict[str, Any]:
        """The last α, μ and the count of skipped steps."""
        return {"alpha": self.alpha, "mu": self.mu, "skips": self.skips}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restores :meth:`state_dict` (None, from an older checkpoint: recompute at the next step)."""
        state = state or {}
        self.alpha, self.mu, self.skips = state.get("alpha"), state.get("mu"), int(state.get("skips", 0))
