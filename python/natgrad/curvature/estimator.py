"""The curvature estimator of one model: natgrad.KFAC's blocks, captures, communicator, refresh
schedule and fault ledger, and the per-step work on them.

:class:`CurvatureEstimator` owns everything curvature: one block per layer (chosen by
:func:`natgrad.curvature.plan.module_blocks`), the hooks that feed them, the communicator that
shares their work between processes, which layers have been decomposed and how often the
refreshes were warm, and the faults seen. The optimizer keeps the hyperparameters and the phase
script of a step and calls, in order, :meth:`~CurvatureEstimator.update_factors`,
:meth:`~CurvatureEstimator.update_decompositions` and :meth:`~CurvatureEstimator.directions`.

One host read per step. The factor step of a family that batches it (the Kronecker family's
list op, see :meth:`natgrad.curvature.block.CurvatureBlock.update_many`) checks each layer's
statistics in C++ and leaves a bad layer untouched; its flags are read with the directions'
stats, which every family appends to one list (:class:`~natgrad.curvature.block.DirectionRequest`).
The trust region's inner products ``⟨u, g⟩`` and ``⟨b, g⟩`` come with the same read. Distributed
runs whose directions are preconditioned on a subset of ranks take the per-block sequence with
its broadcasts (factors updated per layer, averaged across ranks and checked with reads of
their own).

Faults (the documented NaN/Inf policy): a layer whose captured statistics hold NaN/Inf (or
values that could overflow its factors) is skipped with an "activations or output gradients"
fault (its factors untouched), one whose updated factors are not finite restarts its estimate;
a block whose (unscaled) gradient is not finite is skipped with a "gradients" fault, one whose
direction is not with a "preconditioned gradients" fault; parameters and factors of a skipped
block are untouched. Each is warned about once per layer and counted.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import Tensor, nn

from natgrad import ops
from natgrad.curvature.block import (
    CurvatureBlock,
    DirectionRequest,
    PlainBlock,
    StatisticsBlock,
    all_true,
    by_family,
    max_abs,
)
from natgrad.curvature.capture import CaptureGate, GradientPhase, LayerCapture
from natgrad.curvature.coverage import Coverage
from natgrad.curvature.faults import FaultLedger
from natgrad.curvature.kron import enable_eigenvalue_correction
from natgrad.curvature.plan import CaptureFactory, module_blocks, sample_scale
from natgrad.curvature.prior import Prior, PriorBlock
from natgrad.curvature.registry import parameter_owners
from natgrad.ops.rules import Fault


class Updates(dict):
    """Directions by parameter. ``inner`` holds each one's ``⟨u, g⟩`` and ``cross`` its
    ``⟨b, g⟩`` (b: its momentum buffer before the step) when they were read already; None: the
    trust region computes them.
    """

    inner: dict[Tensor, float] | None = None
    cross: dict[Tensor, float] | None = None


def checked_skip_modules(skip_modules: Any, model: nn.Module) -> set[str]:
    """``skip_modules`` as a set of names, every one of which names a module of ``model``."""
    try:
        skip = set([skip_modules] if isinstance(skip_modules, str) else skip_modules)
    except TypeError:
        raise TypeError(f"Invalid skip_modules: {skip_modules!r} (expected module names, e.g. "
                        "a list of str)") from None
    unknown = sorted(skip - {name for name, _ in model.named_modules()})
    if unknown:
        raise ValueError(f"Invalid skip_modules: {unknown} match no module of the model "
                         "(expected qualified names as in model.named_modules())")
    return skip


def read(tensors: list[Tensor]) -> list[float]:
    """The values of several tensors, flattened, with one host read when they share a device."""
    if not tensors:
        return []
    if len({t.device for t in tensors}) == 1:
        return torch.cat([t.reshape(-1).to(torch.float64) for t in tensors]).tolist()
    return [v for t in tensors for v in t.reshape(-1).tolist()]


class CurvatureEstimator:
    """The blocks of ``model``'s optimized parameters and everything that feeds and schedules them
    (see the module docstring).

    Args:
        model (nn.Module): the model (not a DDP wrapper).
        params (sequence of Tensor): the optimized parameters.
        communicator: a :mod:`natgrad.distributed.communicator` communicator.
        factor_step (Callable[[], bool]): whether the current step collects statistics.
        skip_modules (iterable of str): module names left to the fallback.
        fisher_type (str): "empirical" or "mc" (which backward passes fill the statistics).
        linear_approx, factor_dtype, inverse_dtype, max_factor_dim, eigenvalue_correction: as for
            natgrad.KFAC.
        block_filter (Callable[[CurvatureBlock], str | None], optional): None to keep a planned
            block, or why its module's parameters are left to the fallback instead (no hooks):
            an optimizer that uses only some block kinds (natgrad.EigenAdam).
    """

    def __init__(self, model: nn.Module, params: Sequence[Tensor], communicator, *,
                 factor_step: Callable[[], bool], skip_modules: Any = (), fisher_type: str = "empirical",
                 linear_approx: str = "expand", factor_dtype: torch.dtype | None = None,
                 inverse_dtype: torch.dtype | None = None, max_factor_dim: int | None = None,
                 eigenvalue_correction: bool = False,
                 block_filter: Callable[[CurvatureBlock], str | None] | None = None) -> None:
        skip = checked_skip_modules(skip_modules, model)
        self.communicator = communicator
        #: Whether the block families batch the step (False: one block at a time, as distributed
        #: runs whose layers are preconditioned on a subset of ranks do).
        self.batched = True
        self.ledger = FaultLedger()
        self.refreshes = 0  # refreshes so far (warm ones every ``warm_refreshes + 1``-th is exact)
        self._factor_step = factor_step
        self._phase = GradientPhase(fisher_type=fisher_type)
        self._paused = False
        #: what the hooks read to know whether the current step collects statistics: the
        #: owner calls :meth:`sync_gate` whenever :meth:`capturing` may have changed (the hooks
        #: hold the gate, not the estimator: no reference cycle, and a compiled model guards on
        #: one bool)
        self.gate = CaptureGate()
        self._decomposed: set[str] = set()  # layers decomposed at least once (same on every rank)
        self._pending: list[tuple[list[CurvatureBlock], Tensor]] = []  # unread factor-step flags
        self._block_filter = block_filter
        self._build(model, {id(p) for p in params}, skip, linear_approx, factor_dtype, inverse_dtype)
        for block in self._blocks:
            block.limit_factors(max_factor_dim)
        if eigenvalue_correction:  # EKFAC where the block supports it (a warning names the others)
            enable_eigenvalue_correction(self._blocks)
        self.sync_gate()

    # ---- set-up -------------------------------------------------------------------------------

    def _build(self, model: nn.Module, managed: set[int], skip: set[str], approx: str,
               factor_dtype, inverse_dtype) -> None:
        self._blocks: list[CurvatureBlock] = []
        self._captures: dict[str, LayerCapture] = {}
        self._fallback_reason: dict[int, str] = {}
        self._param_names = {id(p): n for n, p in model.named_parameters()}
        self._plain: dict[int, PlainBlock] = {}
        factory = CaptureFactory(model, self.gate, self._phase)
        owners = parameter_owners(model)  # a tied weight: one owner's block (the registry's rule)
        #: what describe() says, and the eval-mode check of each factor step
        self.coverage = Coverage(model)
        for name, module in model.named_modules():
            mine = [p for p in module.parameters(recurse=False) if owners[id(p)][1] is module]
            own = [p for p in mine if p.requires_grad]
            for p in mine:
                if not p.requires_grad:
                    self._fallback_reason[id(p)] = (f"{type(module).__name__} {name!r}: frozen "
                                                    "(requires_grad=False) when natgrad.KFAC was built")
            if not own or not any(id(p) in managed for p in own):
                continue
            blocks: list[CurvatureBlock] = []
            reason: str | None = "skipped by skip_modules"
            if name not in skip:
                blocks, reason = module_blocks(name, module, [p for p in own if id(p) in managed],
                                               linear_approx=approx, factor_dtype=factor_dtype,
                                               inverse_dtype=inverse_dtype)
                if blocks and len(own) != sum(len(b.params) for b in blocks):
                    blocks, reason = [], "only some of its parameters are optimized"
                refused = [r for b in blocks if self._block_filter is not None and (r := self._block_filter(b))]
                if refused:
                    blocks, reason = [], refused[0]
            if not blocks:
                for p in own:
                    self._fallback_reason[id(p)] = f"{type(module).__name__} {name!r}: {reason}"
            for block in blocks:
                self._blocks.append(block)
                self._captures[block.name] = factory.capture(block, module)
        captures = list(self._captures.values())

        def remove_captures() -> None:
            for c in captures:
                c.remove()

        self._finalizer = weakref.finalize(self, remove_captures)
        self._block_of: dict[int, str] = {id(p): b.name for b in self._blocks for p in b.params}

    @property
    def blocks(self) -> list[CurvatureBlock]:
        """The curvature blocks, in the model's module order."""
        return list(self._blocks)

    @property
    def captures(self) -> dict[str, LayerCapture]:
        """Each block's capture, by block name."""
        return dict(self._captures)

    def is_decomposed(self, name: str) -> bool:
        """Whether the block ``name`` has been decomposed (and not reset since)."""
        return name in self._decomposed

    def remove_hooks(self) -> None:
        """Removes every hook on the model (also done when the estimator is collected)."""
        self._finalizer()

    def param_name(self, p: Tensor, default: str = "<unnamed>") -> str:
        """``p``'s qualified name in the model."""
        return self._param_names.get(id(p), default)

    def _plain_block(self, p: Tensor) -> PlainBlock:
        """The fallback block of a parameter outside every block (made on demand: a param group
        added later may bring parameters).
        """
        block = self._plain.get(id(p))
        if block is None:
            reason = self._fallback_reason.get(id(p), "not owned by any module")
            block = self._plain[id(p)] = PlainBlock(self.param_name(p), cast(nn.Parameter, p), reason)
        return block

    # ---- priors -------------------------------------------------------------------------------

    def install_prior(self, prior: Prior, select: Callable[[CurvatureBlock], bool]) -> list[CurvatureBlock]:
        """Makes every block ``select`` accepts solve with ``prior``'s curvature added (a block
        wrapped by another prior gets this one instead); returns the blocks it wraps.
        """
        wrapped = []
        for i, block in enumerate(self._blocks):
            inner = block.inner if isinstance(block, PriorBlock) else block
            if select(inner):
                if isinstance(block, PriorBlock):
                    block.prior = None
                self._blocks[i] = PriorBlock(inner, prior)
                wrapped.append(inner)
        return wrapped

    def remove_prior(self, prior: Prior) -> None:
        """Restores the blocks ``prior`` wraps to their own solve."""
        for i, block in enumerate(self._blocks):
            if isinstance(block, PriorBlock) and block.prior is prior:
                block.prior = None
                self._blocks[i] = block.inner

    # ---- statistics ---------------------------------------------------------------------------

    def capturing(self) -> bool:
        """Whether forward and backward calls now feed the statistics."""
        return not self._paused and self._factor_step()

    def sync_gate(self) -> None:
        """Opens or closes :attr:`gate` to match :meth:`capturing` (the owner calls it when the
        step, or whether it collects statistics, changes).
        """
        self.gate.open = self.capturing()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Nothing is captured inside (e.g. a closure re-evaluated to judge a step)."""
        self._paused = True
        self.sync_gate()
        try:
            yield
        finally:
            self._paused = False
            self.sync_gate()

    @contextmanager
    def sampling(self) -> Iterator[None]:
        """Backward passes inside fill the sampled Fisher's statistics ("mc")."""
        self._phase.sampling = True
        try:
            yield
        finally:
            self._phase.sampling = False

    def sampling_targets(self) -> list[Tensor]:
        """What a sampled backward pass must reach: the outputs of this step's eager forward calls
        that no gradient has reached yet, and the parameters of the layers a compiled forward
        tapped (their records are filled by the backward through the layer, see
        :mod:`natgrad.curvature.capture`).
        """
        targets = [r.output for c in self._captures.values() for r in c.records
                   if r.output is not None and r.grad_output is None]
        params = {id(p): p for b in self._blocks if self._captures[b.name].tapped
                  for p in b.params if p.requires_grad}
        return targets + list(params.values())

    def check_sampled(self) -> None:
        """Raises RuntimeError (dropping the records) when forward calls were captured but no
        sampled gradient reached any of them (``fisher_type="mc"`` without ``sample_fisher``).
        """
        forwards = any(c.records or c.tapped for c in self._captures.values())
        if forwards and not any(c.complete() for c in self._captures.values()):
            self.clear()
            raise RuntimeError(
                "natgrad.KFAC(fisher_type='mc'): no sampled gradient reached any layer this step; "
                "call opt.sample_fisher(output) after the forward pass and before loss.backward() "
                "(or use fisher_type='empirical'). Parameters and factors were not changed.")

    def clear(self) -> None:
        """Drops every captured record."""
        for capture in self._captures.values():
            capture.clear()

    def update_factors(self, decay: float, loss_reduction: str, grad_scale: float = 1.0) -> set[str]:
        """The factor step from the captured records (then dropped); returns the layers to skip
        this step. ``grad_scale`` multiplies the captured output gradients (an AMP unscale).
        """
        self.coverage.factor_step(self._captures)
        skipped: set[str] = set()
        comm = self.communicator
        stats = {}
        fed = {b.name: cast(StatisticsBlock, b) for b in self._blocks}  # all fed by captures
        # complete(): records whose grad_output is set; an empty batch holds no statistics: the
        # layer is left as if it had not been called
        calls = {b.name: [r for r in self._captures[b.name].complete() if fed[b.name].count_samples([r.input])]
                 for b in self._blocks}
        # the step's samples: the most any layer saw (a call of one sample is then shared by them)
        batch = max((fed[name].count_samples([r.input for r in records]) for name, records in calls.items()
                     if records), default=0)
        for block in self._blocks:
            records = calls[block.name]
            if records:
                inputs, grads = [r.input for r in records], [cast(Tensor, r.grad_output) for r in records]
                per_sample = sample_scale(fed[block.name], inputs, loss_reduction, batch)
                stats[block.name] = fed[block.name].prepare(inputs, grads, per_sample * grad_scale)
        self._pending = []
        if comm.world_size == 1 and self.batched:  # distributed: averaged across ranks before any check
            for family, group in by_family([b for b in self._blocks if b.name in stats]):
                self._pending += family.update_many(group, [stats[b.name] for b in group], decay)
            for blocks, _ in self._pending:
                for block in blocks:
                    del stats[block.name]
        checks = [fed[b.name].statistics_ok(stats[b.name]) for b in self._blocks if b.name in stats]
        ok = iter(all_true(checks))
        present = [b.name in stats for b in self._blocks]
        good = comm.agree([seen and next(ok) for seen in present])
        captured = comm.agree(present)
        updated = []
        flags = [(b, float(g), 1.0) for b, g, seen in zip(self._blocks, good, captured) if g or seen]
        for (block, _, _), fault in zip(flags, ops.kfac_factor_faults([v for _, *f in flags for v in f])):
            if fault == Fault.NONE:
                fed[block.name].apply_update(stats[block.name], decay)
                updated.append(block)
            else:  # captured everywhere, but NaN/Inf or overflow somewhere: every rank skips
                skipped.add(block.name)
                self.ledger.fault(block.name, fault)
        comm.average_factors(updated, batch)
        self.clear()
        # The bound above makes this unreachable; should a factor still turn non-finite, the
        # layer restarts its estimate (and skips this step) rather than keep poisoned factors.
        healthy = all_true([torch.isfinite(torch.stack([max_abs(f) for f in b.factors().values()])).all()
                            for b in updated])
        for block, fault in zip(updated, ops.kfac_factor_faults([v for fine in healthy for v in (1.0, float(fine))])):
            if fault != Fault.NONE:
                self._reset(block)
                skipped.add(block.name)
                self.ledger.fault(block.name, fault)
        return skipped

    def _reset(self, block: CurvatureBlock) -> None:
        """The layer restarts its estimate."""
        block.reset()
        self._decomposed.discard(block.name)

    def read_factor_faults(self) -> set[str]:
        """The layers whose batched factor step of this step failed (read now, for an optimizer
        that does not call :meth:`directions`, which reads them with its own stats).
        """
        return self._factor_faults(read([flags for _, flags in self._pending]))

    def _factor_faults(self, rows: list[float]) -> set[str]:
        """The faults of the batched factor step from its flags (the first entries of ``rows``);
        returns the layers to skip this step.
        """
        bad: set[str] = set()
        blocks = [block for group, _ in self._pending for block in group]
        for block, fault in zip(blocks, ops.kfac_factor_faults(rows[:2 * len(blocks)])):
            if fault == Fault.NONE:
                continue
            if fault == Fault.FACTORS:  # the layer restarts its estimate (and skips this step)
                self._reset(block)
            bad.add(block.name)  # STATISTICS: factors untouched, step skipped
            self.ledger.fault(block.name, fault)
        self._pending = []
        return bad

    # ---- decompositions -----------------------------------------------------------------------

    def update_decompositions(self, due: bool, method: str, damping: Callable[[CurvatureBlock], float],
                              pi_correction: bool, warm_refreshes: int) -> None:
        """Decomposes every block with factors when ``due`` (the optimizer's inverse period),
        and any not decomposed yet; every ``warm_refreshes + 1``-th refresh is exact, the others
        warm (see :mod:`natgrad.curvature.refresh`).
        """
        comm = self.communicator
        blocks = [b for b in self._blocks if b.has_factors and (due or b.name not in self._decomposed)]
        if any(b.name not in self._decomposed for b in blocks):  # a new layer: (re)assign owners,
            blocks = [b for b in self._blocks if b.has_factors]  # and every owner recomputes
            comm.assign(blocks)
        warm = bool(blocks) and self.refreshes % (warm_refreshes + 1) != 0
        self.refreshes += bool(blocks)
        for block in blocks:
            self._decomposed.add(block.name)
            rung = 0
            if comm.is_owner(block):
                rung = block.update_inverse(method, damping(block), pi_correction, warm)
            comm.share_decomposition(block, method)
            if rung > 0:
                self.ledger.rung(block.name, rung)

    # ---- directions ---------------------------------------------------------------------------

    def _moving(self, params: Sequence[Tensor], skipped: set[str]) -> tuple[list[CurvatureBlock], list[Tensor]]:
        """The blocks to precondition this step (decomposed, not skipped, some gradient present)
        and the parameters that take their plain gradient (outside every block, or in a block
        with no curvature yet), in order.
        """
        blocks: list[CurvatureBlock] = []
        done: set[int] = set()
        for block in self._blocks:
            grads = [p for p in block.params if p.grad is not None]
            done.update(id(p) for p in block.params)
            if block.name in skipped or not grads:
                continue
            if block.name not in self._decomposed:  # no curvature yet: the plain gradient
                done.difference_update(id(p) for p in grads)
                continue
            blocks.append(block)
        return blocks, [p for p in params if p.grad is not None and id(p) not in done]

    def directions(self, params: Sequence[Tensor], skipped: set[str],
                   request: DirectionRequest) -> tuple[dict, dict]:
        """Preconditioned directions and (unscaled) gradients of every parameter of ``params``
        that moves this step, keyed by parameter, with one host read (see the module
        docstring).
        """
        comm = self.communicator
        if not self.batched or getattr(comm, "workers", comm.world_size) != comm.world_size:
            return self._directions_per_block(params, skipped, request)
        blocks, plain = self._moving(params, skipped)
        request.stats.extend(flags for _, flags in self._pending)  # the factor step's flags first
        entries = []
        for family, group in by_family(blocks + [self._plain_block(p) for p in plain]):
            entries += family.directions_many(group, request)
        rows = read(request.stats)
        bad = self._factor_faults(rows)
        cross = request.buffer is not None
        updates, grads_out = Updates(), {}
        inner: dict[Tensor, float] = {}
        cross_of: dict[Tensor, float] | None = {} if cross else None
        updates.inner, updates.cross = inner, cross_of
        faults = ops.kfac_direction_faults(rows, [entry[3] for entry in entries])
        for (block, grads, dirs, at, slots), fault in zip(entries, faults):
            if block.name in bad:
                continue
            if fault != Fault.NONE:
                self.ledger.fault(block.name, fault, block.fault_kind if fault == Fault.GRADIENTS else "layer")
                continue
            for j, (p, g, u) in enumerate(zip(block.params, grads, dirs)):
                if p.grad is not None and p.requires_grad:
                    updates[p], grads_out[p] = u, g
                    inner[p] = rows[at + 2 + j]
                    if cross_of is not None:
                        cross_of[p] = rows[at + 2 + slots + j]
        return updates, grads_out

    def _directions_per_block(self, params: Sequence[Tensor], skipped: set[str],
                              request: DirectionRequest) -> tuple[dict, dict]:
        """The per-block sequence (distributed runs whose directions are broadcast by an owner):
        a block whose gradient is not finite is skipped before preconditioning, one whose
        direction is not (an op that refused, or a rank's broadcast of it) after; each check is
        one host read for all blocks.
        """
        comm, scale = self.communicator, request.grad_scale
        skipped = skipped | self._factor_faults(read([flags for _, flags in self._pending]))
        blocks, plain = self._moving(params, skipped)
        work: list[tuple[CurvatureBlock, Tensor]] = [(b, b.pack([p.grad for p in b.params])) for b in blocks]
        work += [(self._plain_block(p), cast(Tensor, p.grad)) for p in plain]  # _moving: p.grad is set
        if scale != 1.0:
            work = [(b, g * scale) for b, g in work]
        finite = all_true([torch.isfinite(max_abs(grad)) for _, grad in work])
        kept, dirs = [], []
        faults = ops.kfac_direction_faults([v for ok in finite for v in (float(ok), 1.0)], range(0, 2 * len(work), 2))
        for (block, grad), fault in zip(work, faults):
            if fault != Fault.NONE:  # its gradient
                self.ledger.fault(block.name, fault, block.fault_kind)
                continue
            direction = grad
            if not isinstance(block, PlainBlock):
                own: Tensor | None = None
                if comm.is_grad_worker(block):
                    try:
                        own = block.precondition(grad, request.damping(block), request.pi_correction)
                    except RuntimeError:
                        own = torch.full_like(grad, float("nan"))
                direction = comm.share_direction(block, own, grad)
                dirs.append(direction)
            kept.append((block, grad, direction))
        fine = all_true([torch.isfinite(max_abs(d)) for d in dirs])
        late = iter(ops.kfac_direction_faults([v for ok in fine for v in (1.0, float(ok))], range(0, 2 * len(fine), 2)))
        updates: dict[Tensor, Tensor] = {}
        grads: dict[Tensor, Tensor] = {}
        for block, grad, direction in kept:
            fault = Fault.NONE if isinstance(block, PlainBlock) else next(late)
            if fault != Fault.NONE:  # its direction
                self.ledger.fault(block.name, fault)
                continue
            for p, g, u in zip(block.params, block.unpack(grad), block.unpack(direction)):
                if p.grad is not None and p.requires_grad:
                    updates[p], grads[p] = u, g
        return updates, grads

    # ---- products -----------------------------------------------------------------------------

    def quad_form(self, vectors: dict[Tensor, Tensor]) -> list[float]:
        """``vᵀ F_ℓ v`` of every block with factors whose parameters all have a vector in
        ``vectors`` (by parameter), in block order; their sum is ``vᵀ F v`` over those blocks.
        """
        return [float(block.quad_form([vectors[p] for p in block.params])) for block in self._blocks
                if block.has_factors and all(p in vectors for p in block.params)]

    # ---- introspection and checkpoints --------------------------------------------------------

    def treatment(self, p: Tensor) -> str:
        """How the parameter ``p`` is preconditioned, for ``KFAC.describe()`` (see
        :class:`~natgrad.curvature.coverage.Coverage`).
        """
        name = self._block_of.get(id(p))
        if name is None:
            text = self._plain_block(p).description
        else:
            block = next(b for b in self._blocks if b.name == name)
            text = self.coverage.block_treatment(block, self._captures[name])
        return self.coverage.with_tie(id(p), text)

    def state_dict(self, method: str) -> dict[str, Any]:
        """The refresh count, faults, decomposed layers and every block's state (collective in
        a distributed run: the decompositions are gathered first).
        """
        self.communicator.gather_decompositions(self._blocks, method)
        return {"refreshes": self.refreshes, "faults": dict(self.ledger.faults),
                "ladder": dict(self.ledger.ladder), "decomposed": sorted(self._decomposed),
                "blocks": {b.name: b.state_dict() for b in self._blocks}}

    def check_state_dict(self, blocks: dict[str, Any]) -> None:
        """Raises ValueError unless every saved block state fits a block of this model (the
        block of a module that only shares a tied weight, saved by earlier versions, is ignored).
        """
        mine = {b.name: b for b in self._blocks}
        foreign = sorted(set(blocks) - set(mine) - self.coverage.yielded)
        if foreign:
            raise ValueError(f"state_dict has curvature for layers this model lacks: {foreign}")
        for name, state in blocks.items():
            if name in mine:
                mine[name].check_state_dict(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output (checked by :meth:`check_state_dict` first)."""
        self.refreshes = int(state.get("refreshes", 0))
        self.ledger.faults, self.ledger.ladder = dict(state["faults"]), dict(state["ladder"])
        self._decomposed = set(state.get("decomposed", ()))
        for block in self._blocks:
            block.reset()
            if block.name in state["blocks"]:
                block.load_state_dict(state["blocks"][block.name])
        if self._decomposed:
            self.communicator.assign([b for b in self._blocks if b.has_factors])
