"""The one curvature-block interface that natgrad.KFAC, ``compute_fisher(structure="kfac")`` and
``EWC(structure="kfac")`` share (after kfac-jax's CurvatureBlock).

A block owns the curvature estimate of a few parameters (a layer's weight and bias, or a single
fallback parameter). Vectors are given as lists of tensors shaped like :attr:`params`; a block
packs them into its own layout (:meth:`pack` / :meth:`unpack`). The math runs in the C++ ops
(:mod:`natgrad.ops`); callers decide when each method runs.

=================  ==========================================================================
``update``         EMA of the curvature statistics from captured inputs / output gradients
``update_inverse`` recompute the decomposition used by :meth:`solve`
``mv``             ``F v``
``solve``          ``(F + γI)⁻¹ v`` with the current decomposition
``quad_form``      ``vᵀ F v`` (differentiable in ``v``: EWC's penalty)
``diagonal``       ``diag F``, shaped like the parameters
``to_dense``       ``F`` as a ``p × p`` matrix in the parameters' flattened order (tests)
=================  ==========================================================================

Batching belongs to the block family. Blocks whose :meth:`CurvatureBlock.family` is the same
class are updated and preconditioned together by that class's :meth:`~CurvatureBlock.update_many`
and :meth:`~CurvatureBlock.directions_many` (the Kronecker family calls the list ops, one call
for all of its layers); the base class serves every other block one at a time.
"""
from __future__ import annotations

from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, cast

import torch
from torch import Tensor, nn
from typing_extensions import override

#: State entries that hold a decomposition (dropped and rebuilt by ``update_inverse``).
DECOMPOSITION_KEYS = ("a_eigenvalues", "a_eigenvectors", "g_eigenvalues", "g_eigenvectors",
                      "a_inverse", "g_inverse")


class BlockDirections(NamedTuple):
    """One block's share of a step's directions (see :meth:`CurvatureBlock.directions_many`).

    Attributes:
        block (CurvatureBlock): the block.
        grads (list of Tensor): its parameters' (unscaled) gradients.
        directions (list of Tensor): their preconditioned directions.
        at (int): where its entries start in the step's flattened stats: gradient finite,
            direction finite, ``⟨u, g⟩`` per parameter, then ``⟨b, g⟩`` per parameter when the
            request asked for momentum buffers.
        slots (int): the width of each per-parameter run of entries.
    """

    block: CurvatureBlock
    grads: list[Tensor]
    directions: list[Tensor]
    at: int
    slots: int


@dataclass
class DirectionRequest:
    """What a step's directions need besides the blocks, and the stats they collect for one
    host read.

    Attributes:
        damping (Callable[[CurvatureBlock], float]): a block's damping γ.
        pi_correction (bool): factored, π-corrected damping.
        grad_scale (float): multiplies every gradient first (an AMP unscale).
        buffer (Callable[[Tensor], Tensor | None] or None): a parameter's momentum buffer (None
            before its first step or without momentum), when the trust region needs ``⟨b, g⟩``;
            None: it does not.
        stats (list of Tensor): the step's stats so far, appended to (read once by the caller).
    """

    damping: Callable[[CurvatureBlock], float]
    pi_correction: bool
    grad_scale: float
    buffer: Callable[[Tensor], Tensor | None] | None = None
    stats: list[Tensor] = field(default_factory=list)

    def offset(self) -> int:
        """The flattened position of the next stats entry."""
        return sum(t.numel() for t in self.stats)


class StatisticsBlock(Protocol):
    """What the factor step asks of a block fed by its layer's captures (Kronecker, diagonal and
    attention blocks; a PriorBlock forwards them): sample counts and the statistics update in two
    halves (the estimator's blocks are all of this kind).
    """

    name: str

    def count_samples(self, inputs: Sequence) -> int:
        """How many Fisher samples the captured ``inputs`` of one forward call hold."""
        ...

    def count_rows(self, inputs: Sequence) -> int:
        """How many statistics rows the captured ``inputs`` of one forward call give."""
        ...

    def prepare(self, inputs: Sequence, grads: Sequence[Tensor], grad_scale: float) -> Any:
        """This step's statistics from the captured inputs and output gradients (not yet applied)."""
        ...

    def statistics_ok(self, stats: Any) -> Tensor:
        """A 0-d bool tensor: ``stats`` are finite and cannot overflow the factors (no host read)."""
        ...

    def apply_update(self, stats: Any, decay: float) -> None:
        """Folds ``stats`` into the running averages: ``X <- decay * X + (1 - decay) * stats``."""
        ...


