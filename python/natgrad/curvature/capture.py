"""Forward/backward capture of a layer's inputs and output gradients for curvature estimates.

A forward hook records the layer's input (a reference: autograd keeps it alive anyway) and
registers a hook on the output tensor that fills in the gradient when a backward pass reaches
it. Each forward call is one record, so gradient accumulation over several backward passes,
and a layer applied twice in one forward, simply yield several records. Nothing is captured in
eval mode, under torch.no_grad, or when the owner says the current step needs no statistics.
"""
from __future__ import annotations

from collections.abc import Callable
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
    run by the optimizer with labels sampled from the model ("mc")."""

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
    phase: GradientPhase
    records: list[Record] = field(default_factory=list)
    fired: bool = False  # whether the forward hook has ever captured (for describe())

    def __post_init__(self) -> None:
        self._handle = self.module.register_forward_hook(self._forward_hook)

    def _forward_hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if not (module.training and torch.is_grad_enabled() and self.active()):
            return
        if not args or not isinstance(output, Tensor) or not output.requires_grad:
            return
        record = Record(input=args[0].detach(), output=output)
        self.records.append(record)
        self.fired = True

        def on_grad(grad: Tensor) -> None:
            if record.grad_output is None and self.phase.accepts():
                record.grad_output = grad.detach()
                record.output = None  # only sample_fisher needs it, and only before backward

        output.register_hook(on_grad)

    def complete(self) -> list[Record]:
        """Records whose gradient arrived (a forward without backward is ignored)."""
        return [r for r in self.records if r.grad_output is not None]

    def clear(self) -> None:
        """Drops every record (called once per optimizer step)."""
        self.records.clear()

    def remove(self) -> None:
        """Removes the hook; the capture never fires again."""
        self._handle.remove()
        self.records.clear()
