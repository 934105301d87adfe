"""Regularizers built on the Fisher: EWC."""
from __future__ import annotations

from natgrad.regularizers.ewc import EWC

__all__ = ["EWC"]
