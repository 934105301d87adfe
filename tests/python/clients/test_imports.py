"""The pinned client libraries import beside natgrad (requirements-clients.txt)."""
from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize(
    "module",
    ["transformers", "timm", "lightning", "avalanche.training", "laplace"],
)
def test_client_library_imports(module):
    importlib.import_module(module)


def test_importing_natgrad_imports_no_client_library():
    import subprocess
    import sys

    code = ("import sys, natgrad, natgrad.integrations; "
            "print(sorted(m for m in ('transformers', 'timm', 'lightning', 'avalanche', 'laplace') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_missing_client_library_names_its_pip_package():
    from natgrad.integrations import require

    with pytest.raises(ImportError, match="pip install some-package"):
        require("natgrad_no_such_module", "some-package", "natgrad.integrations.test")
