"""Shared fixtures: deterministic seeds, and the ladder's fault injection always reset."""
from __future__ import annotations

import pytest
import torch

import natgrad


@pytest.fixture(autouse=True)
def _seed_and_reset_ladder():
    torch.manual_seed(0)
    yield
    natgrad._C._force_ladder_failures(0)


def random_psd(n: int, rank: int | None = None, dtype=torch.float64, batch=()) -> torch.Tensor:
    """A random symmetric PSD matrix of the given rank (full rank by default)."""
    x = torch.randn(*batch, n, rank or n + 3, dtype=dtype)
    return x @ x.mT / x.shape[-1]
