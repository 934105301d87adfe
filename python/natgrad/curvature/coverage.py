"""What ``KFAC.describe()`` says about each parameter's curvature, and why a block gets none.

:class:`Coverage` is the estimator's record of it: the block each tied weight got and who shares
it (:func:`natgrad.curvature.registry.parameter_owners`), whether a factor step has run yet (before
the first, every block is reported as *planned*, from the module types alone), and which blocks
the latest factor step left without statistics because their module ran in eval mode (warned
about once, naming ``model.train()``: a model loaded with ``from_pretrained()`` starts there).
"""
from __future__ import annotations

import warnings

from torch import nn

from natgrad.curvature.block import CurvatureBlock
from natgrad.curvature.capture import LayerCapture
from natgrad.curvature.registry import parameter_owners, parameter_users

#: a block whose hooks never fired after a factor step ran in training mode
UNFIRED = "plain gradient until its hooks fire (none so far: is the layer used functionally?)"


def tie_note(users: list[tuple[str, nn.Module]], owner: tuple[str, nn.Module]) -> str:
    """What ``describe()`` adds for a weight tied between ``users``: whose block it has and who
    shares it.
    """
    others = ", ".join(f"{type(m).__name__} {n!r}" for n, m in users if m is not owner[1])
    return (f"tied weight: the block of {type(owner[1]).__name__} {owner[0]!r}, shared by {others} "
            "(no statistics captured there; see natgrad.curvature.registry)")


class Coverage:
    """The estimator's account of each parameter's treatment (see the module docstring).

    Args:
        model (nn.Module): the model whose tied weights are noted.
    """

    def __init__(self, model: nn.Module) -> None:
        owners = parameter_owners(model)
        #: the note of each tied weight, by ``id``
        users = {key: u for key, u in parameter_users(model).items() if len(u) > 1}
        self.tied = {key: tie_note(u, owners[key]) for key, u in users.items()}
        #: modules that share a tied weight's block without holding it (checkpoints saved before
        #: ties had one owner hold a block for them, which loading ignores)
        self.yielded = {n for key, u in users.items() for n, m in u if m is not owners[key][1]}
        self.factor_steps = 0
        #: the blocks the latest factor step got nothing for because their module was in eval mode
        self.in_eval: set[str] = set()
        self._warned = False

    def factor_step(self, captures: dict[str, LayerCapture]) -> None:
        """Called at each factor step before the records are used: notes the blocks starved by
        eval mode (their module skipped a forward because ``module.training`` was False, and no
        training-mode call filled them) and warns once.
        """
        self.factor_steps += 1
        modules = {id(c.module) for c in captures.values() if c.in_eval}
        self.in_eval = {name for name, c in captures.items() if id(c.module) in modules and not c.complete()}
        if self.in_eval and not self._warned:
            self._warned = True
            names = sorted(self.in_eval)
            shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            warnings.warn(f"natgrad.KFAC: no curvature was collected for {shown}: the modules ran in eval mode "
                          "(module.training is False) in this step's forward pass, and K-FAC captures "
                          "training-mode forwards only, so they take the plain gradient. Call model.train() "
                          "before training (a model loaded with from_pretrained() starts in eval mode). "
                          "This warning is shown once.", UserWarning, stacklevel=6)

    def block_treatment(self, block: CurvatureBlock, capture: LayerCapture) -> str:
        """How ``block``'s parameters are preconditioned now: its curvature once its hooks fired,
        the plain gradient with the cause before, or the planned block before any factor step.
        """
        untraced = getattr(capture, "reason", None)
        if untraced is not None:
            return f"plain gradient: {untraced}"
        if capture.fired or block.has_factors:
            return block.description
        if block.name in self.in_eval:
            return (f"plain gradient: its module ran in eval mode, so nothing was captured (call "
                    f"model.train(); then {block.description})")
        if not self.factor_steps:
            traced = hasattr(capture, "reason")  # a free parameter's use is known only once traced
            return (f"{block.description} (planned: from the first training-mode step"
                    + (", if its uses can be traced, else the plain gradient)" if traced else ")"))
        return UNFIRED

    def with_tie(self, key: int, text: str) -> str:
        """``text`` plus the tie note of the parameter ``key`` (its ``id``), if it is tied."""
        tied = self.tied.get(key)
        return text if tied is None else f"{text}; {tied}"
