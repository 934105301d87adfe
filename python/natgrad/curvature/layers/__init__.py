"""Layer kinds: one module per layer type, holding everything natgrad knows about it.

A module's kind is looked up by its type (the most derived registered class in its MRO, so a
subclass of nn.Linear is a Linear unless registered otherwise). natgrad.KFAC, NaturalGradient,
natgrad.fisher and EWC ask the kind, never the layer class:

* :mod:`~natgrad.curvature.layers.linear`: nn.Linear;
* :mod:`~natgrad.curvature.layers.conv1d`: nn.Conv1d;
* :mod:`~natgrad.curvature.layers.conv2d`: nn.Conv2d;
* :mod:`~natgrad.curvature.layers.embedding`: nn.Embedding;
* :mod:`~natgrad.curvature.layers.attention`: nn.MultiheadAttention.

Layer types of other libraries that natgrad knows (:data:`KNOWN_LAYERS`: Hugging Face's GPT-2
``Conv1D``) are registered the first time :func:`kind_of` meets one, by importing the natgrad
module that holds their kind; ``import natgrad`` imports none of those libraries.

Add a layer type with :func:`register_layer`. The interface is :class:`LayerKind`
(:mod:`natgrad.curvature.layers.base`).
"""
from __future__ import annotations

import importlib

from torch import nn

from natgrad.curvature.layers.attention import AttentionBlock, AttentionKind
from natgrad.curvature.layers.base import FALLBACKS, LayerKind
from natgrad.curvature.layers.conv1d import Conv1dBlock, Conv1dKind
from natgrad.curvature.layers.conv2d import Conv2dBlock, Conv2dKind
from natgrad.curvature.layers.embedding import EmbeddingBlock, EmbeddingKind
from natgrad.curvature.layers.linear import LinearBlock, LinearKind

__all__ = ["AttentionBlock", "Conv1dBlock", "Conv2dBlock", "EmbeddingBlock", "LayerKind", "LinearBlock",
           "kind_of", "register_layer", "registered_layers"]

_KINDS: dict[type[nn.Module], LayerKind] = {}

#: third-party layer classes natgrad has a kind for, by qualified class name: the natgrad module
#: whose ``register()`` registers it (imported only when such a module is met)
KNOWN_LAYERS = {"transformers.pytorch_utils.Conv1D": "natgrad.integrations.transformers"}


def register_layer(module_type: type[nn.Module], kind: LayerKind) -> None:
    """Makes natgrad treat every module of ``module_type`` (and of its subclasses, unless they are
    registered themselves) as ``kind``: natgrad.KFAC gives it ``kind.block(...)``,
    NaturalGradient forms its per-sample gradient rows implicitly when the kind can, and
    natgrad.fisher's "kfac" structure and EWC use its block. Registering a type again replaces
    its kind. Unregistered modules keep natgrad's generic treatment (exact per-sample diagonal
    curvature or traced free parameters in KFAC, explicit rows in NaturalGradient).

    Example: a layer that stores its weight transposed, ``[in, out]`` (``y = x @ W + b``), has an
    nn.Linear's Fisher with the weight transposed. :mod:`natgrad.integrations.transformers` holds
    such a kind, written for Hugging Face's GPT-2 ``Conv1D`` (which natgrad registers by itself,
    see :data:`KNOWN_LAYERS`): it reuses the Linear block, rows and diagonal Fisher and packs
    ``Wᵀ``. A layer of your own with the same layout can take it::

        import natgrad
        from natgrad.integrations.transformers import Conv1DKind

        natgrad.curvature.register_layer(MyTransposedLinear, Conv1DKind())
        optimizer = natgrad.KFAC(model)  # every MyTransposedLinear now gets a Kronecker block

    Register before constructing the optimizer (blocks are chosen then). A kind that leaves out
    the rows methods gets explicit rows in NaturalGradient, and one without
    :meth:`LayerKind.diagonal_fisher` gets torch.func per-sample gradients in diagonal EWC.

    Args:
        module_type (type): an nn.Module subclass.
        kind (LayerKind): what natgrad knows about it (see :class:`LayerKind`).

    Raises:
        TypeError: ``module_type`` is not an nn.Module subclass or ``kind`` not a LayerKind.
        ValueError: ``kind.fallback`` is not one of "per_sample", "plain".
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_layer: module_type must be an nn.Module subclass, got {module_type!r}")
    if not isinstance(kind, LayerKind):
        raise TypeError(f"register_layer: kind must be a natgrad.curvature.LayerKind, got {type(kind).__name__}")
    if kind.fallback not in FALLBACKS:
        raise ValueError(f"register_layer: kind.fallback must be one of {FALLBACKS}, got {kind.fallback!r}")
    _KINDS[module_type] = kind


def kind_of(module: nn.Module) -> LayerKind | None:
    """The kind of ``module`` (its most derived registered class), or None when there is none.
    A class of :data:`KNOWN_LAYERS` is registered on first sight.
    """
    for cls in type(module).__mro__:
        kind = _KINDS.get(cls)
        if kind is not None:
            return kind
        known = KNOWN_LAYERS.get(f"{cls.__module__}.{cls.__qualname__}")
        if known is not None:
            importlib.import_module(known).register()
            return _KINDS.get(cls)
    return None


def registered_layers() -> dict[type[nn.Module], LayerKind]:
    """A copy of the registry: module type -> kind."""
    return dict(_KINDS)


register_layer(nn.Linear, LinearKind())
register_layer(nn.Conv1d, Conv1dKind())
register_layer(nn.Conv2d, Conv2dKind())
register_layer(nn.Embedding, EmbeddingKind())
register_layer(nn.MultiheadAttention, AttentionKind())
