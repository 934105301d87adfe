"""A curvature block whose solve adds a prior's curvature (EWC's ``λ·F_old``).

The estimator installs one around a block (:meth:`natgrad.curvature.estimator.CurvatureEstimator.
install_prior`); everything but the solve is the wrapped block's: its statistics, factors,
decompositions, layout and checkpoint entry. Its :meth:`PriorBlock.precondition` asks the prior
first and falls back to the wrapped block's own solve where the prior has nothing to add.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from torch import Tensor
from typing_extensions import override

from natgrad.curvature.block import CurvatureBlock, by_family


class Prior(Protocol):
    """What a prior provides: the damped solve with its curvature added, or None."""

    def precondition(self, block: CurvatureBlock, packed: Tensor, damping: float) -> Tensor | None:
        """``(F + F_prior + damping·I)⁻¹`` on ``block``'s packed ``packed``; None: no prior here."""


class PriorBlock(CurvatureBlock):
    """``inner`` with ``prior``'s curvature added to its solve (see the module docstring).

    Args:
        inner (CurvatureBlock): the wrapped block.
        prior (Prior): the prior (e.g. :class:`natgrad.regularizers.ewc_curvature.EWCCurvature`);
            None once removed (the block then solves as ``inner``).
    """

    def __init__(self, inner: CurvatureBlock, prior: Prior | None) -> None:
        self.inner, self.prior = inner, prior
        self.name, self.params = inner.name, inner.params

    def __getattr__(self, name: str) -> Any:
        # the wrapped block's own attributes (weight, module, prepare, count_samples, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def state(self):
        """The wrapped block's state (the prior adds none of its own)."""
        return self.inner.state

    @state.setter
    def state(self, value) -> None:
        self.inner.state = value

    @property
    @override
    def kind(self) -> str:  # type: ignore[override]
        return self.inner.kind

    @property
    @override
    def description(self) -> str:
        return self.inner.description

    @property
    @override
    def has_factors(self) -> bool:
        return self.inner.has_factors

    @property
    @override
    def has_inverse(self) -> bool:
        return self.inner.has_inverse

    # ---- the solve with the prior -------------------------------------------------------------

    @override
    def precondition(self, packed: Tensor, damping: float, pi_correction: bool = False) -> Tensor:
        out = None if self.prior is None else self.prior.precondition(self.inner, packed, damping)
        return self.inner.precondition(packed, damping, pi_correction) if out is None else out

    @override
    def solve(self, tensors, damping, pi_correction=False):
        return self.unpack(self.precondition(self.pack(tensors), damping, pi_correction))

    # ---- batching: the factor step is the wrapped blocks' family's, directions one at a time ----

    @classmethod
    @override
    def family(cls) -> type[CurvatureBlock]:
        return PriorBlock

    @classmethod
    @override
    def update_many(cls, blocks, stats, decay):
        inner = [b.inner for b in blocks]
        of = {id(b): s for b, s in zip(inner, stats)}
        return [pair for family, group in by_family(inner)
                for pair in family.update_many(group, [of[id(b)] for b in group], decay)]

    @classmethod
    @override
    def directions_many(cls, blocks, request):
        return [block.block_directions(request) for block in blocks]

    # ---- everything else is the wrapped block's -----------------------------------------------

    @override
    def pack(self, tensors: Sequence[Tensor | None]) -> Tensor:
        return self.inner.pack(tensors)

    @override
    def unpack(self, packed: Tensor) -> list[Tensor]:
        return self.inner.unpack(packed)

    @override
    def flatten(self, tensors):
        return self.inner.flatten(tensors)

    @override
    def split_flat(self, vector):
        return self.inner.split_flat(vector)

    @override
    def update(self, inputs, grads, *, decay, grad_scale):
        self.inner.update(inputs, grads, decay=decay, grad_scale=grad_scale)

    @override
    def factors(self):
        return self.inner.factors()

    @override
    def inverse_cost(self):
        return self.inner.inverse_cost()

    @override
    def ensure_factors(self):
        self.inner.ensure_factors()

    @override
    def factor_layout(self):
        return self.inner.factor_layout()

    @override
    def update_inverse(self, method, damping, pi_correction=False, warm=False):
        return self.inner.update_inverse(method, damping, pi_correction, warm)

    @override
    def decomposition_template(self, method):
        return self.inner.decomposition_template(method)

    @override
    def drop_decomposition(self):
        self.inner.drop_decomposition()

    @override
    def reset(self):
        self.inner.reset()

    @override
    def mv(self, tensors):
        return self.inner.mv(tensors)

    @override
    def quad_form(self, tensors):
        return self.inner.quad_form(tensors)

    @override
    def diagonal(self):
        return self.inner.diagonal()

    @override
    def to_dense(self):
        return self.inner.to_dense()

    @override
    def expected_shapes(self):
        return self.inner.expected_shapes()

    @override
    def state_dict(self):
        return self.inner.state_dict()

    @override
    def check_state_dict(self, state):
        self.inner.check_state_dict(state)

    @override
    def load_state_dict(self, state):
        self.inner.load_state_dict(state)
