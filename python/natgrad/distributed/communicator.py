"""How natgrad.KFAC shares work between processes (KAISA, Pauloski et al., 2021).

* Factors: after each local factor update, every rank holds ``ρF + (1−ρ)S_r``; the weighted
  mean over ranks (weights = local sample counts) is exactly the single-process EMA on the union
  of the shards. Symmetric factors travel as packed upper triangles, in buckets.
* Inverse work: each layer's decomposition is computed by one owner rank, assigned by cost
  (the block's ``inverse_cost()``, e.g. ``d_A³ + d_G³``; greedy). The owner and the next
  ``k − 1`` ranks (``k = round(f·world)`` for grad-worker fraction ``f``) form the layer's grad
  workers and receive the decomposition;
  with ``k < world`` the owner broadcasts the preconditioned gradient to every rank instead.
  ``f = 1`` trades memory for communication (everyone holds every inverse); ``f = 1/world``
  communicates preconditioned gradients instead of inverses.
* Decisions that could diverge (skip a layer with NaN, the adaptive-damping losses) are
  all-reduced, so every rank ends each step with identical parameters.
* Blocks are opaque: the communicator uses ``factors()`` (the statistics to average, by name in a
  fixed order: 2-D = symmetric matrix, 1-D = vector; updated in place), ``inverse_cost()``,
  ``decomposition_template(method)`` / ``drop_decomposition()`` / ``state`` (the decomposition
  tensors it broadcasts), ``has_factors`` and ``name``.
* Every tensor a collective sees lives on the group's device (:func:`group_device`): NCCL only
  moves CUDA tensors.
"""
from __future__ import annotations

from collections import deque
from typing import cast

import torch
import torch.distributed as dist
from torch import Tensor
from typing_extensions import override

from natgrad.distributed.packing import assign_by_cost, pack_triangle, reduce_in_buckets, unpack_triangle

# Backends whose collectives only take tensors of one accelerator type.
_ACCELERATOR_BACKENDS = {"nccl": "cuda", "xccl": "xpu"}


def group_device(group=None) -> torch.device:
    """The device on which ``group`` (default: the world) runs collectives of small tensors
    (flags, counts, scalars): the current CUDA device for NCCL, otherwise the CPU (gloo, mpi,
    and mixed backends such as ``"cpu:gloo,cuda:nccl"``, which take CPU tensors).
    """
    backend = str(dist.get_backend(group)).lower()
    if ":" in backend:  # "cpu:gloo,cuda:nccl": one backend per device type
        devices = dict(part.split(":", 1) for part in backend.split(","))
        if "cpu" in devices:
            return torch.device("cpu")
        backend = next(iter(devices.values()))
    kind = _ACCELERATOR_BACKENDS.get(backend)
    if kind is None:
        return torch.device("cpu")
    module = getattr(torch, kind)
    return torch.device(kind, module.current_device())


# The last finished collectives of every communicator (see DistributedCommunicator._collective).
# Module-level, so that freeing a communicator (or its optimizer) right after a step does not
# drop a work the gloo worker may still hold; older works are destroyed as newer ones arrive
# (64: several steps of a small model; the flat factor/gradient buckets they hold, up to
# bucket_cap_mb each, stay alive until pushed out).
_RECENT_WORKS: deque = deque(maxlen=64)


def collective(fn, tensor, group=None, **kwargs) -> None:
    """Runs the torch.distributed collective ``fn(tensor, group=group, **kwargs)`` to completion
    and keeps its work object alive for a while. Every natgrad collective goes through here.

    A gloo collective completes (``wait()`` returns) before the worker thread drops its
    reference to the work. If ours was gone by then, the worker destroys the work, which holds
    Python objects (the tensor, Python thread-local state), so it needs the GIL. While it waits
    for it, the main thread may destroy the group (``~ProcessGroupGloo`` joins the workers
    holding the GIL: deadlock) or finalize the interpreter (the worker's GIL request exits the
    thread inside a noexcept destructor: ``terminate called without an active exception``,
    SIGABRT). Keeping the last works in ``_RECENT_WORKS`` (also past the caller's life) makes
    the worker's release a mere decrement; they are destroyed later on a Python thread, with the
    GIL. ``tensor`` may be a list (``all_gather``'s output list first).
    """
    if isinstance(tensor, tuple):
        work = fn(*tensor, group=group, async_op=True, **kwargs)
    else:
        work = fn(tensor, group=group, async_op=True, **kwargs)
    work.wait()
    _RECENT_WORKS.append(work)


