"""Which K-FAC block handles which module, and why a module falls back when none does."""
from __future__ import annotations

from torch import nn

from natgrad.curvature.kron import Conv2dBlock, EmbeddingBlock, KronBlock, LinearBlock


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module`` (of a registered type) cannot get a Kronecker block, or None if it can."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups})"
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            return f"padding={module.padding!r}, padding_mode={module.padding_mode!r}"
    if isinstance(module, nn.Embedding):
        if module.sparse:
            return "sparse gradients"
        if module.max_norm is not None:
            return "max_norm renormalises weights in forward"
    return None


def make_block(name: str, module: nn.Module, *, linear_approx: str, factor_dtype=None,
               inverse_dtype=None) -> KronBlock | None:
    """A Kronecker block for ``module``, or None when its type is not supported."""
    if isinstance(module, nn.Linear):
        # Includes nn.MultiheadAttention.out_proj, whose forward is never called (its weight is
        # used functionally): it falls back to the plain gradient while its hooks never fire.
        return LinearBlock(name, module, approx=linear_approx, factor_dtype=factor_dtype,
                           inverse_dtype=inverse_dtype)
    if isinstance(module, nn.Conv2d):
        return Conv2dBlock(name, module, factor_dtype=factor_dtype, inverse_dtype=inverse_dtype)
    if isinstance(module, nn.Embedding):
        return EmbeddingBlock(name, module, factor_dtype=factor_dtype, inverse_dtype=inverse_dtype)
    return None
