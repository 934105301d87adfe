"""Which curvature block handles which module, and why a module falls back when none does: the
lookups of :mod:`natgrad.curvature.layers` that natgrad.KFAC, natgrad.fisher and EWC share.

Tied weights. A parameter owned directly by several modules (GPT-2's ``lm_head.weight`` *is*
``transformer.wte.weight``) gets one block, that of one owner chosen by
:func:`parameter_owners`; the other owners neither get a block for it nor capture anything for
it. The rule: the first owner, in ``model.named_modules()`` order, whose layer kind does not
assume a sparse gradient (:attr:`LayerKind.sparse_gradient
<natgrad.curvature.layers.LayerKind>`); when every owner's kind does, the first owner. Why: an
Embedding block's activation factor is the frequency of each looked-up token, so it presumes the
gradient is zero in the rows of tokens the batch did not contain, and its preconditioner divides
those rows by the damping alone. A tied output projection gives every row a gradient through the
softmax, so the Embedding block would blow those rows up; the output projection's Linear block
sees the dense gradient of every token and is the better Fisher approximation of the shared
weight (its statistics miss only the embedding's use, which is sparse). Its cost: ``G`` is
``vocab × vocab``. Naming the owner in ``skip_modules`` leaves the tied weight on the plain
gradient (the other owners do not take it over: their blocks are the wrong model of it).
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


def parameter_users(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """Every module that owns each parameter directly (``id(p) -> [(name, module), ...]``, in
    ``model.named_modules()`` order): more than one for a tied weight.
    """
    users: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            users.setdefault(id(p), []).append((name, module))
    return users


def _sparse(module: nn.Module) -> bool:
    kind = kind_of(module)
    return kind is not None and kind.sparse_gradient


def parameter_owners(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """The one module whose block covers each parameter (``id(p) -> (name, module)``): its only
    owner, or for a tied weight the owner the rule in the module docstring picks (the first, in
    ``named_modules()`` order, whose kind models a dense gradient; else the first).
    """
    owners = {}
    for key, users in parameter_users(model).items():
        owners[key] = next((u for u in users if not _sparse(u[1])), users[0])
    return owners


def owner_groups(model: nn.Module, params: Sequence[nn.Parameter]) -> list[tuple[str, nn.Module | None, list[int]]]:
    """Consecutive runs of parameter indices that belong to the same module:
    ``(module name, module, indices)`` (a tied weight belongs to the owner
    :func:`parameter_owners` picks).
    """
    owner = parameter_owners(model)
    groups: list[tuple[str, nn.Module | None, list[int]]] = []
    for i, p in enumerate(params):
        name, module = owner.get(id(p), ("", None))
        if groups and groups[-1][1] is module and module is not None:
            groups[-1][2].append(i)
        else:
            groups.append((name, module, [i]))
    return groups