class LocalCommunicator:
    """A single process: every collective is the identity."""

    rank, world_size = 0, 1

    def __init__(self) -> None:
        self.bytes = {"gradients": 0, "factors": 0, "inverses": 0, "directions": 0}

    def average_gradients(self, grads: list[Tensor]) -> None:
        """Averages gradients over ranks (only when no DDP already did)."""

    def agree(self, flags: list[bool]) -> list[bool]:
        """A flag is true on every rank only if it is true on all of them."""
        return flags

    def average_factors(self, blocks: list, samples: int) -> None:
        """Sample-weighted mean of the blocks' factors over ranks."""

    def assign(self, blocks: list) -> None:
        """Chooses each block's owner and grad workers."""

    def is_grad_worker(self, block) -> bool:
        """Whether this rank holds ``block``'s decomposition."""
        return True

    def is_owner(self, block) -> bool:
        """Whether this rank computes ``block``'s decomposition."""
        return True

    def share_decomposition(self, block, method: str) -> None:
        """Sends the owner's decomposition to the other grad workers."""

    def share_direction(self, block, direction: Tensor | None, like: Tensor) -> Tensor:
        """The preconditioned gradient on every rank (from the owner if needed)."""
        return cast(Tensor, direction)  # one rank: it owns every block, so it has the direction

    def mean_scalar(self, value: float) -> float:
        """The mean of a number over ranks."""
        return value

    def gather_decompositions(self, blocks: list, method: str) -> None:
        """Makes every decomposition available on this rank (before a checkpoint)."""


