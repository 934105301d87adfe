"""References to private attributes from outside their owner.

Counts every ``x._name`` (not a dunder) whose base is not ``self``/``cls`` nor an imported module,
leaving out torch's own private attributes (``_version``, ``_forward_hooks``,
``_qkv_same_embed_dim``) and natgrad._C's test hooks. Prints each reference, the count per file
and the total.

Usage: python scripts/private_refs.py python/natgrad [tests/python benchmarks]
"""
from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

TORCH_PRIVATES = ("_qkv_same_embed_dim", "_version", "_forward_hooks")
MODULE_NAMES = ("torch", "dist", "np", "F", "nn", "natgrad")


def references(path: Path) -> list[tuple[int, str]]:
    """The private references of one file: (line, expression)."""
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.update(a.asname or a.name for a in node.names)
    hits = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
            continue
        base = node.value
        if isinstance(base, ast.Name) and base.id in ("self", "cls"):
            continue
        root = base
        while isinstance(root, ast.Attribute):
            root = root.value
        if isinstance(root, ast.Name) and root.id in imported and root is base:
            continue  # module._private
        if node.attr in TORCH_PRIVATES or (isinstance(root, ast.Name) and root.id in MODULE_NAMES):
            continue
        hits.append((node.lineno, ast.unparse(node)))
    return sorted(hits)


def main() -> int:
    """Prints the references; returns 0."""
    per: Counter[str] = Counter()
    for directory in sys.argv[1:]:
        for f in sorted(Path(directory).rglob("*.py")):
            for line, text in references(f):
                print(f"  {f}:{line}: {text}")
                per[str(f)] += 1
    for f, n in per.most_common():
        print(n, f)
    print("TOTAL", sum(per.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