class CurvatureBlock:
    """Base class of every curvature block (see the module docstring).

    Args:
        name (str): a checkpoint key (the owning module's qualified name).
        params (list of nn.Parameter): the parameters this block covers, in vector order.
    """

    kind = "block"
    #: How a fault of this block is named in warnings ("layer" or "parameter").
    fault_kind = "layer"

    def __init__(self, name: str, params: Sequence[nn.Parameter]) -> None:
        self.name = name
        self.params: list[nn.Parameter] = list(params)
        self.state: MutableMapping[str, Tensor] = {}

    # ---- description ------------------------------------------------------------------------

    @property
    def description(self) -> str:
        """How this block preconditions, for ``KFAC.describe()``."""
        return self.kind

    @property
    def num_params(self) -> int:
        """Number of scalars covered."""
        return sum(p.numel() for p in self.params)

    @property
    def has_factors(self) -> bool:
        """Whether statistics have been estimated at least once."""
        return False

    @property
    def has_inverse(self) -> bool:
        """Whether :meth:`solve` can run."""
        return False

    # ---- layout -----------------------------------------------------------------------------

    def pack(self, tensors: Sequence[Tensor | None]) -> Tensor:
        """Parameter-shaped tensors (``None`` for a missing gradient: zeros) -> block layout."""
        return torch.cat([_or_zeros(t, p).reshape(-1) for t, p in zip(tensors, self.params)])

    def unpack(self, packed: Tensor) -> list[Tensor]:
        """Inverse of :meth:`pack`."""
        sizes = [p.numel() for p in self.params]
        return [t.view_as(p) for t, p in zip(torch.split(packed, sizes), self.params)]

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Parameter-shaped tensors -> one vector in the parameters' flattened order."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def split_flat(self, vector: Tensor) -> list[Tensor]:
        """Inverse of :meth:`flatten`."""
        sizes = [p.numel() for p in self.params]
        return [t.view_as(p) for t, p in zip(torch.split(vector, sizes), self.params)]

    # ---- statistics ---------------------------------------------------------------------------

    def update(self, inputs: Sequence[Tensor], grads: Sequence[Tensor], *, decay: float,
               grad_scale: float) -> None:
        """EMA update ``S ← decay·S + (1 − decay)·Ŝ`` from the layer inputs of the forward calls
        and the gradients w.r.t. their outputs (the first update replaces). ``grad_scale`` turns
        captured output gradients into per-sample ones (``N`` for a loss averaged over ``N``
        samples, 1 for a sum, times an AMP unscale). ``grads`` may hold ``k`` times the rows of
        ``inputs``: ``k`` gradient passes over the same forward, whose outer products are summed
        (the exact and multi-draw Fisher).
        """

    def factors(self) -> dict[str, Tensor]:
        """The statistics by name, in a fixed order (averaged across ranks): a 2-D tensor is a
        symmetric matrix, a 1-D one a vector.
        """
        return {}

    def inverse_cost(self) -> float:
        """The work of one :meth:`update_inverse` (cubic in the decomposed sizes)."""
        return 0.0

    def ensure_factors(self) -> None:
        """Creates zero statistics if none exist (a layer the forward never used: F = 0)."""

    def limit_factors(self, max_factor_dim: int | None) -> None:
        """Keeps factors larger than ``max_factor_dim`` block-diagonal (KFAC's option; see
        :mod:`natgrad.curvature.split`); the base has no factors to limit.
        """

    def factor_layout(self) -> list[int] | None:
        """This block's entry of :func:`natgrad.ops.kfac_factors_ema_`'s ``layouts`` when that
        list op computes exactly its statistics update (Linear, Conv2d); None: it does not.
        """
        return None

    # ---- decompositions -----------------------------------------------------------------------

    def update_inverse(self, method: str, damping: float, pi_correction: bool = False,
                       warm: bool = False) -> int:
        """Recomputes the decomposition; returns the fallback-ladder rung used (0: native).
        ``warm`` allows a cheap refresh from the previous decomposition where the block has
        one (KFAC's ``warm_refreshes``); blocks without one recompute exactly.
        """
        return 0

    def decomposition_template(self, method: str) -> dict[str, Tensor]:
        """Empty tensors shaped like what :meth:`update_inverse` produces."""
        return {}

    def drop_decomposition(self) -> None:
        """Forgets the decomposition."""
        for key in DECOMPOSITION_KEYS:
            self.state.pop(key, None)

    def reset(self) -> None:
        """Forgets statistics and decomposition: the estimate restarts."""
        self.state = {}

    # ---- products -----------------------------------------------------------------------------

    def mv(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """``F v``."""
        raise NotImplementedError

    def solve(self, tensors: Sequence[Tensor], damping: float, pi_correction: bool = False) -> list[Tensor]:
        """``(F + damping·I)⁻¹ v`` with the decomposition of the last :meth:`update_inverse`."""
        raise NotImplementedError

    def precondition(self, packed: Tensor, damping: float, pi_correction: bool = False) -> Tensor:
        """:meth:`solve` on a vector in the packed layout."""
        return self.pack(self.solve(self.unpack(packed), damping, pi_correction))

    def direction(self, grad: Tensor, request: DirectionRequest) -> tuple[Tensor, Tensor | None]:
        """The preconditioned packed gradient and a 0-d flag of its finiteness (None: the
        gradient's own flag holds). An op that refuses a non-finite result gives NaN, so that
        the step skips the block.
        """
        try:
            out = self.precondition(grad, request.damping(self), request.pi_correction)
        except RuntimeError:
            out = torch.full_like(grad, float("nan"))
        return out, torch.isfinite(max_abs(out))

    def quad_form(self, tensors: Sequence[Tensor]) -> Tensor:
        """``vᵀ F v`` (differentiable with respect to ``tensors``)."""
        # sum() gives the int 0 only for no tensors
        return cast(Tensor, sum((a * b).sum() for a, b in zip(tensors, self.mv(tensors))))

    def diagonal(self) -> list[Tensor]:
        """``diag F`` as parameter-shaped tensors."""
        return self.split_flat(torch.diagonal(self.to_dense()))

    def to_dense(self) -> Tensor:
        """``F`` over the parameters' flattened order (for small layers and tests)."""
        ref = self.params[0]
        eye = torch.eye(self.num_params, dtype=self._dtype(), device=ref.device)
        return torch.stack([self.flatten(self.mv(self.split_flat(col))) for col in eye], 1)

    def _dtype(self) -> torch.dtype:
        return next(iter(self.factors().values()), self.params[0]).dtype

    # ---- batching -----------------------------------------------------------------------------

    @classmethod
    def family(cls) -> type[CurvatureBlock]:
        """The class whose :meth:`update_many` and :meth:`directions_many` serve this block
        together with the other blocks of its family; the base class serves one at a time.
        """
        return CurvatureBlock

    @classmethod
    def update_many(cls, blocks: Sequence[CurvatureBlock], stats: Sequence[Any],
                    decay: float) -> list[tuple[list[CurvatureBlock], Tensor]]:
        """The factor step of the blocks this family updates in one call, from their
        :meth:`prepare` output: ``[(blocks, flags)]`` with ``flags[i]`` = (statistics used,
        factors finite) of ``blocks[i]``, unread. The base updates none: the caller's checked
        sequence (:meth:`statistics_ok`, then :meth:`apply_update`) updates them one by one.
        """
        return []

    @classmethod
    def directions_many(cls, blocks: Sequence[CurvatureBlock], request: DirectionRequest) -> list[BlockDirections]:
        """The directions of ``blocks`` from their parameters' ``.grad``, their stats appended
        to ``request.stats``; the base: one block at a time.
        """
        return [block.block_directions(request) for block in blocks]

    def block_directions(self, request: DirectionRequest) -> BlockDirections:
        """This block's share of :meth:`directions_many`, outside any list op."""
        grad = self.pack([p.grad for p in self.params])
        if request.grad_scale != 1.0:
            grad = grad * request.grad_scale
        grad_ok = torch.isfinite(max_abs(grad))
        direction, dir_ok = self.direction(grad, request)
        g_parts, u_parts = self.unpack(grad), self.unpack(direction)
        entries = [grad_ok.to(torch.float64), (grad_ok if dir_ok is None else dir_ok).to(torch.float64)]
        entries += [(u * g).sum(dtype=torch.float64) for u, g in zip(u_parts, g_parts)]
        if request.buffer is not None:
            zero = torch.zeros((), dtype=torch.float64, device=grad.device)
            bufs = [request.buffer(p) for p in self.params]
            entries += [zero if b is None else (b * g).sum(dtype=torch.float64) for b, g in zip(bufs, g_parts)]
        at = request.offset()
        request.stats.append(torch.stack(entries))
        return BlockDirections(self, g_parts, u_parts, at, len(u_parts))

    # ---- checkpoints --------------------------------------------------------------------------

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of every state entry this block can hold (checked when loading)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Statistics and decompositions (tensors stored as they are, never cast)."""
        return {"kind": self.kind, **self.state}

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raises ValueError naming the layer and both shapes unless ``state`` fits this block."""
        if state.get("kind") != self.kind:
            raise ValueError(f"checkpoint block {self.name!r} is {state.get('kind')!r}, "
                             f"this layer is {self.kind!r}")
        expected = self.expected_shapes()
        for key, value in state.items():
            if key == "kind":
                continue
            if key not in expected:
                raise ValueError(f"checkpoint block {self.name!r} has an unknown entry {key!r}")
            if not isinstance(value, Tensor) or tuple(value.shape) != expected[key]:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"checkpoint block {self.name!r}: {key} has shape {got}, this "
                                 f"layer needs {expected[key]} (was the model's width changed?)")
            if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
                raise ValueError(f"checkpoint block {self.name!r}: {key} must hold finite floating-point "
                                 f"values, got dtype {value.dtype}"
                                 + (" with NaN/Inf" if value.is_floating_point() else ""))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output onto the parameters' device (validated first)."""
        self.check_state_dict(state)
        device = self.params[0].device
        self.state = {k: v.to(device) for k, v in state.items() if k != "kind"}


