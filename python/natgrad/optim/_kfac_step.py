"""natgrad.KFAC's per-step work: the list-op factor step, directions, trust-region inner
products and the momentum / weight-decay update, with one host read per step.

Factor step: every Linear/Conv2d layer that has factors already is updated by one list op
(:func:`update_listed_factors`, :func:`natgrad.ops.kfac_factors_ema_`), which checks each layer's
statistics in C++ and leaves a bad layer untouched; its flags are not read there but with the
directions' stats below.

Directions: layers whose block uses the standard Kronecker layout (:class:`KroneckerBlock`'s own
``pack`` and ``precondition``: Linear and Conv2d) go through one list op per inverse method
(:func:`natgrad.ops.kfac_directions_eigen` / ``_inverse``), which returns the directions (weight
and bias apart, no packed copies), ``⟨u, g⟩``, the finite flags and, when the KL trust region
bounds a momentum step, the buffers' ``⟨b, g⟩`` together. Any other block (an Embedding, a block
type of another module) and the fallback parameters are preconditioned one by one, and their
flags and inner products join the same read, so that the trust region
(:func:`natgrad.optim._kfac_damping.trust_region`) needs no reduction and no read of its own.
In a distributed run whose layers are preconditioned on a subset of ranks the per-block path
with its broadcasts is used (:func:`per_block_directions`, the original sequence; factors are
then updated per layer, averaged across ranks and checked with reads of their own).

The NaN/Inf policy is the documented one: a layer whose captured statistics hold NaN/Inf (or
values that could overflow its factors) is skipped with an "activations or output gradients"
fault (its factors untouched), one whose updated factors are not finite restarts its estimate;
a block whose (unscaled) gradient is not finite is skipped with a "gradients" fault, one whose
direction is not with a "preconditioned gradients" fault; parameters and factors of a skipped
block are untouched.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from natgrad import ops
from natgrad.curvature import CurvatureBlock, KroneckerBlock, PlainBlock
from natgrad.curvature.block import all_true, max_abs


class Updates(dict):
    """Directions by parameter. ``inner`` holds each one's ``⟨u, g⟩`` and ``cross`` its
    ``⟨b, g⟩`` (b: its momentum buffer before the step) when they were read already; None: the
    trust region computes them."""

    inner: dict[Tensor, float] | None = None
    cross: dict[Tensor, float] | None = None


def listable(block: CurvatureBlock) -> bool:
    """Whether the list ops serve this block (standard packed layout and preconditioner)."""
    return (isinstance(block, KroneckerBlock) and type(block).pack is KroneckerBlock.pack
            and type(block).precondition is KroneckerBlock.precondition and block.has_inverse
            and block.prior is None)  # an attached EWC prior solves with its own curvature


def _scaled(g: Tensor, scale: float) -> Tensor:
    return g * scale if scale != 1.0 else g


def _read(tensors: list[Tensor]) -> list[float]:
    """The values of several tensors, flattened, with one host read when they share a device."""
    if not tensors:
        return []
    if len({t.device for t in tensors}) == 1:
        return torch.cat([t.reshape(-1).to(torch.float64) for t in tensors]).tolist()
    return [v for t in tensors for v in t.reshape(-1).tolist()]


def moving(opt, skipped: set[str]) -> tuple[list[CurvatureBlock], list[Tensor]]:
    """The blocks to precondition this step (decomposed, not skipped, some gradient present)
    and the parameters that take their plain gradient (outside every block, or in a block
    with no curvature yet), in the optimizer's order."""
    blocks: list[CurvatureBlock] = []
    done: set[int] = set()
    for block in opt._blocks:
        params = [p for p in block.params if p.grad is not None]
        done.update(id(p) for p in block.params)
        if block.name in skipped or not params:
            continue
        if block.name not in opt._decomposed:  # no curvature yet: the plain gradient
            done.difference_update(id(p) for p in params)
            continue
        blocks.append(block)
    plain = [p for group in opt.param_groups for p in group["params"]
             if p.grad is not None and id(p) not in done]
    return blocks, plain


