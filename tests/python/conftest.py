"""Shared fixtures: deterministic seeds, and the ladder's fault injection always reset. Being in
tests/python, this file also puts tests/python on sys.path, so every test imports the plain helpers
of support.py as ``support``.
"""
from __future__ import annotations

import pytest
import torch

import natgrad


@pytest.fixture(autouse=True)
def _seed_and_reset_ladder():
    torch.manual_seed(0)
    yield
    natgrad._C._force_ladder_failures(0)

