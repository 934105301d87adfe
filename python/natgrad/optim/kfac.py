r"""natgrad.KFAC: Kronecker-factored approximate curvature as a torch.optim.Optimizer."""
from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.profiler import record_function

from natgrad import ops
from natgrad.curvature.block import CurvatureBlock, DirectionRequest
from natgrad.curvature.estimator import CurvatureEstimator, Updates
from natgrad.distributed.communicator import make_communicator
from natgrad.likelihoods import get_likelihood
from natgrad.optim._hyper import Schedule, check_group
from natgrad.optim._table import parameter_table
from natgrad.optim.adaptive_step import AdaptiveStep
from natgrad.optim.grafting import make_grafting
from natgrad.optim.kfac_options import GROUP_BOUNDS, GROUP_DEFAULTS, check_arguments, resolve
from natgrad.optim.step_control import DampingAdaptation, TrustRegion

__all__ = ["KFAC"]

STATE_KEY = "kfac"  # the optimizer-level entry in state_dict()
_STATE_ENTRIES = ("steps", "damping_multiplier", "faults", "ladder", "generator", "blocks")
class KFAC(Optimizer):
    r"""K-FAC (Martens & Grosse, 2015; KFC for convolutions, Grosse & Martens, 2016).

    Each supported layer's Fisher block is approximated as :math:`F_\ell \approx A_\ell \otimes
    G_\ell` with :math:`A = \mathbb{E}[\tilde a \tilde a^\top]` (inputs, bias as a ones column)
    and :math:`G = \mathbb{E}[g g^\top]` (per-sample output gradients), both running averages
    :math:`X \leftarrow \rho X + (1-\rho) \hat X` refreshed every ``factor_update_period`` steps.
    Every ``inverse_update_period`` steps the factors are eigendecomposed (or inverted) through
    the ops' fallback ladder. Each step then computes, per layer,

    .. math::
        u_\ell = (A_\ell \otimes G_\ell + \gamma I)^{-1} \nabla_{W_\ell} L
               = V_G\,[(V_G^\top \nabla W V_A) \oslash (\lambda_G \lambda_A^\top + \gamma)]\,V_A^\top,

    (or the π-corrected factored damping; with ``eigenvalue_correction``, EKFAC's
    :math:`S = \mathbb{E}_n[(V_G^\top \nabla W_n V_A)^2]` from per-sample gradients replaces
    :math:`\lambda_G \lambda_A^\top`), and steps :math:`\theta \leftarrow \theta - \eta\, b`,
    :math:`b \leftarrow \nu(\mu b + u) + \omega\theta`, where the KL trust region ν bounds the
    momentum-accumulated step actually taken, :math:`\eta^2\nu^2 \|\mu b + u\|_F^2 \le \kappa`
    (:class:`natgrad.optim.step_control.TrustRegion`; μ = 0: the usual
    :math:`\min(1, \sqrt{\kappa / \sum_\ell \eta^2 \langle u_\ell, \nabla_\ell\rangle})`).

    Attention projections get Kronecker blocks, norms, grouped convolutions and parameters used
    functionally a damped diagonal Fisher of the same scale (:mod:`natgrad.curvature.plan`);
    the rest, and ``skip_modules``, use the plain gradient in place of :math:`u` (same trust
    region, momentum, weight decay); :meth:`describe` lists every parameter's treatment. A
    parameter whose ``.grad`` is None or that does not require grad (frozen) is never moved.
    A weight tied between several modules (a language model's input embedding and output
    projection) gets one block, the output projection's (the rule and why:
    :mod:`natgrad.curvature.registry`); the other modules capture nothing for it, and
    :meth:`describe` names the block's module and those that share it.

    Curvature lives in one block per layer, held by :attr:`estimator` (a
    :class:`~natgrad.curvature.estimator.CurvatureEstimator`), not in ``self.state[p]``: a
    Kronecker pair spans a layer's weight and bias together.
    ``state_dict()`` stores the blocks under ``"kfac"`` keyed by module name (independent of
    parameter order); ``self.state[p]`` holds the per-parameter momentum buffers, as in
    torch.optim.SGD.

    Faults: a layer whose captured activations or output gradients hold NaN/Inf, or values
    large enough that a factor update could overflow, keeps its factors and parameters for the
    step (a warning names it once; :attr:`nonfinite_skips` counts), and training goes on.

    torch.compile: compile the model, not the step. ``torch.compile(model, fullgraph=True)``
    traces the capture hooks with no graph break (:mod:`natgrad.curvature.capture`); :meth:`step`
    always runs eagerly, excluded from a compiled graph with one warning (the K-FAC guide's
    torch.compile section shows the loop).

    The standard loop ``loss.backward(); opt.step()`` uses the empirical Fisher. With
    ``fisher_type="mc"`` add one line after the forward pass, ``opt.sample_fisher(output)``,
    which back-propagates labels sampled from the model (categorical or Gaussian) into the G
    factors without touching ``.grad``.

    Args:
        model (nn.Module): the model whose layers are hooked.
        params (iterable, optional): parameters or param-group dicts as for torch.optim (default:
            ``model.parameters()``). Per group: ``lr``, ``momentum``, ``weight_decay``,
            ``damping``.
        lr (float): learning rate η (default: 0.01).
        momentum (float): heavy-ball momentum μ in [0, 1) (default: 0.9).
        weight_decay (float): ω, added to the preconditioned direction (default: 0).
        damping (float or Callable[[int], float]): γ > 0 (default: 1e-3).
        factor_decay (float): EMA decay ρ of the factors in [0, 1) (default: 0.95).
        factor_update_period (int or Callable[[int], int]): steps between factor updates
            (default: 1).
        inverse_update_period (int or Callable[[int], int]): steps between decompositions
            (default: 10).
        kl_clip (float, Callable[[int], float] or None): trust-region size κ; None disables it
            (default: 1e-3).
        inverse_method (str): "eigen" (eigenbasis, exact damping) or "inverse" (damped Cholesky
            inverses; damping enters only at inverse updates) (default: "eigen").
        pi_correction (bool or None): factored, π-corrected damping A + π√γ I, G + √γ/π I
            (Martens & Grosse, 2015, §6.3); False: √γ on each factor ("inverse") or exact
            damping ("eigen"); None: True for "inverse", False for "eigen" (default: None).
        eigenvalue_correction (bool): EKFAC (George et al., 2018): keep the factors' eigenbasis
            but re-estimate the diagonal in it every factor update, the EMA (decay ρ) of the
            squared per-sample gradients rotated into it, carried into each refreshed basis
            (:func:`natgrad.ops.ekfac_rebase`); exact damping :math:`S + \gamma`. Linear, Conv1d,
            Conv2d and Embedding layers; attention keeps K-FAC (a warning names it). Needs
            "eigen" and no π correction; not yet under torch.distributed. adaptive_damping's
            quadratic model still uses A ⊗ G (default: False).
        warm_refreshes (int): cheap refreshes between exact decompositions: one subspace
            iteration + QR from the previous eigenvectors ("eigen"), or Newton–Schulz from the
            previous inverses ("inverse", exact when too far); see
            :mod:`natgrad.curvature.refresh` (default: 0, every refresh exact).
        adaptive_damping (bool): Levenberg–Marquardt adaptation of γ from the reduction ratio
            when ``step`` gets a closure (the closure is then evaluated a second time, after the
            update, every ``damping_adaptation_interval`` steps) (default: False).
        damping_adaptation_interval (int): steps between adaptations (default: 5).
        damping_adaptation_decay (float): ω₁ in (0, 1); γ is multiplied by ω₁^interval when the
            ratio exceeds 3/4 and divided by it below 1/4 (default: 0.95).
        adaptive_learning_rate (bool): Martens & Grosse's (2015, §7) learning rate: the step is
            :math:`\alpha\Delta + \mu\delta` (Δ = −(u + ωθ), δ the previous update) with α
            minimising the quadratic model of the batch's loss under the exact Fisher plus the
            damping, from forward-mode products (:mod:`natgrad.optim.adaptive_step`); ``lr`` is
            then not used, ``kl_clip`` bounds the chosen step's quadratic form under the exact
            Fisher (a safeguard while the damping is too small for the model to be trusted; None:
            Martens & Grosse's unbounded step), and adaptive_damping's reduction ratio uses this
            model. It re-runs ``model(x)`` on the inputs of the step's forward calls (made with
            gradients enabled; one tensor input, logits or means out); each recomputation costs
            one forward and two forward-mode (jvp) passes of the batch (default: False).
        adaptive_momentum (bool): μ minimised too (the 2×2 model; needs adaptive_learning_rate);
            False: each group's ``momentum`` (default: False).
        adaptive_period (int): steps between recomputations of α and μ; other steps reuse the
            last (a damping adaptation step always recomputes). Measured on an MLP
            784-512-512-10 at batch 256 (one thread; ``benchmarks/kfac_adaptive_cost.py``): a
            recomputation every step adds ~60 % to K-FAC's step (about four jvps' worth), every
            5 steps ~8 % (default: 1).
        likelihood (str): the model's output distribution for the quadratic model's Fisher,
            "categorical" (logits, cross-entropy), "gaussian" (means, ½‖y − f‖² per sample) or
            "bernoulli" (logits, binary cross-entropy) (default: "categorical").
        nll_scale (float): the training loss is ``nll_scale`` times the likelihood's NLL (summed
            over a sample's outputs) reduced by ``loss_reduction``, e.g. ``1/784`` for
            ``binary_cross_entropy_with_logits(out, y)`` (a mean over 784 pixels too); it scales
            the quadratic model's Fisher (default: 1.0).
        fisher_type (str): "empirical" or "mc" (default: "empirical"). With "mc", every factor
            step needs ``sample_fisher(output)``; a step without it raises RuntimeError.
        loss_reduction (str): "mean" if the gradient is the mean over the step's samples (dim 0,
            also across micro-batches), "sum" if it is the sum, "token_mean" if it is the mean
            over every position of every sample (each row is then one Fisher sample) (default: "mean").
        linear_approx (str): weight sharing in Linear layers with inputs ``[N, ..., d]``:
            "expand" (positions as extra rows) or "reduce" (averaged per sample)
            (default: "expand").
        factor_dtype (torch.dtype, optional): dtype of the factors, torch.float32 or
            torch.float64 (default: the weight's dtype, float32 for a bfloat16/float16 weight,
            also under torch.autocast).
        inverse_dtype (torch.dtype, optional): dtype of the factors' decompositions, as
            ``factor_dtype`` (default: the factors' dtype). Half precision raises ValueError: a running average
            ``ρA + (1−ρ)Â`` kept in bfloat16 (8 significant bits) rounds away much of each
            update's ``1−ρ`` share, and no eigensolver or Cholesky runs in half precision, so
            every decomposition would need the fallback ladder and be rounded back; the
            factors are small (``d × d`` per layer), so float32 costs little.
        max_factor_dim (int or None): a factor side (A: in-features·kh·kw, G: out-features)
            above this size is preconditioned block-diagonally, by balanced diagonal blocks of at
            most this size (whole input channels; the bias joins the last), each an exact
            Kronecker sub-factor with its own decomposition (Distributed Shampoo's
            ``max_preconditioner_dim``; :mod:`natgrad.curvature.split`; :meth:`describe` names
            the layers split). It bounds a refresh at ``Σ b³`` and a step at ``d_out·d_in·b``;
            None: never split (default: 2048).
        skip_modules (iterable of str): qualified module names to leave to the fallback (a
            name that matches no module raises ValueError).
        seed (int): seed of the generator used by :meth:`sample_fisher` (plus the rank) (default: 0).
        grad_worker_fraction (float): with torch.distributed, the fraction f in (0, 1] of ranks
            that hold each layer's decomposition (see :mod:`natgrad.distributed.communicator`)
            (default: 1.0).
        triangle_packing (bool): all-reduce symmetric factors as upper triangles (default: True).
        bucket_cap_mb (float): bucket size of the factor/gradient all-reduces (default: 25).
        process_group (ProcessGroup, optional): torch.distributed group (default: the world when initialised).
        grafting (str or None): None, "adam" or "sgd": each parameter's direction ``u`` is
            rescaled to the norm of the grafted optimizer's step on its gradient, before the
            trust region and momentum (:mod:`natgrad.optim.grafting`, the rule natgrad.EigenAdam
            shares; Adam's second moment, β₂ = 0.999, ε = 1e-8, is kept per parameter in
            ``state[p]``) (default: None).

    Distributed: when torch.distributed is initialised, ``model`` may be wrapped in
    DistributedDataParallel (gradients are then not averaged twice) or not (the optimizer
    averages them). Each rank holds a shard of the batch; every rank ends each step with the
    parameters a single process would compute on the whole batch. ``state_dict()`` is collective
    (call it on every rank, save from rank 0); it loads on any world size.
    """

    # torch.amp.GradScaler hands this optimizer its scale (``grad_scale``) and overflow flag
    # (``found_inf``) instead of unscaling .grad itself, so that the captured output gradients
    # feeding G are unscaled too. Call ``scaler.step(opt)`` without a prior ``scaler.unscale_``.
    _step_supports_amp_scaling = True

    def __init__(self, model: nn.Module, params: Iterable | None = None, *, lr: float = 0.01,
                 momentum: float = 0.9, weight_decay: float = 0.0, damping: Schedule = 1e-3,
                 factor_decay: float = 0.95, factor_update_period: Schedule = 1,
                 inverse_update_period: Schedule = 10, kl_clip: Schedule | None = 1e-3,
                 inverse_method: str = "eigen", pi_correction: bool | None = None,
                 eigenvalue_correction: bool = False, warm_refreshes: int = 0,
                 adaptive_damping: bool = False, damping_adaptation_interval: int = 5,
                 damping_adaptation_decay: float = 0.95, adaptive_learning_rate: bool = False,
                 adaptive_momentum: bool = False, adaptive_period: int = 1, likelihood: str = "categorical",
                 nll_scale: float = 1.0,
                 fisher_type: str = "empirical",
                 loss_reduction: str = "mean", linear_approx: str = "expand",
                 factor_dtype: torch.dtype | None = None, inverse_dtype: torch.dtype | None = None,
                 max_factor_dim: int | None = 2048, skip_modules: Iterable[str] = (), seed: int = 0,
                 grad_worker_fraction: float = 1.0, triangle_packing: bool = True,
                 bucket_cap_mb: float = 25.0, process_group=None, grafting: str | None = None) -> None:
        check_arguments(
            model=model, lr=lr, momentum=momentum, weight_decay=weight_decay, damping=damping,
            factor_decay=factor_decay, factor_update_period=factor_update_period,
            inverse_update_period=inverse_update_period, kl_clip=kl_clip,
            inverse_method=inverse_method, pi_correction=pi_correction,
            eigenvalue_correction=eigenvalue_correction, warm_refreshes=warm_refreshes,
            adaptive_damping=adaptive_damping, damping_adaptation_interval=damping_adaptation_interval,
            damping_adaptation_decay=damping_adaptation_decay, adaptive_learning_rate=adaptive_learning_rate,
            adaptive_momentum=adaptive_momentum, adaptive_period=adaptive_period, likelihood=likelihood,
            nll_scale=nll_scale, fisher_type=fisher_type, loss_reduction=loss_reduction, linear_approx=linear_approx,
            factor_dtype=factor_dtype, inverse_dtype=inverse_dtype, max_factor_dim=max_factor_dim, seed=seed,
            grad_worker_fraction=grad_worker_fraction, triangle_packing=triangle_packing, bucket_cap_mb=bucket_cap_mb)
        self._grafting = make_grafting(grafting)
        self.grafting = grafting
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, damping=damping)
        super().__init__(model.parameters() if params is None else params, defaults)

        self._ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        self.model: nn.Module = cast(nn.Module, model.module) if self._ddp else model
        comm = make_communicator(grad_worker_fraction, triangle_packing, bucket_cap_mb, process_group)
        if eigenvalue_correction and comm.world_size > 1:
            raise ValueError("Invalid eigenvalue_correction: True is not supported under torch.distributed yet")
        self.eigenvalue_correction = eigenvalue_correction
        self.factor_decay = factor_decay
        self.factor_update_period = factor_update_period
        self.inverse_update_period = inverse_update_period
        self.kl_clip = kl_clip
        self.inverse_method = inverse_method
        self.pi_correction = ops.kfac_pi_correction(inverse_method, pi_correction)
        self.warm_refreshes = warm_refreshes
        self.adaptive_damping = adaptive_damping
        self.damping_adaptation_interval = damping_adaptation_interval
        self.damping_adaptation_decay = damping_adaptation_decay
        self.fisher_type = fisher_type
        self.loss_reduction = loss_reduction
        self._generator = torch.Generator().manual_seed(seed + comm.rank)
        self._steps = 0
        self._adaptation = DampingAdaptation()
        self._trust_region = TrustRegion()
        self._warned_compiled_step = False
        self._is_factor_step(0)  # a factor-period schedule invalid at step 0 raises here
        alive = weakref.WeakMethod(self._factor_step_now)  # the estimator must not keep self alive
        #: The curvature: blocks, captures, communicator, refresh schedule and fault ledger.
        self.estimator = CurvatureEstimator(
            self.model, [p for g in self.param_groups for p in g["params"]], comm,
            factor_step=lambda: (m := alive()) is not None and m(), skip_modules=skip_modules,
            fisher_type=fisher_type, linear_approx=linear_approx, factor_dtype=factor_dtype,
            inverse_dtype=inverse_dtype, max_factor_dim=max_factor_dim,
            eigenvalue_correction=eigenvalue_correction)
        #: The adaptive learning rate and momentum (None unless adaptive_learning_rate).
        self.adaptive_step = AdaptiveStep(self.model, adaptive_momentum, adaptive_period, likelihood,
                                          loss_reduction, nll_scale) if adaptive_learning_rate else None
        if self.adaptive_step is not None:  # the recording hook goes with the optimizer
            weakref.finalize(self, self.adaptive_step.recorder.remove)
        self._index_groups()

    # ---- set-up ---------------------------------------------------------------------------------

    def _index_groups(self) -> None:
        """Maps each parameter to its group (refreshed every step: add_param_group may run)."""
        self._group_of = {id(p): g for g in self.param_groups for p in g["params"]}

    # The hooks read a flag (the estimator's gate), set whenever the step or the factor period
    # changes, rather than asking the optimizer at every call: a compiled model guards on one bool.
    @property
    def _steps(self) -> int:
        """Steps taken (setting it, as step() and load_state_dict() do, re-sets the gate)."""
        return self._step_index

    @_steps.setter
    def _steps(self, value: int) -> None:
        self._step_index = value
        self._sync_gate()

    @property
    def factor_update_period(self) -> Schedule:
        """Steps between factor updates (int or Callable[[int], int]; may be changed between steps)."""
        return self._factor_update_period

    @factor_update_period.setter
    def factor_update_period(self, value: Schedule) -> None:
        self._factor_update_period = value
        self._sync_gate()

    def _sync_gate(self) -> None:
        estimator = self.__dict__.get("estimator")
        if estimator is not None:
            estimator.sync_gate()

    def _factor_step_now(self) -> bool:
        """Whether the current step collects statistics (False while its factor period is invalid:
        step() raises then).
        """
        try:
            return self._is_factor_step(self._steps)
        except (ValueError, TypeError):
            return False

    def _is_factor_step(self, step: int) -> bool:
        period = resolve("factor_update_period", self.factor_update_period, step)
        return step % period == 0

    def remove_hooks(self) -> None:
        """Removes every hook this optimizer placed on the model (also done on garbage
        collection). Afterwards all parameters use the fallback preconditioner.
        """
        self.estimator.remove_hooks()
        if self.adaptive_step is not None:
            self.adaptive_step.recorder.remove()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch.optim's, plus the checks ``__init__`` runs on the defaults, for the values the
        group sets itself (ValueError naming the key; the group is then not added).
        """
        check_group(param_group, GROUP_BOUNDS)
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key in GROUP_DEFAULTS:
                group.setdefault(key, self.defaults[key])

    # ---- Monte-Carlo Fisher -----------------------------------------------------------------------

    def sample_fisher(self, output: Tensor, likelihood: str = "categorical") -> None:
        """Estimates G from labels sampled from the model's predictive distribution.

        Call after the forward pass and before ``loss.backward()``; one extra backward pass,
        which fills the G statistics only (``.grad`` is untouched). The sampled loss sums
        a sample's positions and is divided by ``output.shape[0]`` ("mean"), by all rows of
        ``output`` ("token_mean") or by 1 ("sum"). A no-op on steps that update no factors.
        Under a compiled model the pass runs down to the hooked layers' parameters (whose
        gradients it discards): their records arrive with the backward.

        Args:
            output (Tensor): the model's logits (categorical) or means (Gaussian, unit variance).
            likelihood (str): "categorical" or "gaussian" (default: "categorical").
        """
        if self.fisher_type != "mc":
            raise RuntimeError("sample_fisher() needs natgrad.KFAC(..., fisher_type='mc')")
        lik = get_likelihood(likelihood)
        if not isinstance(output, Tensor) or output.dim() == 0:
            raise ValueError("sample_fisher(output): output must be the model's batched output tensor")
        targets = self.estimator.sampling_targets()
        if not targets or not self.estimator.capturing():
            return
        with torch.no_grad():  # NaN/Inf outputs: labels from finite stand-ins (lik.sample); the
            labels = lik.sample(output, self._generator)  # NaN statistics then skip the step
        rows = {"mean": output.shape[0], "sum": 1}.get(self.loss_reduction, output.numel() // max(output.shape[-1], 1))
        loss = lik.nll(output, labels, "sum") / max(rows, 1)  # token_mean: over all rows
        with self.estimator.sampling():
            torch.autograd.grad(loss, targets, retain_graph=True, allow_unused=True)

    # ---- the step ---------------------------------------------------------------------------------

    # torch.optim.Optimizer types step() for a closure returning a float; the closure's loss is a tensor
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """Performs one K-FAC step; ``closure`` (re-evaluating the loss, as in torch.optim) is
        needed for adaptive damping. Returns the closure's loss, if any.

        The step always runs eagerly: under ``torch.compile(opt.step)`` (or a compiled training
        step that calls it) it is excluded from the graph with one warning. Compile the model
        instead (see the class docstring).
        """
        if torch.compiler.is_compiling():
            self._warn_compiled_step()
        return self._eager_step(closure)

    @torch.compiler.disable(reason="natgrad.KFAC.step runs eagerly (see its docstring)")
    def _warn_compiled_step(self) -> None:
        """Warns, once per optimizer, that the step runs eagerly inside a compiled region."""
        if not self._warned_compiled_step:
            self._warned_compiled_step = True
            warnings.warn("natgrad.KFAC.step runs eagerly under torch.compile: its host-side policy "
                          "(schedules, fault checks, decompositions, the trust region) is not compiled. "
                          "Compile the model (torch.compile(model), fullgraph=True works) and call "
                          "opt.step() uncompiled. This warning is shown once.", UserWarning, stacklevel=3)

    @torch.compiler.disable(reason="natgrad.KFAC.step runs eagerly (see its docstring)")
    @torch.no_grad()
    def _eager_step(self, closure: Callable[[], Tensor] | None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            return self._step(closure, loss)
        finally:
            if self.adaptive_step is not None:
                self.adaptive_step.recorder.clear()

    def _step(self, closure: Callable[[], Tensor] | None, loss: Tensor | None) -> Tensor | None:
        estimator = self.estimator
        found_inf = getattr(self, "found_inf", None)  # set by torch.amp.GradScaler
        if found_inf is not None and float(found_inf) > 0:
            estimator.clear()
            return loss
        amp_scale = getattr(self, "grad_scale", None)  # torch.amp.GradScaler's loss scale
        amp_unscale = 1.0 if amp_scale is None else 1.0 / float(amp_scale)
        k = self._steps
        self._index_groups()
        adapt = self.adaptive_damping and closure is not None and k % self.damping_adaptation_interval == 0
        adaptive = self.adaptive_step
        solve = adaptive is not None and adaptive.due(k, adapt)
        try:  # every schedule of step k resolves before anything changes
            self._check_schedules(k)
            if adaptive is not None and solve:
                adaptive.recorder.batches()  # raises unless the step's forward calls can be re-run
        except (ValueError, TypeError, RuntimeError):
            estimator.clear()
            raise
        if self.fisher_type == "mc" and self._is_factor_step(k):
            estimator.check_sampled()
        params = [p for g in self.param_groups for p in g["params"]]
        if not self._ddp:
            estimator.communicator.average_gradients([p.grad for p in params if p.grad is not None])
        with record_function("natgrad.KFAC.factor_update"):
            skipped: set[str] = set()
            if self._is_factor_step(k):
                skipped = estimator.update_factors(self.factor_decay, self.loss_reduction, amp_unscale)
            else:
                estimator.clear()
        with record_function("natgrad.KFAC.inverse_update"):
            period = resolve("inverse_update_period", self.inverse_update_period, k)
            estimator.update_decompositions(k % period == 0, self.inverse_method, self._block_damping,
                                            self.pi_correction, self.warm_refreshes)
        with record_function("natgrad.KFAC.precondition"):
            cross = adaptive is None and self.kl_clip is not None and any(g["momentum"] for g in self.param_groups)
            request = DirectionRequest(self._block_damping, self.pi_correction, amp_unscale,
                                       self._momentum_buffer if cross else None)
            updates, grads = estimator.directions(params, skipped, request)
            if self._grafting is not None:
                updates = self._graft(updates, grads)
        model_change = None
        if adaptive is not None:
            with record_function("natgrad.KFAC.adaptive_step"):
                model_change = self._adaptive_update(adaptive, updates, grads, solve)
            adapt = adapt and model_change is not None
        else:
            with record_function("natgrad.KFAC.trust_region"):
                kl_clip = resolve("kl_clip", self.kl_clip, k)
                nu = self._trust_region.scale(kl_clip, updates, grads, self._group_of, self.state)
        before = {p: p.detach().clone() for p in updates} if adapt else None
        if adaptive is None:
            with record_function("natgrad.KFAC.update"):
                self._apply(updates, nu)
        elif model_change is not None or not solve:
            with record_function("natgrad.KFAC.update"):
                adaptive.apply(self.param_groups, updates, self.state)
        if before is not None:  # set exactly when adapting
            self._adapt_damping(closure, loss, before, grads, model_change)
        self._steps += 1
        return loss

    def _graft(self, updates: dict, grads: dict) -> Updates:
        """The directions rescaled by the grafting rule (the trust region's ``⟨u, g⟩`` with them)."""
        grafted, scales = cast(Any, self._grafting).graft(dict(updates), grads, self.state)
        out = Updates(grafted)
        inner = getattr(updates, "inner", None)
        out.inner = None if inner is None else {p: v * scales[p] for p, v in inner.items()}
        out.cross = getattr(updates, "cross", None)
        return out

    def _check_schedules(self, k: int) -> None:
        """Resolves every scheduled hyperparameter of step ``k`` (raising on an invalid value)."""
        for group in self.param_groups:
            resolve("damping", group["damping"], k)
        resolve("kl_clip", self.kl_clip, k)
        resolve("inverse_update_period", self.inverse_update_period, k)
        self._is_factor_step(k)

    def _damping(self, param: Tensor) -> float:
        group = self._group_of[id(param)]
        value = resolve("damping", group["damping"], self._steps)
        return ops.kfac_damping(value, self._adaptation.multiplier)

    def _block_damping(self, block: CurvatureBlock) -> float:
        """A block's damping: its first parameter's group's."""
        return self._damping(block.params[0])

    def _momentum_buffer(self, p: Tensor) -> Tensor | None:
        """``p``'s momentum buffer if its group uses momentum (None before its first step)."""
        if not self._group_of[id(p)]["momentum"]:
            return None
        return self.state[p].get("momentum_buffer") if p in self.state else None

    def _apply(self, updates: dict, nu: float) -> None:
        """``θ ← θ − η b`` with ``b ← ν(μ b + u) + ω θ`` for every parameter in ``updates`` (ν, the
        trust region's scale, bounds the momentum-accumulated step), one fused op per parameter
        group (momentum buffers start at zero: the first ``b`` is the direction itself).
        """
        for group in self.param_groups:
            params = [p for p in group["params"] if p in updates]
            if not params:
                continue
            dirs = [updates[p] for p in params]
            buffers = []
            if group["momentum"]:
                for p in params:
                    state = self.state[p]
                    if state.get("momentum_buffer") is None:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buffers.append(state["momentum_buffer"])
            ops.kfac_momentum_step_(params, buffers, dirs, group["lr"], group["momentum"] * nu,
                                    group["weight_decay"], nu)

    def _adaptive_update(self, adaptive: AdaptiveStep, updates: dict, grads: dict, solve: bool) -> float | None:
        """Solves the quadratic model for α and μ when ``solve`` (else the last are reused);
        returns its value at them, None when not solved or not finite (the step is then skipped,
        with a warning).
        """
        if not solve or not updates:
            return None
        with self.estimator.paused():
            q = adaptive.solve_step(updates, grads, self._group_of, self.state, self._damping,
                                    self.estimator.communicator.mean_scalar,
                                    resolve("kl_clip", self.kl_clip, self._steps))
        if not q.finite:
            warnings.warn("natgrad.KFAC: the quadratic model of the adaptive learning rate holds NaN or Inf "
                          "(non-finite inputs, or outputs that overflowed?); the step is skipped "
                          "(parameters unchanged)",
                          RuntimeWarning, stacklevel=4)
            return None
        return q.model_change

    def _adapt_damping(self, closure, loss_before, before: dict, grads: dict, model_change: float | None) -> None:
        """Levenberg–Marquardt: compare the loss reduction with the quadratic model's (the
        adaptive step's exact-Fisher model when given, else the K-FAC blocks' quadratic form).
        """
        if model_change is None:
            deltas = {p: p.detach() - old for p, old in before.items()}
            predicted = sum(float((grads[p] * d).sum()) for p, d in deltas.items())
            curvature = 0.0
            for p, d in deltas.items():
                curvature += self._damping(p) * float(d.pow(2).sum())
            for value in self.estimator.quad_form(deltas):
                curvature += value
            model_change = predicted + 0.5 * curvature
        paused = self.adaptive_step.recorder.paused() if self.adaptive_step is not None else nullcontext()
        with self.estimator.paused(), paused, torch.enable_grad():
            loss_after = closure()
        comm = self.estimator.communicator
        change = comm.mean_scalar(float(loss_after)) - comm.mean_scalar(float(loss_before))
        self._adaptation.update(change, model_change, self.damping_adaptation_decay,
                                self.damping_adaptation_interval)

    # ---- introspection and checkpoints ------------------------------------------------------------

    @property
    def nonfinite_skips(self) -> dict[str, int]:
        """How many times each layer's update was skipped because of NaN/Inf or overflow."""
        return dict(self.estimator.ledger.faults)

    @property
    def damping_multiplier(self) -> float:
        """The adaptive-damping multiplier applied to every group's damping (1.0 if unused)."""
        return self._adaptation.multiplier

    @property
    def last_reduction_ratio(self) -> float | None:
        """The reduction ratio ρ of the last damping adaptation (None before the first)."""
        return self._adaptation.last_ratio

    def describe(self) -> str:
        """A table of every optimized parameter and the preconditioner it gets: before the first
        step, the block planned from its module's type; a tied weight names the module whose
        block it got and those that share it; a layer that collected nothing says why (eval
        mode, skip_modules, frozen...).
        """
        return parameter_table([(self.estimator.param_name(p), "x".join(map(str, p.shape)) or "scalar",
                                 self.estimator.treatment(p)) for group in self.param_groups for p in group["params"]])

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state (momentum buffers, param groups) plus, under ``"kfac"``, the step
        counter, factors, decompositions, damping multiplier, fault counts and sampler state.
        """
        curvature = self.estimator.state_dict(self.inverse_method)
        state = super().state_dict()
        state[STATE_KEY] = {"steps": self._steps, "refreshes": curvature["refreshes"],
                            "damping_multiplier": self._adaptation.multiplier, "faults": curvature["faults"],
                            "ladder": curvature["ladder"], "decomposed": curvature["decomposed"],
                            "generator": self._generator.get_state(), "blocks": curvature["blocks"]}
        if self.adaptive_step is not None:
            state[STATE_KEY]["adaptive"] = self.adaptive_step.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output; curvature tensors are restored uncast. Everything
        is validated first (layers, shapes, momentum buffers): on error the optimizer is
        unchanged.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict saved by natgrad.KFAC, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        kfac = state_dict.pop(STATE_KEY, None)
        if not isinstance(kfac, dict):
            raise ValueError(f"state_dict has no {STATE_KEY!r} dict entry: not saved by natgrad.KFAC")
        self._check_state(state_dict, kfac)
        super().load_state_dict(state_dict)
        self._steps = int(kfac["steps"])
        self._adaptation.multiplier = float(kfac["damping_multiplier"])
        self._generator.set_state(kfac["generator"])
        self.estimator.load_state_dict(kfac)
        if self.adaptive_step is not None:
            self.adaptive_step.load_state_dict(kfac.get("adaptive"))

    def _check_state(self, state_dict: dict[str, Any], kfac: dict[str, Any]) -> None:
        """Raises ValueError (naming the layer or parameter and both shapes) unless the checkpoint
        fits this optimizer; changes nothing.
        """
        missing = [k for k in _STATE_ENTRIES if k not in kfac]
        if missing:
            raise ValueError(f"state_dict[{STATE_KEY!r}] lacks {missing}: not saved by natgrad.KFAC")
        self.estimator.check_state_dict(kfac["blocks"])
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups):
            return  # torch.optim's own load_state_dict raises its clear error
        for saved, group in zip(saved_groups, self.param_groups):
            for index, p in zip(saved["params"], group["params"]):
                for key, value in state_dict.get("state", {}).get(index, {}).items():
                    if isinstance(value, Tensor) and value.dim() > 0 and value.shape != p.shape:
                        name = self.estimator.param_name(p, f"parameter {index}")
                        raise ValueError(f"state_dict: {key} of {name!r} has shape {tuple(value.shape)}, "
                                         f"the parameter has {tuple(p.shape)} (was the model's width changed?)")