def update_listed_factors(opt, stats: dict) -> list[str]:
    """The factor step of every Linear/Conv2d layer that has factors already, in one list op
    (:func:`natgrad.ops.kfac_factors_ema_`), in a single process; returns their names. The op
    leaves a layer with NaN/Inf or overflowing statistics untouched (and zeroes factors that an
    update left non-finite, which its bound makes unreachable); its flags are kept in
    ``opt._pending_factors`` and read with the directions' stats (:func:`directions`), where
    such a layer is skipped with the documented fault, and reset in the second case. A layer's
    first update (no factors yet: nothing to leave untouched) and distributed runs (factors are
    averaged across ranks before any check) take the per-layer path in ``KFAC._update_factors``."""
    opt._pending_factors = None
    if opt._comm.world_size != 1:
        return []
    blocks = [b for b in opt._blocks if b.name in stats and b.has_factors and b.factor_layout() is not None]
    if not blocks:
        return []
    data = [stats[b.name] for b in blocks]
    flags = ops.kfac_factors_ema_([b.state["A"] for b in blocks], [b.state["G"] for b in blocks],
                                  [d.inputs for d in data], [d.grads for d in data],
                                  [v for b in blocks for v in b.factor_layout()],
                                  [d.grad_scale for d in data], [opt.factor_decay] * len(blocks))
    opt._pending_factors = (blocks, flags)
    return [b.name for b in blocks]


def _factor_faults(opt, blocks: list[CurvatureBlock], rows: list[float]) -> set[str]:
    """The documented faults of the list op's factor step from its flags (read with the
    directions); returns the layers to skip this step."""
    bad = set()
    for i, block in enumerate(blocks):
        if not rows[2 * i]:  # captured, but NaN/Inf or overflow: factors untouched, step skipped
            bad.add(block.name)
            opt._fault(block.name, "activations or output gradients")
        elif not rows[2 * i + 1]:  # the layer restarts its estimate (and skips this step)
            block.state = {}
            opt._decomposed.discard(block.name)
            bad.add(block.name)
            opt._fault(block.name, "updated factors (reset)")
    return bad


def _pending_flags(opt) -> tuple[list, list[Tensor]]:
    """The factor step's pending (blocks, [flags]) and clears them."""
    pending, opt._pending_factors = getattr(opt, "_pending_factors", None), None
    return ([], []) if pending is None else (pending[0], [pending[1]])


def directions(opt, skipped: set[str], amp_unscale: float) -> tuple[Updates, dict]:
    """Preconditioned directions and (unscaled) gradients of every parameter that moves this
    step, keyed by parameter; see the module docstring."""
    comm = opt._comm
    if getattr(comm, "workers", comm.world_size) != comm.world_size:
        return per_block_directions(opt, skipped, amp_unscale)
    blocks, plain = moving(opt, skipped)
    fast = [b for b in blocks if listable(b)]
    other = [(b, [p.grad for p in b.params]) for b in blocks if not listable(b)]
    other += [(opt._plain_block(p), [p.grad]) for p in plain]
    buffers = _cross_wanted(opt)

    layers: list[tuple] = []  # (block, grads, directions, first stats entry, slots per product)
    factor_blocks, stats = _pending_flags(opt)  # the factor step's flags come first
    for method, key in (("eigen", "g_eigenvectors"), ("inverse", "g_inverse")):
        group = [b for b in fast if key in b.state]
        if group:
            layers += _list_directions(opt, group, method, amp_unscale, stats, buffers)
    for block, grads in other:
        layers.append(_block_direction(opt, block, grads, amp_unscale, stats, buffers))
    rows = _read(stats)
    bad = _factor_faults(opt, factor_blocks, rows)

    updates, grads_out = Updates(), {}
    updates.inner = {}
    updates.cross = {} if buffers else None
    for block, grads, dirs, at, slots in layers:
        if block.name in bad:
            continue
        if not rows[at]:
            opt._fault(block.name, "gradients", "parameter" if isinstance(block, PlainBlock) else "layer")
            continue
        if not rows[at + 1]:
            opt._fault(block.name, "preconditioned gradients")
            continue
        for j, (p, g, u) in enumerate(zip(block.params, grads, dirs)):
            if p.grad is not None and p.requires_grad:
                updates[p], grads_out[p] = u, g
                updates.inner[p] = rows[at + 2 + j]
                if buffers:
                    updates.cross[p] = rows[at + 2 + slots + j]
    return updates, grads_out


