r"""natgrad.KFAC: Kronecker-factored approximate curvature as a torch.optim.Optimizer."""
from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.profiler import record_function

from natgrad.curvature import CurvatureBlock, GradientPhase, LayerCapture, PlainBlock
from natgrad.curvature.block import all_true, max_abs
from natgrad.curvature.plan import CaptureFactory, module_blocks, sample_scale
from natgrad.distributed.communicator import make_communicator
from natgrad.likelihoods import get_likelihood
from natgrad.optim import _kfac_io, _kfac_step
from natgrad.optim._hyper import Schedule, check_group, resolved_number
from natgrad.optim._kfac_damping import adapt_damping, trust_region
from natgrad.optim._kfac_checks import check_kfac_arguments, check_schedules, checked_skip_modules

__all__ = ["KFAC"]

STATE_KEY = _kfac_io.STATE_KEY  # the optimizer-level entry in state_dict()
_GROUP_DEFAULTS = ("lr", "momentum", "weight_decay", "damping")
_GROUP_BOUNDS = {"lr": dict(low=0.0), "momentum": dict(low=0.0, high=1.0, high_open=True),
                 "weight_decay": dict(low=0.0),
                 "damping": dict(low=0.0, low_open=True, allow_callable=True)}


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

    (or the π-corrected factored damping), and steps :math:`\theta \leftarrow \theta - \eta\, b`,
    :math:`b \leftarrow \nu(\mu b + u) + \omega\theta`, where the KL trust region ν bounds the
    momentum-accumulated step actually taken, :math:`\eta^2\nu^2 \|\mu b + u\|_F^2 \le \kappa`
    (:func:`natgrad.optim._kfac_damping.trust_region`; μ = 0: the usual
    :math:`\min(1, \sqrt{\kappa / \sum_\ell \eta^2 \langle u_\ell, \nabla_\ell\rangle})`).

    Attention projections get Kronecker blocks, norms, grouped convolutions and parameters used
    functionally a damped diagonal Fisher of the same scale (:mod:`natgrad.curvature.plan`);
    the rest, and ``skip_modules``, use the plain gradient in place of :math:`u` (same trust
    region, momentum, weight decay); :meth:`describe` lists every parameter's treatment. A
    parameter whose ``.grad`` is None or that does not require grad (frozen) is never moved.

    Curvature lives in one block per layer (:mod:`natgrad.curvature`), not in
    ``self.state[p]``: a Kronecker pair spans a layer's weight and bias together.
    ``state_dict()`` stores the blocks under ``"kfac"`` keyed by module name (independent of
    parameter order); ``self.state[p]`` holds the per-parameter momentum buffers, as in
    torch.optim.SGD.

    Faults: a layer whose captured activations or output gradients hold NaN/Inf, or values
    large enough that a factor update could overflow, keeps its factors and parameters for the
    step (a warning names it once; :attr:`nonfinite_skips` counts), and training goes on.

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
        fisher_type (str): "empirical" or "mc" (default: "empirical"). With "mc", every factor
            step needs ``sample_fisher(output)``; a step without it raises RuntimeError.
        loss_reduction (str): "mean" if the gradient is the mean over the step's samples (dim 0,
            also across micro-batches), "sum" if it is the sum, "token_mean" if it is the mean
            over every position of every sample (each row is then one Fisher sample) (default: "mean").
        linear_approx (str): weight sharing in Linear layers with inputs ``[N, ..., d]``:
            "expand" (positions as extra rows) or "reduce" (averaged per sample)
            (default: "expand").
        factor_dtype, inverse_dtype (torch.dtype, optional): dtypes of factors and of their
            decompositions (default: the weight's dtype).
        skip_modules (iterable of str): qualified module names to leave to the fallback (a
            name that matches no module raises ValueError).
        seed (int): seed of the generator used by :meth:`sample_fisher` (plus the rank) (default: 0).
        grad_worker_fraction (float): with torch.distributed, the fraction f in (0, 1] of ranks
            that hold each layer's decomposition (see :mod:`natgrad.distributed.communicator`)
            (default: 1.0).
        triangle_packing (bool): all-reduce symmetric factors as upper triangles (default: True).
        bucket_cap_mb (float): bucket size of the factor/gradient all-reduces (default: 25).
        process_group: torch.distributed group (default: the world when initialised).

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
                 inverse_method: str = "eigen", pi_correction: bool | None = None, warm_refreshes: int = 0,
                 adaptive_damping: bool = False, damping_adaptation_interval: int = 5,
                 damping_adaptation_decay: float = 0.95, fisher_type: str = "empirical",
                 loss_reduction: str = "mean", linear_approx: str = "expand",
                 factor_dtype: torch.dtype | None = None, inverse_dtype: torch.dtype | None = None,
                 skip_modules: Iterable[str] = (), seed: int = 0,
                 grad_worker_fraction: float = 1.0, triangle_packing: bool = True,
                 bucket_cap_mb: float = 25.0, process_group=None) -> None:
        check_kfac_arguments(
            model=model, lr=lr, momentum=momentum, weight_decay=weight_decay, damping=damping,
            factor_decay=factor_decay, factor_update_period=factor_update_period,
            inverse_update_period=inverse_update_period, kl_clip=kl_clip,
            inverse_method=inverse_method, pi_correction=pi_correction, warm_refreshes=warm_refreshes,
            adaptive_damping=adaptive_damping, damping_adaptation_interval=damping_adaptation_interval,
            damping_adaptation_decay=damping_adaptation_decay, fisher_type=fisher_type,
            loss_reduction=loss_reduction, linear_approx=linear_approx, factor_dtype=factor_dtype,
            inverse_dtype=inverse_dtype, seed=seed, grad_worker_fraction=grad_worker_fraction,
            triangle_packing=triangle_packing, bucket_cap_mb=bucket_cap_mb)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, damping=damping)
        super().__init__(model.parameters() if params is None else params, defaults)

        self._ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        self.model = model.module if self._ddp else model
        self._comm = make_communicator(grad_worker_fraction, triangle_packing, bucket_cap_mb, process_group)
        self.factor_decay = factor_decay
        self.factor_update_period = factor_update_period
        self.inverse_update_period = inverse_update_period
        self.kl_clip = kl_clip
        self.inverse_method = inverse_method
        self.pi_correction = inverse_method == "inverse" if pi_correction is None else pi_correction
        self.warm_refreshes, self._refreshes = warm_refreshes, 0
        self.adaptive_damping = adaptive_damping
        self.damping_adaptation_interval = damping_adaptation_interval
        self.damping_adaptation_decay = damping_adaptation_decay
        self.fisher_type = fisher_type
        self.loss_reduction = loss_reduction
        self._generator = torch.Generator().manual_seed(seed + self._comm.rank)
        self._phase = GradientPhase(fisher_type=fisher_type)
        self._steps = 0
        self._damping_multiplier = 1.0
        self._faults: dict[str, int] = {}
        self._decomposed: set[str] = set()  # layers decomposed at least once (same on every rank)
        self._ladder: dict[str, int] = {}
        self._suspend_capture = False
        self.last_reduction_ratio: float | None = None
        skip = checked_skip_modules(skip_modules, self.model)
        self._build_blocks(skip, linear_approx, factor_dtype, inverse_dtype)

    # ---- set-up ---------------------------------------------------------------------------------

    def _build_blocks(self, skip: set[str], approx: str, factor_dtype, inverse_dtype) -> None:
        managed = {id(p) for g in self.param_groups for p in g["params"]}
        self._blocks: list[CurvatureBlock] = []
        self._captures: dict[str, LayerCapture] = {}
        self._fallback_reason: dict[int, str] = {}
        self._param_names = {id(p): n for n, p in self.model.named_parameters()}
        self._plain: dict[int, PlainBlock] = {}
        alive = weakref.WeakMethod(self._capturing)
        factory = CaptureFactory(self.model, lambda: (m := alive()) is not None and m(), self._phase)
        for name, module in self.model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            for p in module.parameters(recurse=False):
                if not p.requires_grad:
                    self._fallback_reason[id(p)] = (f"{type(module).__name__} {name!r}: frozen "
                                                    "(requires_grad=False) when natgrad.KFAC was built")
            if not own or not any(id(p) in managed for p in own):
                continue
            blocks, reason = [], "skipped by skip_modules"
            if name not in skip:
                blocks, reason = module_blocks(name, module, [p for p in own if id(p) in managed],
                                               linear_approx=approx, factor_dtype=factor_dtype,
                                               inverse_dtype=inverse_dtype)
                if blocks and len(own) != sum(len(b.params) for b in blocks):
                    blocks, reason = [], "only some of its parameters are optimized"
            if not blocks:
                for p in own:
                    self._fallback_reason[id(p)] = f"{type(module).__name__} {name!r}: {reason}"
            for block in blocks:
                self._blocks.append(block)
                self._captures[block.name] = factory.capture(block, module)
        captures = list(self._captures.values())
        self._finalizer = weakref.finalize(self, lambda: [c.remove() for c in captures])
        self._block_of: dict[int, CurvatureBlock] = {id(p): b for b in self._blocks for p in b.params}
        self._index_groups()

    def _index_groups(self) -> None:
        """Maps each parameter to its group (refreshed every step: add_param_group may run)."""
        self._group_of = {id(p): g for g in self.param_groups for p in g["params"]}

    def _plain_block(self, p: Tensor) -> PlainBlock:
        """The fallback block of a parameter outside every Kronecker block (made on demand:
        add_param_group may add parameters)."""
        block = self._plain.get(id(p))
        if block is None:
            reason = self._fallback_reason.get(id(p), "not owned by any module")
            block = self._plain[id(p)] = PlainBlock(self._param_names.get(id(p), "<unnamed>"), p, reason)
        return block

    def _capturing(self) -> bool:
        return not self._suspend_capture and self._is_factor_step(self._steps)

    def _is_factor_step(self, step: int) -> bool:
        period = resolved_number("factor_update_period", self.factor_update_period, step, low=1, integer=True)
        return step % period == 0

    def remove_hooks(self) -> None:
        """Removes every hook this optimizer placed on the model (also done on garbage
        collection). Afterwards all parameters use the fallback preconditioner."""
        self._finalizer()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch.optim's, plus the checks ``__init__`` runs on the defaults, for the values the
        group sets itself (ValueError naming the key; the group is then not added)."""
        check_group(param_group, _GROUP_BOUNDS)
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key in _GROUP_DEFAULTS:
                group.setdefault(key, self.defaults[key])

    # ---- Monte-Carlo Fisher -----------------------------------------------------------------------

    def sample_fisher(self, output: Tensor, likelihood: str = "categorical") -> None:
        """Estimates G from labels sampled from the model's predictive distribution.

        Call after the forward pass and before ``loss.backward()``; one extra backward pass,
        which fills the G statistics only (``.grad`` is untouched). The sampled loss sums
        a sample's positions and is divided by ``output.shape[0]`` ("mean"), by all rows of
        ``output`` ("token_mean") or by 1 ("sum"). A no-op on steps that update no factors.

        Args:
            output (Tensor): the model's logits (categorical) or means (Gaussian, unit variance).
            likelihood (str): "categorical" or "gaussian" (default: "categorical").
        """
        if self.fisher_type != "mc":
            raise RuntimeError("sample_fisher() needs natgrad.KFAC(..., fisher_type='mc')")
        lik = get_likelihood(likelihood)
        if not isinstance(output, Tensor) or output.dim() == 0:
            raise ValueError("sample_fisher(output): output must be the model's batched output tensor")
        targets = [r.output for c in self._captures.values() for r in c.records
                   if r.output is not None and r.grad_output is None]
        if not targets or not self._capturing():
            return
        with torch.no_grad():  # NaN/Inf outputs: labels from finite stand-ins; the NaN statistics
            labels = lik.sample(torch.nan_to_num(output), self._generator)  # then skip the step
        rows = {"mean": output.shape[0], "sum": 1}.get(self.loss_reduction, output.numel() // max(output.shape[-1], 1))
        loss = lik.nll(output, labels, "sum") / max(rows, 1)  # token_mean: over all rows
        self._phase.sampling = True
        try:
            torch.autograd.grad(loss, targets, retain_graph=True, allow_unused=True)
        finally:
            self._phase.sampling = False

    # ---- the step ---------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Performs one K-FAC step; ``closure`` (re-evaluating the loss, as in torch.optim) is
        needed for adaptive damping. Returns the closure's loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)  # set by torch.amp.GradScaler
        if found_inf is not None and float(found_inf) > 0:
            self._clear_records()
            return loss
        amp_scale = getattr(self, "grad_scale", None)  # torch.amp.GradScaler's loss scale
        amp_unscale = 1.0 if amp_scale is None else 1.0 / float(amp_scale)
        k = self._steps
        self._index_groups()
        try:  # every schedule of step k resolves before anything changes
            check_schedules(self, k)
        except (ValueError, TypeError):
            self._clear_records()
            raise
        if self.fisher_type == "mc" and self._is_factor_step(k):
            self._check_sampled()
        if not self._ddp:
            self._comm.average_gradients([p.grad for g in self.param_groups for p in g["params"]
                                          if p.grad is not None])
        with record_function("natgrad.KFAC.factor_update"):
            skipped = self._update_factors(k, amp_unscale)
        with record_function("natgrad.KFAC.inverse_update"):
            self._update_inverses(k)
        with record_function("natgrad.KFAC.precondition"):
            updates, grads = self._directions(skipped, amp_unscale)
        with record_function("natgrad.KFAC.trust_region"):
            nu = trust_region(self, k, updates, grads)
        adapt = self.adaptive_damping and closure is not None and k % self.damping_adaptation_interval == 0
        before = {p: p.detach().clone() for p in updates} if adapt else None
        with record_function("natgrad.KFAC.update"):
            self._apply(updates, nu)
        if adapt:
            adapt_damping(self, closure, loss, before, grads)
        self._steps += 1
        return loss

    def _check_sampled(self) -> None:
        forwards = any(c.records for c in self._captures.values())
        if forwards and not any(c.complete() for c in self._captures.values()):
            self._clear_records()
            raise RuntimeError(
                "natgrad.KFAC(fisher_type='mc'): no sampled gradient reached any layer this step; "
                "call opt.sample_fisher(output) after the forward pass and before loss.backward() "
                "(or use fisher_type='empirical'). Parameters and factors were not changed.")

    def _damping(self, param: Tensor) -> float:
        group = self._group_of[id(param)]
        value = resolved_number("damping", group["damping"], self._steps, low=0.0, low_open=True)
        return value * self._damping_multiplier

    def _clear_records(self) -> None:
        for capture in self._captures.values():
            capture.clear()

    def _update_factors(self, k: int, amp_unscale: float) -> set[str]:
        skipped: set[str] = set()
        if not self._is_factor_step(k):
            self._clear_records()
            return skipped
        stats = {}
        for block in self._blocks:
            # an empty batch holds no statistics: the layer is left as if it had not been called
            records = [r for r in self._captures[block.name].complete() if block.count_samples([r.input])]
            if records:
                inputs, grads = [r.input for r in records], [r.grad_output for r in records]
                per_sample = sample_scale(block, inputs, self.loss_reduction)
                stats[block.name] = block.prepare(inputs, grads, per_sample * amp_unscale)
        # Linear/Conv2d layers: one list op, whose fault flags join the step's single read
        # (_kfac_step.update_listed_factors); the others below, with a read of their own.
        for name in _kfac_step.update_listed_factors(self, stats):
            del stats[name]
        checks = [b.statistics_ok(stats[b.name]) for b in self._blocks if b.name in stats]
        ok = iter(all_true(checks))
        present = [b.name in stats for b in self._blocks]
        good = self._comm.agree([seen and next(ok) for seen in present])
        captured = self._comm.agree(present)
        updated = []
        for block, is_good, seen in zip(self._blocks, good, captured):
            if is_good:
                block.apply_update(stats[block.name], self.factor_decay)
                updated.append(block)
            elif seen:  # captured everywhere, but NaN/Inf or overflow somewhere: every rank skips
                skipped.add(block.name)
                self._fault(block.name, "activations or output gradients")
        samples = next((b.count_samples([r.input for r in self._captures[b.name].complete()])
                        for b in updated), 0)
        self._comm.average_factors(updated, samples)
        self._clear_records()
        # The bound above makes this unreachable; should a factor still turn non-finite, the
        # layer restarts its estimate (and skips this step) rather than keep poisoned factors.
        healthy = all_true([torch.isfinite(torch.stack([max_abs(f) for f in b.factors().values()])).all()
                            for b in updated])
        for block, fine in zip(updated, healthy):
            if not fine:
                block.state = {}
                self._decomposed.discard(block.name)
                skipped.add(block.name)
                self._fault(block.name, "updated factors (reset)")
        return skipped

    def _update_inverses(self, k: int) -> None:
        period = resolved_number("inverse_update_period", self.inverse_update_period, k, low=1, integer=True)
        due = [b for b in self._blocks if b.has_factors and (k % period == 0 or b.name not in self._decomposed)]
        if any(b.name not in self._decomposed for b in due):  # a new layer: (re)assign owners,
            due = [b for b in self._blocks if b.has_factors]  # and every owner recomputes
            self._comm.assign(due)
        warm = bool(due) and self._refreshes % (self.warm_refreshes + 1) != 0
        self._refreshes += bool(due)
        for block in due:
            self._decomposed.add(block.name)
            rung = 0
            if self._comm.is_owner(block):
                rung = block.update_inverse(self.inverse_method, self._damping(block.weight), self.pi_correction, warm)
            self._comm.share_decomposition(block, self.inverse_method)
            if rung > 0:
                first = block.name not in self._ladder
                self._ladder[block.name] = self._ladder.get(block.name, 0) + 1
                if first:
                    warnings.warn(f"natgrad.KFAC: decomposing the factors of {block.name!r} needed "
                                  f"fallback-ladder rung {rung}; see natgrad.ops.Rung", stacklevel=3)

    def _directions(self, skipped: set[str], amp_unscale: float) -> tuple[dict, dict]:
        """Preconditioned directions and (unscaled) gradients of every parameter that moves this
        step, with one host read (see :mod:`natgrad.optim._kfac_step`)."""
        return _kfac_step.directions(self, skipped, amp_unscale)

    def _apply(self, updates: dict, nu: float) -> None:
        _kfac_step.apply(self, updates, nu)

    def _fault(self, where: str, what: str, kind: str = "layer") -> None:
        if where not in self._faults:
            warnings.warn(f"natgrad.KFAC: NaN or Inf (or values that would overflow) in the {what} of "
                          f"{kind} {where!r}; its update is skipped this step (parameters and factors "
                          "untouched)", RuntimeWarning, stacklevel=4)
        self._faults[where] = self._faults.get(where, 0) + 1

    # ---- introspection and checkpoints ------------------------------------------------------------

    @property
    def nonfinite_skips(self) -> dict[str, int]:
        """How many times each layer's update was skipped because of NaN/Inf or overflow."""
        return dict(self._faults)

    @property
    def damping_multiplier(self) -> float:
        """The adaptive-damping multiplier applied to every group's damping (1.0 if unused)."""
        return self._damping_multiplier

    def describe(self) -> str:
        """A table of every optimized parameter and the preconditioner it gets."""
        return _kfac_io.describe(self)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state (momentum buffers, param groups) plus, under ``"kfac"``, the step
        counter, factors, decompositions, damping multiplier, fault counts and sampler state."""
        self._comm.gather_decompositions(self._blocks, self.inverse_method)
        state = super().state_dict()
        state[STATE_KEY] = _kfac_io.kfac_state(self)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output; curvature tensors are restored uncast. Everything
        is validated first (layers, shapes, momentum buffers): on error the optimizer is
        unchanged."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict saved by natgrad.KFAC, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        kfac = state_dict.pop(STATE_KEY, None)
        if not isinstance(kfac, dict):
            raise ValueError(f"state_dict has no {STATE_KEY!r} dict entry: not saved by natgrad.KFAC")
        _kfac_io.check_state(self, state_dict, kfac)
        super().load_state_dict(state_dict)
        _kfac_io.load_kfac_state(self, kfac)

