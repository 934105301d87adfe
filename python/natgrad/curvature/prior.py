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
        return self.inner.state

    @state.setter
    def state(self, value) -> None:
        self.inner.state = value

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self.inner.kind

    @property
    def description(self) -> str:
        return self.inner.description

    @property
    def has_factors(self) -> bool:
        return self.inner.has_factors

    @property
    def has_inverse(self) -> bool:
        return self.inner.has_inverse

    # ---- the solve with the prior -------------------------------------------------------------

    def precondition(self, packed: Tensor, damping: float, pi_correction: bool = False) -> Tensor:
        out = None if self.prior is None else self.prior.precondition(self.inner, packed, damping)
        return self.inner.precondition(packed, damping, pi_correction) if out is None else out

    def solve(self, tensors, damping, pi_correction=False):
        return self.unpack(self.precondition(self.pack(tensors), damping, pi_correction))

    # ---- batching: the factor step is the wrapped blocks' family's, directions one at a time ----

    @classmethod
    def family(cls) -> type[CurvatureBlock]:
        return PriorBlock

    @classmethod
    def update_many(cls, blocks, stats, decay):
        inner = [b.inner for b in blocks]
        of = {id(b): s for b, s in zip(inner, stats)}
        return [pair for family, group in by_family(inner)
                for pair in family.update_many(group, [of[id(b)] for b in group], decay)]

    @classmethod
    def directions_many(cls, blocks, request):
        return [block.block_directions(request) for block in blocks]

    # ---- everything else is the wrapped block's -----------------------------------------------

    def pack(self, tensors: Sequence[Tensor | None]) -> Tensor:
        return self.inner.pack(tensors)

    def unpack(self, packed: Tensor) -> list[Tensor]:
        return self.inner.unpack(packed)

    def flatten(self, tensors):
        return self.inner.flatten(tensors)

    def split_flat(self, vector):
        return self.inner.split_flat(vector)

    def update(self, inputs, grads, *, decay, grad_scale):
        self.inner.update(inputs, grads, decay=decay, grad_scale=grad_scale)

    def factors(self):
        return self.inner.factors()

    def inverse_cost(self):
        return self.inner.inverse_cost()

    def ensure_factors(self):
        self.inner.ensure_factors()

    def factor_layout(self):
        return self.inner.factor_layout()

    def update_inverse(self, method, damping, pi_correction=False, warm=False):
        return self.inner.update_inverse(method, damping, pi_correction, warm)

    def decomposition_template(self, method):
        return self.inner.decomposition_template(method)

    def drop_decomposition(self):
        self.inner.drop_decomposition()

    def reset(self):
        self.inner.reset()

    def mv(self, tensors):
        return self.inner.mv(tensors)

    def quad_form(self, tensors):
        return self.inner.quad_form(tensors)

    def diagonal(self):
        return self.inner.diagonal()

    def to_dense(self):
        return self.inner.to_dense()

    def expected_shapes(self):
        return self.inner.expected_shapes()

    def state_dict(self):
        return self.inner.state_dict()

    def check_state_dict(self, state):
        self.inner.check_state_dict(state)

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)