def _cross_wanted(opt) -> bool:
    """Whether the trust region will need ``⟨b, g⟩`` (a KL clip and momentum somewhere)."""
    return opt.kl_clip is not None and any(g["momentum"] for g in opt.param_groups)


def _buffer(opt, p: Tensor) -> Tensor | None:
    """``p``'s momentum buffer if its group uses momentum (None before its first step)."""
    if not opt._group_of[id(p)]["momentum"]:
        return None
    return opt.state[p].get("momentum_buffer") if p in opt.state else None


def _list_directions(opt, blocks: list[KroneckerBlock], method: str, amp_unscale: float,
                     stats: list[Tensor], buffers: bool) -> list:
    weights, biases, w_bufs, b_bufs = [], [], [], []
    for b in blocks:
        w = b.weight.grad if b.weight.grad is not None else torch.zeros_like(b.weight)
        weights.append(w.reshape(w.shape[0], -1))
        if b.bias is not None:
            biases.append(b.bias.grad if b.bias.grad is not None else torch.zeros_like(b.bias))
        else:
            biases.append(None)
        if buffers:
            buf = _buffer(opt, b.weight)
            w_bufs.append(None if buf is None else buf.reshape(buf.shape[0], -1))
            b_bufs.append(None if b.bias is None else _buffer(opt, b.bias))
    s = [b.state for b in blocks]
    extra = dict(weight_buffers=w_bufs, bias_buffers=b_bufs) if buffers else {}
    if method == "eigen":
        out = ops.kfac_directions_eigen(
            weights, biases, [x["g_eigenvalues"] for x in s], [x["g_eigenvectors"] for x in s],
            [x["a_eigenvalues"] for x in s], [x["a_eigenvectors"] for x in s],
            [opt._damping(b.weight) for b in blocks], opt.pi_correction, amp_unscale, **extra)
    else:
        out = ops.kfac_directions_inverse(weights, biases, [x["g_inverse"] for x in s],
                                          [x["a_inverse"] for x in s], amp_unscale, **extra)
    width = int(out.stats.shape[1]) if out.stats.dim() == 2 else 4
    first = sum(t.numel() for t in stats)
    stats.append(out.stats)
    bias_dirs = iter(out.bias)
    layers = []
    for i, (b, w, g_w, g_b) in enumerate(zip(blocks, out.weight, weights, biases)):
        grads = [_scaled(g_w.view_as(b.weight), amp_unscale)]
        dirs = [w.view_as(b.weight)]
        if b.bias is not None:
            grads.append(_scaled(g_b, amp_unscale))
            dirs.append(next(bias_dirs))
        layers.append((b, grads, dirs, first + i * width, 2))
    return layers


def _block_direction(opt, block: CurvatureBlock, grads: list, amp_unscale: float,
                     stats: list[Tensor], buffers: bool) -> tuple:
    """One block outside the list ops (or a fallback parameter): its direction, and its stats
    entries (grad finite, direction finite, ⟨u, g⟩ per parameter, then ⟨b, g⟩ per parameter when
    ``buffers``)."""
    grad = _scaled(block.pack(grads), amp_unscale)
    grad_ok = torch.isfinite(max_abs(grad))
    if not isinstance(block, PlainBlock):
        try:
            direction = block.precondition(grad, opt._damping(block.weight), opt.pi_correction)
        except RuntimeError:  # the op refused a non-finite result: skip the layer
            direction = torch.full_like(grad, float("nan"))
        dir_ok = torch.isfinite(max_abs(direction))
    else:
        direction, dir_ok = grad, grad_ok
    g_parts, u_parts = block.unpack(grad), block.unpack(direction)
    zero = torch.zeros((), dtype=torch.float64, device=grad.device)
    entries = [grad_ok.to(torch.float64), dir_ok.to(torch.float64)]
    entries += [(u * g).sum(dtype=torch.float64) for u, g in zip(u_parts, g_parts)]
    if buffers:
        bufs = [_buffer(opt, p) for p in block.params]
        entries += [zero if b is None else (b * g).sum(dtype=torch.float64) for b, g in zip(bufs, g_parts)]
    first = sum(t.numel() for t in stats)
    stats.append(torch.stack(entries))
    return block, g_parts, u_parts, first, len(u_parts)