#: the dtypes curvature is stored and decomposed in
CURVATURE_DTYPES = (torch.float32, torch.float64)


def curvature_dtype(requested: torch.dtype | None, weight: Tensor) -> torch.dtype:
    """The dtype a block keeps its curvature in: ``requested``, else the weight's when it is
    float32 or float64, else float32 (a bfloat16/float16 model, as autocast or a half-precision
    checkpoint gives it, still gets float32 factors: see ``natgrad.KFAC``'s ``factor_dtype``).
    """
    if requested is not None:
        return requested
    return weight.dtype if weight.dtype in CURVATURE_DTYPES else torch.float32


def max_abs(t: Tensor) -> Tensor:
    """``max |t|`` as a 0-d float64 tensor, NaN if ``t`` holds a NaN, 0 if it is empty (no host
    sync; ``aminmax`` is an order of magnitude faster on CPU than ``vector_norm(t, inf)``).
    """
    if t.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=t.device)
    low, high = torch.aminmax(t)
    return torch.maximum(high, -low).to(torch.float64)


def all_true(flags: list[Tensor]) -> list[bool]:
    """Each 0-d bool tensor as a Python bool, with one host sync for all of them."""
    if not flags:
        return []
    devices = {f.device for f in flags}
    if len(devices) == 1:
        return [bool(v) for v in torch.stack(flags).tolist()]
    return [bool(f) for f in flags]


