"""Capture for parameters a module uses functionally (positional embeddings, class tokens,
layer scales): the per-sample gradients behind :class:`~natgrad.curvature.diagonal.FreeParameterBlock`.

A parameter's ``.grad`` is already summed over the batch, so per-sample gradients have to be
taken where the parameter meets the batch. While its owner's forward runs (on steps that
update statistics, in training, with grad enabled), a ``TorchFunctionMode`` watches the torch
calls that receive the parameter:

* index-preserving calls (slicing, ``view``/``reshape``, ``transpose``, ``unsqueeze``,
  ``chunk``, ``to``...) are replayed on a tensor of the parameter's flat indices, so every
  element of the result knows which parameter element it is;
* a broadcasting ``add``/``sub`` or ``expand``/``broadcast_to`` and a broadcasting ``mul`` are
  *uses*: their output's gradient, reduced over the broadcast dimensions (the first one is the
  sample dimension, the others weight-sharing positions), is the per-sample gradient
  (for ``mul`` after multiplying by the other operand); a tensor hook records it.

Any other call that receives the parameter (a matmul, an arithmetic op without broadcast)
makes it untraceable: its block is left without statistics, so it follows the plain gradient,
and ``reason`` says which call did it. Two uses of one parameter in a forward are treated as
independent records (their cross terms are dropped, as K-FAC does for a layer applied twice).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from typing_extensions import override

from natgrad.curvature.capture import LayerCapture

#: why a traced parameter of a compiled model takes the plain gradient
UNTRACED_COMPILED = ("used functionally by a model under torch.compile, where its uses cannot be "
                     "traced (an eager forward traces it again)")

_SAME = {"to", "type", "float", "double", "half", "bfloat16", "contiguous", "clone", "requires_grad_"}
_VIEWS = {"__getitem__", "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "unsqueeze",
          "squeeze", "narrow", "select", "flatten", "unflatten", "chunk", "split", "unbind", "movedim",
          "index_select", "t", "swapaxes", "swapdims", "expand_dims"}
_SHIFTS = {"add", "__add__", "__radd__", "__iadd__", "sub", "__sub__", "__rsub__", "__isub__",
           "expand", "expand_as", "broadcast_to"}
_SCALES = {"mul", "__mul__", "__rmul__", "__imul__"}


@dataclass
class Use:
    """Where a parameter (through ``index``: the parameter's flat index of each element of the
    used tensor) met the batch: the output's sample dim, its weight-sharing dims, and for a
    ``mul`` the other operand.
    """

    index: Tensor
    sample_dim: int
    position_dims: tuple[int, ...]
    out_shape: tuple[int, ...]
    other: Tensor | None = None
    alpha: float = 1.0

    @property
    def samples(self) -> int:
        """Samples of the use (the size of its sample dim)."""
        return self.out_shape[self.sample_dim]

    @property
    def rows(self) -> int:
        """Samples × weight-sharing positions."""
        return self.samples * int(torch.Size([self.out_shape[d] for d in self.position_dims]).numel())

    def contributions(self, grad: Tensor) -> Tensor:
        """``[samples, positions, k]``: each sample's and position's gradient of the used tensor
        (``k`` its elements, in ``index`` order).
        """
        c = grad if self.other is None else grad * self.other.to(grad.dtype)
        c = c * self.alpha if self.alpha != 1.0 else c
        c = c.expand(self.out_shape)
        rest = [d for d in range(len(self.out_shape)) if d != self.sample_dim and d not in self.position_dims]
        c = c.permute(self.sample_dim, *self.position_dims, *rest)
        return c.reshape(self.samples, -1, self.index.numel())


def _flat(args: Any, kwargs: dict) -> list:
    out: list = []
    for a in list(args) + list(kwargs.values()):
        out.extend(a if isinstance(a, (list, tuple)) else [a])
    return out


def _replace(value: Any, tensor: Tensor, index: Tensor) -> Any:
    if value is tensor:
        return index
    if isinstance(value, (list, tuple)):
        return type(value)(_replace(v, tensor, index) for v in value)
    return value


class _Tracer(TorchFunctionMode):
    def __init__(self, owner: FreeParameterCapture) -> None:
        super().__init__()
        self.owner = owner
        # id -> (tensor kept alive, parameter name, flat indices of the parameter per element)
        self.derived: dict[int, tuple[Tensor, str, Tensor]] = {}
        self.skipped: set[str] = set()  # parameters whose statistics this forward drops
        for name, (param, capture) in owner.sinks.items():
            if capture.reason is None:
                index = torch.arange(param.numel(), device=param.device).view(param.shape)
                self.derived[id(param)] = (param, name, index)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.derived:
            return out
        hits = [a for a in _flat(args, kwargs) if isinstance(a, Tensor) and id(a) in self.derived]
        for tensor in hits:
            self._on_use(func, tensor, args, kwargs, out)
        return out

    def _on_use(self, func, tensor: Tensor, args, kwargs, out) -> None:
        _, name, index = self.derived[id(tensor)]
        capture = self.owner.sinks[name][1]
        op = getattr(func, "__name__", str(func))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if capture.reason is not None or not any(isinstance(o, Tensor) and o.requires_grad for o in outs):
            return  # shape queries, detach, no-grad work: no gradient reaches the parameter
        if op in _SAME or op in _VIEWS:
            indices: Sequence[Any]
            if op in _SAME:
                indices = (index,) * len(outs)
            else:
                moved = func(*_replace(args, tensor, index),
                             **{k: _replace(v, tensor, index) for k, v in kwargs.items()})
                indices = moved if isinstance(moved, (tuple, list)) else (moved,)
            for o, i in zip(outs, indices):
                if isinstance(o, Tensor) and o.requires_grad:
                    self.derived[id(o)] = (o, name, i)
            return
        if name in self.skipped:
            return
        if (op in _SHIFTS or op in _SCALES) and isinstance(out, Tensor) and out.requires_grad:
            use = self._broadcast(op, tensor, index, args, kwargs, out)
            if use == "batch of one?":  # [1, T, d] + [1, T, d]: this forward yields no statistics
                self.skipped.add(name)
                capture.records.clear()
                return
            if use is not None:
                capture.track(use, out)
                return
        capture.fail(f"used by {op}{tuple(out.shape) if isinstance(out, Tensor) else ''}, "
                     "which the diagonal block cannot trace")

    def _broadcast(self, op, tensor, index, args, kwargs, out) -> Use | str | None:
        lead = out.dim() - tensor.dim()
        if lead < 0:
            return None
        shape = (1,) * lead + tuple(tensor.shape)
        dims = [d for d in range(out.dim()) if d < lead or (shape[d] == 1 and out.shape[d] > 1)]
        if not dims:  # no batch dimension met: arithmetic on the parameter itself, or a batch of one
            return "batch of one?" if 1 in shape else None
        other = None
        if op in _SCALES:
            operands = [a for a in args if a is not tensor]
            if len(operands) != 1:
                return None
            other = operands[0].detach() if isinstance(operands[0], Tensor) else None
            if other is None:
                return None
        alpha = kwargs.get("alpha", 1.0)
        return Use(index=index, sample_dim=dims[0], position_dims=tuple(dims[1:]),
                   out_shape=tuple(out.shape), other=other, alpha=float(alpha))


class FreeParameterCapture:
    """Traces the forward of ``owner`` for its parameters ``params`` (name -> parameter) and
    feeds one :class:`LayerCapture`-like sink per parameter (see the module docstring).
    """

    def __init__(self, owner: nn.Module, active, phase) -> None:
        self.owner = owner
        self.active, self.phase = active, phase
        self.sinks: dict[str, tuple[nn.Parameter, ParameterSink]] = {}
        self._mode: _Tracer | None = None
        self._handles = [owner.register_forward_pre_hook(self._enter),
                         owner.register_forward_hook(self._exit, always_call=True)]

    def sink(self, name: str, param: nn.Parameter) -> ParameterSink:
        """The capture of one parameter (made once)."""
        if name not in self.sinks:
            self.sinks[name] = (param, ParameterSink(self.owner, self.active, self.phase, parent=self))
        return self.sinks[name][1]

    def _enter(self, module: nn.Module, args: tuple) -> None:
        if self._mode is not None or not self.sinks:
            return
        first = next(iter(self.sinks.values()))[1]
        if torch.compiler.is_compiling():  # a TorchFunctionMode cannot be traced into a graph
            if first.wants(module):
                for _, sink in self.sinks.values():
                    if sink.reason is None:
                        sink.fail(UNTRACED_COMPILED)
            return
        if first.wants(module):
            for _, sink in self.sinks.values():
                if sink.reason == UNTRACED_COMPILED:  # run eagerly again: traced again
                    sink.reason = None
            self._mode = _Tracer(self)
            self._mode.__enter__()

    def _exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)

    def release(self, sink: ParameterSink) -> None:
        """Called by a sink's ``remove``; the hooks go with the last sink."""
        self.sinks = {n: (p, s) for n, (p, s) in self.sinks.items() if s is not sink}
        if not self.sinks:
            for handle in self._handles:
                handle.remove()


@dataclass(eq=False)
class ParameterSink(LayerCapture):
    """The records of one traced parameter (no hooks of its own); ``reason`` is set once a use
    cannot be traced.
    """

    parent: FreeParameterCapture | None = None
    reason: str | None = None

    def _install_hooks(self) -> None:  # the parent's hooks fill the records
        pass

    def fail(self, reason: str) -> None:
        """Marks the parameter untraceable: its records are dropped, now and later."""
        self.reason = reason
        self.records.clear()

    @override
    def complete(self):
        return [] if self.reason is not None else super().complete()

    @override
    def remove(self) -> None:
        self.records.clear()
        if self.parent is not None:
            self.parent.release(self)
