"""Forward/backward capture of a layer's inputs and output gradients for curvature estimates.

This is natgrad's only capture path: natgrad.KFAC, ``compute_fisher(structure="kfac")`` and EWC
all record layers through :class:`LayerCapture`.

A forward hook records the layer's input (a reference: autograd keeps it alive anyway) and its
output. With a :class:`GradientPhase`, a hook on the output tensor fills in the gradient when a
backward pass reaches it (KFAC); without one, the owner takes gradients of its own losses
w.r.t. ``Record.output`` with ``torch.autograd.grad`` (compute_fisher, EWC). Each forward call is
one record, so gradient accumulation over several backward passes, and a layer applied twice in
one forward, simply yield several records. Nothing is captured under torch.no_grad, when the
output does not require grad, in eval mode when ``training_only``, or when the owner says the
current step needs no statistics.

Under torch.compile (``fullgraph=True`` included) the hooks are traced into the model's graph:
whether a step collects statistics is a :class:`CaptureGate` flag (a bool that the compiled
graph guards on, so at most two graph variants, not one per step), and instead of a tensor hook
(which dynamo cannot compile on an intermediate tensor) the output passes through an identity
whose backward hands the input and the output gradient to the opaque op
``natgrad_capture::record_gradient`` (a call back into Python, so outside the ``natgrad``
namespace of the C++ math ops). It runs when the compiled backward reaches it and appends one
complete :class:`Record`, copying both tensors (a compiled graph may reuse their buffers).
Forward calls without a backward leave no record, as in eager mode.
"""
from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class Record:
    """One forward call of a layer: its input and, once backward reached it, ``grad_output``."""

    input: Tensor
    output: Tensor | None = None
    grad_output: Tensor | None = None


@dataclass
class GradientPhase:
    """Which backward passes fill ``grad_output``: all of them ("empirical"), or only the one
    run by the optimizer with labels sampled from the model ("mc").
    """

    fisher_type: str = "empirical"
    sampling: bool = False

    def accepts(self) -> bool:
        """Whether a gradient arriving now belongs to the Fisher being estimated."""
        return self.sampling if self.fisher_type == "mc" else not self.sampling


class CaptureGate:
    """Whether the hooks now collect statistics: a plain flag its owner sets before each step
    (natgrad.KFAC: on factor steps, off while a closure is re-evaluated). Called like the
    ``active`` callable it stands for; a compiled model guards on the flag's value.

    Example::

        gate = CaptureGate()
        capture = LayerCapture(layer, active=gate, phase=GradientPhase())
        gate.open = False  # the next forward records nothing
    """

    def __init__(self, open: bool = True) -> None:
        self.open = open

    def __call__(self) -> bool:
        """Whether the hooks record now."""
        return self.open


#: every live capture by its slot, the number a compiled graph hands back with a gradient
_CAPTURES: weakref.WeakValueDictionary[int, LayerCapture] = weakref.WeakValueDictionary()
_SLOTS = itertools.count()


@torch.library.custom_op("natgrad_capture::record_gradient", mutates_args=())
def _record_gradient(grad: Tensor, input: Tensor, slot: int, stream: str) -> None:
    capture = _CAPTURES.get(slot)
    if capture is not None:
        capture.receive(input, grad, stream)


@_record_gradient.register_fake
def _(grad: Tensor, input: Tensor, slot: int, stream: str) -> None:
    return None


# returns nothing: without this the compiled backward would drop the call as dead code
torch.fx.node.has_side_effect(torch.ops.natgrad_capture.record_gradient.default)