def by_family(blocks: Sequence[CurvatureBlock]) -> list[tuple[type[CurvatureBlock], list[CurvatureBlock]]]:
    """``blocks`` grouped by :meth:`CurvatureBlock.family`, in order: the batching families as
    they first appear, then the blocks served one at a time.
    """
    groups: dict[type[CurvatureBlock], list[CurvatureBlock]] = {}
    for block in blocks:
        groups.setdefault(block.family(), []).append(block)
    single = groups.pop(CurvatureBlock, [])
    return list(groups.items()) + ([(CurvatureBlock, single)] if single else [])


def _or_zeros(t: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if t is None else t


class PlainBlock(CurvatureBlock):
    """The documented fallback for a parameter no curvature block supports: no statistics, and
    :meth:`solve` is the identity, so the parameter follows its plain gradient (with the
    optimizer's trust region, momentum and weight decay). :meth:`mv` is zero: the block knows
    no curvature.

    Args:
        name (str): the parameter's qualified name.
        param (nn.Parameter): the parameter.
        reason (str): why it falls back (shown by ``KFAC.describe()``).
    """

    kind = "plain"
    fault_kind = "parameter"

    def __init__(self, name: str, param: nn.Parameter, reason: str) -> None:
        super().__init__(name, [param])
        self.reason = reason

    @property
    @override
    def description(self) -> str:
        return f"plain gradient: {self.reason}"

    @property
    @override
    def has_inverse(self) -> bool:
        return True

    @override
    def pack(self, tensors):
        return _or_zeros(tensors[0], self.params[0])

    @override
    def unpack(self, packed):
        return [packed]

    @override
    def mv(self, tensors):
        return [torch.zeros_like(_or_zeros(t, p)) for t, p in zip(tensors, self.params)]

    @override
    def solve(self, tensors, damping, pi_correction=False):
        return [_or_zeros(t, p) for t, p in zip(tensors, self.params)]

    @override
    def direction(self, grad, request):
        return grad, None  # the plain gradient: finite exactly when the gradient is

    @override
    def quad_form(self, tensors):
        return torch.zeros((), dtype=self.params[0].dtype, device=self.params[0].device)
