# Type stub for the compiled extension (csrc/python/module.cpp); its operators are registered
# under torch.ops.natgrad on import and are typed through natgrad.ops.
from typing import Any

__version__: str

def build_info() -> dict[str, Any]: ...
