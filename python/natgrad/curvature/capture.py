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
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

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

    def __post_init__(self) -> None:
        self._handle = self.module.register_forward_hook(self._forward_hook)

    def _forward_hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if args and self.wants(module):
            self.track(args[0].detach(), output)

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

    def complete(self) -> list[Record]:
        """Records whose gradient arrived (a forward without backward is ignored)."""
        return [r for r in self.records if r.grad_output is not None]

    def clear(self) -> None:
        """Drops every record and the eval-mode flag (called once per optimizer step)."""
        self.records.clear()
        self.in_eval = False

    def remove(self) -> None:
        """Removes the hook; the capture never fires again."""
        self._handle.remove()
        self.records.clear()


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
