"""Which curvature block handles which module, and why a module falls back when none does: the
lookups of :mod:`natgrad.curvature.layers` that natgrad.fisher and EWC share.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from natgrad.curvature.kron import KroneckerBlock
from natgrad.curvature.layers import kind_of

#: why a module whose parameters are optimized only in part gets no block of its own
PARTIAL = "only some of its parameters are optimized"


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module`` (of a registered type) cannot get its kind's block, or None if it can."""
    kind = kind_of(module)
    return None if kind is None else kind.unsupported_reason(module)


def make_block(name: str, module: nn.Module, *, linear_approx: str = "expand",
               factor_dtype: torch.dtype | None = None,
               inverse_dtype: torch.dtype | None = None) -> KroneckerBlock | None:
    """The block of ``module``'s kind when it is fed by the module's own hooks (see
    :attr:`LayerKind.standalone <natgrad.curvature.layers.LayerKind>`), or None.
    """
    kind = kind_of(module)
    if kind is None or not kind.standalone:
        return None
    block = kind.block(name, module, approx=linear_approx, factor_dtype=factor_dtype, inverse_dtype=inverse_dtype)
    return cast(KroneckerBlock, block)  # a standalone kind's block is fed like a Kronecker block


def kronecker_block(name: str, module: nn.Module | None, params: Sequence[nn.Parameter],
                    **kwargs) -> tuple[KroneckerBlock | None, str | None]:
    """The Kronecker block of ``module`` when ``params`` (the caller's parameters of this
    module, in order) are exactly the ones it covers; otherwise ``(None, reason)``. ``kwargs`` go
    to :func:`make_block`.
    """
    if module is None:
        return None, "not owned by any module"
    block = make_block(name, module, **kwargs)
    if block is None:
        return None, f"{type(module).__name__} has no Kronecker block"
    reason = unsupported_reason(module)
    if reason is not None:
        return None, reason
    if [id(p) for p in params] != [id(p) for p in block.params]:
        return None, PARTIAL
    return block, None


def owner_groups(model: nn.Module, params: Sequence[nn.Parameter]) -> list[tuple[str, nn.Module | None, list[int]]]:
    """Consecutive runs of parameter indices that belong to the same module:
    ``(module name, module, indices)``.
    """
    owner = {id(p): (n, m) for n, m in model.named_modules() for p in m.parameters(recurse=False)}
    groups: list[tuple[str, nn.Module | None, list[int]]] = []
    for i, p in enumerate(params):
        name, module = owner.get(id(p), ("", None))
        if groups and groups[-1][1] is module and module is not None:
            groups[-1][2].append(i)
        else:
            groups.append((name, module, [i]))
    return groups
