"""Avalanche (continual learning) plugins: natgrad.EWC as a regulariser and natgrad.KFAC as the
strategy's optimizer.

Importing this module imports ``avalanche.training`` (``pip install avalanche-lib``)::

    import natgrad
    from avalanche.training import Naive
    from natgrad.integrations.avalanche import EWCPlugin, KFACPlugin

    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     train_mb_size=64, train_epochs=2,
                     plugins=[KFACPlugin(lr=0.05, damping=1e-2),  # the optimizer becomes natgrad.KFAC
                              EWCPlugin(lambda_=100.0, structure="kfac")])  # attached to it
    for experience in benchmark.train_stream:
        strategy.train(experience)

natgrad.KFAC as Avalanche's optimizer. Avalanche calls ``optimizer.zero_grad()``, the model,
``loss.backward()`` and ``optimizer.step()`` in that order, as K-FAC needs; before each experience
``make_optimizer`` may reset ``optimizer.state`` (K-FAC's momentum buffers; its curvature lives in
its hooks' estimator and survives) and appends the parameters a dynamic model grew to group 0,
which a K-FAC built for the old model has no block for. So ``Naive(optimizer=natgrad.KFAC(model))``
works for a model whose parameters stay the same, and :class:`KFACPlugin` covers every model: it
builds a natgrad.KFAC for ``strategy.model`` before the first experience, and builds a new one
(the old one's hooks removed) whenever the model's trainable parameters change.

natgrad.EWC as a plugin (:class:`EWCPlugin`): the penalty is added to ``strategy.loss`` before
every backward pass, and each experience is consolidated after it is trained (a per-sample
Fisher, unlike Avalanche's own EWCPlugin, which squares mini-batch mean gradients). When the
strategy's optimizer is a natgrad.KFAC, the plugin attaches the EWC to it
(:meth:`natgrad.EWC.attach`: K-FAC then preconditions with ``F_task + λ·F_old``), re-attaching
when :class:`KFACPlugin` replaces the optimizer; ``attach=None`` turns that off.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from natgrad.integrations import require
from natgrad.optim import KFAC
from natgrad.regularizers import EWC

_plugins = require("avalanche.training.plugins", "avalanche-lib", "natgrad.integrations.avalanche")
SupervisedPlugin: Any = _plugins.SupervisedPlugin

__all__ = ["EWCPlugin", "KFACPlugin"]


def _trainable(model: nn.Module) -> list[int]:
    return [id(p) for p in model.parameters() if p.requires_grad]


class KFACPlugin(SupervisedPlugin):
    """Makes natgrad.KFAC the optimizer of the strategy it is plugged into (see the module
    docstring): built for ``strategy.model`` before the first experience and rebuilt when the
    model's trainable parameters change (a grown head, a replaced model).

    Example::

        strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                         plugins=[KFACPlugin(lr=0.05, damping=1e-2, kl_clip=1e-2)])

    Args:
        **kfac_options: keyword arguments of :class:`natgrad.KFAC` (checked now: a bad value
            raises its ValueError here, not at the first experience).
    """

    def __init__(self, **kfac_options: Any) -> None:
        super().__init__()
        probe = nn.Linear(1, 1)
        KFAC(probe, **kfac_options).remove_hooks()  # validates the options
        self.kfac_options = kfac_options
        #: how many natgrad.KFAC optimizers this plugin has built
        self.builds = 0
        self._adopted: tuple[KFAC, frozenset[int]] | None = None  # the optimizer, its parameters then

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        """Installs a natgrad.KFAC for ``strategy.model`` unless the current optimizer already is
        one this plugin adopted for the same model and trainable parameters (Avalanche's
        ``make_optimizer`` has then already appended any new parameter to it, on the plain
        gradient: that is why the parameters are compared with those at adoption).
        """
        model, current = strategy.model, strategy.optimizer
        trainable = frozenset(_trainable(model))
        if isinstance(current, KFAC) and current.model is model:
            if self._adopted is None or self._adopted[0] is not current:
                self._adopted = (current, trainable)  # a natgrad.KFAC the strategy was given
            if self._adopted[1] == trainable:
                return
        if isinstance(current, KFAC):
            current.remove_hooks()
        strategy.optimizer = KFAC(model, [p for p in model.parameters() if p.requires_grad], **self.kfac_options)
        strategy.optimized_param_id = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self._adopted = (strategy.optimizer, trainable)
        self.builds += 1


class EWCPlugin(SupervisedPlugin):
    """natgrad.EWC in an Avalanche strategy (see the module docstring): penalty before every
    backward pass, consolidation after every experience, and the K-FAC attach when the strategy's
    optimizer is a natgrad.KFAC.

    Example::

        ewc = EWCPlugin(lambda_=100.0, structure="kfac")  # Kronecker EWC
        strategy = Naive(model=model, optimizer=natgrad.KFAC(model, lr=0.05), plugins=[ewc])
        strategy.train(experience_0)
        strategy.train(experience_1)  # penalised towards experience 0's solution
        ewc.ewc.penalty()

    Args:
        lambda_ (float): λ >= 0 (default: 1.0).
        structure (str): "diagonal" or "kfac" (default: "diagonal").
        attach (str or None): the approximation of :meth:`natgrad.EWC.attach` used when the
            optimizer is a natgrad.KFAC ("auto", "generalized" or "eigenbasis"), or None to leave
            K-FAC's preconditioner alone (default: "auto").
        fisher_samples (int or None): at most this many samples of each experience's training
            set are used to estimate its Fisher (None: all) (default: None).
        fisher_batch_size (int or None): mini-batch size of that estimate (None: the strategy's
            ``train_mb_size``) (default: None).
        **ewc_options: the other keyword arguments of :class:`natgrad.EWC` (``mode``, ``gamma``,
            ``fisher_type``, ``likelihood``, ``train_mode``, ``mc_samples``).
    """

    def __init__(self, lambda_: float = 1.0, *, structure: str = "diagonal", attach: str | None = "auto",
                 fisher_samples: int | None = None, fisher_batch_size: int | None = None,
                 **ewc_options: Any) -> None:
        super().__init__()
        EWC(nn.Linear(1, 1), lambda_, structure=structure, **ewc_options)  # validates the options
        if attach not in (None, "auto", "generalized", "eigenbasis"):
            raise ValueError(f"Invalid attach: {attach!r} (expected None, 'auto', 'generalized' or 'eigenbasis')")
        for name, value in (("fisher_samples", fisher_samples), ("fisher_batch_size", fisher_batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"Invalid {name}: {value!r} (expected a positive int or None)")
        self.lambda_, self.structure, self.attach = float(lambda_), structure, attach
        self.fisher_samples, self.fisher_batch_size = fisher_samples, fisher_batch_size
        self.ewc_options = ewc_options
        #: the natgrad.EWC of the strategy's model (None before the first experience)
        self.ewc: EWC | None = None
        self._attached: tuple[Any, Any] | None = None  # (optimizer, EWCCurvature)

    def _ewc_of(self, model: nn.Module) -> EWC:
        if self.ewc is None or self.ewc.model is not model:  # a replaced model keeps the tasks
            ewc = EWC(model, self.lambda_, structure=self.structure, **self.ewc_options)
            if self.ewc is not None:
                ewc.load_state_dict(self.ewc.state_dict())
            self.ewc = ewc
        return self.ewc

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        """Attaches the EWC to the strategy's natgrad.KFAC (again when it was replaced)."""
        ewc, optimizer = self._ewc_of(strategy.model), strategy.optimizer
        if self.attach is None or (self._attached is not None and self._attached[0] is optimizer):
            return
        if self._attached is not None:
            self._attached[1].detach()
            self._attached = None
        if isinstance(optimizer, KFAC):
            self._attached = (optimizer, ewc.attach(optimizer, self.attach))

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        """Adds the EWC penalty (zero before the first consolidation) to ``strategy.loss``."""
        strategy.loss = strategy.loss + self._ewc_of(strategy.model).penalty()

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        """Consolidates the experience just trained: its Fisher and the current parameters."""
        self._ewc_of(strategy.model).consolidate(list(self._batches(strategy)))

    def _batches(self, strategy: Any) -> Iterator[tuple[Tensor, Tensor]]:
        dataset = strategy.experience.dataset
        dataset = dataset.eval() if hasattr(dataset, "eval") else dataset  # eval transforms
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.fisher_batch_size or strategy.train_mb_size,
                                             collate_fn=getattr(dataset, "collate_fn", None))
        left = self.fisher_samples
        for batch in loader:
            x, y = batch[0], batch[1]
            if left is not None:
                x, y = x[:left], y[:left]
                left -= len(x)
            yield x.to(strategy.device), y.to(strategy.device)
            if left is not None and left <= 0:
                return
