"""natgrad inside the libraries people already train with.

Each submodule imports its library when it is imported itself (``import natgrad`` imports none of
them), and raises ImportError naming the pip package when the library is missing:

* :mod:`natgrad.integrations.transformers`: the layer kind of Hugging Face's ``Conv1D`` (GPT-2's
  linear layers), registered automatically the first time natgrad meets such a module;
* :mod:`natgrad.integrations.avalanche`: an Avalanche plugin for :class:`natgrad.EWC` (diagonal
  or Kronecker, optionally sharing natgrad.KFAC's factors) and one that makes natgrad.KFAC the
  strategy's optimizer;
* :mod:`natgrad.integrations.laplace`: a laplace-torch curvature backend built on natgrad's
  Kronecker factors.

Hugging Face's ``Trainer`` and Lightning need no adapter: ``Trainer(optimizers=(natgrad.KFAC(model),
None))`` and a ``configure_optimizers`` that returns ``natgrad.KFAC(self)`` work as they are (see
``examples/hf_trainer_kfac.py`` and ``examples/lightning_kfac.py``).
"""
from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, package: str, integration: str) -> ModuleType:
    """Imports ``module`` of a client library, or raises ImportError naming its pip ``package``.

    Example::

        avalanche_training = require("avalanche.training", "avalanche-lib", "natgrad.integrations.avalanche")
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{integration} needs {module!r}, which did not import ({error}); install it with "
                          f"`pip install {package}` (tested versions: requirements-clients.txt)") from error