class DistributedCommunicator(LocalCommunicator):
    """torch.distributed collectives (gloo on CPU, NCCL on GPU) over ``group``.

    Args:
        grad_worker_fraction (float): f in (0, 1] (see the module docstring).
        triangle_packing (bool): send symmetric factors as upper triangles.
        bucket_cap_mb (float): bucket size of the factor and gradient all-reduces.
        group (ProcessGroup, optional): the process group (default: the world).
    """

    def __init__(self, grad_worker_fraction: float = 1.0, triangle_packing: bool = True,
                 bucket_cap_mb: float = 25.0, group=None) -> None:
        super().__init__()
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.workers = max(1, min(self.world_size, round(grad_worker_fraction * self.world_size)))
        self.triangle_packing = triangle_packing
        self.cap = int(bucket_cap_mb * 2**20)
        self.device = group_device(group)
        self.owner: dict[str, int] = {}
        # One subgroup per possible worker set {r, r+1, ..., r+k-1}: created by every rank, in order.
        self.worker_groups = {}
        if 1 < self.workers < self.world_size:
            for r in range(self.world_size):
                ranks = sorted((r + i) % self.world_size for i in range(self.workers))
                self.worker_groups[r] = dist.new_group(ranks)

    def _global(self, local_rank: int) -> int:
        return dist.get_global_rank(self.group, local_rank) if self.group is not None else local_rank

    def _collective(self, fn, tensor, **kwargs) -> None:
        """:func:`collective` on this communicator's group (unless ``group`` is given)."""
        collective(fn, tensor, group=kwargs.pop("group", self.group), **kwargs)

    def _all_reduce(self, op=dist.ReduceOp.SUM):
        return lambda t: self._collective(dist.all_reduce, t, op=op)

    @override
    def average_gradients(self, grads: list[Tensor]) -> None:
        if not grads:
            return
        self.bytes["gradients"] += reduce_in_buckets(grads, self._all_reduce(), self.cap)
        for g in grads:
            g.div_(self.world_size)

    @override
    def agree(self, flags: list[bool]) -> list[bool]:
        if not flags:
            return flags
        t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=self.device)
        self._collective(dist.all_reduce, t, op=dist.ReduceOp.MIN)
        return [bool(v) for v in t.tolist()]

    @override
    def average_factors(self, blocks: list, samples: int) -> None:
        if not blocks:
            return
        count = torch.tensor([float(samples)], dtype=torch.float64, device=self.device)
        self._collective(dist.all_reduce, count)
        weight = samples / float(count)
        factors = [f for b in blocks for f in b.factors().values()]
        packed = [self.triangle_packing and f.dim() == 2 for f in factors]
        sendable = [pack_triangle(f) if p else f.clone() for f, p in zip(factors, packed)]
        for s in sendable:
            s.mul_(weight)
        self.bytes["factors"] += reduce_in_buckets(sendable, self._all_reduce(), self.cap)
        for f, s, p in zip(factors, sendable, packed):
            if p:
                unpack_triangle(s, f.shape[0], out=f)
            else:
                f.copy_(s)

    @override
    def assign(self, blocks: list) -> None:
        costs = [float(b.inverse_cost()) for b in blocks]
        for b, r in zip(blocks, assign_by_cost(costs, self.world_size)):
            self.owner[b.name] = r

    def _workers(self, block) -> list[int]:
        start = self.owner[block.name]
        return [(start + i) % self.world_size for i in range(self.workers)]

    @override
    def is_grad_worker(self, block) -> bool:
        return self.rank in self._workers(block)

    @override
    def is_owner(self, block) -> bool:
        return self.owner[block.name] == self.rank

    @override
    def share_decomposition(self, block, method: str) -> None:
        if self.workers == 1:
            return
        group = self.group if self.workers == self.world_size else self.worker_groups[self.owner[block.name]]
        if not self.is_grad_worker(block):
            return
        if not self.is_owner(block):
            block.drop_decomposition()
            block.state.update(block.decomposition_template(method))
        src = self._global(self.owner[block.name])
        for key in sorted(block.decomposition_template(method)):
            self._collective(dist.broadcast, block.state[key], src=src, group=group)
            self.bytes["inverses"] += block.state[key].numel() * block.state[key].element_size()

    @override
    def share_direction(self, block, direction: Tensor | None, like: Tensor) -> Tensor:
        if self.workers == self.world_size:  # every rank computed its own direction
            return cast(Tensor, direction)
        buf = cast(Tensor, direction).contiguous() if self.is_owner(block) else torch.empty_like(like)
        self._collective(dist.broadcast, buf, src=self._global(self.owner[block.name]))
        self.bytes["directions"] += buf.numel() * buf.element_size()
        return buf

    @override
    def mean_scalar(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        self._collective(dist.all_reduce, t)
        return float(t) / self.world_size

    @override
    def gather_decompositions(self, blocks: list, method: str) -> None:
        if self.workers == self.world_size:
            return
        src_of = {b.name: self._global(self.owner[b.name]) for b in blocks}
        for b in blocks:
            if not (b.has_factors and b.name in self.owner):
                continue
            if not self.is_owner(b) and not self.is_grad_worker(b):
                b.state.update(b.decomposition_template(method))
            for key in sorted(b.decomposition_template(method)):
                self._collective(dist.broadcast, b.state[key], src=src_of[b.name])


def make_communicator(grad_worker_fraction: float, triangle_packing: bool, bucket_cap_mb: float,
                      group=None) -> LocalCommunicator:
    """A :class:`DistributedCommunicator` when torch.distributed is initialised with more than
    one process, otherwise the :class:`LocalCommunicator`.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        return DistributedCommunicator(grad_worker_fraction, triangle_packing, bucket_cap_mb, group)
    return LocalCommunicator()
