"""Hugging Face transformers' ``Conv1D`` (GPT-2, GPT-J's ancestors, DistilGPT-2...): a linear
layer that stores its weight transposed, ``[in, out]``, and computes ``y = x @ W + b``.

Its Fisher block is an nn.Linear's with the weight transposed, so its kind reuses the Linear
block, rows and diagonal Fisher and packs ``Wᵀ``. natgrad registers it by itself the first time
it meets a ``Conv1D`` (:func:`natgrad.curvature.layers.kind_of` looks the class up by its qualified
name, so ``import natgrad`` does not import transformers); calling :func:`register` does the same
explicitly::

    import natgrad
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2)).train()
    optimizer = natgrad.KFAC(model)  # c_attn, c_proj, c_fc: "K-FAC gpt2_conv1d" in describe()
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from torch import Tensor, nn
from typing_extensions import override

from natgrad.curvature.block import CurvatureBlock
from natgrad.curvature.layers import LinearBlock, LinearKind, register_layer
from natgrad.integrations import require

__all__ = ["Conv1DBlock", "Conv1DKind", "register"]


class Conv1DBlock(LinearBlock):
    """The Kronecker block of a ``Conv1D``: a LinearBlock over ``[Wᵀ, b]``."""

    kind = "gpt2_conv1d"

    def features(self) -> tuple[int, int]:
        """``(in_features, out_features)``, read from the weight ``[in, out]``."""
        return tuple(self.weight.shape)  # type: ignore[return-value]

    @property
    @override
    def description(self) -> str:
        return f"{self.method} linear, transposed weight ({self.approx}){self.split_note()}"

    @classmethod
    def family(cls) -> type[CurvatureBlock]:
        """Served one block at a time: the list ops read the weight as ``[out, in]``."""
        return CurvatureBlock

    @override
    def pack(self, tensors: Sequence[Tensor | None]) -> Tensor:
        w, *rest = tensors
        return super().pack([None if w is None else w.T, *rest])

    @override
    def unpack(self, packed: Tensor) -> list[Tensor]:
        w = packed[:, :self.weight.shape[0]].T
        return [w] if self.bias is None else [w, packed[:, -1]]


class Conv1DKind(LinearKind):
    """The layer kind of transformers' ``Conv1D`` (see the module docstring)."""

    name = "gpt2_conv1d"

    @override
    def features(self, module: nn.Module) -> tuple[int, int]:
        weight = cast(Tensor, module.weight)
        return weight.shape[0], weight.shape[1]

    @override
    def block(self, name, module, *, approx="expand", factor_dtype=None, inverse_dtype=None):
        return Conv1DBlock(name, module, approx=approx, factor_dtype=factor_dtype, inverse_dtype=inverse_dtype)

    @override
    def rows_mv(self, module, x, g, weight, bias):
        return super().rows_mv(module, x, g, weight.T, bias)

    @override
    def rows_tmv(self, module, x, g, w, index, chunk):  # the weight's parts come [out, in]
        for i, where, part in super().rows_tmv(module, x, g, w, index, chunk):
            yield (i, (slice(None), *where), part.T) if i == index[0] else (i, where, part)

    @override
    def diagonal_fisher(self, module, x, g):
        weight, *rest = super().diagonal_fisher(module, x, g)
        return [weight.T, *rest]


def register() -> None:
    """Registers :class:`Conv1DKind` for ``transformers.pytorch_utils.Conv1D`` (natgrad does it
    by itself when it first meets one; see the module docstring).
    """
    pytorch_utils = require("transformers.pytorch_utils", "transformers", "natgrad.integrations.transformers")
    register_layer(pytorch_utils.Conv1D, Conv1DKind())