def weighted_inner(updates: dict, grads: dict, weight: Callable[[Tensor], float]) -> float:
    """``Σ_p weight(p) ⟨u_p, g_p⟩`` (from ``updates.inner`` when it was read already, otherwise
    with one host read)."""
    inner = getattr(updates, "inner", None)
    if inner is not None and all(p in inner for p in updates):
        return math.fsum(inner[p] * weight(p) for p in updates)
    terms = [(updates[p] * grads[p]).sum(dtype=torch.float64) * weight(p) for p in updates]
    return float(torch.stack(terms).sum())


def apply(opt, updates: dict, nu: float) -> None:
    """``θ ← θ − η b`` with ``b ← ν(μ b + u) + ω θ`` for every parameter in ``updates`` (ν, the
    trust region's scale, bounds the momentum-accumulated step: see
    :func:`natgrad.optim._kfac_damping.trust_region`), one fused op per parameter group
    (momentum buffers start at zero: the first ``b`` is the direction itself)."""
    for group in opt.param_groups:
        params = [p for p in group["params"] if p in updates]
        if not params:
            continue
        dirs = [updates[p] for p in params]
        buffers = []
        if group["momentum"]:
            for p in params:
                state = opt.state[p]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffers.append(state["momentum_buffer"])
        ops.kfac_momentum_step_(params, buffers, dirs, group["lr"], group["momentum"] * nu,
                                group["weight_decay"], nu)


def per_block_directions(opt, skipped: set[str], amp_unscale: float) -> tuple[dict, dict]:
    """The per-block sequence (distributed runs whose directions are broadcast by an owner):
    a block whose gradient is not finite is skipped before preconditioning, one whose direction
    is not (an op that refused, or a rank's broadcast of it) after; each check is one host
    read for all blocks."""
    factor_blocks, flags = _pending_flags(opt)  # (none in a distributed run)
    skipped = skipped | _factor_faults(opt, factor_blocks, _read(flags))
    blocks, plain = moving(opt, skipped)
    work = [(b, _scaled(b.pack([p.grad for p in b.params]), amp_unscale)) for b in blocks]
    work += [(opt._plain_block(p), _scaled(p.grad, amp_unscale)) for p in plain]
    finite = all_true([torch.isfinite(max_abs(grad)) for _, grad in work])
    kept, dirs = [], []
    for (block, grad), ok in zip(work, finite):
        if not ok:
            opt._fault(block.name, "gradients", "parameter" if isinstance(block, PlainBlock) else "layer")
            continue
        direction = grad
        if not isinstance(block, PlainBlock):
            direction = None
            if opt._comm.is_grad_worker(block):
                try:
                    direction = block.precondition(grad, opt._damping(block.weight), opt.pi_correction)
                except RuntimeError:
                    direction = torch.full_like(grad, float("nan"))
            direction = opt._comm.share_direction(block, direction, grad)
            dirs.append(direction)
        kept.append((block, grad, direction))
    finite = iter(all_true([torch.isfinite(max_abs(d)) for d in dirs]))
    updates: dict[Tensor, Tensor] = {}
    grads: dict[Tensor, Tensor] = {}
    for block, grad, direction in kept:
        if not isinstance(block, PlainBlock) and not next(finite):
            opt._fault(block.name, "preconditioned gradients")
            continue
        for p, g, u in zip(block.params, block.unpack(grad), block.unpack(direction)):
            if p.grad is not None and p.requires_grad:
                updates[p], grads[p] = u, g
    return updates, grads
