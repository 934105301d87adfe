"""natgrad's version, as compiled into natgrad._C (defined once, in csrc/version.h)."""
from __future__ import annotations

from natgrad import _C

__version__: str = _C.__version__