class _Tap(torch.autograd.Function):
    """The identity on a layer's output whose backward reports (input, output gradient)."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, input: Tensor, slot: int, stream: str,
                grad_view: Callable[[Tensor], Tensor] | None) -> Tensor:
        ctx.save_for_backward(input)
        ctx.slot, ctx.stream, ctx.grad_view = slot, stream, grad_view
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        (input,) = ctx.saved_tensors
        seen = grad if ctx.grad_view is None else ctx.grad_view(grad)
        torch.ops.natgrad_capture.record_gradient(seen, input, ctx.slot, ctx.stream)
        return grad, None, None, None, None


@dataclass
class LayerCapture:
    """Hooks on one module that collect :class:`Record` s while ``active()`` is true."""

    module: nn.Module
    active: Callable[[], bool]
    phase: GradientPhase | None = None
    training_only: bool = True
    records: list[Record] = field(default_factory=list)
    fired: bool = False  # whether the forward hook has ever captured (for describe())
    #: whether a forward call that would have been captured was not, because the module was in
    #: eval mode (since the last :meth:`clear`; natgrad.KFAC warns and ``describe()`` says so)
    in_eval: bool = False
    #: whether a compiled forward tapped an output since the last :meth:`clear` (its records
    #: arrive with the backward; the "mc" Fisher reaches them through the layer's parameters)
    tapped: bool = False

    def __post_init__(self) -> None:
        self.slot = next(_SLOTS)
        _CAPTURES[self.slot] = self
        self._install_hooks()

    def _install_hooks(self) -> None:
        self._handle = self.module.register_forward_hook(self._forward_hook)

    def _forward_hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if args and self.wants(module):
            followed = self.follow(args[0].detach(), output)
            return None if followed is output else followed  # eager: the output unchanged
        return None

    def wants(self, module: nn.Module) -> bool:
        """Whether a forward call of ``module`` now yields statistics (one that would but for
        eval mode sets :attr:`in_eval`).
        """
        if not (torch.is_grad_enabled() and self.active()):
            return False
        if self.training_only and not module.training:
            self.in_eval = True
            return False
        return True

    def track(self, input, output: Tensor,
              grad_view: Callable[[Tensor], Tensor] | None = None) -> Record | None:
        """Records one forward call: ``input`` (as the block expects it) and ``output``, whose
        gradient (through ``grad_view``, e.g. a transpose to the input's layout) fills
        ``grad_output`` when a backward pass of the current phase reaches it.
        """
        if not isinstance(output, Tensor) or not output.requires_grad:
            return None
        record = Record(input=input, output=output)
        self.records.append(record)
        self.fired = True
        phase = self.phase
        if phase is None:
            return record

        def on_grad(grad: Tensor) -> None:
            if record.grad_output is None and phase.accepts():
                record.grad_output = grad.detach() if grad_view is None else grad_view(grad.detach())
                record.output = None  # only sample_fisher needs it, and only before backward

        output.register_hook(on_grad)
        return record

    def follow(self, input, output: Tensor, grad_view: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Records one forward call as :meth:`track` does and returns the tensor the forward
        goes on with: ``output`` itself, or under torch.compile (with a gradient phase) an
        identity of it whose backward fills the record (see the module docstring). ``input``
        may be ``(stream, tensor)`` (attention's in-projection).
        """
        if not (torch.compiler.is_compiling() and self.phase is not None):
            self.track(input, output, grad_view)
            return output
        if not isinstance(output, Tensor) or not output.requires_grad:
            return output
        stream, tensor = input if isinstance(input, tuple) else ("", input)
        self.tapped = True
        return _Tap.apply(output, tensor, self.slot, stream, grad_view)

    def receive(self, input: Tensor, grad_output: Tensor, stream: str = "") -> None:
        """A compiled backward's (input, output gradient) of one call: a complete record, of
        copies (the compiled graph may reuse both buffers), when the gradient belongs to the
        phase's Fisher. ``stream`` names attention's in-projection stream ("" for none).
        """
        if self.phase is not None and self.phase.accepts():
            kept: Any = (stream, input.clone()) if stream else input.clone()  # as attention tracks it
            self.records.append(Record(input=kept, grad_output=grad_output.clone()))
            self.fired = True

    def complete(self) -> list[Record]:
        """Records whose gradient arrived (a forward without backward is ignored)."""
        return [r for r in self.records if r.grad_output is not None]

    def clear(self) -> None:
        """Drops every record and the eval-mode and tapped flags (called once per optimizer step)."""
        self.records.clear()
        self.in_eval = False
        self.tapped = False

    def remove(self) -> None:
        """Removes the hook; the capture never fires again."""
        self._handle.remove()
        self.records.clear()
        _CAPTURES.pop(self.slot, None)


@contextmanager
def capturing(modules: dict[str, nn.Module]) -> Iterator[dict[str, LayerCapture]]:
    """Records every forward call of ``modules`` (any mode, while grad is enabled) for the
    duration of the block; gradients are the caller's (``torch.autograd.grad`` w.r.t.
    ``Record.output``). The hooks are removed on exit.
    """
    captures = {name: LayerCapture(m, active=lambda: True, training_only=False)
                for name, m in modules.items()}
    try:
        yield captures
    finally:
        for capture in captures.values():
            capture.remove()
