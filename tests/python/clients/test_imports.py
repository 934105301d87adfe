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
